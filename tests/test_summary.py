"""What a person reads at the end: `run`'s summary and `--version`, exact text."""

from __future__ import annotations

import json

from alignpress.runstate import STAGES, duration_text
from alignpress.version import version
from conftest import ROOT, cli

RECIPE = "recipes/demo.yaml"


def _show(x):
    return f"{x:.4g}" if isinstance(x, float) else str(x)


def test_version():
    proc = cli("--version", timeout=60)
    assert proc.returncode == 0
    assert proc.stdout == f"alignpress {version()}\n"
    assert version() == "0.1.0"


def test_stage_times():
    from alignpress.summary import stage_times

    stages = {"prepare": {"status": "done", "seconds": 12.04}, "train": {"status": "done", "seconds": 7079.2, "resumed_from_step": 400},
              "evaluate": {"status": "done", "seconds": 250.0}, "export": {"status": "failed", "seconds": 3.0}, "publish": {"status": "pending"}}
    assert stage_times(stages) == "prepare 12.0 s, train 1 h 58 min (resumed from step 400), evaluate 4 min 10 s"
    assert stage_times({"prepare": {"status": "pending"}}) is None


def test_run_ends_with_a_summary(demo_copy):
    out = demo_copy
    # Every stage is done: `run` skips them all and prints the same summary as at the end of the run.
    proc = cli("run", RECIPE, "--output-dir", out, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ev = json.loads((out / "metrics" / "eval.json").read_text())
    rid = json.loads((out / "run.json").read_text())["run_id"]
    b, a = ev["base"], ev["aligned"]
    stages = json.loads((out / "run.json").read_text())["stages"]
    times = ", ".join(f"{s} {duration_text(stages[s]['seconds'])}" for s in STAGES)
    assert ev["behaviour_measure"] == r"matches /^The answer is \d+\.$/"
    assert proc.stdout == "\n".join([
        f"summary of run {rid} (demo):",
        f"  behaviour:           {_show(b['behaviour'])} -> {_show(a['behaviour'])} (64 greedy answers; matches /^The answer is \\d+\\.$/)",
        f"  preference accuracy: {_show(b['preference_accuracy'])} -> {_show(a['preference_accuracy'])} (90 held-out pairs)",
        f"  KL estimate:         {_show(a['kl_estimate'])} nats per answer",
        "  gate:                not set (eval.gate_min_gain, eval.gate_max_kl)",
        f"  time:                {times}",
        f"  model:               {out}/model (card: {out}/model/README.md)",
        f"  report:              {out}/metrics/report.md",
        f"  plots:               {out}/plots/eval_before_after.png, {out}/plots/train_curves.png",
        f"  next:                push it (after `hf auth login`): python entrypoint.py publish recipes/demo.yaml --output-dir {out} --set publish.repo_id=YOUR_NAME/demo-dpo",
        "                       align a real model on a cloud GPU (after `make sky`): .venv-sky/bin/sky jobs launch sky/phi3.yaml --env HUB_REPO=YOUR_NAME/phi3-mini-capybara-dpo --secret HF_TOKEN --env BUCKET=YOUR_BUCKET",
        "",
    ])
    assert "[alignpress] == prepare: already done, skipping" in proc.stderr


def test_summary_with_a_failed_gate_names_the_reason(demo_copy):
    from alignpress import gate
    from alignpress.recipe import load_recipe

    out = demo_copy
    # The verdict evaluate would record with eval.gate_min_gain=0.9 (more than the demo gains), written
    # into the finished folder so that `run` has nothing to redo and only prints the summary.
    path = out / "metrics" / "eval.json"
    ev = json.loads(path.read_text())
    ev["gate"] = gate.verdict(load_recipe(ROOT / RECIPE, ["eval.gate_min_gain=0.9"]), ev)
    path.write_text(json.dumps(ev))
    proc = cli("run", RECIPE, "--output-dir", out, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    reason = ev["gate"]["reasons"][0]["reason"]
    assert reason.startswith("the aligned model does not beat the base on held-out preference accuracy by 0.9")
    assert f"  gate:                FAILED, publish refuses this model: {reason}" in lines
    assert lines[-1] == (f"  next:                change the recipe (see {out}/metrics/report.md) and run again: a changed eval or publish "
                         "section redoes evaluate onward in this folder; other changes need --restart (on SkyPilot: another --env RUN_NAME)")
