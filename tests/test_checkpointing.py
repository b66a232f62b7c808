"""Gradient checkpointing for some decoder layers only (train.checkpointed_layers, and what
`auto` picks): alignpress.modeling.limit_checkpointing, on real tiny models and a real DPOTrainer.

A checkpointed layer runs its forward twice (once more in backward). That is counted with a
pre-hook on each layer's attention module: the recompute calls the layer's `forward` directly,
so hooks on the layer itself would not see it. The memory the lever frees is counted as the bytes
autograd saves for backward outside checkpointed regions (torch's saved-tensor hooks).
"""

import tempfile
import warnings

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import GemmaConfig, GemmaForCausalLM, Phi3Config, Phi3ForCausalLM
from trl import DPOConfig, DPOTrainer

from alignpress.modeling import decoder_layers, limit_checkpointing
from alignpress.tiny import phi3_tokenizer

LAYERS = 4


def tiny(kind: str, vocab: int = 128):
    torch.manual_seed(0)
    common = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2, attn_implementation="sdpa")
    if kind == "phi3":
        return Phi3ForCausalLM(Phi3Config(**common, num_key_value_heads=2))
    return GemmaForCausalLM(GemmaConfig(**common, num_key_value_heads=1, head_dim=16))


def count_attention_calls(model) -> list[int]:
    calls = [0] * LAYERS
    for i, layer in enumerate(decoder_layers(model)):
        layer.self_attn.register_forward_pre_hook(lambda module, args, i=i: calls.__setitem__(i, calls[i] + 1))
    return calls


def one_step(kind: str, layers: int | None):
    """Loss, attention calls per layer, bytes saved for backward and the LoRA gradients of one
    forward and backward with the first `layers` layers checkpointed (None: checkpointing off)."""
    model = tiny(kind)
    if layers is not None:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        assert len(limit_checkpointing(model, layers).layers) == LAYERS
    torch.manual_seed(1)
    model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # nonzero, so every adapter gets a gradient that depends on the layers above
            torch.nn.init.normal_(p, std=0.02)
    model.train()
    calls = count_attention_calls(model)
    ids = torch.randint(3, 128, (2, 40), generator=torch.Generator().manual_seed(2))
    saved = [0]

    def pack(t):
        saved[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return loss.item(), calls, saved[0], grads


@pytest.mark.parametrize("kind", ["phi3", "gemma"])
def test_the_first_layers_recompute_the_rest_keep_their_activations(kind):
    loss, calls, saved_none, grads = one_step(kind, None)
    assert calls == [1] * LAYERS and len(grads) == 2 * LAYERS * (7 if kind == "gemma" else 4)
    saved = {}
    for k in range(1, LAYERS + 1):
        loss_k, calls_k, saved[k], grads_k = one_step(kind, k)
        # the first k layers ran twice, the others once; the numbers are the same
        assert calls_k == [2] * k + [1] * (LAYERS - k)
        assert loss_k == loss
        assert max((grads_k[n] - grads[n]).abs().max().item() for n in grads) <= 1e-6
    # Every layer checkpointed frees memory by the same amount (layers 1..3 are alike; layer 0
    # saves less to begin with, its input needing no gradient).
    freed = [saved_none - saved[1]] + [saved[k] - saved[k + 1] for k in range(1, LAYERS)]
    assert all(f > 0 for f in freed)
    assert freed[1] == freed[2] == freed[3] > freed[0]


def test_limit_checkpointing_off_is_a_no_op():
    model = tiny("phi3")
    limit_checkpointing(model, 1)  # checkpointing never enabled: nothing recomputes
    model.train()
    calls = count_attention_calls(model)
    ids = torch.randint(3, 128, (1, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    assert calls == [1] * LAYERS


def dpo_trainer(model, tok, **kw):
    ds = Dataset.from_list([{"prompt": "What is 2 plus 2?", "chosen": " 4", "rejected": " maybe 5"}] * 2)
    args = DPOConfig(output_dir=tempfile.mkdtemp(), max_steps=2, per_device_train_batch_size=2, use_cpu=True, activation_checkpointing=True,
                     report_to=[], save_strategy="no", disable_tqdm=True, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return DPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, peft_config=LoraConfig(r=4, target_modules="all-linear"))


@pytest.mark.parametrize("precompute", [False, True])
def test_the_limit_holds_through_trls_reference_passes(precompute):
    """TRL turns checkpointing off around each reference forward and back on for every layer; the
    limit still holds at every step. Per step: the policy forward, the recompute of layer 0, and
    (without precompute) the reference forward."""
    tok = phi3_tokenizer()
    model = tiny("phi3", vocab=len(tok))
    limit_checkpointing(model, 1)
    calls = count_attention_calls(model)
    trainer = dpo_trainer(model, tok, precompute_ref_log_probs=precompute)
    before = list(calls)
    assert before == ([1] * LAYERS if precompute else [0] * LAYERS)  # the precompute pass: one forward
    trainer.train()
    ran = [c - b for c, b in zip(calls, before)]
    per_step = [2, 1, 1, 1] if precompute else [3, 2, 2, 2]
    assert ran == [2 * n for n in per_step]


def test_pin_transformers_every_n_layers_breaks_under_trls_reference_pass():
    """Why limit_checkpointing exists: transformers 5.23's own `every_n_layers`, given through the
    training arguments, is passed back by TRL 1.16 when it re-enables checkpointing after the
    reference forward, where torch's checkpoint refuses it: the second step fails. If this test
    fails, the libraries changed and `every_n_layers` may do the job."""
    tok = phi3_tokenizer()
    trainer = dpo_trainer(tiny("phi3", vocab=len(tok)), tok, activation_checkpointing_kwargs={"every_n_layers": 2})
    with pytest.raises(ValueError, match="Unexpected keyword arguments: every_n_layers"):
        trainer.train()


def test_the_count_can_follow_each_micro_batch():
    """With a `decide` function the count is chosen for every training forward from its hidden
    states' shape: here the longer of two pairs recomputes 2 layers, the shorter none."""
    tok = phi3_tokenizer()
    model = tiny("phi3", vocab=len(tok))
    shapes = []

    def decide(rows, length):
        shapes.append((rows, length))
        return 2 if length > 30 else 0

    control = limit_checkpointing(model, LAYERS, decide)
    calls = count_attention_calls(model)
    long_answer = " " + "very " * 30 + "sure"
    ds = Dataset.from_list([{"prompt": "What is 2 plus 2?", "chosen": " 4", "rejected": " 5"}, {"prompt": "What is 2 plus 2?", "chosen": long_answer, "rejected": " 5"}])
    args = DPOConfig(output_dir=tempfile.mkdtemp(), max_steps=2, per_device_train_batch_size=1, use_cpu=True, activation_checkpointing=True, precompute_ref_log_probs=True,
                     report_to=[], save_strategy="no", disable_tqdm=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = DPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, peft_config=LoraConfig(r=4, target_modules="all-linear"))
    before = list(calls)
    trainer.train()
    # TRL's layout: 2 rows (chosen, rejected) a pair; one step ran each pair
    assert [r for r, _ in shapes] == [2, 2] and sorted(n > 30 for _, n in shapes) == [False, True]
    assert control.seen == {0: 1, 2: 1}
    assert [c - b for c, b in zip(calls, before)] == [3, 3, 2, 2]  # two forwards each; layers 0 and 1 recomputed once


def test_auto_per_batch_counts_on_the_phi3_shape():
    """`auto` on a 40 GB card with the benchmark's worst case (4 packed rows of 2,832 positions):
    15 of 32 layers for that batch, fewer for shorter ones, none for short ones; the same decision
    function the estimate makes (a meta-device model: shapes only)."""
    from alignpress.flops import KNOWN_ARCHS, checkpointing_decision
    from alignpress.recipe import load_recipe
    from alignpress.train import apply_checkpointing, memory_settings, resolve_systems
    from conftest import ROOT

    config = Phi3Config(hidden_size=3072, intermediate_size=8192, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, vocab_size=32064, sliding_window=2047)
    with torch.device("meta"):
        model = Phi3ForCausalLM(config)
    recipe = load_recipe(ROOT / "recipes/phi3-mini-capybara.yaml", ["dpo.max_length=2048", "data.filters.max_tokens=null", "train.use_liger_kernel=false"])
    rows = [{"prompt_tokens": 1400, "chosen_tokens": 700, "rejected_tokens": 700}] + [{"prompt_tokens": 300, "chosen_tokens": 200, "rejected_tokens": 200}] * 30
    systems = resolve_systems(recipe, rows, "cuda", torch.bfloat16, None, config=config, gpu_gib=40.0)
    worst = memory_settings(recipe, rows, torch.bfloat16, True, False)
    assert (worst.packed_rows, worst.packed_len) == (4, 2704)  # rows cut to 2,048: 1,400 + 2 x 648 answer tokens, to a multiple of 8
    expected = checkpointing_decision(KNOWN_ARCHS["microsoft/Phi-3-mini-4k-instruct"], worst, 40.0)["checkpointed_layers"]
    assert systems["gradient_checkpointing"] is True and systems["checkpointing_per_batch"] is True and systems["checkpointed_layers"] == expected
    control = apply_checkpointing(model, systems, recipe, rows, torch.bfloat16)
    assert systems["layers"] == 32 and control.count == expected
    counts = [control.decide(4, n) for n in (2704, 2400, 2000, 1600, 1200, 704)]
    assert counts[0] == expected and counts == sorted(counts, reverse=True) and counts[-1] == 0 and 0 < counts[2] < expected
    assert control.decide(2, 2704) < expected  # fewer rows, fewer layers
    # a count in the recipe is fixed
    fixed = resolve_systems(load_recipe(ROOT / "recipes/phi3-mini-capybara.yaml", ["train.checkpointed_layers=20", "train.use_liger_kernel=false"]), rows, "cuda", torch.bfloat16, None, config=config, gpu_gib=40.0)
    assert (fixed["checkpointed_layers"], fixed["checkpointing_per_batch"]) == (20, False)
    with torch.device("meta"):
        assert apply_checkpointing(Phi3ForCausalLM(config), fixed, recipe, rows, torch.bfloat16).decide is None
