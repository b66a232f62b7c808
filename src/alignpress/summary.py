"""The end of `run`: what changed, whether the gate lets it out, where everything is, what to do next.

Read from run.json and metrics/eval.json only, so a re-run of a finished folder prints the same.
"""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path
from typing import Any

from .recipe import Recipe
from .runstate import STAGES, RunDir, duration_text

# The seed recipe a user goes on to after the demo, and the SkyPilot task that runs it.
SKY_DEFAULT = ("sky/phi3.yaml", "phi3-mini-capybara-dpo")


def _show(x: Any) -> str:
    return "–" if x is None else f"{x:.4g}" if isinstance(x, float) else str(x)


def _sky_task(recipe_file: str) -> Path | None:
    """The sky/*.yaml whose RECIPE is this recipe file, if any."""
    import yaml

    root = Path(__file__).resolve().parents[2]
    try:
        wanted = (Path.cwd() / recipe_file).resolve()
    except OSError:
        return None
    for task in sorted((root / "sky").glob("*.yaml")):
        try:
            envs = (yaml.safe_load(task.read_text()) or {}).get("envs") or {}
        except yaml.YAMLError:
            continue
        if envs.get("RECIPE") and (root / str(envs["RECIPE"])).resolve() == wanted:
            return task.relative_to(root)
    return None


def stage_times(stages: dict[str, Any]) -> str | None:
    """`prepare 0.3 s, train 41.1 s, evaluate 16.9 s, export 3.1 s, publish 0.0 s`: each stage's
    last run (a resumed training's time since its checkpoint, which the line says)."""
    parts = []
    for name in STAGES:
        stage = stages.get(name) or {}
        if stage.get("status") != "done" or not isinstance(stage.get("seconds"), (int, float)):
            continue
        resumed = f" (resumed from step {stage['resumed_from_step']})" if name == "train" and stage.get("resumed_from_step") else ""
        parts.append(f"{name} {duration_text(stage['seconds'])}{resumed}")
    return ", ".join(parts) or None


def render(recipe: Recipe, run_dir: RunDir, recipe_file: str, sets: list[str]) -> str:
    m = run_dir.load()
    stages = m.get("stages", {})
    rows: list[tuple[str, str]] = []
    ev_path = run_dir.metrics / "eval.json"
    ev = json.loads(ev_path.read_text()) if stages.get("evaluate", {}).get("status") == "done" and ev_path.exists() else None
    if ev:
        b, a = ev["base"], ev["aligned"]
        rows.append(("behaviour", f"{_show(b['behaviour'])} -> {_show(a['behaviour'])} ({ev['n_generations']} greedy answers; {ev['behaviour_measure']})"))
        rows.append(("preference accuracy", f"{_show(b['preference_accuracy'])} -> {_show(a['preference_accuracy'])} ({ev['n_pairs']} held-out pairs)"))
        rows.append(("KL estimate", f"{_show(a.get('kl_estimate'))} nats per answer"))
        if ev.get("judge"):
            j = ev["judge"]
            rows.append(("judge win rate", f"{_show(j['win_rate'])} (95% CI {_show(j['ci95'][0])}-{_show(j['ci95'][1])})"))
        g = ev.get("gate")
        if g is None:
            rows.append(("gate", "not set (eval.gate_min_gain, eval.gate_max_kl)"))
        elif g["passed"]:
            rows.append(("gate", "passed"))
        else:
            rows.append(("gate", "FAILED, publish refuses this model: " + "; ".join(r["reason"] for r in g["reasons"])))
    else:
        rows.append(("evaluation", stages.get("evaluate", {}).get("skipped") or "not run"))
    if times := stage_times(stages):
        rows.append(("time", times))
    rows.append(("model", f"{run_dir.model} (card: {run_dir.model / 'README.md'})"))
    if (run_dir.metrics / "report.md").exists():
        rows.append(("report", str(run_dir.metrics / "report.md")))
    plots = sorted((run_dir.root / "plots").glob("*.png"))
    if plots:
        rows.append(("plots", ", ".join(str(p) for p in plots)))
    pub = stages.get("publish", {})
    pushed = [d for d in pub.get("destinations", [])] if pub.get("pushed") else []
    for d in pushed:
        rows.append((f"published {d['kind']}", f"{d['url']} (tag {d['tag']}, commit {d['commit'][:8]}, {'private' if d['private'] else 'public'})"))
    latest = {(d["repo_id"], d["commit"]) for d in pushed}
    for d in [p for p in m.get("pushes", []) if (p["repo_id"], p["commit"]) not in latest]:
        rows.append((f"earlier {d['kind']}", f"{d['url']} (tag {d['tag']}, commit {d['commit'][:8]}, run {d['run_id']})"))

    nexts: list[str] = []
    gate_failed = bool(ev and ev.get("gate") and not ev["gate"]["passed"])
    if not pushed and not gate_failed:
        cmd = ["python", "entrypoint.py", "publish", recipe_file, "--output-dir", str(run_dir.root)]
        for s in sets:
            if not s.startswith("publish.repo_id="):
                cmd += ["--set", s]
        cmd += ["--set", f"publish.repo_id={recipe.publish.repo_id or 'YOUR_NAME/' + recipe.name + '-dpo'}"]
        # The token from `hf auth login` or an exported HF_TOKEN: one typed into a command line stays in
        # the shell's history.
        nexts.append("push it (after `hf auth login`): " + shlex.join(cmd))
    if gate_failed:
        nexts.append(f"change the recipe (see {run_dir.metrics / 'report.md'}) and run again: a changed eval or publish section redoes "
                     "evaluate onward in this folder; other changes need --restart (on SkyPilot: another --env RUN_NAME)")
    elif not os.environ.get("SKYPILOT_TASK_ID"):
        task = _sky_task(recipe_file)
        if task is not None:
            nexts.append(f"on a cloud GPU (after `make sky`): .venv-sky/bin/sky jobs launch {task} --env HUB_REPO=YOUR_NAME/{recipe.name}-dpo --secret HF_TOKEN --env BUCKET=YOUR_BUCKET")
        elif recipe.model.name_or_path.startswith("builtin:"):
            nexts.append(f"align a real model on a cloud GPU (after `make sky`): .venv-sky/bin/sky jobs launch {SKY_DEFAULT[0]} --env HUB_REPO=YOUR_NAME/{SKY_DEFAULT[1]} --secret HF_TOKEN --env BUCKET=YOUR_BUCKET")

    width = max(len(k) for k, _ in rows) + 1
    lines = [f"summary of run {m.get('run_id', '?')} ({recipe.name}):"]
    lines += [f"  {k + ':':<{width}} {v}" for k, v in rows]
    lines += [f"  {'next:':<{width}} {n}" for n in nexts[:1]] + [f"  {'':<{width}} {n}" for n in nexts[1:]]
    return "\n".join(lines)
