"""Arithmetic of a DPO run: model FLOPs, a GPU memory estimate, padding. No model is loaded.

Used by `entrypoint.py plan` (before any GPU is rented) and by `benchmarks/bench_dpo.py` (to turn
measured step times into model FLOPs utilisation). Everything here is plain arithmetic on the
architecture's shapes, so it can be checked by hand (tests/test_plan.py does).

FLOPs (model FLOPs, the MFU convention: useful work only, no recomputation, padding excluded).
A multiply-add is 2 FLOPs. For one training sequence of L tokens whose last k tokens are the answer:

  matmul  = 2 * P_body * L            P_body = weights of the decoder layers' linear layers
  attn    = 4 * d_attn * layers * C(L) C(L) = query-key pairs under the causal mask (and sliding
                                      window): sum over positions i of min(i + 1, window);
                                      QK^T and AV are 2 FLOPs per pair per attention channel each
  head    = 2 * vocab * hidden * k    TRL 1.16 projects only the scored (answer) positions
                                      through the LM head (its fused, chunked log-prob head)
  lora    = 2 * P_lora * L            adapter matmuls (x @ A, then @ B)

  policy forward   = matmul + attn + head + lora
  policy backward  = LoRA: matmul + 2 * attn + head + 2 * lora
                       (gradients flow through the frozen weights to reach earlier adapters: one
                       matmul per frozen weight for the activation gradient, none for its weight
                       gradient; attention's backward is twice its forward; the adapters get both
                       their activation and weight gradients)
                     full fine-tuning: 2 * (matmul + attn + head)   (the familiar "6N" total)
  reference forward = matmul + attn + head   (adapters disabled; none when the reference
                                              log-probs are precomputed: then it runs once,
                                              before training, and is counted separately)

So with LoRA a token costs about 6 * P_body FLOPs (2 policy forward + 2 policy backward +
2 reference forward), the same as full fine-tuning without a reference model. Gradient
checkpointing recomputes the policy forward (another 2 * P_body per token): that is hardware
work, not model work, and is left out of MFU.

Memory: see `memory_estimate`; an estimate fitted to, and tested against, the benchmark's measured
peaks (benchmarks/results/2026-11-26-h200/: within 10% of every measured row, tests/test_plan.py).
`checkpointing_decision` and `precompute_decision` turn it and the measured throughputs into the
run-time choices behind `train.gradient_checkpointing: auto` and `dpo.precompute_ref_log_probs: auto`.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

GiB = 1024**3


# ---------------------------------------------------------------------------------------------
# Architectures


@dataclass(frozen=True)
class Arch:
    """The shapes of a decoder-only transformer that FLOPs and memory depend on."""

    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied_embeddings: bool
    fused_projections: bool = False  # Phi-3: one qkv_proj and one gate_up_proj per layer
    sliding_window: int | None = None
    mask_kinds: int = 1  # kinds of attention layer (Gemma-2: sliding and full); prefix sharing builds a mask for each

    @property
    def d_attn(self) -> int:
        return self.heads * self.head_dim

    @property
    def d_kv(self) -> int:
        return self.kv_heads * self.head_dim

    def linears(self) -> list[tuple[str, int, int]]:
        """(name, in_features, out_features) of every linear layer in one decoder layer."""
        h, a, kv, i = self.hidden, self.d_attn, self.d_kv, self.intermediate
        if self.fused_projections:
            return [("qkv_proj", h, a + 2 * kv), ("o_proj", a, h), ("gate_up_proj", h, 2 * i), ("down_proj", i, h)]
        return [("q_proj", h, a), ("k_proj", h, kv), ("v_proj", h, kv), ("o_proj", a, h), ("gate_proj", h, i), ("up_proj", h, i), ("down_proj", i, h)]

    @property
    def body_params(self) -> int:
        """Weights of the decoder layers' linear layers (what the matmul FLOPs and 4-bit quantisation see)."""
        return self.layers * sum(n_in * n_out for _, n_in, n_out in self.linears())

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def norm_params(self) -> int:
        return (2 * self.layers + 1) * self.hidden

    @property
    def total_params(self) -> int:
        head = 0 if self.tied_embeddings else self.vocab * self.hidden
        return self.body_params + self.embedding_params + head + self.norm_params

    def lora_params(self, r: int, targets: list[str] | str = "all-linear") -> int:
        """Trainable adapter weights: r * (in + out) for each adapted linear layer (never the LM head)."""
        chosen = [(n_in, n_out) for name, n_in, n_out in self.linears() if targets == "all-linear" or _targets(name, targets)]
        return self.layers * sum(r * (n_in + n_out) for n_in, n_out in chosen)


def _targets(name: str, targets: list[str]) -> bool:
    # peft matches module names by suffix; a recipe written for separate projections (q_proj, ...)
    # still adapts Phi-3's fused ones only if it names them.
    return name in targets


def arch_from_config(config: Any, name: str = "") -> Arch:
    """An Arch from a transformers config object or a config.json dict."""
    get = config.get if isinstance(config, dict) else (lambda k, d=None: getattr(config, k, d))
    hidden = get("hidden_size")
    heads = get("num_attention_heads")
    model_type = get("model_type", "") or ""
    return Arch(
        name=name or model_type,
        hidden=hidden,
        layers=get("num_hidden_layers"),
        heads=heads,
        kv_heads=get("num_key_value_heads") or heads,
        head_dim=get("head_dim") or hidden // heads,
        intermediate=get("intermediate_size"),
        vocab=get("vocab_size"),
        tied_embeddings=bool(get("tie_word_embeddings", False)),
        fused_projections=model_type == "phi3",
        sliding_window=get("sliding_window") if model_type in ("phi3", "mistral") else None,
        mask_kinds=len(set(get("layer_types") or [None])),
    )


# From the models' public configs (facts in shared/reference/models-and-data.md), so that `plan`
# works for the seed recipes without downloading anything.
KNOWN_ARCHS = {
    "microsoft/Phi-3-mini-4k-instruct": Arch("Phi-3-mini", hidden=3072, layers=32, heads=32, kv_heads=32, head_dim=96, intermediate=8192, vocab=32064, tied_embeddings=False, fused_projections=True, sliding_window=2047),
    "google/gemma-2b-it": Arch("Gemma-2b", hidden=2048, layers=18, heads=8, kv_heads=1, head_dim=256, intermediate=16384, vocab=256000, tied_embeddings=True),
}
KNOWN_ARCHS["google/gemma-2b"] = KNOWN_ARCHS["google/gemma-2b-it"]


# ---------------------------------------------------------------------------------------------
# FLOPs


def causal_pairs(length: int, window: int | None = None) -> int:
    """Query-key pairs a causal (optionally sliding-window) attention computes for one sequence."""
    if window is None or length <= window:
        return length * (length + 1) // 2
    return window * (window + 1) // 2 + (length - window) * window


def sequence_flops(arch: Arch, length: int, completion: int, *, lora_r: int | None = 16, lora_targets: list[str] | str = "all-linear", reference: bool = True) -> dict[str, float]:
    """Model FLOPs of one training sequence (see the module docstring for every term).

    length: tokens in the sequence (prompt + answer, after truncation); completion: answer tokens
    (the positions scored through the LM head); lora_r: None for full fine-tuning; reference:
    False when the reference log-probs are precomputed.
    """
    matmul = 2.0 * arch.body_params * length
    attn = 4.0 * arch.d_attn * arch.layers * causal_pairs(length, arch.sliding_window)
    head = 2.0 * arch.vocab * arch.hidden * completion
    if lora_r is None:
        forward = matmul + attn + head
        backward = 2 * forward
    else:
        lora = 2.0 * arch.lora_params(lora_r, lora_targets) * length
        forward = matmul + attn + head + lora
        backward = matmul + 2 * attn + head + 2 * lora
    ref = (matmul + attn + head) if reference else 0.0
    return {"policy_forward": forward, "policy_backward": backward, "reference_forward": ref, "total": forward + backward + ref}


def flops_per_token(arch: Arch, seq_len: int, completion_fraction: float = 0.5, **kw: Any) -> float:
    """Average model FLOPs per non-padding token for sequences of `seq_len` tokens."""
    return sequence_flops(arch, seq_len, round(seq_len * completion_fraction), **kw)["total"] / seq_len


def truncate_pair(prompt: int, chosen: int, rejected: int, max_length: int | None) -> tuple[tuple[int, int], tuple[int, int]] | None:
    """(length, completion) of the chosen and rejected sequences TRL builds from one pair.

    TRL 1.16 (keep_start): each of prompt+chosen and prompt+rejected is cut to max_length, and a
    pair whose prompt alone fills max_length is dropped (returns None).
    """
    if max_length is not None and prompt >= max_length:
        return None
    out = []
    for answer in (chosen, rejected):
        length = prompt + answer if max_length is None else min(prompt + answer, max_length)
        out.append((length, length - prompt))
    return out[0], out[1]


# Prefix-shared rows are padded to a multiple of this many positions (alignpress.prefix_dpo: an
# aligned additive mask is not copied per layer by SDPA's memory-efficient kernel on CUDA).
MASK_ALIGN = 8


def prefix_segment(prompt: int, chosen: int, rejected: int, max_length: int | None, truncation_mode: str = "keep_start") -> int | None:
    """Positions one pair takes as a prefix-shared segment (alignpress.prefix_dpo): both of TRL's
    truncated sequences, less the shared prompt, plus the prompt's last token repeated. None when
    TRL drops the pair. keep_end: the prompt counts as shared only when both sequences keep the
    same part of it (otherwise the bound assumes nothing is shared)."""
    if truncation_mode == "keep_start":
        seqs = truncate_pair(prompt, chosen, rejected, max_length)
        if seqs is None:
            return None
        (lc, _), (lr, _) = seqs
        shared = min(prompt, lc, lr)
    else:
        lc, lr = (prompt + a if max_length is None else min(prompt + a, max_length) for a in (chosen, rejected))
        cut_c, cut_r = prompt + chosen - lc, prompt + rejected - lr
        shared = max(prompt - cut_c, 0) if cut_c == cut_r else 0
    return lc + lr - max(shared - 1, 0)


def packed_layout(pairs: list[tuple[int, int, int]], max_length: int | None, micro_batch_pairs: int, pairs_per_row: int, truncation_mode: str = "keep_start") -> tuple[int, int]:
    """(rows, row length) that bound every prefix-shared micro-batch of `micro_batch_pairs` pairs
    drawn from `pairs`: ceil(batch / pairs_per_row) rows, none longer than the longest
    min(pairs_per_row, batch) segments together, padded to MASK_ALIGN."""
    segments = sorted((s for p, c, r in pairs if (s := prefix_segment(p, c, r, max_length, truncation_mode))), reverse=True)
    per_row = max(1, min(pairs_per_row, micro_batch_pairs))
    length = max(sum(segments[:per_row]), 1)
    return math.ceil(micro_batch_pairs / pairs_per_row), math.ceil(length / MASK_ALIGN) * MASK_ALIGN


def dataset_flops(arch: Arch, pairs: list[tuple[int, int, int]], max_length: int | None, **kw: Any) -> dict[str, float]:
    """FLOPs and non-padding tokens of one pass over `pairs` of (prompt, chosen, rejected) token counts."""
    totals = {"policy_forward": 0.0, "policy_backward": 0.0, "reference_forward": 0.0, "total": 0.0, "tokens": 0, "pairs": 0, "dropped_pairs": 0}
    for p, c, r in pairs:
        seqs = truncate_pair(p, c, r, max_length)
        if seqs is None:
            totals["dropped_pairs"] += 1
            continue
        totals["pairs"] += 1
        for length, completion in seqs:
            f = sequence_flops(arch, length, completion, **kw)
            for k in ("policy_forward", "policy_backward", "reference_forward", "total"):
                totals[k] += f[k]
            totals["tokens"] += length
    return totals


# ---------------------------------------------------------------------------------------------
# Memory


# NF4 with double quantisation (bitsandbytes, the seed's QLoRA): 4 bits per weight, an 8-bit absmax
# per block of 64 weights, and an fp32 constant per 256 of those blocks.
NF4_BYTES_PER_PARAM = (4 + 8 / 64 + 32 / (64 * 256)) / 8
# TRL's fused LM head works in tiles of 4,096 tokens x 32,768 vocabulary entries (trl 1.16:
# kernels/chunked_logprob.py TOKEN_CHUNK_SIZE, trainer/utils.py _CHUNKED_LOGPROB_CHUNK_SIZE).
LM_HEAD_TILE = (4096, 32768)
# Liger's fused RMSNorm (no fp32 copy kept) and SwiGLU/GeGLU (the activation recomputed in backward)
# keep fewer activations. Fitted, bf16 elements per token per layer saved = 3.4 x hidden + 0.45 x
# intermediate, to the two measured no-checkpointing Liger peaks (H200, 2026-11-26: Phi-3-mini
# batch 4 x 2,048: 68.09-68.30 GiB; Gemma-2b batch 3 x 2,048: 36.12 GiB); two coefficients from two
# measurements, rounded up so the estimate stays above both. Without Liger the formula below was
# already within 0.5% (Phi-3-mini 82.26 estimated, 81.84 measured).
LIGER_SAVED_PER_HIDDEN = 3.4
LIGER_SAVED_PER_INTERMEDIATE = 0.45
CUDA_CONTEXT_GIB = 1.0  # CUDA context + cuBLAS workspace: not in torch's allocator statistics (assumption)
FRAGMENTATION = 0.10  # allocator fragmentation margin on top of the estimate (assumption)
OPTIMIZER_STATE_BYTES = {"8bit": 2, "32bit": 8}  # Adam m and v per trainable parameter


def activation_bytes_per_token_layer(arch: Arch, dtype_bytes: int = 2, liger: bool = False) -> float:
    """Estimated bytes one decoder layer keeps for backward, per token (flash/SDPA attention).

    Counted tensors: two RMSNorms (input, fp32 copy, output: about 4 x hidden each), q/k before
    and after RoPE, v and the attention output (3 x d_attn + 3 x d_kv), and the gated MLP's gate,
    up, activation and product (4 x intermediate). LoRA's rank-r intermediates are negligible, and
    TRL disables dropout (so LoRA dropout keeps no copy). An estimate, to be calibrated against
    the benchmark's measured peaks. liger: minus what Liger's kernels do not keep (fitted, see
    LIGER_SAVED_PER_HIDDEN).
    """
    elements = 8 * arch.hidden + 3 * arch.d_attn + 3 * arch.d_kv + 4 * arch.intermediate
    if liger:
        elements -= LIGER_SAVED_PER_HIDDEN * arch.hidden + LIGER_SAVED_PER_INTERMEDIATE * arch.intermediate
    return dtype_bytes * elements


@dataclass
class MemorySettings:
    """What the memory estimate depends on, read from a recipe by `settings_from_recipe`."""

    weights: str = "bf16"  # nf4 | bf16 | fp32
    lora_r: int | None = 16  # None = full fine-tuning
    lora_targets: list[str] | str = "all-linear"
    optimizer_bits: str = "32bit"
    gradient_checkpointing: bool = False
    # With gradient_checkpointing: how many decoder layers recompute (the first ones, see
    # alignpress.modeling.limit_checkpointing); None = every layer.
    checkpointed_layers: int | None = None
    micro_batch_pairs: int = 2
    seq_len: int = 2048  # the longest sequence a micro-batch may hold (rows pad to it)
    precompute_ref: bool = False
    attn_implementation: str | None = None
    liger: bool = False  # Liger kernels (train.use_liger_kernel): fewer activations kept
    # Prefix-shared DPO (dpo.prefix_sharing): the packed rows a micro-batch runs (flops.packed_layout)
    # instead of TRL's 2 x micro_batch_pairs rows x seq_len, and its dense additive attention masks
    # (rows x length x length each, one per kind of layer: Arch.mask_kinds).
    packed_rows: int | None = None
    packed_len: int | None = None

    def layout(self) -> tuple[int, int]:
        """(rows, positions per row) of the largest micro-batch."""
        if self.packed_rows:
            return self.packed_rows, self.packed_len or self.seq_len
        return 2 * self.micro_batch_pairs, self.seq_len

    def shape(self) -> str:
        rows, length = self.layout()
        return f"{rows} {'packed ' if self.packed_rows else ''}rows x {length} tokens"


def memory_estimate(arch: Arch, s: MemorySettings) -> dict[str, Any]:
    """Peak GPU memory of one training step, by component (bytes), with the formula of each."""
    weight_bytes = {"nf4": None, "bf16": 2, "fp32": 4}[s.weights]
    head_params = 0 if arch.tied_embeddings else arch.vocab * arch.hidden
    other_params = arch.embedding_params + head_params + arch.norm_params
    parts: dict[str, float] = {}
    if s.weights == "nf4":
        # peft's prepare_model_for_kbit_training casts every parameter that is not 4-bit
        # (embeddings, LM head, norms) to fp32.
        parts["weights"] = arch.body_params * NF4_BYTES_PER_PARAM + other_params * 4
    else:
        parts["weights"] = arch.total_params * weight_bytes
    opt = OPTIMIZER_STATE_BYTES["8bit" if "8bit" in s.optimizer_bits else "32bit"]
    if s.lora_r is not None:
        n = arch.lora_params(s.lora_r, s.lora_targets)
        # Adapters: fp32 under bf16 training (peft upcasts them), bf16 under QLoRA (TRL casts them).
        p = 2 if s.weights == "nf4" else 4
        parts["trainable_states"] = n * (p + p + opt)
    else:
        # Full fine-tuning: gradients in the weights' dtype, Adam states in the weights' dtype
        # (torch AdamW), and a reference copy of the model unless its log-probs are precomputed.
        parts["trainable_states"] = arch.total_params * weight_bytes * 3
        if not s.precompute_ref:
            parts["reference_model"] = arch.total_params * weight_bytes
    rows, length = s.layout()
    tokens = rows * length  # chosen + rejected rows padded to seq_len, or the packed rows
    per_layer = activation_bytes_per_token_layer(arch, liger=s.liger)
    # Under QLoRA, peft's fp32 embeddings and norms make the residual stream fp32 (the 4-bit linears
    # cast their inputs back to bf16); measured: the seed's 7.71 GiB (Phi-3) and 5.38 GiB (Gemma)
    # were 1.67 and 0.75 GiB above a bf16-stream estimate.
    stream_bytes = 4 if s.weights in ("nf4", "fp32") else 2
    recomputed = checkpointed(arch, s)
    # A checkpointed layer keeps only its input; the others keep everything their backward reads.
    # One checkpointed layer's activations are rebuilt at a time. Checkpointing the first layers
    # (modeling.limit_checkpointing) means that rebuild starts after every later layer's backward
    # has freed its own, so it adds to the peak only when every layer is checkpointed.
    parts["activations"] = tokens * (recomputed * stream_bytes * arch.hidden + (arch.layers - recomputed) * per_layer)
    if recomputed == arch.layers:
        parts["activations"] += tokens * per_layer
    if s.attn_implementation == "eager":
        # eager attention keeps the scores and the probabilities: rows x heads x L^2 (bf16 each)
        layers_kept = 1 if recomputed == arch.layers else arch.layers - recomputed
        parts["activations"] += rows * arch.heads * length**2 * 2 * 2 * layers_kept
    if s.packed_rows:
        # the masks are built once per forward and shared by every layer (rows aligned: no per-layer copy)
        parts["attention_masks"] = arch.mask_kinds * rows * length**2 * (4 if s.weights == "fp32" else 2)
    # Fused LM head: a logits tile for the forward and one for the backward, the gathered hidden
    # states (bf16) and their gradient (fp32), for at most every token of the micro-batch.
    # The head computes in its weights' dtype: fp32 under QLoRA (peft casts it), bf16 otherwise.
    tile = min(tokens, LM_HEAD_TILE[0]) * min(arch.vocab, LM_HEAD_TILE[1]) * stream_bytes
    parts["lm_head"] = 2 * tile + tokens * arch.hidden * (stream_bytes + 4)
    subtotal = sum(parts.values())
    total = subtotal * (1 + FRAGMENTATION) + CUDA_CONTEXT_GIB * GiB
    return {
        "parts_gib": {k: v / GiB for k, v in parts.items()},
        "subtotal_gib": subtotal / GiB,
        "total_gib": total / GiB,
        "micro_batch_tokens": tokens,
        # What older TRL (the seed notebook's) materialised instead of tiles: fp32 logits for every
        # position of chosen and rejected rows. For reference only; TRL 1.16 never builds it.
        "full_logits_gib": tokens * arch.vocab * 4 / GiB,
        "settings": asdict(s),
        "status": "estimate: not measured",
        "formula": (
            f"(weights + trainable states + activations + LM head) x {1 + FRAGMENTATION:.2f} fragmentation margin "
            f"+ {CUDA_CONTEXT_GIB:g} GiB CUDA context; activations for {s.shape()}"
        ),
    }


def checkpointed(arch: Arch, s: MemorySettings) -> int:
    """Decoder layers that recompute their activations under these settings (0 = checkpointing off)."""
    if not s.gradient_checkpointing:
        return 0
    return arch.layers if s.checkpointed_layers is None else min(s.checkpointed_layers, arch.layers)


# `auto` keeps the estimate within this share of the GPU's free memory. The estimate already adds
# 10% to what it counts, but in the measured runs the allocator reserved 4% to 58% more than it
# allocated (benchmarks/results/2026-11-27-h200/: peak_reserved_gib), and an out-of-memory error can
# come hours in, with the longest batch. One more checkpointed layer costs little.
AUTO_MEMORY_SHARE = 0.9


def fewest_checkpointed_layers(arch: Arch, s: MemorySettings, budget_gib: float) -> int:
    """The fewest decoder layers to checkpoint for the estimate to stay within `budget_gib` (0: none
    needed; arch.layers: every one, whether or not that is enough). Below every layer the estimate
    falls by the same amount per checkpointed layer (a layer's activations give way to its input),
    so the count is solved for, not searched."""
    def total(layers: int) -> float:
        return memory_estimate(arch, replace(s, gradient_checkpointing=layers > 0, checkpointed_layers=layers or None))["total_gib"]

    off = total(0)
    if off <= budget_gib:
        return 0
    step = off - total(1)
    layers = max(1, math.ceil((off - budget_gib) / step - 1e-9)) if step > 0 else arch.layers
    while layers < arch.layers and total(layers) > budget_gib:  # rounding
        layers += 1
    return min(layers, arch.layers)


def recompute_share(arch: Arch, s: MemorySettings, pairs: list[tuple[int, int, int]], gpu_gib: float, *, max_length: int | None,
                    truncation_mode: str = "keep_start", prefix: bool = False, pairs_per_row: int = 1, sort: bool = False, seed: int = 0) -> float:
    """Share of the policy forward that `auto` recomputes over `pairs`, each micro-batch of
    s.micro_batch_pairs checkpointing the fewest layers its own shape needs (as
    modeling.CheckpointedLayers does at run time), weighted by the batch's policy-forward FLOPs.
    sort=True approximates length grouping; otherwise a seeded shuffle."""
    order = list(range(len(pairs)))
    if sort:
        order.sort(key=lambda i: sum(pairs[i]))
    else:
        random.Random(seed).shuffle(order)
    budget = AUTO_MEMORY_SHARE * gpu_gib
    done = total = 0.0
    for start in range(0, len(order), s.micro_batch_pairs):
        batch = [pairs[i] for i in order[start : start + s.micro_batch_pairs]]
        seqs = [x for p, c, r in batch if (t := truncate_pair(p, c, r, max_length)) for x in t]
        if not seqs:
            continue
        if prefix:
            rows, length = packed_layout(batch, max_length, len(batch), pairs_per_row, truncation_mode)
            shape = replace(s, packed_rows=rows, packed_len=length)
        else:
            shape = replace(s, micro_batch_pairs=len(batch), seq_len=max(n for n, _ in seqs))
        forward = sum(sequence_flops(arch, n, c, lora_r=s.lora_r)["policy_forward"] for n, c in seqs)
        done += forward * fewest_checkpointed_layers(arch, shape, budget) / arch.layers
        total += forward
    return done / total if total else 0.0


def checkpointing_decision(arch: Arch, s: MemorySettings, gpu_gib: float | None) -> dict[str, Any]:
    """`train.gradient_checkpointing: auto`: off when the estimate without it stays within
    AUTO_MEMORY_SHARE of `gpu_gib`, else on for as few decoder layers as keep it there (each
    checkpointed layer costs one more forward of that layer; the others keep their activations).

    gpu_gib: the GPU memory this process may use (free memory before the model is loaded); None
    when there is no CUDA GPU (then off: CPU memory is not the limit this guards).
    s.checkpointed_layers, when set (train.checkpointed_layers), is the count to use when on.
    Returns the decision, the layer count, the estimates (total, with the fragmentation margin
    and CUDA context) and a sentence for the log and run.json.
    """
    def total(layers: int) -> float:
        return memory_estimate(arch, replace(s, gradient_checkpointing=layers > 0, checkpointed_layers=layers or None))["total_gib"]

    off, every = total(0), total(arch.layers)
    out = {"estimate_without_gib": round(off, 2), "estimate_with_gib": round(every, 2), "gpu_gib": None if gpu_gib is None else round(gpu_gib, 2), "layers": arch.layers}
    shape = s.shape()
    if gpu_gib is None:
        return out | {"gradient_checkpointing": False, "checkpointed_layers": 0, "reason": "no CUDA GPU: off"}
    budget = AUTO_MEMORY_SHARE * gpu_gib
    share = f"{AUTO_MEMORY_SHARE:.0%} of the GPU's {gpu_gib:.1f} GiB"
    if off <= budget:
        return out | {"gradient_checkpointing": False, "checkpointed_layers": 0, "reason": f"off: the estimate without it ({off:.1f} GiB for {shape}) is within {share}"}
    reason = f"the estimate without it ({off:.1f} GiB for {shape}) exceeds {share}"
    if s.checkpointed_layers is not None:
        layers = min(s.checkpointed_layers, arch.layers)
        reason = f"on for {layers} of {arch.layers} layers (train.checkpointed_layers): {reason}; with them {total(layers):.1f} GiB"
    else:
        layers = fewest_checkpointed_layers(arch, s, budget)
        if layers < arch.layers:
            reason = (f"on for {layers} of {arch.layers} layers, the fewest that bring the estimate within {share}: {off:.1f} GiB without it (for {shape}), "
                      f"{total(layers):.1f} GiB with {layers} layer{'s' if layers > 1 else ''}, {every:.1f} GiB with all {arch.layers}")
        else:
            reason = f"on for all {arch.layers} layers: {reason}; with all {every:.1f} GiB"
    if total(layers) > budget:
        more = "raise train.checkpointed_layers, or " if layers < arch.layers else ""
        reason += f" (still above: {more}lower train.per_device_train_batch_size or dpo.max_length)"
    out["estimate_chosen_gib"] = round(total(layers), 2)
    return out | {"gradient_checkpointing": True, "checkpointed_layers": layers, "reason": reason}


# Measured on one H200 (benchmarks/results/2026-11-26-h200/, Phi-3-mini bf16 LoRA, batch 4, Liger,
# length grouping): training steps with the reference forward each step ran 8,882 tokens/s, with
# precomputed reference log-probs 12,669 tokens/s, and the precompute pass itself 205,625 tokens
# in 37.7 s of trainer setup = 5,456 tokens/s (an upper bound on its time: setup also tokenises).
PRECOMPUTE_RATES = {"with_reference": 8882.0, "precomputed": 12669.0, "precompute_pass": 205625 / 37.69}


def precompute_decision(epochs: float, stored: bool = False, rates: dict[str, float] | None = None) -> dict[str, Any]:
    """`dpo.precompute_ref_log_probs: auto`: precompute when it saves time over the whole run.

    Per token of one epoch, precomputing costs 1 / pass rate once and saves
    1 / with_reference - 1 / precomputed every epoch, so it pays from
    epochs > (1 / pass) / (1 / with_reference - 1 / precomputed): 5.45 epochs with the measured
    rates (assumed to carry over to other GPUs and models in ratio). Log-probs already stored in the
    output folder (a resumed run) cost nothing, so then it is always on.
    """
    r = rates or PRECOMPUTE_RATES
    saved = 1 / r["with_reference"] - 1 / r["precomputed"]
    break_even = (1 / r["precompute_pass"]) / saved if saved > 0 else math.inf
    out = {"epochs": round(epochs, 3), "break_even_epochs": round(break_even, 2)}
    if stored:
        return out | {"precompute_ref_log_probs": True, "reason": "on: this data's reference log-probs are already stored in the output folder"}
    if epochs > break_even:
        return out | {"precompute_ref_log_probs": True, "reason": f"on: {epochs:g} epochs > {break_even:.2f}, where one precompute pass is repaid by faster steps"}
    return out | {"precompute_ref_log_probs": False, "reason": f"off: {epochs:g} epochs <= {break_even:.2f}, too few to repay one precompute pass"}


# ---------------------------------------------------------------------------------------------
# Padding and lengths


def padding_fraction(rows: list[int], batch_pairs: int, *, seed: int = 0, sort: bool = False) -> float:
    """Share of padded positions when pairs are batched `batch_pairs` at a time.

    rows: for each pair, (chosen_len, rejected_len) flattened as [c0, r0, c1, r1, ...]. Each
    micro-batch pads its 2 * batch_pairs rows to the longest one (TRL's collator).
    sort=True approximates length grouping (neighbours by length share a batch).
    """
    pairs = [(rows[i], rows[i + 1]) for i in range(0, len(rows) - 1, 2)]
    order = list(range(len(pairs)))
    if sort:
        order.sort(key=lambda i: max(pairs[i]))
    else:
        random.Random(seed).shuffle(order)
    real = padded = 0
    for start in range(0, len(order), batch_pairs):
        batch = [pairs[i] for i in order[start : start + batch_pairs]]
        longest = max(max(p) for p in batch)
        real += sum(sum(p) for p in batch)
        padded += longest * 2 * len(batch)
    return 1 - real / padded if padded else 0.0


@dataclass
class LengthDistribution:
    """A capybara-like distribution of (prompt, chosen, rejected) token counts (an assumption).

    Target (shared/reference/models-and-data.md, from arXiv 2410.20305): median about 1,160
    tokens a pair, prompt about 1.6 x the answer, a long tail past 3,500. Read here as: a pair
    is prompt + chosen + rejected, and the ratio is prompt / mean(chosen, rejected). Prompt and
    answers are independent lognormals (medians and sigmas below, tuned by simulation so the
    realised statistics hit the targets; `describe` prints what a sample realises).
    """

    prompt_median: float = 470.0
    prompt_sigma: float = 0.9
    answer_median: float = 275.0
    answer_sigma: float = 0.6
    scale: float = 1.0  # multiplies every length (the CPU smoke test uses a small scale)
    minimum: int = 2
    maximum: int = 8000

    def sample(self, n: int, seed: int) -> list[tuple[int, int, int]]:
        rng = random.Random(seed)

        def draw(median, sigma):
            value = math.exp(rng.gauss(math.log(median * self.scale), sigma))
            return int(min(max(round(value), self.minimum), self.maximum * self.scale))

        return [(draw(self.prompt_median, self.prompt_sigma), draw(self.answer_median, self.answer_sigma), draw(self.answer_median, self.answer_sigma)) for _ in range(n)]

    @staticmethod
    def describe(pairs: list[tuple[int, int, int]], tail: int = 3500) -> dict[str, float]:
        totals = sorted(p + c + r for p, c, r in pairs)
        ratios = sorted(p / ((c + r) / 2) for p, c, r in pairs)

        def q(values, f):
            return values[min(len(values) - 1, int(f * len(values)))]

        return {
            "pairs": len(pairs),
            "median_pair_tokens": q(totals, 0.5),
            "median_prompt_to_answer": round(q(ratios, 0.5), 2),
            "p95_pair_tokens": q(totals, 0.95),
            "p99_pair_tokens": q(totals, 0.99),
            "max_pair_tokens": totals[-1],
            f"share_over_{tail}": round(sum(t > tail for t in totals) / len(totals), 4),
        }


# ---------------------------------------------------------------------------------------------
# Tables shipped with alignpress (src/alignpress/data/)


def load_table(name: str) -> dict[str, Any]:
    """gpus.json, gpu_prices.json or throughput.json."""
    return json.loads((Path(__file__).parent / "data" / name).read_text())


def gpu_for_device(device_name: str, total_gib: float) -> str | None:
    """The gpus.json key for a CUDA device (torch.cuda.get_device_name, total memory), or None."""
    for key, info in load_table("gpus.json")["gpus"].items():
        if any(n in device_name for n in info["device_names"]) and total_gib <= info.get("max_memory_gib_for_name", 1e9):
            return key
    return None


__all__ = [
    "Arch",
    "KNOWN_ARCHS",
    "LengthDistribution",
    "MASK_ALIGN",
    "MemorySettings",
    "arch_from_config",
    "causal_pairs",
    "AUTO_MEMORY_SHARE",
    "checkpointed",
    "checkpointing_decision",
    "fewest_checkpointed_layers",
    "recompute_share",
    "precompute_decision",
    "dataset_flops",
    "flops_per_token",
    "gpu_for_device",
    "load_table",
    "memory_estimate",
    "packed_layout",
    "padding_fraction",
    "prefix_segment",
    "sequence_flops",
    "truncate_pair",
]
