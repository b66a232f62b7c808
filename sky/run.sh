#!/usr/bin/env bash
# SkyPilot `run`: the job, the same on both launch paths (environment built by sky/setup.sh, or the
# prebuilt image's /opt/venv) and on one or several nodes.
#
#   HUB_REPO=me/name HF_TOKEN=... RECIPE=recipes/demo.yaml bash sky/run.sh
#
# Envs: HUB_REPO (required), HF_TOKEN (required; a SkyPilot secret), RECIPE, RUN_NAME (the output
# folder; keep it across relaunches to resume), BUCKET (the bucket the task file mounts at
# /outputs; required for a managed job, whose VM can vanish), ACCELERATE_CONFIG (several GPUs or
# nodes; default ddp) and MAIN_PROCESS_PORT (multi-node). Without BUCKET, outputs go to the VM's own disk
# ($HOME/alignpress-outputs), which `sky down` deletes: fine for a cluster you keep and ssh into.
# Every refusal is one line and exit 2; setup.sh makes the launch's refusals before it builds anything.
set -euo pipefail
# shellcheck source=sky/env.sh
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
script_args "$@"
fail() { launch_error "$@"; }
check_launch  # HUB_REPO, HF_TOKEN, RECIPE, BUCKET and its mount (setup.sh made the same checks before building)
cd "$ALIGNPRESS_ROOT" || fail "cannot enter the checkout $ALIGNPRESS_ROOT"
PY="$(job_python)" || fail "the job's environment for requirements.lock + requirements-gpu.lock ($LOCK_HASH) is not built; run sky/setup.sh first"

if [ -n "${BUCKET:-}" ]; then
  OUTPUT_ROOT="${OUTPUT_ROOT:-/outputs}"  # the task files' bucket mount (check_launch: it is a mount)
else
  OUTPUT_ROOT="${OUTPUT_ROOT:-$HOME/alignpress-outputs}"
  echo "alignpress: no BUCKET: outputs go to $OUTPUT_ROOT on this VM's disk (gone after sky down)" >&2
  # On the prebuilt image (--image-id) that disk is the container's own, which lives as long as the
  # cluster: the job would refuse it as it refuses a `docker run` without a volume.
  export ALIGNPRESS_ALLOW_CONTAINER_OUTPUTS=1
fi
OUT="$OUTPUT_ROOT/${RUN_NAME:-$(basename "$RECIPE" .yaml)}"
JOB=(entrypoint.py run "$RECIPE" --set "publish.repo_id=$HUB_REPO" --output-dir "$OUT")
# A VM rented with GPUs trains on them or not at all: with train.device auto, a torch that cannot
# use the GPU (a driver older than the wheel's CUDA) would train on the CPU, for days.
set_by="publish.repo_id from HUB_REPO"
if [ "${SKYPILOT_NUM_GPUS_PER_NODE:-0}" -gt 0 ]; then
  JOB+=(--set train.device=cuda)
  set_by+=", train.device=cuda for the rented GPUs"
fi
NODES="${SKYPILOT_NUM_NODES:-1}"
GPUS="${SKYPILOT_NUM_GPUS_PER_NODE:-0}"
if [ "$NODES" -eq 1 ] && [ "$GPUS" -gt 1 ]; then
  # Several GPUs on one node (`--gpus L40S:4`): one process per GPU, which the job starts itself
  # under the recipe's train.accelerate_config. One process would see them all, and transformers
  # would train with DataParallel on GPUS x the recipe's micro-batch (the job refuses that). A recipe
  # without one gets ACCELERATE_CONFIG (default ddp); ACCELERATE_CONFIG also replaces the recipe's.
  if [ -n "${ACCELERATE_CONFIG:-}" ] || [ -z "$(recipe_accelerate_config)" ]; then
    config="${ACCELERATE_CONFIG:-ddp}"
    [ -f "$ALIGNPRESS_ROOT/recipes/accelerate/$config.yaml" ] || config="$(accelerate_file)"
    JOB+=(--set "train.accelerate_config=$config")
    set_by+=", train.accelerate_config=$config: one process for each of the node's $GPUS GPUs"
  fi
fi
# The job's messages name these --set flags, which the user did not type: say where they come from.
echo "alignpress: ${JOB[*]} ($set_by)" >&2

if [ "$NODES" -gt 1 ]; then
  # The launch's config: ACCELERATE_CONFIG, else the recipe's train.accelerate_config, else ddp.
  config="$(accelerate_file)"
  if [ -z "${ACCELERATE_CONFIG:-}" ] && recipe_config="$(recipe_accelerate_config)" && [ -n "$recipe_config" ]; then
    config="$recipe_config"
  fi
  # One launcher per node; SkyPilot sets these on every node (sky/skylet/constants.py), head first.
  HEAD_IP="$(echo "$SKYPILOT_NODE_IPS" | head -n1)"
  # The launcher exits 1 for every failure and ends on torch's report: each process leaves a record
  # of its line and exit code, and the first failure's is said last, with its code (2, 3, 143).
  EXITS="$(mktemp -d)"
  trap 'rm -rf "$EXITS"' EXIT
  code=0
  ALIGNPRESS_EXIT_DIR="$EXITS" "$(dirname "$PY")/accelerate" launch \
    --config_file "$config" \
    --num_machines "$NODES" \
    --machine_rank "$SKYPILOT_NODE_RANK" \
    --main_process_ip "$HEAD_IP" \
    --main_process_port "${MAIN_PROCESS_PORT:-29500}" \
    --num_processes "$((NODES * GPUS))" \
    "${JOB[@]}" || code=$?
  if [ "$code" -ne 0 ]; then
    PYTHONPATH="$ALIGNPRESS_ROOT/src${PYTHONPATH:+:$PYTHONPATH}" "$PY" -m alignpress.node_exit "$EXITS" "$code" || code=$?
  fi
  exit "$code"
fi
exec "$PY" "${JOB[@]}"
