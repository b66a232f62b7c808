#!/usr/bin/env python3
"""Check the SkyPilot task files offline with SkyPilot's own parser.

    .venv-sky/bin/python sky/check_tasks.py            # every sky/*.yaml
    .venv-sky/bin/python sky/check_tasks.py FILE ...   # the named files

Runs in the SkyPilot environment (.venv-sky, requirements-sky.lock), never in the job's: SkyPilot
0.14.1 and huggingface_hub 2.4 cannot share one (click pins). Needs no cloud account or network.

For each file: it parses (`sky.Task.from_yaml`, which validates SkyPilot's schema); every resource
candidate runs the job image (image_id docker:...) and asks for one of A100 / A100-80GB / H100, all
three offered; single-node tasks allow spot, and every candidate has a managed-job recovery
strategy; HF_TOKEN is a SkyPilot secret passed at launch (null in the file), never a plain env;
HUB_REPO and RECIPE are envs and the recipe exists; a bucket is mounted and the run writes its
--output-dir inside it; the run script starts with guards that stop it when HUB_REPO or HF_TOKEN is
empty and calls the image's python by absolute path; multi-node tasks wire SkyPilot's node
variables into `accelerate launch`.

Prints one line per file, `ok` or `FAIL <file>: <field>: <problem>; ...`, and exits 1 on any failure.
"""
import re
import sys
from pathlib import Path

import sky
from sky.data import storage as storage_lib

REPO = Path(__file__).resolve().parents[1]
GPU_CHOICES = {"A100", "A100-80GB", "H100"}
# Variables the run must refuse to start without, in the order of its first lines.
GUARDED = ("HUB_REPO", "HF_TOKEN")
BARE_COMMANDS = {"python", "python3", "accelerate", "torchrun", "deepspeed"}
MOUNT_MODES = {storage_lib.StorageMode.MOUNT, storage_lib.StorageMode.MOUNT_CACHED}
# Multi-node: accelerate flag -> SkyPilot variable that must feed it (directly or through a shell var).
MULTINODE_FLAGS = {
    "--num_machines": "SKYPILOT_NUM_NODES",
    "--machine_rank": "SKYPILOT_NODE_RANK",
    "--main_process_ip": "SKYPILOT_NODE_IPS",
    "--num_processes": "SKYPILOT_NUM_GPUS_PER_NODE",
}


def expand(text: str, envs: dict) -> str:
    """Substitute $NAME / ${NAME} from the task's envs (what the run sees), leave others as they are."""
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: envs.get(m.group(1) or m.group(2), m.group(0)), text)


def check_resources(task, problems: list) -> str:
    candidates = list(task.resources)
    gpus, counts, spot = set(), set(), set()
    no_image, no_recovery = set(), set()
    for r in candidates:
        acc = r.accelerators or {}
        if len(acc) != 1:
            problems.append(f"resources.accelerators: a candidate asks for {acc or 'no GPU'}, want one GPU type")
            continue
        (name, count), = acc.items()
        gpus.add(name)
        counts.add(count)
        spot.add(r.use_spot)
        if not (r.extract_docker_image() or "").strip():
            no_image.add(f"{name}:{count}")
        if not r.job_recovery or not r.job_recovery.get("strategy"):
            no_recovery.add(f"{name}:{count}")
    if no_image:
        problems.append(f"resources.image_id: candidates {sorted(no_image)} do not run the job image (docker:IMAGE)")
    if no_recovery:
        problems.append(f"resources.job_recovery: candidates {sorted(no_recovery)} have no recovery strategy")
    if gpus - GPU_CHOICES:
        problems.append(f"resources.any_of: unexpected GPUs {sorted(gpus - GPU_CHOICES)}, want {sorted(GPU_CHOICES)}")
    if GPU_CHOICES - gpus:
        problems.append(f"resources.any_of: missing {sorted(GPU_CHOICES - gpus)}, want all of {sorted(GPU_CHOICES)}")
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
            mounts[path.rstrip("/")] = f"bucket {storage.name} ({storage.mode.value})"
    for path in task.volumes or {}:
        mounts[path.rstrip("/")] = "volume"
    for r in task.resources:
        for vol in r.volumes or []:
            mounts[str(vol.get("path", "")).rstrip("/")] = "volume"
    return mounts


def check_run(task, problems: list) -> str:
    run = task.run
    if not isinstance(run, str) or not run.strip():
        problems.append("run: missing")
        return ""
    envs = task.envs
    # Guards: the first len(GUARDED) command lines, one per variable, each exiting on an empty value.
    lines = [ln.strip() for ln in run.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    head = lines[: len(GUARDED)]
    for name in GUARDED:
        if re.search(r"\$\{" + name + r":\?", run):
            problems.append(f"run: the {name} guard uses ${{{name}:?}}, which SkyPilot's `bash -i` prints "
                            "but does not stop on; test and exit explicitly")
        elif not any(re.search(r"\$\{" + name + r"(:-)?\}", ln) and re.search(r"\bexit\s+[1-9]", ln) for ln in head):
            problems.append(f"run: does not start with a guard that exits when {name} is empty")
    # The job's interpreter by absolute path: SkyPilot's run shell activates its own ~/sky-user-env
    # (sky/skylet/constants.py, ACTIVATE_SKY_USER_ENV), whose python does not see the image's venv.
    for ln in lines:
        word = ln.split()[0]
        if word in BARE_COMMANDS:
            problems.append(f"run: calls bare `{word}`; use /opt/venv/bin/{word} (SkyPilot's run shell "
                            "activates ~/sky-user-env, which lacks the job's packages)")
    # Output dir inside a mounted bucket.
    mounts = bucket_mounts(task)
    if not mounts:
        problems.append("file_mounts: no bucket mounted (want a storage mount in MOUNT or MOUNT_CACHED mode, "
                        "or a volume) for --output-dir")
    found = re.search(r"--output-dir[ =]+(\"[^\"]*\"|'[^']*'|\S+)", run)
    out = ""
    if not found:
        problems.append("run: does not pass --output-dir")
    else:
        out = expand(found.group(1).strip("\"'"), envs).rstrip("/")
        if mounts and not any(out == m or out.startswith(m + "/") for m in mounts):
            problems.append(f"run: --output-dir {out} is not inside a mounted bucket ({', '.join(sorted(mounts))})")
    # Multi-node wiring.
    if task.num_nodes > 1:
        flat = run.replace("\\\n", " ")
        for flag, var in MULTINODE_FLAGS.items():
            m = re.search(re.escape(flag) + r"[ =]+(\"[^\"]*\"|\S+)", flat)
            if not m:
                problems.append(f"run: multi-node launch does not pass {flag}")
                continue
            value = m.group(1)
            # Follow one level of shell variable (HEAD_IP=$(... SKYPILOT_NODE_IPS ...)).
            for local in re.findall(r"\$\{?(\w+)", value):
                assign = re.search(r"^\s*" + local + r"=(.*)$", run, re.M)
                if assign:
                    value += " " + assign.group(1)
            if var not in value:
                problems.append(f"run: {flag} is not derived from ${var}")
        if "--main_process_port" not in flat:
            problems.append("run: multi-node launch does not pass --main_process_port")
    where = next((d for m, d in mounts.items() if out == m or out.startswith(m + "/")), "")
    return f"output {out} on {where}" if where else ""


def check_file(path: Path) -> tuple:
    problems = []
    try:
        task = sky.Task.from_yaml(str(path))
    except Exception as e:  # SkyPilot raises ValueError, jsonschema errors, StorageSpecError, ...
        return [f"parse: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"], ""
    resources = check_resources(task, problems)
    recipe = check_envs_and_secrets(task, problems)
    output = check_run(task, problems)
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
