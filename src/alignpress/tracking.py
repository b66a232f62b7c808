"""Experiment tracking: train.report_to names transformers' trackers; TensorBoard is the default.

The default needs no account and no network: TensorBoard event files in <output>/tensorboard/
(`tensorboard --logdir outputs/NAME/tensorboard`), written by transformers' TensorBoardCallback
through the tensorboardX package. Any tracker the installed transformers knows
(transformers.integrations INTEGRATION_TO_CALLBACK: wandb, trackio, mlflow, comet_ml, ...) may be
named instead, or several as a list; "none" turns tracking off.

One tracked run per output folder: its id is SKYPILOT_TASK_ID on SkyPilot (the same across a
managed job's recoveries), else the folder's run id, and it is stored in run.json
(`tracking.run_id`) on first use, so a resumed or preempted run continues the same tracked run.
wandb gets it as WANDB_RUN_ID with WANDB_RESUME=allow, trackio as the run name with
resume="allow"; TensorBoard appends to the same folder. Settings the user exported (WANDB_*,
MLFLOW_*, TENSORBOARD_LOGGING_DIR) win. API keys stay in the environment (SkyPilot secrets): they
are never read, logged or written here.

After evaluate, the before/after numbers go to the same run: `eval/base/<metric>` and
`eval/aligned/<metric>` at the last training step (TensorBoard, wandb, trackio).

When the tracker shows the run at a public address, training records it in run.json
(`tracking.url`) and the model card links it: wandb's run page (an online run; offline runs have
none), the Hugging Face Space of a trackio run (TRACKIO_SPACE_ID, passed to transformers as
trackio_space_id), an MLflow run on an http(s) MLFLOW_TRACKING_URI. TensorBoard's event files stay
in the output folder and are not linked.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import urllib.parse
from pathlib import Path
from typing import Any

from .errors import AlignpressError
from .recipe import Recipe
from .runstate import RunDir

log = logging.getLogger("alignpress")

DEFAULT = "tensorboard"
PROJECT = "alignpress"  # wandb / trackio project unless WANDB_PROJECT says otherwise
# Trackers that need a package transformers checks for under another name.
AVAILABILITY = {"comet_ml": "is_comet_available", "flyte": "is_flyte_deck_standard_available", "azure_ml": "is_azureml_available"}
PACKAGES = {"tensorboard": "tensorboardX (or tensorboard)", "comet_ml": "comet_ml", "azure_ml": "azureml-core", "flyte": "flytekitplugins-deck-standard"}


def known() -> list[str]:
    """Tracker names the installed transformers supports: the keys of its INTEGRATION_TO_CALLBACK.

    Read from the installed source rather than imported: importing integration_utils loads torch
    and takes seconds, and `validate` must stay quick and load nothing heavy.
    """
    import ast
    import importlib.util

    spec = importlib.util.find_spec("transformers")
    source = Path(spec.origin).parent / "integrations" / "integration_utils.py" if spec and spec.origin else None
    try:
        for node in ast.parse(source.read_text()).body:  # type: ignore[union-attr]
            if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "INTEGRATION_TO_CALLBACK" for t in node.targets):
                return sorted(k.value for k in node.value.keys if isinstance(k, ast.Constant))  # type: ignore[attr-defined]
    except (OSError, SyntaxError, AttributeError):
        pass
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    return sorted(INTEGRATION_TO_CALLBACK)


def names(recipe: Recipe) -> list[str]:
    value = recipe.train.report_to
    listed = [value] if isinstance(value, str) else list(value)
    return [n for n in listed if n != "none"]


def validate(recipe: Recipe, fail) -> None:
    """Unknown names fail at the door (called from recipe.validate; loads no model)."""
    value = recipe.train.report_to
    listed = [value] if isinstance(value, str) else list(value)
    if "none" in listed and len(listed) > 1:
        fail("train.report_to", "'none' cannot be combined with trackers")
    if not listed:
        fail("train.report_to", "name a tracker or 'none'")
    choices = known()
    for n in listed:
        if n != "none" and n not in choices:
            fail("train.report_to", f"unknown tracker {n!r}; the installed transformers supports: none, {', '.join(choices)}")


def check_installed(recipe: Recipe) -> None:
    """Before anything runs: each tracker's package is importable."""
    from transformers import integrations

    for n in names(recipe):
        check = getattr(integrations, AVAILABILITY.get(n, f"is_{n}_available"), None)
        if check is not None and not check():
            raise AlignpressError(
                f"tracker {n!r} needs the {PACKAGES.get(n, n)} package, which is not installed: install it, "
                "or choose another tracker (none turns tracking off)",
                source=recipe.source,
                field="train.report_to",
            )


def run_id(run_dir: RunDir) -> str:
    """The tracked run's id: fixed in run.json on first use."""
    m = run_dir.load()
    known_id = (m.get("tracking") or {}).get("run_id")
    if known_id:
        return known_id
    sky = os.environ.get("SKYPILOT_TASK_ID")
    # wandb run ids allow letters, digits, '-' and '_' only.
    # A folder without run.json (the benchmark harness's scratch folders) is named by its folder.
    rid = re.sub(r"[^A-Za-z0-9_-]+", "-", sky).strip("-")[:120] if sky else m.get("run_id") or run_dir.root.name
    return rid


def tensorboard_dir(run_dir: RunDir) -> str:
    return os.environ.get("TENSORBOARD_LOGGING_DIR") or str(run_dir.root / "tensorboard")


def setup(recipe: Recipe, run_dir: RunDir) -> dict[str, Any]:
    """Environment for the trackers and DPOConfig fields (report_to, run_name, project)."""
    chosen = names(recipe)
    if not chosen:
        return {"report_to": "none"}
    rid = run_id(run_dir)
    record = {"report_to": chosen, "run_id": rid}
    if "tensorboard" in chosen:
        os.environ["TENSORBOARD_LOGGING_DIR"] = record["tensorboard_dir"] = tensorboard_dir(run_dir)
    if "wandb" in chosen:
        os.environ.setdefault("WANDB_PROJECT", PROJECT)
        os.environ.setdefault("WANDB_RUN_ID", rid)
        os.environ.setdefault("WANDB_RESUME", "allow")
        os.environ.setdefault("WANDB_DIR", str(run_dir.root))
    if "mlflow" in chosen:
        os.environ.setdefault("MLFLOW_TRACKING_URI", (run_dir.root / "mlruns").resolve().as_uri())
        os.environ.setdefault("MLFLOW_RUN_NAME", rid)
    if run_dir.writer and run_dir.manifest_path.exists():
        run_dir.update(tracking=record)
    log.info("tracking: %s, run %s%s", ", ".join(chosen), rid,
             f" (tensorboard --logdir {record['tensorboard_dir']})" if "tensorboard_dir" in record else "")
    fields = {"report_to": chosen, "run_name": rid, "project": os.environ.get("WANDB_PROJECT", PROJECT)}
    if "trackio" in chosen and os.environ.get("TRACKIO_SPACE_ID"):
        fields["trackio_space_id"] = os.environ["TRACKIO_SPACE_ID"]
    return fields


def public_url(chosen: list[str], modules: dict[str, Any] | None = None) -> str | None:
    """The address where the live tracked run can be seen, if a chosen tracker gives one.

    `modules`: the trackers' imported modules (default: sys.modules), read after transformers'
    integration callbacks have started the run.
    """
    mods = sys.modules if modules is None else modules
    if "wandb" in chosen and mods.get("wandb") is not None:
        run = getattr(mods["wandb"], "run", None)
        url = getattr(run, "url", None) if run is not None else None
        if isinstance(url, str) and url.startswith("https://"):
            return url
    if "trackio" in chosen and mods.get("trackio") is not None:
        space = None
        context = getattr(mods["trackio"], "context_vars", None)
        if context is not None and hasattr(context, "current_space_id"):
            space = context.current_space_id.get()
        space = space or os.environ.get("TRACKIO_SPACE_ID")
        if space:
            return f"https://huggingface.co/spaces/{space}"
    if "mlflow" in chosen and mods.get("mlflow") is not None:
        uri = os.environ.get("MLFLOW_TRACKING_URI", "")
        active = mods["mlflow"].active_run()
        if uri.startswith(("http://", "https://")) and active is not None:
            # Without the user:password an address may carry: it goes to run.json and the model card.
            uri = urllib.parse.urlsplit(uri)._replace(netloc=urllib.parse.urlsplit(uri).netloc.rpartition("@")[2]).geturl()
            return f"{uri.rstrip('/')}/#/experiments/{active.info.experiment_id}/runs/{active.info.run_id}"
    return None


def link_callback(recipe: Recipe, run_dir: RunDir):
    """A TrainerCallback that records public_url() in run.json once the trackers have started."""
    from transformers import TrainerCallback

    chosen = names(recipe)

    class TrackerLink(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            url = public_url(chosen) if chosen else None
            if url and state.is_world_process_zero and run_dir.writer:
                record = dict(run_dir.load().get("tracking") or {})
                if record.get("url") != url:
                    run_dir.update(tracking=record | {"url": url})
                log.info("tracking: the run is at %s", url)

    return TrackerLink()


def log_eval(recipe: Recipe, run_dir: RunDir) -> None:
    """The before/after numbers of metrics/eval.json into the tracked run."""
    chosen = names(recipe)
    path = run_dir.metrics / "eval.json"
    if not chosen or not path.exists():
        return
    ev = json.loads(path.read_text())
    step = int(run_dir.load().get("stages", {}).get("train", {}).get("global_step") or 0)
    scalars = {f"eval/{side}/{k}": float(v) for side in ("base", "aligned") for k, v in ev[side].items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if ev.get("judge"):
        scalars["eval/judge/win_rate"] = float(ev["judge"]["win_rate"])
    rid = run_id(run_dir)
    for n in chosen:
        try:
            if n == "tensorboard":
                _tensorboard(tensorboard_dir(run_dir), scalars, step)
            elif n in ("wandb", "trackio"):
                _wandb_like(n, rid, scalars, step)
            else:
                log.info("tracking: %s gets the training metrics only; the evaluation is in %s", n, path)
        except Exception as e:  # noqa: BLE001 - a tracker's failure must not fail a finished evaluation
            log.warning("tracking: could not send the evaluation to %s: %s: %s", n, type(e).__name__, str(e).splitlines()[0] if str(e) else "")


def _tensorboard(logdir: str, scalars: dict[str, float], step: int) -> None:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        from tensorboardX import SummaryWriter

    writer = SummaryWriter(log_dir=logdir)
    for tag, value in scalars.items():
        writer.add_scalar(tag, value, step)
    writer.close()


def _wandb_like(name: str, rid: str, scalars: dict[str, float], step: int) -> None:
    import importlib

    mod = importlib.import_module(name)
    if name == "wandb":
        mod.init(project=os.environ.get("WANDB_PROJECT", PROJECT), id=os.environ.get("WANDB_RUN_ID", rid), resume="allow")
    else:
        mod.init(project=PROJECT, name=rid, resume="allow")
    mod.log(scalars, step=step)
    mod.finish()
