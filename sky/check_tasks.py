#!/usr/bin/env python3
"""Check the SkyPilot task files offline with SkyPilot's own parser.

    .venv-sky/bin/python sky/check_tasks.py            # every sky/*.yaml
    .venv-sky/bin/python sky/check_tasks.py FILE ...   # the named files

Runs in the SkyPilot environment (.venv-sky, requirements-sky.lock), never in the job's: SkyPilot
0.14.1 and huggingface_hub 2.4 cannot share one (click pins). Needs no cloud account or network.

For each file: it parses (`sky.Task.from_yaml`, which validates SkyPilot's schema and refuses a key
given twice); the checkout is
the workdir and `setup` / `run` are exactly `bash sky/setup.sh` / `bash sky/run.sh` (the scripts
the tests execute), and the checkout guard (a file mount from sky/launch_check.py) stops a launch
from another folder; an image, if one is named, is a docker: image; every resource candidate asks for
one of A100 / A100-80GB / H100 (and L40S on one-GPU tasks), all of them offered; single-node
tasks allow spot, and every candidate has a managed-job recovery strategy; HF_TOKEN is a SkyPilot secret passed at launch (null in the
file), never a plain env; RECIPE is an env and the recipe exists; HUB_REPO and BUCKET are envs
left null (so SkyPilot refuses a launch that does not set them, before renting anything; bucket
names are global) and BUCKET names the bucket mounted at /outputs, where sky/run.sh writes; multi-node tasks go through sky/run.sh, whose `accelerate launch` takes SkyPilot's node
variables.

Prints one line per file, `ok` or `FAIL <file>: <field>: <problem>; ...`, and exits 1 on any failure.
"""
import re
import sys
from pathlib import Path

import sky
import yaml
from sky.data import storage as storage_lib

REPO = Path(__file__).resolve().parents[1]
GPU_CHOICES = {"A100", "A100-80GB", "H100"}
# One-GPU tasks also offer the L40S: `plan` finds it the cheapest per run for the seed recipes
# (tests/test_plan.py checks SkyPilot's per-hour choice against plan's per-run one).
SINGLE_NODE_CHOICES = GPU_CHOICES | {"L40S"}
SETUP = "bash sky/setup.sh"
RUN = "bash sky/run.sh"
RUN_SCRIPT = REPO / "sky" / "run.sh"
OUTPUTS = "/outputs"  # where sky/run.sh writes when BUCKET is set
# A file mount whose source, relative to the launch's folder, exists only in the checkout: SkyPilot
# stops a launch from anywhere else before renting (workdir: . would copy that folder to the VM).
GUARD = ("/tmp/alignpress-launch-check.py", "sky/launch_check.py")
# Envs each launch must set, null in the files: SkyPilot refuses a launch without them, before renting.
REQUIRED_ENVS = ("HUB_REPO", "BUCKET")
PLACEHOLDERS = {"HUB_REPO": "someone/model", "BUCKET": "alignpress-check-outputs"}
BARE_COMMANDS = {"python", "python3", "accelerate", "torchrun", "deepspeed"}
MOUNT_MODES = {storage_lib.StorageMode.MOUNT, storage_lib.StorageMode.MOUNT_CACHED}
# Multi-node: accelerate flag -> SkyPilot variable that must feed it (directly or through a shell var).
MULTINODE_FLAGS = {
    "--num_machines": "SKYPILOT_NUM_NODES",
    "--machine_rank": "SKYPILOT_NODE_RANK",
    "--main_process_ip": "SKYPILOT_NODE_IPS",
    "--num_processes": "SKYPILOT_NUM_GPUS_PER_NODE",
}


def check_resources(task, problems: list) -> str:
    candidates = list(task.resources)
    gpus, counts, spot = set(), set(), set()
    no_image, no_recovery, retried = set(), set(), set()
    for r in candidates:
        acc = r.accelerators or {}
        if len(acc) != 1:
            problems.append(f"resources.accelerators: a candidate asks for {acc or 'no GPU'}, want one GPU type")
            continue
        (name, count), = acc.items()
        gpus.add(name)
        counts.add(count)
        spot.add(r.use_spot)
        if r.image_id and not r.extract_docker_image():
            no_image.add(f"{name}:{count}")
        if not r.job_recovery or not r.job_recovery.get("strategy"):
            no_recovery.add(f"{name}:{count}")
        elif r.job_recovery.get("max_restarts_on_errors", 0) or r.job_recovery.get("recover_on_exit_codes"):
            retried.add(f"{name}:{count}")
    if no_image:
        problems.append(f"resources.image_id: candidates {sorted(no_image)} name an image_id that is not docker:IMAGE")
    if no_recovery:
        problems.append(f"resources.job_recovery: candidates {sorted(no_recovery)} have no recovery strategy")
    if retried:
        # Each retry tears the cluster down and rents and sets up a new one, for failures that recur
        # (a refusal, a failed check, out of memory); preemptions are recovered without it.
        problems.append(f"resources.job_recovery: candidates {sorted(retried)} retry failures of the job itself; "
                        "want max_restarts_on_errors 0 and no recover_on_exit_codes")
    choices = SINGLE_NODE_CHOICES if task.num_nodes == 1 else GPU_CHOICES
    if gpus - choices:
        problems.append(f"resources.any_of: unexpected GPUs {sorted(gpus - choices)}, want {sorted(choices)}")
    if choices - gpus:
        problems.append(f"resources.any_of: missing {sorted(choices - gpus)}, want all of {sorted(choices)}")
    if task.num_nodes == 1 and counts - {1}:
        problems.append(f"resources.accelerators: single-node task asks for {sorted(counts)} GPUs, want 1")
    if task.num_nodes == 1 and True not in spot:
        problems.append("resources.use_spot: single-node task offers no spot candidate")
    kinds = "+".join(k for k, on in (("spot", True in spot), ("on-demand", False in spot)) if on)
    return f"{len(candidates)} candidates ({', '.join(sorted(gpus))} x{'/'.join(map(str, sorted(counts)))}, {kinds})"


def check_envs_and_secrets(task, problems: list) -> str:
    envs = task.envs
    if "HF_TOKEN" in envs:
        problems.append("envs.HF_TOKEN: the token must not be a plain env (logged and stored); "
                        "declare it under secrets: as HF_TOKEN: null")
    refs = {ref.name for ref in task.managed_secret_refs}
    if "HF_TOKEN" in task.secrets:
        problems.append("secrets.HF_TOKEN: has a value in the file; leave it null and pass --secret HF_TOKEN at launch")
    elif "HF_TOKEN" not in refs:
        problems.append("secrets.HF_TOKEN: not declared (want `secrets: {HF_TOKEN: null}`)")
    for name in ("HUB_REPO", "RECIPE"):
        if name not in envs:
            problems.append(f"envs.{name}: missing")
    recipe = envs.get("RECIPE", "")
    if recipe:
        path = (REPO / recipe).resolve()
        if not path.is_relative_to(REPO / "recipes"):
            problems.append(f"envs.RECIPE: {recipe} is not under recipes/")
        elif not path.is_file():
            problems.append(f"envs.RECIPE: {recipe} does not exist in the repository")
    acc_config = envs.get("ACCELERATE_CONFIG")
    if acc_config and not (REPO / acc_config).is_file():
        problems.append(f"envs.ACCELERATE_CONFIG: {acc_config} does not exist in the repository")
    return recipe


def bucket_mounts(task) -> dict:
    """Mount path -> description, for buckets (storage mounts) and volumes."""
    mounts = {}
    for path, storage in task.storage_mounts.items():
        if storage.mode in MOUNT_MODES:
            name = "$BUCKET" if storage.name in (None, PLACEHOLDERS["BUCKET"]) else storage.name
            mounts[path.rstrip("/")] = f"bucket {name} ({storage.mode.value})"
    for path in task.volumes or {}:
        mounts[path.rstrip("/")] = "volume"
    for r in task.resources:
        for vol in r.volumes or []:
            mounts[str(vol.get("path", "")).rstrip("/")] = "volume"
    return mounts


def check_scripts(task, raw: dict, problems: list) -> str:
    """setup and run are the repository's scripts, run from the checkout; the bucket is BUCKET at /outputs."""
    if task.workdir != ".":
        problems.append(f"workdir: {task.workdir!r}, want '.' (the checkout, where sky/setup.sh and sky/run.sh live)")
    for field, want in (("setup", SETUP), ("run", RUN)):
        got = getattr(task, field)
        got = got.strip() if isinstance(got, str) else got
        if got != want:
            problems.append(f"{field}: {got!r}, want {want!r} (the script the tests execute)")
    # The job's interpreter by absolute path: SkyPilot's run shell activates its own ~/sky-user-env
    # (sky/skylet/constants.py, ACTIVATE_SKY_USER_ENV), whose python does not see the job's packages.
    for field in ("setup", "run"):
        text = getattr(task, field)
        for ln in (text or "").splitlines() if isinstance(text, str) else []:
            word = ln.split()[0] if ln.split() else ""
            if word in BARE_COMMANDS:
                problems.append(f"{field}: calls bare `{word}`; leave it to sky/{field}.sh (SkyPilot's shell "
                                "activates ~/sky-user-env, which lacks the job's packages)")
    envs = raw.get("envs") or {}
    for name, why in (("HUB_REPO", "the repo is the user's"), ("BUCKET", "bucket names are global")):
        if name not in envs:
            problems.append(f"envs.{name}: missing (want {name}: null, set per launch with --env {name}=...)")
        elif envs[name] is not None:
            problems.append(f"envs.{name}: has the default {envs[name]!r}; {why}: leave it null, so SkyPilot refuses a launch "
                            f"without --env {name}=... before renting anything")
    if (task.file_mounts or {}).get(GUARD[0]) != GUARD[1]:
        problems.append(f"file_mounts: no checkout guard ({GUARD[0]}: {GUARD[1]}); without it a launch from another "
                        "folder copies that folder to the VM (workdir: .) and fails there, after renting")
    mounts = bucket_mounts(task)
    if OUTPUTS not in mounts:
        problems.append(f"file_mounts: no bucket mounted at {OUTPUTS} (MOUNT or MOUNT_CACHED), where sky/run.sh writes")
    else:
        spec = ((raw.get("file_mounts") or {}).get(OUTPUTS) or {})
        if not isinstance(spec, dict) or str(spec.get("name", "")).strip() not in ("${BUCKET}", "$BUCKET"):
            problems.append(f"file_mounts.{OUTPUTS}.name: want ${{BUCKET}} (the bucket the user names at launch)")
    if task.num_nodes > 1:
        flat = RUN_SCRIPT.read_text().replace("\\\n", " ")
        for flag, var in MULTINODE_FLAGS.items():
            m = re.search(re.escape(flag) + r"[ =]+(\"[^\"]*\"|\S+)", flat)
            if not m:
                problems.append(f"sky/run.sh: multi-node launch does not pass {flag}")
                continue
            value = m.group(1)
            # Follow one level of shell variable (HEAD_IP=$(... SKYPILOT_NODE_IPS ...), NODES=...), in
            # arithmetic too ($((NODES * GPUS))).
            for local in re.findall(r"\b([A-Z][A-Z0-9_]*)\b", value):
                assign = re.search(r"^\s*" + local + r"=(.*)$", flat, re.M)
                if assign:
                    value += " " + assign.group(1)
            if var not in value:
                problems.append(f"sky/run.sh: {flag} is not derived from ${var}")
        if "--main_process_port" not in flat:
            problems.append("sky/run.sh: multi-node launch does not pass --main_process_port")
    return f"output {OUTPUTS}/$RUN_NAME on {mounts[OUTPUTS]}" if OUTPUTS in mounts else ""


def _first(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else ""


def check_file(path: Path) -> tuple:
    problems = []
    try:  # SkyPilot's parser also refuses a key given twice (a second `envs:` would drop the first)
        task = sky.Task.from_yaml(str(path))
        required = []
    except ValueError as e:
        # The envs a user must give (null in the file): parse again as a launch that sets them does.
        required = [k for k in REQUIRED_ENVS if f"Environment variable {k!r} is None" in str(e)]
        if not required:
            return [f"parse: {type(e).__name__}: {_first(e)}"], ""
        try:
            raw = yaml.safe_load(path.read_text()) or {}
            overrides = [(k, PLACEHOLDERS[k]) for k in REQUIRED_ENVS if (raw.get("envs") or {}).get(k, "") is None]
            task = sky.Task.from_yaml_config(raw, env_overrides=overrides)
        except Exception as e:  # noqa: BLE001
            return [f"parse: {type(e).__name__}: {_first(e)}"], ""
    except Exception as e:  # SkyPilot raises jsonschema errors, StorageSpecError, ...
        return [f"parse: {type(e).__name__}: {_first(e)}"], ""
    resources = check_resources(task, problems)
    recipe = check_envs_and_secrets(task, problems)
    raw = yaml.safe_load(path.read_text()) or {}
    output = check_scripts(task, raw, problems)
    nodes = f"{task.num_nodes} node{'s' if task.num_nodes > 1 else ''}"
    return problems, f"{nodes}, {resources}, recipe {recipe}, {output}"


def main(argv: list) -> int:
    paths = [Path(p) for p in argv] or sorted((REPO / "sky").glob("*.yaml"))
    if not paths:
        print("FAIL no task files found in sky/")
        return 1
    failed = 0
    for path in paths:
        try:
            shown = path.resolve().relative_to(REPO)
        except ValueError:
            shown = path
        problems, summary = check_file(path)
        if problems:
            failed += 1
            print(f"FAIL {shown}: " + "; ".join(problems))
        else:
            print(f"ok   {shown}: {summary}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
