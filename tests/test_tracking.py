"""Experiment tracking (alignpress.tracking): the default TensorBoard record of the demo run, read back.

The event files are read with tensorboardX's protobuf classes (TFRecord framing: length, crc,
payload, crc), not with alignpress code, so the test checks what TensorBoard would show.
"""

from __future__ import annotations

import json
import struct
import sys
from types import SimpleNamespace
from pathlib import Path

import pytest

from alignpress.runstate import RunDir
from alignpress.tracking import link_callback, public_url, run_id
from conftest import ROOT, cli

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
        "error: --set train.report_to: field 'train.report_to': tracker 'wandb' needs the wandb package, which is not installed: "
        "install it, or choose another tracker (none turns tracking off)"
    )
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# Public links. No wandb, trackio Space or MLflow server can be reached from this machine, so the
# tracker modules below are stand-ins with the attributes alignpress reads (wandb.run.url,
# trackio.context_vars.current_space_id, mlflow.active_run().info); the card and run.json parts are real.


class _Var:
    def __init__(self, value):
        self.value = value

    def get(self):
        return self.value


def _wandb(url):
    return SimpleNamespace(run=SimpleNamespace(url=url))


def _mlflow(active):
    return SimpleNamespace(active_run=lambda: SimpleNamespace(info=SimpleNamespace(experiment_id="3", run_id="ab12")) if active else None)


def test_public_url_of_each_tracker(monkeypatch):
    monkeypatch.delenv("TRACKIO_SPACE_ID", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    url = "https://wandb.ai/me/alignpress/runs/demo-1"
    assert public_url(["wandb"], {"wandb": _wandb(url)}) == url
    assert public_url(["wandb"], {"wandb": _wandb(None)}) is None  # an offline run has no page
    assert public_url(["wandb"], {"wandb": SimpleNamespace(run=None)}) is None
    assert public_url(["tensorboard"], {"wandb": _wandb(url)}) is None  # not a chosen tracker
    trackio = SimpleNamespace(context_vars=SimpleNamespace(current_space_id=_Var("me/alignpress-runs")))
    assert public_url(["trackio"], {"trackio": trackio}) == "https://huggingface.co/spaces/me/alignpress-runs"
    local = SimpleNamespace(context_vars=SimpleNamespace(current_space_id=_Var(None)))
    assert public_url(["trackio"], {"trackio": local}) is None  # local-only trackio
    monkeypatch.setenv("TRACKIO_SPACE_ID", "me/from-env")
    assert public_url(["trackio"], {"trackio": local}) == "https://huggingface.co/spaces/me/from-env"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "file:///tmp/mlruns")
    assert public_url(["mlflow"], {"mlflow": _mlflow(True)}) is None
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://mlflow.example.org/")
    assert public_url(["mlflow"], {"mlflow": _mlflow(True)}) == "https://mlflow.example.org/#/experiments/3/runs/ab12"
    assert public_url(["mlflow"], {"mlflow": _mlflow(False)}) is None
    # A tracking address with credentials: the link (run.json, the model card) leaves them out.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://alice:s3cretPassw0rd99@mlflow.example.org:5000/")
    assert public_url(["mlflow"], {"mlflow": _mlflow(True)}) == "https://mlflow.example.org:5000/#/experiments/3/runs/ab12"
    assert public_url(["tensorboard"], {}) is None


def test_the_link_is_recorded_and_the_card_shows_it(demo_copy, monkeypatch):
    from alignpress.card import render_model_card
    from alignpress.recipe import load_recipe

    run_dir = RunDir(demo_copy)
    recipe = load_recipe(ROOT / RECIPE, ["train.report_to=wandb"])
    plain = render_model_card(recipe, run_dir)
    assert "Training run" not in plain  # the demo's TensorBoard files are local: no link
    url = "https://wandb.ai/me/alignpress/runs/demo-1"
    callback = link_callback(recipe, run_dir)  # imports transformers first: it probes find_spec("wandb")
    monkeypatch.setitem(sys.modules, "wandb", _wandb(url))
    callback.on_train_begin(None, SimpleNamespace(is_world_process_zero=True), None)
    tracking = json.loads((demo_copy / "run.json").read_text())["tracking"]
    assert tracking["url"] == url and tracking["run_id"]  # added to the record, which is kept
    card = render_model_card(recipe, run_dir)
    results = card.split("## Training results\n", 1)[1].split("\n## ", 1)[0]
    assert results.startswith(f"\nTraining run, with its loss curves: [{url}]({url})\n\n| metric | value |")


@pytest.fixture
def logged(monkeypatch):
    """The alignpress logger's messages, whatever handlers an earlier test in this process set up."""
    import logging

    lines: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger("alignpress")
    monkeypatch.setattr(logger, "handlers", [handler])
    monkeypatch.setattr(logger, "propagate", False)
    level = logger.level
    logger.setLevel(logging.INFO)  # setLevel, not the attribute: it also clears the logger's cached decisions
    yield lines
    logger.setLevel(level)


def test_the_evaluation_reaches_wandb_in_the_tracked_run(tmp_path, monkeypatch, logged):
    """log_eval's other paths. wandb is not installed here (no account, no network): a stand-in
    module records the calls, as wandb's `init`/`log`/`finish` take them. The scalars are eval.json's
    numbers (booleans and text left out), the judge's win rate, at the last training step; mlflow
    is told nothing (it gets the training metrics only); a tracker that fails is a warning."""
    from alignpress.recipe import load_recipe
    from alignpress.tracking import log_eval

    calls = []
    fake = SimpleNamespace(init=lambda **kw: calls.append(("init", kw)), log=lambda scalars, step: calls.append(("log", scalars, step)),
                           finish=lambda: calls.append(("finish",)))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    monkeypatch.delenv("WANDB_RUN_ID", raising=False)
    run_dir = RunDir(tmp_path)
    run_dir.init("demo", RECIPE)
    run_dir.update(tracking={"run_id": "run-7"}, stages={"train": {"status": "done", "global_step": 42}})
    recipe = load_recipe(ROOT / RECIPE, ["train.report_to=[wandb, mlflow]"])
    log_eval(recipe, run_dir)  # no eval.json yet: nothing sent
    assert calls == []
    (run_dir.metrics / "eval.json").parent.mkdir(parents=True, exist_ok=True)
    (run_dir.metrics / "eval.json").write_text(json.dumps({
        "base": {"preference_accuracy": 0.25, "behaviour": 0, "scored": True, "note": "x"},
        "aligned": {"preference_accuracy": 0.75, "kl_estimate": 0.5},
        "judge": {"win_rate": 0.625}}))
    log_eval(recipe, run_dir)
    assert calls == [("init", {"project": "alignpress", "id": "run-7", "resume": "allow"}),
                     ("log", {"eval/base/preference_accuracy": 0.25, "eval/base/behaviour": 0.0, "eval/aligned/preference_accuracy": 0.75,
                              "eval/aligned/kl_estimate": 0.5, "eval/judge/win_rate": 0.625}, 42),
                     ("finish",)]
    assert logged == [f"tracking: mlflow gets the training metrics only; the evaluation is in {run_dir.metrics / 'eval.json'}"]
    # The user's own WANDB_PROJECT and WANDB_RUN_ID win; a tracker that fails leaves the evaluation done.
    calls.clear()
    monkeypatch.setenv("WANDB_PROJECT", "mine")
    monkeypatch.setenv("WANDB_RUN_ID", "their-id")
    log_eval(recipe, run_dir)
    assert calls[0] == ("init", {"project": "mine", "id": "their-id", "resume": "allow"})

    def refused(scalars, step):
        raise ConnectionError("wandb.ai unreachable\nretrying")

    fake.log = refused
    logged.clear()
    log_eval(recipe, run_dir)
    assert logged[0] == "tracking: could not send the evaluation to wandb: ConnectionError: wandb.ai unreachable"
