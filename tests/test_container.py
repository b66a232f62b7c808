"""The job image, built with podman and run like a batch job: the offline demo, end to end.

    make test-container        # = pytest -m container

Builds the Dockerfile on a local Debian base (scripts/podman-base.sh makes it; CUDA bases cannot be
pulled here) with the CPU torch wheel, runs `run recipes/demo.yaml` in a container with no network
and a host folder mounted at /outputs, then checks what the job left there. Takes a few minutes
(the first build about two); later builds reuse podman's layer cache.
"""
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.container

REPO = Path(__file__).resolve().parents[1]
IMAGE = os.environ.get("ALIGNPRESS_TEST_IMAGE", "localhost/alignpress:test")
BASE_IMAGE = os.environ.get("ALIGNPRESS_TEST_BASE_IMAGE", "localhost/debian-base:bookworm")
WHEELS = Path("/opt/wheels")  # the CPU torch wheel on these machines
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
STAGES = ("prepare", "train", "evaluate", "export", "publish")


@pytest.fixture(scope="module")
def podman(request):
    """Environment and base flags for podman on this machine (see scripts/podman-base.sh)."""
    if "container" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("runs podman containers: `make test-container` or `make test-sky-container` (pytest -m container)")
    setup = subprocess.run(["bash", str(REPO / "scripts" / "podman-base.sh")], capture_output=True, text=True,
                           timeout=900, env={**os.environ, "BASE_IMAGE": BASE_IMAGE})
    assert setup.returncode == 0, setup.stderr
    conf = setup.stdout.strip().splitlines()[-1]
    return {**os.environ, "CONTAINERS_CONF": conf}


@pytest.fixture(scope="module")
def image(podman):
    cmd = ["podman", "build", "--runtime", "runc", "--network", "host",
           "--build-arg", f"BASE_IMAGE={BASE_IMAGE}", "-t", IMAGE]
    if WHEELS.is_dir():
        cmd += ["-v", f"{WHEELS}:{WHEELS}:ro", "--build-arg", f"PIP_FIND_LINKS={WHEELS}"]
    if CA_BUNDLE.is_file():
        cmd += ["--secret", f"id=pipca,src={CA_BUNDLE}"]
    start = time.monotonic()
    build = subprocess.run([*cmd, str(REPO)], capture_output=True, text=True, timeout=1800, env=podman)
    assert build.returncode == 0, build.stdout[-4000:] + build.stderr[-4000:]
    print(f"podman build {IMAGE}: {time.monotonic() - start:.0f} s")
    return IMAGE


def podman_run(env, image, *args, volumes=(), timeout=1800, user=None):
    cmd = ["podman", "run", "--rm", "--runtime", "runc", "--network", "none"]
    if user:
        cmd += ["--user", user]
    for host, inside in volumes:
        cmd += ["-v", f"{host}:{inside}"]
    return subprocess.run([*cmd, image, *args], capture_output=True, text=True, timeout=timeout, env=env)


def test_validate_demo_recipe_in_container(podman, image, tmp_path):
    proc = podman_run(podman, image, "validate", "recipes/demo.yaml", timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # A user's own recipe, as the README shows it: its folder mounted read-only, the data file named
    # relative to the recipe. Validate reads and prepares that data in a scratch folder.
    mine = tmp_path / "my-recipes"
    (mine / "data").mkdir(parents=True)
    shutil.copy(REPO / "recipes" / "data" / "arithmetic-capybara.jsonl", mine / "data" / "pairs.jsonl")
    text = (REPO / "recipes" / "demo.yaml").read_text().replace("name: demo\n", "name: mine\n")
    (mine / "mine.yaml").write_text(text.replace("dataset: data/arithmetic-capybara.jsonl", "dataset: data/pairs.jsonl"))
    proc = podman_run(podman, image, "validate", "/recipes/mine.yaml", volumes=[(mine, "/recipes:ro")], timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "# /recipes/mine.yaml: valid" in proc.stdout.splitlines()
    assert "\nname: mine\n" in proc.stdout and "/recipes/data/pairs.jsonl" in proc.stdout, proc.stdout[:3000]
    proc = podman_run(podman, image, "validate", "/recipes/mine.yaml", "--set", "data.dataset=data/missing.jsonl",
                      volumes=[(mine, "/recipes:ro")], timeout=300)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith(
        "error: --set data.dataset: field 'data.dataset': "), proc.stderr[-3000:]
    # The code is not pip-installed in the image: the version comes from the pyproject.toml copied in
    # (without it every command failed at start-up).
    import tomllib

    proc = podman_run(podman, image, "--version", timeout=300)
    expected = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert (proc.returncode, proc.stdout.strip()) == (0, f"alignpress {expected}"), proc.stderr[-3000:]


def test_demo_runs_offline_in_container(podman, image, tmp_path):
    """As `docker run --user "$(id -u):$(id -g)"` runs it, so that the results on the volume are the
    user's, not root's: a user the image has no account for, whose HOME (podman: the working
    folder /app; Docker: /) it cannot write. It used to fail at once, unable to make ~/.cache.
    (As root: tests/test_sky_container.py, SkyPilot's way.)"""
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    os.chown(outputs, 1000, 1000)
    # No --output-dir: the image's ALIGNPRESS_OUTPUTS puts the run on the volume, /outputs/demo.
    proc = podman_run(podman, image, "run", "recipes/demo.yaml", volumes=[(outputs, "/outputs")], user="1000:1000")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[alignpress] HOME (/app) is not a folder this user (uid 1000) can write: caches and logs go to /tmp/alignpress-home-1000 instead" \
        in proc.stderr.splitlines()

    demo = outputs / "demo"
    owners = {(p.stat().st_uid, p.stat().st_gid) for p in demo.rglob("*")}
    assert owners == {(1000, 1000)}, owners
    manifest = json.loads((demo / "run.json").read_text())
    statuses = {name: stage.get("status") for name, stage in manifest["stages"].items()}
    assert statuses == {name: "done" for name in STAGES}
    config = json.loads((demo / "model" / "config.json").read_text())
    assert config.get("model_type")
    assert (demo / "model" / "README.md").read_text().strip()
    metrics = json.loads((demo / "metrics" / "eval.json").read_text())
    assert {"base", "aligned"} <= set(metrics)



def test_the_image_refuses_a_run_that_would_lose_its_outputs_or_its_gpu(podman, image, tmp_path):
    """Launches on the image that used to go on, or fail later with a misleading line: (1) SkyPilot's run
    script with BUCKET set but no bucket mounted. The image used to declare `VOLUME /outputs`, an
    anonymous volume that is a mount point on the VM's own disk, so the mount check passed and the
    run went to the VM's disk. (2) `docker run` without a volume at /outputs: the run trained into
    the container's own filesystem, gone with --rm, and a second `docker run` started over. (4) A
    Hub cache folder the user cannot write (below). (3) The job with train.device auto in a GPU
    container whose GPU torch cannot use: the CUDA base sets NVIDIA_VISIBLE_DEVICES, which stands
    in here for `--gpus all`; ALIGNPRESS_ALLOW_CONTAINER_OUTPUTS=1 lets (2) through, so the next
    check speaks."""
    base = ["podman", "run", "--rm", "--runtime", "runc", "--network", "none"]
    workdir = ["-v", f"{REPO}:/root/sky_workdir:ro", "-w", "/root/sky_workdir"]
    launch = ["-e", "HUB_REPO=someone/model", "-e", "HF_TOKEN=hf_dummy", "-e", "RECIPE=recipes/demo.yaml", "-e", "BUCKET=my-bucket",
              "-e", "SKYPILOT_MANAGED_JOB_ID=7"]
    proc = subprocess.run([*base, *workdir, *launch, "--entrypoint", "bash", image, "sky/run.sh"],
                          capture_output=True, text=True, timeout=300, env=podman)
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines() == ["error: BUCKET is set (my-bucket) but /outputs is not mounted; launch a task file from sky/"]

    proc = subprocess.run([*base, image, "run", "recipes/demo.yaml"], capture_output=True, text=True, timeout=300, env=podman)
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: /outputs/demo: the output folder is in this container's own filesystem (overlay at /, no volume mounted there): "
        "a new `docker run` could not resume a killed or failed run from it, and --rm deletes the results. Mount a host folder "
        "at /outputs (docker run -v $PWD/outputs:/outputs ...; runs go to /outputs/<recipe name>) or at --output-dir; "
        "ALIGNPRESS_ALLOW_CONTAINER_OUTPUTS=1 writes into the container anyway")

    # (4) `docker run --user` with a host folder for the Hub cache that Docker made as root's: prepare
    # failed on it, blaming the recipe's data file
    cache, outputs = tmp_path / "hf-cache", tmp_path / "outputs"
    cache.mkdir()
    outputs.mkdir()
    os.chown(outputs, 1000, 1000)
    proc = subprocess.run([*base, "--user", "1000:1000", "-v", f"{cache}:/cache/hf", "-v", f"{outputs}:/outputs", image, "run", "recipes/demo.yaml"],
                          capture_output=True, text=True, timeout=300, env=podman)
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: /cache/hf: owned by uid 0 with mode 755: this user (uid 1000) cannot make /cache/hf/hub, where the Hub's downloads go; "
        "point HF_HOME at a folder this user owns, or with `docker run -v HOST:/cache/hf` create HOST first (Docker makes a missing "
        "one, as root's)")
    assert list(outputs.iterdir()) == []

    proc = subprocess.run([*base, "-e", "NVIDIA_VISIBLE_DEVICES=all", "-e", "ALIGNPRESS_ALLOW_CONTAINER_OUTPUTS=1", image, "run", "recipes/demo.yaml"],
                          capture_output=True, text=True, timeout=300, env=podman)
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: recipes/demo.yaml: field 'train.device': train.device is auto and torch cannot use a CUDA GPU (")
    assert "but NVIDIA_VISIBLE_DEVICES is 'all' (a GPU container): the run would go on on the CPU" in last


def test_a_memory_limit_too_small_for_export_is_refused_at_the_door(podman, image, tmp_path):
    """`docker run --memory 1g` (a cgroup limit; /proc/meminfo in the container shows the whole
    machine): a user's model of 0.8 B weights, 3.2 GB in float32 for export's merge, is refused
    before prepare, naming the limit. The model is a config and a tokenizer, no weights: the door
    builds it on the meta device."""
    from transformers import Phi3Config

    from alignpress.disk import size_text
    from alignpress.hostmemory import count_text
    from alignpress.tiny import phi3_tokenizer

    mine = tmp_path / "recipes"
    model = mine / "big"
    (mine / "data").mkdir(parents=True)
    tok = phi3_tokenizer()
    tok.save_pretrained(model)
    hidden, layers = 2048, 12
    Phi3Config(vocab_size=len(tok), hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers, num_attention_heads=32,
               num_key_value_heads=32, max_position_embeddings=4096, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
               eos_token_id=tok.eos_token_id).save_pretrained(model)
    params = layers * (16 * hidden * hidden + 2 * hidden) + 2 * len(tok) * hidden + hidden
    shutil.copy(REPO / "recipes" / "data" / "arithmetic-capybara.jsonl", mine / "data" / "pairs.jsonl")
    text = (REPO / "recipes" / "demo.yaml").read_text().replace("name: demo\n", "name: big\n").replace("builtin:tiny-phi3-arithmetic", "big")
    (mine / "big.yaml").write_text(text.replace("dataset: data/arithmetic-capybara.jsonl", "dataset: data/pairs.jsonl"))
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    cmd = ["podman", "run", "--rm", "--runtime", "runc", "--network", "none", "--memory", "1g", "-e", "ALIGNPRESS_SKIP_DISK_CHECK=1",
           "-v", f"{mine}:/recipes:ro", "-v", f"{outputs}:/outputs", image, "run", "/recipes/big.yaml", "--set", "train.device=cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=podman)
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: /recipes/big.yaml: field 'model.name_or_path': not enough memory for export: at least {size_text(4 * params)} "
                           f"(export merges the adapter into the base in float32: {count_text(params)} weights x 4 bytes), and this machine has "), last
    room = last.split(", and this machine has ")[1].split(" available (")[0]
    assert room.endswith(" MB") and 300 < float(room.split()[0]) < 1024, last  # 1 GiB less the python process at the door
    assert " available (the memory limit in /sys/fs/cgroup/memory/memory.stat, less what its processes hold); " in last or \
        " available (the memory limit in /sys/fs/cgroup/memory.max, less what its processes hold); " in last, last  # cgroup v1 or v2
    assert "== prepare" not in proc.stderr and list(outputs.iterdir()) == []
