# shellcheck shell=bash
# Sourced by sky/setup.sh and sky/run.sh: the launch's refusals, where the job's environment lives
# and whether it is ready. The environment is keyed on the locks' hash, so a changed lock builds a
# new one and an unchanged lock (a second `sky launch` on the same cluster, setup run again) finds the
# old one. It lives on the VM's disk: a recovered managed job lands on a new VM and builds it again,
# unless it runs on the prebuilt image (--image-id), whose /opt/venv holds the lock.
# A VM is the GPU path: it gets requirements-gpu.lock too (liger-kernel, which the seed recipes'
# train.use_liger_kernel needs). The key is the first 12 hex digits of
# `cat requirements.lock requirements-gpu.lock | sha256sum`, as the image workflow tags its images.
ALIGNPRESS_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LOCK="$ALIGNPRESS_ROOT/requirements.lock"
GPU_LOCK="$ALIGNPRESS_ROOT/requirements-gpu.lock"
LOCK_HASH="$(cat "$LOCK" "$GPU_LOCK" | sha256sum | cut -c1-12)"
JOB_VENV="${ALIGNPRESS_VENV:-$HOME/.alignpress/venv-$LOCK_HASH}"
# Written into JOB_VENV as the last step of a successful install.
STAMP_NAME=".alignpress-lock-$LOCK_HASH"
# The prebuilt image (Dockerfile) installs the lock into /opt/venv.
IMAGE_VENV="${ALIGNPRESS_IMAGE_VENV:-/opt/venv}"

# The launch's own refusals, one line and exit 2 each. setup.sh makes them first, before it builds
# anything (minutes of a rented GPU), and run.sh again before the job. SkyPilot already stops a
# launch without HUB_REPO or BUCKET (null in the task files) or with HF_TOKEN unset in the shell,
# but lets an empty value through (--env HUB_REPO=, an exported empty HF_TOKEN).
# HUB_REPO's and HF_TOKEN's form are checked by sky/launch_check.py with the VM's python3 (skipped
# where there is none: the job checks them again); `check_launch hub` (setup.sh) also asks the Hub
# whether the token may push to HUB_REPO; run.sh leaves that to the job's own preflight.
launch_error() { echo "error: $*" >&2; exit 2; }
# The scripts take their settings from the environment: -h/--help prints the calling script's header
# comment; any other argument is refused (it would otherwise be ignored, and the script would start).
script_args() {
  case "${1-}" in
    "") ;;
    -h | --help) sed -n '2,/^set -euo pipefail/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; exit 0 ;;
    *) launch_error "$(basename "$0") takes no arguments (its settings are environment variables; see --help): got '$1'" ;;
  esac
}
check_launch() {
  [ -n "${HUB_REPO:-}" ] || launch_error "HUB_REPO is not set; launch with --env HUB_REPO=namespace/name"
  [ -n "${HF_TOKEN:-}" ] || launch_error "HF_TOKEN is not set; launch with --secret HF_TOKEN"
  [ -n "${RECIPE:-}" ] || launch_error "RECIPE is not set; launch with --env RECIPE=recipes/NAME.yaml"
  if [ -n "${SKYPILOT_MANAGED_JOB_ID:-}" ] && [ -z "${BUCKET:-}" ]; then
    launch_error "BUCKET is not set; a managed job keeps its outputs in a bucket: launch with --env BUCKET=a-name-of-your-own"
  fi
  if [ -d "$ALIGNPRESS_ROOT/$RECIPE" ] || [ -d "$RECIPE" ]; then
    launch_error "RECIPE: $RECIPE is a folder, not a recipe (a .yaml file, such as recipes/phi3-mini-capybara.yaml)"
  fi
  [ -f "$ALIGNPRESS_ROOT/$RECIPE" ] || [ -f "$RECIPE" ] || launch_error "RECIPE: $RECIPE does not exist in the checkout"
  case "$RECIPE" in
    *.yaml | *.yml) ;;
    *) launch_error "RECIPE: $RECIPE is not a recipe (a .yaml file, such as recipes/phi3-mini-capybara.yaml)" ;;
  esac
  # The bucket is mounted before setup runs: a launch without it is refused before the build.
  # A plain folder there (the image's /outputs) would take the run to the VM's disk, lost with the VM.
  if [ -n "${BUCKET:-}" ]; then
    local root="${OUTPUT_ROOT:-/outputs}"
    if [ ! -d "$root" ] || { command -v mountpoint >/dev/null && ! mountpoint -q "$root"; }; then
      launch_error "BUCKET is set ($BUCKET) but $root is not mounted; launch a task file from sky/"
    fi
  fi
  if [ -n "${ACCELERATE_CONFIG:-}" ] && ! accelerate_file >/dev/null; then
    launch_error "ACCELERATE_CONFIG: $ACCELERATE_CONFIG is neither a file in the checkout nor a shipped config ($(shipped_accelerate))"
  fi
  if command -v python3 >/dev/null; then
    local mode=--offline
    [ "${1:-}" != hub ] || mode=--hub
    python3 "$ALIGNPRESS_ROOT/sky/launch_check.py" "$mode" || exit $?
  fi
}

# ACCELERATE_CONFIG (multi-node) as a file: a path in the checkout, or the name of a shipped config.
accelerate_file() {
  local value="${ACCELERATE_CONFIG:-ddp}" f
  for f in "$value" "$ALIGNPRESS_ROOT/$value" "$ALIGNPRESS_ROOT/recipes/accelerate/$value.yaml"; do
    if [ -f "$f" ]; then echo "$f"; return 0; fi
  done
  return 1
}
# The recipe's own train.accelerate_config as a file ("" when it has none, or when the recipe does
# not load: the job then says why, at its door). Needs the job's python ($PY).
recipe_accelerate_config() {
  PYTHONPATH="$ALIGNPRESS_ROOT/src${PYTHONPATH:+:$PYTHONPATH}" "$PY" -c '
import sys
from alignpress.recipe import accelerate_config_path, load_recipe
try:
    recipe = load_recipe(sys.argv[1], [])
except Exception:
    sys.exit(0)
print(accelerate_config_path(recipe) or "")
' "$RECIPE" 2>/dev/null || true
}
shipped_accelerate() {
  local f names=()
  for f in "$ALIGNPRESS_ROOT"/recipes/accelerate/*.yaml; do names+=("$(basename "$f" .yaml)"); done
  local IFS=,
  echo "recipes/accelerate/: ${names[*]}" | sed 's/,/, /g'
}

# True when the python $1 has every package of both locks at the locked version (a local label such
# as torch's +cpu is ignored), and is new enough for them.
lock_satisfied() {
  "$1" - "$LOCK" "$GPU_LOCK" <<'PY'
import sys
from importlib.metadata import PackageNotFoundError, version

if sys.version_info < (3, 11):
    sys.exit(f"python {sys.version.split()[0]} is older than 3.11")
wrong = []
for line in (ln for path in sys.argv[1:] for ln in open(path)):
    line = line.split("#")[0].strip()
    if not line:
        continue
    name, _, want = line.partition("==")
    try:
        have = version(name)
    except PackageNotFoundError:
        have = "missing"
    if have.split("+")[0] != want:
        wrong.append(f"{name} {have} (lock: {want})")
if wrong:
    sys.exit(f"{len(wrong)} packages differ from the lock: " + ", ".join(wrong[:3]))
PY
}

# Prints the job's python: the environment setup.sh built, else the image's when it matches the lock.
job_python() {
  if [ -f "$JOB_VENV/$STAMP_NAME" ] && [ -x "$JOB_VENV/bin/python" ]; then
    echo "$JOB_VENV/bin/python"
  elif [ -x "$IMAGE_VENV/bin/python" ] && lock_satisfied "$IMAGE_VENV/bin/python" 2>/dev/null; then
    echo "$IMAGE_VENV/bin/python"
  else
    return 1
  fi
}
