"""Multi-process training on the CPU: gloo DDP and DeepSpeed ZeRO-2, through the real entry point."""

import json
import shutil
import subprocess
import sys

from conftest import ROOT, cli


def losses(folder):
    return [json.loads(x)["loss"] for x in (folder / "metrics/train.jsonl").read_text().splitlines() if "loss" in json.loads(x)]


def prepared_copy(demo_run, dest):
    """The demo's prepared data, with every later stage pending."""
    dest.mkdir()
    for name in ("data", "recipe.resolved.yaml"):
        src = demo_run[0] / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, dest / name)
    manifest = json.loads((demo_run[0] / "run.json").read_text())
    manifest["stages"] = {s: {"status": "done" if s == "prepare" else "pending"} for s in manifest["stages"]}
    (dest / "run.json").write_text(json.dumps(manifest))
    return dest


def test_two_gloo_processes_match_one(tmp_path, demo_run):
    """Same global batch (1 x 8 vs 2 x 4): the same losses, step by step."""
    one, two = prepared_copy(demo_run, tmp_path / "one"), prepared_copy(demo_run, tmp_path / "two")
    common = ["--set", "train.max_steps=12", "--set", "train.logging_steps=3"]
    a = cli("train", "recipes/demo.yaml", "--output-dir", one, *common, "--set", "train.per_device_train_batch_size=8")
    assert a.returncode == 0, a.stderr[-3000:]
    b = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(ROOT / "entrypoint.py"), "train", "recipes/demo.yaml",
                        "--output-dir", str(two), *common, "--set", "train.per_device_train_batch_size=4"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert b.returncode == 0, b.stderr[-3000:]
    la, lb = losses(one), losses(two)
    assert len(la) == len(lb) == 4
    # Tolerance: float32 reductions in a different order across processes.
    assert max(abs(x - y) for x, y in zip(la, lb)) < 1e-4, (la, lb)
    assert json.loads((two / "run.json").read_text())["stages"]["train"]["world_size"] == 2
    assert (two / "adapter/adapter_model.safetensors").exists()


def test_demo_under_deepspeed_zero2(tmp_path, demo_run):
    """The whole demo, relaunched by the recipe's accelerate_config under DeepSpeed ZeRO-2 on the CPU."""
    out = tmp_path / "ds"
    proc = cli("run", "recipes/demo.yaml", "--output-dir", out, "--set", "train.accelerate_config=zero2", "--set", "train.num_processes=1",
               env={"DS_ACCELERATOR": "cpu"}, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "relaunching under accelerate" in proc.stderr
    manifest = json.loads((out / "run.json").read_text())
    assert [manifest["stages"][s]["status"] for s in ("prepare", "train", "evaluate", "export", "publish")] == ["done"] * 5
    assert manifest["stages"]["train"]["deepspeed_zero_stage"] == 2
    ev = json.loads((out / "metrics/eval.json").read_text())
    reference = json.loads((demo_run[0] / "metrics/eval.json").read_text())
    assert ev["aligned"]["behaviour"] >= 0.9 and ev["aligned"]["preference_accuracy"] >= 0.9
    assert abs(ev["aligned"]["preference_accuracy"] - reference["aligned"]["preference_accuracy"]) <= 0.05
