"""`entrypoint.py plan RECIPE`: what a run will cost, before any GPU is rented.

Reads: the recipe, the prepared data's token counts (OUTPUT/data/stats.json and, when present,
the per-pair counts in data/train.jsonl; or --tokens-from), the architecture (the model folder's
config.json, alignpress.flops.KNOWN_ARCHS, or the Hub's config.json), the throughput model
(src/alignpress/data/throughput.json, replaced by measurements in benchmarks/results/*.json
when they cover the GPU and the recipe's settings) and prices: SkyPilot's own catalog when the
launcher environment (.venv-sky) has one cached, else the dated table
(src/alignpress/data/gpu_prices.json), or --prices FILE. Loads no model weights, needs no GPU.

Prints: tokens, FLOPs (alignpress.flops), a memory estimate for --gpu (refused, exit 2, when it
will not fit; a warning above 90%), for every GPU in src/alignpress/data/gpus.json the projected
training time and its cost on-demand and on spot, and the cheapest GPU that fits for each.
Everything not measured says so.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import yaml

from .disk import full_weights_in_fp32, size_text
from . import hostmemory
from .errors import AlignpressError
from .flops import AUTO_MEMORY_SHARE, KNOWN_ARCHS, MASK_ALIGN, Arch, LengthDistribution, MemorySettings, arch_from_config, checkpointing_decision, dataset_flops, load_table, memory_estimate, packed_layout, padding_fraction, precompute_decision, recompute_share, truncate_pair
from .recipe import Recipe, changed_sections, load_recipe
from .runstate import default_output_dir

BENCH_RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
BENCH_SCHEMA = "alignpress-bench/1"
WARN_SHARE = AUTO_MEMORY_SHARE  # warn when the estimate uses more than this share of the GPU's memory (what auto keeps to)


# ---------------------------------------------------------------------------------------------
# Inputs


def resolve_arch(recipe: Recipe, run_root: Path | None) -> tuple[Arch, str]:
    """The model's shapes and where they came from; never loads weights."""
    name = recipe.model.name_or_path
    folders = []
    if run_root is not None and (run_root / "run.json").exists():
        base = json.loads((run_root / "run.json").read_text()).get("base_model") or {}
        # The folder prepare resolved for this model (a Hub model's download); a run of another model
        # (the recipe edited since) used to stand in for this one.
        if base.get("path") and base.get("id") == name:
            folders.append(Path(base["path"]))
    if name.startswith("builtin:"):
        from .demo import VERSION
        from .modeling import cache_home

        folders.append(cache_home() / "models" / f"{name.removeprefix('builtin:')}-v{VERSION}")
    folders += [Path(name).expanduser(), Path(recipe.resolve_path(name))]
    for folder in folders:
        if (folder / "config.json").is_file():
            return arch_from_config(json.loads((folder / "config.json").read_text()), name), str(folder / "config.json")
    if name in KNOWN_ARCHS:
        return KNOWN_ARCHS[name], "alignpress.flops.KNOWN_ARCHS (from the model's public config)"
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(name, revision=recipe.model.revision, trust_remote_code=recipe.model.trust_remote_code)
    except Exception as e:  # noqa: BLE001 - offline or unknown: one clear message
        raise AlignpressError(f"cannot read the architecture of {name!r} ({type(e).__name__}); run prepare first (it records the model folder) or check the network", source=recipe.source, field="model.name_or_path") from None
    return arch_from_config(config, name), f"config.json of {name} (Hub)"


def load_tokens(recipe: Recipe, run_root: Path, tokens_from: str | None) -> dict[str, Any]:
    """Token counts of the training split: stats.json, plus per-pair counts from train.jsonl if present."""
    if tokens_from:
        # A file, or a folder holding one: a path that is neither used to be read as a folder, and
        # the refusal suggested the very flag that was given.
        p = Path(tokens_from)
        if not p.exists():
            raise AlignpressError(f"no token counts: --tokens-from {p} does not exist (give a data/stats.json written by prepare, or a folder "
                                  "holding one)", source=recipe.source)
        if not p.is_file() and not p.is_dir():
            raise AlignpressError(f"no token counts: --tokens-from {p} is neither a file nor a folder (give a data/stats.json written by "
                                  "prepare, or a folder holding one)", source=recipe.source)
        candidates = [p] if p.is_file() else [p / "stats.json", p / "data" / "stats.json"]
    else:
        candidates = [run_root / "data" / "stats.json"]
    stats_path = next((c for c in candidates if c.is_file()), None)
    if stats_path is None and tokens_from:
        raise AlignpressError(f"no token counts: --tokens-from {tokens_from} is a folder with no stats.json or data/stats.json in it "
                              "(give a data/stats.json written by prepare, or a folder holding one)", source=recipe.source)
    if stats_path is None:
        given = "" if run_root == default_output_dir(recipe.name) else f" --output-dir {run_root}"
        raise AlignpressError(
            f"no token counts: {candidates[0]} does not exist. Run `entrypoint.py prepare {recipe.source}{given}` first "
            "(it needs no GPU), or give the output folder of a prepared run with --output-dir DIR, or its stats with --tokens-from STATS_JSON",
            source=recipe.source,
        )
    try:
        train = json.loads(stats_path.read_text())["tokens"]["train"]
        train["tokens_per_epoch"], train["pairs"]
    except (ValueError, KeyError, TypeError) as e:
        raise AlignpressError(f"not a data/stats.json written by prepare ({type(e).__name__}: {e})", source=str(stats_path)) from None
    out: dict[str, Any] = {"stats": train, "source": str(stats_path), "rows": None, "other_recipe": _other_recipe(recipe, stats_path)}
    rows_path = stats_path.parent / "train.jsonl"
    if rows_path.is_file():
        rows = []
        with open(rows_path) as f:
            for line in f:
                if line.strip():
                    r = json.loads(line)
                    rows.append((r["prompt_tokens"], r["chosen_tokens"], r["rejected_tokens"]))
        if len(rows) == train["pairs"]:
            out["rows"] = rows
            out["rows_source"] = str(rows_path)
    return out


def _other_recipe(recipe: Recipe, stats_path: Path) -> str | None:
    """A note when the token counts were prepared for a recipe whose model or data differ from this
    one's (another recipe's folder given to --tokens-from, or this recipe edited since prepare)."""
    resolved = stats_path.parent.parent / "recipe.resolved.yaml"
    try:
        old = yaml.safe_load(resolved.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return None  # a stats.json on its own: nothing to compare it with
    differ = [k for k in changed_sections(old, recipe.to_dict()) if k in ("model", "data")]
    if not differ:
        return None
    return (f"the token counts were prepared for a recipe whose {' and '.join(differ)} differ from {recipe.source}'s "
            f"({resolved}): run prepare for this recipe to count its own data")


TIERS = ("on_demand", "spot")
SKY_CLOUDS = ("aws", "gcp")  # clouds whose SkyPilot catalog `plan` reads when cached


def load_prices(choice: str | None, gpus: dict[str, Any]) -> tuple[dict[str, Any], str, list[str]]:
    """The price table, where it came from, and notes.

    choice: None (auto: SkyPilot's catalog when the launcher environment has one cached, else the
    dated table), "table", "sky", or a FILE in the layout of src/alignpress/data/gpu_prices.json.
    """
    if choice not in (None, "table", "sky"):
        try:
            table = json.loads(Path(choice).read_text())
            table["gpus"].items()
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise AlignpressError(f"not a price table like src/alignpress/data/gpu_prices.json ({type(e).__name__}: {e})", source=choice) from None
        check_prices(table, gpus, choice)
        return table, choice, []
    table = load_table("gpu_prices.json")
    if choice == "table":
        return table, "src/alignpress/data/gpu_prices.json", []
    python, why = sky_python()
    if python is not None and choice is None and not sky_catalog_cached():
        python, why = None, "no SkyPilot catalog cached under ~/.sky/catalogs (`sky launch` or `sky show-gpus` fetches one)"
    offers, error = sky_offers(python) if python is not None else ([], why)
    merged, used = merge_sky_offers(table, offers, gpus)
    if not used:
        return table, "src/alignpress/data/gpu_prices.json", [f"SkyPilot catalog not used ({error or 'it lists none of these GPUs'}): prices from the dated table"]
    rest = [g for g in gpus if g not in used and g in table["gpus"]]
    notes = [f"prices from SkyPilot's catalog for {', '.join(used)}" + (f"; from the dated table for {', '.join(rest)}" if rest else "")]
    return merged, "SkyPilot catalog (~/.sky/catalogs) + src/alignpress/data/gpu_prices.json", notes


def check_prices(table: dict[str, Any], gpus: dict[str, Any], source: str) -> None:
    """Each entry: one provider, one date, an on-demand and/or a spot price (USD per GPU-hour)."""
    for name, entry in table["gpus"].items():
        field = f"gpus.{name}"
        if name not in gpus:
            raise AlignpressError(f"unknown GPU; known: {', '.join(gpus)}", source=source, field=field)
        if not isinstance(entry, dict):
            raise AlignpressError("must be a mapping with provider, as_of, on_demand_usd and spot_usd", source=source, field=field)
        for key in ("provider", "as_of"):
            if not isinstance(entry.get(key), str) or not entry[key]:
                raise AlignpressError("missing: each price names one provider and the date it was read", source=source, field=f"{field}.{key}")
        for tier in TIERS:
            value = entry.get(f"{tier}_usd")
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
                raise AlignpressError(f"must be a positive number of USD per GPU-hour or null, not {value!r}", source=source, field=f"{field}.{tier}_usd")
        if entry.get("on_demand_usd") is None and entry.get("spot_usd") is None:
            raise AlignpressError("needs on_demand_usd or spot_usd", source=source, field=field)


def offer_prices(entry: dict[str, Any] | None) -> dict[str, Any]:
    """{tier: {"usd": price, provider, product, region, as_of} or None} for one GPU's offer."""
    out: dict[str, Any] = {}
    for tier in TIERS:
        usd = (entry or {}).get(f"{tier}_usd")
        out[tier] = None if usd is None else {"usd": usd} | {k: entry.get(k) for k in ("provider", "product", "region", "as_of")}
    return out


def sky_python() -> tuple[str | None, str]:
    """The launcher environment's python with SkyPilot: $ALIGNPRESS_SKY_PYTHON, else ./.venv-sky."""
    value = os.environ.get("ALIGNPRESS_SKY_PYTHON")
    if value is not None and value.strip().lower() in ("", "none", "0"):
        return None, "ALIGNPRESS_SKY_PYTHON turns it off"
    path = Path(value) if value else Path(__file__).resolve().parents[2] / ".venv-sky" / "bin" / "python"
    return (str(path), "") if path.exists() else (None, f"no SkyPilot environment at {path}")


def sky_catalog_cached() -> bool:
    home = Path(os.environ.get("SKY_RUNTIME_DIR") or Path.home()).expanduser()
    return any((home / ".sky" / "catalogs" / "v8" / cloud / "vms.csv").is_file() for cloud in SKY_CLOUDS)


# Runs inside the SkyPilot environment (its own python): one-GPU offers with both prices of each
# row. The catalog's date is its file's mtime, read before SkyPilot may try to refresh it.
SKY_SCRIPT = """
import datetime, json, math, os, sys
from sky import catalog
from sky.catalog import common
out, errors = [], []
for cloud in sys.argv[1:]:
    path = common.get_catalog_path(cloud + "/vms.csv")
    if not os.path.exists(path):
        continue
    date = datetime.date.fromtimestamp(os.path.getmtime(path)).isoformat()
    try:
        found = catalog.list_accelerators(gpus_only=True, quantity_filter=1, clouds=cloud, all_regions=True)
    except Exception as e:
        errors.append(cloud + ": " + type(e).__name__)
        continue
    num = lambda x: None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)
    for name, infos in found.items():
        for i in infos:
            out.append({"accelerator": name, "cloud": cloud, "instance_type": i.instance_type, "count": num(i.accelerator_count),
                        "on_demand_usd": num(i.price), "spot_usd": num(i.spot_price), "region": i.region, "as_of": date, "catalog": path})
print(json.dumps({"offers": out, "errors": errors}))
"""


def sky_offers(python: str, timeout: float = 120) -> tuple[list[dict[str, Any]], str]:
    """One-GPU offers from SkyPilot's cached catalogs, or ([], why not)."""
    import subprocess

    try:
        proc = subprocess.run([python, "-c", SKY_SCRIPT, *SKY_CLOUDS], capture_output=True, text=True, timeout=timeout)
        result = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 and proc.stdout.strip() else None
    except (OSError, subprocess.TimeoutExpired, ValueError) as e:
        return [], f"{type(e).__name__} running {python}"
    if result is None:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return [], f"{python} failed: {tail[:200]}"
    return result["offers"], "; ".join(result["errors"])


def merge_sky_offers(table: dict[str, Any], offers: list[dict[str, Any]], gpus: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The dated table with each GPU SkyPilot prices replaced by its cheapest on-demand offer (that row's spot price too)."""
    merged = {**table, "gpus": dict(table["gpus"])}
    used = []
    for name, info in gpus.items():
        mine = [o for o in offers if o["accelerator"] == info.get("sky_name") and o["count"] == 1 and o["on_demand_usd"]]
        if not mine:
            continue
        best = min(mine, key=lambda o: (o["on_demand_usd"], o["spot_usd"] if o["spot_usd"] is not None else math.inf))
        merged["gpus"][name] = {
            "provider": {"aws": "AWS", "gcp": "Google Cloud"}.get(best["cloud"], best["cloud"]),
            "product": best["instance_type"],
            "region": best["region"],
            "on_demand_usd": best["on_demand_usd"],
            "spot_usd": best["spot_usd"],
            "as_of": best["as_of"],
            "source": f"SkyPilot catalog {best['catalog']} (the file's date)",
        }
        used.append(name)
    return merged, used


def recipe_settings(recipe: Recipe, gradient_checkpointing: bool, precompute: bool, checkpointed_layers: int | None = None) -> dict[str, Any]:
    """The levers a benchmark variant records, as this recipe sets them (for matching measurements).

    gradient_checkpointing and precompute: the recipe's values with `auto` already decided;
    checkpointed_layers: how many layers recompute when some do, None when every one does (or none).
    """
    return {
        "load_in_4bit": recipe.model.load_in_4bit,
        "gradient_checkpointing": gradient_checkpointing,
        "checkpointed_layers": checkpointed_layers,
        "per_device_train_batch_size": recipe.train.per_device_train_batch_size,
        "gradient_accumulation_steps": recipe.train.gradient_accumulation_steps,
        "precompute_ref_log_probs": precompute,
        "attn_implementation": recipe.model.attn_implementation or "sdpa (default)",
        "group_by_length": recipe.train.group_by_length,
        "liger": recipe.train.use_liger_kernel,
        "optim": recipe.train.optim,
        "max_length": recipe.dpo.max_length,
        "lora_r": recipe.lora.r if recipe.lora.enabled else None,
        "prefix_sharing": recipe.dpo.prefix_sharing,
        "pairs_per_row": recipe.dpo.pairs_per_row if recipe.dpo.prefix_sharing else 1,
        "compile_layers": recipe.train.compile_layers,
    }


# Settings every result file records; the later ones (optim, max_length, lora_r) are compared
# when a file has them. Files from before prefix sharing existed measured the standard layout.
# Files from before train.checkpointed_layers checkpointed every layer when they checkpointed.
# Files from before train.compile_layers ran uncompiled.
SETTING_DEFAULTS = {"prefix_sharing": False, "pairs_per_row": 1, "checkpointed_layers": None, "compile_layers": False}
CORE_SETTINGS = ("load_in_4bit", "gradient_checkpointing", "per_device_train_batch_size", "gradient_accumulation_steps", "precompute_ref_log_probs", "attn_implementation", "group_by_length", "liger")


def load_measurements(dirs: list[Path]) -> list[dict[str, Any]]:
    """Every ok variant in benchmark results, newest file first: {file, gpu, arch, variant}.

    Two layouts: bench_dpo.py's report files (schema alignpress-bench/1 with runs[]), in <dir> or a
    dated folder under it (e.g. benchmarks/results/2026-11-27-h200/H200-2026-11-27.json), and
    folders of worker files (one variant object each, as `bench_dpo.py --worker` writes them) with an
    index.json naming each file's model (e.g. benchmarks/results/2026-11-26-h200/).
    """
    found: list[dict[str, Any]] = []
    reports = [(f, f.name) for d in dirs if d.is_dir() for f in d.glob("*.json")]
    reports += [(f, f"{f.parent.name}/{f.name}") for d in dirs if d.is_dir() for f in d.glob("*/*.json") if f.name != "index.json"]
    for f, name in sorted(reports, key=lambda x: x[1], reverse=True):
        try:
            report = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        if report.get("schema") != BENCH_SCHEMA:
            continue
        for run in report.get("runs", []):
            shape = run["architecture"] | {"model_type": "phi3" if run["architecture"].get("config") == "Phi3Config" else ""}
            for v in run.get("variants", []):
                found.append({"file": name, "gpu": run.get("device", {}).get("gpu"), "arch": arch_from_config(shape), "variant": v})
    indexes = sorted((i for d in dirs if d.is_dir() for i in d.glob("*/index.json")), key=lambda i: i.parent.name, reverse=True)
    for index_path in indexes:
        try:
            index = json.loads(index_path.read_text())
        except (OSError, ValueError):
            continue
        for name, meta in index.get("files", {}).items():
            try:
                v = json.loads((index_path.parent / name).read_text())
            except (OSError, ValueError):
                continue
            arch = KNOWN_ARCHS.get(meta.get("model", ""))
            if arch is not None:
                found.append({"file": f"{index_path.parent.name}/{name}", "gpu": v.get("device", {}).get("gpu"), "arch": arch, "variant": v})
    return [m for m in found if m["variant"].get("status") == "ok"]


EAGER_SOURCE = "measured with train.compile_layers off (compiled layers not measured yet)"


def measured_mfu(arch: Arch, want: dict[str, Any], gpu: str, dirs: list[Path]) -> tuple[float, str, dict[str, Any]] | None:
    """A measured MFU for this architecture, GPU and settings (recipe_settings) from benchmark results:
    measured on this GPU, else on another GPU with the same die (gpus.json `chip`: an H200
    measurement stands for the H100, which has its compute and peak FLOP/s but less memory
    bandwidth, so the number is an upper bound there and says where it comes from)."""
    keys = ("hidden", "layers", "heads", "kv_heads", "intermediate", "vocab")
    gpus = load_table("gpus.json")["gpus"]
    chip = gpus.get(gpu, {}).get("chip")
    matches = [m for m in load_measurements(dirs) if not any(getattr(m["arch"], k) != getattr(arch, k) for k in keys)]
    same_gpu = [m for m in matches if m["gpu"] == gpu]
    same_chip = [m for m in matches if m["gpu"] != gpu and chip and gpus.get(m["gpu"] or "", {}).get("chip") == chip]
    for m in same_gpu + same_chip:
        v = m["variant"]
        got = SETTING_DEFAULTS | v.get("settings", {})
        if v["results"].get("mfu") and all(k in got for k in CORE_SETTINGS) and all(got[k] == want[k] for k in want if k in got):
            r = v["results"]
            where = "" if m["gpu"] == gpu else f" on the {m['gpu']} (same {chip} die)"
            return r["mfu"], f"measured{where}: {m['file']}, variant {v['name']}", r
    return None


# ---------------------------------------------------------------------------------------------
# The plan


def project(train_flops: float, precompute_flops: float, peak_tflops: float, mfu: float, precompute_mfu: float, prices: dict[str, Any]) -> dict[str, Any]:
    """Seconds = FLOPs / (peak FLOP/s x MFU); dollars = GPU-hours x the price per GPU-hour of each tier."""
    train_s = train_flops / (peak_tflops * 1e12 * mfu)
    pre_s = precompute_flops / (peak_tflops * 1e12 * precompute_mfu) if precompute_flops else 0.0
    hours = (train_s + pre_s) / 3600
    out: dict[str, Any] = {"train_s": train_s, "precompute_s": pre_s, "gpu_hours": hours}
    for tier in TIERS:
        offer = prices.get(tier)
        out[f"usd_{tier}"] = hours * offer["usd"] if offer else None
    return out


def recommend(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """For each tier, the cheapest GPU whose memory estimate fits with 10% to spare (ties: the faster)."""
    out: dict[str, Any] = {}
    for tier in TIERS:
        ok = [r for r in rows if r["fits"] and not r["tight"] and r[f"usd_{tier}"] is not None]
        best = min(ok, key=lambda r: (r[f"usd_{tier}"], r["wall_hours"]), default=None)
        out[tier] = None if best is None else {"gpu": best["gpu"], "usd": best[f"usd_{tier}"], "wall_hours": best["wall_hours"], "price": best[f"price_{tier}"]}
    return out


SKY_TASKS = BENCH_RESULTS.parents[1] / "sky"


def sky_task_for(recipe: Recipe, gpus: dict[str, Any], folder: Path = SKY_TASKS) -> dict[str, Any] | None:
    """The shipped one-GPU SkyPilot task that runs this recipe (envs.RECIPE), and the GPUs it offers
    per tier, as gpus.json names them; None when no such task file runs it (or there is no sky/ here)."""
    if recipe.source is None or not folder.is_dir():
        return None
    by_sky = {info.get("sky_name"): name for name, info in gpus.items()}
    for task in sorted(folder.glob("*.yaml")):
        try:
            spec = yaml.safe_load(task.read_text()) or {}
            runs = (spec.get("envs") or {}).get("RECIPE")
            if not runs or (folder.parent / runs).resolve() != Path(recipe.source).resolve() or int(spec.get("num_nodes") or 1) > 1:
                continue
            offered: dict[str, list[str]] = {"on_demand": [], "spot": []}
            for c in (spec.get("resources") or {}).get("any_of") or []:
                kind, _, count = str(c.get("accelerators", "")).partition(":")
                name = by_sky.get(kind)
                if name and count in ("", "1"):
                    offered["spot" if c.get("use_spot") else "on_demand"].append(name)
        except (OSError, yaml.YAMLError, AttributeError):
            continue
        return {"task": f"sky/{task.name}", "offers": offered, "disk_gb": (spec.get("resources") or {}).get("disk_size")}
    return None


def disk_need(recipe: Recipe, arch: Arch, pairs: int) -> dict[str, Any]:
    """What the run writes on a new machine (a cloud VM): alignpress.disk's lower bounds, the ones
    `run` checks at the door, with nothing cached or written yet: the base model's download, the
    checkpoints, the trained weights and the merged model, from the architecture's parameter counts,
    weights stored in 16 bits. A judge (eval.judge) is not counted: plan reads no config for it."""
    from .checks import ModelSizes
    from .disk import estimate
    from .runstate import RunDir

    lora = arch.lora_params(recipe.lora.r, recipe.lora.target_modules) if recipe.lora.enabled else None
    sizes = ModelSizes(params=arch.total_params, trainable=lora or arch.total_params, stored_bytes=2)
    train_bytes = 4 if recipe.model.dtype == "float32" or full_weights_in_fp32(recipe) else 2
    writes = estimate(recipe, RunDir(default_output_dir(recipe.name)), ["train", "evaluate", "export"], sizes, train_bytes=train_bytes, pairs=pairs, fresh=True)
    parts = [part for w in writes for part in w.parts]
    if recipe.eval.enabled and recipe.eval.judge:
        parts.append(f"not counted: the judge {recipe.eval.judge}'s download")
    return {"need_bytes": sum(w.need for w in writes), "parts": parts}


def plan(recipe: Recipe, run_root: Path, *, gpu: str = "A100-40GB", tokens_from: str | None = None, prices: str | None = None, bench_dirs: list[Path] | None = None) -> dict[str, Any]:
    gpus = load_table("gpus.json")["gpus"]
    if gpu not in gpus:
        raise AlignpressError(f"unknown GPU {gpu!r}; known: {', '.join(gpus)}")
    arch, arch_source = resolve_arch(recipe, run_root)
    data = load_tokens(recipe, run_root, tokens_from)
    price_table, price_source, price_notes = load_prices(prices, gpus)
    throughput = load_table("throughput.json")
    t, d = recipe.train, recipe.dpo
    lora_r = recipe.lora.r if recipe.lora.enabled else None
    kw = {"lora_r": lora_r, "lora_targets": recipe.lora.target_modules}
    notes: list[str] = list(price_notes) + ([data["other_recipe"]] if data["other_recipe"] else [])

    # Tokens and FLOPs of one epoch
    stats = data["stats"]
    if data["rows"] is not None:
        pairs_in = data["rows"]
        notes.append(f"per-pair token counts from {data['rows_source']} (truncated to dpo.max_length as TRL does)")
    else:
        # Only the summary: one pair of the mean shape stands for every pair (attention, which
        # grows with the square of the length, is then underestimated for long-tailed data).
        mean = (round(stats["prompt"]["mean"]), round(stats["chosen"]["mean"]), round(stats["rejected"]["mean"]))
        pairs_in = [mean] * stats["pairs"]
        notes.append(f"only {data['source']}: FLOPs from the mean pair ({mean[0]} prompt, {mean[1]} chosen, {mean[2]} rejected tokens)")
    full_epoch = dataset_flops(arch, pairs_in, d.max_length, reference=True, **kw)
    train_epoch = dict(full_epoch)
    if data["rows"] is None:
        train_epoch["tokens"] = stats["tokens_per_epoch"]  # exact count from prepare (not truncated)
    kept_pairs = train_epoch["pairs"]
    if kept_pairs == 0:
        raise AlignpressError(f"every training pair's prompt is at least dpo.max_length ({d.max_length}) tokens: TRL would drop them all", source=recipe.source, field="dpo.max_length")
    processes = t.num_processes or 1
    pairs_per_step = t.per_device_train_batch_size * t.gradient_accumulation_steps * processes
    if t.max_steps > 0:
        epochs = t.max_steps * pairs_per_step / kept_pairs
        steps = t.max_steps
    else:
        epochs = t.num_train_epochs
        steps = math.ceil(epochs * math.ceil(kept_pairs / pairs_per_step))
    if d.precompute_ref_log_probs == "auto":
        decision = precompute_decision(epochs)
        precompute = decision["precompute_ref_log_probs"]
        notes.append(f"dpo.precompute_ref_log_probs auto: {decision['reason']}")
    else:
        precompute = d.precompute_ref_log_probs
    if precompute:  # the reference forward leaves the steps and runs once, before training
        train_epoch["total"] -= train_epoch["reference_forward"]
        train_epoch["reference_forward"] = 0.0
    pre_flops = full_epoch["reference_forward"] if precompute else 0.0
    run_flops = train_epoch["total"] * epochs + pre_flops
    run_tokens = train_epoch["tokens"] * epochs

    # Memory: the worst micro-batch pads every row to the longest sequence the data allows
    if data["rows"] is not None:
        lengths = [length for p, c, r in pairs_in if (s := truncate_pair(p, c, r, d.max_length)) for length, _ in s]
        longest = max(lengths)
    else:
        longest = stats["prompt"]["max"] + max(stats["chosen"]["max"], stats["rejected"]["max"])
        longest = min(longest, d.max_length) if d.max_length else longest
    weights = "nf4" if recipe.model.load_in_4bit else ("fp32" if recipe.model.dtype == "float32" or full_weights_in_fp32(recipe) else "bf16")
    settings = MemorySettings(
        weights=weights,
        lora_r=lora_r,
        lora_targets=recipe.lora.target_modules,
        optimizer_bits="8bit" if "8bit" in t.optim else "32bit",
        gradient_checkpointing=t.gradient_checkpointing is True,
        checkpointed_layers=t.checkpointed_layers,
        micro_batch_pairs=t.per_device_train_batch_size,
        seq_len=longest,
        precompute_ref=precompute,
        attn_implementation=recipe.model.attn_implementation,
        liger=t.use_liger_kernel,
    )
    if d.prefix_sharing:
        # the packed rows that bound a micro-batch of the prepared pairs; from the summary alone, a
        # segment is at most the longest prompt + both longest answers + 1, and two full sequences
        batch = t.per_device_train_batch_size
        if data["rows"] is not None:
            rows_, length_ = packed_layout(pairs_in, d.max_length, batch, d.pairs_per_row, d.truncation_mode)
        else:
            segment = stats["prompt"]["max"] + stats["chosen"]["max"] + stats["rejected"]["max"] + 1
            segment = min(segment, 2 * d.max_length) if d.max_length else segment
            rows_ = math.ceil(batch / d.pairs_per_row)
            length_ = math.ceil(segment * min(d.pairs_per_row, batch) / MASK_ALIGN) * MASK_ALIGN
        settings = replace(settings, packed_rows=rows_, packed_len=length_)

    def checkpointing_for(name: str) -> tuple[int, str | None]:
        """Decoder layers that recompute on this GPU (0: checkpointing off): as the recipe sets
        train.gradient_checkpointing and train.checkpointed_layers, or `auto` decided as train does."""
        if t.gradient_checkpointing != "auto":
            return (min(t.checkpointed_layers or arch.layers, arch.layers) if t.gradient_checkpointing else 0), None
        decision = checkpointing_decision(arch, settings, gpus[name]["memory_gib"])
        return decision["checkpointed_layers"], decision["reason"]

    shares: dict[str, float] = {}

    def recomputed_share(name: str, layers: int) -> float:
        """Share of the policy forward recomputed on this GPU: `auto` with the prepared pairs at hand
        sizes each micro-batch's count from its own shape (as train does); otherwise every batch
        recomputes `layers`, the longest batch's count (an upper bound for auto)."""
        if not layers:
            return 0.0
        if t.gradient_checkpointing != "auto" or t.checkpointed_layers is not None or data["rows"] is None:
            return layers / arch.layers
        if name not in shares:
            shares[name] = recompute_share(arch, settings, pairs_in, gpus[name]["memory_gib"], max_length=d.max_length, truncation_mode=d.truncation_mode,
                                           prefix=d.prefix_sharing, pairs_per_row=d.pairs_per_row, sort=t.group_by_length, seed=t.seed)
        return shares[name]

    def with_checkpointing(layers: int) -> MemorySettings:
        return replace(settings, gradient_checkpointing=layers > 0, checkpointed_layers=layers if 0 < layers < arch.layers else None)

    ckpt, ckpt_reason = checkpointing_for(gpu)
    if ckpt_reason:
        notes.append(f"train.gradient_checkpointing auto on the {gpu}: {ckpt_reason}")
    mem = memory_estimate(arch, with_checkpointing(ckpt))

    # Padding, for the throughput estimate
    if data["rows"] is not None:
        flat = [x for p, c, r in pairs_in if (s := truncate_pair(p, c, r, d.max_length)) for x in (s[0][0], s[1][0])]
        pad_source = "the prepared pairs, seeded random batches"
    else:
        dist = LengthDistribution(prompt_median=stats["prompt"]["median"], answer_median=(stats["chosen"]["median"] + stats["rejected"]["median"]) / 2)
        flat = [x for p, c, r in dist.sample(2000, t.seed) if (s := truncate_pair(p, c, r, d.max_length)) for x in (s[0][0], s[1][0])]
        pad_source = "a lognormal with the data's medians (alignpress.flops.LengthDistribution), seeded random batches"
    padding = padding_fraction(flat, t.per_device_train_batch_size, seed=t.seed, sort=t.group_by_length)
    if t.group_by_length:
        pad_source = pad_source.replace("seeded random batches", "length-grouped batches (train.group_by_length)")

    # Throughput model (estimate) and its factors
    def mfu_factors(share: float, pad: float | None = None, model: float | None = None) -> dict[str, float]:
        factors = {"base": throughput["base_mfu"]}
        if model is not None:
            factors["model"] = model
        if share:
            # each recomputed layer runs its part of the policy forward once more
            factors["gradient_checkpointing"] = train_epoch["total"] / (train_epoch["total"] + train_epoch["policy_forward"] * share)
        if recipe.model.load_in_4bit:
            factors["load_in_4bit"] = throughput["load_in_4bit_factor"]
        factors["padding"] = 1 - (padding if pad is None else pad)
        return factors

    bench = bench_dirs if bench_dirs is not None else [BENCH_RESULTS]
    found_on: dict[str, tuple[int, tuple[float, str, dict[str, Any]] | None]] = {}
    for name in gpus:
        row_ckpt = checkpointing_for(name)[0]
        want = recipe_settings(recipe, row_ckpt > 0, precompute, row_ckpt if 0 < row_ckpt < arch.layers else None)
        found = measured_mfu(arch, want, name, bench)
        if found is None and want["compile_layers"]:
            # No run compiled its layers yet: the same settings measured eager are the evidence at
            # hand (a floor if compiling is no slower, as the CPU proxy has it); said so in the row.
            eager = measured_mfu(arch, want | {"compile_layers": False}, name, bench)
            if eager is not None:
                found = (eager[0], f"{EAGER_SOURCE}{eager[1].removeprefix('measured')}", eager[2])
        found_on[name] = (row_ckpt, found)

    # The base MFU is one fit to Phi-3-mini. Where this model was measured with the recipe's settings
    # (on that GPU itself), the estimate for the other GPUs takes the model's own efficiency from it:
    # measured MFU over the estimate for that run (its GPU, its benchmark's padding). Gemma-2b's
    # 256k-vocabulary head makes it 0.56 of the fit on the H200.
    calibration = None
    for name, (row_ckpt, found) in found_on.items():
        if found and found[1].startswith("measured:") and found[2].get("padding_fraction") is not None:
            expected = math.prod(mfu_factors(recomputed_share(name, row_ckpt), pad=found[2]["padding_fraction"]).values())
            calibration = {"factor": found[0] / expected, "gpu": name, "source": found[1].removeprefix("measured: "), "measured_mfu": found[0], "expected_mfu": expected}
            notes.append(f"estimates scaled by {calibration['factor']:.3f}, this model's measured MFU on the {name} ({found[0]:.4f}) over the "
                         f"estimate for that run ({expected:.4f}; {calibration['source']})")
            break
    model_factor = calibration["factor"] if calibration else None

    factors = mfu_factors(recomputed_share(gpu, ckpt), model=model_factor)
    estimated = math.prod(factors.values())
    pre_mfu = throughput["base_mfu"] * (model_factor or 1.0) * factors.get("load_in_4bit", 1.0) * factors["padding"]

    rows = []
    for name in gpus:
        info = gpus[name]
        row_ckpt, found = found_on[name]
        row_mem = mem if name == gpu else memory_estimate(arch, with_checkpointing(row_ckpt))
        measured = found[2] if found else None
        mfu, source = found[:2] if found else (math.prod(mfu_factors(recomputed_share(name, row_ckpt), model=model_factor).values()), "estimate: not measured")
        price = offer_prices(price_table["gpus"].get(name))
        row_pre_mfu, pre_source = pre_mfu, "estimate: not measured"
        if pre_flops and measured and measured.get("precompute_tokens") and measured.get("setup_s"):
            # the measured pass: its tokens over the trainer setup it ran in (an upper bound on its
            # time), less the hash of the weights that keys the stored log-probs where it was timed apart
            hashing = measured.get("hash_s") or 0.0
            rate = measured["precompute_tokens"] / (measured["setup_s"] - hashing)
            row_pre_mfu = rate * (pre_flops / train_epoch["tokens"]) / (info["peak_bf16_tflops"] * 1e12)
            spent = f"{measured['setup_s']} s of setup" + (f" less {hashing} s hashing the weights" if hashing else "")
            pre_source = f"measured: {rate:,.0f} tokens/s ({measured['precompute_tokens']:,} tokens in {spent})"
        cost = project(train_epoch["total"] * epochs, pre_flops, info["peak_bf16_tflops"], mfu, row_pre_mfu, price)
        train_s, pre_s, gpu_hours = cost["train_s"], cost["precompute_s"], cost["gpu_hours"]
        row = {
            "gpu": name,
            "memory_gib": info["memory_gib"],
            "estimate_gib": row_mem["total_gib"],
            "fits": row_mem["total_gib"] <= info["memory_gib"],
            "tight": WARN_SHARE * info["memory_gib"] < row_mem["total_gib"] <= info["memory_gib"],
            "gradient_checkpointing": row_ckpt > 0,
            "checkpointed_layers": row_ckpt,
            "recomputed_share": round(recomputed_share(name, row_ckpt), 4),
            "measured": None if measured is None else {k: measured.get(k) for k in ("tokens_per_s", "mfu", "peak_memory_gib", "setup_s", "hash_s", "precompute_tokens")},
            "peak_bf16_tflops": info["peak_bf16_tflops"],
            "mfu": mfu,
            "mfu_source": source,
            "tokens_per_s": run_tokens / train_s,
            "precompute_s": pre_s,
            "precompute_source": pre_source if pre_flops else None,
            "gpu_hours": gpu_hours,
            "wall_hours": gpu_hours / processes,
        }
        for tier in TIERS:
            row[f"usd_{tier}"] = cost[f"usd_{tier}"]
            row[f"price_{tier}"] = price[tier]
        rows.append(row)

    chosen = next(r for r in rows if r["gpu"] == gpu)
    warnings = []
    sky = sky_task_for(recipe, gpus)
    disk = disk_need(recipe, arch, kept_pairs)
    if sky and sky.get("disk_gb") and disk["need_bytes"] > sky["disk_gb"] * 2**30:
        warnings.append(f"{sky['task']} asks for a {sky['disk_gb']} GB disk, less than the {size_text(disk['need_bytes'])} this run writes (the image and the "
                        "pip and dataset caches come on top): raise its resources.disk_size, or launch it with --disk-size")
    if chosen["tight"]:
        warnings.append(f"the memory estimate ({mem['total_gib']:.1f} GiB) is above {WARN_SHARE:.0%} of the {gpu}'s {gpus[gpu]['memory_gib']} GiB: an out-of-memory error is possible")
    if processes > 1:
        notes.append(f"{processes} processes (train.num_processes): wall time assumes perfect scaling; cost counts every GPU")
    return {
        "recipe": recipe.name,
        "source": recipe.source,
        "status": "estimate: not measured" if any(r["mfu_source"].startswith("estimate") for r in rows) else "measured throughput",
        "model": {"id": recipe.model.name_or_path, "arch": asdict(arch), "arch_source": arch_source, "params": arch.total_params, "lora_params": arch.lora_params(lora_r, recipe.lora.target_modules) if lora_r else None},
        "data": {"source": data["source"], "pairs": stats["pairs"], "pairs_kept": kept_pairs, "dropped_pairs": train_epoch["dropped_pairs"], "tokens_per_epoch": train_epoch["tokens"], "longest_sequence": longest, "padding_fraction": padding, "padding_source": pad_source},
        "run": {
            "epochs": epochs,
            "optimizer_steps": steps,
            "tokens": run_tokens,
            "flops": run_flops,
            "flops_per_token": train_epoch["total"] / train_epoch["tokens"],
            "policy_forward_per_token": train_epoch["policy_forward"] / train_epoch["tokens"],
            "policy_backward_per_token": train_epoch["policy_backward"] / train_epoch["tokens"],
            "reference_forward_per_token": train_epoch["reference_forward"] / train_epoch["tokens"],
            "precompute_flops": pre_flops,
        },
        "memory": mem | {"gpu": gpu},
        "disk": disk,
        # what the stages hold in host memory at least, the lower bounds `run` checks at the door (alignpress.hostmemory)
        "host_memory": [{"stage": stage, "need_bytes": need, "what": what} for stage, _, need, what in hostmemory.needs(
            recipe, ["train", "export"], arch.total_params, arch.lora_params(recipe.lora.r, recipe.lora.target_modules) if recipe.lora.enabled else arch.total_params)],
        "throughput": {"estimated_mfu": estimated, "factors": factors, "calibration": calibration, "assumptions": {k: v for k, v in throughput.items() if not isinstance(v, (int, float))}},
        "gpus": rows,
        "prices": {"file": price_source},
        "recommendation": recommend(rows),
        "sky_task": sky,
        "warnings": warnings,
        "notes": notes,
        "refuse": None if chosen["fits"] else (
            f"the memory estimate ({mem['total_gib']:.1f} GiB) exceeds the {gpu}'s {gpus[gpu]['memory_gib']} GiB. "
            "Choose a larger GPU (--gpu), or lower the peak: "
            # Suggested only when the estimate does not already recompute every layer (auto or true).
            + ("" if ckpt == arch.layers else "train.gradient_checkpointing=true, ")
            + "a smaller train.per_device_train_batch_size (raise gradient_accumulation_steps to keep the pairs per step), "
            "a smaller dpo.max_length, or model.load_in_4bit=true"
        ),
    }


# ---------------------------------------------------------------------------------------------
# Output


def _si(x: float, unit: str = "") -> str:
    """3.82 B, 25.2 M, 512 k: three significant figures, no exponent."""
    for scale, prefix in ((1e9, "G" if unit else "B"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {prefix}{unit}"
    return f"{x:.3g} {unit}".rstrip()


def _usd(x: float | None) -> str:
    return "n/a" if x is None else f"${x:,.2f}"


def checkpointing_text(layers: int | None, of: int) -> str:
    return ", gradient checkpointing" + (f" ({layers} of {of} layers)" if layers is not None and layers < of else "")


def format_plan(p: dict[str, Any]) -> str:
    m, data, run, mem = p["model"], p["data"], p["run"], p["memory"]
    arch = m["arch"]
    lora = f"LoRA r={mem['settings']['lora_r']}: {_si(m['lora_params'])} trainable" if m["lora_params"] else "full fine-tuning"
    parts = mem["parts_gib"]
    s = mem["settings"]
    weights = {"nf4": "4-bit NF4", "bf16": "bf16", "fp32": "fp32"}[s["weights"]]
    lines = [
        f"plan      {p['recipe']}  ({p['source']})",
        f"model     {m['id']}: {arch['name']}, {_si(m['params'])} parameters, {arch['layers']} layers; {lora}  [{m['arch_source']}]",
        f"data      {data['pairs_kept']:,} pairs, {data['tokens_per_epoch']:,} tokens/epoch (non-padding, chosen + rejected rows)  [{data['source']}]",
    ]
    if data["dropped_pairs"]:
        lines.append(f"          {data['dropped_pairs']:,} pairs dropped by TRL: their prompt alone fills dpo.max_length")
    lines += [
        f"run       {run['epochs']:g} epochs = {run['tokens']:,.0f} tokens, {run['optimizer_steps']:,} optimizer steps",
        f"FLOPs     {_si(run['flops_per_token'], 'FLOP')}/token (policy forward {_si(run['policy_forward_per_token'], 'FLOP')} + backward {_si(run['policy_backward_per_token'], 'FLOP')} + reference forward {_si(run['reference_forward_per_token'], 'FLOP')})"
        f" = {run['flops']:.3e} FLOPs for the run" + (f" (incl. {run['precompute_flops']:.3e} precomputing reference log-probs)" if run["precompute_flops"] else ""),
        f"memory    {mem['total_gib']:.1f} GiB estimated peak (not measured) for {s['micro_batch_pairs']} pair{'s' if s['micro_batch_pairs'] != 1 else ''}"
        + (f" = {s['packed_rows']} packed rows x {s['packed_len']:,} tokens" if s.get("packed_rows") else f" = {2 * s['micro_batch_pairs']} rows x {s['seq_len']:,} tokens") + f", {weights}" + (checkpointing_text(s["checkpointed_layers"], arch["layers"]) if s["gradient_checkpointing"] else ", no gradient checkpointing"),
        "          = (" + " + ".join(f"{k.replace('_', ' ')} {v:.2f}" for k, v in parts.items()) + f" = {mem['subtotal_gib']:.2f} GiB) x 1.10 + 1 GiB CUDA context",
    ]
    if mem["full_logits_gib"] >= 1:
        lines.append(f"          (TRL 1.16 scores tokens through the LM head in tiles; the seed's TRL built these rows' fp32 logits whole: {mem['full_logits_gib']:.1f} GiB more)")
    sky = p.get("sky_task") or {}
    lines.append(f"disk      at least {size_text(p['disk']['need_bytes'])} written on a new machine: " + "; ".join(p["disk"]["parts"])
                 + (f"; {sky['task']} asks for {sky['disk_gb']} GB" if sky.get("disk_gb") else ""))
    for held in p["host_memory"]:
        lines.append(f"host RAM  at least {size_text(held['need_bytes'])} available for {held['stage']} ({held['what']}; `run` checks it at the door)")
    lines += [
        "",
        f"{'GPU':<10} {'memory':<19} {'throughput':<40} {'time':>8}  {'on-demand':<22} spot",
    ]
    for r in p["gpus"]:
        fit = "ok" if r["fits"] and not r["tight"] else ("tight" if r["fits"] else "NO")
        src = "measured" if r["mfu_source"].startswith("measured") else "estimate"
        if (other := re.search(r"measured.* on the (\S+) \(same", r["mfu_source"])):
            src = f"{other.group(1)}'s"  # measured on another GPU with the same die
        if r["mfu_source"].startswith(EAGER_SOURCE):
            src = "eager" if src == "measured" else f"{src} eager"
        through = f"{r['tokens_per_s']:,.0f} tok/s (MFU {r['mfu']:.3f}, {src})"
        od, sp = r["price_on_demand"], r["price_spot"]
        cost_od = f"{_usd(r['usd_on_demand'])} @ ${od['usd']:.2f}/h" if od else "n/a"
        cost_sp = f"{_usd(r['usd_spot'])} @ ${sp['usd']:.2f}/h" if sp else "n/a"
        memory = f"{r['estimate_gib']:.1f}/{r['memory_gib']:g} GiB {fit}"
        lines.append(f"{r['gpu']:<10} {memory:<19} {through:<40} {r['wall_hours']:>6.2f} h  {cost_od:<22} {cost_sp}".rstrip())
    lines += ["", *format_recommendation(p["recommendation"], p.get("sky_task"), {g: i.get("sky_name") for g, i in load_table("gpus.json")["gpus"].items()})]
    f = p["throughput"]["factors"]
    lines += [
        "",
        "throughput: " + ("measured MFU where a row says so; otherwise " if p["status"] != "estimate: not measured" or any(r["mfu_source"].startswith("measured") for r in p["gpus"]) else "")
        + "estimate, not measured: MFU = " + " x ".join(f"{v:.3f} {k.replace('_', ' ')}" for k, v in f.items())
        + " (src/alignpress/data/throughput.json; replace with `make bench` on a GPU)",
        f"padding:   {data['padding_fraction']:.3f} of the positions, from {data['padding_source']}",
        f"prices:    {p['prices']['file']}: one-GPU machines, each row's on-demand and spot price from one provider and date (in --json: price_on_demand, price_spot); override with --prices table|sky|FILE",
        "time:      training only, one process per GPU; model loading, evaluation, export and upload come on top",
    ]
    for r in p["gpus"]:
        if r["mfu_source"].startswith("measured"):
            m = r["measured"] or {}
            at = f": {m['tokens_per_s']:,.0f} tokens/s, MFU {m['mfu']:.4f}, peak {m['peak_memory_gib']:.2f} GiB on the benchmark's synthetic data" if m.get("tokens_per_s") else ""
            lines.append(f"           {r['gpu']}: {r['mfu_source']}{at}")
            if (r.get("precompute_source") or "").startswith("measured"):
                lines.append(f"           {r['gpu']}: precompute pass {r['precompute_source'].removeprefix('measured: ')}: {r['precompute_s'] / 60:.1f} min for this data")
            elif r.get("precompute_source"):
                lines.append(f"           {r['gpu']}: precompute pass not measured for these settings: {r['precompute_s'] / 60:.1f} min for this data (estimate)")
    lines += [f"note:      {n}" for n in p["notes"]]
    lines += [f"warning:   {w}" for w in p["warnings"]]
    return "\n".join(lines)


def format_recommendation(rec: dict[str, Any], sky: dict[str, Any] | None = None, sky_names: dict[str, str] | None = None) -> list[str]:
    """One line per tier: the GPU, its projected time and cost, and whose price that is; and, where the
    shipped sky task does not offer that GPU, how to ask SkyPilot for it."""
    lines = []
    for tier, label in (("on_demand", "on-demand"), ("spot", "spot")):
        r = rec[tier]
        if r is None:
            lines.append(f"recommend {label + ':':<11}none: no priced GPU fits the memory estimate with 10% to spare")
            continue
        pr = r["price"]
        where = ", ".join(str(x) for x in (pr.get("provider"), pr.get("product"), pr.get("region")) if x)
        lines.append(f"recommend {label + ':':<11}{r['gpu']}, {r['wall_hours']:.2f} h, {_usd(r['usd'])} ({where}: ${pr['usd']:.4g}/h as of {pr.get('as_of')})")
        offered = (sky or {}).get("offers", {}).get(tier)
        if offered and r["gpu"] not in offered:
            flag = "--use-spot" if tier == "spot" else "--no-use-spot"
            lines.append(
                f"{'':<21}{sky['task']} offers {', '.join(offered)} (SkyPilot takes the cheapest per hour); for the {r['gpu']}, "
                f"launch it with --gpus {(sky_names or {}).get(r['gpu'], r['gpu'])}:1 {flag} on a cloud that rents one"
            )
    return lines


# ---------------------------------------------------------------------------------------------
# Command line (hooked into cli.py)


def gpu_name(value: str, gpus) -> str:
    """--gpu as the table names it: any case, or the one name it begins (H100 -> H100-80GB)."""
    names = {g.lower(): g for g in gpus}
    hits = [g for low, g in names.items() if low == value.lower()] or [g for low, g in names.items() if low.startswith(value.lower())]
    if len(hits) != 1:
        raise argparse.ArgumentTypeError(f"{'ambiguous' if hits else 'unknown'} GPU {value!r}; known: {', '.join(gpus)}")
    return hits[0]


def add_parser(subparsers) -> argparse.ArgumentParser:
    gpus = list(load_table("gpus.json")["gpus"])
    sp = subparsers.add_parser("plan", help="tokens, FLOPs, memory, time and cost of a recipe before renting a GPU; loads no model")
    sp.add_argument("recipe", help="recipe YAML file")
    sp.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a recipe field (dotted path)")
    sp.add_argument("--output-dir", help="the run's output folder, where prepare wrote data/ (default outputs/<recipe name>)")
    sp.add_argument("--gpu", default="A100-40GB", type=lambda v: gpu_name(v, gpus), metavar="|".join(gpus),
                    help="GPU the memory check refuses or warns for (default A100-40GB); any case, and H100 for H100-80GB")
    sp.add_argument("--tokens-from", metavar="STATS_JSON", help="token counts from this data/stats.json (or a folder holding one) instead of the output folder's")
    sp.add_argument("--prices", metavar="table|sky|FILE", help="prices: `table` (src/alignpress/data/gpu_prices.json), `sky` (SkyPilot's catalog via .venv-sky or $ALIGNPRESS_SKY_PYTHON, else the table) or a FILE in the table's layout; default: SkyPilot's catalog when one is cached, else the table")
    sp.add_argument("--bench-results", metavar="DIR", action="append", help="benchmark results folder(s) to take measured MFU from (default benchmarks/results)")
    sp.add_argument("--json", action="store_true", help="print the plan as JSON")
    return sp


def main(args: argparse.Namespace) -> int:
    recipe = load_recipe(args.recipe, args.overrides)
    root = Path(args.output_dir) if args.output_dir else default_output_dir(recipe.name)
    dirs = [Path(d) for d in args.bench_results] if args.bench_results else None
    p = plan(recipe, root, gpu=args.gpu, tokens_from=args.tokens_from, prices=args.prices, bench_dirs=dirs)
    print(json.dumps(p, indent=1, default=str) if args.json else format_plan(p))
    if p["refuse"]:
        raise AlignpressError(p["refuse"], source=recipe.source)
    return 0
