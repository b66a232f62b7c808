"""PNG plots of a run, in the output folder's plots/ (export copies them into model/, top level,
where the card links them and publish uploads them with the model):

- train_curves.png: from metrics/train.jsonl, one panel each for loss, rewards/chosen,
  rewards/rejected, rewards/margins, rewards/accuracies and learning_rate, against the step;
- eval_before_after.png: from metrics/eval.json, base against aligned: rates (preference accuracy,
  behaviour, implicit-reward accuracy, eos rate, judge win rate), mean log-probs and answer length.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from .runstate import RunDir

log = logging.getLogger("alignpress")

TRAIN_CURVES = "train_curves.png"
BEFORE_AFTER = "eval_before_after.png"
PLOTS = (TRAIN_CURVES, BEFORE_AFTER)
TRAIN_PANELS = [
    ("loss", "loss", "down"),
    ("rewards/chosen", "rewards/chosen", "≥ 0, not falling"),
    ("rewards/rejected", "rewards/rejected", "down"),
    ("rewards/margins", "rewards/margins", "up"),
    ("rewards/accuracies", "rewards/accuracies", "up (1.0 early = too easy)"),
    ("learning_rate", "learning rate", "the schedule"),
]
BASE_COLOUR, ALIGNED_COLOUR = "#8c8c8c", "#1f77b4"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def folder(run_dir: RunDir) -> Path:
    return run_dir.root / "plots"


def train_curves(history: list[dict[str, Any]], path: Path, title: str = "") -> Path | None:
    """The training curves; None when nothing was logged."""
    steps = [h for h in history if "loss" in h]  # per-step logs, not the final summary
    if not steps:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(2, 3, figsize=(13, 6.5), constrained_layout=True)
    for ax, (key, label, better) in zip(axes.flat, TRAIN_PANELS):
        points = [(h["step"], h[key]) for h in steps if isinstance(h.get(key), (int, float))]
        ax.set_title(f"{label}  ({better})", fontsize=10)
        ax.set_xlabel("step", fontsize=9)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        if not points:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="grey")
            continue
        xs, ys = zip(*points)
        ax.plot(xs, ys, marker="o" if len(xs) < 40 else None, markersize=3, color=ALIGNED_COLOUR)
        if key.startswith("rewards/") and key != "rewards/accuracies":
            ax.axhline(0, color="black", linewidth=0.8)
        if key == "rewards/accuracies":
            ax.set_ylim(-0.02, 1.05)
            ax.axhline(0.5, color="grey", linewidth=0.8, linestyle="--")
        if key == "learning_rate":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    fig.suptitle(f"DPO training curves{': ' + title if title else ''}", fontsize=12)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def before_after(ev: dict[str, Any], path: Path, title: str = "") -> Path:
    """Base against aligned on the held-out numbers."""
    plt = _pyplot()
    base, aligned = ev["base"], ev["aligned"]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.6), gridspec_kw={"width_ratios": [2.2, 1.4, 0.9]}, constrained_layout=True)

    def bars(ax, labels, b_vals, a_vals, fmt="{:.2f}"):
        xs = range(len(labels))
        w = 0.38
        for offset, vals, name, colour in ((-w / 2, b_vals, "base", BASE_COLOUR), (w / 2, a_vals, "aligned", ALIGNED_COLOUR)):
            heights = [v if v is not None else 0.0 for v in vals]
            rects = ax.bar([x + offset for x in xs], heights, w, label=name, color=colour)
            for rect, v in zip(rects, vals):
                text = "n/a" if v is None else fmt.format(v)
                y = rect.get_height()
                ax.annotate(text, (rect.get_x() + rect.get_width() / 2, y), xytext=(0, 3 if y >= 0 else -11),
                            textcoords="offset points", ha="center", fontsize=8)
        ax.set_xticks(list(xs))
        ax.set_xticklabels(labels, fontsize=9)
        ax.tick_params(axis="y", labelsize=8)
        ax.grid(axis="y", alpha=0.3)

    judge = ev.get("judge") or {}
    rate_keys = [("preference_accuracy", "preference\naccuracy"), ("behaviour", "behaviour"), ("reward_accuracy", "implicit-reward\naccuracy"), ("eos_rate", "eos rate")]
    labels = [label for _, label in rate_keys]
    b_vals = [base.get(k) for k, _ in rate_keys]
    a_vals = [aligned.get(k) for k, _ in rate_keys]
    b_vals[2] = None  # the implicit reward compares against the base itself
    if judge.get("win_rate") is not None:
        ci = judge.get("ci95") or [None, None]
        labels.append("judge win rate\n" + (f"95% CI {ci[0]:.2f}–{ci[1]:.2f}" if ci[0] is not None else ""))
        b_vals.append(round(1 - judge["win_rate"], 6))
        a_vals.append(judge["win_rate"])
    bars(axes[0], labels, b_vals, a_vals)
    axes[0].set_ylim(0, 1.15)
    axes[0].set_title("held-out rates (higher is better; eos rate ≈ 1)", fontsize=10)
    axes[0].legend(fontsize=8, loc="upper left")

    lp = [("mean_logp_chosen", "log p(chosen)"), ("mean_logp_rejected", "log p(rejected)"), ("mean_logp_margin", "margin")]
    bars(axes[1], [label for _, label in lp], [base.get(k) for k, _ in lp], [aligned.get(k) for k, _ in lp])
    axes[1].axhline(0, color="black", linewidth=0.8)
    axes[1].set_title("mean log-probabilities, nats (margin up)", fontsize=10)

    bars(axes[2], ["answer\ntokens"], [base.get("mean_generation_tokens")], [aligned.get("mean_generation_tokens")], fmt="{:.1f}")
    axes[2].set_title("greedy answer length", fontsize=10)
    axes[2].set_ylim(0, axes[2].get_ylim()[1] * 1.1)

    kl = aligned.get("kl_estimate")
    sub = f"{ev.get('n_pairs', '?')} held-out pairs, {ev.get('n_generations', '?')} generations; KL estimate {kl:.3g} nats/answer" if kl is not None else ""
    fig.suptitle(f"Base vs aligned{': ' + title if title else ''}\n{sub}", fontsize=11)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_all(run_dir: RunDir, title: str | None = None) -> list[Path]:
    """Every plot the run's metrics allow, into plots/; returns the files written."""
    title = title if title is not None else run_dir.load().get("recipe", "")
    made = []
    train = run_dir.metrics / "train.jsonl"
    if train.exists():
        history = [json.loads(line) for line in train.read_text().splitlines() if line.strip()]
        p = train_curves(history, folder(run_dir) / TRAIN_CURVES, title)
        if p:
            made.append(p)
    ev = run_dir.metrics / "eval.json"
    if ev.exists():
        made.append(before_after(json.loads(ev.read_text()), folder(run_dir) / BEFORE_AFTER, title))
    return made


def copy_into(run_dir: RunDir, target: Path) -> list[str]:
    """Copy plots/*.png into `target` (export's model folder), top level: publish uploads only top-level
    files. Makes the training curves first when the evaluate stage did not run. Returns the names copied."""
    if not (folder(run_dir) / TRAIN_CURVES).exists():
        write_all(run_dir)
    names = []
    for name in PLOTS:
        src = folder(run_dir) / name
        if src.exists():
            shutil.copy2(src, target / name)
            names.append(name)
    return names
