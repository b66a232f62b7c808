"""Command line: `entrypoint.py COMMAND RECIPE [--set key=value ...] [--output-dir DIR]`.

`run` runs every stage in order, skipping the ones run.json marks done; a stage command runs
that stage alone, reading what the earlier stages wrote. `validate` loads no model.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import yaml

from .errors import AlignpressError
from .recipe import Recipe, describe, dump, load_recipe
from .runstate import STAGES, RunDir

log = logging.getLogger("alignpress")

NEEDS = {"train": "prepare", "evaluate": "train", "export": "train", "publish": "export"}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="alignpress", description="Align a chat model with DPO and publish it.")
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_ in [
        ("run", "run every stage (skips finished ones, resumes training)"),
        ("validate", "check the recipe and print it resolved; loads no model"),
        *[(s, f"run the {s} stage alone") for s in STAGES],
    ]:
        sp = sub.add_parser(name, help=help_)
        sp.add_argument("recipe", help="recipe YAML file")
        sp.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a recipe field (dotted path), e.g. --set dpo.beta=0.2")
        if name != "validate":
            sp.add_argument("--output-dir", help="output folder (default outputs/<recipe name>)")
            sp.add_argument("--restart", action="store_true", help="start over: forget finished stages and checkpoints in the output folder")
    sub.add_parser("schema", help="print every recipe field with its type, default and meaning")
    return p


def _check_same_recipe(recipe: Recipe, run_dir: RunDir) -> None:
    """Refuse to mix two different recipes in one output folder (publish settings may change)."""
    path = run_dir.root / "recipe.resolved.yaml"
    if not path.exists():
        return
    old = yaml.safe_load(path.read_text()) or {}
    new = recipe.to_dict()
    changed = sorted(k for k in set(old) | set(new) if k != "publish" and old.get(k) != new.get(k))
    if changed:
        raise AlignpressError(
            f"this folder holds a run of a different recipe (sections {', '.join(changed)} differ); "
            "use another --output-dir, or --restart to start over here",
            source=str(path),
        )


def _restart(run_dir: RunDir) -> None:
    for name in ("data", "checkpoints", "adapter", "full", "model", "metrics", "run.json", "recipe.resolved.yaml"):
        p = run_dir.root / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def _run_stage(name: str, recipe: Recipe, run_dir: RunDir) -> None:
    from . import evaluate, export, prepare, publish, train

    if name != "prepare" and NEEDS.get(name) and not run_dir.is_done(NEEDS[name]):
        raise AlignpressError(f"stage {name} needs {NEEDS[name]} to be done first (run.json says {run_dir.status(NEEDS[name])})", source=str(run_dir.manifest_path))
    if name == "evaluate" and not recipe.eval.enabled:
        run_dir.set_stage(name, status="done", skipped="eval.enabled is false")
        return
    started = time.time()
    log.info("== %s", name)
    with run_dir.stage(name) as info:
        if name == "prepare":
            from .modeling import base_model_revision, load_tokenizer, resolve_model_path

            path = resolve_model_path(recipe)
            out = prepare.run(recipe, run_dir, load_tokenizer(recipe, path))
            run_dir.update(data_fingerprint=out["fingerprint"], base_model={"id": recipe.model.name_or_path, "path": path, "revision": base_model_revision(recipe, path)})
        elif name == "train":
            out = train.run(recipe, run_dir)
        elif name == "evaluate":
            out = evaluate.run(recipe, run_dir)
        elif name == "export":
            out = export.run(recipe, run_dir)
        else:
            out = publish.run(recipe, run_dir)
        info.update(out)
    log.info("== %s done in %.1f s", name, time.time() - started)


def execute(args: argparse.Namespace) -> int:
    recipe = load_recipe(args.recipe, args.overrides)
    if args.command == "validate":
        print(f"# {args.recipe}: valid")
        print(dump(recipe), end="")
        return 0

    from .modeling import preflight

    run_dir = RunDir(args.output_dir or Path("outputs") / recipe.name)
    preflight(recipe)  # before anything is written: a refused run leaves no folder behind
    if args.restart:
        _restart(run_dir)
    _check_same_recipe(recipe, run_dir)
    run_dir.ensure_writable()
    run_dir.init(recipe.name, str(args.recipe))
    (run_dir.root / "recipe.resolved.yaml").write_text(dump(recipe))

    if args.command == "run":
        for stage in STAGES:
            if run_dir.is_done(stage):
                log.info("== %s: already done, skipping", stage)
                continue
            _run_stage(stage, recipe, run_dir)
        log.info("finished: %s", run_dir.root)
    else:
        later = STAGES[STAGES.index(args.command) + 1 :]
        if later and run_dir.is_done(args.command):
            run_dir.invalidate_from(later[0])
        _run_stage(args.command, recipe, run_dir)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=os.environ.get("ALIGNPRESS_LOG", "INFO"), format="[alignpress] %(message)s", stream=sys.stderr)
    if args.command == "schema":
        for dotted, tp, default, help_ in describe(Recipe):
            print(f"{dotted}  ({tp}; default {default})\n    {help_}")
        return 0
    try:
        return execute(args)
    except AlignpressError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
