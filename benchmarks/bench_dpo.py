#!/usr/bin/env python3
"""DPO training throughput and memory: N steps of the real TRL DPOTrainer per variant.

    python benchmarks/bench_dpo.py --model phi3-mini --steps 20                # every variant, GPU
    python benchmarks/bench_dpo.py --model gemma-2b --variant seed --variant tuned
    python benchmarks/bench_dpo.py --smoke                                     # tiny model, CPU, CI

The model is the real architecture (Phi-3-mini or Gemma-2b config) with random weights: speed does
not depend on weight values. The data are synthetic token ids with a capybara-like length
distribution (alignpress.flops.LengthDistribution, seeded), written as words of a word-level
tokenizer so that TRL's own tokenisation and collator run unchanged. Each variant is a list of
recipe overrides on the model's recipe (recipes/*.yaml; `seed` = the seed's systems settings
documented in its header) and runs in its own process (clean GPU memory, and Liger's kernels
patch model classes globally). Training goes through alignpress's own lever decisions
(alignpress.train.resolve_systems), DPOConfig (alignpress.train.dpo_config) and model loading.

Reported per variant, over the steps after the warm-up: non-padding tokens per second (chosen
and rejected rows), pairs (samples) per second, model FLOPs utilisation (alignpress.flops: policy
forward and backward, reference forward; recomputation and padding excluded) against the GPU's
peak dense BF16 FLOP/s (src/alignpress/data/gpus.json; null on the CPU or an unknown GPU),
padding fraction, and peak memory (torch.cuda.max_memory_allocated; on the CPU the process's peak
RSS, which is not comparable). Writes benchmarks/results/<device>-<date>.json and .md (--out).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
# bitsandbytes warns at import on a CPU with AVX512-BF16 that its CPU 4-bit kernel is missing; nothing here runs 4-bit on the CPU
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

from alignpress.flops import (  # noqa: E402
    GiB,
    LengthDistribution,
    MemorySettings,
    arch_from_config,
    gpu_for_device,
    load_table,
    memory_estimate,
    sequence_flops,
    truncate_pair,
)

SCHEMA = "alignpress-bench/1"

# name -> (seed recipe, config kwargs, transformers config class)
MODELS: dict[str, dict[str, Any]] = {
    "phi3-mini": {
        "recipe": "recipes/phi3-mini-capybara.yaml",
        "config": "Phi3Config",
        # microsoft/Phi-3-mini-4k-instruct (shared/reference/models-and-data.md)
        "kwargs": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096, rope_theta=10000.0, rms_norm_eps=1e-5, sliding_window=2047, tie_word_embeddings=False),
    },
    "gemma-2b": {
        "recipe": "recipes/gemma-2b-it-capybara.yaml",
        "config": "GemmaConfig",
        # google/gemma-2b-it (shared/reference/models-and-data.md)
        "kwargs": dict(hidden_size=2048, intermediate_size=16384, num_hidden_layers=18, num_attention_heads=8, num_key_value_heads=1, head_dim=256, vocab_size=256000, max_position_embeddings=8192, rope_theta=10000.0, hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True),
    },
    "tiny": {
        "recipe": "recipes/phi3-mini-capybara.yaml",
        "config": "Phi3Config",
        "kwargs": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, vocab_size=512, max_position_embeddings=512, tie_word_embeddings=False),
    },
}

# Each variant is a list of recipe overrides (`--set`), so every lever is a recipe field that a
# user can set the same way. `seed`: the seed notebook's systems settings, read from the seed
# recipe's header (the documented `--set` list); one lever each on top of it; `tuned`: the shipped
# recipe as is (its `auto` fields decided as `run` decides them: checkpointing from the memory
# estimate and this GPU, precompute from the recipe's epochs); and tuned minus one lever.
VARIANTS: dict[str, dict[str, Any]] = {
    "seed": {"about": "the seed notebook's systems settings (QLoRA 4-bit, checkpointing, paged AdamW, random batches), the --set list in the recipe header", "base": "seed"},
    "bf16-lora": {"about": "seed, bf16 base instead of 4-bit", "base": "seed", "set": ["model.load_in_4bit=false"]},
    "batch": {"about": "seed, one micro-batch of batch x accumulation pairs (same pairs per optimizer step)", "base": "seed", "batch": True},
    "group-by-length": {"about": "seed, length-grouped batches (less padding)", "base": "seed", "set": ["train.group_by_length=true"]},
    "no-checkpointing": {"about": "seed, gradient checkpointing off", "base": "seed", "set": ["train.gradient_checkpointing=false"]},
    "liger": {"about": "seed, Liger kernels (RMSNorm, RoPE, SwiGLU/GeGLU)", "base": "seed", "set": ["train.use_liger_kernel=true"], "needs": "liger"},
    "fused-adamw": {"about": "seed, fused AdamW (torch) instead of paged AdamW (bitsandbytes)", "base": "seed", "set": ["train.optim=adamw_torch_fused"]},
    "flash-attn": {"about": "seed, FlashAttention 2", "base": "seed", "set": ["model.attn_implementation=flash_attention_2"], "needs": "flash_attn"},
    "eager-attn": {"about": "seed, eager attention (what SDPA, the default, saves)", "base": "seed", "set": ["model.attn_implementation=eager"]},
    "precompute-ref": {"about": "seed, reference log-probs computed once before training", "base": "seed", "set": ["dpo.precompute_ref_log_probs=true"]},
    "tuned": {"about": "the shipped recipe as is: bf16 LoRA, prefix-shared DPO, one micro-batch, length grouping, Liger, fused AdamW, precompute and checkpointing auto", "base": "recipe"},
    "tuned-standard": {"about": "tuned in TRL's own layout (two rows a pair, each with its prompt): what prefix sharing saves", "base": "recipe", "set": ["dpo.prefix_sharing=false"]},
    "tuned-noref": {"about": "tuned, reference forward each step (no precompute)", "base": "recipe", "set": ["dpo.precompute_ref_log_probs=false"]},
    "tuned-ckpt": {"about": "tuned-noref with gradient checkpointing (what auto picks on a small GPU)", "base": "recipe", "set": ["dpo.precompute_ref_log_probs=false", "train.gradient_checkpointing=true"]},
    "tuned-noliger": {"about": "tuned-noref without Liger", "base": "recipe", "set": ["dpo.precompute_ref_log_probs=false", "train.use_liger_kernel=false"], "needs": "liger"},
    "tuned-nogroup": {"about": "tuned-noref without length grouping", "base": "recipe", "set": ["dpo.precompute_ref_log_probs=false", "train.group_by_length=false"]},
    "tuned-flash": {"about": "tuned-noref with FlashAttention 2 (in TRL's layout: FlashAttention cannot take prefix sharing's mask)", "base": "recipe", "set": ["dpo.precompute_ref_log_probs=false", "dpo.prefix_sharing=false", "model.attn_implementation=flash_attention_2"], "needs": "flash_attn"},
    # Prefix-shared DPO (alignpress.prefix_dpo), named as measured on 2026-11-27 (the recipes then had it off;
    # tuned-prefix is now tuned): tokens/s and MFU stay counted on TRL's tokens for the same pairs.
    "tuned-prefix": {"about": "tuned, prefix-shared DPO (each prompt computed once; SDPA or eager attention)", "base": "recipe", "set": ["dpo.prefix_sharing=true", "dpo.pairs_per_row=1"]},
    "tuned-prefix-noref": {"about": "tuned-prefix, reference forward each step (no precompute: what auto picks for fewer epochs)", "base": "recipe", "set": ["dpo.prefix_sharing=true", "dpo.pairs_per_row=1", "dpo.precompute_ref_log_probs=false"]},
    "tuned-prefix-packed": {"about": "tuned-prefix, two pairs packed per row (block-diagonal mask, less padding)", "base": "recipe", "set": ["dpo.prefix_sharing=true", "dpo.pairs_per_row=2"]},
    # Candidates for a 40 GB card (the issue's bound: peak <= 36 GiB) without checkpointing's recomputation
    "tuned-prefix-half": {"about": "tuned-prefix, half the micro-batch and twice the accumulation (same pairs per optimizer step; fewer activations)", "base": "recipe", "set": ["dpo.prefix_sharing=true", "dpo.pairs_per_row=1"], "half": True},
    "tuned-prefix-ckpt": {"about": "tuned-prefix with gradient checkpointing (the least memory)", "base": "recipe", "set": ["dpo.prefix_sharing=true", "dpo.pairs_per_row=1", "train.gradient_checkpointing=true"]},
    "tuned-ckpt-half": {"about": "tuned with gradient checkpointing for the first half of the decoder layers (train.checkpointed_layers): with tuned and tuned-prefix-ckpt, the cost of each recomputed layer", "base": "recipe", "layers_share": 0.5},
    # regional torch.compile (train.compile_layers): the fixed cost per micro-batch (step_fit) that the
    # 2026-11-27 numbers suggest is Python and kernel launches; compiling happens in the warm-up steps
    "tuned-compiled": {"about": "tuned with every decoder layer compiled (train.compile_layers: torch.compile, one graph for all layers)", "base": "recipe", "set": ["train.compile_layers=true"]},
    "tuned-40gb-compiled": {"about": "tuned-40gb with every decoder layer compiled", "base": "recipe", "set": ["train.compile_layers=true"], "gpu_gib": 40.0},
    # What a 40 GB card gets: the process may allocate 40 GiB, and `auto` keeps its estimate within
    # 90% of that (36 GiB, the issue's bound for an A100-40GB) by checkpointing as few layers as it
    # needs; an estimate too low shows up as out of memory, not only as a peak read afterwards.
    "tuned-40gb": {"about": "tuned as auto decides it on a 40 GB card: the allocator capped at 40 GiB, checkpointing for the fewest layers that keep the estimate within 36 GiB", "base": "recipe", "gpu_gib": 40.0},
    "tuned-40gb-packed": {"about": "tuned-40gb with two pairs packed per row (less padding, so fewer layers to recompute)", "base": "recipe", "set": ["dpo.pairs_per_row=2"], "gpu_gib": 40.0},
    # FlexAttention (compiled by transformers): the prefix-shared mask as a BlockMask, so attention
    # skips the 128 x 128 blocks the mask hides (the upper triangle, other segments, padding), which
    # SDPA computes and then masks. For MFU: attention is the part of a step that grows with length.
    "tuned-flex": {"about": "tuned with FlexAttention (block-sparse prefix-shared mask)", "base": "recipe", "set": ["model.attn_implementation=flex_attention"], "needs": "cuda"},
    "tuned-flex-packed": {"about": "tuned-flex with two pairs packed per row (the mask's off-diagonal blocks skipped)", "base": "recipe", "set": ["model.attn_implementation=flex_attention", "dpo.pairs_per_row=2"], "needs": "cuda"},
    "tuned-40gb-flex": {"about": "tuned-40gb with FlexAttention", "base": "recipe", "set": ["model.attn_implementation=flex_attention"], "gpu_gib": 40.0, "needs": "cuda"},
}


def seed_sets(recipe_path: Path) -> list[str]:
    """The seed notebook's systems settings: the `--set` list documented in the recipe's header."""
    for line in recipe_path.read_text().splitlines():
        if line.startswith("#   --set "):
            return [a for a in line.removeprefix("#").split() if a != "--set"]
    raise SystemExit(f"{recipe_path}: no '#   --set ...' line with the seed's systems settings in its header")


# ---------------------------------------------------------------------------------------------
# Synthetic data and model


def length_distribution(smoke: bool) -> LengthDistribution:
    # The smoke test keeps the shape of the distribution at 1/16 of the lengths.
    return LengthDistribution(scale=1 / 16) if smoke else LengthDistribution()


def synthetic_pairs(n: int, seed: int, smoke: bool) -> list[tuple[int, int, int]]:
    """(prompt, chosen, rejected) token counts, answers counting the eos TRL appends."""
    return [(p, max(c, 2), max(r, 2)) for p, c, r in length_distribution(smoke).sample(n, seed)]


def word_tokenizer(vocab: int):
    """One token per whitespace-separated word w<id>; pad, eos, unk first. No bos is added."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    words.update({f"w{i}": i for i in range(3, vocab)})
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def text_dataset(pairs: list[tuple[int, int, int]], vocab: int, seed: int, with_length: bool):
    """TRL's standard format: prompt, chosen and rejected strings of random words.

    The answers leave one token for the eos TRL appends, so TRL's token counts equal `pairs`.
    """
    import random

    from datasets import Dataset

    rng = random.Random(seed)

    def words(n: int) -> str:
        return " ".join(f"w{rng.randrange(3, vocab)}" for _ in range(n))

    rows = []
    for p, c, r in pairs:
        row = {"prompt": words(p), "chosen": " " + words(c - 1), "rejected": " " + words(r - 1)}
        if with_length:
            row["length"] = p + max(c, r)
        rows.append(row)
    return Dataset.from_list(rows)


def stored_dataset(dataset, root: Path):
    """The dataset saved under root/<digest of its rows>/ and loaded from there, as `run` stores its
    training data (alignpress.train.training_dataset): TRL keeps its tokenised copy and the
    precomputed reference log-probs next to it, keyed by the data and a hash of the weights. Another
    variant process on the same pairs and model then reuses them instead of a precompute pass of its
    own (about 40 s for Phi-3-mini's 128 pairs on an H200, out of a short GPU slot)."""
    import hashlib

    from datasets import load_from_disk

    digest = hashlib.sha256(json.dumps(dataset.to_list(), sort_keys=True).encode()).hexdigest()[:16]
    folder = root / digest
    if not (folder / "dataset_info.json").exists():
        partial = folder.with_name(digest + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        dataset.save_to_disk(str(partial))
        os.replace(partial, folder)
    return load_from_disk(str(folder))


def model_folder(name: str) -> Path:
    """A saved random-weight model with the word tokenizer, built on first use."""
    import torch
    import transformers

    from alignpress.modeling import cache_home

    spec = MODELS[name]
    folder = cache_home() / "bench-models" / f"{name}-v1"
    if (folder / ".complete").exists():
        return folder
    config = getattr(transformers, spec["config"])(**spec["kwargs"], pad_token_id=0, eos_token_id=1, bos_token_id=1)
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16 if device == "cuda" else torch.float32)
    tmp = folder.with_name(folder.name + f".partial-{os.getpid()}")
    model.save_pretrained(tmp)
    word_tokenizer(config.vocab_size).save_pretrained(tmp)
    del model
    (tmp / ".complete").write_text("random weights, seed 0\n")
    os.replace(tmp, folder)
    return folder


# ---------------------------------------------------------------------------------------------
# One variant (runs in its own process)


class CountingCollator:
    """Wraps TRL's DataCollatorForPreference and records every training micro-batch it builds."""

    def __init__(self, inner):
        self.inner = inner
        self.recording = False  # off while TRL precomputes reference log-probs in __init__
        self.batches: list[dict[str, Any]] = []
        self.precompute_tokens = 0
        self.precompute_padded = 0
        self.layouts: list[tuple[Any, ...]] = []  # prefix-shared: each batch's packed layout, for attention_blocks

    def __call__(self, examples):
        out = self.inner(examples)
        real = int(out["attention_mask"].sum())
        if not self.recording:
            self.precompute_tokens += real
            self.precompute_padded += int(out["input_ids"].numel())
            return out
        self.batches.append(
            {
                "rows": int(out["input_ids"].shape[0]),
                "seq_len": int(out["input_ids"].shape[1]),
                "real_tokens": real,
                "pairs": [[len(e["prompt_ids"]), len(e["chosen_ids"]), len(e["rejected_ids"])] for e in examples],
            }
        )
        if "shared_input_ids" in out:  # prefix-shared: what actually runs is the packed rows
            self.batches[-1].update(rows=int(out["shared_input_ids"].shape[0]), seq_len=int(out["shared_input_ids"].shape[1]), computed_tokens=int((out["shared_segment_ids"] >= 0).sum()))
            self.layouts.append((out["shared_segment_ids"], out["shared_branch_ids"], out["shared_position_ids"]))
        return out


def availability(need: str | None, device: str) -> str | None:
    """None when a lever can run here, else why not."""
    if need == "liger":
        if device != "cuda":
            return "Liger kernels need a CUDA GPU (Triton)"
        try:
            import liger_kernel  # noqa: F401
        except ImportError:
            return "liger-kernel is not installed (pip install liger-kernel)"
    if need == "cuda" and device != "cuda":
        return "FlexAttention trains only on a CUDA GPU (torch has no FlexAttention backward on the CPU)"
    if need == "flash_attn":
        from transformers.utils import is_flash_attn_2_available

        if device != "cuda" or not is_flash_attn_2_available():
            return "flash-attn 2 is not installed or there is no CUDA GPU (pip install flash-attn)"
    return None


def bitsandbytes_problem(device: str) -> str | None:
    if device != "cuda":
        return "bitsandbytes needs a CUDA GPU"
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return "bitsandbytes is not installed"
    return None


def half_batch(batch: int, accumulation: int) -> list[str]:
    """Overrides for half the micro-batch (1 when it does not divide the pairs per step) and the
    accumulation that keeps the pairs per optimizer step."""
    per_step = batch * accumulation
    half = batch // 2 if batch >= 2 and per_step % (batch // 2) == 0 else 1
    return [f"train.per_device_train_batch_size={half}", f"train.gradient_accumulation_steps={per_step // half}"]


def plan_variant(name: str, model: str, device: str, smoke: bool) -> tuple[list[str], list[str], str | None]:
    """Recipe overrides, notes, and a skip reason (or None) for a variant."""
    from alignpress.recipe import load_recipe

    spec = VARIANTS[name]
    path = ROOT / MODELS[model]["recipe"]
    sets: list[str] = ["publish.repo_id=null", "eval.enabled=false", "eval.gate_min_gain=null", "eval.gate_max_kl=null"]
    notes: list[str] = []
    if smoke:
        sets += ["dpo.max_length=128", "data.filters.max_tokens=128", "train.device=cpu"]
    skip = availability(spec.get("needs"), device)
    if skip:
        return sets, notes, skip
    if spec["base"] == "seed":
        sets += seed_sets(path)
    sets += spec.get("set", [])
    if spec.get("batch"):
        base = load_recipe(path, sets)
        sets += [f"train.per_device_train_batch_size={base.train.per_device_train_batch_size * base.train.gradient_accumulation_steps}", "train.gradient_accumulation_steps=1"]
    if spec.get("half"):
        base = load_recipe(path, sets)
        sets += half_batch(base.train.per_device_train_batch_size, base.train.gradient_accumulation_steps)
    if spec.get("layers_share"):
        layers = max(1, round(MODELS[model]["kwargs"]["num_hidden_layers"] * spec["layers_share"]))
        sets += ["train.gradient_checkpointing=true", f"train.checkpointed_layers={layers}"]
    recipe = load_recipe(path, sets)
    problem = bitsandbytes_problem(device)
    if recipe.model.load_in_4bit and problem:
        sets.append("model.load_in_4bit=false")
        notes.append(f"4-bit NF4 unavailable here ({problem}): ran with an unquantized base (bf16 on a GPU, float32 on the CPU)")
    if any(k in recipe.train.optim for k in ("paged", "bnb", "8bit")) and problem:
        sets.append("train.optim=adamw_torch")
        notes.append(f"{recipe.train.optim} unavailable here ({problem}): ran adamw_torch")
    return sets, notes, None


def device_info(device: str) -> dict[str, Any]:
    import platform

    import torch

    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        total = props.total_memory / GiB
        gpu = gpu_for_device(props.name, total)
        peak = load_table("gpus.json")["gpus"][gpu]["peak_bf16_tflops"] if gpu else None
        return {"kind": "cuda", "name": props.name, "gpu": gpu, "memory_gib": round(total, 2), "peak_bf16_tflops": peak}
    return {"kind": "cpu", "name": platform.processor() or platform.machine(), "gpu": None, "memory_gib": None, "peak_bf16_tflops": None, "cpu_threads": torch.get_num_threads()}


def run_variant(name: str, model: str, steps: int, warmup: int, pool: int, seed: int, smoke: bool, profile_steps: int = 0, ref_cache: Path | None = None) -> dict[str, Any]:
    import torch
    from peft import LoraConfig
    from transformers import AutoTokenizer, TrainerCallback
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    from alignpress.modeling import load_model, pick_device, pick_dtype
    from alignpress.refcache import StableKeyDPOTrainer
    from alignpress.recipe import load_recipe
    from alignpress.runstate import RunDir
    from alignpress.train import apply_checkpointing, apply_compile, dpo_config, precompute_order, resolve_systems

    device = "cuda" if torch.cuda.is_available() and not smoke else "cpu"
    info = device_info(device)
    out: dict[str, Any] = {"name": name, "about": VARIANTS[name]["about"], "model": model, "device": info}
    sets, notes, skip = plan_variant(name, model, device, smoke)
    if skip:
        return {**out, "status": "skipped", "reason": skip}
    folder = model_folder(model)
    recipe = load_recipe(ROOT / MODELS[model]["recipe"], [*sets, f"model.name_or_path={folder}"])
    t, m, d = recipe.train, recipe.model, recipe.dpo
    pairs = synthetic_pairs(pool, seed, smoke)
    rows = [{"prompt_tokens": p, "chosen_tokens": c, "rejected_tokens": r} for p, c, r in pairs]
    dtype = pick_dtype(recipe, pick_device(recipe))
    gpu_gib = torch.cuda.mem_get_info()[0] / GiB if device == "cuda" else None
    cap = VARIANTS[name].get("gpu_gib")
    if cap and device == "cuda":
        # this worker process may allocate no more than the card it stands for holds
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap * GiB / torch.cuda.get_device_properties(0).total_memory))
        gpu_gib = min(gpu_gib, cap)
        notes.append(f"allocator capped at {cap:g} GiB (torch.cuda.set_per_process_memory_fraction); auto decided for {gpu_gib:.1f} GiB")
    elif cap:
        notes.append(f"no CUDA GPU: the {cap:g} GiB cap does not apply, and auto leaves checkpointing off")
    import transformers

    config = getattr(transformers, MODELS[model]["config"])(**MODELS[model]["kwargs"])
    # The levers as `run` would use them: auto fields decided from this GPU and the recipe's epochs
    systems = resolve_systems(recipe, rows, device, dtype, None, config=config, gpu_gib=gpu_gib)
    for key in ("use_liger_kernel", "gradient_checkpointing", "precompute_ref_log_probs"):
        why = systems.get(f"{key}_reason") or systems.get(f"{key}_decision", {}).get("reason")
        if why:
            notes.append(f"{key}: {why}")
    settings = {
        "load_in_4bit": m.load_in_4bit,
        "gradient_checkpointing": systems["gradient_checkpointing"],
        "checkpointed_layers": systems.get("checkpointed_layers"),  # None: every layer (when on)
        "per_device_train_batch_size": t.per_device_train_batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "precompute_ref_log_probs": systems["precompute_ref_log_probs"],
        "attn_implementation": m.attn_implementation or "sdpa (default)",
        "group_by_length": systems["group_by_length"],
        "liger": systems["use_liger_kernel"],
        "optim": t.optim,
        "max_length": d.max_length,
        "lora_r": recipe.lora.r if recipe.lora.enabled else None,
        "prefix_sharing": d.prefix_sharing,
        "pairs_per_row": d.pairs_per_row,
        "cuda_allocator": systems.get("cuda_allocator"),
        "compile_layers": systems["compile_layers"],
    }
    out.update(settings=settings, notes=notes, overrides=sets, systems=systems)

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(folder)
    net = load_model(recipe, str(folder), device=device, dtype=dtype, quantized=m.load_in_4bit, tokenizer=tok)
    checkpointed = apply_checkpointing(net, systems, recipe, rows, dtype)  # as `run` does: only the layers auto or the recipe names
    record_compile = apply_compile(net, systems)  # as `run` does: before the trainer, so its precompute pass runs compiled
    peft_config = LoraConfig(r=recipe.lora.r, lora_alpha=recipe.lora.alpha, lora_dropout=recipe.lora.dropout, target_modules=recipe.lora.target_modules, task_type="CAUSAL_LM")
    if m.load_in_4bit:
        from peft import prepare_model_for_kbit_training

        net = prepare_model_for_kbit_training(net, use_gradient_checkpointing=settings["gradient_checkpointing"])

    if settings["precompute_ref_log_probs"]:  # the order `run` gives TRL's precompute pass (alignpress.train.precompute_order)
        pairs = [(r["prompt_tokens"], r["chosen_tokens"], r["rejected_tokens"]) for r in precompute_order(rows)]
    dataset = text_dataset(pairs, tok.vocab_size, seed, with_length=settings["group_by_length"])
    if ref_cache is not None and settings["precompute_ref_log_probs"]:
        dataset = stored_dataset(dataset, ref_cache)
    work = Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))
    args = dpo_config(recipe, RunDir(work), device, dtype, systems)
    # profile_steps more steps after the timed ones, under torch's profiler (which slows them)
    args = dataclasses.replace(args, max_steps=steps + profile_steps, save_strategy="no", logging_steps=1, disable_tqdm=True)
    collator = CountingCollator(DataCollatorForPreference(pad_token_id=tok.pad_token_id, max_length=d.max_length, truncation_mode=d.truncation_mode))
    step_ends: list[float] = []
    losses: list[float] = []
    compiled: list[int] = []

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    class Timer(TrainerCallback):
        def on_train_begin(self, *a, **k):
            collator.recording = True
            sync()
            step_ends.append(time.perf_counter())  # index 0: the start of step 1

        def on_step_end(self, *a, **k):
            sync()
            step_ends.append(time.perf_counter())
            if len(step_ends) - 1 in (warmup, steps):  # graphs torch.compile built before and during the timed steps
                compiled.append(compiled_graphs())

        def on_log(self, args, state, control, logs=None, **k):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    profiled: dict[str, Any] = {}

    class Profile(TrainerCallback):
        """torch.profiler over the steps after the timed ones: where a step's device time goes."""

        def on_step_begin(self, args, state, control, **k):
            if profile_steps and state.global_step == steps:
                from torch.profiler import ProfilerActivity, profile

                sync()
                profiled["profiler"] = profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else []))
                profiled["profiler"].__enter__()

        def on_step_end(self, args, state, control, **k):
            if "profiler" in profiled and state.global_step == steps + profile_steps:
                sync()
                prof = profiled.pop("profiler")
                prof.__exit__(None, None, None)
                profiled["summary"] = profile_summary(prof.key_averages(), device, profile_steps)
                # the profiled steps' wall time: device time well below it means the GPU waited for the host
                wall = (step_ends[steps + profile_steps] - step_ends[steps]) * 1000 / profile_steps  # Timer ran first
                profiled["summary"].update(wall_ms_per_step=round(wall, 3), device_busy=round(profiled["summary"]["ms_per_step"] / wall, 4) if device == "cuda" else None)

    from alignpress.refcache import fast_weights_hash

    started = time.perf_counter()
    with fast_weights_hash() as timing:  # as `run` builds its trainer
        if d.prefix_sharing:
            # The prefix-shared trainer builds its own collator (and precomputes with it): count around it afterwards.
            from alignpress.prefix_dpo import PrefixSharedDPOTrainer

            trainer = PrefixSharedDPOTrainer(net, args=args, train_dataset=dataset, processing_class=tok, peft_config=peft_config, callbacks=[Timer(), Profile()], pairs_per_row=d.pairs_per_row)
            collator = trainer.data_collator = CountingCollator(trainer.data_collator)
            # its precompute pass ran inside the constructor: TRL's tokens for these pairs (what the
            # standard pass counts, so rates compare), the packed rows' padding unknown
            collator.precompute_tokens = sum(n for p, c, r in pairs if (s := truncate_pair(p, c, r, d.max_length)) for n, _ in s) if settings["precompute_ref_log_probs"] else 0
        else:
            trainer = StableKeyDPOTrainer(model=net, args=args, train_dataset=dataset, processing_class=tok, peft_config=peft_config, data_collator=collator, callbacks=[Timer(), Profile()])
    setup_s = time.perf_counter() - started
    # with --ref-cache: no reference batch run = TRL found this data's log-probs for these weights there
    reused = trainer.ref_batches_computed == 0 if settings["precompute_ref_log_probs"] else None
    if reused:
        collator.precompute_tokens = 0  # nothing computed: setup_s holds no precompute pass to rate
    trainer.train()
    if record_compile is not None:
        record_compile()  # systems.compiled_graphs: every graph, warm-up and precompute included

    ga = t.gradient_accumulation_steps
    done = len(step_ends) - 1
    if done < steps + profile_steps or done <= warmup:
        return {**out, "status": "failed", "reason": f"only {done} of {steps} steps ran"}
    timed = collator.batches[warmup * ga : steps * ga]
    arch = arch_from_config(net.config)
    results = summarise(timed, step_ends[steps] - step_ends[warmup], arch, settings, info["peak_bf16_tflops"] if device == "cuda" else None)
    biggest = max(collator.batches, key=lambda b: b["rows"] * b["seq_len"])
    estimate = memory_estimate(
        arch,
        MemorySettings(
            weights="nf4" if m.load_in_4bit else ("bf16" if dtype == torch.bfloat16 else "fp32"),
            lora_r=settings["lora_r"],
            optimizer_bits="8bit" if "8bit" in t.optim else "32bit",
            gradient_checkpointing=settings["gradient_checkpointing"],
            # auto per micro-batch: the count the largest batch ran with
            checkpointed_layers=checkpointed.decide(biggest["rows"], biggest["seq_len"]) if checkpointed is not None and checkpointed.decide else settings["checkpointed_layers"],
            micro_batch_pairs=t.per_device_train_batch_size,
            seq_len=max(b["seq_len"] for b in collator.batches),
            precompute_ref=settings["precompute_ref_log_probs"],
            attn_implementation=m.attn_implementation,
            liger=settings["liger"],
            # prefix-shared: the packed rows of the largest micro-batch (the collator recorded them)
            packed_rows=biggest["rows"] if d.prefix_sharing else None,
            packed_len=biggest["seq_len"] if d.prefix_sharing else None,
        ),
    )
    results.update(
        steps_timed=steps - warmup,
        **peak_memory(device),
        # alignpress.flops.memory_estimate before its margin and CUDA context: compare with peak_memory_gib
        estimated_peak_gib=round(estimate["subtotal_gib"], 3) if device == "cuda" else None,
        longest_seq_len=max(b["seq_len"] for b in collator.batches),  # warm-up included: what the estimate used
        setup_s=round(setup_s, 2),
        hash_s=timing.get("hash_s"),
        precompute_reused=reused,
        precompute_tokens=collator.precompute_tokens,
        precompute_padding_fraction=round(1 - collator.precompute_tokens / collator.precompute_padded, 4) if collator.precompute_padded else None,
        # every step's seconds, warm-up first (index 0 is step 1): a slow timed step is a compile or a stall
        step_seconds=[round(b - a, 4) for a, b in zip(step_ends[: steps], step_ends[1 : steps + 1])],
        compiled_graphs_timed=compiled[1] - compiled[0] if len(compiled) == 2 else None,
        loss_first=losses[0] if losses else None,
        loss_last=losses[steps - 1] if len(losses) >= steps else None,
    )
    if d.prefix_sharing:
        # Counted after timing, on the model's device (about 0.5 s a Phi-3 batch on 2 CPU cores): how
        # much of SDPA's dense attention FlexAttention's block mask keeps
        from alignpress.prefix_dpo import attention_blocks

        where = next(net.parameters()).device
        timed_layouts = collator.layouts[warmup * ga : steps * ga]
        kept, every = map(sum, zip(*(attention_blocks(*(x.to(where) for x in layout), net.config) for layout in timed_layouts)))
        results["attention_blocks"] = {"flex": kept, "sdpa": every, "share": round(kept / every, 4)}
    if profiled.get("summary"):
        results["profile"] = profiled["summary"]
    if checkpointed is not None and checkpointed.decide is not None:  # auto, per micro-batch: forwards by layers recomputed
        results["checkpointed_layers_per_batch"] = {str(k): n for k, n in sorted(checkpointed.seen.items())}
    return {**out, "status": "ok", "results": results, "batches": timed}


def compiled_graphs() -> int:
    """Graphs torch.compile has built in this process so far (FlexAttention's kernels are compiled per
    shape until Dynamo marks the shape dynamic; a compile inside the timed steps is their cost)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


# Where device time goes, by kernel (CUDA) or operator (CPU) name; the first pattern that matches wins.
PROFILE_CATEGORIES = [
    ("attention", r"fmha|attention|flash|sdpa"),
    ("optimizer", r"adam|multi_tensor|foreach|optimizer"),
    ("matmul", r"gemm|cutlass|cublas|xmma|sm90|sm80|nvjet|^aten::(mm|addmm|bmm|matmul|linear|_addmm_activation)$"),
    ("fused (Liger/Triton)", r"liger|triton|rms_norm|swiglu|geglu|rope"),
    ("copy/cast", r"copy|memcpy|memset|^aten::(cat|to|_to_copy|contiguous|clone|fill_|zero_)$"),
    ("elementwise/reduce", r"elementwise|reduce|vectorized|^aten::"),
]


def profile_summary(events, device: str, steps: int) -> dict[str, Any]:
    """Totals by category and the top 20 names of a torch.profiler run (key_averages). On CUDA the
    kernels' own time (device events only: operators would count their kernels twice); on the CPU
    the operators' self time."""
    import re

    rows = []
    for e in events:
        if device == "cuda":
            if str(e.device_type).endswith("CUDA") and e.self_device_time_total > 0:
                rows.append((e.key, e.count, e.self_device_time_total))
        elif e.self_cpu_time_total > 0 and not e.key.startswith(("ProfilerStep", "autograd::engine", "Optimizer.", "## ")):
            rows.append((e.key, e.count, e.self_cpu_time_total))
    total = sum(us for _, _, us in rows)
    categories: dict[str, float] = {}
    for key, _, us in rows:
        name = next((c for c, pattern in PROFILE_CATEGORIES if re.search(pattern, key.lower())), "other")
        categories[name] = categories.get(name, 0.0) + us
    top = sorted(rows, key=lambda r: -r[2])[:20]
    return {
        "steps": steps,
        "clock": "CUDA kernel time" if device == "cuda" else "CPU operator self time",
        "ms_per_step": round(total / 1000 / steps, 3),
        "share": {k: round(v / total, 4) for k, v in sorted(categories.items(), key=lambda kv: -kv[1])} if total else {},
        "top": [{"name": k[:160], "calls": n, "ms_per_step": round(us / 1000 / steps, 3), "share": round(us / total, 4)} for k, n, us in top],
    }


def summarise(batches: list[dict[str, Any]], seconds: float, arch, settings: dict[str, Any], peak_tflops: float | None) -> dict[str, Any]:
    """Throughput of the timed micro-batches: tokens from the attention masks, FLOPs from the pairs."""
    tokens = sum(b["real_tokens"] for b in batches)
    # Prefix-shared runs compute fewer tokens than TRL's `tokens`, which stay the numerator of tokens/s and MFU.
    computed = sum(b.get("computed_tokens", b["real_tokens"]) for b in batches)
    padded = sum(b["rows"] * b["seq_len"] for b in batches)
    pairs = sum(len(b["pairs"]) for b in batches)
    flops = 0.0
    for b in batches:
        for p, c, r in b["pairs"]:
            for length, completion in truncate_pair(p, c, r, settings["max_length"]):
                flops += sequence_flops(arch, length, completion, lora_r=settings["lora_r"], reference=not settings["precompute_ref_log_probs"])["total"]
    achieved = flops / seconds / 1e12
    return {
        "seconds": round(seconds, 4),
        "pairs": pairs,
        "tokens": tokens,
        "padded_tokens": padded,
        "computed_tokens": computed,
        "padding_fraction": round(1 - computed / padded, 4),
        "tokens_per_s": round(tokens / seconds, 2),
        "samples_per_s": round(pairs / seconds, 4),
        "model_flops": flops,
        "achieved_tflops": round(achieved, 4),
        "mfu": round(achieved / peak_tflops, 4) if peak_tflops else None,
    }


def peak_memory(device: str) -> dict[str, Any]:
    import resource

    import torch

    if device == "cuda":
        return {"peak_memory_gib": round(torch.cuda.max_memory_allocated() / GiB, 3), "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / GiB, 3), "peak_memory_kind": "cuda max_memory_allocated"}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # KiB on Linux
    return {"peak_memory_gib": round(rss, 3), "peak_memory_kind": "cpu peak RSS of the whole process (not GPU memory; not comparable)"}


# ---------------------------------------------------------------------------------------------
# Orchestration and report


def run_all(args, out: Path | None = None) -> dict[str, Any]:
    """Every named variant, each in its own process. With `out`, the report is rewritten after each
    variant, so a run cut short (a GPU lease ending) keeps what it measured."""
    names = args.variant or list(VARIANTS)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    sample = synthetic_pairs(args.pool, args.seed, args.smoke)
    run: dict[str, Any] = {
        "model": args.model,
        "architecture": MODELS[args.model]["kwargs"] | {"config": MODELS[args.model]["config"]},
        "seed_recipe": MODELS[args.model]["recipe"],
        "steps": args.steps,
        "warmup_steps": args.warmup,
        "device": {"kind": "unknown", "name": "unknown", "gpu": None},
        "data": {
            "pool_pairs": args.pool,
            "seed": args.seed,
            "distribution": dataclasses.asdict(length_distribution(args.smoke)),
            "realized": LengthDistribution.describe(sample),
            "prefix_sharing": prefix_savings(sample, args.model, args.smoke),
        },
        "variants": [],
    }
    variants = run["variants"]
    for name in names:
        with tempfile.TemporaryDirectory() as tmp:
            part = Path(tmp) / "variant.json"
            cmd = [sys.executable, __file__, "--worker", name, "--model", args.model, "--steps", str(args.steps), "--warmup", str(args.warmup), "--pool", str(args.pool), "--seed", str(args.seed), "--worker-out", str(part)]
            if args.smoke:
                cmd.append("--smoke")
            for profiled in args.profile or []:
                cmd += ["--profile", profiled, "--profile-steps", str(args.profile_steps)]
            if args.ref_cache:
                cmd += ["--ref-cache", str(args.ref_cache)]
            print(f"[bench] {args.model} / {name} ...", file=sys.stderr, flush=True)
            proc = run_worker(cmd, args.variant_timeout)
            if proc is None:
                variants.append({"name": name, "status": "failed", "reason": f"timed out after {args.variant_timeout} s"})
            if proc is not None and (proc.returncode != 0 or not part.exists()):
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
                oom = "out of memory" in proc.stderr.lower()
                variants.append({"name": name, "status": "failed", "reason": ("CUDA out of memory: " if oom else "") + tail[0][:300]})
            elif proc is not None:
                variants.append(json.loads(part.read_text()))
        v = variants[-1]
        print(f"[bench]   {v['status']}" + (f": {v.get('reason')}" if v["status"] != "ok" else f": {v['results']['tokens_per_s']:.1f} tokens/s"), file=sys.stderr, flush=True)
        run["device"] = next((v["device"] for v in variants if v.get("device")), run["device"])
        if out is not None and run["device"]["kind"] != "unknown":  # (the file is named by the device)
            write_report(run, out)
    return run


def run_worker(cmd: list[str], timeout: float | None) -> subprocess.CompletedProcess | None:
    """Run a variant's worker; None when it ran past `timeout` seconds. Then everything it started
    is killed too: torch.compile's worker processes (compiled variants, FlexAttention) would
    otherwise outlive it, busy on the CPU while the next variant is timed."""
    import contextlib
    import signal

    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, start_new_session=True) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            out = None
        finally:
            with contextlib.suppress(ProcessLookupError):  # none left: the usual end
                os.killpg(proc.pid, signal.SIGKILL)  # its own session: the worker and what it started
        if out is None:
            proc.communicate()
            return None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def prefix_savings(pairs: list[tuple[int, int, int]], model: str, smoke: bool) -> dict[str, Any]:
    """Share of TRL's non-padding tokens that prefix sharing does not compute, at the seed recipe's max_length."""
    from alignpress.prefix_dpo import token_savings
    from alignpress.recipe import load_recipe

    dpo = load_recipe(ROOT / MODELS[model]["recipe"]).dpo
    max_length = 128 if smoke else dpo.max_length
    return {"max_length": max_length, **token_savings(pairs, max_length, dpo.truncation_mode)}


def device_slug(device: dict[str, Any]) -> str:
    if device.get("gpu"):
        return device["gpu"]
    if device.get("kind") == "cpu":
        return "cpu"
    return "".join(ch if ch.isalnum() else "-" for ch in device.get("name", "unknown")).strip("-")


def markdown(report: dict[str, Any]) -> str:
    lines = [f"# DPO benchmark: {report['device_slug']}, {report['created'][:10]}", ""]
    lines.append(f"Device: {report['runs'][0]['device'].get('name')}. Measured with benchmarks/bench_dpo.py; schema {SCHEMA}.")
    for run in report["runs"]:
        real = run["data"]["realized"]
        lines += [
            "",
            f"## {run['model']} ({run['steps']} steps, {run['warmup_steps']} warm-up; seed recipe {run['seed_recipe']})",
            "",
            f"Synthetic data: {real['pairs']} pairs, median {real['median_pair_tokens']} tokens a pair (prompt + chosen + rejected), "
            f"prompt/answer median {real['median_prompt_to_answer']}, p95 {real['p95_pair_tokens']}, max {real['max_pair_tokens']}.",
            *([f"Prefix sharing computes {1 - run['data']['prefix_sharing']['saved_fraction']:.1%} of TRL's non-padding tokens for these pairs "
               f"(max length {run['data']['prefix_sharing']['max_length']}); tokens/s and MFU count TRL's tokens in every variant."] if run["data"].get("prefix_sharing") else []),
            "",
            "| variant | status | tokens/s | pairs/s | MFU | padding | peak memory (GiB) | vs seed |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        base = next((v["results"]["tokens_per_s"] for v in run["variants"] if v["name"] == "seed" and v["status"] == "ok"), None)
        for v in run["variants"]:
            if v["status"] != "ok":
                lines.append(f"| {v['name']} | {v['status']}: {v.get('reason', '')} | | | | | | |")
                continue
            r = v["results"]
            mfu = f"{r['mfu']:.3f}" if r["mfu"] is not None else "n/a"
            speed = f"{r['tokens_per_s'] / base:.2f}x" if base else ""
            lines.append(f"| {v['name']} | ok | {r['tokens_per_s']:,.0f} | {r['samples_per_s']:.3f} | {mfu} | {r['padding_fraction']:.3f} | {r['peak_memory_gib']:.2f} | {speed} |")
        blocks = [(v["name"], v["results"]["attention_blocks"]["share"]) for v in run["variants"] if v["status"] == "ok" and "attention_blocks" in v["results"]]
        if blocks:
            lines += ["", "Attention blocks (128 x 128) FlexAttention's block mask keeps, of the ones SDPA computes, for each prefix-shared variant's timed batches: "
                      + ", ".join(f"{name} {share:.1%}" for name, share in blocks) + "."]
        fits = [(v["name"], fit) for v in run["variants"] if v["status"] == "ok" and (fit := step_fit(v, run["warmup_steps"]))]
        if fits:
            lines += ["", "Step time against the positions a step computes (padding included), least squares over the timed steps; "
                      "the fixed part is what a step costs whatever its size (host overhead, optimizer, launches): "
                      + "; ".join(f"{name} {f['fixed_s'] * 1000:,.0f} ms + {f['per_position_s'] * 1e6:.2f} us a position (R² {f['r2']:.2f})" for name, f in fits) + "."]
        uneven = [uneven_steps(v, run["warmup_steps"]) for v in run["variants"] if v["status"] == "ok"]
        if any(uneven):
            lines += ["", "Uneven timed steps (a compile, or a stall, inside the timed window): " + "; ".join(u for u in uneven if u) + "."]
        notes: dict[str, list[str]] = {}
        for v in run["variants"]:
            for n in v.get("notes", []):
                notes.setdefault(n, []).append(v["name"])
        if notes:
            lines += ["", "Notes:", *(f"- {n} ({', '.join(names)})" for n, names in notes.items())]
        for v in run["variants"]:
            prof = v.get("results", {}).get("profile")
            if prof:
                busy = f", {prof['wall_ms_per_step']:,.1f} ms wall under the profiler, busy {prof['device_busy']:.0%}" if prof.get("device_busy") is not None else ""
                lines += ["", f"Profile of {v['name']} ({prof['steps']} steps after the timed ones, {prof['clock']}: {prof['ms_per_step']:,.1f} ms a step{busy}): "
                          + ", ".join(f"{k} {share:.1%}" for k, share in prof["share"].items()) + ".",
                          *(f"- {t['share']:.1%} {t['name']} ({t['calls']} calls)" for t in prof["top"][:8])]
        if run["device"].get("kind") == "cpu":
            lines += ["", "CPU run: MFU is not reported and peak memory is the process's peak RSS, not GPU memory."]
    return "\n".join(lines) + "\n"


def step_positions(variant: dict[str, Any], steps: int) -> list[int]:
    """Positions (rows x length, padding included) each timed step computed, from its micro-batches."""
    ga = variant["settings"]["gradient_accumulation_steps"]
    return [sum(b["rows"] * b["seq_len"] for b in variant["batches"][i * ga : (i + 1) * ga]) for i in range(steps)]


def step_fit(variant: dict[str, Any], warmup: int) -> dict[str, float] | None:
    """Least squares seconds = fixed + per_position x positions over the timed steps (length grouping
    makes their sizes differ); None with fewer than 4 steps or sizes too alike to separate the two."""
    seconds = variant["results"].get("step_seconds", [])[warmup:]
    if len(seconds) < 4:
        return None
    x = step_positions(variant, len(seconds))
    mean_x, mean_y = sum(x) / len(x), sum(seconds) / len(seconds)
    sxx = sum((a - mean_x) ** 2 for a in x)
    if sxx <= (0.1 * mean_x) ** 2 * len(x):  # sizes within about 10% of each other
        return None
    slope = sum((a - mean_x) * (b - mean_y) for a, b in zip(x, seconds)) / sxx
    fixed = mean_y - slope * mean_x
    total = sum((b - mean_y) ** 2 for b in seconds)
    residual = sum((b - fixed - slope * a) ** 2 for a, b in zip(x, seconds))
    return {"fixed_s": fixed, "per_position_s": slope, "r2": 1 - residual / total if total else 1.0}


def uneven_steps(variant: dict[str, Any], warmup: int, spread: float = 1.5) -> str | None:
    """A variant whose slowest timed step (in positions a second, as steps differ in shape) ran at
    1/`spread` of the median step's rate or below, or that built a torch.compile graph while timed, as
    a report phrase; None when its steps ran evenly."""
    r = variant["results"]
    seconds = r.get("step_seconds", [])[warmup:]
    positions = step_positions(variant, len(seconds))
    graphs = r.get("compiled_graphs_timed") or 0
    if not seconds or not all(positions):
        return None
    rates = [n / s for n, s in zip(positions, seconds)]
    median = sorted(rates)[len(rates) // 2]
    slowest = min(range(len(rates)), key=rates.__getitem__)
    if rates[slowest] * spread > median and not graphs:
        return None
    return (f"{variant['name']} step {warmup + slowest + 1} ran at {rates[slowest] / median:.0%} of the median rate ({seconds[slowest]:.2f} s)"
            + (f", {graphs} graphs compiled" if graphs else ""))


def write_report(run: dict[str, Any], out: Path) -> Path:
    """Merge this run into <out>/<device>-<date>.json (one run per model) and rewrite the .md."""
    out.mkdir(parents=True, exist_ok=True)
    slug = device_slug(run["device"])
    created = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    path = out / f"{slug}-{created[:10]}.json"
    report = json.loads(path.read_text()) if path.exists() else {"schema": SCHEMA, "device_slug": slug, "runs": []}
    from alignpress.runstate import library_versions

    report.update(created=created, libraries=library_versions())
    report["runs"] = [r for r in report["runs"] if r["model"] != run["model"]] + [run]
    path.write_text(json.dumps(report, indent=1) + "\n")
    path.with_suffix(".md").write_text(markdown(report))
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=list(MODELS), default="phi3-mini")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per variant (default 20; smoke 3)")
    p.add_argument("--warmup", type=int, default=None, help="steps left out of the timing (default 3; smoke 1)")
    p.add_argument("--variant", action="append", help=f"repeatable; default all: {', '.join(VARIANTS)}")
    p.add_argument("--pool", type=int, default=None, help="synthetic pairs in the dataset (default 256; smoke 64)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--smoke", action="store_true", help="tiny model on the CPU, short lengths: checks the harness, measures nothing useful")
    p.add_argument("--variant-timeout", type=int, default=3600)
    p.add_argument("--profile", action="append", metavar="VARIANT", help="repeatable: run these variants --profile-steps more steps under torch.profiler (after the timed ones) and record where the device time goes (results.profile)")
    p.add_argument("--profile-steps", type=int, default=2)
    p.add_argument("--ref-cache", type=Path, metavar="DIR", help="keep the synthetic data and TRL's precomputed reference log-probs in DIR, so that later variants (and runs) on the same pairs and model reuse them: results.precompute_reused, and no precompute pass in their setup_s")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.smoke:
        args.model = "tiny" if args.model == "phi3-mini" else args.model
    args.steps = args.steps or (3 if args.smoke else 20)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 3)
    args.pool = args.pool or (64 if args.smoke else 256)
    if args.warmup >= args.steps:
        p.error("--warmup must be smaller than --steps")
    if args.worker:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        from alignpress.processes import configure_cuda_allocator

        configure_cuda_allocator()  # as entrypoint.py does, before torch is loaded
        result = run_variant(args.worker, args.model, args.steps, args.warmup, args.pool, args.seed, args.smoke, args.profile_steps if args.worker in (args.profile or []) else 0, args.ref_cache)
        args.worker_out.write_text(json.dumps(result))
        return 0
    run = run_all(args, args.out)
    path = write_report(run, args.out)
    print(path.with_suffix(".md").read_text())
    print(f"wrote {path} and {path.with_suffix('.md')}")
    return 0 if all(v["status"] != "failed" for v in run["variants"]) else 1


if __name__ == "__main__":
    sys.exit(main())
