"""Experiment tracking (alignpress.tracking): the default TensorBoard record of the demo run, read back.

The event files are read with tensorboardX's protobuf classes (TFRecord framing: length, crc,
payload, crc), not with alignpress code, so the test checks what TensorBoard would show.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from alignpress.runstate import RunDir
from alignpress.tracking import run_id
from conftest import cli

RECIPE = "recipes/demo.yaml"


def read_events(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} of every scalar in the folder's event files, in file order."""
    event_pb2 = pytest.importorskip("tensorboardX.proto.event_pb2", reason="tensorboardX is in requirements.lock")
    out: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack_from("<Q", data, pos)
            payload = data[pos + 12 : pos + 12 + length]
            pos += 12 + length + 4
            event = event_pb2.Event()
            event.ParseFromString(payload)
            for v in event.summary.value:
                if v.HasField("simple_value"):
                    out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out


def test_demo_run_leaves_a_tensorboard_record_of_the_loss_and_the_evaluation(demo_run):
    out, _ = demo_run
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["tracking"] == {"report_to": ["tensorboard"], "run_id": manifest["run_id"], "tensorboard_dir": str(out / "tensorboard")}
    events = read_events(out / "tensorboard")
    history = [json.loads(line) for line in (out / "metrics" / "train.jsonl").read_text().splitlines()]
    losses = [(h["step"], h["loss"]) for h in history if "loss" in h]
    assert len(losses) >= 5  # logged every train.logging_steps
    assert [s for s, _ in events["train/loss"]] == [s for s, _ in losses]
    assert [v for _, v in events["train/loss"]] == pytest.approx([v for _, v in losses], rel=1e-6)  # float32 in the event file
    ev = json.loads((out / "metrics" / "eval.json").read_text())
    step = manifest["stages"]["train"]["global_step"]
    for side in ("base", "aligned"):
        for key in ("preference_accuracy", "behaviour", "mean_logp_margin"):
            assert events[f"eval/{side}/{key}"] == [(step, pytest.approx(ev[side][key], rel=1e-6))]
    assert events["eval/aligned/kl_estimate"] == [(step, pytest.approx(ev["aligned"]["kl_estimate"], rel=1e-6))]


def test_the_tracked_run_id_is_fixed_in_run_json(tmp_path, monkeypatch):
    run_dir = RunDir(tmp_path)
    run_dir.init("demo", "recipes/demo.yaml")
    rid = run_dir.load()["run_id"]
    monkeypatch.delenv("SKYPILOT_TASK_ID", raising=False)
    assert run_id(run_dir) == rid
    # On SkyPilot the task id names the run (the same after a managed job's recovery) ...
    monkeypatch.setenv("SKYPILOT_TASK_ID", "sky-managed-2026-11-26-16-00-00-123456_phi3_1-0")
    assert run_id(run_dir) == "sky-managed-2026-11-26-16-00-00-123456_phi3_1-0"
    # ... and once recorded, run.json wins over the environment.
    run_dir.update(tracking={"run_id": "recorded-id"})
    assert run_id(run_dir) == "recorded-id"
    # A scratch folder without run.json (benchmarks/bench_dpo.py) is named by the folder.
    monkeypatch.delenv("SKYPILOT_TASK_ID")
    assert run_id(RunDir(tmp_path / "scratch")) == "scratch"


def test_unknown_tracker_is_refused_at_the_door(tmp_path):
    proc = cli("validate", RECIPE, "--set", "train.report_to=tensorbord", timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith(
        "error: --set train.report_to: field 'train.report_to': unknown tracker 'tensorbord'; the installed transformers supports: none, "
    )
    assert "tensorboard" in proc.stderr and "wandb" in proc.stderr and "trackio" in proc.stderr


def test_a_tracker_that_is_not_installed_stops_the_run_before_it_starts(tmp_path):
    # wandb is not in requirements.lock: it is missing here.
    out = tmp_path / "out"
    proc = cli("run", RECIPE, "--output-dir", out, "--set", "train.report_to=wandb", timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: recipes/demo.yaml: field 'train.report_to': tracker 'wandb' needs the wandb package, which is not installed: "
        "install it, or choose another tracker (none turns tracking off)"
    )
    assert not out.exists()
