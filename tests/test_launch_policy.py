"""The launch check (sky/policy/alignpress_launch_policy.py) through SkyPilot's own CLI.

`make sky` (and `make test`) register the policy: `.sky.yaml` at the checkout's root names it and a
.pth file in .venv-sky puts its folder on the path. These tests run the real `sky launch --dryrun`
and `sky jobs launch` of the shipped task files in the checkout, with HOME in a temporary folder (the
local SkyPilot API server the client starts lives there and is stopped at the end). The recipe is
checked by the job's real `entrypoint.py validate --hub` against the test Hub server over HTTP. No
cloud is enabled here: a launch the check lets through stops at SkyPilot's next step (fetching its
catalog, offline here), never at the check.
"""
import os
import socket
import subprocess
from pathlib import Path

import pytest

from conftest import ROOT

SKY = ROOT / ".venv-sky" / "bin" / "sky"
REFUSED = "sky.exceptions.UserRequestRejectedByPolicy: "


@pytest.fixture(scope="module")
def sky_home(tmp_path_factory):
    """HOME and port of the tests' own SkyPilot API server: not one a user of this machine runs on
    the default port 46580 (which the client would use, and `sky api stop` stop)."""
    if not SKY.exists():
        pytest.fail(f"{SKY} is missing: run `make sky` (SkyPilot's own environment)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"HOME": str(tmp_path_factory.mktemp("sky-home")), "SKYPILOT_API_SERVER_LOCAL_PORT": str(port)}
    yield env
    subprocess.run([str(SKY), "api", "stop"], env={**os.environ, **env}, capture_output=True, timeout=120)


def launch(sky_env: dict, *args: str, recipe: str, repo: str = "alice/x", jobs: bool = False, task: str = "sky/phi3.yaml", **env: str):
    command = [str(SKY), "jobs", "launch", "-y"] if jobs else [str(SKY), "launch", "--dryrun", "-y"]
    command += [task, "--env", f"RECIPE={recipe}", "--env", f"HUB_REPO={repo}", "--env", "BUCKET=alignpress-test-bucket", "--secret", "HF_TOKEN", *args]
    proc = subprocess.run(command, cwd=ROOT, env={**os.environ, **sky_env, **env}, capture_output=True, text=True, timeout=300)
    ours = [line for line in proc.stderr.splitlines() if line.startswith(("alignpress: ", REFUSED))]
    return proc, ours


def test_make_registers_the_policy():
    assert (ROOT / ".sky.yaml").read_text().splitlines()[-1] == "admin_policy: alignpress_launch_policy.LaunchCheck"
    proc = subprocess.run([str(ROOT / ".venv-sky" / "bin" / "python"), "-c", "import alignpress_launch_policy as p; print(p.ROOT)"],
                          cwd="/", capture_output=True, text=True, timeout=120)
    assert (proc.returncode, proc.stdout.strip()) == (0, str(ROOT)), proc.stderr
    ignored = subprocess.run(["git", "-C", str(ROOT), "check-ignore", "-q", ".sky.yaml"], timeout=30)
    assert ignored.returncode == 0  # never synced to a VM, never committed


@pytest.mark.parametrize("jobs", [False, True], ids=["sky launch", "sky jobs launch"])
def test_a_bad_recipe_stops_the_launch_before_anything_is_rented(sky_home, hub_env, jobs):
    """A YAML that is not a recipe (an accelerate config) is refused with validate's own line."""
    proc, ours = launch(sky_home, recipe="recipes/accelerate/ddp.yaml", jobs=jobs)
    assert proc.returncode == 1, proc.stderr
    assert ours == [
        "alignpress: checking recipes/accelerate/ddp.yaml before renting anything: .venv/bin/python entrypoint.py validate "
        "recipes/accelerate/ddp.yaml --hub --set publish.repo_id=alice/x --set publish.allow_update=true --set publish.tag=null",
        "alignpress: the launch check refused recipes/accelerate/ddp.yaml before anything was rented "
        "(ALIGNPRESS_LAUNCH_CHECK=offline skips the Hub's checks, =off the check)",
        REFUSED + "error: recipes/accelerate/ddp.yaml: unknown field 'compute_environment'; known fields: card, data, description, "
        "dpo, eval, export, lora, model, name, publish, train",
    ]
    assert hub_env.server.requests == []  # refused at the recipe, before the Hub was asked


def test_a_good_recipe_goes_on_to_skypilot(sky_home, hub_env):
    """The demo recipe, a token that may write to alice/: the Hub is asked (token, repo, card
    metadata) and SkyPilot goes on; the token is in no output."""
    proc, ours = launch(sky_home, recipe="recipes/demo.yaml")
    assert ours[0].startswith("alignpress: checking recipes/demo.yaml before renting anything: ")
    assert len(ours) == 2 and ours[1].startswith("alignpress: recipes/demo.yaml passed ("), proc.stderr
    assert "whoami" in [r.route for r in hub_env.server.requests]
    assert REFUSED not in proc.stderr and "Applying client admin policy: LaunchCheck" in proc.stdout + proc.stderr
    assert hub_env.token not in proc.stdout + proc.stderr


def test_a_relaunch_whose_repo_exists_goes_on(sky_home, hub_env):
    """Relaunching to resume (a push cut short, or a finished job) finds HUB_REPO there: whether it is
    this run's, the job decides on the VM from the bucket's folder, so the check does not refuse it
    (validate --hub alone does: 'already exists and was not published by this run')."""
    api = hub_env.api()
    api.create_repo("alice/x", private=True)  # as the demo recipe (publish.private: true) pushed it
    api.upload_file(path_or_fileobj=b"{}", path_in_repo="alignpress.json", repo_id="alice/x")
    proc, ours = launch(sky_home, recipe="recipes/demo.yaml")
    assert len(ours) == 2 and ours[1].startswith("alignpress: recipes/demo.yaml passed ("), proc.stderr
    alone = subprocess.run([str(ROOT / ".venv" / "bin" / "python"), "entrypoint.py", "validate", "recipes/demo.yaml", "--hub", "--set",
                            "publish.repo_id=alice/x"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert alone.returncode == 2 and "alice/x already exists and was not published by this run" in alone.stderr.splitlines()[-1]


def test_the_hub_refusal_stops_the_launch(sky_home, hub_env):
    """A token that cannot write to HUB_REPO's namespace: the job's publish preflight line, here."""
    from hubserver import OTHER_TOKEN

    proc, ours = launch(sky_home, recipe="recipes/demo.yaml", HF_TOKEN=OTHER_TOKEN)
    assert proc.returncode == 1 and ours[-1].startswith(REFUSED + "error: "), proc.stderr
    assert "the token belongs to 'bob', who cannot write to the namespace 'alice'" in ours[-1]
    assert OTHER_TOKEN not in proc.stdout + proc.stderr


@pytest.mark.parametrize(
    ("recipe", "line"),
    [
        ("/etc/alignpress.yaml", "error: RECIPE: /etc/alignpress.yaml is not a path inside the checkout, which is what the VM gets; "
                                 "launch with --env RECIPE=recipes/NAME.yaml"),
        ("../elsewhere/recipe.yaml", "error: RECIPE: ../elsewhere/recipe.yaml is not a path inside the checkout, which is what the VM gets; "
                                     "launch with --env RECIPE=recipes/NAME.yaml"),
        ("outputs/launch-check-test.yaml", "error: RECIPE: outputs/launch-check-test.yaml is ignored by git (.gitignore), so SkyPilot "
                                           "does not copy it to the VM; keep it under recipes/"),
    ],
)
def test_a_recipe_the_vm_would_not_have_is_refused(sky_home, hub_env, recipe, line):
    ignored = ROOT / "outputs" / "launch-check-test.yaml"
    ignored.parent.mkdir(exist_ok=True)
    ignored.write_text((ROOT / "recipes" / "demo.yaml").read_text())
    try:
        proc, ours = launch(sky_home, recipe=recipe)
    finally:
        ignored.unlink()
    assert proc.returncode == 1 and ours == [REFUSED + line], proc.stderr


def test_off_skips_the_check_and_other_tasks_are_not_checked(sky_home, hub_env, tmp_path):
    proc, ours = launch(sky_home, recipe="recipes/accelerate/ddp.yaml", ALIGNPRESS_LAUNCH_CHECK="off")
    assert ours == ["alignpress: ALIGNPRESS_LAUNCH_CHECK=off: the recipe is not checked before renting"], proc.stderr
    proc, ours = launch(sky_home, recipe="recipes/demo.yaml", ALIGNPRESS_LAUNCH_CHECK="later")
    assert ours == [REFUSED + "error: ALIGNPRESS_LAUNCH_CHECK='later': expected hub (the default), offline or off"], proc.stderr
    # A task of the user's own (no alignpress checkout guard in its file_mounts) launched here
    other = ROOT / "outputs" / "launch-check-other.yaml"
    other.parent.mkdir(exist_ok=True)
    other.write_text("name: other\nenvs:\n  RECIPE: nothing\n  HUB_REPO: alice/x\n  BUCKET: b\nsecrets:\n  HF_TOKEN: null\nrun: echo hi\n")
    try:
        proc, ours = launch(sky_home, recipe="recipes/accelerate/ddp.yaml", task=str(other.relative_to(ROOT)))
    finally:
        other.unlink()
    assert ours == [] and "Applying client admin policy: LaunchCheck" in proc.stdout + proc.stderr, proc.stderr
    assert hub_env.server.requests == []


@pytest.mark.parametrize("repo", ["hf_" + "a1" * 17, "alice/{token}"], ids=["a token by its form", "the launch's token"])
def test_a_token_given_as_hub_repo_is_refused_and_never_shown(sky_home, hub_env, repo):
    repo = repo.format(token=hub_env.token)
    proc, ours = launch(sky_home, recipe="recipes/demo.yaml", repo=repo)
    assert proc.returncode == 1 and ours == [REFUSED + "error: HUB_REPO holds a Hub token (not shown); launch with the token only in --secret HF_TOKEN"]
    assert repo.removeprefix("alice/") not in proc.stdout + proc.stderr
    assert hub_env.server.requests == []


def test_an_image_of_another_lock_is_said_before_renting(sky_home, hub_env):
    """--image-id of an alignpress image tagged with another lock hash than the checkout's: setup would
    build the environment on the VM after all (minutes, again after each recovery). Said, not refused:
    setup compares package versions, the tag hashes the locks' bytes (comments too)."""
    import hashlib

    ours = hashlib.sha256((ROOT / "requirements.lock").read_bytes() + (ROOT / "requirements-gpu.lock").read_bytes()).hexdigest()[:12]
    proc, ours_lines = launch(sky_home, "--image-id", "docker:ghcr.io/me/alignpress:0.1.0-0123456789ab", recipe="recipes/demo.yaml",
                              ALIGNPRESS_LAUNCH_CHECK="offline")
    assert ours_lines[0] == ("alignpress: --image-id ghcr.io/me/alignpress:0.1.0-0123456789ab was built from another lock (0123456789ab) than "
                             f"this checkout's ({ours}): unless only the locks' comments differ, sky/setup.sh builds the environment on the VM "
                             f"(minutes of a rented GPU, again after every recovery); the image for this checkout is tagged ...-{ours}"), proc.stderr
    assert ours_lines[-1].startswith("alignpress: recipes/demo.yaml passed (") and REFUSED not in proc.stderr
    for image in (f"docker:ghcr.io/me/alignpress:0.1.0-{ours}", "docker:ghcr.io/me/alignpress:0.1.0"):  # this lock's, or no hash to compare
        proc, ours_lines = launch(sky_home, "--image-id", image, recipe="recipes/demo.yaml", ALIGNPRESS_LAUNCH_CHECK="offline")
        assert ours_lines[0].startswith("alignpress: checking recipes/demo.yaml") and ours_lines[-1].startswith("alignpress: recipes/demo.yaml passed ("), proc.stderr


def fake_checkout(tmp_path: Path, python: str | None) -> Path:
    """A checkout around a copy of the policy (it finds the job's environment next to itself), with
    .venv/bin/python as given: None (not built), or a script's text."""
    import shutil

    root = tmp_path / "checkout"
    (root / "sky" / "policy").mkdir(parents=True)
    shutil.copy(ROOT / "sky" / "policy" / "alignpress_launch_policy.py", root / "sky" / "policy")
    for name in ("src", "entrypoint.py"):
        (root / name).symlink_to(ROOT / name)
    shutil.copytree(ROOT / "recipes", root / "recipes")  # a recipe behind a symlink out of the checkout is refused
    for name in ("requirements.lock", "requirements-gpu.lock"):
        shutil.copy(ROOT / name, root / name)
    if python is not None:
        (root / ".venv" / "bin").mkdir(parents=True)
        (root / ".venv" / "bin" / "python").write_text(python)
        (root / ".venv" / "bin" / "python").chmod(0o755)
    return root


def call_refusal(root: Path, **env: str) -> subprocess.CompletedProcess:
    """The policy's refusal() for the demo recipe, in SkyPilot's environment; prints its answer."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import alignpress_launch_policy as p; "
            "print(p.refusal({'RECIPE': 'recipes/demo.yaml', 'HUB_REPO': 'alice/x'}, {}))")
    return subprocess.run([str(ROOT / ".venv-sky" / "bin" / "python"), "-c", code, str(root / "sky" / "policy")],
                          env={**os.environ, "ALIGNPRESS_LAUNCH_CHECK": "offline", **env}, capture_output=True, text=True, timeout=300)


def test_without_a_job_environment_the_launch_goes_on_and_says_so(tmp_path):
    proc = call_refusal(fake_checkout(tmp_path, None))
    assert (proc.returncode, proc.stdout) == (0, "None\n"), proc.stderr
    assert proc.stderr.splitlines() == ["alignpress: recipes/demo.yaml is not checked before renting: no job environment here (.venv/bin/python; "
                                        "`make venv` builds it); the job checks it on the VM after setup"]


def test_a_job_environment_that_cannot_start_is_one_line(tmp_path):
    proc = call_refusal(fake_checkout(tmp_path, "#!/nonexistent/python3\n"))
    assert proc.stdout == ("error: the launch check could not start .venv/bin/python: No such file or directory; `make venv` rebuilds it, "
                           "or ALIGNPRESS_LAUNCH_CHECK=off\n"), proc.stderr


def test_an_environment_older_than_the_lock_is_said(tmp_path):
    """After a pull that changed requirements.lock, the check runs with the old libraries: a refusal may
    come from them, and `make venv` updates them (make's own rule: the lock newer than the stamp)."""
    root = fake_checkout(tmp_path, f'#!/bin/sh\nexec "{ROOT / ".venv" / "bin" / "python"}" "$@"\n')
    stamp = root / ".venv" / ".installed"
    stamp.touch()
    os.utime(stamp, (1_000_000_000, 1_000_000_000))
    proc = call_refusal(root)
    assert proc.stdout == "None\n", proc.stderr
    lines = proc.stderr.splitlines()
    assert lines[0] == ("alignpress: the job environment (.venv) is older than requirements.lock: `make venv` updates it; a refusal below "
                        "may come from its older libraries")
    assert lines[1].startswith("alignpress: checking recipes/demo.yaml before renting anything: .venv/bin/python entrypoint.py validate")
    assert lines[-1].startswith("alignpress: recipes/demo.yaml passed (")
    os.utime(stamp)  # installed after the lock's change: nothing said
    assert "older than requirements.lock" not in call_refusal(root).stderr
