"""The SkyPilot task files (sky/*.yaml), checked offline with SkyPilot's own parser.

SkyPilot lives in its own environment (.venv-sky, built from requirements-sky.lock by
`make .venv-sky/.installed`): it cannot share one with huggingface_hub. These tests therefore drive
sky/check_tasks.py and the parser through that environment's python, in a subprocess.
The task files' `setup` and `run` are the scripts sky/setup.sh and sky/run.sh: their refusals and the
command they start are executed here; tests/test_sky_container.py runs them end to end in a bare
Debian container (make test-sky-container).
"""
import hashlib
import importlib.metadata
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SKY_PY = REPO / ".venv-sky" / "bin" / "python"
CHECK = REPO / "sky" / "check_tasks.py"
TASK_FILES = sorted((REPO / "sky").glob("*.yaml"))
RUN_SH = REPO / "sky" / "run.sh"
SETUP_SH = REPO / "sky" / "setup.sh"


def sky_python(*args, timeout=120):
    if not SKY_PY.exists():
        pytest.fail(f"{SKY_PY} is missing: run `make .venv-sky/.installed` (SkyPilot's own environment)")
    return subprocess.run([str(SKY_PY), *args], capture_output=True, text=True, timeout=timeout, cwd=REPO)


def check(*paths):
    """Run check_tasks.py; return (exit code, {file name: its output line})."""
    proc = sky_python(str(CHECK), *map(str, paths))
    lines = {}
    for line in proc.stdout.splitlines():
        status, _, rest = line.partition(" ")
        name = rest.strip().split(":", 1)[0]
        lines[Path(name).name] = line
    return proc.returncode, lines, proc


def test_task_files_exist():
    assert {p.name for p in TASK_FILES} >= {"phi3.yaml", "gemma.yaml", "multinode.yaml"}


def test_every_task_file_passes_the_checks():
    code, lines, proc = check()
    assert set(lines) == {p.name for p in TASK_FILES}, proc.stdout + proc.stderr
    assert code == 0, proc.stdout + proc.stderr
    assert all(line.startswith("ok ") for line in lines.values())


# --- negative cases: each a copy of a real task file with one thing broken -----------------------

def _phi3():
    return yaml.safe_load((REPO / "sky" / "phi3.yaml").read_text())


def token_as_plain_env():
    task = _phi3()
    del task["secrets"]
    task["envs"]["HF_TOKEN"] = "hf_should_not_be_here"
    return task


def token_value_in_secrets():
    task = _phi3()
    task["secrets"]["HF_TOKEN"] = "hf_should_not_be_here"
    return task


def hub_repo_with_default():
    task = _phi3()
    task["envs"]["HUB_REPO"] = ""  # a launch without --env HUB_REPO would rent a VM, then stop in sky/run.sh
    return task


def no_bucket():
    task = _phi3()
    del task["file_mounts"]
    return task


def no_checkout_guard():
    task = _phi3()
    del task["file_mounts"]["/tmp/alignpress-launch-check.py"]
    return task


def bucket_with_default():
    task = _phi3()
    task["envs"]["BUCKET"] = "alignpress-outputs"
    return task


def bucket_name_fixed():
    task = _phi3()
    task["file_mounts"]["/outputs"]["name"] = "alignpress-outputs"
    return task


def inline_run():
    task = _phi3()
    task["run"] = "python entrypoint.py run $RECIPE --output-dir /outputs/$RUN_NAME\n"
    return task


def setup_not_the_script():
    task = _phi3()
    task["setup"] = "pip install -r requirements.lock"
    return task


def no_workdir():
    task = _phi3()
    del task["workdir"]
    return task


def no_spot_single_node():
    task = _phi3()
    task["resources"]["any_of"] = [c for c in task["resources"]["any_of"] if not c["use_spot"]]
    return task


def missing_h100():
    task = _phi3()
    task["resources"]["any_of"] = [c for c in task["resources"]["any_of"] if "H100" not in c["accelerators"]]
    return task


def no_job_recovery():
    task = _phi3()
    del task["resources"]["job_recovery"]
    return task


def retries_job_failures():
    task = _phi3()
    task["resources"]["job_recovery"]["max_restarts_on_errors"] = 1
    return task


def unknown_field():
    task = _phi3()
    task["resource"] = task.pop("resources")  # a typo SkyPilot's schema rejects
    return task


def envs_given_twice():
    """Text, not a dict: a second `envs:` would silently replace the first (HUB_REPO, RECIPE, BUCKET)."""
    text = (REPO / "sky" / "phi3.yaml").read_text()
    return text + "\nenvs:\n  RUN_NAME: phi3-second-try\n"


NEGATIVE = {
    # case: (task, text the file's FAIL line must contain: the field and the problem)
    "token_as_plain_env": (token_as_plain_env, "envs.HF_TOKEN: the token must not be a plain env"),
    "token_value_in_secrets": (token_value_in_secrets, "secrets.HF_TOKEN: has a value in the file"),
    "no_bucket": (no_bucket, "file_mounts: no bucket mounted at /outputs"),
    "hub_repo_with_default": (hub_repo_with_default, "envs.HUB_REPO: has the default ''; the repo is the user's: leave it null, so SkyPilot "
                                                     "refuses a launch without --env HUB_REPO=... before renting anything"),
    "no_checkout_guard": (no_checkout_guard, "file_mounts: no checkout guard (/tmp/alignpress-launch-check.py: sky/launch_check.py); "
                                             "without it a launch from another folder copies that folder to the VM"),
    "bucket_with_default": (bucket_with_default, "envs.BUCKET: has the default 'alignpress-outputs'; bucket names are global"),
    "bucket_name_fixed": (bucket_name_fixed, "file_mounts./outputs.name: want ${BUCKET}"),
    "inline_run": (inline_run, "run: calls bare `python`"),
    "setup_not_the_script": (setup_not_the_script, "setup: 'pip install -r requirements.lock', want 'bash sky/setup.sh'"),
    "no_workdir": (no_workdir, "workdir: None, want '.'"),
    "no_spot_single_node": (no_spot_single_node, "resources.use_spot: single-node task offers no spot candidate"),
    "missing_h100": (missing_h100, "resources.any_of: missing ['H100']"),
    "no_job_recovery": (no_job_recovery, "resources.job_recovery: candidates ['A100-80GB:1', 'A100:1', 'H100:1', 'L40S:1'] have no"),
    "retries_job_failures": (retries_job_failures, "resources.job_recovery: candidates ['A100-80GB:1', 'A100:1', 'H100:1', 'L40S:1'] "
                                                   "retry failures of the job itself; want max_restarts_on_errors 0"),
    "unknown_field": (unknown_field, "parse: "),
    "envs_given_twice": (envs_given_twice, "parse: ValueError: Duplicate key 'envs' in YAML at line {line} (also defined at line {first})"),
}


@pytest.fixture(scope="module")
def negative_results(tmp_path_factory):
    """Write every broken variant to a temp file and check them all in one SkyPilot start."""
    folder = tmp_path_factory.mktemp("sky_negative")
    paths = []
    for case, (build, _) in NEGATIVE.items():
        path = folder / f"{case}.yaml"
        task = build()
        path.write_text(task if isinstance(task, str) else yaml.safe_dump(task, sort_keys=False))
        paths.append(path)
    return check(*paths)


@pytest.mark.parametrize("case", sorted(NEGATIVE))
def test_broken_task_file_is_rejected_naming_file_and_field(negative_results, case):
    code, lines, proc = negative_results
    assert code != 0
    line = lines.get(f"{case}.yaml", "")
    assert line.startswith("FAIL ") and f"{case}.yaml:" in line, proc.stdout + proc.stderr
    expected = NEGATIVE[case][1]
    if case == "envs_given_twice":
        text = envs_given_twice().splitlines()
        expected = expected.format(first=text.index("envs:") + 1, line=len(text) - 1)
    assert expected in line, line


def test_inline_run_is_named_as_not_the_script(negative_results):
    line = negative_results[1]["inline_run.yaml"]
    assert "run: 'python entrypoint.py run $RECIPE --output-dir /outputs/$RUN_NAME', want 'bash sky/run.sh'" in line


# --- sky/run.sh, started the way SkyPilot starts a task's run -------------------------------------

@pytest.fixture(scope="module")
def task_scripts():
    """setup and run of each task file, as SkyPilot's parser returns them."""
    code = ("import json, sys, yaml, sky\n"
            "env = [('HUB_REPO', 'someone/model'), ('BUCKET', 'my-bucket')]\n"
            "tasks = {p: sky.Task.from_yaml_config(yaml.safe_load(open(p)), env_overrides=env) for p in sys.argv[1:]}\n"
            "print(json.dumps({p: [t.setup, t.run] for p, t in tasks.items()}))")
    proc = sky_python("-c", code, *map(str, TASK_FILES))
    assert proc.returncode == 0, proc.stderr
    return {Path(p).name: pair for p, pair in json.loads(proc.stdout.splitlines()[-1]).items()}


def test_every_task_runs_the_two_scripts(task_scripts):
    assert task_scripts == {p.name: ["bash sky/setup.sh", "bash sky/run.sh"] for p in TASK_FILES}


def lock_key() -> str:
    """The key environments and images are built under: both locks' sha256, first 12 hex digits."""
    return hashlib.sha256((REPO / "requirements.lock").read_bytes() + (REPO / "requirements-gpu.lock").read_bytes()).hexdigest()[:12]


def fake_env(tmp_path: Path) -> Path:
    """A stand-in job environment (stamped as setup.sh stamps it) whose python and accelerate print
    their arguments: the GPU job itself cannot run here, the container test runs the real one."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    for tool in ("python", "accelerate"):
        exe = venv / "bin" / tool
        exe.write_text('#!/bin/sh\nprintf "%s\\n" "$(basename "$0")" "$@"\n')
        exe.chmod(0o755)
    # run.sh reads the recipe's train.accelerate_config with `python -c` (sky/env.sh): that one runs
    # and it says when run.sh lets the job write into a container's own filesystem (no BUCKET)
    (venv / "bin" / "python").write_text(f'#!/bin/sh\n[ "$1" != -c ] || exec {sys.executable} "$@"\n'
                                         '[ -z "$ALIGNPRESS_ALLOW_CONTAINER_OUTPUTS" ] || echo "ALIGNPRESS_ALLOW_CONTAINER_OUTPUTS=$ALIGNPRESS_ALLOW_CONTAINER_OUTPUTS"\n'
                                         'printf "%s\\n" "$(basename "$0")" "$@"\n')
    lock_hash = lock_key()
    (venv / f".alignpress-lock-{lock_hash}").touch()
    return venv


def sky_run(tmp_path: Path, env: dict, script: str = "bash sky/run.sh"):
    """The task's run as SkyPilot runs it (`bash -i` on the script text, in the workdir), with a bare
    HOME (no ~/.bashrc) and no job environment unless the env names one."""
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    path = tmp_path / "run.sh"
    path.write_text(script + "\n")
    base = {"PATH": os.environ["PATH"], "HOME": str(home), "ALIGNPRESS_IMAGE_VENV": str(tmp_path / "no-image")}
    proc = subprocess.run(["bash", "-i", str(path)], capture_output=True, text=True, timeout=30, cwd=REPO,
                          env={**base, **env}, stdin=subprocess.DEVNULL)
    # Without a terminal, `bash -i` itself reports that it has no job control: not the script's output.
    noise = ("bash: cannot set terminal process group", "bash: no job control in this shell")
    proc.stderr = "".join(ln for ln in proc.stderr.splitlines(keepends=True) if not ln.startswith(noise))
    return proc


# HF_ENDPOINT: a closed local port, so setup's question to the Hub fails at once, as with no network
# (the launch goes on; tests below ask the test Hub server).
SET = {"HUB_REPO": "someone/model", "HF_TOKEN": "hf_dummy", "RECIPE": "recipes/demo.yaml", "HF_ENDPOINT": "http://127.0.0.1:9"}


def fake_mountpoint(tmp_path: Path) -> str:
    """PATH with a `mountpoint` that says yes: a bucket mount needs a cloud, so a plain folder stands
    in for it (test_run_refuses_a_bucket_folder_that_is_not_a_mount uses the real command)."""
    folder = tmp_path / "fakebin"
    folder.mkdir(exist_ok=True)
    (folder / "mountpoint").write_text("#!/bin/sh\nexit 0\n")
    (folder / "mountpoint").chmod(0o755)
    return f"{folder}:{os.environ['PATH']}"

REFUSALS = {
    # case: (env changes, the one line on stderr)
    "HUB_REPO unset": ({"HUB_REPO": None}, "error: HUB_REPO is not set; launch with --env HUB_REPO=namespace/name"),
    "HUB_REPO empty": ({"HUB_REPO": ""}, "error: HUB_REPO is not set; launch with --env HUB_REPO=namespace/name"),
    "HF_TOKEN unset": ({"HF_TOKEN": None}, "error: HF_TOKEN is not set; launch with --secret HF_TOKEN"),
    "HF_TOKEN empty": ({"HF_TOKEN": ""}, "error: HF_TOKEN is not set; launch with --secret HF_TOKEN"),
    "RECIPE unset": ({"RECIPE": None}, "error: RECIPE is not set; launch with --env RECIPE=recipes/NAME.yaml"),
    "RECIPE missing": ({"RECIPE": "recipes/nope.yaml"}, "error: RECIPE: recipes/nope.yaml does not exist in the checkout"),
    "managed job without BUCKET": (
        {"SKYPILOT_MANAGED_JOB_ID": "7", "BUCKET": ""},
        "error: BUCKET is not set; a managed job keeps its outputs in a bucket: launch with --env BUCKET=a-name-of-your-own"),
    "HUB_REPO not a repo id": (
        {"HUB_REPO": "not a repo"},
        "error: HUB_REPO: 'not a repo': expected namespace/name (exactly one '/'); launch with --env HUB_REPO=namespace/name"),
    "HUB_REPO bad name": (
        {"HUB_REPO": "me/bad--name"},
        "error: HUB_REPO: 'me/bad--name': 'bad--name' is not a valid Hub name: use letters, digits, '-', '_', '.', at most 96 "
        "characters, no '--' or '..', not starting or ending with '-' or '.'; launch with --env HUB_REPO=namespace/name"),
    # the token pasted as HUB_REPO: the line above quoted it into the VM's log (by its form, or HF_TOKEN's value)
    "HUB_REPO a token": (
        {"HUB_REPO": "hf_" + "a1" * 17},
        "error: HUB_REPO holds a Hub token (not shown); launch with --env HUB_REPO=namespace/name and the token only in --secret HF_TOKEN"),
    "HUB_REPO the token": (
        {"HUB_REPO": "me/" + SET["HF_TOKEN"]},
        "error: HUB_REPO holds a Hub token (not shown); launch with --env HUB_REPO=namespace/name and the token only in --secret HF_TOKEN"),
    "HF_TOKEN with a newline inside": (
        {"HF_TOKEN": "hf_abc\ndef"},
        "error: HF_TOKEN holds whitespace at position 7, which no Hub token has: launch with --secret HF_TOKEN set to the token "
        "from https://huggingface.co/settings/tokens"),
    "RECIPE not a recipe": ({"RECIPE": "README.md"}, "error: RECIPE: README.md is not a recipe (a .yaml file, such as recipes/phi3-mini-capybara.yaml)"),
    "RECIPE a folder": ({"RECIPE": "recipes"}, "error: RECIPE: recipes is a folder, not a recipe (a .yaml file, such as recipes/phi3-mini-capybara.yaml)"),
    "ACCELERATE_CONFIG unknown": (
        {"ACCELERATE_CONFIG": "zero9"},
        "error: ACCELERATE_CONFIG: zero9 is neither a file in the checkout nor a shipped config (recipes/accelerate/: ddp, zero2, zero3-offload)"),
    "BUCKET not mounted": (
        {"BUCKET": "my-bucket", "OUTPUT_ROOT": "/nonexistent/outputs", "ALIGNPRESS_VENV": "FAKE"},
        "error: BUCKET is set (my-bucket) but /nonexistent/outputs is not mounted; launch a task file from sky/"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_run_refuses_with_one_line_and_exit_2(tmp_path, case):
    changes, message = REFUSALS[case]
    env = dict(SET)
    for name, value in changes.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = str(fake_env(tmp_path)) if value == "FAKE" else value
    proc = sky_run(tmp_path, env)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [message]
    assert proc.stdout == ""


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_setup_refuses_the_same_before_it_builds_anything(tmp_path, case):
    """A launch that run.sh would refuse used to build the environment first (minutes of a rented GPU,
    several GB of wheels): setup.sh now makes the same checks before anything else. SkyPilot mounts
    the bucket before setup, so a missing mount is found there too."""
    changes, message = REFUSALS[case]
    env = {**SET, "UV": str(tmp_path / "uv-must-not-run")}
    for name, value in changes.items():
        env.pop(name, None) if value is None else env.__setitem__(name, value)
    proc = sky_run(tmp_path, env, script="bash sky/setup.sh")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [message]
    assert proc.stdout == ""
    assert not (tmp_path / "home" / ".alignpress").exists()


def test_run_refuses_a_bucket_folder_that_is_not_a_mount(tmp_path):
    """The image has a plain /outputs folder: without the task file's mount a run there went to the
    VM's disk and was lost with the VM. The real `mountpoint` says no for a plain folder."""
    plain = tmp_path / "outputs"
    plain.mkdir()
    proc = sky_run(tmp_path, {**SET, "ALIGNPRESS_VENV": str(fake_env(tmp_path)), "BUCKET": "mine", "OUTPUT_ROOT": str(plain)})
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: BUCKET is set (mine) but {plain} is not mounted; launch a task file from sky/"]


@pytest.mark.parametrize(
    ("token", "repo", "line"),
    [
        ("INVALID", "alice/x", "error: HF_TOKEN: the Hub rejects this token (HTTP 401 from {endpoint}); launch with --secret HF_TOKEN set to a valid token"),
        ("READ", "alice/x", "error: HF_TOKEN: the token of 'alice' is read-only: create a token with write access (https://huggingface.co/settings/tokens)"),
        ("OTHER", "alice/x", "error: HUB_REPO: the token belongs to 'bob', who cannot write to the namespace 'alice' (writable: bob); "
                             "launch with another HUB_REPO or another token"),
        ("GOOD", "alice/x", None),
    ],
)
def test_setup_asks_the_hub_before_it_builds_anything(tmp_path, hub_env, token, repo, line):
    """sky/launch_check.py over real HTTP to the test Hub server, from setup.sh: a token the Hub
    rejects, or one that may not write to HUB_REPO, stops the launch before the environment is built.
    A good one goes on to the build (here a stand-in uv that says so and fails)."""
    from hubserver import INVALID_TOKEN, OTHER_TOKEN, READ_TOKEN

    tokens = {"INVALID": INVALID_TOKEN, "READ": READ_TOKEN, "OTHER": OTHER_TOKEN, "GOOD": hub_env.token}
    uv = tmp_path / "uv"
    uv.write_text('#!/bin/sh\n[ "$1" = --version ] && { echo "uv (stand-in)"; exit 0; }\necho "stand-in uv: the build would start here" >&2\nexit 1\n')
    uv.chmod(0o755)
    env = {**SET, "HUB_REPO": repo, "HF_TOKEN": tokens[token], "HF_ENDPOINT": hub_env.server.url, "UV": str(uv)}
    proc = sky_run(tmp_path, env, script="bash sky/setup.sh")
    if line is None:
        assert "stand-in uv: the build would start here" in proc.stderr and "error:" not in proc.stderr, proc.stderr
    else:
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.strip().splitlines() == [line.format(endpoint=hub_env.server.url)]
        assert not (tmp_path / "home" / ".alignpress").exists()
    assert tokens[token] not in proc.stderr + proc.stdout
    assert [r.route for r in hub_env.server.requests] == ["whoami"]


def test_run_refuses_when_the_environment_is_not_built(tmp_path):
    lock_hash = lock_key()
    proc = sky_run(tmp_path, SET)  # HOME empty, no image venv
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: the job's environment for requirements.lock + requirements-gpu.lock ({lock_hash}) is not built; run sky/setup.sh first"]


def test_run_without_bucket_writes_to_the_vm_disk(tmp_path):
    venv = fake_env(tmp_path)
    proc = sky_run(tmp_path, {**SET, "ALIGNPRESS_VENV": str(venv), "RUN_NAME": "demo"})
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "home" / "alignpress-outputs" / "demo"
    assert proc.stderr.strip().splitlines() == [
        f"alignpress: no BUCKET: outputs go to {tmp_path / 'home' / 'alignpress-outputs'} on this VM's disk (gone after sky down)",
        f"alignpress: entrypoint.py run recipes/demo.yaml --set publish.repo_id=someone/model --output-dir {out} (publish.repo_id from HUB_REPO)"]
    assert proc.stdout.splitlines() == ["ALIGNPRESS_ALLOW_CONTAINER_OUTPUTS=1", "python", "entrypoint.py", "run", "recipes/demo.yaml",
                                        "--set", "publish.repo_id=someone/model", "--output-dir", str(out)]


def test_managed_run_writes_into_the_bucket(tmp_path):
    venv, bucket = fake_env(tmp_path), tmp_path / "bucket"
    bucket.mkdir()
    proc = sky_run(tmp_path, {**SET, "ALIGNPRESS_VENV": str(venv), "SKYPILOT_MANAGED_JOB_ID": "7",
                              "BUCKET": "mine", "OUTPUT_ROOT": str(bucket), "PATH": fake_mountpoint(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines() == [
        f"alignpress: entrypoint.py run recipes/demo.yaml --set publish.repo_id=someone/model --output-dir {bucket / 'demo'} (publish.repo_id from HUB_REPO)"]
    # RUN_NAME unset: the recipe's file name
    assert proc.stdout.splitlines()[-2:] == ["--output-dir", str(bucket / "demo")]


def test_multinode_run_wires_skypilot_node_variables_into_accelerate(tmp_path):
    venv, bucket = fake_env(tmp_path), tmp_path / "bucket"
    bucket.mkdir()
    proc = sky_run(tmp_path, {**SET, "ALIGNPRESS_VENV": str(venv), "BUCKET": "mine", "OUTPUT_ROOT": str(bucket),
                              "RUN_NAME": "r", "ACCELERATE_CONFIG": "recipes/accelerate/zero2.yaml", "PATH": fake_mountpoint(tmp_path),
                              "SKYPILOT_NUM_NODES": "2", "SKYPILOT_NODE_RANK": "1",
                              "SKYPILOT_NODE_IPS": "10.0.0.5\n10.0.0.6", "SKYPILOT_NUM_GPUS_PER_NODE": "8"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "accelerate", "launch", "--config_file", "recipes/accelerate/zero2.yaml", "--num_machines", "2",
        "--machine_rank", "1", "--main_process_ip", "10.0.0.5", "--main_process_port", "29500",
        "--num_processes", "16", "entrypoint.py", "run", "recipes/demo.yaml", "--set",
        "publish.repo_id=someone/model", "--output-dir", str(bucket / "r"), "--set", "train.device=cuda"]


@pytest.mark.parametrize("accelerate_env, recipe_config, added", [
    (None, None, "ddp"),  # a recipe without one: ddp
    ("zero2", None, "zero2"),  # ACCELERATE_CONFIG, by name
    (None, "zero2", None),  # the recipe's own: the job relaunches itself under it
    ("ddp", "zero2", "ddp"),  # ACCELERATE_CONFIG replaces the recipe's
])
def test_one_node_with_several_gpus_runs_one_process_per_gpu(tmp_path, accelerate_env, recipe_config, added):
    """`--gpus L40S:4` on one node: run.sh started one process, which saw the four GPUs and (in
    transformers) trained with DataParallel on 4x the recipe's micro-batch. Now the job relaunches
    itself with one process per GPU under train.accelerate_config: the recipe's own, else
    ACCELERATE_CONFIG or ddp, set by run.sh and said where it comes from."""
    recipe = yaml.safe_load((REPO / "recipes/demo.yaml").read_text())
    if recipe_config:
        recipe["train"]["accelerate_config"] = recipe_config
    path = tmp_path / "recipes" / "mine.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump(recipe))
    venv = fake_env(tmp_path)
    proc = sky_run(tmp_path, {**SET, "RECIPE": str(path), "ALIGNPRESS_VENV": str(venv), "RUN_NAME": "r", "SKYPILOT_NUM_GPUS_PER_NODE": "4",
                              **({"ACCELERATE_CONFIG": accelerate_env} if accelerate_env else {})})
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "home" / "alignpress-outputs" / "r"
    extra = ["--set", f"train.accelerate_config={added}"] if added else []
    assert proc.stdout.splitlines() == ["ALIGNPRESS_ALLOW_CONTAINER_OUTPUTS=1", "python", "entrypoint.py", "run", str(path), "--set", "publish.repo_id=someone/model",
                                        "--output-dir", str(out), "--set", "train.device=cuda", *extra]
    said = ", train.accelerate_config=" + added + ": one process for each of the node's 4 GPUs" if added else ""
    assert proc.stderr.splitlines()[-1].endswith(f"(publish.repo_id from HUB_REPO, train.device=cuda for the rented GPUs{said})")


@pytest.mark.parametrize("records, code, last", [
    # the head node: the main process's refusal, not its copy in the other process
    ({"0": {"code": 2, "line": "error: recipes/demo.yaml: field 'dpo.beta': must be > 0, got 0.0", "time": 2.0},
      "1": {"code": 2, "line": "error: the main process failed: recipes/demo.yaml: field 'dpo.beta': must be > 0, got 0.0", "time": 1.0, "echo": True}},
     2, "error: recipes/demo.yaml: field 'dpo.beta': must be > 0, got 0.0"),
    # a node without the main process: its processes' copy of it
    ({"2": {"code": 3, "line": "error: the main process failed: the check failed", "time": 1.0, "echo": True}},
     3, "error: the main process failed: the check failed"),
    # a process killed without a word (SIGKILL): named, with the launcher's code
    ({"1": {"time": 1.0}}, 1, "error: process 1 launched under accelerate ended without an error line (killed: SIGKILL, out of host "
                             "memory?); torch's report above gives each one's exit code"),
])
def test_multinode_run_ends_on_its_processes_error_and_code(tmp_path, records, code, last):
    """On several nodes run.sh starts `accelerate launch` itself, which exits 1 for every failure and
    ends on torch's report. Each process leaves a record of its line and code (cli._exit_record); the
    launcher here is a stand-in that leaves the records a real one's processes would and exits 1
    (two real nodes need GPUs; tests/test_distributed.py runs two CPU nodes under torchrun). The
    records are read by the job's python (the checkout's), which says the failure last."""
    venv, bucket = fake_env(tmp_path), tmp_path / "bucket"
    bucket.mkdir()
    (venv / "bin" / "python").write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')
    writes = "".join(f"printf '%s' {shlex.quote(json.dumps({'rank': rank, **r}))} > \"$ALIGNPRESS_EXIT_DIR/{rank}.json\"\n" for rank, r in records.items())
    (venv / "bin" / "accelerate").write_text(f"#!/bin/sh\n{writes}echo 'torch.distributed.elastic.multiprocessing.errors.ChildFailedError:' >&2\n"
                                             "echo \"$ALIGNPRESS_EXIT_DIR\" > " + shlex.quote(str(tmp_path / "exit-dir")) + "\nexit 1\n")
    proc = sky_run(tmp_path, {**SET, "ALIGNPRESS_VENV": str(venv), "BUCKET": "mine", "OUTPUT_ROOT": str(bucket), "PATH": fake_mountpoint(tmp_path),
                              "SKYPILOT_NUM_NODES": "2", "SKYPILOT_NODE_RANK": "0", "SKYPILOT_NODE_IPS": "10.0.0.5\n10.0.0.6",
                              "SKYPILOT_NUM_GPUS_PER_NODE": "1"})
    assert proc.stderr.splitlines()[-2:] == ["torch.distributed.elastic.multiprocessing.errors.ChildFailedError:", last]
    assert proc.returncode == code
    assert not Path((tmp_path / "exit-dir").read_text().strip()).exists()  # the records' folder is gone


@pytest.mark.parametrize(("value", "recipe_config", "config_file"), [
    (None, None, "recipes/accelerate/ddp.yaml"),
    ("zero2", None, "recipes/accelerate/zero2.yaml"),
    (None, "zero3-offload", "recipes/accelerate/zero3-offload.yaml"),  # the recipe's own, as a single node uses it
    ("zero2", "zero3-offload", "recipes/accelerate/zero2.yaml"),  # ACCELERATE_CONFIG, given, replaces it
])
def test_multinode_accelerate_config_by_name(tmp_path, value, recipe_config, config_file):
    """ACCELERATE_CONFIG takes a shipped config's name, as train.accelerate_config does (a name used to
    reach `accelerate launch` as it was, which failed on every node after they were built). Not given,
    the recipe's train.accelerate_config is launched (it used to be replaced by ddp: a ZeRO-3 recipe
    then ran out of memory on every node), else ddp."""
    bucket = tmp_path / "bucket"
    bucket.mkdir()
    recipe = yaml.safe_load((REPO / "recipes/demo.yaml").read_text())
    if recipe_config:
        recipe["train"]["accelerate_config"] = recipe_config
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(recipe))
    proc = sky_run(tmp_path, {**SET, "RECIPE": str(path), "ALIGNPRESS_VENV": str(fake_env(tmp_path)), "BUCKET": "mine", "OUTPUT_ROOT": str(bucket),
                              "PATH": fake_mountpoint(tmp_path), "SKYPILOT_NUM_NODES": "2", "SKYPILOT_NODE_RANK": "0",
                              "SKYPILOT_NODE_IPS": "10.0.0.5\n10.0.0.6", "SKYPILOT_NUM_GPUS_PER_NODE": "1",
                              **({"ACCELERATE_CONFIG": value} if value else {})})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[2:4] == ["--config_file", str(REPO / config_file)]


@pytest.mark.parametrize("gpus, extra", [("1", ["--set", "train.device=cuda"]), ("0", []), (None, [])])
def test_a_gpu_vm_trains_on_the_gpu_or_not_at_all(tmp_path, gpus, extra):
    """With GPUs rented (SkyPilot sets SKYPILOT_NUM_GPUS_PER_NODE), the job asks for CUDA: a torch that
    cannot use it stops the job at the door instead of training on the CPU (train.device auto)."""
    venv = fake_env(tmp_path)
    proc = sky_run(tmp_path, {**SET, "ALIGNPRESS_VENV": str(venv), "RUN_NAME": "demo",
                              **({"SKYPILOT_NUM_GPUS_PER_NODE": gpus} if gpus is not None else {})})
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "home" / "alignpress-outputs" / "demo"
    assert proc.stdout.splitlines() == ["ALIGNPRESS_ALLOW_CONTAINER_OUTPUTS=1", "python", "entrypoint.py", "run", "recipes/demo.yaml",
                                        "--set", "publish.repo_id=someone/model", "--output-dir", str(out), *extra]


# --- sky/setup.sh: what it skips -------------------------------------------------------------------

def image_like_venv(tmp_path: Path) -> Path:
    """A venv that sees this checkout's .venv (built from requirements.lock) through a .pth file, plus
    the GPU lock's packages as installed metadata only: liger-kernel's kernels need triton and a CUDA
    GPU, so its dist-info stands in for the package the image installs (what setup checks)."""
    venv = tmp_path / "image-venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    (site,) = venv.glob("lib/python3*/site-packages")
    (own,) = Path(os.path.realpath(REPO / ".venv")).glob("lib/python3*/site-packages")
    (site / "checkout_venv.pth").write_text(f"{own}\n")
    for line in (REPO / "requirements-gpu.lock").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            info = site / f"{name.replace('-', '_')}-{version}.dist-info"
            info.mkdir()
            (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    return venv


def test_setup_skips_when_the_image_venv_holds_the_lock(tmp_path):
    """The --image-id path: the image's /opt/venv already satisfies both locks, so setup builds nothing."""
    image_venv = image_like_venv(tmp_path)
    home = tmp_path / "home"
    home.mkdir()
    env = {**SET, "PATH": os.environ["PATH"], "HOME": str(home), "ALIGNPRESS_IMAGE_VENV": str(image_venv)}
    proc = subprocess.run(["bash", str(SETUP_SH)], capture_output=True, text=True, timeout=60, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    lock_hash = lock_key()
    assert proc.stderr.splitlines() == [
        f"alignpress setup: environment ready: {image_venv}/bin/python (lock {lock_hash}), nothing to do"]
    assert not (home / ".alignpress").exists()


def test_setup_skips_when_its_stamp_is_there(tmp_path):
    venv = fake_env(tmp_path)
    env = {**SET, "PATH": os.environ["PATH"], "HOME": str(tmp_path), "ALIGNPRESS_VENV": str(venv),
           "ALIGNPRESS_IMAGE_VENV": str(tmp_path / "no-image")}
    proc = subprocess.run(["bash", str(SETUP_SH)], capture_output=True, text=True, timeout=60, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.endswith("nothing to do\n"), proc.stderr


def test_an_image_venv_that_differs_from_the_lock_is_not_used(tmp_path):
    """lock_satisfied compares every locked version with what the python has installed."""
    lock = tmp_path / "requirements.lock"
    lock.write_text((REPO / "requirements.lock").read_text().replace("torch==2.13.0", "torch==2.99.0")
                    + "no-such-package==1.0\n")
    gpu_lock = tmp_path / "requirements-gpu.lock"
    gpu_lock.write_text("# kernels\nno-such-kernel==0.1\n")
    script = f'source {REPO}/sky/env.sh; LOCK={lock}; GPU_LOCK={gpu_lock}; lock_satisfied "$1"'
    proc = subprocess.run(["bash", "-c", script, "x", str(REPO / ".venv" / "bin" / "python")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    torch = importlib.metadata.version("torch")  # 2.13.0+cpu on the CPU machines
    assert proc.stderr.strip() == (f"3 packages differ from the lock: torch {torch} (lock: 2.99.0), "
                                   "no-such-package missing (lock: 1.0), no-such-kernel missing (lock: 0.1)")


def test_the_image_tag_and_setup_use_one_lock_key():
    """image.yml tags images with the key sky/env.sh builds environments under, over both locks."""
    workflow = (REPO / ".github/workflows/image.yml").read_text()
    line = next(ln.strip() for ln in workflow.splitlines() if ln.strip().startswith('lock="$('))
    tagged = subprocess.run(["bash", "-c", f'{line}; echo "$lock"'], capture_output=True, text=True, cwd=REPO, check=True).stdout.strip()
    built = subprocess.run(["bash", "-c", f'source {REPO}/sky/env.sh; echo "$LOCK_HASH"'], capture_output=True, text=True, check=True).stdout.strip()
    both = lock_key()
    assert tagged == built == both
    setup = (REPO / "sky/setup.sh").read_text()
    assert '"$UV" pip install -q --no-deps -r "$GPU_LOCK"' in setup


def test_launch_without_hub_repo_or_bucket_stops_before_anything_is_rented():
    """What `sky launch` / `sky jobs launch` do first: parse the task with the --env values
    (Task.from_yaml_config(config, env_overrides)), before optimizing or provisioning. HUB_REPO and
    BUCKET are null in the files, so a launch without them stops there (HUB_REPO used to be "", and
    sky/run.sh refused only on the rented VM, after setup); with both, /outputs is that bucket."""
    code = ("import json, sys, yaml, sky\n"
            "def parse(p, env):\n"
            "    try:\n"
            "        return sky.Task.from_yaml_config(yaml.safe_load(open(p)), env_overrides=env).storage_mounts['/outputs'].name\n"
            "    except Exception as e:\n"
            "        return type(e).__name__ + ': ' + str(e).strip()\n"
            "repo, bucket = ('HUB_REPO', 'me/model'), ('BUCKET', 'alignpress-me-outputs')\n"
            "print(json.dumps({p: [parse(p, []), parse(p, [repo]), parse(p, [bucket]), parse(p, [repo, bucket])] for p in sys.argv[1:]}))")
    proc = sky_python("-c", code, *map(str, TASK_FILES))
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.splitlines()[-1])

    def missing(name):
        return (f"ValueError: Environment variable {name!r} is None. Please set a value for it in task YAML or with --env flag. "
                f'To set it to be empty, use an empty string ({name}: "" in task YAML or --env {name}="" in CLI).')

    assert got == {str(p): [missing("HUB_REPO"), missing("BUCKET"), missing("HUB_REPO"), "alignpress-me-outputs"] for p in TASK_FILES}


def test_a_launch_from_outside_the_checkout_stops_before_anything_is_rented(tmp_path):
    """`workdir: .` is the folder the launch runs in. From a home folder SkyPilot used to copy that
    folder (~/.cache/huggingface/token included) to a rented VM, whose setup then failed. What the
    launch checks on this machine before anything else (sky.client.sdk.validate: the workdir and the
    local file mounts) now stops it, from the guard's source path; from the checkout it passes."""
    code = ("import json, os, sys, yaml, sky\n"
            "def validate(p):\n"
            "    task = sky.Task.from_yaml_config(yaml.safe_load(open(p)), env_overrides=[('HUB_REPO', 'me/m'), ('BUCKET', 'b')])\n"
            "    try:\n"
            "        task.expand_and_validate_workdir()\n"
            "        task.expand_and_validate_file_mounts()\n"
            "        return 'ok ' + task.workdir\n"
            "    except ValueError as e:\n"
            "        return str(e).strip()\n"
            "out = {}\n"
            "for where in sys.argv[1:3]:\n"
            "    os.chdir(where)\n"
            "    out[where] = [validate(p) for p in sys.argv[3:]]\n"
            "print(json.dumps(out))")
    proc = sky_python("-c", code, str(REPO), str(tmp_path), *map(str, TASK_FILES))
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.splitlines()[-1])
    assert got == {str(REPO): [f"ok {REPO}"] * len(TASK_FILES),
                   str(tmp_path): ["File mount source 'sky/launch_check.py' does not exist locally. To fix: check if it exists, "
                                   "and correct the path."] * len(TASK_FILES)}


@pytest.mark.parametrize("script", ["sky/setup.sh", "sky/run.sh", "scripts/gpu-measure.sh", "scripts/podman-base.sh"])
def test_the_scripts_print_their_header_for_help_and_refuse_arguments(script, tmp_path):
    """Their settings are environment variables. `--help` used to start the script (gpu-measure.sh: a
    full measurement; podman-base.sh: apt-get and debootstrap), and any argument was ignored."""
    header = [line[2:] if line.startswith("# ") else line[1:] for line in (REPO / script).read_text().split("set -euo pipefail")[0].splitlines()[1:]]
    # An empty environment: were the help or the refusal to fall through, the script would fail on its
    # first check with another message.
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path)}
    for flag in ("--help", "-h"):
        proc = subprocess.run(["bash", script, flag], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
        assert (proc.returncode, proc.stdout.splitlines(), proc.stderr) == (0, header, "")
    proc = subprocess.run(["bash", script, "now"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    name = Path(script).name
    assert (proc.returncode, proc.stdout, proc.stderr) == (
        2, "", f"error: {name} takes no arguments (its settings are environment variables; see --help): got 'now'\n")
