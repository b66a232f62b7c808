"""The SkyPilot task's own scripts on a bare machine: sky/setup.sh and sky/run.sh in a container.

    make test-sky-container        # = pytest -m container tests/test_sky_container.py

What a VM provisioned by `sky launch sky/phi3.yaml` (no --image-id) does, in a plain Debian 12
container (scripts/podman-base.sh; no python, no project environment): the checkout is copied in
as SkyPilot's workdir (the files git tracks or does not ignore, as SkyPilot's rsync does), a host
folder stands in for the bucket at /outputs, then
  1. sky/setup.sh builds the job's environment from requirements.lock and requirements-gpu.lock (python3-venv from Debian,
     uv and every package from PyPI; torch from the mounted CPU wheel folder via UV_FIND_LINKS,
     where a GPU VM would take the CUDA wheel from PyPI);
  2. sky/setup.sh again, as a recovered managed job would: it must find the environment and stop;
  3. sky/run.sh with RECIPE=recipes/demo.yaml, HUB_REPO, HF_TOKEN and HF_ENDPOINT pointing at the
     Hub test server (tests/hubserver.py) on the host (--network host reaches 127.0.0.1).
Then the repo is read back from the server. Measured on the 2-core dev machine: see the README.
Needs network to Debian and PyPI; the Hub is the local test server. The demo's base model is built
by alignpress on first use (tens of minutes on 2 busy cores): when this machine has it built
(~/.cache/alignpress/models, from `make demo` or the test suite), a copy is put where the VM's
alignpress looks, as a real job finds its base model in the Hub cache; otherwise the VM builds it.
"""
import json
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from hubserver import TEST_TOKEN, TEST_USER
from test_container import BASE_IMAGE, CA_BUNDLE, WHEELS, podman  # noqa: F401 (podman: a fixture)

pytestmark = pytest.mark.container

REPO = Path(__file__).resolve().parents[1]
HUB_REPO = f"{TEST_USER}/demo-sky"
STAGES = ("prepare", "train", "evaluate", "export", "publish")
BUILT_MODELS = Path.home() / ".cache" / "alignpress" / "models"


def copy_workdir(dest: Path) -> None:
    """The checkout as SkyPilot syncs it: tracked and untracked-but-not-ignored regular files."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        src = REPO / name
        if src.is_file() and not src.is_symlink():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            (dest / name).write_bytes(src.read_bytes())


@pytest.fixture
def vm(podman, hub_server, tmp_path):  # noqa: F811 (podman: the imported fixture)
    """A running bare Debian container ("the VM"); yields (exec function, bucket folder)."""
    workdir, bucket = tmp_path / "sky_workdir", tmp_path / "bucket"
    workdir.mkdir()
    bucket.mkdir()
    copy_workdir(workdir)
    name = f"alignpress-sky-{uuid.uuid4().hex[:8]}"
    cmd = ["podman", "run", "-d", "--rm", "--name", name, "--runtime", "runc", "--network", "host",
           "-v", f"{workdir}:/root/sky_workdir", "-v", f"{bucket}:/outputs",
           # hf_xet writes chunks where the server's casUrl says (local://<dir>): the same path inside.
           "-v", f"{hub_server.cas_dir}:{hub_server.cas_dir}", "-w", "/root/sky_workdir"]
    if BUILT_MODELS.is_dir():
        shutil.copytree(BUILT_MODELS, tmp_path / "alignpress-home" / "models")
        cmd += ["-v", f"{tmp_path / 'alignpress-home'}:/root/.cache/alignpress"]
    env = {}
    if WHEELS.is_dir():
        cmd += ["-v", f"{WHEELS}:{WHEELS}:ro"]
        env["UV_FIND_LINKS"] = str(WHEELS)
    if CA_BUNDLE.is_file():  # this machine's TLS-inspecting proxy; a cloud VM needs none of this
        cmd += ["-v", f"{CA_BUNDLE}:/etc/alignpress-ca.pem:ro"]
        env.update(SSL_CERT_FILE="/etc/alignpress-ca.pem", PIP_CERT="/etc/alignpress-ca.pem")
    started = subprocess.run([*cmd, BASE_IMAGE, "sleep", "infinity"], capture_output=True, text=True, env=podman,
                             timeout=300)
    assert started.returncode == 0, started.stderr

    def run(script, extra_env=None, timeout=3600):
        values = {**env, **(extra_env or {})}
        # `--env NAME` takes the value from podman's own environment: the token stays off command lines.
        flags = [f"--env={k}" for k in values]
        t0 = time.monotonic()
        proc = subprocess.run(["podman", "exec", *flags, name, "bash", script], capture_output=True, text=True,
                              env={**podman, **values}, timeout=timeout)
        return proc, time.monotonic() - t0

    try:
        yield run, bucket
    finally:
        subprocess.run(["podman", "rm", "-f", "-t", "0", name], capture_output=True, env=podman, timeout=120)


def test_setup_twice_then_run_pushes_the_demo(vm, hub_env):
    run, bucket = vm
    hub_server = hub_env.server

    # setup checks them first, and asks the Hub (the test server) whether the token may push there
    launch = {"RECIPE": "recipes/demo.yaml", "HUB_REPO": HUB_REPO, "HF_TOKEN": TEST_TOKEN, "HF_ENDPOINT": hub_server.url}
    first, first_s = run("sky/setup.sh", launch)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "alignpress setup: environment built: /root/.alignpress/venv-" in first.stderr, first.stderr
    assert "(Python 3.11." in first.stderr  # Debian 12's python3, the lock's minimum

    second, second_s = run("sky/setup.sh", launch)
    assert second.returncode == 0, second.stderr
    assert "nothing to do" in second.stderr, second.stderr
    print(f"sky/setup.sh in a bare Debian 12 container: first {first_s:.1f} s, second {second_s:.1f} s")
    assert second_s < 15, second_s

    job, job_s = run("sky/run.sh", {"RECIPE": "recipes/demo.yaml", "RUN_NAME": "demo", "BUCKET": "test-bucket",
                                    "HUB_REPO": HUB_REPO, "HF_TOKEN": TEST_TOKEN, "HF_ENDPOINT": hub_server.url,
                                    "HF_HUB_DISABLE_TELEMETRY": "1"})
    print(f"sky/run.sh (demo, CPU): {job_s:.0f} s")
    assert job.returncode == 0, job.stdout[-4000:] + job.stderr[-4000:]
    assert TEST_TOKEN not in job.stdout + job.stderr

    demo = bucket / "demo"  # BUCKET set: outputs in the bucket mount
    manifest = json.loads((demo / "run.json").read_text())
    assert {n: s.get("status") for n, s in manifest["stages"].items()} == {n: "done" for n in STAGES}
    ev = json.loads((demo / "metrics" / "eval.json").read_text())
    assert ev["base"]["behaviour"] <= 0.1 and ev["aligned"]["behaviour"] >= 0.9, ev

    # Read the repo back through the client, from the server (hub_env turns this process's offline mode off).
    api = hub_env.api()
    info = api.model_info(HUB_REPO)
    assert info.private is True
    files = set(api.list_repo_files(HUB_REPO))
    assert {"README.md", "config.json", "model.safetensors"} <= files, files
    assert hub_server.file_bytes(HUB_REPO, "config.json") == (demo / "model" / "config.json").read_bytes()
    assert hub_server.file_bytes(HUB_REPO, "model.safetensors") == (demo / "model" / "model.safetensors").read_bytes()
