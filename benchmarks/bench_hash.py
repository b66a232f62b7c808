"""Time the key of the precomputed reference log-probs: TRL's hash_module against alignpress's weights_digest.

Builds a model of a seed architecture with random bf16 weights on the CPU (what both hash: the
tensors are copied to the CPU either way) and prints the seconds each takes, and that the digest changes
when one weight changes. Phi-3-mini needs about 8 GB of memory and a minute to build.

    python benchmarks/bench_hash.py                   # Phi-3-mini
    python benchmarks/bench_hash.py --model gemma-2b
    python benchmarks/bench_hash.py --model tiny      # seconds; what the test suite runs
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))
# bitsandbytes warns at import on a CPU with AVX512-BF16 that its CPU 4-bit kernel is missing; nothing here runs 4-bit on the CPU
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    import torch
    import transformers
    from trl.trainer.utils import hash_module

    from alignpress.refcache import weights_digest
    from bench_dpo import MODELS

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=list(MODELS), default="phi3-mini")
    args = p.parse_args(argv)
    spec = MODELS[args.model]
    config = getattr(transformers, spec["config"])(**spec["kwargs"], pad_token_id=0, eos_token_id=1, bos_token_id=1)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model = model.to_empty(device="cpu")
    torch.manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.02)
    out: dict = {"model": args.model, "params": sum(x.numel() for x in model.parameters()), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    for name, fn in (("weights_digest_s", weights_digest), ("trl_hash_module_s", hash_module)):
        started = time.perf_counter()
        fn(model)
        out[name] = round(time.perf_counter() - started, 2)
    before = weights_digest(model)
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] += 1
    out["one_weight_changes_digest"] = weights_digest(model) != before
    out["speedup"] = round(out["trl_hash_module_s"] / max(out["weights_digest_s"], 1e-3), 1)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
