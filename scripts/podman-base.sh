#!/usr/bin/env bash
# Make podman usable on a machine with no Docker engine and no registry access, and build a local
# Debian base image to stand in for the CUDA base (which cannot be pulled there).
#
#   scripts/podman-base.sh            # idempotent; prints the containers.conf path on its last line
#   export CONTAINERS_CONF=$(scripts/podman-base.sh | tail -n1)
#   podman build --runtime runc --network host ...   (and podman run --runtime runc ...)
#
# Why each setting: the sandbox forbids setting rlimits, and podman's default ulimits make every
# container fail ("error setting rlimits ... operation not permitted"); `default_ulimits = []` drops
# them. runc is the only OCI runtime installed here (no crun), so name it (`--runtime runc`).
# `--network host` is what the project's notes prescribe for builds; the demo itself runs with
# `--network none` (tests/test_container.py).
set -euo pipefail
# Settings come from the environment: -h/--help prints the header above; other arguments are refused.
case "${1-}" in
  "") ;;
  -h | --help) sed -n '2,/^set -euo pipefail/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; exit 0 ;;
  *) echo "error: $(basename "$0") takes no arguments (its settings are environment variables; see --help): got '$1'" >&2; exit 2 ;;
esac

BASE_IMAGE="${BASE_IMAGE:-localhost/debian-base:bookworm}"
SUITE="${SUITE:-bookworm}"
MIRROR="${MIRROR:-http://deb.debian.org/debian}"
CONF_DIR="${CONF_DIR:-${XDG_CONFIG_HOME:-$HOME/.config}/alignpress}"
CONF="$CONF_DIR/containers.conf"

log() { echo "podman-base: $*" >&2; }

missing=()
for tool in podman runc debootstrap; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if ((${#missing[@]})); then
  log "installing ${missing[*]}"
  SUDO=""
  [[ $(id -u) -eq 0 ]] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq podman runc debootstrap >&2
fi

mkdir -p "$CONF_DIR"
printf '[containers]\ndefault_ulimits = []\n' >"$CONF"
export CONTAINERS_CONF="$CONF"

if podman --runtime runc image exists "$BASE_IMAGE"; then
  log "$BASE_IMAGE already exists"
else
  log "building $BASE_IMAGE with debootstrap --variant=minbase $SUITE (about 30-60 s)"
  rootfs="$(mktemp -d)"
  trap 'rm -rf "$rootfs"' EXIT
  SUDO=""
  [[ $(id -u) -eq 0 ]] || SUDO="sudo"
  $SUDO debootstrap --variant=minbase "$SUITE" "$rootfs" "$MIRROR" >&2
  $SUDO tar -C "$rootfs" -c . | podman --runtime runc import - "$BASE_IMAGE" >&2
  $SUDO rm -rf "$rootfs"
  log "built $BASE_IMAGE"
fi

echo "$CONF"
