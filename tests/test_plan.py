"""`entrypoint.py plan` and its arithmetic (alignpress.flops), checked against hand-computed cases.

Shapes of Phi-3-mini and Gemma-2b come from shared/reference/models-and-data.md (the models'
public configs). The throughput and prices used here are test inputs, not measurements.
"""

import json
import math
import os
import re
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from conftest import cli
from alignpress.flops import (
    KNOWN_ARCHS,
    NF4_BYTES_PER_PARAM,
    Arch,
    GiB,
    MemorySettings,
    causal_pairs,
    dataset_flops,
    flops_per_token,
    memory_estimate,
    padding_fraction,
    sequence_flops,
    truncate_pair,
)
from alignpress.plan import project, recommend

# hidden 8, 2 layers, 2 heads x 4 dims (d_attn 8), 1 key/value head (d_kv 4), MLP 16, vocab 32
ROOT = Path(__file__).resolve().parents[1]
TOY = Arch("toy", hidden=8, layers=2, heads=2, kv_heads=1, head_dim=4, intermediate=16, vocab=32, tied_embeddings=False)
PHI3 = KNOWN_ARCHS["microsoft/Phi-3-mini-4k-instruct"]
GEMMA = KNOWN_ARCHS["google/gemma-2b-it"]
GPUS = json.loads((ROOT / "src/alignpress/data/gpus.json").read_text())["gpus"]
PRICES = json.loads((ROOT / "src/alignpress/data/gpu_prices.json").read_text())["gpus"]


@pytest.fixture(autouse=True)
def no_sky(monkeypatch):
    """The dated table, whatever SkyPilot catalog this machine has cached (tests that want it set it)."""
    monkeypatch.setenv("ALIGNPRESS_SKY_PYTHON", "none")


def test_parameter_counts_by_hand():
    # per layer: q 8x8=64, k 8x4=32, v 32, o 64, gate 8x16=128, up 128, down 128 -> 576
    assert TOY.body_params == 2 * 576
    # embeddings 32x8, untied head 32x8, norms (2 per layer + final) x 8
    assert TOY.total_params == 1152 + 256 + 256 + 40
    # LoRA r=2: 2 x (in + out) per linear: q 32, k 24, v 24, o 32, gate 48, up 48, down 48 -> 256 a layer
    assert TOY.lora_params(2) == 2 * 256
    assert TOY.lora_params(2, ["q_proj", "v_proj"]) == 2 * (32 + 24)
    # Phi-3-mini: per layer qkv 3072x9216 + o 3072x3072 + gate_up 3072x16384 + down 8192x3072
    per_layer = 3072 * 9216 + 3072 * 3072 + 3072 * 16384 + 8192 * 3072
    assert PHI3.body_params == 32 * per_layer == 3_623_878_656
    assert PHI3.total_params == 3_623_878_656 + 2 * 32064 * 3072 + 65 * 3072  # "about 3.8B"
    assert PHI3.lora_params(16) == 32 * 16 * ((3072 + 9216) + (3072 + 3072) + (3072 + 16384) + (8192 + 3072)) == 25_165_824
    # Gemma-2b: q 2048x2048, k and v 2048x256, o 2048x2048, gate/up 2048x16384, down 16384x2048; tied
    per_layer = 2 * 2048 * 2048 + 2 * 2048 * 256 + 3 * 2048 * 16384
    assert GEMMA.total_params == 18 * per_layer + 256000 * 2048 + 37 * 2048 == 2_506_172_416  # "about 2.5B"


def test_parameter_counts_match_real_models():
    """The formulas count what transformers builds and what peft adapts (fused Phi-3, separate Gemma)."""
    from peft import LoraConfig, get_peft_model
    from transformers import GemmaConfig, GemmaForCausalLM, Phi3Config, Phi3ForCausalLM

    from alignpress.flops import arch_from_config

    ids = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2, max_position_embeddings=64)
    for cls, config in [
        (Phi3ForCausalLM, Phi3Config(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, **ids)),
        (GemmaForCausalLM, GemmaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1, head_dim=16, **ids)),
    ]:
        arch = arch_from_config(config)
        model = cls(config)
        assert arch.total_params == sum(p.numel() for p in model.parameters())
        model = get_peft_model(model, LoraConfig(r=2, target_modules="all-linear"))
        assert arch.lora_params(2) == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_sequence_flops_by_hand():
    # 4 tokens, the last 2 the answer, LoRA r=2, reference forward on
    matmul = 2 * 1152 * 4  # 9,216
    attn = 4 * 8 * 2 * (1 + 2 + 3 + 4)  # 640: 4 x d_attn x layers x causal query-key pairs
    head = 2 * 32 * 8 * 2  # 1,024: LM head on the 2 scored positions
    lora = 2 * 512 * 4  # 4,096
    f = sequence_flops(TOY, 4, 2, lora_r=2)
    assert f["policy_forward"] == matmul + attn + head + lora == 14_976
    assert f["policy_backward"] == matmul + 2 * attn + head + 2 * lora == 19_712
    assert f["reference_forward"] == matmul + attn + head == 10_880
    assert f["total"] == 45_568
    assert flops_per_token(TOY, 4, 0.5, lora_r=2) == 45_568 / 4
    # full fine-tuning: backward is twice the forward ("6N"); precomputed reference: no reference forward
    full = sequence_flops(TOY, 4, 2, lora_r=None)
    assert (full["policy_forward"], full["policy_backward"], full["total"]) == (10_880, 21_760, 43_520)
    assert sequence_flops(TOY, 4, 2, lora_r=2, reference=False)["total"] == 45_568 - 10_880


def test_causal_pairs_and_sliding_window():
    assert causal_pairs(4) == 10
    assert causal_pairs(5, window=3) == 1 + 2 + 3 + 3 + 3
    assert causal_pairs(3, window=3) == causal_pairs(3)


def test_truncation_follows_trl():
    # keep_start: prompt + answer cut to max_length; a prompt that fills max_length drops the pair
    assert truncate_pair(5, 3, 10, max_length=10) == ((8, 3), (10, 5))
    assert truncate_pair(10, 3, 3, max_length=10) is None
    assert truncate_pair(10, 3, 3, max_length=None) == ((13, 3), (13, 3))
    totals = dataset_flops(TOY, [(2, 2, 2), (9, 1, 1)], max_length=4, lora_r=2)
    assert totals["pairs"] == 1 and totals["dropped_pairs"] == 1 and totals["tokens"] == 8
    assert totals["total"] == 2 * 45_568


def test_memory_components_by_hand():
    s = MemorySettings(weights="bf16", lora_r=2, gradient_checkpointing=False, micro_batch_pairs=1, seq_len=4)
    est = memory_estimate(TOY, s)
    parts = {k: v * GiB for k, v in est["parts_gib"].items()}
    per_layer = 2 * (8 * 8 + 3 * 8 + 3 * 4 + 4 * 16)  # bytes per token per layer: 328
    tokens = 2 * 1 * 4  # chosen + rejected row, 4 tokens each
    assert parts["weights"] == pytest.approx(1704 * 2)
    assert parts["trainable_states"] == pytest.approx(512 * (4 + 4 + 8))  # fp32 adapter, grad, Adam m and v
    assert parts["activations"] == pytest.approx(tokens * 2 * per_layer)
    assert parts["lm_head"] == pytest.approx(2 * (8 * 32 * 2) + tokens * 8 * (2 + 4))
    subtotal = 3408 + 8192 + 5248 + 1408
    assert est["subtotal_gib"] * GiB == pytest.approx(subtotal)
    assert est["total_gib"] == pytest.approx(subtotal * 1.1 / GiB + 1.0)

    ckpt = memory_estimate(TOY, MemorySettings(weights="nf4", lora_r=2, gradient_checkpointing=True, micro_batch_pairs=1, seq_len=4))
    parts = {k: v * GiB for k, v in ckpt["parts_gib"].items()}
    # 4-bit linears; embeddings, head and norms cast to fp32 by prepare_model_for_kbit_training
    assert NF4_BYTES_PER_PARAM == pytest.approx((4 + 0.125 + 32 / 16384) / 8)
    assert parts["weights"] == pytest.approx(1152 * NF4_BYTES_PER_PARAM + (256 + 256 + 40) * 4)
    assert parts["trainable_states"] == pytest.approx(512 * (2 + 2 + 8))  # bf16 adapters under QLoRA
    # layer inputs (fp32 under QLoRA: peft's fp32 embeddings and norms make the residual stream fp32) + one layer
    assert parts["activations"] == pytest.approx(tokens * (2 * 4 * 8 + per_layer))
    # the LM head in fp32: two tiles of 8 tokens x 32 vocab x 4 bytes, the hidden states (fp32) and their gradient
    assert parts["lm_head"] == pytest.approx(2 * (8 * 32 * 4) + tokens * 8 * (4 + 4))

    # Liger keeps 3.4 x hidden + 0.45 x intermediate fewer bf16 elements a token a layer (fitted)
    liger = memory_estimate(TOY, MemorySettings(weights="bf16", lora_r=2, micro_batch_pairs=1, seq_len=4, liger=True))
    assert liger["parts_gib"]["activations"] * GiB == pytest.approx(tokens * 2 * (per_layer - 2 * (3.4 * 8 + 0.45 * 16)))


def test_eager_scores_with_checkpointing_and_packed_masks_by_hand():
    """Eager attention keeps each layer's scores: with every layer recomputed, the one layer being
    recomputed still holds them (they were left out). The packed rows' masks are as wide as the
    dtype the model computes in: fp32 masks were counted at 2 bytes. Gemma-2 builds two masks."""
    from transformers import Gemma2Config, Phi3Config

    from alignpress.flops import arch_from_config

    a = Arch("t", hidden=8, layers=2, heads=2, kv_heads=2, head_dim=4, intermediate=16, vocab=32, tied_embeddings=True)

    def activations(attn, ckpt):
        s = MemorySettings(weights="bf16", attn_implementation=attn, gradient_checkpointing=ckpt, micro_batch_pairs=1, seq_len=8)
        return memory_estimate(a, s)["parts_gib"]["activations"] * GiB

    every_layer = activations("eager", False) - activations("sdpa", False)
    assert every_layer == 2 * 1024  # 2 layers, each: 2 rows x 2 heads x 8 x 8 scores x 4 bytes
    assert activations("eager", True) - activations("sdpa", True) == 1024  # the recomputed layer's
    masks = lambda w: memory_estimate(a, MemorySettings(weights=w, packed_rows=2, packed_len=16))["parts_gib"]["attention_masks"] * GiB  # noqa: E731
    assert (masks("fp32"), masks("bf16")) == (2 * 16 * 16 * 4, 2 * 16 * 16 * 2)
    assert arch_from_config(Gemma2Config(num_hidden_layers=4)).mask_kinds == 2 and arch_from_config(Phi3Config()).mask_kinds == 1


def test_memory_estimate_grows_with_the_levers():
    seed = MemorySettings(weights="nf4", gradient_checkpointing=True, micro_batch_pairs=2, seq_len=2048)
    no_ckpt = MemorySettings(weights="bf16", gradient_checkpointing=False, micro_batch_pairs=4, seq_len=2048)
    assert memory_estimate(PHI3, seed)["total_gib"] < 40 < 80 < memory_estimate(PHI3, no_ckpt)["total_gib"]


def test_padding_fraction_by_hand():
    # pairs (chosen, rejected): (4, 2) and (1, 1); one batch of both pads 4 rows to 4 tokens
    assert padding_fraction([4, 2, 1, 1], batch_pairs=2) == pytest.approx(1 - 8 / 16)
    # one pair a batch: rows pad to their own pair's longest
    assert padding_fraction([4, 2, 1, 1], batch_pairs=1) == pytest.approx(1 - 8 / (8 + 2))


def test_time_and_cost_by_hand():
    # 3.6e15 FLOPs at 100 TFLOP/s peak and MFU 0.5: 72 s = 0.02 GPU-hours; $2.00/h -> $0.04
    out = project(3.6e15, 0.0, 100, 0.5, 0.5, {"on_demand": {"usd": 2.00}, "spot": {"usd": 0.5}})
    assert out["train_s"] == pytest.approx(72)
    assert out["gpu_hours"] == pytest.approx(0.02)
    assert out["usd_on_demand"] == pytest.approx(0.04)
    assert out["usd_spot"] == pytest.approx(0.01)
    # a precompute pass of 1.8e15 FLOPs at MFU 0.25 adds 72 s more; a missing tier costs None
    out = project(3.6e15, 1.8e15, 100, 0.5, 0.25, {"on_demand": {"usd": 2.00}})
    assert out["gpu_hours"] == pytest.approx(0.04) and out["usd_spot"] is None


# ---------------------------------------------------------------------------------------------
# The command


def seed_sets(recipe: str) -> list[str]:
    """The seed notebook's systems settings, as the recipe's header documents them (--set flags)."""
    line = next(x for x in (ROOT / recipe).read_text().splitlines() if x.startswith("#   --set "))
    return [a for a in line.removeprefix("#").split() if a != "--set"]


PHI3_SEED = [a for kv in seed_sets("recipes/phi3-mini-capybara.yaml") for a in ("--set", kv)]


# A synthetic data/stats.json for the Phi-3 seed recipe (its data cannot be downloaded here).
STATS = {"tokens": {"train": {"pairs": 1000, "prompt": {"mean": 500, "median": 470, "max": 1200}, "chosen": {"mean": 300, "median": 275, "max": 800}, "rejected": {"mean": 300, "median": 275, "max": 800}, "tokens_per_epoch": 1000 * (2 * 500 + 300 + 300)}}}


@pytest.fixture
def phi3_out(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "stats.json").write_text(json.dumps(STATS))
    return tmp_path


def test_plan_phi3_with_synthetic_stats(phi3_out):
    proc = cli("plan", "recipes/phi3-mini-capybara.yaml", "--output-dir", phi3_out, "--bench-results", phi3_out / "none", *PHI3_SEED)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "1,000 pairs, 1,600,000 tokens/epoch" in out
    assert "6 epochs = 9,600,000 tokens, 1,500 optimizer steps" in out  # 1,000 pairs / (2 x 2) a step x 6
    # FLOPs per token, by hand, for the mean pair: chosen and rejected rows of 800 tokens, 300 scored
    body, attn_pairs = 3_623_878_656, 800 * 801 // 2  # 800 tokens: inside the 2,047-token sliding window
    matmul, attn, head, lora = 2 * body * 800, 4 * 3072 * 32 * attn_pairs, 2 * 32064 * 3072 * 300, 2 * 25_165_824 * 800
    per_row = (matmul + attn + head + lora) + (matmul + 2 * attn + head + 2 * lora) + (matmul + attn + head)
    per_token = per_row / 800
    assert f"{per_token / 1e9:.3g} GFLOP/token" in out
    run_flops = per_token * 9_600_000
    assert f"= {run_flops:.3e} FLOPs for the run" in out
    # Time and cost: each row's hours x its price (default price table), on A100-40GB
    row = next(line for line in out.splitlines() if line.startswith("A100-40GB"))
    mfu = float(re.search(r"MFU ([\d.]+), estimate", row).group(1))
    hours = float(re.search(r"([\d.]+) h ", row).group(1))
    assert hours == pytest.approx(run_flops / (312e12 * mfu) / 3600, rel=0.01)  # MFU and hours are printed rounded
    usd = PRICES["A100-40GB"]["on_demand_usd"]
    cost = float(re.search(r"\$([\d.,]+) @ \$" + re.escape(f"{usd:.2f}"), row).group(1))
    assert cost == pytest.approx(hours * usd, rel=0.01)
    # 7.6 GiB before the QLoRA fp32 residual stream and LM head were counted (+2.0 GiB x 1.1 margin)
    assert "estimate, not measured" in out and "9.8/40 GiB ok" in out
    for gpu in GPUS:
        assert re.search(rf"^{gpu} ", out, re.M)


def test_plan_json_is_consistent(phi3_out):
    proc = cli("plan", "recipes/phi3-mini-capybara.yaml", "--output-dir", phi3_out, "--json", "--bench-results", phi3_out / "none", *PHI3_SEED)
    p = json.loads(proc.stdout)
    assert p["status"] == "estimate: not measured" and p["memory"]["status"] == "estimate: not measured"
    assert p["run"]["tokens"] == 9_600_000
    for row in p["gpus"]:
        assert row["gpu_hours"] == pytest.approx(p["run"]["flops"] / (row["peak_bf16_tflops"] * 1e12 * row["mfu"]) / 3600)
        assert row["usd_on_demand"] == pytest.approx(row["gpu_hours"] * PRICES[row["gpu"]]["on_demand_usd"])
        spot = PRICES[row["gpu"]]["spot_usd"]
        assert row["usd_spot"] == (None if spot is None else pytest.approx(row["gpu_hours"] * spot))
        assert row["price_on_demand"]["provider"] == PRICES[row["gpu"]]["provider"]
    f = p["throughput"]["factors"]
    assert p["throughput"]["estimated_mfu"] == pytest.approx(math.prod(f.values()))
    assert f["gradient_checkpointing"] == pytest.approx(0.75, abs=0.01)  # 6N model / 8N hardware with LoRA


def test_plan_refuses_what_will_not_fit(phi3_out):
    args = ["plan", "recipes/phi3-mini-capybara.yaml", "--output-dir", phi3_out, "--set", "model.load_in_4bit=false", "--set", "train.gradient_checkpointing=false", "--set", "train.per_device_train_batch_size=8"]
    proc = cli(*args)
    assert proc.returncode == 2
    assert "exceeds the A100-40GB's 40 GiB" in proc.stderr and "gradient_checkpointing" in proc.stderr
    assert "NO" in proc.stdout  # the table still prints
    # the same run with checkpointing fits on an 80 GB card
    proc = cli(*args[:-4], "--set", "train.per_device_train_batch_size=8", "--gpu", "A100-80GB")
    assert proc.returncode == 0, proc.stderr
    # On an L4 with every layer already recomputed (auto), checkpointing is not offered as the way out.
    proc = cli("plan", "recipes/phi3-mini-capybara.yaml", "--output-dir", phi3_out, "--set", "train.per_device_train_batch_size=16", "--gpu", "l4")
    assert proc.returncode == 2 and "exceeds the L4's 22.35 GiB" in proc.stderr, proc.stderr
    assert "train.gradient_checkpointing auto on the L4: on for all 32 layers" in proc.stdout, proc.stdout
    assert "gradient_checkpointing=true" not in proc.stderr
    # --gpu in any case, or the one name it begins; otherwise one line naming the known ones.
    assert cli("plan", "recipes/phi3-mini-capybara.yaml", "--output-dir", phi3_out, "--gpu", "h100").returncode == 0
    proc = cli("plan", "recipes/phi3-mini-capybara.yaml", "--output-dir", phi3_out, "--gpu", "A100")
    assert (proc.returncode, proc.stderr) == (2, "error: argument --gpu: ambiguous GPU 'A100'; known: L4, A10G, L40S, A100-40GB, A100-80GB, "
                                                 "H100-80GB, H200; see `entrypoint.py plan --help`\n")


def test_plan_needs_prepared_data(tmp_path):
    recipe = "recipes/phi3-mini-capybara.yaml"
    proc = cli("plan", recipe, "--output-dir", tmp_path)
    assert (proc.returncode, proc.stdout, proc.stderr) == (2, "", f"error: {recipe}: no token counts: {tmp_path}/data/stats.json does not exist. "
                                                                  f"Run `entrypoint.py prepare {recipe} --output-dir {tmp_path}` first (it needs no GPU), or give the "
                                                                  "output folder of a prepared run with --output-dir DIR, or its stats with --tokens-from STATS_JSON\n")
    # A --tokens-from path that is not there was read as a folder ("nothing.json/stats.json does not
    # exist"), and the refusal suggested --tokens-from.
    proc = cli("plan", recipe, "--output-dir", tmp_path, "--tokens-from", tmp_path / "nothing.json")
    assert (proc.returncode, proc.stdout, proc.stderr) == (2, "", f"error: {recipe}: no token counts: --tokens-from {tmp_path / 'nothing.json'} does not "
                                                                  "exist (give a data/stats.json written by prepare, or a folder holding one)\n")
    proc = cli("plan", recipe, "--tokens-from", tmp_path)
    assert (proc.returncode, proc.stdout, proc.stderr) == (2, "", f"error: {recipe}: no token counts: --tokens-from {tmp_path} is a folder with no "
                                                                  "stats.json or data/stats.json in it (give a data/stats.json written by prepare, or a folder holding one)\n")
    # /dev/null exists but is neither: it was called "a folder with no stats.json"
    proc = cli("plan", recipe, "--tokens-from", "/dev/null")
    assert (proc.returncode, proc.stdout, proc.stderr) == (2, "", f"error: {recipe}: no token counts: --tokens-from /dev/null is neither a file nor a "
                                                                  "folder (give a data/stats.json written by prepare, or a folder holding one)\n")


def test_plan_prices_override_and_measured_mfu(phi3_out, tmp_path):
    prices = {"gpus": {"A100-40GB": {"provider": "Test cloud", "as_of": "2099-01-01", "on_demand_usd": 1.0, "spot_usd": None}}}
    (tmp_path / "prices.json").write_text(json.dumps(prices))
    # A benchmark results file as bench_dpo.py writes it (test data, not a measurement)
    bench = tmp_path / "bench"
    bench.mkdir()
    settings = {"load_in_4bit": True, "gradient_checkpointing": True, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2, "precompute_ref_log_probs": False, "attn_implementation": "sdpa (default)", "group_by_length": False, "liger": False}
    arch = {"hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32064, "sliding_window": 2047, "config": "Phi3Config"}
    report = {"schema": "alignpress-bench/1", "runs": [{"model": "phi3-mini", "architecture": arch, "device": {"gpu": "H100-80GB"}, "variants": [{"name": "seed", "status": "ok", "settings": settings, "results": {"mfu": 0.25}}]}]}
    (bench / "H100-80GB-2099-01-01.json").write_text(json.dumps(report))
    proc = cli("plan", "recipes/phi3-mini-capybara.yaml", "--output-dir", phi3_out, "--prices", tmp_path / "prices.json", "--bench-results", bench, "--json", *PHI3_SEED)
    assert proc.returncode == 0, proc.stderr
    rows = {r["gpu"]: r for r in json.loads(proc.stdout)["gpus"]}
    assert rows["A100-40GB"]["usd_on_demand"] == pytest.approx(rows["A100-40GB"]["gpu_hours"] * 1.0)
    assert rows["A100-40GB"]["usd_spot"] is None and rows["A100-80GB"]["usd_on_demand"] is None
    assert rows["H100-80GB"]["mfu"] == 0.25 and rows["H100-80GB"]["mfu_source"].startswith("measured: H100-80GB-2099-01-01.json")
    assert rows["A100-40GB"]["mfu_source"] == "estimate: not measured"
    # a recipe with other settings does not take that measurement
    proc = cli("plan", "recipes/phi3-mini-capybara.yaml", "--output-dir", phi3_out, "--bench-results", bench, "--json", *PHI3_SEED, "--set", "train.gradient_checkpointing=false")
    rows = {r["gpu"]: r for r in json.loads(proc.stdout)["gpus"]}
    assert rows["H100-80GB"]["mfu_source"] == "estimate: not measured"


def test_plan_demo_after_prepare(demo_copy):
    """The demo's prepared folder: per-pair counts from data/train.jsonl, the built model's config.json."""
    proc = cli("plan", "recipes/demo.yaml", "--output-dir", demo_copy, "--json")
    assert proc.returncode == 0, proc.stderr
    p = json.loads(proc.stdout)
    stats = json.loads((demo_copy / "data" / "stats.json").read_text())["tokens"]["train"]
    # the demo filters to 64 tokens and trains at max_length 64: nothing is truncated
    assert p["data"]["tokens_per_epoch"] == stats["tokens_per_epoch"]
    assert p["data"]["pairs_kept"] == stats["pairs"]
    assert p["model"]["arch_source"].endswith("config.json")
    config = json.loads(open(p["model"]["arch_source"]).read())
    assert p["model"]["arch"]["hidden"] == config["hidden_size"]
    text = cli("plan", "recipes/demo.yaml", "--output-dir", demo_copy).stdout
    assert f"{stats['pairs']:,} pairs, {stats['tokens_per_epoch']:,} tokens/epoch" in text
    assert "per-pair token counts from" in text
    # Prefix-shared: the memory estimate counts the packed rows that bound a micro-batch of these pairs.
    from alignpress.flops import packed_layout
    from alignpress.prepare import read_jsonl

    pairs = [(r["prompt_tokens"], r["chosen_tokens"], r["rejected_tokens"]) for r in read_jsonl(demo_copy / "data" / "train.jsonl")]
    shared = json.loads(cli("plan", "recipes/demo.yaml", "--output-dir", demo_copy, "--json", "--set", "dpo.prefix_sharing=true", "--set", "dpo.pairs_per_row=2").stdout)
    rows, length = packed_layout(pairs, 64, 8, 2)
    # 8 pairs a micro-batch, 2 a row: 4 rows; the longest pair (10, 7, 10) is 17 + 20 - 9 = 28 positions,
    # two of them 56 (a multiple of 8). TRL's layout: 16 rows of the longest sequence, 20 tokens.
    assert (shared["memory"]["settings"]["packed_rows"], shared["memory"]["settings"]["packed_len"]) == (rows, length) == (4, 56)
    assert p["memory"]["settings"]["packed_rows"] is None and shared["memory"]["micro_batch_tokens"] == 224 < p["memory"]["micro_batch_tokens"] == 320


def test_plan_says_when_the_token_counts_are_another_recipes(demo_copy, phi3_out):
    """Counts prepared for another model or data are named in a note (they used to be taken silently);
    a change that leaves the data as it is (dpo, train) gives none."""
    def notes(*args):
        proc = cli("plan", *args)
        assert proc.returncode == 0, proc.stderr
        return [x for x in proc.stdout.splitlines() if "the token counts were prepared" in x]

    resolved = demo_copy / "recipe.resolved.yaml"
    assert notes("recipes/demo.yaml", "--output-dir", demo_copy, "--set", "dpo.beta=0.2") == []
    assert notes("recipes/demo.yaml", "--output-dir", demo_copy, "--set", "data.filters.max_tokens=50") == [
        f"note:      the token counts were prepared for a recipe whose data differ from recipes/demo.yaml's ({resolved}): "
        "run prepare for this recipe to count its own data"]
    assert notes("recipes/phi3-mini-capybara.yaml", "--output-dir", phi3_out, "--tokens-from", demo_copy / "data" / "stats.json") == [
        f"note:      the token counts were prepared for a recipe whose data and model differ from recipes/phi3-mini-capybara.yaml's "
        f"({resolved}): run prepare for this recipe to count its own data"]
    # The folder's model stood in for the recipe's own after an edit (a 45 k-parameter tiny model
    # for an 8 B one: every GPU "fit"): the recorded folder counts only for the model it was made for.
    p = json.loads(cli("plan", "recipes/demo.yaml", "--output-dir", demo_copy, "--json", "--set", "model.name_or_path=microsoft/Phi-3-mini-4k-instruct").stdout)
    assert p["model"]["arch_source"] == "alignpress.flops.KNOWN_ARCHS (from the model's public config)"
    # A stats.json with no recipe beside it (phi3_out's): nothing to compare, no note.
    assert notes("recipes/phi3-mini-capybara.yaml", "--output-dir", phi3_out) == []


def test_plan_loads_no_weights(phi3_out):
    """plan is arithmetic: it never imports torch (fast, and nothing to load on a laptop)."""
    code = "import sys, alignpress.cli as c; c.main(['plan', 'recipes/phi3-mini-capybara.yaml', '--output-dir', sys.argv[1]]); print('torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code, str(phi3_out)], capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "False"


# ---------------------------------------------------------------------------------------------
# Prices, GPUs and the recommendation


def test_price_table_one_offer_per_gpu():
    """Each row is one offer: one provider and date, both prices from it, spot below on-demand."""
    assert list(PRICES) == list(GPUS)  # a price for every GPU plan knows
    for name, row in PRICES.items():
        assert isinstance(row["provider"], str) and row["provider"], name
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", row["as_of"]), name
        assert row["source"].startswith(("http", "SkyPilot")), name
        assert {"on_demand", "spot"}.isdisjoint(row), name  # no per-tier sub-entries (they mixed providers)
        assert row["on_demand_usd"] > 0, name
        if row["spot_usd"] is not None:
            assert 0 < row["spot_usd"] < row["on_demand_usd"], name
    for name, info in GPUS.items():
        assert info["memory_gib"] > 0 and info["peak_bf16_tflops"] > 0 and info["sky_name"] and info["source"], name


def row(gpu, fits=True, tight=False, hours=1.0, od=None, spot=None):
    price = lambda usd: None if usd is None else {"usd": usd, "provider": "P"}
    return {"gpu": gpu, "fits": fits, "tight": tight, "wall_hours": hours, "usd_on_demand": None if od is None else hours * od,
            "usd_spot": None if spot is None else hours * spot, "price_on_demand": price(od), "price_spot": price(spot)}


def test_recommend_by_hand():
    rows = [
        row("small", fits=False, hours=1.0, od=0.10, spot=0.05),  # cheapest, but does not fit
        row("tight", fits=True, tight=True, hours=1.0, od=0.20, spot=0.06),  # above 90% of its memory
        row("mid", hours=2.0, od=1.00, spot=0.30),  # 2 h: $2.00 on-demand, $0.60 spot
        row("big", hours=0.5, od=3.00, spot=1.50),  # 0.5 h: $1.50 on-demand, $0.75 spot
        row("nospot", hours=0.25, od=8.00),  # 0.25 h: $2.00 on-demand, no spot
    ]
    rec = recommend(rows)
    assert rec["on_demand"]["gpu"] == "big" and rec["on_demand"]["usd"] == pytest.approx(1.50) and rec["on_demand"]["wall_hours"] == 0.5
    assert rec["spot"]["gpu"] == "mid" and rec["spot"]["usd"] == pytest.approx(0.60) and rec["spot"]["price"]["usd"] == 0.30
    # equal cost: the faster GPU
    rec = recommend([row("slow", hours=2.0, od=1.0), row("fast", hours=1.0, od=2.0)])
    assert rec["on_demand"]["gpu"] == "fast" and rec["spot"] is None
    assert recommend([row("x", fits=False, od=1.0)]) == {"on_demand": None, "spot": None}


def prices_file(tmp_path, prices):
    path = tmp_path / "prices.json"
    path.write_text(json.dumps({"gpus": {g: {"provider": "Test cloud", "as_of": "2099-01-01", "on_demand_usd": od, "spot_usd": sp} for g, (od, sp) in prices.items()}}))
    return path


def test_plan_recommends_the_cheapest_gpu_that_fits(phi3_out, tmp_path):
    # bf16, 3 rows a micro-batch, without checkpointing: the estimate is above the L4's, A10G's, L40S's and A100-40GB's memory
    args = ["plan", "recipes/phi3-mini-capybara.yaml", "--output-dir", phi3_out, "--bench-results", phi3_out / "none", "--gpu", "A100-80GB",
            "--set", "model.load_in_4bit=false", "--set", "train.gradient_checkpointing=false", "--set", "dpo.prefix_sharing=false",
            "--set", "train.per_device_train_batch_size=3", "--set", "train.gradient_accumulation_steps=1"]
    prices = prices_file(tmp_path, {"L4": (0.01, 0.005), "A100-80GB": (4.0, 1.0), "H100-80GB": (9.0, 2.0), "H200": (10.0, None)})
    proc = cli(*args, "--prices", prices, "--json")
    assert proc.returncode == 0, proc.stderr
    p = json.loads(proc.stdout)
    rows = {r["gpu"]: r for r in p["gpus"]}
    assert not rows["L4"]["fits"] and not rows["L40S"]["fits"] and not rows["A100-40GB"]["fits"]
    assert rows["A100-80GB"]["fits"] and not rows["A100-80GB"]["tight"]
    # same MFU on both (estimate): H100's 989.4 / 312 TFLOP/s makes it 3.17x faster; 4.0 x h vs 9.0 x h / 3.17
    h = rows["A100-80GB"]["wall_hours"]
    assert rows["H100-80GB"]["wall_hours"] == pytest.approx(h * 312 / 989.4)
    assert 9.0 * 312 / 989.4 < 4.0  # H100 is cheaper on-demand: $2.84 per A100-hour of work
    assert 2.0 * 312 / 989.4 < 1.0  # and on spot: $0.63
    rec = p["recommendation"]
    assert rec["on_demand"]["gpu"] == "H100-80GB" and rec["on_demand"]["usd"] == pytest.approx(h * 312 / 989.4 * 9.0)
    assert rec["spot"]["gpu"] == "H100-80GB" and rec["spot"]["usd"] == pytest.approx(h * 312 / 989.4 * 2.0)
    text = cli(*args, "--prices", prices).stdout
    hours = h * 312 / 989.4
    assert f"recommend on-demand: H100-80GB, {hours:.2f} h, ${hours * 9.0:,.2f} (Test cloud: $9/h as of 2099-01-01)" in text
    assert f"recommend spot:      H100-80GB, {hours:.2f} h, ${hours * 2.0:,.2f} (Test cloud: $2/h as of 2099-01-01)" in text
    # a dearer H100: the A100-80GB wins, at its own hours
    prices = prices_file(tmp_path, {"A100-80GB": (4.0, 1.0), "H100-80GB": (13.0, 4.0)})
    rec = json.loads(cli(*args, "--prices", prices, "--json").stdout)["recommendation"]
    assert (rec["on_demand"]["gpu"], rec["spot"]["gpu"]) == ("A100-80GB", "A100-80GB")
    assert rec["on_demand"]["usd"] == pytest.approx(4.0 * h) and rec["spot"]["usd"] == pytest.approx(1.0 * h)


def test_plan_default_prices_recommendation(phi3_out):
    """The shipped table on the Phi-3 seed (4-bit): every GPU fits; each tier's pick is the cheapest row."""
    proc = cli("plan", "recipes/phi3-mini-capybara.yaml", "--output-dir", phi3_out, "--bench-results", phi3_out / "none", "--json")
    p = json.loads(proc.stdout)
    for tier in ("on_demand", "spot"):
        priced = [r for r in p["gpus"] if r[f"usd_{tier}"] is not None and r["fits"] and not r["tight"]]
        best = min(priced, key=lambda r: r[f"usd_{tier}"])
        assert p["recommendation"][tier]["gpu"] == best["gpu"]
        assert p["recommendation"][tier]["price"]["provider"] == PRICES[best["gpu"]]["provider"]


@pytest.mark.parametrize("recipe, task", [("recipes/phi3-mini-capybara.yaml", "sky/phi3.yaml"), ("recipes/gemma-2b-it-capybara.yaml", "sky/gemma.yaml")])
def test_sky_task_offers_what_plan_recommends(phi3_out, recipe, task):
    """SkyPilot picks the cheapest candidate per hour; plan recommends the cheapest per run. With the
    GPUs the task file offers, the two must agree (on spot and on-demand), and the pick must fit:
    offering a GPU that is cheap per hour but slow (L4) would make SkyPilot choose a dearer run."""
    import yaml

    proc = cli("plan", recipe, "--output-dir", phi3_out, "--prices", "table", "--json")
    assert proc.returncode == 0, proc.stderr
    rows = {r["gpu"]: r for r in json.loads(proc.stdout)["gpus"]}
    by_sky = {GPUS[g]["sky_name"]: g for g in rows}
    candidates = yaml.safe_load((ROOT / task).read_text())["resources"]["any_of"]
    for tier, spot in (("spot", True), ("on_demand", False)):
        offered = [by_sky[c["accelerators"].split(":")[0]] for c in candidates if c["use_spot"] is spot]
        priced = [g for g in offered if PRICES[g][f"{tier}_usd"] is not None]
        per_hour = min(priced, key=lambda g: PRICES[g][f"{tier}_usd"])
        fitting = [g for g in priced if rows[g]["fits"] and not rows[g]["tight"]]
        per_run = min(fitting, key=lambda g: rows[g][f"usd_{tier}"])
        assert (tier, per_hour) == (tier, per_run)
    assert per_hour == "L40S"


@pytest.mark.parametrize("entry, message", [
    ({"as_of": "2099-01-01", "on_demand_usd": 1.0}, "field 'gpus.L4.provider': missing"),
    ({"provider": "X", "as_of": "2099-01-01", "on_demand_usd": "1.0"}, "field 'gpus.L4.on_demand_usd': must be a positive number"),
    ({"provider": "X", "as_of": "2099-01-01", "on_demand_usd": None, "spot_usd": None}, "field 'gpus.L4': needs on_demand_usd or spot_usd"),
])
def test_plan_rejects_a_bad_price_file(phi3_out, tmp_path, entry, message):
    path = tmp_path / "prices.json"
    path.write_text(json.dumps({"gpus": {"L4": entry}}))
    proc = cli("plan", "recipes/phi3-mini-capybara.yaml", "--output-dir", phi3_out, "--prices", path)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().startswith(f"error: {path}: {message}"), proc.stderr
    path.write_text(json.dumps({"gpus": {"V100": {"provider": "X", "as_of": "2099-01-01", "on_demand_usd": 1.0}}}))
    proc = cli("plan", "recipes/phi3-mini-capybara.yaml", "--output-dir", phi3_out, "--prices", path)
    assert proc.returncode == 2 and f"error: {path}: field 'gpus.V100': unknown GPU; known: L4, A10G" in proc.stderr


def test_plan_sky_prices_fall_back_to_the_table(phi3_out, tmp_path, monkeypatch):
    base = ["plan", "recipes/phi3-mini-capybara.yaml", "--output-dir", phi3_out, "--bench-results", phi3_out / "none", "--json"]
    monkeypatch.setenv("ALIGNPRESS_SKY_PYTHON", str(tmp_path / "no-such-python"))
    p = json.loads(cli(*base, "--prices", "sky").stdout)
    assert f"SkyPilot catalog not used (no SkyPilot environment at {tmp_path / 'no-such-python'}): prices from the dated table" in p["notes"]
    assert p["prices"]["file"] == "src/alignpress/data/gpu_prices.json"
    assert {r["gpu"]: r["price_on_demand"]["usd"] for r in p["gpus"]} == {g: PRICES[g]["on_demand_usd"] for g in GPUS}
    # a SkyPilot environment but no cached catalog (a fresh HOME): the default does not try the network
    monkeypatch.setenv("ALIGNPRESS_SKY_PYTHON", sys.executable)
    monkeypatch.setenv("HOME", str(tmp_path))
    p = json.loads(cli(*base).stdout)
    assert any(n.startswith("SkyPilot catalog not used (no SkyPilot catalog cached under ~/.sky/catalogs") for n in p["notes"])
    # --prices table never asks SkyPilot
    p = json.loads(cli(*base, "--prices", "table").stdout)
    assert not any("SkyPilot" in n for n in p["notes"])


SKY_PYTHON = ROOT / ".venv-sky" / "bin" / "python"


@pytest.mark.skipif(not SKY_PYTHON.exists(), reason="no SkyPilot environment (.venv-sky) in this checkout")
def test_plan_reads_skypilots_cached_catalog(phi3_out, tmp_path, monkeypatch):
    """The real SkyPilot 0.14.1 (.venv-sky) reads a catalog file written here in its v8 layout.

    The rows are test data, not prices: SkyPilot downloads its catalogs from the internet, which
    this machine cannot reach, so what the real catalogs hold (and the refresh) is untested.
    """
    catalog = tmp_path / ".sky" / "catalogs" / "v8" / "aws"
    catalog.mkdir(parents=True)
    info = "\"{'Gpus': [{'Name': 'L4', 'Manufacturer': 'NVIDIA', 'Count': 1, 'MemoryInfo': {'SizeInMiB': 22888}}], 'TotalGpuMemoryInMiB': 22888}\""
    catalog.joinpath("vms.csv").write_text(
        "InstanceType,AcceleratorName,AcceleratorCount,vCPUs,MemoryGiB,GpuInfo,Price,SpotPrice,Region,AvailabilityZone,Arch\n"
        f"g6.xlarge,L4,1.0,4.0,16.0,{info},0.5,0.2,us-east-1,use1-az1,x86_64\n"
        f"g6.xlarge,L4,1.0,4.0,16.0,{info},0.6,0.1,us-west-2,usw2-az1,x86_64\n"
        f"g6.2xlarge,L4,1.0,8.0,32.0,{info},0.7,0.3,us-east-1,use1-az1,x86_64\n"
    )
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("ALIGNPRESS_SKY_PYTHON", str(SKY_PYTHON))
    monkeypatch.delenv("SKY_RUNTIME_DIR", raising=False)
    proc = cli("plan", "recipes/phi3-mini-capybara.yaml", "--output-dir", phi3_out, "--bench-results", phi3_out / "none", "--json")
    assert proc.returncode == 0, proc.stderr
    p = json.loads(proc.stdout)
    rows = {r["gpu"]: r for r in p["gpus"]}
    # the cheapest on-demand offer, with that same row's spot price (not the cheaper spot of another region)
    assert rows["L4"]["price_on_demand"] | {"as_of": None} == {"usd": 0.5, "provider": "AWS", "product": "g6.xlarge", "region": "us-east-1", "as_of": None}
    assert rows["L4"]["price_spot"]["usd"] == 0.2
    assert rows["A100-40GB"]["price_on_demand"]["usd"] == PRICES["A100-40GB"]["on_demand_usd"]  # not in that catalog: the table
    assert p["notes"][0] == "prices from SkyPilot's catalog for L4; from the dated table for A10G, L40S, A100-40GB, A100-80GB, H100-80GB, H200"


# ---------------------------------------------------------------------------------------------
# prepare and plan on a machine without a GPU


@pytest.mark.slow  # three runs of the entry point (about 55 s on 2 busy cores)
def test_prepare_and_plan_a_4bit_recipe_without_cuda(tmp_path, tiny_phi3):
    """Counting tokens needs only the tokenizer: a 4-bit recipe prepares and plans without CUDA.

    4-bit comes from --set, as a user turns a bf16 seed recipe into QLoRA.
    """
    import torch

    from test_prepare import make_recipe

    recipe = make_recipe(tmp_path, tiny_phi3)
    out = tmp_path / "out"
    four_bit = ["--output-dir", out, "--set", "model.load_in_4bit=true"]
    proc = cli("prepare", recipe, *four_bit)
    assert proc.returncode == 0, proc.stderr
    stats = json.loads((out / "data/stats.json").read_text())["tokens"]["train"]
    proc = cli("plan", recipe, *four_bit, "--json", "--bench-results", tmp_path / "none")
    assert proc.returncode == 0, proc.stderr
    p = json.loads(proc.stdout)
    assert p["data"]["tokens_per_epoch"] == stats["tokens_per_epoch"] and p["data"]["pairs_kept"] == stats["pairs"] == 6
    assert p["memory"]["settings"]["weights"] == "nf4"
    assert p["model"]["arch_source"] == str(tiny_phi3 / "config.json")
    if not torch.cuda.is_available():
        # training still refuses at the door, and leaves the prepared data alone
        proc = cli("train", recipe, *four_bit)
        assert proc.returncode == 2
        assert "error: --set model.load_in_4bit: field 'model.load_in_4bit': 4-bit QLoRA needs a CUDA GPU" in proc.stderr
        assert json.loads((out / "data/stats.json").read_text())["tokens"]["train"] == stats


# ---------------------------------------------------------------------------------------------
# Measured results (benchmarks/results/2026-11-26-h200/, copied from the GPU session unchanged)

MEASURED = ROOT / "benchmarks" / "results" / "2026-11-26-h200"


def measured_variants():
    index = json.loads((MEASURED / "index.json").read_text())
    return [(name, meta, json.loads((MEASURED / name).read_text())) for name, meta in index["files"].items()]


def test_memory_estimate_within_10_percent_of_every_measured_peak():
    rows = measured_variants()
    assert len(rows) == 10
    for name, meta, v in rows:
        s, r = v["settings"], v["results"]
        settings = MemorySettings(
            weights="nf4" if s["load_in_4bit"] else "bf16",
            lora_r=s["lora_r"],
            optimizer_bits="32bit",
            gradient_checkpointing=s["gradient_checkpointing"],
            micro_batch_pairs=s["per_device_train_batch_size"],
            # every run's longest micro-batch reached max_length (its warm-up steps included; the
            # pre-calibration estimate each file records reproduces only with 2,048)
            seq_len=s["max_length"],
            precompute_ref=s["precompute_ref_log_probs"],
            liger=s["liger"],
        )
        est = memory_estimate(KNOWN_ARCHS[meta["model"]], settings)["subtotal_gib"]  # no margin, no CUDA context: what max_memory_allocated sees
        assert abs(est / r["peak_memory_gib"] - 1) <= 0.10, (name, est, r["peak_memory_gib"])


def test_checkpointing_decision_with_fake_gpu_sizes():
    from alignpress.flops import checkpointing_decision

    s = MemorySettings(weights="bf16", micro_batch_pairs=4, seq_len=2048, precompute_ref=True, liger=True)
    off = memory_estimate(PHI3, s)["total_gib"]
    on = memory_estimate(PHI3, MemorySettings(**{**s.__dict__, "gradient_checkpointing": True}))["total_gib"]
    assert round(off, 2) == 76.31 and round(on, 2) == 15.46  # the tuned Phi-3 run: 68.3 GiB measured (+10% + 1 GiB)
    d = checkpointing_decision(PHI3, s, 139.8)  # an H200
    assert d["gradient_checkpointing"] is False
    assert d["reason"] == "off: the estimate without it (76.3 GiB for 8 rows x 2048 tokens) is within 90% of the GPU's 139.8 GiB"
    # auto keeps the estimate within 90% of the free memory: 76.31 / 0.9 = 84.79 GiB
    assert checkpointing_decision(PHI3, s, 84.8)["gradient_checkpointing"] is False
    d = checkpointing_decision(PHI3, s, 84.7)  # just below: one layer recomputed is enough
    assert d["gradient_checkpointing"] is True and (d["estimate_without_gib"], d["estimate_with_gib"], d["gpu_gib"], d["checkpointed_layers"]) == (76.31, 15.46, 84.7, 1)
    # An A100-40GB: the fewest layers whose estimate stays within 0.9 x 39.4 = 35.46 GiB. Each
    # checkpointed layer keeps its input (8 x 2,048 tokens x 3,072 x 2 bytes = 0.094 GiB) instead of
    # all it saves (1.881 GiB with Liger): 1.79 GiB less, x 1.1 margin = 1.97 GiB of the total per layer.
    per_layer = memory_estimate(PHI3, s)["parts_gib"]["activations"] / 32 - 8 * 2048 * 3072 * 2 / 1024**3
    assert round(per_layer, 4) == 1.7875
    d = checkpointing_decision(PHI3, s, 39.4)
    assert (d["checkpointed_layers"], d["estimate_chosen_gib"]) == (21, 35.02) and 76.31 - 21 * per_layer * 1.1 == pytest.approx(35.02, abs=0.01)
    assert 76.31 - 20 * per_layer * 1.1 > 0.9 * 39.4
    assert d["reason"] == ("on for 21 of 32 layers, the fewest that bring the estimate within 90% of the GPU's 39.4 GiB: "
                           "76.3 GiB without it (for 8 rows x 2048 tokens), 35.0 GiB with 21 layers, 15.5 GiB with all 32")
    # every layer, and still above
    d = checkpointing_decision(PHI3, s, 12.0)
    assert (d["gradient_checkpointing"], d["checkpointed_layers"]) == (True, 32)
    assert d["reason"] == ("on for all 32 layers: the estimate without it (76.3 GiB for 8 rows x 2048 tokens) exceeds 90% of the GPU's 12.0 GiB; with all 15.5 GiB "
                           "(still above: lower train.per_device_train_batch_size or dpo.max_length)")
    # train.checkpointed_layers: auto decides on or off, the recipe the count
    d = checkpointing_decision(PHI3, replace(s, checkpointed_layers=2), 39.4)
    assert d["checkpointed_layers"] == 2 and d["reason"] == (
        "on for 2 of 32 layers (train.checkpointed_layers): the estimate without it (76.3 GiB for 8 rows x 2048 tokens) exceeds 90% of the GPU's 39.4 GiB; "
        "with them 72.4 GiB (still above: raise train.checkpointed_layers, or lower train.per_device_train_batch_size or dpo.max_length)")
    assert checkpointing_decision(PHI3, replace(s, checkpointed_layers=2), 90)["gradient_checkpointing"] is False
    assert checkpointing_decision(PHI3, s, None) | {} == {"estimate_without_gib": 76.31, "estimate_with_gib": 15.46, "gpu_gib": None, "layers": 32, "gradient_checkpointing": False, "checkpointed_layers": 0, "reason": "no CUDA GPU: off"}


def test_memory_estimate_per_checkpointed_layer():
    """A checkpointed layer keeps its input instead of its activations; the first layers are the
    ones checkpointed, so the rebuild of one layer adds to the peak only when every layer is."""
    s = MemorySettings(weights="bf16", micro_batch_pairs=4, seq_len=2048, precompute_ref=True, liger=True)
    tokens, kept = 8 * 2048, 8 * 2048 * 3072 * 2

    def acts(k):
        return memory_estimate(PHI3, replace(s, gradient_checkpointing=k > 0, checkpointed_layers=k or None))["parts_gib"]["activations"] * 1024**3

    per_layer = acts(0) / 32
    assert per_layer / tokens == pytest.approx(2 * (8 * 3072 + 3 * 3072 + 3 * 3072 + 4 * 8192 - 3.4 * 3072 - 0.45 * 8192))
    for k in (1, 5, 31):
        assert acts(k) == pytest.approx(acts(0) - k * (per_layer - kept))
    assert acts(32) == pytest.approx(32 * kept + per_layer)  # every layer: one is rebuilt on top of all the inputs
    assert memory_estimate(PHI3, replace(s, gradient_checkpointing=True))["total_gib"] == memory_estimate(PHI3, replace(s, gradient_checkpointing=True, checkpointed_layers=32))["total_gib"]
    assert memory_estimate(PHI3, replace(s, gradient_checkpointing=False, checkpointed_layers=5))["total_gib"] == memory_estimate(PHI3, s)["total_gib"]


def test_precompute_decision_by_hand():
    from alignpress.flops import precompute_decision

    # measured: 8,882 tokens/s with the reference each step, 12,669 precomputed, pass 205,625 tokens in 37.69 s
    break_even = (37.69 / 205625) / (1 / 8882 - 1 / 12669)
    assert round(break_even, 2) == 5.45
    assert precompute_decision(6) == {"epochs": 6, "break_even_epochs": 5.45, "precompute_ref_log_probs": True, "reason": "on: 6 epochs > 5.45, where one precompute pass is repaid by faster steps"}
    assert precompute_decision(5)["precompute_ref_log_probs"] is False
    assert precompute_decision(1, stored=True)["precompute_ref_log_probs"] is True
    # a pass as fast as a precomputed step pays from 1 / (1 - 8882 / 12669) ... with these rates:
    assert precompute_decision(2, rates={"with_reference": 1.0, "precomputed": 2.0, "precompute_pass": 3.0})["break_even_epochs"] == 0.67


@pytest.mark.parametrize(
    "recipe, sets, expect",
    [
        ("recipes/phi3-mini-capybara.yaml", [], "H200: measured: 2026-11-27-h200/H200-2026-11-27.json, variant tuned-prefix: 13,715 tokens/s, MFU 0.2143, peak 48.21 GiB"),
        ("recipes/phi3-mini-capybara.yaml", "seed", "H200: measured: 2026-11-27-h200/H200-2026-11-27.json, variant seed: 2,747 tokens/s, MFU 0.0636, peak 7.71 GiB"),
        ("recipes/phi3-mini-capybara.yaml", ["dpo.prefix_sharing=false"], "H200: measured: 2026-11-27-h200/H200-2026-11-27.json, variant tuned: 12,300 tokens/s, MFU 0.1922, peak 68.30 GiB"),
        ("recipes/gemma-2b-it-capybara.yaml", [], "H200: measured: 2026-11-27-h200/H200-2026-11-27.json, variant tuned-prefix: 13,528 tokens/s, MFU 0.1270, peak 25.98 GiB"),
        ("recipes/gemma-2b-it-capybara.yaml", "seed", "H200: measured: 2026-11-27-h200/H200-2026-11-27.json, variant seed: 2,039 tokens/s, MFU 0.0279, peak 5.38 GiB"),
        # Gemma in TRL's layout was measured the day before only (worker files with an index)
        ("recipes/gemma-2b-it-capybara.yaml", ["dpo.prefix_sharing=false"], "H200: measured: 2026-11-26-h200/gemma-tuned.json, variant tuned: 15,774 tokens/s, MFU 0.1456, peak 36.12 GiB"),
    ],
)
def test_plan_uses_the_committed_measurements(phi3_out, recipe, sets, expect):
    """The newest measurement with the recipe's settings (prefix sharing among them: a file from
    before it existed measured TRL's layout)."""
    sets = seed_sets(recipe) if sets == "seed" else sets
    proc = cli("plan", recipe, "--output-dir", phi3_out, "--gpu", "H200", *[a for kv in sets for a in ("--set", kv)])
    assert proc.returncode == 0, proc.stderr
    assert expect in proc.stdout
    mfu = re.search(r"MFU ([\d.]+)", expect).group(1)
    assert re.search(rf"^H200 .*MFU {float(mfu):.3f}, measured\)", proc.stdout, re.M)
    # the tuned recipes precompute (6 epochs): in TRL's layout the pass at the measured rate (its
    # tokens over the trainer's setup), 1,600,000 tokens of this data; the prefix-shared runs of
    # 2026-11-27 did not count its tokens, so their pass is an estimate, and said to be one
    setup = {"tuned: 12,300": 41.45, "tuned: 15,774": 28.37}.get(re.search(r"variant (\S+ [\d,]+)", expect).group(1))
    if setup:
        rate = 205625 / setup
        assert f"H200: precompute pass {rate:,.0f} tokens/s (205,625 tokens in {setup} s of setup): {1_600_000 / rate / 60:.1f} min for this data" in proc.stdout
    elif sets:
        assert "H200: precompute pass" not in proc.stdout  # the seed settings compute the reference each step
    else:
        assert re.search(r"^ +H200: precompute pass not measured for these settings: [\d.]+ min for this data \(estimate\)$", proc.stdout, re.M)


def test_an_h200_measurement_stands_for_the_h100(phi3_out):
    """Same GH100 die and peak FLOP/s: the H100 row takes the H200's measured MFU (an upper bound there,
    labelled), instead of an estimate that had it 14% faster than the H200 measured; the A100 keeps the estimate."""
    proc = cli("plan", "recipes/phi3-mini-capybara.yaml", "--output-dir", phi3_out, "--prices", "table", "--json")
    rows = {r["gpu"]: r for r in json.loads(proc.stdout)["gpus"]}
    assert rows["H100-80GB"]["mfu"] == rows["H200"]["mfu"] == 0.2143
    assert rows["H100-80GB"]["mfu_source"] == "measured on the H200 (same GH100 die): 2026-11-27-h200/H200-2026-11-27.json, variant tuned-prefix"
    assert rows["H200"]["mfu_source"] == "measured: 2026-11-27-h200/H200-2026-11-27.json, variant tuned-prefix"
    assert rows["A100-80GB"]["mfu_source"].startswith("estimate")
    text = cli("plan", "recipes/phi3-mini-capybara.yaml", "--output-dir", phi3_out, "--prices", "table").stdout
    assert re.search(r"^H100-80GB .*\(MFU 0\.214, H200's\)", text, re.M) and re.search(r"^H200 .*\(MFU 0\.214, measured\)", text, re.M)


def test_recommendation_says_how_to_launch_a_gpu_the_sky_task_does_not_offer(phi3_out, demo_copy):
    """The on-demand pick (H200, RunPod's price) is not among sky/phi3.yaml's GPUs: plan says how to ask
    SkyPilot for it. The spot pick (L40S) is offered: no hint. sky/multinode.yaml (2 x 8 GPUs) also runs
    this recipe and is not the one meant. The demo has no sky task."""
    proc = cli("plan", "recipes/phi3-mini-capybara.yaml", "--output-dir", phi3_out, "--prices", "table")
    lines = proc.stdout.splitlines()
    i = next(k for k, line in enumerate(lines) if line.startswith("recommend on-demand: H200,"))
    assert lines[i + 1] == " " * 21 + "sky/phi3.yaml offers L40S, A100-80GB, A100-40GB, H100-80GB (SkyPilot takes the cheapest per hour); for the H200, launch it with --gpus H200:1 --no-use-spot on a cloud that rents one"
    assert lines[i + 2].startswith("recommend spot:      L40S,") and lines[i + 3] == ""
    p = json.loads(cli("plan", "recipes/phi3-mini-capybara.yaml", "--output-dir", phi3_out, "--prices", "table", "--json").stdout)
    assert p["sky_task"] == {"task": "sky/phi3.yaml", "offers": {"spot": ["L40S", "A100-80GB", "A100-40GB", "H100-80GB"], "on_demand": ["L40S", "A100-80GB", "A100-40GB", "H100-80GB"]}, "disk_gb": 256}
    demo = json.loads(cli("plan", "recipes/demo.yaml", "--output-dir", demo_copy, "--json").stdout)
    assert demo["sky_task"] is None


def test_prefix_sharing_memory_from_the_summary_alone(phi3_out):
    """Only stats.json: a segment is bounded by the longest prompt and both longest answers (1,200 + 800
    + 800 + 1 = 2,801 tokens, under two full 2,048 sequences), 4 rows of it padded to 2,808."""
    base = ["plan", "recipes/phi3-mini-capybara.yaml", "--output-dir", phi3_out, "--prices", "table", "--json", "--set", "dpo.prefix_sharing=true"]
    for per_row, shape in ((1, (4, 2808)), (2, (2, 5608)), (8, (1, 11208))):
        mem = json.loads(cli(*base, "--set", f"dpo.pairs_per_row={per_row}").stdout)["memory"]
        assert (mem["settings"]["packed_rows"], mem["settings"]["packed_len"]) == shape
    mem = json.loads(cli(*base, "--set", "dpo.max_length=1024").stdout)["memory"]
    assert (mem["settings"]["packed_rows"], mem["settings"]["packed_len"]) == (4, 2048)  # two full 1,024 sequences


def test_plan_measured_pass_less_the_hash_and_checkpointed_layers_matched(phi3_out, tmp_path):
    """A result file as bench_dpo.py writes it (test data, not a measurement): the precompute pass's
    rate leaves out the weight hash timed apart (hash_s), and a measurement with some layers
    checkpointed stands only for the same count."""
    from alignpress.plan import recipe_settings
    from alignpress.recipe import load_recipe

    recipe = load_recipe(ROOT / "recipes/phi3-mini-capybara.yaml")
    arch = {"hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32064, "sliding_window": 2047, "config": "Phi3Config"}
    variants = [
        {"name": "tuned", "status": "ok", "settings": recipe_settings(recipe, False, True), "results": {"mfu": 0.3, "precompute_tokens": 100_000, "setup_s": 12.0, "hash_s": 2.0}},
        {"name": "tuned-ckpt", "status": "ok", "settings": recipe_settings(recipe, True, True, 15), "results": {"mfu": 0.2}},
    ]
    bench = tmp_path / "bench"
    bench.mkdir()
    (bench / "H200-2099-01-01.json").write_text(json.dumps({"schema": "alignpress-bench/1", "runs": [{"model": "phi3-mini", "architecture": arch, "device": {"gpu": "H200"}, "variants": variants}]}))
    base = ["plan", "recipes/phi3-mini-capybara.yaml", "--output-dir", phi3_out, "--bench-results", bench, "--gpu", "H200"]
    proc = cli(*base)
    assert proc.returncode == 0, proc.stderr
    # 100,000 tokens in 12.0 - 2.0 s; this data's 1,600,000 tokens an epoch take 160 s
    assert "H200: precompute pass 10,000 tokens/s (100,000 tokens in 12.0 s of setup less 2.0 s hashing the weights): 2.7 min for this data" in proc.stdout
    for layers, source in ((15, "measured: H200-2099-01-01.json, variant tuned-ckpt"), (14, "estimate: not measured"), (32, "estimate: not measured")):
        proc = cli(*base, "--json", "--set", "train.gradient_checkpointing=true", "--set", f"train.checkpointed_layers={layers}")
        h200 = next(r for r in json.loads(proc.stdout)["gpus"] if r["gpu"] == "H200")
        assert (h200["checkpointed_layers"], h200["mfu_source"]) == (layers, source)
    assert h200["mfu"] != 0.2


@pytest.mark.parametrize("arch_name, attn, prefix", [("microsoft/Phi-3-mini-4k-instruct", None, True), ("microsoft/Phi-3-mini-4k-instruct", "eager", False), ("google/gemma-2b-it", None, True)])
def test_fewest_checkpointed_layers_is_the_first_that_fits(arch_name, attn, prefix):
    """Solved from the estimate's fall per layer; the same as trying every count in turn."""
    from alignpress.flops import fewest_checkpointed_layers

    arch = KNOWN_ARCHS[arch_name]
    s = MemorySettings(micro_batch_pairs=4, seq_len=2048, precompute_ref=True, liger=True, attn_implementation=attn, packed_rows=4 if prefix else None, packed_len=2832 if prefix else None)

    def total(k):
        return memory_estimate(arch, replace(s, gradient_checkpointing=k > 0, checkpointed_layers=k or None))["total_gib"]

    for budget in [x / 4 for x in range(8, 400)]:
        scanned = next((k for k in range(arch.layers + 1) if total(k) <= budget), arch.layers)
        assert fewest_checkpointed_layers(arch, s, budget) == scanned, budget


def test_recompute_share_per_micro_batch():
    """Each micro-batch checkpoints what its own shape needs: equal batches give count / layers;
    mixed ones less than the longest batch's count; a GPU that fits everything, nothing."""
    from alignpress.flops import fewest_checkpointed_layers, recompute_share

    s = MemorySettings(micro_batch_pairs=4, seq_len=2048, precompute_ref=True, liger=True)
    long_pair, short_pair = (1000, 900, 900), (200, 100, 100)
    k_long = fewest_checkpointed_layers(PHI3, replace(s, seq_len=1901), 0.9 * 40)
    assert k_long == 20  # 8 rows of 1,901 positions within 36 GiB
    assert recompute_share(PHI3, s, [long_pair] * 8, 40, max_length=2048) == pytest.approx(k_long / 32)
    mixed = recompute_share(PHI3, s, [long_pair] * 4 + [short_pair] * 4, 40, max_length=2048, sort=True)
    # sorted: one batch of short pairs (no layers), one of long (20 layers), weighted by their forward FLOPs
    forward = {p: sum(sequence_flops(PHI3, n, c)["policy_forward"] for n, c in truncate_pair(*p, 2048)) for p in (long_pair, short_pair)}
    assert mixed == pytest.approx(k_long / 32 * forward[long_pair] / (forward[long_pair] + forward[short_pair]))
    assert recompute_share(PHI3, s, [long_pair] * 8, 140, max_length=2048) == 0.0
    assert recompute_share(PHI3, s, [long_pair] * 8, 5, max_length=2048) == 1.0  # nothing fits: every layer


def test_plan_counts_each_micro_batch_of_the_prepared_pairs(tmp_path):
    """With per-pair counts (data/train.jsonl), `auto`'s recomputation is counted batch by batch:
    on an A100-40GB fewer layers than the longest batch's count, on average."""
    out = tmp_path / "out"
    (out / "data").mkdir(parents=True)
    rows = [{"prompt_tokens": 1000, "chosen_tokens": 900, "rejected_tokens": 900}] * 200 + [{"prompt_tokens": 300, "chosen_tokens": 200, "rejected_tokens": 200}] * 800
    assert len(rows) == STATS["tokens"]["train"]["pairs"]  # plan reads the rows only when they are the split stats.json counts
    (out / "data" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / "data" / "stats.json").write_text(json.dumps(STATS))
    proc = cli("plan", "recipes/phi3-mini-capybara.yaml", "--output-dir", out, "--bench-results", tmp_path / "none", "--json")
    assert proc.returncode == 0, proc.stderr
    gpus = {r["gpu"]: r for r in json.loads(proc.stdout)["gpus"]}
    a100 = gpus["A100-40GB"]
    assert a100["gradient_checkpointing"] is True and 0 < a100["recomputed_share"] < a100["checkpointed_layers"] / 32
    assert gpus["H200"]["recomputed_share"] == 0.0 and gpus["H200"]["checkpointed_layers"] == 0


def test_plan_counts_the_disk_a_fresh_machine_needs(phi3_out):
    """What the run writes on a new cloud VM (alignpress.disk's lower bounds, as `run` checks at the
    door), by hand, next to the disk the shipped sky task asks for; a task too small for it is said."""
    from alignpress.disk import size_text

    params, lora = 3_821_079_552, 25_165_824  # Phi-3-mini, and its r=16 all-linear adapter
    proc = cli("plan", "recipes/phi3-mini-capybara.yaml", "--output-dir", phi3_out, "--json", "--bench-results", phi3_out / "none", *PHI3_SEED)
    disk = json.loads(proc.stdout)["disk"]
    # 4-bit QLoRA: a bf16 adapter, and paged AdamW's two moments in its dtype (2 bytes each);
    # 1,500 steps / save_steps 100: 15 saves, 2 kept (3 while the oldest goes)
    checkpoint = lora * (2 + 2 * 2)
    download = merged = params * 2
    out = max(3 * checkpoint, 2 * checkpoint + lora * 2 + merged)
    assert disk["need_bytes"] == download + out
    text = cli("plan", "recipes/phi3-mini-capybara.yaml", "--output-dir", phi3_out, "--bench-results", phi3_out / "none", *PHI3_SEED).stdout
    assert (f"disk      at least {size_text(download + out)} written on a new machine: the base model's download {size_text(download)}; "
            f"2 checkpoints of {size_text(checkpoint)} (3 while the oldest is rotated out); the trained adapter {size_text(lora * 2)}; "
            f"the merged model {size_text(merged)}; sky/phi3.yaml asks for 256 GB") in text
    assert "warning:   sky/phi3.yaml" not in text
    export_line = (f"host RAM  at least {size_text(4 * params)} available for export (export merges the adapter into the base in float32: "
                   "3.82 B weights x 4 bytes; `run` checks it at the door)")
    assert f"\n{export_line}\n" in text
    assert [h["need_bytes"] for h in json.loads(proc.stdout)["host_memory"]] == [4 * params]

    # A full fine-tune keeping 20 checkpoints: 15 of 12 bytes a weight (float32 weights, AdamW's two float32
    # moments: modeling.full_weights_in_fp32)
    full = cli("plan", "recipes/phi3-mini-capybara.yaml", "--output-dir", phi3_out, "--bench-results", phi3_out / "none", "--gpu", "H200",
               "--set", "lora.enabled=false", "--set", "train.save_total_limit=20", "--set", "train.optim=adamw_torch")
    need = params * (2 + 15 * 12 + 4 + 2)  # download, checkpoints, the trained weights (float32), the merged model
    assert f"disk      at least {size_text(need)} written on a new machine" in full.stdout
    # under DeepSpeed's CPU offload, training's share of host memory comes first
    offload = cli("plan", "recipes/phi3-mini-capybara.yaml", "--output-dir", phi3_out, "--bench-results", phi3_out / "none", "--gpu", "H200",
                  "--set", "lora.enabled=false", "--set", "train.accelerate_config=zero3-offload")
    host = [line for line in offload.stdout.splitlines() if line.startswith("host RAM")]
    assert host == [f"host RAM  at least {size_text(14 * params)} available for training (training under DeepSpeed offloads to host memory Adam's "
                    "float32 weights and two moments, 12 bytes x 3.82 B trained weights; the 16-bit weights, 2 bytes x 3.82 B; `run` checks it at "
                    "the door)", f"host RAM  at least {size_text(4 * params)} available for export (export loads the trained weights in float32: "
                    "3.82 B weights x 4 bytes; `run` checks it at the door)"], offload.stdout + offload.stderr
    assert (f"warning:   sky/phi3.yaml asks for a 256 GB disk, less than the {size_text(need)} this run writes (the image and the "
            "pip and dataset caches come on top): raise its resources.disk_size, or launch it with --disk-size") in full.stdout


def test_compiled_layers_are_rated_by_the_eager_measurement_and_say_so(phi3_out):
    """No committed run compiled its layers (train.compile_layers; files without the field ran
    eager): plan rates a compiled recipe with the same settings measured eager, never as a compiled
    measurement: the row says "eager" and the detail line names the file and why."""
    proc = cli("plan", "recipes/phi3-mini-capybara.yaml", "--output-dir", phi3_out, "--gpu", "H200", "--set", "train.compile_layers=true")
    assert proc.returncode == 0, proc.stderr
    eager = cli("plan", "recipes/phi3-mini-capybara.yaml", "--output-dir", phi3_out, "--gpu", "H200")
    row = {p: next(line for line in out.stdout.splitlines() if line.startswith("H200 ")) for p, out in (("compiled", proc), ("eager", eager))}
    assert row["eager"].replace("MFU 0.214, measured)", "MFU 0.214, eager)   ") == row["compiled"], row
    assert re.search(r"^H100-80GB .*tok/s \(MFU 0\.214, H200's eager\)", proc.stdout, re.M), proc.stdout
    assert ("           H200: measured with train.compile_layers off (compiled layers not measured yet): 2026-11-27-h200/H200-2026-11-27.json, "
            "variant tuned-prefix: 13,715 tokens/s, MFU 0.2143, peak 48.21 GiB") in proc.stdout
    assert "H100-80GB: measured with train.compile_layers off (compiled layers not measured yet) on the H200 (same GH100 die)" in proc.stdout
    # A compiled measurement, when there is one, is used as such: the committed tuned-prefix file with
    # compile_layers recorded true and another MFU stands for a compiled run
    bench = phi3_out / "bench"
    shutil.copytree(ROOT / "benchmarks" / "results" / "2026-11-27-h200", bench / "2026-11-27-h200")
    path = bench / "2026-11-27-h200" / "H200-2026-11-27.json"
    report = json.loads(path.read_text())
    variant = next(v for r in report["runs"] for v in r["variants"] if v["name"] == "tuned-prefix")
    variant["settings"]["compile_layers"] = True
    variant["results"]["mfu"] = 0.25
    path.write_text(json.dumps(report))
    compiled = cli("plan", "recipes/phi3-mini-capybara.yaml", "--output-dir", phi3_out, "--gpu", "H200", "--bench-results", bench, "--set", "train.compile_layers=true")
    assert re.search(r"^H200 .*tok/s \(MFU 0\.250, measured\)", compiled.stdout, re.M), compiled.stdout
    assert "compile_layers off" not in compiled.stdout

def test_the_readme_shows_plans_table_as_plan_prints_it(phi3_out):
    """The README's example (the shipped Phi-3 recipe, this synthetic stats.json, the price table) is
    what plan prints now: it went stale once when partial checkpointing changed the estimates."""
    proc = cli("plan", "recipes/phi3-mini-capybara.yaml", "--output-dir", phi3_out, "--prices", "table")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("GPU "))
    end = next(i for i, line in enumerate(lines) if line.startswith("recommend spot:"))
    readme = (ROOT / "README.md").read_text()
    assert "```\n" + "\n".join(lines[start:end + 1]) + "\n```" in readme


def test_estimates_take_the_models_own_efficiency_from_its_measurement(phi3_out):
    """The base MFU (0.25) is one fit to Phi-3-mini; Gemma-2b measured 0.127 on the H200 where the fit
    says 0.25 x (1 - 0.0905 padding of that run) = 0.2274, so its estimated rows were 1.8x too fast.
    Now they are scaled by 0.127 / 0.2274, and with no measurement of the model nothing is scaled."""
    gemma = "recipes/gemma-2b-it-capybara.yaml"
    p = json.loads(cli("plan", gemma, "--output-dir", phi3_out, "--prices", "table", "--json").stdout)
    factor = 0.127 / (0.25 * (1 - 0.0905))
    cal = p["throughput"]["calibration"]
    assert cal["factor"] == pytest.approx(factor) and cal["gpu"] == "H200"
    assert cal["source"] == "2026-11-27-h200/H200-2026-11-27.json, variant tuned-prefix"
    bare = json.loads(cli("plan", gemma, "--output-dir", phi3_out, "--prices", "table", "--json", "--bench-results", phi3_out / "none").stdout)
    assert bare["throughput"]["calibration"] is None and "model" not in bare["throughput"]["factors"]
    for row, unscaled in zip(p["gpus"], bare["gpus"]):
        if row["mfu_source"].startswith("estimate"):
            assert row["mfu"] == pytest.approx(unscaled["mfu"] * factor), row["gpu"]
    assert p["throughput"]["factors"]["model"] == pytest.approx(factor)
    assert p["throughput"]["estimated_mfu"] == pytest.approx(math.prod(p["throughput"]["factors"].values()))
    text = cli("plan", gemma, "--output-dir", phi3_out, "--prices", "table").stdout
    assert (f"note:      estimates scaled by {factor:.3f}, this model's measured MFU on the H200 (0.1270) over the estimate for that run "
            "(0.2274; 2026-11-27-h200/H200-2026-11-27.json, variant tuned-prefix)") in text
    # Phi-3-mini's shipped settings measured 0.2143 where the fit says 0.25 x (1 - 0.1186) = 0.2204
    phi3 = json.loads(cli("plan", "recipes/phi3-mini-capybara.yaml", "--output-dir", phi3_out, "--prices", "table", "--json").stdout)
    assert phi3["throughput"]["calibration"]["factor"] == pytest.approx(0.2143 / (0.25 * (1 - 0.1186)))


def test_packed_rows_of_an_odd_micro_batch_round_up():
    """3 pairs, 2 a row: two rows (the second half full), not one; one row held the memory estimate
    low enough to turn checkpointing off where it was needed."""
    from alignpress.flops import MASK_ALIGN, packed_layout, prefix_segment

    assert prefix_segment(10, 5, 5, None) == 21  # 15 + 15 positions, the 10-token prompt once (its last token twice)
    pairs = [(10, 5, 5)] * 4
    assert packed_layout(pairs, None, 3, 2) == (2, math.ceil(42 / MASK_ALIGN) * MASK_ALIGN)
    assert packed_layout(pairs, None, 4, 2) == (2, math.ceil(42 / MASK_ALIGN) * MASK_ALIGN)
    assert packed_layout(pairs, None, 1, 2) == (1, math.ceil(21 / MASK_ALIGN) * MASK_ALIGN)
