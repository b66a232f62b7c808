#!/usr/bin/env bash
# The GPU measurements issue 10 still needs, most telling first for a short lent GPU slot (the
# 2026-11-27 call ran 8 variants in 560 s with start-up, so all of this is about 18 to 20 minutes on
# an H200 and a 10-minute call keeps about the first 8): the seed configuration and the
# candidates for the targets (>= 4x the seed's tokens/s within 36 GiB) for Phi-3-mini, then Gemma-2b,
# then more Phi-3-mini variants (PHI3_MORE, into <out>/more/ so they do not replace the first run),
# each variant in its own process, the report rewritten after every variant so that a slot ending
# early keeps what was measured.
#
#   make gpu-wheels                      # here: the wheels the GPU image lacks -> .whl/ (ignored)
#   bash scripts/gpu-measure.sh          # there (carry .whl): results to $OUT, else benchmarks/results/
#   SMOKE=1 bash scripts/gpu-measure.sh  # the same script on the CPU with a tiny model (tests run this)
#
# PHI3_VARIANTS / GEMMA_VARIANTS / PHI3_MORE (space-separated bench_dpo.py variant names) change the
# sets; an empty one is skipped. Writes <out>/<gpu>-<date>.json and .md (bench_dpo.py),
# versions.txt and gpu.txt. Exit status: 1 when a variant failed (its reason is in the report).
set -euo pipefail
# Settings come from the environment: -h/--help prints the header above; other arguments are refused.
case "${1-}" in
  "") ;;
  -h | --help) sed -n '2,/^set -euo pipefail/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; exit 0 ;;
  *) echo "error: $(basename "$0") takes no arguments (its settings are environment variables; see --help): got '$1'" >&2; exit 2 ;;
esac
cd "$(dirname "$0")/.."

out=${OUT:-benchmarks/results}
python=${PYTHON:-python3}
mkdir -p "$out"

# Libraries: the GPU image has torch, accelerate and triton; the rest comes from the carried wheels.
if [ -d .whl ] && ! "$python" -c 'import trl' 2>/dev/null; then
  site=${TMPDIR:-/tmp}/alignpress-site
  "$python" -m pip install -q --no-index --no-deps --target "$site" .whl/*.whl
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"

"$python" - >"$out/versions.txt" <<'EOF'
import importlib.metadata as md
for name in ("torch", "transformers", "trl", "peft", "datasets", "accelerate", "bitsandbytes", "liger-kernel", "triton", "huggingface_hub"):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, "not installed")
EOF
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$out/gpu.txt" 2>&1 || echo "no nvidia-smi" >"$out/gpu.txt"

# What the 2026-11-27 call (benchmarks/results/2026-11-27-h200/) left open, most telling first (the
# report is rewritten after each): the seed baseline; the shipped recipe (prefix-shared; its setup now
# records the weight hash apart, hash_s, so the precompute pass's own rate shows); the same with its
# decoder layers compiled (train.compile_layers: the fixed cost per micro-batch, MFU); the recipe as
# a 40 GB card runs it (the allocator capped at 40 GiB, auto checkpointing only the layers the
# estimate needs: Phi-3's target), eager and compiled; the recipe and the 40 GB card with
# FlexAttention (attention skips the blocks the mask hides: MFU); Gemma's seed, recipe and
# FlexAttention (its targets were met on 2026-11-27); then Phi-3 with two
# pairs a row, the reference each step (the precompute break-even), every layer checkpointed (with
# tuned and tuned-40gb: the cost per recomputed layer) and TRL's layout. That is more than one
# 10-minute call holds: what is cut comes last.
phi3=${PHI3_VARIANTS-seed tuned tuned-compiled tuned-40gb tuned-40gb-compiled tuned-flex tuned-40gb-flex}
gemma=${GEMMA_VARIANTS-seed tuned tuned-flex}
phi3_more=${PHI3_MORE-tuned-40gb-packed tuned-flex-packed tuned-prefix-noref tuned-prefix-ckpt tuned-standard}
if [ -n "${SMOKE:-}" ]; then
  common=(--smoke --steps 2 --warmup 1 --out "$out")
  gemma=""  # smoke mode has one tiny model (Phi-3 shaped); a real Gemma-2b would not fit this purpose
else
  common=(--steps 10 --warmup 2 --pool 128 --variant-timeout 180 --out "$out")
fi
# the shipped recipe, eager and compiled, also runs 2 more steps under torch.profiler: where a step's
# GPU time goes (MFU), and how much of the wall time the GPU is busy (device_busy) in each
common+=(--profile tuned --profile tuned-compiled)
# One precompute pass per model and data, not one per variant (about 40 s each for Phi-3-mini on
# an H200): later variants reuse the stored reference log-probs (results.precompute_reused).
refs=$(mktemp -d "${TMPDIR:-/tmp}/alignpress-bench-refs.XXXXXX")
trap 'rm -rf "$refs"' EXIT
common+=(--ref-cache "$refs")

status=0
# model, variants, extra arguments (a later --out wins)
bench() {
  local model=$1 names=$2 args=()
  shift 2
  [ -n "$names" ] || return 0
  for name in $names; do args+=(--variant "$name"); done
  "$python" benchmarks/bench_dpo.py --model "$model" "${common[@]}" "${args[@]}" "$@" || status=1
}
bench phi3-mini "$phi3"
# FlexAttention's numbers on this GPU (its Triton kernels, compiled): the prefix-shared path on it
# against TRL's on SDPA, float32, within 1e-5 (tests/test_prefix_dpo.py; the CPU runs these cases
# on torch's reference implementation). Needs pytest (make gpu-wheels carries it).
if [ -z "${SMOKE:-}" ] && "$python" -c 'import pytest' 2>/dev/null; then
  ALIGNPRESS_TEST_DEVICE=cuda timeout 240 "$python" -m pytest -q -p no:cacheprovider tests/test_prefix_dpo.py -k 'same_numbers and flex' >"$out/flex-check.txt" 2>&1 || status=1
  tail -n 3 "$out/flex-check.txt"
fi
bench gemma-2b "$gemma"
bench phi3-mini "$phi3_more" --out "$out/more"
exit "$status"
