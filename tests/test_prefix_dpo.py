"""Prefix-shared DPO (dpo.prefix_sharing) gives TRL's numbers: log-probs, loss, metrics, gradients.

Each comparison builds TRL's DPOTrainer and PrefixSharedDPOTrainer on identical fresh tiny models
(float32, CPU) and the same batch of pairs of very different lengths, some cut by max_length, and
compares everything within 1e-5. The FlexAttention cases (`flex` in their names) compare the
prefix-shared path on FlexAttention with TRL's path on SDPA. ALIGNPRESS_TEST_DEVICE=cuda runs the
comparisons on a GPU (scripts/gpu-measure.sh runs the FlexAttention ones there first).
"""

import json
import math
import os
import random
import shutil

import pytest
import torch
from conftest import ROOT, cli
from datasets import Dataset
from transformers import Gemma2Config, Gemma2ForCausalLM, GemmaConfig, GemmaForCausalLM, Phi3Config, Phi3ForCausalLM
from trl import DPOConfig, DPOTrainer

from alignpress.prefix_dpo import PrefixSharedCollator, PrefixSharedDPOTrainer, pack, token_savings, truncated_pair
from alignpress.tiny import gemma_tokenizer, phi3_tokenizer

DEVICE = os.environ.get("ALIGNPRESS_TEST_DEVICE", "cpu")
if DEVICE != "cpu" and not torch.cuda.is_available():
    raise RuntimeError(f"ALIGNPRESS_TEST_DEVICE={DEVICE}, but torch {torch.__version__} finds no CUDA GPU")
TOL = 1e-5
# Summed log-probs reach ~150, where float32's spacing is 1.5e-5: there the sums may differ in the last bit.
RTOL = 1e-6
WORDS = "The quick brown fox jumps over the lazy dog . What is the capital of France ? Paris".split()


def words(n, offset):
    return " ".join(WORDS[(i * 7 + offset) % len(WORDS)] for i in range(n))


# (prompt, chosen, rejected) words: a long prompt with short answers, a short prompt with long
# answers, answers of very different lengths, a one-word prompt, and pairs max_length=40 cuts.
SHAPES = [(3, 1, 25), (30, 4, 2), (10, 20, 20), (1, 2, 3), (18, 30, 6), (6, 6, 6)]
ROWS = [{"prompt": [{"role": "user", "content": words(p, i)}], "chosen": [{"role": "assistant", "content": words(c, i + 3)}],
         "rejected": [{"role": "assistant", "content": words(r, i + 5)}]} for i, (p, c, r) in enumerate(SHAPES)]
# The (6, 6, 6) pair's answers begin with the same five words: the shared prefix stops at the prompt's
# end, or the log-probs of the answers' first tokens would be left out of the loss.
ROWS[5]["chosen"][0]["content"], ROWS[5]["rejected"][0]["content"] = "The capital of France is Paris", "The capital of France is dog"


def tokenizer(kind):
    return phi3_tokenizer() if kind.startswith("phi3") else gemma_tokenizer()


def fresh_model(kind, tok, attn="sdpa"):
    """The same weights every call. phi3-window: Phi-3 with a sliding window of 8, far shorter than the sequences."""
    torch.manual_seed(0)
    common = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=256, pad_token_id=tok.pad_token_id)
    if kind.startswith("phi3"):
        model = Phi3ForCausalLM(Phi3Config(**common, num_key_value_heads=2, sliding_window=8 if kind == "phi3-window" else None, attn_implementation=attn))
    elif kind == "gemma2":
        # Gemma-2: sliding and full layers alternate (one mask each), attention and final logits soft-capped.
        model = Gemma2ForCausalLM(Gemma2Config(**common, num_key_value_heads=1, head_dim=16, sliding_window=8, attn_logit_softcapping=5.0, final_logit_softcapping=3.0, attn_implementation=attn))
    else:
        model = GemmaForCausalLM(GemmaConfig(**common, num_key_value_heads=1, head_dim=16, attn_implementation=attn))
    model.train()
    return model


def build(cls, kind, lora, tmp, attn="sdpa", precompute=False, **kw):
    from peft import LoraConfig

    tok = tokenizer(kind)
    extra = {"pairs_per_row": kw.pop("pairs_per_row")} if cls is PrefixSharedDPOTrainer else {}
    kw.setdefault("gradient_checkpointing", False)  # TRL's default is on; one case turns it on
    # bf16 off: TRL's default turns it on, and on a GPU the comparisons are float32 too
    args = DPOConfig(output_dir=str(tmp), per_device_train_batch_size=len(ROWS), use_cpu=DEVICE == "cpu", bf16=False, report_to="none", precompute_ref_log_probs=precompute, **kw)
    model = fresh_model(kind, tok, attn)
    if lora:
        peft = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
        torch.manual_seed(1)
        trainer = cls(model=model, args=args, train_dataset=Dataset.from_list(ROWS), processing_class=tok, peft_config=peft, **extra)
        # A fresh adapter is the identity; give it weights so the policy differs from the reference.
        torch.manual_seed(2)
        with torch.no_grad():
            for name, p in trainer.model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.5)
    else:
        trainer = cls(model=model, ref_model=None if precompute else fresh_model(kind, tok, attn), args=args, train_dataset=Dataset.from_list(ROWS), processing_class=tok, **extra)
    if args.gradient_checkpointing:  # as Trainer.train does; these tests call compute_loss directly
        trainer.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=args.gradient_checkpointing_kwargs)
        assert trainer.model.is_gradient_checkpointing
    trainer.model.train()
    return trainer


def policy_logps(trainer, inputs):
    """Per-pair policy log-probs, computed the way DPOTrainer._compute_loss does."""
    kwargs = {k: v for k, v in inputs.items() if k not in ("completion_mask", "ref_chosen_logps", "ref_rejected_logps")}
    labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
    logps = trainer.model(**kwargs, labels=labels, fused_lm_head=True, use_cache=False).log_probs.sum(dim=1)
    return logps.chunk(2)


def step(trainer):
    """One batch of every pair: policy and reference log-probs, loss, logged metrics, gradients."""
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(trainer.train_dataset))])
    inputs = trainer._prepare_inputs(batch)
    with torch.no_grad():
        policy = torch.cat(policy_logps(trainer, inputs))
        reference = torch.cat(trainer.compute_ref_log_probs(trainer.model, inputs))
    loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return {"policy": policy, "reference": reference, "loss": loss.detach(), "grads": grads, "metrics": metrics, "batch": batch}


def assert_same(standard, shared):
    torch.testing.assert_close(shared["policy"], standard["policy"], atol=TOL, rtol=RTOL)
    torch.testing.assert_close(shared["reference"], standard["reference"], atol=TOL, rtol=RTOL)
    torch.testing.assert_close(shared["loss"], standard["loss"], atol=TOL, rtol=0)
    assert standard["grads"].keys() == shared["grads"].keys() and standard["grads"]
    for name, g in standard["grads"].items():
        torch.testing.assert_close(shared["grads"][name], g, atol=TOL, rtol=0, msg=name)
    assert standard["metrics"].keys() == shared["metrics"].keys()
    for key, value in standard["metrics"].items():
        assert shared["metrics"][key] == pytest.approx(value, abs=TOL, rel=RTOL), key


CASES = {
    # kind, LoRA, truncation, pairs per row, loss types, attention, other DPOConfig fields
    "phi3-window-full-keep_start-packed3": ("phi3-window", False, "keep_start", 3, ["sigmoid"], "sdpa", {}),
    "phi3-window-lora-keep_end-checkpointing": ("phi3-window", True, "keep_end", 1, ["sigmoid", "sft"], "sdpa", {"gradient_checkpointing": True}),
    "phi3-window-lora-eager-packed2": ("phi3-window", True, "keep_start", 2, ["ipo"], "eager", {}),
    "gemma-lora-keep_start-packed6": ("gemma", True, "keep_start", 6, ["sigmoid", "sft"], "sdpa", {}),
    "gemma2-softcap-window-lora-eager-packed3": ("gemma2", True, "keep_start", 3, ["sigmoid"], "eager", {}),
    "gemma-full-keep_end-packed4-multiple8": ("gemma", False, "keep_end", 4, ["sigmoid"], "sdpa", {"pad_to_multiple_of": 8}),
    # FlexAttention's block mask (prefix-shared) against SDPA (TRL's layout)
    "phi3-window-lora-flex-packed3": ("phi3-window", True, "keep_start", 3, ["sigmoid", "sft"], "flex_attention", {}),
    "gemma2-softcap-window-lora-flex-packed2": ("gemma2", True, "keep_end", 2, ["sigmoid"], "flex_attention", {}),
    "gemma-full-keep_start-flex-packed6-checkpointing": ("gemma", False, "keep_start", 6, ["ipo"], "flex_attention", {"gradient_checkpointing": True}),
}


@pytest.fixture
def flex_on_this_device(monkeypatch):
    """FlexAttention as it runs here. On the CPU two things are stood in for: torch refuses
    FlexAttention's backward there (its _validate_device), and transformers would compile it
    (Inductor: a C compiler and minutes a shape). So on the CPU it runs uncompiled, torch's
    reference implementation of the same operation, with the refusal lifted: that checks the block
    mask and its plumbing through transformers; the Triton kernel is what the CUDA run checks."""
    if DEVICE != "cpu":
        return
    import torch.nn.attention.flex_attention as torch_flex
    import transformers.integrations.flex_attention as hf_flex

    monkeypatch.setattr(torch_flex, "_validate_device", lambda *a, **k: None)
    monkeypatch.setattr(hf_flex, "compile_friendly_flex_attention", lambda q, k, v, training=False, **kw: torch_flex.flex_attention(q, k, v, **kw))


@pytest.mark.parametrize("case", list(CASES))
def test_same_numbers_as_trl(case, tmp_path, flex_on_this_device):
    kind, lora, mode, per_row, losses, attn, other = CASES[case]
    kw = dict(max_length=40, truncation_mode=mode, loss_type=losses, beta=0.1, **other)
    # Where the prefix-shared path runs on FlexAttention, TRL's runs on SDPA (eager for Gemma-2:
    # transformers offers it no SDPA, whose kernels cannot soft-cap) for the reference numbers
    reference_attn = ("eager" if kind == "gemma2" else "sdpa") if attn == "flex_attention" else attn
    standard = step(build(DPOTrainer, kind, lora, tmp_path / "a", attn=reference_attn, **kw))
    shared = step(build(PrefixSharedDPOTrainer, kind, lora, tmp_path / "b", attn=attn, pairs_per_row=per_row, **kw))
    assert_same(standard, shared)
    # The batch really was cut and really was shared: TRL's rows reach max_length, fewer real tokens
    # run, and packed rows hold fewer token slots than TRL's padded ones.
    assert standard["batch"]["input_ids"].shape[1] == 40
    assert shared["batch"]["shared_input_ids"].shape[0] == -(-len(ROWS) // per_row)
    assert shared["batch"]["shared_input_ids"].shape[1] % math.lcm(8, other.get("pad_to_multiple_of", 1)) == 0
    assert (shared["batch"]["shared_segment_ids"] >= 0).sum() < standard["batch"]["attention_mask"].sum()
    if per_row > 1:
        assert shared["batch"]["shared_input_ids"].numel() < standard["batch"]["input_ids"].numel()
    assert abs(standard["metrics"]["rewards/margins"]) > 1e-3 or not lora  # the adapter moved the policy


def test_sliding_window_bites():
    """Without the window the tiny Phi-3's log-probs change: the window in the tests above is exercised."""
    tok = phi3_tokenizer()
    ids = torch.tensor([tok(words(30, 0))["input_ids"]])
    with torch.no_grad():
        windowed = fresh_model("phi3-window", tok)(input_ids=ids).logits
        full = fresh_model("phi3", tok)(input_ids=ids).logits
    assert ids.shape[1] > 8 and (windowed - full).abs().max() > 1e-3


def test_precomputed_reference(tmp_path):
    import datasets

    kw = dict(max_length=40, truncation_mode="keep_start", loss_type=["sigmoid"], beta=0.1)
    # The precompute cache is keyed by the dataset and the weights, identical here: caching off so
    # the prefix-shared trainer computes its own.
    datasets.disable_caching()
    try:
        standard = build(DPOTrainer, "gemma", True, tmp_path / "a", precompute=True, **kw)
        shared = build(PrefixSharedDPOTrainer, "gemma", True, tmp_path / "b", precompute=True, pairs_per_row=3, **kw)
    finally:
        datasets.enable_caching()
    for column in ("ref_chosen_logps", "ref_rejected_logps"):
        a, b = torch.tensor(standard.train_dataset[column]), torch.tensor(shared.train_dataset[column])
        torch.testing.assert_close(b, a, atol=TOL, rtol=RTOL)
    assert_same(step(standard), step(shared))


def test_collator_layout():
    """Two pairs packed in one row: prompt once, last prompt token repeated per branch, positions restart."""
    collator = PrefixSharedCollator(pad_token_id=0, max_length=None, pairs_per_row=2)
    out = collator([{"prompt_ids": [11, 12, 13], "chosen_ids": [14, 15], "rejected_ids": [16]},
                    {"prompt_ids": [21], "chosen_ids": [22], "rejected_ids": [23, 24]}])
    # TRL's own padded batch is there unchanged (its loss reads it) ...
    assert out["input_ids"].tolist() == [[11, 12, 13, 14, 15], [21, 22, 0, 0, 0], [11, 12, 13, 16, 0], [21, 23, 24, 0, 0]]
    # ... and the packed row: the longer pair first, then the other, padded from 12 to 16 positions
    # (a multiple of 8, so that SDPA's memory-efficient kernel shares the mask across layers).
    assert out["shared_input_ids"].tolist() == [[11, 12, 13, 14, 15, 13, 16, 21, 22, 21, 23, 24] + [0] * 4]
    assert out["shared_position_ids"].tolist() == [[0, 1, 2, 3, 4, 2, 3, 0, 1, 0, 1, 2] + [0] * 4]
    assert out["shared_branch_ids"].tolist() == [[0, 0, 1, 1, 1, 2, 2, 1, 1, 2, 2, 2] + [-1] * 4]
    assert out["shared_segment_ids"].tolist() == [[0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1] + [-1] * 4]
    assert out["shared_labels"].tolist() == [[-100, -100, 14, 15, -100, 16, -100, 22, -100, 23, 24, -100] + [-100] * 4]
    # Targets index TRL's [4 rows, 4 columns] log-prob layout: row 0 col 2 predicts 14, row 2 col 2 predicts 16.
    assert out["shared_targets"].tolist() == [[-1, -1, 2, 3, -1, 10, -1, 4, -1, 12, 13, -1] + [-1] * 4]


def test_answers_with_the_same_first_token_share_only_the_prompt():
    collator = PrefixSharedCollator(pad_token_id=0, max_length=None, pairs_per_row=1)
    out = collator([{"prompt_ids": [11, 12, 13], "chosen_ids": [14, 15], "rejected_ids": [14, 16]}])
    assert out["shared_input_ids"].tolist() == [[11, 12, 13, 14, 15, 13, 14, 16]]
    assert out["shared_labels"].tolist() == [[-100, -100, 14, 15, -100, 14, 16, -100]]
    assert out["shared_targets"].tolist() == [[-1, -1, 2, 3, -1, 6, 7, -1]]
    assert out["shared_position_ids"].tolist() == [[0, 1, 2, 3, 4, 2, 3, 4]]
    assert truncated_pair([11, 12, 13], [14, 15], [14, 16], None)[4] == 3
    # At most pairs_per_row pairs in a row, the longest first into the shortest row
    assert pack([100, 1, 1, 1], 2) == [[0, 3], [1, 2]]


@pytest.mark.parametrize("mode", ["keep_start", "keep_end"])
def test_packed_layout_bounds_every_batch(mode):
    """flops.packed_layout (what the memory estimate counts) bounds the packed rows the collator
    builds for any micro-batch, exactly for the batch of the longest segments; flops.prefix_segment
    equals the collator's segment length (keep_end: an upper bound where the prompt is cut)."""
    from alignpress.flops import packed_layout, prefix_segment
    from alignpress.prefix_dpo import segment_length, truncated_pair

    rng = random.Random(3)
    counts = [(rng.randint(1, 60), rng.randint(1, 50), rng.randint(1, 50)) for _ in range(40)] + [(70, 5, 3)]
    ids = iter(range(10**6))
    examples = [{"prompt_ids": [next(ids) for _ in range(p)], "chosen_ids": [next(ids) for _ in range(c)], "rejected_ids": [next(ids) for _ in range(r)]} for p, c, r in counts]
    max_length = 64
    kept = [(e, n) for e, n in zip(examples, counts) if not (mode == "keep_start" and n[0] >= max_length)]
    assert len(kept) == (40 if mode == "keep_start" else 41)
    exact = 0
    for e, n in kept:
        c, _, r, _, shared = truncated_pair(e["prompt_ids"], e["chosen_ids"], e["rejected_ids"], max_length, mode)
        bound = prefix_segment(*n, max_length, mode)
        assert bound >= segment_length(len(c), len(r), shared)
        exact += bound == segment_length(len(c), len(r), shared)
    assert exact == len(kept) if mode == "keep_start" else exact > len(kept) // 2
    for batch, per_row in ((1, 1), (4, 1), (4, 2), (5, 2), (3, 3), (2, 4)):
        collator = PrefixSharedCollator(pad_token_id=0, max_length=max_length, truncation_mode=mode, pairs_per_row=per_row)
        rows, length = packed_layout([n for _, n in kept], max_length, batch, per_row, mode)
        for _ in range(30):
            out = collator([e for e, _ in rng.sample(kept, batch)])
            assert out["shared_input_ids"].shape[0] == rows and out["shared_input_ids"].shape[1] <= length
        if mode == "keep_start" and (rows == 1 or per_row == 1):  # then the longest segments fill the bound
            longest = sorted(kept, key=lambda k: -prefix_segment(*k[1], max_length))[:batch]
            assert collator([e for e, _ in longest])["shared_input_ids"].shape == (rows, length)


def test_block_mask_skips_hidden_blocks():
    """FlexAttention's BlockMask holds the same rule as the dense mask, and marks as skipped the
    128 x 128 blocks it hides entirely: the other segments and the upper triangle."""
    from torch.nn.attention.flex_attention import create_mask

    from alignpress.prefix_dpo import shared_attention_mask, shared_block_mask, visible

    def layout(*segments):
        """Rows of (prompt, chosen, rejected) segments, each padded to 384 positions."""
        seg, branch, pos = [], [], []
        for row in segments:
            s, b, p = [], [], []
            for i, (n_prompt, n_chosen, n_rejected) in enumerate(row):
                s += [i] * (n_prompt + n_chosen + n_rejected)
                b += [0] * n_prompt + [1] * n_chosen + [2] * n_rejected
                p += list(range(n_prompt + n_chosen)) + list(range(n_prompt, n_prompt + n_rejected))
            pad = 384 - len(s)
            seg.append(s + [-1] * pad), branch.append(b + [-1] * pad), pos.append(p + [0] * pad)
        return torch.tensor(seg), torch.tensor(branch), torch.tensor(pos)

    # Row 0: one pair of 384 tokens; row 1: three pairs of 128 tokens, one per block; row 2: one pair of 128 and padding.
    seg, branch, pos = layout([(200, 100, 84)], [(64, 32, 32)] * 3, [(64, 32, 32)])
    blocks = shared_block_mask(seg, branch, pos, None)
    assert blocks.to_dense()[:, 0].int().tolist() == [
        [[1, 0, 0], [1, 1, 0], [1, 1, 1]],  # causal: the upper triangle skipped
        [[1, 0, 0], [0, 1, 0], [0, 0, 1]],  # block-diagonal: other segments skipped
        [[1, 0, 0], [0, 1, 0], [0, 0, 1]],  # padding sees only itself
    ]
    # SDPA computes all 27 blocks; FlexAttention 6 + 3 + 3 of them.
    assert blocks.sparsity() == pytest.approx(100 * (1 - 12 / 27))
    # Within the blocks it computes, the rule decides element by element, the same as the dense mask's.
    for window in (None, 50):
        dense = shared_attention_mask(seg, branch, pos, window, torch.float32)[:, 0] == 0
        assert torch.equal(create_mask(visible(seg, branch, pos, window), 3, None, 384, 384, device="cpu")[:, 0], dense)
        assert torch.equal(create_mask(shared_block_mask(seg, branch, pos, window).mask_mod, 3, None, 384, 384, device="cpu")[:, 0], dense)
    # attention_blocks sums them over the layers (the benchmark reports the share): 12 of 27 a layer;
    # with Gemma-2's sliding layers (window 64), row 0's block (2, 0) is out of reach too: its queries sit at
    # positions 200 and later, its keys at 0 to 127.
    from transformers import Gemma2Config

    from alignpress.prefix_dpo import attention_blocks

    assert attention_blocks(seg, branch, pos, Phi3Config(num_hidden_layers=2)) == (24, 54)
    assert attention_blocks(seg, branch, pos, Gemma2Config(num_hidden_layers=4, sliding_window=64)) == (2 * 12 + 2 * 11, 4 * 27)
    # The rejected branch (positions 300..383 of row 0) sees the prompt and itself, never the chosen answer.
    dense = shared_attention_mask(seg, branch, pos, None, torch.float32)[0, 0] == 0
    assert dense[300, :200].all() and not dense[300, 200:300].any() and dense[300, 300] and not dense[300, 301:].any()


def test_flex_attention_for_training_only(tiny_phi3):
    """Evaluation and export load SDPA for a flex_attention recipe (shapes change every call there,
    each a compile); training loads FlexAttention."""
    from alignpress.modeling import load_model
    from alignpress.recipe import load_recipe

    recipe = load_recipe(ROOT / "recipes/demo.yaml", ["model.attn_implementation=flex_attention", "dpo.prefix_sharing=true"])
    kinds = {training: load_model(recipe, str(tiny_phi3), device="cpu", dtype=torch.float32, training=training).config._attn_implementation for training in (False, True)}
    assert kinds == {False: "sdpa", True: "flex_attention"}
    eager = load_recipe(ROOT / "recipes/demo.yaml", ["model.attn_implementation=eager"])
    assert load_model(eager, str(tiny_phi3), device="cpu", dtype=torch.float32).config._attn_implementation == "eager"


def test_token_savings():
    # No cut: 15 + 13 standard tokens, 15 + 13 - 9 computed (the prompt once, its last token twice).
    assert token_savings([(10, 5, 3)], None) == {"pairs": 1, "standard_tokens": 28, "prefix_shared_tokens": 19, "saved_fraction": 0.3214}
    # keep_start at 12: 12 + 12 vs 12 + 12 - 9; the pair whose prompt fills max_length is dropped, as TRL does.
    assert token_savings([(10, 5, 3), (12, 1, 1)], 12) == {"pairs": 1, "standard_tokens": 24, "prefix_shared_tokens": 15, "saved_fraction": 0.375}
    # keep_end cutting the prompt differently for the two answers: nothing is shared.
    assert token_savings([(10, 5, 3)], 12, "keep_end")["saved_fraction"] == 0.0
    # keep_end keeps a pair whose prompt fills max_length (TRL cuts its start): it counts
    assert token_savings([(10, 5, 3), (12, 1, 1)], 12, "keep_end") == {"pairs": 2, "standard_tokens": 48, "prefix_shared_tokens": 38, "saved_fraction": 0.2083}


def test_recipe_refuses_unsupported(tmp_path):
    proc = cli("validate", "recipes/demo.yaml", "--set", "dpo.pairs_per_row=4")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == "error: --set dpo.pairs_per_row: field 'dpo.pairs_per_row': packing pairs into rows needs dpo.prefix_sharing: true"
    proc = cli("validate", "recipes/demo.yaml", "--set", "dpo.prefix_sharing=true", "--set", "model.attn_implementation=flash_attention_2")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == ("error: --set dpo.prefix_sharing: field 'dpo.prefix_sharing': needs model.attn_implementation sdpa, eager or "
                                                    "flex_attention (a custom attention mask); 'flash_attention_2' cannot express it")


@pytest.mark.slow
def test_train_stage_same_losses(tmp_path):
    """entrypoint.py train with the switch on gives the per-step losses of the switch off (same data order)."""
    sets = ["--set", "data.max_train_rows=24", "--set", "eval.enabled=false", "--set", "train.max_steps=3", "--set", "train.logging_steps=1"]
    off = tmp_path / "off"
    proc = cli("prepare", "recipes/demo.yaml", "--output-dir", off, *sets)
    assert proc.returncode == 0, proc.stderr[-2000:]
    on = tmp_path / "on"
    shutil.copytree(off, on)
    proc = cli("train", "recipes/demo.yaml", "--output-dir", off, *sets)
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = cli("train", "recipes/demo.yaml", "--output-dir", on, *sets, "--set", "dpo.prefix_sharing=true", "--set", "dpo.pairs_per_row=4")
    assert proc.returncode == 0, proc.stderr[-2000:]

    def history(folder):
        logged = [json.loads(line) for line in (folder / "metrics/train.jsonl").read_text().splitlines()]
        return [h for h in logged if "loss" in h]

    a, b = history(off), history(on)
    assert [h["step"] for h in a] == [h["step"] for h in b] == [1, 2, 3]
    for x, y in zip(a, b):
        assert y["loss"] == pytest.approx(x["loss"], abs=1e-5)
        assert y["logps/chosen"] == pytest.approx(x["logps/chosen"], abs=1e-4)
        assert y["num_tokens"] == x["num_tokens"]  # TRL's count of non-padding tokens, the same in both


@pytest.mark.slow
def test_benchmark_variants_smoke(tmp_path):
    """bench_dpo.py's prefix-shared variants run in smoke mode, through scripts/gpu-measure.sh (the
    GPU slot's script, SMOKE=1: tiny model, CPU); tokens/s counts TRL's tokens, not the fewer computed."""
    import subprocess
    import sys

    env = os.environ | {"SMOKE": "1", "PYTHON": sys.executable, "PHI3_VARIANTS": "tuned-prefix-packed", "PHI3_MORE": "tuned-prefix-ckpt tuned-ckpt-half tuned-40gb tuned-compiled tuned-flex", "OUT": str(tmp_path)}
    proc = subprocess.run(["bash", str(ROOT / "scripts/gpu-measure.sh")], capture_output=True, text=True, cwd=ROOT, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stem = next(tmp_path.glob("cpu-*.json")).stem
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f"{stem}.json", f"{stem}.md", "gpu.txt", "versions.txt", "more"])
    # the later Phi-3 variants go to more/, so they do not replace the first run of the same model
    (more,) = json.loads((tmp_path / "more" / f"{stem}.json").read_text())["runs"]
    # every layer of the tiny model's 2, the first of them, and auto (off without a GPU, the cap not applied)
    *ran, compiled, flex = more["variants"]
    assert [(v["name"], v["status"], v["settings"]["gradient_checkpointing"], v["settings"]["checkpointed_layers"]) for v in ran] == [
        ("tuned-prefix-ckpt", "ok", True, None), ("tuned-ckpt-half", "ok", True, 1), ("tuned-40gb", "ok", False, None)]
    # FlexAttention cannot train on the CPU: skipped with the reason, and no exit status 1 for it
    assert (flex["name"], flex["status"], flex["reason"]) == ("tuned-flex", "skipped", "FlexAttention trains only on a CUDA GPU (torch has no FlexAttention backward on the CPU)")
    assert not (tmp_path / "flex-check.txt").exists()  # the GPU check is not run in smoke mode
    assert more["variants"][1]["systems"]["layers"] == 2 and "train.checkpointed_layers=1" in more["variants"][1]["overrides"]
    assert "no CUDA GPU: the 40 GiB cap does not apply, and auto leaves checkpointing off" in more["variants"][2]["notes"]
    # one reference pass for the same pairs and weights: the first variant's, stored; the later ones reuse it
    assert [(v["results"]["precompute_reused"], v["results"]["precompute_tokens"] > 0) for v in ran] == [(True, False)] * 3
    # decoder layers compiled (train.compile_layers): training's two graphs (first layer, the others),
    # built in the warm-up step; the reference pass was reused, so none without grad
    assert (compiled["status"], compiled["settings"]["compile_layers"], compiled["systems"]["compiled_graphs"]) == ("ok", True, 2)
    assert compiled["results"]["compiled_graphs_timed"] == 0 and compiled["results"]["precompute_reused"] is True
    assert "trl 1.16.0\n" in (tmp_path / "versions.txt").read_text()
    (run,) = json.loads(next(tmp_path.glob("cpu-*.json")).read_text())["runs"]
    (v,) = run["variants"]
    assert v["status"] == "ok" and v["settings"]["prefix_sharing"] and v["settings"]["pairs_per_row"] == 2
    r = v["results"]
    assert r["tokens"] == sum(b["real_tokens"] for b in v["batches"])
    assert r["computed_tokens"] < r["tokens"]
    assert r["precompute_reused"] is False and r["precompute_tokens"] > 0
    # SDPA computes every 128 x 128 block of every packed row in each of the tiny model's 2 layers;
    # FlexAttention's block mask keeps fewer (two pairs a row: the other pair's blocks go)
    blocks = r["attention_blocks"]
    assert blocks["sdpa"] == sum(b["rows"] * math.ceil(b["seq_len"] / 128) ** 2 * 2 for b in v["batches"])
    assert 0 < blocks["flex"] < blocks["sdpa"] and blocks["share"] == round(blocks["flex"] / blocks["sdpa"], 4)
    assert f"tuned-prefix-packed {blocks['share']:.1%}." in next(tmp_path.glob("cpu-*.md")).read_text()
    # tokens/s from the unrounded time; the file keeps seconds to 4 decimals and tokens/s to 2
    assert r["tokens"] / (r["seconds"] + 5e-5) - 0.005 <= r["tokens_per_s"] <= r["tokens"] / (r["seconds"] - 5e-5) + 0.005
    saving = run["data"]["prefix_sharing"]
    assert saving["max_length"] == 128 and 0.2 < saving["saved_fraction"] < 0.5
    assert "Prefix sharing computes" in proc.stdout
