#!/usr/bin/env bash
# SkyPilot `setup`: build the job's environment on the VM from requirements.lock and
# requirements-gpu.lock, with uv.
#
#   bash sky/setup.sh     # from the checkout (SkyPilot's workdir); safe to run again
#
# First the launch's refusals (sky/env.sh check_launch: HUB_REPO, HF_TOKEN, RECIPE, BUCKET and its
# mount at /outputs, ACCELERATE_CONFIG, and the Hub's answer for the token and the repo's
# namespace), one line and exit 2, so a launch that run.sh would refuse does not build the environment first.
# Idempotent: an environment already built for this lock (a stamp keyed on the lock's hash), or the
# prebuilt image's /opt/venv when it holds the lock's versions, is used as it is; the second run
# takes about a second (setup run again on the same cluster). A recovered managed job is on a new
# VM and builds it again (minutes, several GB of CUDA wheels), unless it runs on the prebuilt image.
# Python: the lock needs >= 3.11 (transformers 5.23, numpy 2.4, pandas 3.1). uv takes the VM's
# python when it fits (Debian 12: 3.11, Ubuntu 24.04: 3.12) and otherwise downloads one (Ubuntu
# 22.04 ships 3.10). Knobs: ALIGNPRESS_PYTHON (uv's --python request), UV_FIND_LINKS (a local wheel
# folder, e.g. a CPU torch for tests; uv reads it itself), ALIGNPRESS_VENV (where to build).
set -euo pipefail
# shellcheck source=sky/env.sh
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
script_args "$@"
check_launch hub

UV_VERSION="0.13.9"
PYTHON_REQUEST="${ALIGNPRESS_PYTHON:->=3.11,<3.13}"
TOOLS="$HOME/.alignpress/tools"
log() { echo "alignpress setup: $*" >&2; }
start=$SECONDS

if py="$(job_python)"; then
  log "environment ready: $py (lock $LOCK_HASH), nothing to do"
  exit 0
fi

# uv: on PATH, SkyPilot's own (it installs uv in ~/.local/bin on every VM it provisions), ours from
# an earlier run, else from PyPI into a small venv of the system python.
find_uv() {
  local uv
  for uv in "${UV:-}" "$(command -v uv || true)" "$HOME/.local/bin/uv" "$TOOLS/bin/uv"; do
    if [ -n "$uv" ] && "$uv" --version >/dev/null 2>&1; then echo "$uv"; return 0; fi
  done
  return 1
}
if ! UV="$(find_uv)"; then
  if ! python3 -m venv --help >/dev/null 2>&1 || ! python3 -c 'import ensurepip' 2>/dev/null; then
    # A bare Debian/Ubuntu: python3 without venv/pip (or no python3 at all).
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo -n"
    command -v apt-get >/dev/null || { log "error: no uv and no python3 with venv; install python3-venv or uv"; exit 1; }
    log "installing python3-venv with apt-get"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends python3-venv ca-certificates >/dev/null
  fi
  log "installing uv $UV_VERSION from PyPI into $TOOLS"
  rm -rf "$TOOLS"
  python3 -m venv "$TOOLS"
  "$TOOLS/bin/python" -m pip install -q --disable-pip-version-check "uv==$UV_VERSION"
  UV="$TOOLS/bin/uv"
fi
log "uv: $UV ($("$UV" --version))"

# Build in place; the stamp is written last, so an interrupted setup is finished by the next one.
if [ ! -x "$JOB_VENV/bin/python" ]; then
  "$UV" venv -q --python "$PYTHON_REQUEST" "$JOB_VENV"
fi
VIRTUAL_ENV="$JOB_VENV" "$UV" pip install -q -r "$LOCK"
# --no-deps: liger-kernel's torch and triton come with the CUDA torch wheel above (requirements-gpu.lock).
VIRTUAL_ENV="$JOB_VENV" "$UV" pip install -q --no-deps -r "$GPU_LOCK"
lock_satisfied "$JOB_VENV/bin/python"
touch "$JOB_VENV/$STAMP_NAME"
log "environment built: $JOB_VENV/bin/python ($("$JOB_VENV/bin/python" -V), lock $LOCK_HASH) in $((SECONDS - start)) s"
