"""The speed levers through the real entry point on the demo: recorded decisions, stored log-probs.

Liger needs CUDA, so on the CPU the run ignores it with a logged reason; checkpointing `auto` is
off without a GPU (its GPU decision is unit-tested with fake memory sizes in test_plan.py).
"""

import json
import shutil

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
    assert systems["precompute"]["reused"] is True


def test_precompute_auto_follows_the_epochs(demo_run, tmp_path):
    out = prepared_copy(demo_run, tmp_path)
    proc = cli("train", "recipes/demo.yaml", "--output-dir", out, "--set", "train.max_steps=2", "--set", "eval.enabled=false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    systems = json.loads((out / "run.json").read_text())["stages"]["train"]["systems"]
    # 2 steps x 8 pairs of the demo's training rows is far below 5.45 epochs
    assert systems["precompute_ref_log_probs"] is False
    assert systems["precompute_ref_log_probs_decision"]["reason"].startswith("off: 0.0")
    assert not (out / "ref_logps").exists()
