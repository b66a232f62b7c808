"""The speed levers through the real entry point on the demo: recorded decisions, stored log-probs.

Liger needs CUDA, so on the CPU the run ignores it with a logged reason; checkpointing `auto` is
off without a GPU (its GPU decision is unit-tested with fake memory sizes in test_plan.py).
"""

import json
import shutil

import pytest
from conftest import cli

LEVERS = ["--set", "train.use_liger_kernel=true", "--set", "train.group_by_length=true", "--set", "dpo.precompute_ref_log_probs=true", "--set", "train.max_steps=3", "--set", "eval.enabled=false"]


def prepared_copy(demo_run, tmp_path):
    """The demo's prepared data in a fresh folder: training settings may still change there."""
    src, out = demo_run[0], tmp_path / "levers"
    out.mkdir()
    shutil.copytree(src / "data", out / "data")
    shutil.copy(src / "recipe.resolved.yaml", out / "recipe.resolved.yaml")
    manifest = json.loads((src / "run.json").read_text())
    manifest["stages"] = {"prepare": manifest["stages"]["prepare"]}
    (out / "run.json").write_text(json.dumps(manifest))
    return out


def test_levers_are_recorded_and_precomputed_log_probs_survive_a_resume(demo_run, tmp_path):
    out = prepared_copy(demo_run, tmp_path)
    proc = cli("train", "recipes/demo.yaml", "--output-dir", out, *LEVERS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "use_liger_kernel: False (off: Liger's kernels are Triton code for CUDA GPUs; this run is on the CPU)" in proc.stderr
    assert "gradient_checkpointing: False (no CUDA GPU: off)" in proc.stderr
    systems = json.loads((out / "run.json").read_text())["stages"]["train"]["systems"]
    assert systems["group_by_length"] is True and systems["precompute_ref_log_probs"] is True and systems["use_liger_kernel"] is False
    assert systems["precompute_ref_batch_size"] == 8  # the demo's per_device_train_batch_size
    assert systems["precompute"]["reused"] is False
    (folder,) = (out / "ref_logps").iterdir()
    assert systems["precompute"]["folder"] == str(folder) and f"reference log-probs computed and stored in {folder}" in proc.stderr
    # the cache key, TRL's hash of the weights, computed by alignpress.refcache (timed apart from the pass)
    assert 0 <= systems["precompute"]["hash_s"] <= systems["precompute"]["setup_s"]
    assert f" s, of which {systems['precompute']['hash_s']:.1f} s hashing the weights for the key)" in proc.stderr
    assert (folder / ".complete").exists() and list(folder.glob("cache-*.arrow"))

    # A preempted run (the stage interrupted, as SIGTERM leaves it; test_spot.py does the real one)
    # comes back: the stored log-probs are reused, and `auto` now chooses them even for 1 epoch.
    manifest = json.loads((out / "run.json").read_text())
    manifest["stages"]["train"]["status"] = "interrupted"
    (out / "run.json").write_text(json.dumps(manifest))
    shutil.rmtree(out / "adapter")
    again = cli("train", "recipes/demo.yaml", "--output-dir", out, *LEVERS)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"reference log-probs reused from {folder}" in again.stderr
    systems = json.loads((out / "run.json").read_text())["stages"]["train"]["systems"]
    assert systems["precompute"]["reused"] is True and systems["precompute"]["hash_s"] is not None  # found by the same key

    # Stopped before its first checkpoint and started again with another training setting (as a spot
    # VM of another GPU type decides `auto` checkpointing again): TRL's own key holds every DPOConfig
    # field and would compute the pass again; the key made from the token ids finds it.
    manifest = json.loads((out / "run.json").read_text())
    manifest["stages"]["train"]["status"] = "interrupted"
    (out / "run.json").write_text(json.dumps(manifest))
    shutil.rmtree(out / "adapter")
    shutil.rmtree(out / "checkpoints")
    third = cli("train", "recipes/demo.yaml", "--output-dir", out, *LEVERS, "--set", "train.logging_steps=2")
    assert third.returncode == 0, third.stderr[-3000:]
    assert f"reference log-probs reused from {folder}" in third.stderr
    assert json.loads((out / "run.json").read_text())["stages"]["train"]["systems"]["precompute"]["reused"] is True


def test_precompute_auto_follows_the_epochs(demo_run, tmp_path):
    out = prepared_copy(demo_run, tmp_path)
    proc = cli("train", "recipes/demo.yaml", "--output-dir", out, "--set", "train.max_steps=2", "--set", "eval.enabled=false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    systems = json.loads((out / "run.json").read_text())["stages"]["train"]["systems"]
    # 2 steps x 8 pairs of the demo's training rows is far below 5.45 epochs
    assert systems["precompute_ref_log_probs"] is False
    assert systems["precompute_ref_log_probs_decision"]["reason"].startswith("off: 0.0")
    assert not (out / "ref_logps").exists()


def test_auto_checkpointing_on_a_fake_gpu():
    """resolve_systems feeds the estimate the recipe's micro-batch, the data's longest row and the
    levers as they will run (here no liger-kernel installed: Liger off, so no Liger saving)."""
    import torch
    from transformers import Phi3Config

    from alignpress.flops import KNOWN_ARCHS, MemorySettings, memory_estimate
    from alignpress.recipe import load_recipe
    from alignpress.train import resolve_systems
    from conftest import ROOT

    phi3 = Phi3Config(hidden_size=3072, intermediate_size=8192, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, vocab_size=32064, sliding_window=2047)
    recipe = load_recipe(ROOT / "recipes/phi3-mini-capybara.yaml", ["dpo.prefix_sharing=false"])  # TRL's layout (the next test: packed)
    rows = [{"prompt_tokens": 500, "chosen_tokens": 300, "rejected_tokens": 200}] * 99 + [{"prompt_tokens": 900, "chosen_tokens": 100, "rejected_tokens": 3000}]
    # the longest row: 900 + 3,000 cut to max_length 2,048; 4 pairs a micro-batch; reference precomputed (6 epochs)
    liger = resolve_systems(recipe, rows, "cuda", torch.bfloat16, None, config=phi3, gpu_gib=1000)["use_liger_kernel"]
    try:
        import liger_kernel  # noqa: F401
    except ImportError:
        assert liger is False  # this machine: not installed, so not counted
    expected = memory_estimate(KNOWN_ARCHS["microsoft/Phi-3-mini-4k-instruct"], MemorySettings(micro_batch_pairs=4, seq_len=2048, precompute_ref=True, liger=liger))["total_gib"]
    for gpu_gib, on in ((expected / 0.9 + 0.01, False), (expected / 0.9 - 0.01, True)):  # auto keeps the estimate within 90% of the GPU
        s = resolve_systems(recipe, rows, "cuda", torch.bfloat16, None, config=phi3, gpu_gib=gpu_gib)
        assert s["precompute_ref_log_probs"] is True
        assert s["gradient_checkpointing"] is on
        assert s["gradient_checkpointing_decision"]["estimate_without_gib"] == round(expected, 2)
        # just above the GPU: one layer of 32 recomputes for the longest micro-batch, fewer for shorter ones
        assert (s.get("checkpointed_layers"), s.get("checkpointing_per_batch")) == ((1, True) if on else (None, None))
    s = resolve_systems(recipe, rows, "cuda", torch.bfloat16, None, config=phi3, gpu_gib=1.0)  # nothing fits: every layer
    assert (s["gradient_checkpointing"], s["checkpointed_layers"]) == (True, 32) and s["gradient_checkpointing_decision"]["reason"].startswith("on for all 32 layers")
    # set explicitly, nothing is decided
    s = resolve_systems(load_recipe(ROOT / "recipes/phi3-mini-capybara.yaml", ["dpo.prefix_sharing=false", "train.gradient_checkpointing=true"]), rows, "cuda", torch.bfloat16, None, config=phi3, gpu_gib=500)
    assert s["gradient_checkpointing"] is True and "gradient_checkpointing_decision" not in s and "checkpointed_layers" not in s
    s = resolve_systems(load_recipe(ROOT / "recipes/phi3-mini-capybara.yaml", ["train.gradient_checkpointing=true", "train.checkpointed_layers=9"]), rows, "cuda", torch.bfloat16, None, config=phi3, gpu_gib=500)
    assert (s["gradient_checkpointing"], s["checkpointed_layers"]) == (True, 9)


def test_auto_checkpointing_counts_the_packed_rows_of_prefix_sharing():
    """With dpo.prefix_sharing the estimate counts the packed rows a micro-batch runs, not TRL's
    2 x batch rows: each prompt once, segments padded to 8 (what flops.packed_layout bounds; the
    collator side is tested in test_prefix_dpo.py)."""
    import torch
    from transformers import Phi3Config

    from alignpress.flops import KNOWN_ARCHS, MemorySettings, memory_estimate
    from alignpress.recipe import load_recipe
    from alignpress.train import resolve_systems
    from conftest import ROOT

    phi3 = Phi3Config(hidden_size=3072, intermediate_size=8192, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, vocab_size=32064, sliding_window=2047)
    arch = KNOWN_ARCHS["microsoft/Phi-3-mini-4k-instruct"]
    rows = [{"prompt_tokens": 500, "chosen_tokens": 300, "rejected_tokens": 200}] * 99 + [{"prompt_tokens": 900, "chosen_tokens": 100, "rejected_tokens": 3000}]
    fields = ["dpo.prefix_sharing=true", "train.use_liger_kernel=false"]
    standard = memory_estimate(arch, MemorySettings(micro_batch_pairs=4, seq_len=2048, precompute_ref=True))["total_gib"]
    # The longest segment: 1,000 + 2,048 (the rejected row cut at max_length) - 899 shared = 2,149 -> 2,152.
    # One pair a row: 4 rows of 2,152; two a row: 2 rows of 2,149 + 1,001 = 3,150 -> 3,152.
    for per_row, packed_rows, packed_len in ((1, 4, 2152), (2, 2, 3152)):
        recipe = load_recipe(ROOT / "recipes/phi3-mini-capybara.yaml", [*fields, f"dpo.pairs_per_row={per_row}"])
        expected = memory_estimate(arch, MemorySettings(micro_batch_pairs=4, seq_len=2048, precompute_ref=True, packed_rows=packed_rows, packed_len=packed_len))
        assert expected["parts_gib"]["attention_masks"] == packed_rows * packed_len**2 * 2 / 1024**3
        s = resolve_systems(recipe, rows, "cuda", torch.bfloat16, None, config=phi3, gpu_gib=expected["total_gib"] / 0.9 + 0.01)
        decision = s["gradient_checkpointing_decision"]
        assert s["gradient_checkpointing"] is False
        assert decision["estimate_without_gib"] == round(expected["total_gib"], 2) < standard - 5
        assert f"for {packed_rows} packed rows x {packed_len} tokens)" in decision["reason"]
    # An 80 GB card with 75 GiB free: TRL's layout needs checkpointing for these rows (91.5 GiB), the packed one does not.
    s = resolve_systems(load_recipe(ROOT / "recipes/phi3-mini-capybara.yaml", fields), rows, "cuda", torch.bfloat16, None, config=phi3, gpu_gib=75)
    assert round(standard, 1) == 91.5 and s["gradient_checkpointing"] is False and s["gradient_checkpointing_decision"]["estimate_without_gib"] == 52.75


def test_checkpointing_some_layers_through_the_entry_point(demo_run, tmp_path):
    """train.checkpointed_layers on the demo (4 decoder layers): applied, logged and recorded.
    (Which layers recompute, and the numbers, are tested in test_checkpointing.py.)"""
    out = prepared_copy(demo_run, tmp_path)
    proc = cli("train", "recipes/demo.yaml", "--output-dir", out, "--set", "train.gradient_checkpointing=true", "--set", "train.checkpointed_layers=1",
               "--set", "train.max_steps=2", "--set", "eval.enabled=false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "gradient checkpointing recomputes 1 of 4 decoder layers" in proc.stderr
    systems = json.loads((out / "run.json").read_text())["stages"]["train"]["systems"]
    assert (systems["gradient_checkpointing"], systems["checkpointed_layers"], systems["layers"]) == (True, 1, 4)


def test_cuda_allocator_expandable_segments_unless_the_user_chose(monkeypatch, capsys):
    """entrypoint.py sets PYTORCH_ALLOC_CONF (inherited by the stages' child processes) before torch
    allocates; a user's own setting, under either name, is left alone; run.json records it on CUDA.
    (Only CUDA builds read it: the CPU build here accepts any value, so the GPU run checks it.)"""
    import os

    import torch
    from transformers import Phi3Config

    from alignpress import processes
    from alignpress.cli import main
    from alignpress.recipe import load_recipe
    from alignpress.train import resolve_systems
    from conftest import ROOT

    for name in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF"):  # set first, so monkeypatch restores what was there
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    assert main(["schema"]) == 0 and capsys.readouterr().out
    assert os.environ["PYTORCH_ALLOC_CONF"] == "expandable_segments:True"
    phi3 = Phi3Config(hidden_size=3072, intermediate_size=8192, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, vocab_size=32064)
    rows = [{"prompt_tokens": 500, "chosen_tokens": 300, "rejected_tokens": 200}] * 10
    recipe = load_recipe(ROOT / "recipes/phi3-mini-capybara.yaml")
    assert resolve_systems(recipe, rows, "cuda", torch.bfloat16, None, config=phi3, gpu_gib=500)["cuda_allocator"] == "PYTORCH_ALLOC_CONF=expandable_segments:True"
    assert "cuda_allocator" not in resolve_systems(recipe, rows, "cpu", torch.float32, None, config=phi3)

    monkeypatch.delenv("PYTORCH_ALLOC_CONF")
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "backend:cudaMallocAsync")
    assert processes.configure_cuda_allocator() == "PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync"
    assert "PYTORCH_ALLOC_CONF" not in os.environ
    assert resolve_systems(recipe, rows, "cuda", torch.bfloat16, None, config=phi3, gpu_gib=500)["cuda_allocator"] == "PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync"


def test_compiled_layers_through_the_entry_point(demo_run, tmp_path):
    """train.compile_layers on the demo with Inductor's generated code, as a run uses it: the same
    losses as the eager run, step by step, and the compile recorded."""
    losses = {}
    for compiled in (False, True):
        (tmp_path / str(compiled)).mkdir()
        out = prepared_copy(demo_run, tmp_path / str(compiled))
        proc = cli("train", "recipes/demo.yaml", "--output-dir", out, "--set", f"train.compile_layers={str(compiled).lower()}",
                   "--set", "train.max_steps=3", "--set", "train.logging_steps=1", "--set", "eval.enabled=false")
        assert proc.returncode == 0, proc.stderr[-3000:]
        systems = json.loads((out / "run.json").read_text())["stages"]["train"]["systems"]
        assert systems["compile_layers"] is compiled
        losses[compiled] = [json.loads(line)["loss"] for line in (out / "metrics" / "train.jsonl").read_text().splitlines() if '"loss"' in line]
    assert "torch.compile: 4 decoder layers compiled in place" in proc.stderr
    # training (first layer, others) and the reference forward without grad; the demo checkpoints nothing
    assert systems["compiled_graphs"] == 3 and "torch.compile: 3 graphs compiled during training" in proc.stderr
    assert len(losses[True]) == 3
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)


def test_a_full_fine_tune_holds_its_weights_in_float32(tmp_path):
    """model.dtype bfloat16 is the compute dtype: a full fine-tune's weights stay float32 (the Trainer's
    autocast on a GPU), because a bf16 weight of 0.02 rounds away an Adam step of lr 5e-6. Trained in
    bf16 (as before), 4 steps changed 5.5% of the weights; in float32 99.99%."""
    from safetensors.torch import load_file

    from alignpress.modeling import built_builtin

    out = tmp_path / "full"
    sets = ["--set", "lora.enabled=false", "--set", "model.dtype=bfloat16", "--set", "train.learning_rate=5e-6", "--set", "train.warmup_steps=0",
            "--set", "train.max_steps=4", "--set", "eval.enabled=false"]
    assert cli("prepare", "recipes/demo.yaml", "--output-dir", out, *sets).returncode == 0
    proc = cli("train", "recipes/demo.yaml", "--output-dir", out, *sets)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "full fine-tuning: weights held in float32, computed in bfloat16 under autocast" in proc.stderr
    trained = load_file(out / "full/model.safetensors")
    base = load_file(built_builtin("builtin:tiny-phi3-arithmetic") / "model.safetensors")
    layers = [k for k in trained if ".layers." in k and k.endswith("proj.weight")]
    assert layers and all(trained[k].dtype.is_floating_point and trained[k].dtype.itemsize == 4 for k in layers)
    # against the base as the run held it (rounded to the trained dtype): only the updates count
    changed = sum(int((trained[k] != base[k].to(trained[k].dtype)).sum()) for k in layers) / sum(trained[k].numel() for k in layers)
    assert changed > 0.9, changed


@pytest.mark.parametrize(("sets", "p"), [([], 0.0), (["dpo.disable_dropout=false"], 0.3)])
def test_lora_dropout_applies_only_when_trl_leaves_dropout_on(sets, p, tmp_path):
    """TRL's DPOTrainer turns every dropout off after it wraps the model in the adapter (disable_dropout,
    its default): lora.dropout applied to nothing, while the card said `dropout=0.05`. The card now says
    what ran, and dpo.disable_dropout=false lets it apply."""
    import torch
    from datasets import Dataset
    from transformers import Phi3Config, Phi3ForCausalLM

    from alignpress.card import render_model_card
    from alignpress.recipe import load_recipe
    from alignpress.refcache import StableKeyDPOTrainer
    from alignpress.runstate import RunDir
    from alignpress.tiny import phi3_tokenizer
    from alignpress.train import dpo_config, lora_config
    from conftest import ROOT

    recipe = load_recipe(ROOT / "recipes/demo.yaml", ["lora.dropout=0.3", *sets])
    tok = phi3_tokenizer()
    model = Phi3ForCausalLM(Phi3Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                       pad_token_id=tok.pad_token_id))
    run_dir = RunDir(tmp_path / "run")
    pair = {"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]}
    trainer = StableKeyDPOTrainer(model=model, args=dpo_config(recipe, run_dir, "cpu", torch.float32), train_dataset=Dataset.from_list([pair]),
                                  processing_class=tok, peft_config=lora_config(recipe))
    found = {m.p for name, m in trainer.model.named_modules() if "lora_dropout" in name and isinstance(m, torch.nn.Dropout)}
    assert found == {p}
    run_dir.init(recipe.name, "demo.yaml")
    card = render_model_card(recipe, run_dir)
    assert ("dropout=0.3, modules" if p else "dropout off (TRL's disable_dropout), modules") in card
