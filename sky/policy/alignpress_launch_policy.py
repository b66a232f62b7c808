"""The launch check: SkyPilot asks this policy before it rents anything, and it checks the recipe here.

A mistake in a recipe used to surface on the rented VM: after provisioning and sky/setup.sh (minutes
the first time), the job refused it in a second. `make sky` registers this module as a client-side
SkyPilot admin policy (`.sky.yaml` at the checkout's root: `admin_policy:
alignpress_launch_policy.LaunchCheck`, and a .pth file in .venv-sky that puts this folder on the
path), so `sky launch` and `sky jobs launch` of an alignpress task file, started in the checkout,
first run the job's own `entrypoint.py validate --hub` on this machine with the launch's RECIPE and
HUB_REPO, and a refusal stops the launch with the validate line, before anything is rented.

What only the run's folder in the bucket can tell is left to the job on the VM: whether an existing
repo or tag at HUB_REPO is this run's (a relaunch that resumes a push), so the check runs with
publish.allow_update and publish.tag relaxed. ALIGNPRESS_LAUNCH_CHECK=offline skips the Hub's
checks (no network to the Hub from here), =off the whole check. Other tasks (no alignpress
checkout guard in their file_mounts) and other requests pass unchanged.

Runs in SkyPilot's process (.venv-sky): standard library and SkyPilot only; the check itself runs in
the job's environment (.venv, `make venv`) as a subprocess.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import sky

ROOT = Path(__file__).resolve().parents[2]
JOB_PYTHON = ROOT / ".venv" / "bin" / "python"
GUARD = "/tmp/alignpress-launch-check.py"  # every alignpress task file mounts it: this marks one
SETTING = "ALIGNPRESS_LAUNCH_CHECK"  # hub (the default), offline, off
REQUESTS = {"launch", "jobs.launch"}  # the requests that rent a machine
TIMEOUT_S = 600
# Decided on the VM with the bucket's folder, which says which pushes were this run's.
RELAXED = ["publish.allow_update=true", "publish.tag=null"]


def _holds_token():
    """alignpress.errors.holds_token (standard library only), loaded from its file: SkyPilot's
    environment does not have the job's packages."""
    spec = importlib.util.spec_from_file_location("alignpress_errors", ROOT / "src" / "alignpress" / "errors.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.holds_token


def lock_hash() -> str:
    """The key of the job's environment, as sky/env.sh and the image workflow compute it (the image tag's suffix)."""
    return hashlib.sha256((ROOT / "requirements.lock").read_bytes() + (ROOT / "requirements-gpu.lock").read_bytes()).hexdigest()[:12]


def image_warning(images: set[str]) -> str | None:
    """An alignpress image whose tag names another lock than this checkout's: sky/setup.sh then builds
    the environment on the VM (minutes of a rented GPU, again after every spot recovery) unless the
    image's packages still match the lock's versions (setup compares versions; the tag hashes bytes,
    comments included), so this is said, not refused."""
    ours = lock_hash()
    for image in sorted(images):
        tagged = re.search(r"alignpress:[^:/@\s]*-([0-9a-f]{12})$", image)
        if tagged and tagged[1] != ours:
            return (f"--image-id {image.removeprefix('docker:')} was built from another lock ({tagged[1]}) than this checkout's "
                    f"({ours}): unless only the locks' comments differ, sky/setup.sh builds the environment on the VM (minutes of a "
                    f"rented GPU, again after every recovery); the image for this checkout is tagged ...-{ours}")
    return None


def say(line: str) -> None:
    print(f"alignpress: {line}", file=sys.stderr, flush=True)


def ignored_by_git(path: str) -> bool:
    """SkyPilot copies the checkout without what .gitignore lists: such a recipe is not on the VM."""
    try:
        return subprocess.run(["git", "-C", str(ROOT), "check-ignore", "-q", "--", path], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False  # no git here: sky/run.sh still refuses a recipe it does not find


def refusal(envs: dict, secrets: dict, images: set[str] = frozenset()) -> str | None:
    """The line that stops the launch, or None to go on."""
    mode = (os.environ.get(SETTING) or "hub").strip().lower()
    if mode not in ("hub", "offline", "off"):
        return f"error: {SETTING}={mode!r}: expected hub (the default), offline or off"
    if mode == "off":
        say(f"{SETTING}=off: the recipe is not checked before renting")
        return None
    if warning := image_warning(images):
        say(warning)
    recipe, repo = envs.get("RECIPE") or "", envs.get("HUB_REPO") or ""
    token = secrets.get("HF_TOKEN")
    token = str(token.get_secret_value() if hasattr(token, "get_secret_value") else token or "")  # SkyPilot holds it as a pydantic SecretStr
    holds_token = _holds_token()
    for name, value in (("RECIPE", recipe), ("HUB_REPO", repo)):
        if holds_token(value) or (len(token.strip()) >= 8 and token.strip() in value):  # never shown, here or in a log
            return f"error: {name} holds a Hub token (not shown); launch with the token only in --secret HF_TOKEN"
    if not recipe:
        return "error: RECIPE is not set; launch with --env RECIPE=recipes/NAME.yaml"
    if not repo:
        return "error: HUB_REPO is not set; launch with --env HUB_REPO=namespace/name"
    path = Path(recipe)
    if path.is_absolute() or not (ROOT / path).resolve().is_relative_to(ROOT):
        return f"error: RECIPE: {recipe} is not a path inside the checkout, which is what the VM gets; launch with --env RECIPE=recipes/NAME.yaml"
    if (ROOT / path).is_file() and ignored_by_git(recipe):
        return f"error: RECIPE: {recipe} is ignored by git (.gitignore), so SkyPilot does not copy it to the VM; keep it under recipes/"
    if not JOB_PYTHON.exists():
        say(f"{recipe} is not checked before renting: no job environment here ({JOB_PYTHON.relative_to(ROOT)}; `make venv` builds it); "
            "the job checks it on the VM after setup")
        return None
    stamp = JOB_PYTHON.parents[1] / ".installed"  # make's: the environment was installed from the locks then
    if stamp.exists() and (ROOT / "requirements.lock").stat().st_mtime > stamp.stat().st_mtime:
        say(f"the job environment ({JOB_PYTHON.parents[1].relative_to(ROOT)}) is older than requirements.lock: `make venv` updates "
            "it; a refusal below may come from its older libraries")
    args = ["entrypoint.py", "validate", recipe, *(["--hub"] if mode == "hub" else []), "--set", f"publish.repo_id={repo}"]
    for item in RELAXED if mode == "hub" else []:
        args += ["--set", item]
    shown = " ".join(shlex.quote(a) for a in [str(JOB_PYTHON.relative_to(ROOT)), *args])
    say(f"checking {recipe} before renting anything: {shown}")
    env = dict(os.environ)
    env.setdefault("ALIGNPRESS_LOG", "WARNING")  # its warnings, not the steps of a check
    env.setdefault("TQDM_DISABLE", "1")
    if token:
        env["HF_TOKEN"] = token  # the launch's secret, as the job on the VM gets it
    started = time.monotonic()
    try:
        proc = subprocess.run([str(JOB_PYTHON), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return f"error: the launch check ({shown}) ran past {TIMEOUT_S} s; {SETTING}=offline skips the Hub's checks, =off the check"
    except OSError as e:  # a job environment whose python is gone (a venv made with a python since removed)
        return f"error: the launch check could not start {JOB_PYTHON.relative_to(ROOT)}: {e.strerror or e}; `make venv` rebuilds it, or {SETTING}=off"
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    for line in lines:
        if line not in errors[-1:]:
            print(line, file=sys.stderr)  # warnings (a license other than the base's, settings no stage reads)
    if proc.returncode == 0:
        say(f"{recipe} passed ({time.monotonic() - started:.0f} s)")
        return None
    say(f"the launch check refused {recipe} before anything was rented ({SETTING}=offline skips the Hub's checks, =off the check)")
    return errors[-1] if errors else f"error: the launch check ({shown}) failed with exit code {proc.returncode}: {lines[-1] if lines else 'no output'}"


class LaunchCheck(sky.AdminPolicy):
    @classmethod
    def validate_and_mutate(cls, user_request: sky.UserRequest) -> sky.MutatedUserRequest:
        task = user_request.task
        if user_request.at_client_side and user_request.request_name.value in REQUESTS and GUARD in (task.file_mounts or {}):
            images = {image for r in task.resources for image in (r.image_id or {}).values() if image}
            line = refusal(dict(task.envs or {}), dict(task.secrets or {}), images)
            if line:
                raise sky.exceptions.UserRequestRejectedByPolicy(line)
        return sky.MutatedUserRequest(task=task, skypilot_config=user_request.skypilot_config)
