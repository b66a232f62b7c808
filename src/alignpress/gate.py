"""The publish gate: refuse to publish a model the evaluation says did not improve, or drifted too far.

Two recipe settings, each off when null:
- eval.gate_min_gain: aligned held-out preference accuracy minus the base's must be at least this;
- eval.gate_max_kl: the KL estimate from the base (aligned.kl_estimate in metrics/eval.json, nats
  per answer) must be at most this.

evaluate records the verdict in metrics/eval.json (`gate`) and warns when it fails; `check` is
what the publish stage calls before anything is uploaded: it reads metrics/eval.json again with
the recipe's current thresholds and raises StageFailed (an AlignpressError, exit code 3) naming
the field, so nothing is pushed.
"""

from __future__ import annotations

import json
from typing import Any

from .errors import AlignpressError, StageFailed
from .recipe import Recipe
from .runstate import RunDir

# Accuracies are rounded to 6 decimals in eval.json: compare with that much slack.
EPS = 1e-6


def enabled(recipe: Recipe) -> bool:
    return recipe.eval.gate_min_gain is not None or recipe.eval.gate_max_kl is not None


def verdict(recipe: Recipe, ev: dict[str, Any]) -> dict[str, Any] | None:
    """The gate's decision on one eval.json: None when no gate is set."""
    e = recipe.eval
    if not enabled(recipe):
        return None
    base, aligned = ev.get("base") or {}, ev.get("aligned") or {}
    reasons: list[dict[str, str]] = []
    gain = None
    if base.get("preference_accuracy") is not None and aligned.get("preference_accuracy") is not None:
        gain = round(aligned["preference_accuracy"] - base["preference_accuracy"], 6)
    kl = aligned.get("kl_estimate")
    if e.gate_min_gain is not None:
        if gain is None:
            reasons.append({"field": "eval.gate_min_gain", "reason": "no held-out preference accuracy to compare (no held-out pairs were scored)"})
        elif gain < e.gate_min_gain - EPS:
            reasons.append({
                "field": "eval.gate_min_gain",
                "reason": (f"the aligned model does not beat the base on held-out preference accuracy by {e.gate_min_gain:g}: "
                           f"{base['preference_accuracy']:.4f} -> {aligned['preference_accuracy']:.4f} (gain {gain:+.4f})"),
            })
    if e.gate_max_kl is not None:
        if kl is None:
            reasons.append({"field": "eval.gate_max_kl", "reason": "no KL estimate in metrics/eval.json (no greedy generations were made)"})
        elif kl > e.gate_max_kl:
            reasons.append({
                "field": "eval.gate_max_kl",
                "reason": f"the KL estimate from the base, {kl:.4g} nats per answer, exceeds the limit {e.gate_max_kl:g}",
            })
    return {
        "min_gain": e.gate_min_gain,
        "max_kl": e.gate_max_kl,
        "preference_accuracy_gain": gain,
        "kl_estimate": kl,
        "passed": not reasons,
        "reasons": reasons,
    }


def check(recipe: Recipe, run_dir: RunDir, before_export: bool = False) -> None:
    """Raise StageFailed (nothing may be published) when the gate is set and the evaluation fails it.
    `before_export`: `run` asks before the merge, which would cost GPU minutes for a model that will not be pushed."""
    if not enabled(recipe):
        return
    field = "eval.gate_min_gain" if recipe.eval.gate_min_gain is not None else "eval.gate_max_kl"
    path = run_dir.metrics / "eval.json"
    if not run_dir.is_done("evaluate") or not path.exists():
        raise AlignpressError(
            "the publish gate needs the evaluate stage's metrics/eval.json, and it is missing or stale; run the evaluate stage",
            source=recipe.source, field=field,
        )
    try:
        ev = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise AlignpressError(f"metrics/eval.json is not valid JSON ({e}); run the evaluate stage again", source=str(path)) from None
    v = verdict(recipe, ev)
    if v and not v["passed"]:
        first = v["reasons"][0]
        text = "; ".join(f"{r['field']}: {r['reason']}" if i else r["reason"] for i, r in enumerate(v["reasons"]))
        nothing = ("Nothing was exported or pushed (`export` merges the model anyway)" if before_export else "Nothing was pushed")
        raise StageFailed(f"publish gate: {text}. {nothing} (numbers in {path})", source=recipe.source, field=first["field"])
