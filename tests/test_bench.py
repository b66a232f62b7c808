"""The benchmark harness's CPU smoke mode: a tiny Phi-3 model, 3 steps, 2 variants, real DPOTrainer.

It measures nothing useful (2 shared CPU cores); it keeps benchmarks/bench_dpo.py from rotting and
checks its bookkeeping: tokens counted from the attention masks equal the synthetic pairs' lengths.
"""

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_dpo  # noqa: E402
from alignpress.flops import sequence_flops, truncate_pair  # noqa: E402

RESULT_KEYS = {"steps_timed", "seconds", "pairs", "tokens", "padded_tokens", "padding_fraction", "tokens_per_s", "samples_per_s", "model_flops", "achieved_tflops", "mfu", "peak_memory_gib", "peak_memory_kind", "setup_s"}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, alignpress_home):
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_dpo.py"), "--smoke", "--steps", "3", "--variant", "seed", "--variant", "tuned-standard", "--variant", "liger", "--variant", "tuned", "--profile", "tuned", "--out", str(out)],
        capture_output=True, text=True, cwd=ROOT, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = sorted(out.glob("cpu-*.json"))
    assert len(files) == 1
    return json.loads(files[0].read_text()), files[0], proc


def test_smoke_report_layout(smoke):
    report, path, proc = smoke
    assert report["schema"] == "alignpress-bench/1" and report["libraries"]["trl"]
    (run,) = report["runs"]
    assert run["model"] == "tiny" and run["steps"] == 3 and run["warmup_steps"] == 1
    assert run["device"]["kind"] == "cpu"
    assert [v["name"] for v in run["variants"]] == ["seed", "tuned-standard", "liger", "tuned"]
    assert {"median_pair_tokens", "median_prompt_to_answer", "p95_pair_tokens"} <= set(run["data"]["realized"])
    md = path.with_suffix(".md").read_text()
    assert "| seed | ok |" in md and "| tuned-standard | ok |" in md and "| tuned | ok |" in md and "MFU is not reported" in md
    assert "| liger | skipped: Liger kernels need a CUDA GPU (Triton) |" in md  # Liger is CUDA-only: said, not hidden
    assert "[bench] tiny / liger ...\n[bench]   skipped: Liger kernels need a CUDA GPU (Triton)\n" in proc.stderr
    assert md in proc.stdout


def test_profile_of_the_steps_after_the_timed_ones(smoke):
    """--profile tuned: 2 more steps under torch.profiler, after the 3 timed (1 warm-up); where the time
    went, by category and by name. The timed numbers do not include them."""
    report, path, _ = smoke
    variants = {v["name"]: v for v in report["runs"][0]["variants"]}
    assert "profile" not in variants["seed"]["results"]
    r = variants["tuned"]["results"]
    assert r["steps_timed"] == 2 and len(variants["tuned"]["batches"]) == 2  # steps 2 and 3; the profiled 4 and 5 are not timed
    prof = r["profile"]
    assert (prof["steps"], prof["clock"]) == (2, "CPU operator self time") and prof["ms_per_step"] > 0
    assert set(prof["share"]) <= {name for name, _ in bench_dpo.PROFILE_CATEGORIES} | {"other"}
    assert sum(prof["share"].values()) == pytest.approx(1, abs=1e-3)
    assert prof["share"]["matmul"] > 0 and prof["share"]["attention"] > 0
    shares = [t["share"] for t in prof["top"]]
    assert shares == sorted(shares, reverse=True) and len(shares) == 20
    assert {t["name"] for t in prof["top"]} >= {"aten::mm"}
    assert prof["wall_ms_per_step"] > 0 and prof["device_busy"] is None  # busy share: CUDA kernel time only
    md = path.with_suffix(".md").read_text()
    assert f"Profile of tuned (2 steps after the timed ones, CPU operator self time: {prof['ms_per_step']:,.1f} ms a step): " in md


def test_every_step_timed(smoke):
    """step_seconds: each of the 3 steps (warm-up first); the timed ones add up to the measured
    seconds. Nothing was compiled while timed (no FlexAttention on the CPU)."""
    report, _, _ = smoke
    for v in report["runs"][0]["variants"]:
        if v["status"] != "ok":
            continue
        r = v["results"]
        assert len(r["step_seconds"]) == 3 and min(r["step_seconds"]) > 0
        assert sum(r["step_seconds"][1:]) == pytest.approx(r["seconds"], abs=2e-4)
        assert r["compiled_graphs_timed"] == 0


def test_uneven_steps_are_reported():
    """A timed step far below the median rate (positions a second, as shapes differ) or a compile in
    the timed window is named in the report; steps of different shapes at one rate are not."""
    def variant(seconds, lengths, graphs=0):
        return {"name": "tuned-flex", "settings": {"gradient_accumulation_steps": 2},
                "batches": [{"rows": 4, "seq_len": n} for n in lengths for _ in range(2)],
                "results": {"step_seconds": [9.0, *seconds], "compiled_graphs_timed": graphs}}

    even = variant([1.0, 2.0, 0.5], [1000, 2000, 500])
    assert bench_dpo.uneven_steps(even, warmup=1) is None
    slow = variant([1.0, 4.0, 0.5], [1000, 2000, 500])  # step 3: 16,000 positions in 4 s, half the median rate
    assert bench_dpo.uneven_steps(slow, warmup=1) == "tuned-flex step 3 ran at 50% of the median rate (4.00 s)"
    compiled = variant([1.0, 2.0, 0.5], [1000, 2000, 500], graphs=2)
    assert bench_dpo.uneven_steps(compiled, warmup=1) == "tuned-flex step 2 ran at 100% of the median rate (1.00 s), 2 graphs compiled"


def test_profile_categories_of_cuda_kernel_names():
    """Kernel names as CUDA profiles show them (the GPU run's categories; no GPU here)."""
    import re

    def category(name):
        return next((c for c, pattern in bench_dpo.PROFILE_CATEGORIES if re.search(pattern, name.lower())), "other")

    assert category("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_segment_k_off_kernel__5x_cublas") == "matmul"
    assert category("fmha_cutlassF_bf16_aligned_64x64_rf_sm80(PyTorchMemEffAttention::AttentionKernel<cutlass::bfloat16_t, cutlass::arch::Sm80, true, 64, 64, 64, true, true>::Params)") == "attention"
    assert category("_rms_norm_forward_kernel") == "fused (Liger/Triton)"
    assert category("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::BFloat16>>") == "elementwise/reduce"
    assert category("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor>") == "optimizer"
    assert category("Memcpy DtoD (Device -> Device)") == "copy/cast"


def test_smoke_values_are_sane(smoke):
    report, _, _ = smoke
    for v in report["runs"][0]["variants"][:2]:
        assert v["status"] == "ok", v
        r = v["results"]
        assert RESULT_KEYS <= set(r)
        assert r["steps_timed"] == 2 and r["seconds"] > 0
        assert r["tokens_per_s"] > 0 and r["samples_per_s"] > 0
        assert 0 <= r["padding_fraction"] < 1
        assert r["mfu"] is None and "RSS" in r["peak_memory_kind"]  # CPU: no MFU, no GPU memory
        assert r["pairs"] == 2 * v["settings"]["per_device_train_batch_size"] * v["settings"]["gradient_accumulation_steps"]
    seed, tuned, liger, shared = report["runs"][0]["variants"]
    assert seed["settings"]["gradient_checkpointing"] and not seed["settings"]["precompute_ref_log_probs"]
    assert (seed["settings"]["per_device_train_batch_size"], seed["settings"]["gradient_accumulation_steps"]) == (2, 2)
    assert any("4-bit NF4 unavailable here" in n for n in seed["notes"])  # said, not hidden
    # tuned-standard = the shipped recipe in TRL's layout, its auto fields decided as `run` decides them (CPU: no checkpointing, no Liger)
    assert tuned["settings"]["group_by_length"] and tuned["settings"]["precompute_ref_log_probs"]
    assert not tuned["settings"]["gradient_checkpointing"] and not tuned["settings"]["liger"] and tuned["settings"]["optim"] == "adamw_torch_fused"
    assert "use_liger_kernel: off: Liger's kernels are Triton code for CUDA GPUs; this run is on the CPU" in tuned["notes"]
    assert "precompute_ref_log_probs: on: 6 epochs > 5.45, where one precompute pass is repaid by faster steps" in tuned["notes"]
    assert tuned["settings"]["per_device_train_batch_size"] == 4 and tuned["settings"]["gradient_accumulation_steps"] == 1
    assert tuned["results"]["precompute_tokens"] > 0 and not tuned["settings"]["prefix_sharing"]
    assert liger["status"] == "skipped" and liger["reason"] == "Liger kernels need a CUDA GPU (Triton)"
    # tuned = the shipped recipe as is: prefix-shared, the same pairs, fewer tokens computed; its
    # precompute pass counted in TRL's tokens, the same as the standard pass's
    assert shared["status"] == "ok" and (shared["settings"]["prefix_sharing"], shared["settings"]["pairs_per_row"]) == (True, 1)
    assert {k: v for k, v in shared["settings"].items() if k != "prefix_sharing"} == {k: v for k, v in tuned["settings"].items() if k != "prefix_sharing"}
    assert shared["results"]["tokens"] == tuned["results"]["tokens"] and shared["results"]["computed_tokens"] < 0.8 * tuned["results"]["tokens"]
    assert shared["results"]["precompute_tokens"] == tuned["results"]["precompute_tokens"] and shared["results"]["precompute_padding_fraction"] is None


def test_tokens_equal_the_synthetic_lengths(smoke):
    """Non-padding tokens (from attention masks) = the lengths of the synthetic pairs in those batches."""
    report, _, _ = smoke
    run = report["runs"][0]
    pool = Counter(bench_dpo.synthetic_pairs(run["data"]["pool_pairs"], run["data"]["seed"], smoke=True))
    for v in run["variants"][:2]:
        max_length = v["settings"]["max_length"]
        expected = flops = 0
        for batch in v["batches"]:
            rows = 0
            for p, c, r in batch["pairs"]:
                assert pool[(p, c, r)] > 0, (p, c, r)  # TRL tokenised the synthetic text to exactly these counts
                for length, completion in truncate_pair(p, c, r, max_length):
                    expected += length
                    rows += length
                    flops += sequence_flops(bench_dpo.arch_from_config(bench_dpo.MODELS["tiny"]["kwargs"] | {"model_type": "phi3"}), length, completion, lora_r=16, reference=not v["settings"]["precompute_ref_log_probs"])["total"]
            assert batch["real_tokens"] == rows
            assert batch["rows"] * batch["seq_len"] >= rows
        assert v["results"]["tokens"] == expected
        assert v["results"]["model_flops"] == pytest.approx(flops)


def test_synthetic_distribution_matches_the_reference():
    """Median about 1,160 tokens a pair, prompt about 1.6 x the answer, a tail past 3,500 (seeded)."""
    from alignpress.flops import LengthDistribution

    d = LengthDistribution.describe(bench_dpo.synthetic_pairs(20000, 0, smoke=False))
    assert 1100 <= d["median_pair_tokens"] <= 1220
    assert 1.45 <= d["median_prompt_to_answer"] <= 1.75
    assert d["share_over_3500"] > 0.01 and d["max_pair_tokens"] > 3500
    assert bench_dpo.synthetic_pairs(50, 3, smoke=False) == bench_dpo.synthetic_pairs(50, 3, smoke=False)


def test_every_lever_is_a_recipe_field_and_has_a_variant():
    """Variants are recipe overrides only; each lever appears alone on the seed and removed from tuned."""
    from alignpress.recipe import load_recipe

    levers = {"model.load_in_4bit", "train.use_liger_kernel", "train.group_by_length", "train.gradient_checkpointing", "dpo.precompute_ref_log_probs", "model.attn_implementation", "train.optim"}
    alone = {kv.split("=")[0] for v in bench_dpo.VARIANTS.values() if v["base"] == "seed" for kv in v.get("set", [])}
    assert levers <= alone | {"train.per_device_train_batch_size"}
    removed = {kv.split("=")[0] for v in bench_dpo.VARIANTS.values() if v["base"] == "recipe" for kv in v.get("set", [])}
    assert {"dpo.precompute_ref_log_probs", "train.gradient_checkpointing", "train.use_liger_kernel", "train.group_by_length", "model.attn_implementation", "dpo.prefix_sharing"} <= removed
    for model in ("phi3-mini", "gemma-2b"):
        path = ROOT / bench_dpo.MODELS[model]["recipe"]
        for name in bench_dpo.VARIANTS:
            sets = bench_dpo.plan_variant(name, model, "cpu", False)[0]
            load_recipe(path, sets)  # every override is a valid recipe field and value
        # checkpointing some layers: half of Phi-3-mini's 32, of Gemma-2b's 18
        assert bench_dpo.plan_variant("tuned-ckpt-half", model, "cpu", False)[0][-2:] == ["train.gradient_checkpointing=true", f"train.checkpointed_layers={16 if model == 'phi3-mini' else 9}"]


def test_seed_variant_reproduces_the_measured_seed_settings():
    """The recipe header's seed --set list gives the settings the H200 seed runs recorded."""
    from alignpress.recipe import load_recipe

    results = ROOT / "benchmarks" / "results" / "2026-11-26-h200"
    for model, measured in (("phi3-mini", "phi3-seed.json"), ("gemma-2b", "gemma-seed.json")):
        path = ROOT / bench_dpo.MODELS[model]["recipe"]
        r = load_recipe(path, bench_dpo.seed_sets(path))
        got = json.loads((results / measured).read_text())["settings"]
        mine = {"load_in_4bit": r.model.load_in_4bit, "gradient_checkpointing": r.train.gradient_checkpointing, "per_device_train_batch_size": r.train.per_device_train_batch_size, "gradient_accumulation_steps": r.train.gradient_accumulation_steps, "precompute_ref_log_probs": r.dpo.precompute_ref_log_probs, "attn_implementation": r.model.attn_implementation or "sdpa (default)", "group_by_length": r.train.group_by_length, "liger": r.train.use_liger_kernel, "optim": r.train.optim, "max_length": r.dpo.max_length, "lora_r": r.lora.r}
        assert mine == got


def test_precompute_pass_goes_longest_first(smoke):
    """The tuned run's precompute batches follow alignpress.train.precompute_order: padding by hand."""
    from alignpress.train import precompute_order

    report, _, _ = smoke
    run = report["runs"][0]
    tuned = run["variants"][1]
    max_length, batch = tuned["settings"]["max_length"], tuned["systems"]["precompute_ref_batch_size"]
    pairs = bench_dpo.synthetic_pairs(run["data"]["pool_pairs"], run["data"]["seed"], smoke=True)

    def padding(order):
        kept = [s for p, c, r in order if (s := truncate_pair(p, c, r, max_length))]  # TRL drops prompt-filled pairs
        real = padded = 0
        for i in range(0, len(kept), batch):
            rows = [length for pair in kept[i : i + batch] for length, _ in pair]
            real += sum(rows)
            padded += len(rows) * max(rows)
        return real, 1 - real / padded

    rows = [{"prompt_tokens": p, "chosen_tokens": c, "rejected_tokens": r} for p, c, r in pairs]
    real, sorted_padding = padding([(x["prompt_tokens"], x["chosen_tokens"], x["rejected_tokens"]) for x in precompute_order(rows)])
    assert tuned["results"]["precompute_tokens"] == real
    assert tuned["results"]["precompute_padding_fraction"] == round(sorted_padding, 4)
    assert sorted_padding < padding(pairs)[1] / 2  # the data's own order pads more than twice as much


def test_half_batch_keeps_the_pairs_per_step():
    """tuned-prefix-half: Phi-3's 4 x 1 becomes 2 x 2, Gemma's 3 x 1 becomes 1 x 3 (3 has no half)."""
    from alignpress.recipe import load_recipe

    assert bench_dpo.half_batch(4, 1) == ["train.per_device_train_batch_size=2", "train.gradient_accumulation_steps=2"]
    assert bench_dpo.half_batch(3, 1) == ["train.per_device_train_batch_size=1", "train.gradient_accumulation_steps=3"]
    assert bench_dpo.half_batch(1, 4) == ["train.per_device_train_batch_size=1", "train.gradient_accumulation_steps=4"]
    for model, shape in (("phi3-mini", (2, 2)), ("gemma-2b", (1, 3))):
        sets, notes, skip = bench_dpo.plan_variant("tuned-prefix-half", model, "cuda", smoke=False)
        t = load_recipe(ROOT / bench_dpo.MODELS[model]["recipe"], sets).train
        assert skip is None and (t.per_device_train_batch_size, t.gradient_accumulation_steps) == shape


def test_step_time_fit_by_hand():
    """Steps of 1,000 to 4,000 positions at 0.2 s + 50 us a position: the fit gives both back; sizes
    too alike, or too few steps, give none."""
    def variant(positions, seconds):
        return {"name": "tuned", "settings": {"gradient_accumulation_steps": 1}, "batches": [{"rows": 4, "seq_len": n // 4} for n in positions],
                "results": {"step_seconds": [5.0, *seconds]}}

    sizes = [1000, 2000, 3000, 4000, 2500]
    fit = bench_dpo.step_fit(variant(sizes, [0.2 + 50e-6 * n for n in sizes]), warmup=1)
    assert fit["fixed_s"] == pytest.approx(0.2) and fit["per_position_s"] == pytest.approx(50e-6) and fit["r2"] == pytest.approx(1.0)
    noisy = bench_dpo.step_fit(variant(sizes, [0.25, 0.28, 0.37, 0.39, 0.33]), warmup=1)
    assert 0 < noisy["r2"] < 1
    assert bench_dpo.step_fit(variant([2000, 2040, 1980, 2010], [0.3] * 4), warmup=1) is None
    assert bench_dpo.step_fit(variant(sizes[:3], [0.3] * 3), warmup=1) is None


def test_step_time_fit_in_the_report(smoke):
    """The report's line for a variant with enough timed steps of different sizes (the smoke run's own
    2 timed steps are too few: given 5 here)."""
    import copy

    report = copy.deepcopy(smoke[0])
    v = next(v for v in report["runs"][0]["variants"] if v["name"] == "tuned-standard")
    sizes = [1000, 2000, 3000, 4000, 2500]
    v["batches"] = [{"rows": 4, "seq_len": n // 4} for n in sizes]
    v["results"]["step_seconds"] = [5.0, *(0.2 + 50e-6 * n for n in sizes)]
    md = bench_dpo.markdown(report)
    assert "least squares over the timed steps; the fixed part is what a step costs whatever its size (host overhead, optimizer, launches): tuned-standard 200 ms + 50.00 us a position (R² 1.00)." in md


def test_a_worker_past_its_time_is_killed_with_what_it_started(tmp_path):
    """--variant-timeout: the worker and its children (torch.compile's compile workers) go, so none
    keeps a CPU busy while the next variant is timed."""
    import os
    import time

    pid_file = tmp_path / "child.pid"
    started = time.monotonic()
    assert bench_dpo.run_worker(["bash", "-c", f"sleep 60 & echo $! > {pid_file}; wait"], timeout=2) is None
    assert time.monotonic() - started < 20
    child = int(pid_file.read_text())
    for _ in range(50):  # SIGKILL is delivered asynchronously
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"the worker's child {child} outlived it")
    done = bench_dpo.run_worker([sys.executable, "-c", "import sys; print('out'); print('err', file=sys.stderr); sys.exit(3)"], timeout=30)
    assert (done.returncode, done.stdout, done.stderr) == (3, "out\n", "err\n")


def test_host_memory_benchmark_runs_and_scoring_holds_one_batch_of_logits(tmp_path):
    """benchmarks/bench_host_memory.py on a tiny model (its numbers mean little there), and its
    scoring part at a size where they do: 8 rows of 128 tokens, 36 of them answer, vocabulary 65,536
    (256 MiB of float32 logits at every position, 72 MiB at the answers'). evaluate.answer_logps once
    held three whole-batch tensors (the logits, in float32, and the whole log-softmax: 3 x 256 MiB),
    then one (262 MiB measured); now the logits at the answers' positions only (74 MiB measured)."""
    out = tmp_path / "hostmem.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_host_memory.py"), "--hidden", "64", "--layers", "2", "--vocab", "65536",
                           "--json", str(out)], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from alignpress.tiny import phi3_tokenizer

    result = json.loads(out.read_text())
    vocab = len(phi3_tokenizer())
    assert set(result["export"]) == {"float32", "bfloat16"} and result["params"] == 2 * (16 * 64 * 64 + 2 * 64) + 2 * vocab * 64 + 64
    assert all(e["peak_bytes"] > result["baseline_bytes"] > 100 * 2**20 for e in result["export"].values())
    scoring = result["scoring"]
    assert (scoring["tokens"], scoring["answer_tokens"]) == (128, 36) and scoring["logits_bytes"] == 8 * 128 * 65536 * 4
    assert scoring["answer_logits_bytes"] == 8 * 36 * 65536 * 4
    assert 0.9 * scoring["answer_logits_bytes"] < scoring["above_model_bytes"] < 1.5 * scoring["answer_logits_bytes"], scoring
    assert scoring["above_model_bytes"] < 0.5 * scoring["logits_bytes"]  # never the whole batch's logits
    assert "scoring 8 rows of 128 tokens (36 of them answer), vocabulary 65,536: peak " in proc.stdout
