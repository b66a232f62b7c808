"""Command line: `entrypoint.py COMMAND RECIPE [--set key=value ...] [--output-dir DIR]`.

`run` runs every stage in order, skipping the ones run.json marks done; a stage command runs
that stage alone, reading what the earlier stages wrote. `validate` loads no weights (the
model's shape is checked on the meta device).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import shutil
import signal
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import yaml

from . import inputs, plan, processes
from .errors import AlignpressError, redact
from .lock import FolderLock
from .recipe import RUN_ONLY_TRAIN, Recipe, changed_fields, chat_template_file, chat_template_sha256, describe, dump, load_recipe, unused_settings
from .runstate import STAGES, RunDir, default_output_dir, disk_full, duration_text, write_text

log = logging.getLogger("alignpress")

# The folder where each relaunched process leaves its exit code and error line for the command the user typed.
EXIT_DIR = "ALIGNPRESS_EXIT_DIR"
NEEDS = {"train": "prepare", "evaluate": "train", "export": "train", "publish": "export"}


class _OneLineParser(argparse.ArgumentParser):
    """argparse's refusals as alignpress's own: one line on stderr, `error: ...` naming the argument,
    exit 2, and where the usage is (argparse printed its whole usage block first). Subparsers are
    made with this class too (add_subparsers passes it on); --help is unchanged."""

    hint = ""

    def parse_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        self.hint = _command_hint(args)
        # Unknown arguments after a command come back to the top parser: name the command in the hint.
        parsed, extra = self.parse_known_args(args, namespace)
        if extra:
            self._fail(f"unrecognized arguments: {' '.join(extra)}", getattr(parsed, "command", None))
        return parsed

    def error(self, message):
        command = self.prog.partition(" ")[2]
        self._fail(message + (self.hint if not command and message.startswith("argument command: invalid choice") else ""), command)

    def _fail(self, message: str, command: str | None):
        self.exit(2, f"error: {message}; see `entrypoint.py {command + ' ' if command else ''}--help`\n")


# What a first word that is not a command was probably meant as. In the image, alignpress is the
# entrypoint: `docker run IMAGE bash` reaches here as the command `bash`.
PROGRAMS = {"bash", "sh", "python", "python3", "pip", "nvidia-smi", "accelerate", "huggingface-cli", "hf"}


def _command_hint(args: list[str]) -> str:
    first = next((a for a in args if not a.startswith("-")), None)
    if first is None:
        return ""
    if first.endswith((".yaml", ".yml")) or Path(first).is_file():
        return f"; to run every stage of a recipe: `entrypoint.py run {first}`"
    if first in PROGRAMS:
        return (f"; this is alignpress's command line (in the image it is the entrypoint, so `docker run IMAGE {first}` "
                f"arrives here); to run {first} in the image instead: docker run -it --entrypoint {first} IMAGE ...")
    return ""


# `--help` ends with the commands a first use needs (the image's entrypoint takes the same arguments:
# docker run IMAGE run RECIPE ...); README.md has the rest.
EXAMPLES = """examples:
  python entrypoint.py run recipes/demo.yaml           # the whole job offline on the CPU, in minutes
  python entrypoint.py validate RECIPE --hub           # the recipe, its data and the Hub, before renting a GPU
  python entrypoint.py prepare RECIPE                  # the data alone (no GPU), then:
  python entrypoint.py plan RECIPE                     # time and cost on each GPU
  python entrypoint.py run RECIPE --set publish.repo_id=YOU/NAME    # align and push (HF_TOKEN set)
  python entrypoint.py COMMAND --help                  # a command's own options

In the Docker image the same arguments follow the image's name: docker run --gpus all ... IMAGE run RECIPE.
Bad input exits 2 with one line naming the file and field; README.md has the rest."""


def _parser() -> argparse.ArgumentParser:
    from .version import version

    p = _OneLineParser(prog="alignpress", description="Align a chat model with DPO and publish it.", epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"alignpress {version()}")
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_ in [
        ("run", "run every stage (skips finished ones, resumes training)"),
        ("validate", "check the recipe (with TRL's and transformers' own rules) and print it resolved; loads no weights"),
        *[(s, f"run the {s} stage alone") for s in STAGES],
    ]:
        sp = sub.add_parser(name, help=help_)
        sp.add_argument("recipe", help="recipe YAML file")
        sp.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a recipe field (dotted path), e.g. --set dpo.beta=0.2")
        if name == "validate":
            sp.add_argument("--hub", action="store_true", help="also ask the Hub what `run` asks before prepare: the base model's and the judge's "
                            "configs (found, readable with your token, then the model checks), each Hub dataset (found, readable; its splits, slices and "
                            "columns where its card states them) and, when the recipe publishes, the token, namespace, an existing repo and the card's "
                            "metadata: before launching a cloud job. Needs network and HF_TOKEN; downloads no weights or data")
        else:
            sp.add_argument("--output-dir", help="output folder (default outputs/<recipe name>)")
            sp.add_argument("--restart", action="store_true", help="redo this stage (run: every stage) from scratch, training without resuming; later stages run again. Old results stay until replaced")
    sub.add_parser("schema", help="print every recipe field with its type, default and meaning")
    plan.add_parser(sub)
    return p


# Sections whose change only re-runs later stages (the earliest stage each one affects).
RERUN_FROM = {"eval": "evaluate", "export": "export", "card": "export", "description": "export", "publish": "publish"}
GATE_FIELDS = {"eval.gate_min_gain", "eval.gate_max_kl"}
# Sections that reach only the exported card: a finished export gets its cards written again, not a new merge.
CARD_ONLY = {"card", "description"}


def _first_stage(section: str) -> str:
    """The earliest stage a recipe section feeds."""
    return "prepare" if section in ("name", "model", "data") else RERUN_FROM.get(section, "train")


def _no_change() -> None:
    return None


_no_change.redo_from = None  # type: ignore[attr-defined]


def _check_same_recipe(recipe: Recipe, run_dir: RunDir, restart_from: str | None = None, command: str = "run") -> Callable[[], None]:
    """Refuse to mix two recipes in one output folder. Returns what the change does to the folder
    (stages pending again, a new run id, cards written again), to be applied once every other door
    check passed: a refused command changes nothing.

    The prepared data depends on `name`, `model` and `data`: those may never change. Training
    settings may change until training has started (checkpoints or a trained stage exist).
    `eval`, `export`, `card` and `publish` may always change: the stages they feed run again.
    With `--restart` from a stage, sections that only feed that stage or later ones may change.
    """
    path = run_dir.root / "recipe.resolved.yaml"
    if not path.exists():
        return _no_change
    new = recipe.to_dict()
    fields = changed_fields(yaml.safe_load(path.read_text()) or {}, new)
    changed = text_changed = sorted({f.split(".")[0] for f in fields})
    template_changed = run_dir.load().get("chat_template_sha256") not in (None, chat_template_sha256(recipe))
    if template_changed and "model" not in changed:
        # The recipe text is the same but the template file it names was edited: the prepared
        # data, and the tokenizer later stages save with the model, used the old template.
        changed = sorted(changed + ["model"])
    # A checkpoint, not an empty folder (a kill before the first save): training has started
    trained = any(run_dir.checkpoints.glob("checkpoint-*")) or any(run_dir.is_done(s) for s in STAGES[1:-1])
    redone = STAGES[STAGES.index(restart_from):] if restart_from else ()
    # Settings of how training runs, not of what it computes, may change when it resumes.
    computes = [f for f in fields if f.startswith("train.") and f.split(".")[1] not in RUN_ONLY_TRAIN]
    blocking = [k for k in changed if _first_stage(k) not in redone and (k in ("name", "model", "data") or (trained and k not in RERUN_FROM))
                and (k != "train" or computes)]
    if blocking:
        first = min((_first_stage(k) for k in blocking), key=STAGES.index)
        again = "run --restart" if first == "prepare" else f"{first} --restart"
        what = []
        for k in blocking:
            if k == "model" and template_changed and k not in text_changed:
                used = run_dir.model / "chat_template.jinja"
                kept = f"; the copy this folder's run used is {used}" if used.is_file() else ""
                what.append(f"model.chat_template (the file {chat_template_file(recipe)} was edited{kept})")
            else:
                named = [f for f in (computes if k == "train" else fields) if f.split(".")[0] == k]
                what += named[:4] + ([f"{len(named) - 4} more {k} fields"] if len(named) > 4 else [])
        raise AlignpressError(
            f"this folder holds a run of a different recipe ({', '.join(what)} {'differs' if len(what) == 1 else 'differ'}); "
            f"use another --output-dir (on SkyPilot: another --env RUN_NAME), or `{again}` to redo it here",
            source=str(path),
        )
    # A new gate threshold alone needs no new evaluation: the verdict is made again on metrics/eval.json
    # (below). It and the card sections reach only the exported card, which is written again (below):
    # publish, which pushes the card, runs again; the merge is not redone.
    gate_only = "eval" in changed and all(f in GATE_FIELDS for f in fields if f.split(".")[0] == "eval")
    card_only = {"eval"} if gate_only and run_dir.is_done("evaluate") else set()
    if run_dir.is_done("export"):
        card_only |= CARD_ONLY
    feeds = {**RERUN_FROM, **{k: "publish" for k in card_only}}
    rerun = [feeds[k] for k in changed if k in feeds and run_dir.is_done(feeds[k])]
    if rerun and command != "run" and STAGES.index(min(rerun, key=STAGES.index)) < STAGES.index(command):
        # A stage command redoes its own stage only: marking the earlier ones pending would throw
        # away finished results the command does not redo (`publish` with a new eval gate used to
        # mark evaluate and export pending, then stop because export was not done).
        first = min(rerun, key=STAGES.index)
        earlier = [k for k in changed if k in feeds and STAGES.index(feeds[k]) < STAGES.index(command) and run_dir.is_done(feeds[k])]
        raise AlignpressError(
            f"recipe sections {', '.join(earlier)} changed since the {first} stage ran, and `{command}` "
            f"does not redo it: run `{first}` first, or `run` (it redoes {first} and the stages after it)",
            source=str(path),
        )

    def apply() -> None:
        # Nothing is written again for a stage --restart redoes: a killed restart would leave it changed
        if gate_only and run_dir.writer and run_dir.is_done("evaluate") and "evaluate" not in redone:
            from .evaluate import rejudge

            rejudge(recipe, run_dir)
        if run_dir.writer and run_dir.is_done("export") and any(k in card_only for k in changed) and "export" not in redone:
            from .card import write_again

            write_again(recipe, run_dir)
        if rerun and run_dir.writer:
            first = min(rerun, key=STAGES.index)
            log.info("recipe sections %s changed: stages from %s on will run again", ", ".join(changed), first)
            if "export" in changed and run_dir.is_done("export") and not restart_from:  # --restart gives its own
                # Other weights (export.dtype, say) are a new model: a new run, with its own Hub tag, as after
                # `export --restart`; under the old id the push was refused after the merge (the tag names other files)
                log.info("export changed: run %s (was %s)", run_dir.new_run_id(), run_dir.load()["previous_run_ids"][0])
            run_dir.invalidate_from(first)
        elif changed and redone and all(_first_stage(k) in redone for k in changed):
            log.info("recipe sections %s changed: --restart redoes the stages that use them", ", ".join(changed))
        elif changed:
            log.info("recipe sections %s changed before the stages that use them ran", ", ".join(changed))

    apply.redo_from = min(rerun, key=STAGES.index) if rerun and run_dir.writer else None  # type: ignore[attr-defined]
    return apply


def weights_problem(folder: Path) -> str | None:
    """A weights file cut short or damaged since it was written (a copy that stopped, a full disk), or
    a shard the index names that is not there: from the safetensors headers alone, no tensor read."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
            return f"{index} cannot be read ({type(e).__name__})"
        if gone := [s for s in shards if not (folder / s).is_file()]:
            return f"{folder / gone[0]} is missing (named in {index.name})"
    for path in sorted(folder.glob("*.safetensors")):
        size = path.stat().st_size
        try:
            with path.open("rb") as f:
                n = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(n)) if 8 + n <= size else None
        except (OSError, ValueError, UnicodeDecodeError):
            header = None
        ends = [t["data_offsets"][1] for k, t in (header or {}).items() if k != "__metadata__" and isinstance(t, dict) and "data_offsets" in t]
        if header is None or 8 + n + max(ends, default=0) != size:
            return f"{path} is cut short or damaged ({size:,} bytes; its header does not describe them)"
    return None


# One of these holds a saved tokenizer's vocabulary (fast, SentencePiece, BPE / WordPiece tokenizers)
TOKENIZER_VOCAB_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")


def _data_fingerprint(run_dir: RunDir) -> str:
    """prepare's fingerprint of the prepared data (sha256 of train.jsonl, a zero byte, eval.jsonl), read in chunks."""
    import hashlib

    h = hashlib.sha256()
    for i, name in enumerate(("train.jsonl", "eval.jsonl")):
        if i:
            h.update(b"\0")
        with open(run_dir.data / name, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()


def _missing_output(name: str, recipe: Recipe, run_dir: RunDir) -> str | None:
    """What is missing or unreadable of a finished stage's result, or None."""
    if name == "prepare":
        needed = [run_dir.data / "train.jsonl", run_dir.data / "eval.jsonl", run_dir.data / "stats.json"]
        recorded = run_dir.load().get("data_fingerprint")
        if recorded and all(p.is_file() for p in needed) and _data_fingerprint(run_dir) != recorded:
            # cut short or edited since prepare wrote them: training would take them as they are
            return f"{run_dir.data}/train.jsonl or eval.jsonl changed since prepare wrote them (sha256 differs from run.json data_fingerprint)"
    elif name == "train":
        folder = run_dir.adapter if recipe.lora.enabled else run_dir.full
        needed = [folder / ("adapter_config.json" if recipe.lora.enabled else "config.json")]
        if folder.is_dir() and not any(folder.glob("*.safetensors")):
            return f"{folder} has no weights (*.safetensors)"
        if cut := weights_problem(folder):
            return cut
    elif name == "evaluate":
        if not recipe.eval.enabled or run_dir.load().get("stages", {}).get("evaluate", {}).get("skipped"):
            return None
        needed = [run_dir.metrics / "eval.json"]
        if needed[0].is_file():
            try:
                ev = json.loads(needed[0].read_text())
            except (ValueError, UnicodeDecodeError) as e:
                return f"{needed[0]} cannot be read ({type(e).__name__})"
            if not isinstance(ev, dict) or not all(k in ev for k in ("n_pairs", "base", "aligned")):
                return f"{needed[0]} holds no evaluation (no n_pairs, base and aligned)"
    elif name == "export":
        # the card's usage loads the tokenizer from the repo: a model pushed without one is no use
        needed = [run_dir.model / "config.json", run_dir.model / "README.md", run_dir.model / "tokenizer_config.json"]
        if run_dir.model.is_dir() and not any((run_dir.model / n).is_file() for n in TOKENIZER_VOCAB_FILES):
            return f"{run_dir.model} has no tokenizer vocabulary ({', '.join(TOKENIZER_VOCAB_FILES)})"
        if run_dir.model.is_dir() and not any(run_dir.model.glob("*.safetensors")):
            return f"{run_dir.model} has no weights (*.safetensors)"
        if cut := weights_problem(run_dir.model):
            return cut
    else:
        return None
    gone = [str(p) for p in needed if not p.is_file()]
    return f"{', '.join(gone)} {'is' if len(gone) == 1 else 'are'} missing" if gone else None


def _recheck_outputs(recipe: Recipe, run_dir: RunDir, command: str) -> dict[str, str]:
    """A stage run.json calls done whose result was deleted or cut short since is pending again, so
    `run` redoes it (training resumes from its newest checkpoint) instead of skipping it and failing
    later, or reporting a model that is not there. Nothing is deleted; its later stages run again
    once it is done, as after any stage."""
    if not run_dir.writer or not run_dir.manifest_path.exists():
        return {}
    found = {}
    for name in STAGES:
        if run_dir.is_done(name) and (missing := _missing_output(name, recipe, run_dir)):
            log.warning("%s is marked done, but %s: it runs again", name, missing)
            run_dir.set_stage(name, status="pending")
            found[name] = missing
    if command != "run" and (earlier := [n for n in found if STAGES.index(n) < STAGES.index(command)]):
        raise AlignpressError(f"stage {command} needs the result of {earlier[0]}, but {found[earlier[0]]}: run `{earlier[0]}` "
                              f"(or `run`, which redoes it)", source=str(run_dir.root))
    return found


def _published_as_is(recipe: Recipe, run_dir: RunDir) -> bool:
    """The folder's run of this very recipe is published: a `run` has nothing to push, so it need not ask
    the Hub. Any change to the recipe may lead to a push (a new card, model or numbers): the Hub is asked
    before the stages before publish run again."""
    resolved = run_dir.root / "recipe.resolved.yaml"
    return run_dir.is_done("publish") and resolved.is_file() and resolved.read_text() == dump(recipe)


def _check_checkpoint_stamp(recipe: Recipe, run_dir: RunDir) -> None:
    """Before prepare: the newest checkpoint a training would resume from was made by this recipe."""
    if run_dir.is_done("train"):
        return
    from .train import latest_checkpoint, refuse_foreign_checkpoint

    if (newest := latest_checkpoint(run_dir.checkpoints)) is not None:
        refuse_foreign_checkpoint(newest, recipe)
        from .modeling import planned_processes
        from .train import refuse_other_processes

        refuse_other_processes(newest, recipe, planned_processes(recipe))


def _restart(run_dir: RunDir, first: str) -> None:
    """Mark `first` and later stages pending; nothing finished is deleted here. Each stage replaces
    its own folder when it finishes (NAME.partial swapped in). Training must not resume, so its
    checkpoints and step log move aside to NAME.previous, dropped once the new training is done."""
    if not run_dir.manifest_path.exists():
        if STAGES.index(first) <= STAGES.index("train") and run_dir.checkpoints.exists():
            run_dir.set_aside(run_dir.checkpoints)  # checkpoints without the folder's records: not resumed
        return
    log.info("--restart: stages from %s on will run again; finished results stay until replaced", first)
    if STAGES.index(first) <= STAGES.index("export"):
        # A new model, card or numbers: a new run (its own Hub tag and tracked run)
        log.info("--restart: run %s (was %s)", run_dir.new_run_id(), run_dir.load()["previous_run_ids"][0])
    run_dir.invalidate_from(first)
    if STAGES.index(first) <= STAGES.index("train"):
        run_dir.set_aside(run_dir.checkpoints)
        run_dir.set_aside(run_dir.metrics / "train.jsonl")


def _before_restart(run_dir: RunDir) -> dict | None:
    """The folder's records as `--restart` finds them: run.json and the resolved recipe."""
    if not run_dir.manifest_path.exists():
        return None
    recipe_path = run_dir.root / "recipe.resolved.yaml"
    return {"manifest": run_dir.load(), "recipe": recipe_path.read_text() if recipe_path.exists() else None, "started": time.time()}


def _results(run_dir: RunDir, stage: str) -> list[Path]:
    """What each stage writes in place of its earlier result (train's checkpoints are looked at apart)."""
    return {
        "prepare": [run_dir.data],
        "train": [run_dir.adapter, run_dir.full],
        "evaluate": [run_dir.metrics / "eval.json", run_dir.metrics / "report.md"],
        "export": [run_dir.model, run_dir.adapter / "README.md"],
        "publish": [],
    }[stage]


def _put_back(run_dir: RunDir, before: dict, stages: list[str]) -> None:
    """`stages`' records as they were before --restart, with the checkpoints and step log it set aside."""
    m = run_dir.load()
    for s in stages:
        if s in before["manifest"].get("stages", {}):
            m.setdefault("stages", {})[s] = before["manifest"]["stages"][s]
    run_dir.save(m)
    for path in (run_dir.checkpoints, run_dir.metrics / "train.jsonl"):
        aside = path.with_name(path.name + ".previous")
        if aside.exists():
            if path.is_dir():
                import shutil

                shutil.rmtree(path)  # empty of checkpoints: _undo_restart checked
            os.replace(aside, path)


def _undo_restart(run_dir: RunDir, before: dict, first: str) -> bool:
    """A --restart whose first stage failed before it replaced anything (a refusal in prepare, a
    model that does not load) leaves the folder as it found it: its records, resolved recipe,
    checkpoints and step log. Not when a stage from `first` on finished, or new checkpoints exist
    (a restarted training that got that far resumes from them)."""
    redone = STAGES[STAGES.index(first):]
    try:
        retrained = STAGES.index(first) <= STAGES.index("train") and any(run_dir.checkpoints.glob("checkpoint-*"))
        if any(run_dir.is_done(s) for s in redone) or retrained:
            return False
        # A result written before the stage was marked done (eval.json, then the kill): the records stay
        # as the restart left them, its stages pending, so that nothing trusts the old records with it
        replaced = [p for s in redone for p in _results(run_dir, s) if p.exists() and p.stat().st_mtime >= before["started"]]
        if replaced:
            log.info("--restart replaced %s before it stopped: its stages stay pending", ", ".join(map(str, replaced)))
            return False
        _put_back(run_dir, before, redone)
        run_dir.save(before["manifest"])  # all of it: nothing the failed attempt recorded stands
        if before["recipe"] is not None:
            write_text(run_dir.root / "recipe.resolved.yaml", before["recipe"])
    except (OSError, AlignpressError) as e:  # the first error is the one to report
        log.warning("could not put %s back as --restart found it: %s", run_dir.root, e)
        return False
    log.info("--restart failed before it replaced any result: %s is as it was (run.json, recipe.resolved.yaml, checkpoints)", run_dir.root)
    return True


def _run_stage(name: str, recipe: Recipe, run_dir: RunDir) -> None:
    from . import evaluate, export, prepare, publish, train

    if name != "prepare" and NEEDS.get(name):
        # Training runs on every process; the other stages on the main one only (no collective there).
        status = processes.from_main(lambda: run_dir.status(NEEDS[name])) if name == "train" else run_dir.status(NEEDS[name])
        if status != "done":
            raise AlignpressError(f"stage {name} needs {NEEDS[name]} to be done first (run.json says {status})", source=str(run_dir.manifest_path))
    if name == "evaluate" and not recipe.eval.enabled:
        run_dir.set_stage(name, status="done", skipped="eval.enabled is false")
        return
    started = time.time()
    old_fingerprint = run_dir.load().get("data_fingerprint")
    run_dir.current_stage = name
    log.info("== %s", name)
    with run_dir.stage(name) as info:
        if name == "prepare":
            from .modeling import base_model_revision, load_tokenizer, resolve_model_path

            path = resolve_model_path(recipe)
            out = prepare.run(recipe, run_dir, load_tokenizer(recipe, path))
            run_dir.update(data_fingerprint=out["fingerprint"], base_model={"id": recipe.model.name_or_path, "path": path, "revision": base_model_revision(recipe, path)})
            inputs.record(recipe, run_dir, path)
        elif name == "train":
            out = train.run(recipe, run_dir)
        elif name == "evaluate":
            out = evaluate.run(recipe, run_dir)
            from . import tracking

            tracking.log_eval(recipe, run_dir)
        elif name == "export":
            out = export.run(recipe, run_dir)
        else:
            out = publish.run(recipe, run_dir)
        info.update(out)
    if name == "train" and run_dir.writer:
        # The new training replaced what --restart set aside.
        run_dir.drop_aside(run_dir.checkpoints)
        run_dir.drop_aside(run_dir.metrics / "train.jsonl")
    if run_dir.writer:
        _after_stage(name, run_dir, old_fingerprint)
    log.info("== %s done in %s", name, duration_text(time.time() - started))


def _after_stage(name: str, run_dir: RunDir, old_fingerprint: str | None) -> None:
    """A stage that finished replaced its result: the later stages are pending again. Only now, so
    that a stage that fails keeps the later stages' finished results and their records.

    Prepared data that did not change (the same fingerprint) leaves the later stages as they are.
    Data that did change makes the checkpoints stale: they move aside (checkpoints.previous, dropped
    when the new training is done), so training starts over instead of resuming on other data."""
    later = STAGES[STAGES.index(name) + 1 :]
    if not later:
        return
    if name == "prepare" and old_fingerprint is not None:
        new_fingerprint = run_dir.load().get("data_fingerprint")
        if new_fingerprint == old_fingerprint:
            stay = ": later stages stay as they are" if run_dir.is_done(later[0]) else ""
            log.info("prepared data unchanged (fingerprint %s)%s", new_fingerprint[:12], stay)
            return
        m = run_dir.load()
        kept = m.get("later_stages_of_data") or {}
        if kept.get("fingerprint") == new_fingerprint and not any(run_dir.is_done(s) for s in later):
            # The data is back to what the later stages were made from (an edit undone), and nothing
            # replaced their results since: they stand, with the checkpoints set aside for the edit.
            # Checkpoints of an unfinished training on the edited data are of data no longer prepared.
            if any(run_dir.checkpoints.glob("checkpoint-*")):
                import shutil

                log.info("dropping %s: an unfinished training on the edited data", run_dir.checkpoints)
                shutil.rmtree(run_dir.checkpoints)
            _put_back(run_dir, {"manifest": {"stages": kept["stages"]}}, list(later))
            run_dir.update(later_stages_of_data=None)
            log.info("prepared data is again the data of the later stages' results (fingerprint %s): they stand", new_fingerprint[:12])
            return
        if any(run_dir.is_done(s) for s in later) or run_dir.checkpoints.exists():
            # Kept so that undoing the edit (prepare again on the old data) gets them back.
            run_dir.update(later_stages_of_data={"fingerprint": old_fingerprint, "stages": {s: m.get("stages", {}).get(s, {}) for s in later}})
        if run_dir.checkpoints.exists():
            log.info("prepared data changed: the checkpoints of the old data move to %s.previous; training starts over", run_dir.checkpoints)
            run_dir.set_aside(run_dir.checkpoints)
            run_dir.set_aside(run_dir.metrics / "train.jsonl")
    run_dir.invalidate_from(later[0])


def _relaunch(recipe: Recipe, argv: list[str]) -> int:
    """Run this same command under `accelerate launch` with the recipe's config."""
    import subprocess

    from .recipe import accelerate_config_path

    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(accelerate_config_path(recipe))]
    if recipe.train.num_processes:
        cmd += ["--num_processes", str(recipe.train.num_processes)]
    cmd += [str(Path(__file__).resolve().parents[2] / "entrypoint.py"), *argv]
    log.info("relaunching under accelerate: %s", " ".join(cmd))
    # The marker stops the child from relaunching itself (a 1-process launch sets WORLD_SIZE=1).
    # The launcher and its workers get a process group of their own, and the signals this process
    # receives go to all of them: a SIGTERM (`docker stop`, a preemption) used to stop this process
    # alone, leaving the workers training on with no checkpoint asked for, and the folder's lock free.
    child = None

    def forward(signum, frame):
        try:
            if child is not None:
                os.killpg(child.pid, signum)
        except ProcessLookupError:
            pass

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    exits = Path(tempfile.mkdtemp(prefix="alignpress-exit-"))
    try:
        child = subprocess.Popen(cmd, env=dict(os.environ, ALIGNPRESS_LAUNCHED="1", **{EXIT_DIR: str(exits)}), start_new_session=True)
        code = child.wait()
        if code != 0:
            raise launched_failure(exits, code)
        return 0
    finally:
        shutil.rmtree(exits, ignore_errors=True)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class LaunchedFailure(AlignpressError):
    """The relaunched processes failed; raised by the command the user typed, so that its own
    cleanup (a --restart put back) comes first and `main` says the line last (`_fail`)."""

    def __init__(self, line: str, code: int, again_prefix: str | None = None):
        super().__init__(line.removeprefix("error: "))
        self.exit_code = code
        self.again_prefix = again_prefix  # an interruption: its advice is made again here (_again)


def launched_failure(exits: Path, code: int) -> LaunchedFailure:
    """What the relaunched processes' records (`_fail`, `_started`) say failed. The launcher says 1
    for every failure (a refusal, a failed check, a signal) and ends on torch's report.
    - A process that started and left no exit record was killed without a word (SIGKILL: the
      out-of-memory killer); the others' errors follow from it (a lost connection), so it is named
      first, with the launcher's code.
    - Else the first failure by time, its own code: a process that fails stops the others (torch's
      agent sends them SIGTERM: they save a checkpoint and say so), and the main process's error,
      said again by the others (`processes.on_main`), is not theirs. A signal's line only when no
      other failure is there (a preemption stops them all).
    - Only copies of the main process's error: a node without the main process (sky/run.sh, via
      `python -m alignpress.node_exit`) says that copy, with the main process's code."""
    records = []
    for path in exits.glob("*.json"):
        try:
            records.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue  # written as the process was killed
    failed = [r for r in records if r.get("code") and not r.get("echo")] or [r for r in records if r.get("code")]
    killed = sorted((r["rank"] for r in records if "code" not in r), key=int)
    if killed:
        who = f"process {killed[0]}" if len(killed) == 1 else f"processes {', '.join(killed)}"
        first = min(failed, key=lambda r: r["time"])["line"].removeprefix("error: ") if failed else None
        return LaunchedFailure(f"{who} launched under accelerate ended without an error line (killed: SIGKILL, out of host memory?); "
                               + (f"the first error line of the others: {first}" if first else "torch's report above gives each one's exit code"), code)
    if not failed:
        return LaunchedFailure(f"the processes launched under accelerate ended (exit {code}) without an error line of their own: "
                               "killed (SIGKILL, out of host memory) or failed while starting; torch's report above gives each one's exit code", code)
    causes = [r for r in failed if r["code"] not in (129, 130, 143)] or failed
    first = min(causes, key=lambda r: (r["time"], int(r["rank"])))
    line = first["line"] if first["rank"] == "0" or first.get("echo") else f"{first['line']} (process {first['rank']})"
    return LaunchedFailure(line, first["code"], first.get("again_prefix"))


def _check_disk(recipe: Recipe, run_dir: RunDir, stages: list[str], restart: bool = False, memory: bool = True) -> None:
    """The door's checks of this machine's room for the stages still to run: disk, and host memory
    (alignpress.hostmemory; memory: False once prepare is done, the same then)."""
    from . import disk

    if line := disk.check(recipe, run_dir, stages, restart=restart):
        log.info("%s", line)
    if memory and ("export" in stages or "train" in stages and recipe.train.accelerate_config):
        from . import hostmemory
        from .checks import model_sizes

        sizes = model_sizes(recipe)
        for line in hostmemory.check(recipe, stages, sizes.params, sizes.trainable):
            log.info("%s", line)


def _dry_prepare(recipe: Recipe, hub: bool) -> str:
    """validate: prepare in a scratch folder when the data is local and the tokenizer is on this
    machine (a local or builtin model; a Hub model's only with --hub, which may download it)."""
    from . import prepare
    from .modeling import load_tokenizer, resolve_model_path
    from .recipe import data_sources

    if any(prepare.local_data_files(recipe, spec, prefix, spec.split, f"{prefix}.split") is None for prefix, spec in data_sources(recipe.data)):
        return "prepare: a Hub dataset is read by prepare itself (its rows are not downloaded here)"
    path = resolve_model_path(recipe)
    if not Path(path).is_dir() and not hub:
        return f"prepare: not tried without {recipe.model.name_or_path}'s tokenizer (`validate --hub` fetches it)"
    return prepare.dry_run(recipe, load_tokenizer(recipe, path))


def _hub_preflight(recipe: Recipe) -> str:
    """`validate --hub`: run's Hub preflight, from a laptop before a cloud job is launched."""
    from . import publish

    if not recipe.publish.repo_id:
        return "hub: publish.repo_id is not set: nothing would be pushed (set it, or sky/run.sh sets it from HUB_REPO)"
    user = publish.preflight(recipe, RunDir(default_output_dir(recipe.name), writer=False))
    repos = ", ".join(dict.fromkeys(r for _, r, _ in publish.targets(recipe)))
    return f"hub: the token of '{user}' may push to {repos}; the Hub accepts the card's metadata"


def execute(args: argparse.Namespace, argv: list[str]) -> int:
    if args.command == "plan":
        return plan.main(args)
    recipe = args.loaded_recipe = load_recipe(args.recipe, args.overrides)
    if os.environ.get("ALIGNPRESS_LAUNCHED") != "1":  # said once, by the command the user typed
        for warning in unused_settings(recipe):
            log.warning("%s", warning)
    if args.command == "validate":
        from .checks import check_judge, check_model, check_training_settings
        from .prepare import check_data_sources

        check_training_settings(recipe)
        from . import tracking

        tracking.check_installed(recipe)  # as run does: the lock installs no tracker, here or on a cloud VM
        # --hub fetches the configs of Hub models (a few kB) but never builds a builtin: model.
        local = not args.hub or recipe.model.name_or_path.startswith("builtin:")
        notes = [check_model(recipe, local_only=local), check_data_sources(recipe, hub=args.hub), check_judge(recipe, local_only=not args.hub),
                 _dry_prepare(recipe, args.hub)]
        if args.hub:
            notes.append(_hub_preflight(recipe))
        print(f"# {args.recipe}: valid")
        for note in notes:
            if note:
                print(f"# {note}")
        print(dump(recipe), end="")
        return 0

    from .modeling import preflight

    state = processes.state()
    main = state is None or state.is_main_process
    run_dir = RunDir(args.output_dir or default_output_dir(recipe.name), writer=main)
    if args.command in ("run", "train") and os.environ.get("ALIGNPRESS_LAUNCHED") != "1":
        # First of all: `docker run` without a volume for the outputs trains for hours into the container.
        from .disk import check_container_outputs

        processes.on_main(state, lambda: check_container_outputs(run_dir))
    if args.command in ("run", "prepare", "train", "evaluate", "export"):
        from .disk import check_caches_writable

        check_caches_writable()  # every process: each one reads the model and the data through them
    if args.command == "run" and os.environ.get("ALIGNPRESS_LAUNCHED") != "1":
        # A run that will publish checks the Hub first: no GPU time for a push that would be refused,
        # and no minutes building the demo's builtin model (the model checks below) before a token is refused.
        from . import publish

        processes.on_main(state, lambda: None if _published_as_is(recipe, run_dir) and not args.restart else publish.preflight(recipe, run_dir))
    # Before anything is written: a refused run leaves no folder behind. prepare loads only the
    # tokenizer, so it needs no GPU (a 4-bit recipe can count its tokens on a laptop).
    preflight(recipe, needs_gpu=args.command != "prepare", training=args.command in ("run", "prepare", "train"))
    if args.command in ("run", "train") and state is None and (args.restart or not run_dir.is_done("train")):
        from .modeling import check_gpus

        check_gpus(recipe)
    if args.command in ("run", "train"):
        from . import tracking

        tracking.check_installed(recipe)
    args.run_dir = run_dir  # for the error log of an unexpected failure (main)
    restart_from = ("prepare" if args.command == "run" else args.command) if args.restart else None
    need = NEEDS.get(args.command)
    if need and (status := processes.on_main(state, lambda: run_dir.status(need))) != "done":
        # Before the lock, --restart or anything else touches the folder.
        given = "" if run_dir.root == default_output_dir(recipe.name) else f" --output-dir {run_dir.root}"
        if not run_dir.manifest_path.exists():
            raise AlignpressError(f"stage {args.command} needs {need} to be done first, and this folder holds no run (no run.json): "
                                  f"run `entrypoint.py {need} {args.recipe}{given}` (or `run`) first, or give the folder of a run with --output-dir",
                                  source=str(run_dir.root))
        raise AlignpressError(f"stage {args.command} needs {need} to be done first (run.json says {status}): "
                              f"run `entrypoint.py {need} {args.recipe}{given}` (or `run`)", source=str(run_dir.manifest_path))
    if args.command in ("run", "train", "evaluate", "export") and os.environ.get("ALIGNPRESS_LAUNCHED") != "1":
        # The disk: what training, evaluate and export will write, against the free space (a relaunched child's parent did it).
        todo = [s for s in STAGES if args.restart or not run_dir.is_done(s)] if args.command == "run" else [args.command]
        processes.on_main(state, lambda: _check_disk(recipe, run_dir, todo, restart=args.restart))
    lock = FolderLock(run_dir.root, command=f"{args.command} {args.recipe}")
    processes.on_main(state, lambda: (run_dir.ensure_writable(), lock.acquire()))
    try:
        code = _execute_locked(args, argv, recipe, run_dir, state, restart_from)
    finally:
        lock.release()
    if code == 0:
        processes.leave(state)
    return code


def _execute_locked(args: argparse.Namespace, argv: list[str], recipe: Recipe, run_dir: RunDir, state, restart_from: str | None) -> int:
    main = state is None or state.is_main_process
    # The main process reads the folder for every decision and tells the others (alignpress.processes).
    # a relaunched child's parent keeps the records and restarts
    restarting = restart_from and main and os.environ.get("ALIGNPRESS_LAUNCHED") != "1"
    before = _before_restart(run_dir) if restarting else None  # before any record changes
    processes.on_main(state, lambda: _recheck_outputs(recipe, run_dir, args.command))
    changes: list[Callable[[], None]] = []  # kept on the main process: a function is not broadcast
    processes.on_main(state, lambda: changes.append(_check_same_recipe(recipe, run_dir, restart_from, args.command)))
    if restart_from not in ("prepare", "train"):  # those read the data afresh, or train anew
        redo_from = restart_from or getattr(changes[0], "redo_from", None) if changes else restart_from
        processes.on_main(state, lambda: inputs.check(recipe, run_dir, args.command, redo_from))
    if args.command in ("run", "train") and restart_from is None:
        processes.on_main(state, lambda: _check_checkpoint_stamp(recipe, run_dir))
    processes.on_main(state, lambda: changes[0]())  # every door check passed: now the folder changes
    launched = state is not None or os.environ.get("ALIGNPRESS_LAUNCHED") == "1"
    if restarting:
        _restart(run_dir, restart_from)
    try:
        code = _execute_stages(args, argv, recipe, run_dir, state, launched)
    except BaseException:
        if before is not None:
            args.restart_undone = _undo_restart(run_dir, before, restart_from)
        raise
    if before is not None and code != 0:  # the relaunched processes failed
        args.restart_undone = _undo_restart(run_dir, before, restart_from)
    elif before is not None and args.command == "prepare":
        _keep_later_stages(run_dir, before, recipe)
    return code


def _keep_later_stages(run_dir: RunDir, before: dict, recipe: Recipe) -> None:
    """`prepare --restart` that prepared the same data for the same recipe: the later stages'
    results are still the results of this recipe and data, so they stand (and training resumes
    from its checkpoints, not from step 0)."""
    m = run_dir.load()
    same_data = m.get("data_fingerprint") == before["manifest"].get("data_fingerprint")
    same_recipe = before["recipe"] == dump(recipe) and m.get("chat_template_sha256") == before["manifest"].get("chat_template_sha256")
    if same_data and same_recipe:
        _put_back(run_dir, before, STAGES[1:])
        # The same results are the same run: its id (the Hub tag, the card, the tracked run) stays.
        old = before["manifest"]
        run_dir.update(run_id=old.get("run_id"), previous_run_ids=old.get("previous_run_ids", []))
        done = [s for s in STAGES[1:] if run_dir.is_done(s)]
        log.info("same recipe and prepared data as before --restart: the later stages' results stand (%s done), and so does run %s",
                 ", ".join(done) or "none", old.get("run_id"))


def _execute_stages(args: argparse.Namespace, argv: list[str], recipe: Recipe, run_dir: RunDir, state, launched: bool) -> int:
    main = state is None or state.is_main_process
    if args.command == "train" and not args.restart and not launched and run_dir.is_done("train"):
        # Resuming a finished training trains no step, yet it would write the adapter again and send
        # evaluate, export and publish back to pending.
        steps = run_dir.load().get("stages", {}).get("train", {}).get("global_step")
        log.info("train is done%s: nothing to train (`train --restart` trains again); the later stages stay as they are",
                 f" (step {steps})" if steps else "")
        return 0
    relaunch = recipe.train.accelerate_config and not launched and args.command in ("run", "train")
    if main:
        run_dir.init(recipe.name, str(args.recipe))
        from .version import git_commit, version

        run_dir.update(alignpress={"version": version(), "commit": git_commit()})  # for the card's "reproduce"
        write_text(run_dir.root / "recipe.resolved.yaml", dump(recipe))
        run_dir.update(chat_template_sha256=chat_template_sha256(recipe))
    if relaunch:
        if args.command == "run" and not run_dir.is_done("prepare"):
            # Prepared here, by one process, before the launch: the launched processes would wait
            # for it in a collective that ends after 30 minutes (large data), each holding its GPU.
            log.info("preparing the data before the launch, in this process alone")
            _run_stage("prepare", recipe, run_dir)
            _check_disk(recipe, run_dir, [s for s in ("train", "evaluate", "export") if not run_dir.is_done(s)], memory=False)
        return _relaunch(recipe, argv)
    if state is not None:
        state.wait_for_everyone()

    def stage(name: str) -> None:
        # Data prep, evaluation, export and publishing run once; training runs on every process.
        if name == "train":
            _run_stage(name, recipe, run_dir)
        else:
            processes.on_main(state, lambda: _run_stage(name, recipe, run_dir))

    if args.command == "run":
        prepared = False
        for name in STAGES:
            if name == "evaluate" and state is not None:
                # Training is over: the main process evaluates, exports and publishes alone. The others
                # used to wait for all of it in a collective, which NCCL's watchdog ends after its timeout
                # (processes.trainer_timeout), killing the job while a large model uploads; they end here.
                processes.leave(state)
                if not main:
                    log.info("training is done: process %s ends here; the main process evaluates, exports and publishes alone", state.process_index)
                    return 0
                state = None
            if processes.on_main(state, lambda: run_dir.is_done(name)):
                log.info("== %s: already done, skipping", name)
                continue
            if name == "export" and recipe.publish.repo_id:
                from . import gate

                processes.on_main(state, lambda: gate.check(recipe, run_dir, before_export=True))
            if name == "train" and prepared:
                # The door counted one checkpoint: the number of pairs, and so of saves, is known now.
                processes.on_main(state, lambda: _check_disk(recipe, run_dir, [s for s in ("train", "evaluate", "export") if not run_dir.is_done(s)], memory=False))
            stage(name)
            prepared = prepared or name == "prepare"
        log.info("finished: %s", run_dir.root)
        if main:
            from .summary import render

            print(render(recipe, run_dir, str(args.recipe), args.overrides), flush=True)
    else:
        if args.command != "train" and state is not None:
            # prepare, evaluate, export, publish: the main process's alone, for as long as it takes
            # (the others would wait in a collective that times out); the others end here.
            processes.leave(state)
            if not main:
                log.info("process %s ends here: the main process runs %s alone", state.process_index, args.command)
                return 0
            state = None
        stage(args.command)  # the later stages are marked pending once it is done (_run_stage)
    return 0


class _NotHandledElsewhere(logging.Filter):
    """Drop records a library's own handler already printed (huggingface_hub has one and propagates)."""

    def filter(self, record: logging.LogRecord) -> bool:
        logger: logging.Logger | None = logging.getLogger(record.name)
        while logger is not None and logger is not logging.root:
            if logger.handlers:
                return False
            logger = logger.parent if logger.propagate else None
        return True


class _DeepSpeedToStderr(logging.Filter):
    """DeepSpeed's logger prints to stdout, which alignpress keeps for results: its records go to
    stderr with the other libraries' instead. Its "Setting accelerator to CPU. If you have GPU ...
    we were unable to detect it" is dropped: alignpress says which device it trains on, and refuses
    a GPU recipe on a machine without one before that."""

    def __init__(self, handler: logging.Handler):
        super().__init__()
        self.handler = handler

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.getMessage().startswith("Setting accelerator to CPU"):
            self.handler.handle(record)
        return False


class _HubRetriesOnce(logging.Filter):
    """huggingface_hub retries a request that gets no answer (no network, a 5xx) up to 5 times, about
    23 s, with two lines an attempt: 11 lines stood before the one error line when the Hub could not
    be reached. The retries stay; their lines shrink to one a request: the first failure, and that it
    is being retried. How it ended shows next (the error line, or the command going on)."""

    FAILED = re.compile(r"^(?:'.*'|HTTP Error \d+) thrown while requesting ", re.S)
    RETRY = re.compile(r"^Retrying in \S+s \[Retry (\d+)/(\d+)\]\.$")

    def __init__(self) -> None:
        super().__init__()
        self.failure: dict[int | None, str] = {}  # thread -> its latest failed attempt's line

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if self.FAILED.match(message):
            self.failure[record.thread] = message
            return False
        if retry := self.RETRY.match(message):
            failure = self.failure.pop(record.thread, None)
            if retry.group(1) != "1" or failure is None:
                return False
            record.msg, record.args = f"{failure}; retrying up to {retry.group(2)} times (those lines not shown)", ()
        return True


class AboveTheBars(logging.StreamHandler):
    """A log line during training goes above the progress bar (tqdm's, which transformers draws),
    which is drawn again below it; written plainly, it was glued to the end of the bar's line."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            # one write, as logging.StreamHandler's: the line of one process is not split by another's
            tqdm.write(self.format(record) + self.terminator, file=self.stream, end="")
            self.flush()
        except RecursionError:
            raise
        except Exception:  # noqa: BLE001 - as logging.StreamHandler: a failed write is reported, not raised
            self.handleError(record)


def setup_logging() -> None:
    """alignpress's own lines as `[alignpress] ...` at ALIGNPRESS_LOG (default INFO); other libraries'
    warnings once each, under their own name."""
    ours = logging.getLogger("alignpress")
    handler = AboveTheBars(sys.stderr)
    handler.setFormatter(logging.Formatter("[alignpress] %(message)s"))
    ours.handlers = [handler]
    ours.setLevel(os.environ.get("ALIGNPRESS_LOG", "INFO"))
    ours.propagate = False
    root = logging.getLogger()
    root.handlers = [h for h in root.handlers if not getattr(h, "_alignpress", False)]
    other = AboveTheBars(sys.stderr)
    other.setFormatter(logging.Formatter("[%(name)s] %(levelname)s: %(message)s"))
    other.addFilter(_NotHandledElsewhere())
    other._alignpress = True  # type: ignore[attr-defined]
    root.addHandler(other)
    if root.level == logging.NOTSET or root.level > logging.WARNING:
        root.setLevel(logging.WARNING)
    # Set before DeepSpeed is imported: its logger keeps the filters of an existing one
    deepspeed = logging.getLogger("DeepSpeed")
    deepspeed.filters = [f for f in deepspeed.filters if not isinstance(f, _DeepSpeedToStderr)]
    to_stderr = AboveTheBars(sys.stderr)
    to_stderr.setFormatter(other.formatter)
    deepspeed.addFilter(_DeepSpeedToStderr(to_stderr))
    hub_http = logging.getLogger("huggingface_hub.utils._http")
    hub_http.filters = [f for f in hub_http.filters if not isinstance(f, _HubRetriesOnce)]
    hub_http.addFilter(_HubRetriesOnce())
    # bitsandbytes 0.50 on a CPU with AVX512-BF16 warns at import that it cannot fetch its CPU 4-bit
    # kernel (the `kernels` package): alignpress never runs 4-bit on the CPU (refused at the door), so the
    # line only stood before every command's output there, a refusal's one line included.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    # datasets 5.2's JSON reader logs "Failed to load JSON from file ..." (a row counted within a
    # block) through its own handler, then raises: alignpress reads the file itself and names the
    # line in its one error line, which that unprefixed line used to precede.
    logging.getLogger("datasets.packaged_modules.json.json").setLevel(logging.CRITICAL)
    # Its CSV and parquet readers do the same ("Failed to read file ..."); alignpress's line says it.
    logging.getLogger("datasets.packaged_modules.csv.csv").setLevel(logging.CRITICAL)
    logging.getLogger("datasets.packaged_modules.parquet.parquet").setLevel(logging.CRITICAL)
    # peft 0.21 and trl 1.16 read model.is_gradient_checkpointing, which transformers 5.23 deprecates:
    # not our call and nothing a user can change, so it is not shown (ours use activation_checkpointing).
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)


def _again(args: argparse.Namespace) -> str:
    """What to do after an interruption: training's resume is mentioned only where training is still to come."""
    stage = getattr(getattr(args, "run_dir", None), "current_stage", None)
    later = STAGES[STAGES.index(stage):] if stage in STAGES else STAGES
    training = ", and training resumes from its newest checkpoint" if "train" in later and args.command in ("run", "train") else ""
    if getattr(args, "restart", False):
        if getattr(args, "restart_undone", False):
            return "the folder is as it was before --restart: run the same command again to redo it"
        # Again with --restart would set aside what this one finished, and start over
        return f"run the same command without --restart to go on: finished stages are kept{training}"
    return f"run the same command again to go on: finished stages are kept{training}"


class Stopped(BaseException):
    """SIGTERM or SIGHUP outside training. Not an Exception: a library's `except Exception` (a retry
    loop) must not swallow it and carry on."""

    exit_code = 143  # RunDir.stage marks the stage interrupted


def _stopped(signum, frame) -> None:
    stop = Stopped(f"stopped by {signal.Signals(signum).name}")
    stop.exit_code = 128 + signum
    raise stop


def writable_home() -> str | None:
    """`docker run --user UID` (files on the volume owned by you, not root) with a UID the image
    has no account for: HOME is / (Docker) or the working folder (podman), which that user cannot
    write, and what keeps files under it failed: alignpress's logs and built models, and on the GPU
    Triton's compiled kernels (Liger's, at the first step) and DeepSpeed's ops. Such a process gets
    a HOME of its own in the temporary folder, before any library reads it (the launched processes
    inherit it); returns the line that says so, or None when HOME is fine."""
    home = os.environ.get("HOME", "")
    if home and os.path.isdir(home) and os.access(home, os.W_OK | os.X_OK):
        return None
    import tempfile

    own = Path(tempfile.gettempdir()) / f"alignpress-home-{os.getuid()}"
    try:
        own.mkdir(mode=0o700, exist_ok=True)
        mine = not own.is_symlink() and own.stat().st_uid == os.getuid()
    except OSError:
        mine = False
    if not mine:  # that name is taken by someone else's, in a shared temporary folder
        own = Path(tempfile.mkdtemp(prefix=f"alignpress-home-{os.getuid()}-"))
    os.environ["HOME"] = str(own)
    return f"HOME ({home or 'unset'}) is not a folder this user (uid {os.getuid()}) can write: caches and logs go to {own} instead"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    moved_home = writable_home()
    processes.configure_cuda_allocator()  # before torch is loaded: the GPU stages' children inherit it
    setup_logging()
    if moved_home:
        log.info("%s", moved_home)
    # `docker stop`, a preemption, `sky cancel` outside training (loading, the precompute pass,
    # evaluate, export, publish): the stage is marked interrupted, the folder's lock released and
    # the line says what to do. Training itself saves a checkpoint first (train.SpotSafety).
    # SIGHUP (a closed terminal or SSH session) likewise: it used to end the process with the lock held.
    previous = signal.signal(signal.SIGTERM, _stopped)
    previous_hup = signal.signal(signal.SIGHUP, _stopped)
    _exit_record()  # started (a relaunched process)
    try:
        if args.command == "schema":
            for dotted, tp, default, help_ in describe(Recipe):
                print(f"{dotted}  ({tp}; default {default})\n    {help_}")
            return 0
        code = execute(args, argv)
        _exit_record(code=code)
        return code
    except AlignpressError as e:
        _reporting()
        if getattr(e, "again_prefix", None) and getattr(args, "restart_undone", False):
            # The workers' advice predates this command's put-back of the folder (--restart).
            return _fail(f"error: {e.again_prefix}; {_again(args)}", e.exit_code)
        echo = getattr(e, "echo", False)
        text = f"the main process failed: {_named(e, args)}" if echo else _named(e, args)
        return _fail(f"error: {redact(text)}", e.exit_code, echo=echo)
    except BrokenPipeError:
        # The reader of stdout went away (`schema | head`): not an error of the command. Python would
        # report the pipe again when it flushes stdout at exit, so stdout goes nowhere from here.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        _reporting()
        return _fail(f"error: interrupted; {_again(args)}", 130, again_prefix="interrupted")
    except Stopped as e:
        _reporting()
        return _fail(f"error: {e}; {_again(args)}", e.exit_code, again_prefix=str(e))
    except Exception as e:  # noqa: BLE001 - anything unexpected: one line here, the traceback in a log file
        _reporting()
        return _fail(f"error: {redact(_unexpected(e, args))}", 1)
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGHUP, previous_hup)


def _reporting() -> None:
    """The command has failed and now only says why: a SIGTERM or SIGHUP from here on is ignored. When
    one launched process fails, torch's launcher sends SIGTERM to the others, and one that was
    writing its own error's traceback to the log (slow: linecache reads every source file) was cut
    short there, leaving Python's traceback of the signal instead of its error line."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)


def _fail(line: str, code: int, echo: bool = False, again_prefix: str | None = None) -> int:
    """Print the error's line and return its exit code. Under a relaunch (`_relaunch`) each process
    also leaves both for the command the user typed, which says the first failure's again, last."""
    # one write, line and newline: print() writes them apart, and Python's stderr writes through, so
    # another launched process's line could come in between
    sys.stderr.write(line + "\n")
    sys.stderr.flush()
    _exit_record(code=code, line=line, echo=echo, again_prefix=again_prefix)
    return code


def _exit_record(**fields) -> None:
    """This launched process's record for `launched_failure`: written when it starts, and again
    with its exit code when it ends; one that still has no code was killed without a word."""
    if folder := os.environ.get(EXIT_DIR):
        rank = os.environ.get("RANK", "0")
        try:
            Path(folder, f"{rank}.json").write_text(json.dumps({"rank": rank, "time": time.time(), **fields}))
        except OSError:
            pass  # the launcher's status still says it failed


def _named(error: AlignpressError, args: argparse.Namespace) -> str:
    """The error's line, naming the `--set` flag instead of the recipe file when the field came from
    one (the stages raise with the recipe's file; the flag is where the user would fix it)."""
    text, recipe = str(error), getattr(args, "loaded_recipe", None)
    if recipe is None or not error.field:
        return text
    if error.source == recipe.source and text.startswith(f"{recipe.source}: "):
        text = recipe.where(error.field) + text[len(recipe.source):]
    elif error.source is None and error.field.split(".")[0].split("[")[0] in _SECTIONS:
        # Raised where only the field is known (the Hub's answers in publish): name the file too.
        text = f"{recipe.where(error.field)}: {text}"
    return text


_SECTIONS = {f.name for f in dataclasses.fields(Recipe)}


def _unexpected(error: Exception, args: argparse.Namespace) -> str:
    """Say what failed in one line; the full traceback goes to <output>/logs/<stage>-<time>.log, or
    to ALIGNPRESS_HOME/logs/ (~/.cache/alignpress) before the output folder is known."""
    import traceback

    run_dir = getattr(args, "run_dir", None)
    if run_dir is not None and disk_full(error, run_dir.root):
        return str(run_dir.disk_full_error())
    short = str(error).strip().splitlines()[0] if str(error).strip() else ""
    short = f"{type(error).__name__}: {short}"[:300]
    text = "".join(traceback.format_exception(error))
    stage = getattr(run_dir, "current_stage", None) or args.command
    rank = os.environ.get("RANK", "0")
    # No output folder yet (plan, or a failure before the folder is known): alignpress's own cache.
    from .modeling import cache_home

    folder = run_dir.root / "logs" if run_dir is not None else cache_home() / "logs"
    path = folder / f"{stage}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}{'' if rank == '0' else '-rank' + rank}.log"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"alignpress {args.command} {getattr(args, 'recipe', '')}: {short}\n\n{text}")
    except OSError as e:
        return f"{short} (the traceback could not be written to {path}: {e.strerror or e})\n{text}"
    return f"{short} (see {path})"
