"""Prefix-shared DPO: each pair's prompt runs through the model once, and pairs pack into rows.

TRL's DPOTrainer builds two padded rows per pair, [prompt | chosen] and [prompt | rejected], so
every prompt runs twice through the policy and again twice through the reference, and short pairs
carry padding up to the longest row of the batch. Here one pair is one segment

    [prompt[:-1] | prompt[-1] chosen | prompt[-1] rejected]

with a custom 4-D attention mask: the prompt sees itself (causally), each branch sees the prompt
and itself but never the other branch, and the rejected branch's positions restart where the
prompt ends, as in its own TRL row. The prompt's last token is repeated at the head of each branch
(one token a pair) so that every position predicts exactly one next token: it predicts the first
chosen token in one branch and the first rejected token in the other. Several segments pack into
one row with a block-diagonal mask (a segment sees only itself), so padding is left only at the
end of the last rows.

Integration with TRL is two small pieces, not a fork:
- `PrefixSharedCollator` returns TRL's own padded batch (which TRL's loss, metrics and token
  counts read, unchanged) plus the packed layout under `shared_*` keys.
- `PrefixSharedDPOTrainer` wraps the model's forward (the policy, the reference model if any,
  and so the adapter-disabled policy with LoRA, and the precompute pass): a call that carries the
  `shared_*` keys runs the backbone on the packed rows only, and its per-token outputs (log-probs,
  entropy, mean logits, top-1) are scattered back into TRL's [2 x pairs, length - 1] layout.
  Everything else (every loss type, reference handling, precomputed log-probs, metrics) is TRL's.

Truncation is TRL's (DataCollatorForPreference: each of prompt+chosen and prompt+rejected cut
to max_length, keep_start or keep_end). The shared prefix is the common start of the two truncated
sequences before either answer begins, so a keep_end pair whose prompt was cut differently for
its two answers shares nothing and costs what it costs in TRL; the numbers stay the same.

Attention backends: SDPA (the default) and eager take a dense 4-D mask (transformers' masking_utils
returns a 4-D mask unchanged, so sliding windows are applied here, from the config). SDPA then
computes attention over the whole row, masked-out keys included: the other branch, the other
segments and the upper triangle. FlexAttention (`flex_attention`) takes the same rule as a
BlockMask and skips every 128 x 128 block the rule hides entirely, which packed rows are mostly
made of. One rule (`visible`) builds both masks, so they cannot drift apart; the tests compare
the two backends' log-probs, losses and gradients. FlashAttention cannot express the branch mask
and is refused at recipe validation. Dense rows are padded to a multiple of MASK_ALIGN (8)
positions: on CUDA, SDPA's memory-efficient kernel copies a mask whose strides are not multiples
of 8 (aten's preprocess_mask pads it) in every layer, and each copy is kept for the backward pass;
an aligned mask is the one tensor all layers share. TRL caches
precomputed reference log-probs by dataset and weights only, so a run may reuse the standard
path's cache file: the values agree (tests/test_prefix_dpo.py), so that is harmless.
"""

from __future__ import annotations

import math
import types
from dataclasses import dataclass
from typing import Any

import torch
from accelerate.utils import is_peft_model
from trl.trainer.dpo_trainer import DataCollatorForPreference

from .flops import MASK_ALIGN
from .refcache import StableKeyDPOTrainer

IGNORE = -100
SHARED_KEYS = ("shared_input_ids", "shared_position_ids", "shared_segment_ids", "shared_branch_ids", "shared_labels", "shared_targets")
SUPPORTED_ATTENTION = ("sdpa", "eager", "flex_attention")


def truncated_pair(prompt_ids, chosen_ids, rejected_ids, max_length: int | None, truncation_mode: str = "keep_start"):
    """TRL's two sequences for one pair, their completion masks, and how many leading tokens they share.

    Truncation as in trl DataCollatorForPreference.torch_call; shared tokens are the common prefix
    of the two sequences where neither holds an answer token yet.
    """
    seqs, masks = [], []
    for answer in (chosen_ids, rejected_ids):
        ids = list(prompt_ids) + list(answer)
        mask = [0] * len(prompt_ids) + [1] * len(answer)
        if max_length is not None:
            if truncation_mode == "keep_start":
                ids, mask = ids[:max_length], mask[:max_length]
            elif truncation_mode == "keep_end":
                ids, mask = ids[-max_length:], mask[-max_length:]
            else:
                raise ValueError(f"unsupported truncation_mode {truncation_mode!r}; expected keep_start or keep_end")
        seqs.append(ids)
        masks.append(mask)
    (c, r), (mc, mr) = seqs, masks
    shared = 0
    while shared < min(len(c), len(r)) and c[shared] == r[shared] and mc[shared] == 0 and mr[shared] == 0:
        shared += 1
    return c, mc, r, mr, shared


def segment_length(chosen_len: int, rejected_len: int, shared: int) -> int:
    """Tokens one pair costs as a segment: both sequences, less the shared prompt, plus the repeated last prompt token."""
    return chosen_len + rejected_len - max(shared - 1, 0)


def token_savings(pairs, max_length: int | None, truncation_mode: str = "keep_start") -> dict[str, Any]:
    """How many tokens prefix sharing computes, against TRL's non-padding tokens for the same pairs.

    `pairs` are (prompt, chosen, rejected) token counts (answers with TRL's eos). Pairs whose prompt
    fills max_length are left out, as TRL drops them (keep_start). Padding is not counted on either
    side: it depends on the batching (packing removes nearly all of it).
    """
    standard = shared_total = kept = 0
    for p, c, r in pairs:
        if max_length is not None and truncation_mode == "keep_start" and p >= max_length:
            continue
        kept += 1
        # Distinct ids per role are enough to find the shared prompt.
        cs, _, rs, _, shared = truncated_pair(range(p), range(p, p + c), range(-1, -1 - r, -1), max_length, truncation_mode)
        standard += len(cs) + len(rs)
        shared_total += segment_length(len(cs), len(rs), shared)
    return {
        "pairs": kept,
        "standard_tokens": standard,
        "prefix_shared_tokens": shared_total,
        "saved_fraction": round(1 - shared_total / standard, 4) if standard else 0.0,
    }


def _segment(example: dict[str, Any], index: int, pairs: int, width: int, max_length, truncation_mode) -> dict[str, list[int]]:
    """One pair as a packed segment; `targets` index TRL's flattened [2 * pairs, width] log-prob layout."""
    c, mc, r, mr, shared = truncated_pair(example["prompt_ids"], example["chosen_ids"], example["rejected_ids"], max_length, truncation_mode)
    a = max(shared - 1, 0)  # tokens computed once; token a-1 .. is repeated at the head of each branch
    ids = c + r[a:]
    positions = list(range(len(c))) + list(range(a, len(r)))
    branch = [0] * a + [1] * (len(c) - a) + [2] * (len(r) - a)
    labels = [IGNORE] * len(ids)
    targets = [-1] * len(ids)
    # Token j of the chosen sequence sits at j; token j >= a of the rejected one at len(c) + j - a.
    for row, seq, mask, offset in ((index, c, mc, 0), (pairs + index, r, mr, len(c) - a)):
        for j in range(a, len(seq) - 1):
            if mask[j + 1]:
                labels[offset + j] = seq[j + 1]
                targets[offset + j] = row * width + j
    return {"ids": ids, "positions": positions, "branch": branch, "labels": labels, "targets": targets}


def pack(lengths: list[int], pairs_per_row: int) -> list[list[int]]:
    """Segments (by index) into ceil(n / pairs_per_row) rows of at most pairs_per_row each, longest first into
    the shortest row, so rows come out of similar length."""
    rows: list[list[int]] = [[] for _ in range(math.ceil(len(lengths) / pairs_per_row))]
    totals = [0] * len(rows)
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        k = min((k for k in range(len(rows)) if len(rows[k]) < pairs_per_row), key=lambda k: totals[k])
        rows[k].append(i)
        totals[k] += lengths[i]
    return rows


@dataclass
class PrefixSharedCollator(DataCollatorForPreference):
    """TRL's preference batch plus the prefix-shared, packed layout (`shared_*` keys, one row per
    `pairs_per_row` pairs)."""

    pairs_per_row: int = 1

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        out = super().torch_call(examples)
        n = len(examples)
        width = out["input_ids"].shape[1] - 1
        segments = [_segment(e, i, n, width, self.max_length, self.truncation_mode) for i, e in enumerate(examples)]
        rows = pack([len(s["ids"]) for s in segments], self.pairs_per_row)
        length = max(sum(len(segments[i]["ids"]) for i in row) for row in rows)
        multiple = math.lcm(MASK_ALIGN, self.pad_to_multiple_of or 1)
        length = math.ceil(length / multiple) * multiple
        fill = {"ids": self.pad_token_id, "positions": 0, "segment": -1, "branch": -1, "labels": IGNORE, "targets": -1}
        cols: dict[str, list[list[int]]] = {k: [] for k in fill}
        for row in rows:
            line: dict[str, list[int]] = {k: [] for k in fill}
            for i in row:
                s = segments[i]
                for k in ("ids", "positions", "branch", "labels", "targets"):
                    line[k] += s[k]
                line["segment"] += [i] * len(s["ids"])
            for k, v in line.items():
                cols[k].append(v + [fill[k]] * (length - len(v)))
        names = {"ids": "shared_input_ids", "positions": "shared_position_ids", "segment": "shared_segment_ids", "branch": "shared_branch_ids", "labels": "shared_labels", "targets": "shared_targets"}
        for k, name in names.items():
            out[name] = torch.tensor(cols[k], dtype=torch.long)
        return out


def window_per_mask(config) -> dict[str | None, int | None]:
    """The masks the decoder layers expect: {None: window} for one mask, or one per layer type."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    window = getattr(text, "sliding_window", None)
    layer_types = getattr(text, "layer_types", None)
    if not layer_types:
        return {None: window}
    masks: dict[str | None, int | None] = {}
    for kind in set(layer_types):
        if kind == "full_attention":
            masks[kind] = None
        elif kind == "sliding_attention":
            masks[kind] = window
        else:
            raise ValueError(f"prefix-shared DPO does not support {kind!r} layers")
    return masks


def visible(segment: torch.Tensor, branch: torch.Tensor, position: torch.Tensor, window: int | None):
    """The attention rule as a FlexAttention mask_mod(batch, head, query, key) -> bool.

    A query sees earlier keys of its own segment that are in the prompt or in its own branch, and,
    with a sliding window, only keys fewer than `window` positions back (the transformers rule
    kv > q - window, on positions, which follow each sequence). A padding query sees only itself,
    so no softmax row is empty. The indices may be scalars (FlexAttention) or broadcasting index
    tensors (the dense mask).
    """

    def mask_mod(b, h, q, kv):
        sq, sk = segment[b, q], segment[b, kv]
        allowed = (q >= kv) & (sq == sk) & (sq >= 0) & ((branch[b, kv] == 0) | (branch[b, q] == branch[b, kv]))
        if window is not None:
            allowed = allowed & (position[b, q] - position[b, kv] < window)
        return allowed | ((sq < 0) & (q == kv))

    return mask_mod


def shared_attention_mask(segment: torch.Tensor, branch: torch.Tensor, position: torch.Tensor, window: int | None, dtype: torch.dtype) -> torch.Tensor:
    """Additive [rows, 1, T, T] mask (0 = attend, dtype min = blocked) for SDPA and eager attention."""
    rows, t = segment.shape
    idx = torch.arange(t, device=segment.device)
    allowed = visible(segment, branch, position, window)(torch.arange(rows, device=segment.device)[:, None, None], 0, idx[None, :, None], idx[None, None, :])
    mask = torch.zeros(allowed.shape, dtype=dtype, device=segment.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


def shared_block_mask(segment: torch.Tensor, branch: torch.Tensor, position: torch.Tensor, window: int | None):
    """The same rule as a FlexAttention BlockMask [rows, 1, T, T]. Built uncompiled: it evaluates
    the rule once over the whole grid, as the dense mask does, and needs no compile per shape."""
    from torch.nn.attention.flex_attention import create_block_mask

    rows, t = segment.shape
    return create_block_mask(visible(segment, branch, position, window), rows, None, t, t, device=segment.device)


def attention_blocks(segment: torch.Tensor, branch: torch.Tensor, position: torch.Tensor, config) -> tuple[int, int]:
    """Attention blocks (128 x 128) one packed batch costs, summed over the decoder layers:
    (FlexAttention: the blocks its block mask keeps; SDPA: every block of every row)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    masks = window_per_mask(config)
    kinds = getattr(text, "layer_types", None) or [None] * text.num_hidden_layers
    rows, t = segment.shape
    every = rows * math.ceil(t / 128) ** 2
    kept = {}
    for kind, window in masks.items():
        mask = shared_block_mask(segment, branch, position, window)  # partly masked blocks, then whole ones
        kept[kind] = mask.kv_num_blocks.sum().item() + (mask.full_kv_num_blocks.sum().item() if mask.full_kv_num_blocks is not None else 0)
    return int(sum(kept[kind] for kind in kinds)), every * len(kinds)


def wrap_forward(model) -> None:
    """Make `model` (already given TRL's fused LM head) understand the `shared_*` batch keys."""
    if getattr(model, "_alignpress_prefix_shared", False):
        return
    inner = model.forward

    def forward(self, *args, **kwargs):
        shared = {k: kwargs.pop(k) for k in SHARED_KEYS if k in kwargs}
        if not shared:
            return inner(*args, **kwargs)
        if args or not kwargs.get("fused_lm_head"):
            # Plain logits (TRL's deprecated return_outputs path): the standard padded rows are in the batch.
            return inner(*args, **kwargs)
        attn = self.config._attn_implementation
        if attn not in SUPPORTED_ATTENTION:
            raise ValueError(f"prefix-shared DPO needs attn_implementation sdpa, eager or flex_attention, not {attn!r}")
        input_ids = kwargs.pop("input_ids")
        kwargs.pop("attention_mask", None)
        kwargs.pop("position_ids", None)
        labels = kwargs.pop("labels")
        dtype = self.get_input_embeddings().weight.dtype
        if not dtype.is_floating_point:  # quantized embeddings
            dtype = torch.bfloat16
        layout = (shared["shared_segment_ids"], shared["shared_branch_ids"], shared["shared_position_ids"])
        if attn == "flex_attention":
            masks = {kind: shared_block_mask(*layout, window) for kind, window in window_per_mask(self.config).items()}
        else:
            masks = {kind: shared_attention_mask(*layout, window, dtype) for kind, window in window_per_mask(self.config).items()}
        out = inner(
            input_ids=shared["shared_input_ids"],
            attention_mask=masks[None] if None in masks else masks,
            position_ids=shared["shared_position_ids"],
            shift_labels=shared["shared_labels"],
            **kwargs,
        )
        # Back into TRL's layout: per-token field [2 * pairs, length - 1], zero where TRL's label is -100.
        rows, width = input_ids.shape[0], input_ids.shape[1] - 1
        targets = shared["shared_targets"]
        picked = targets >= 0
        where = targets[picked]

        def place(x):
            if x is None:
                return None
            flat = x.new_zeros(rows * width)
            return flat.index_put((where,), x[picked]).view(rows, width)

        label_mask = labels[:, 1:] != IGNORE
        log_probs = place(out.log_probs)
        return type(out)(
            loss=-log_probs.sum() / label_mask.sum().clamp(min=1),
            log_probs=log_probs,
            entropy=place(out.entropy),
            log_sum_sq_probs=place(out.log_sum_sq_probs),
            mean_logits=place(out.mean_logits),
            is_top1=place(out.is_top1),
            label_mask=label_mask,
            aux_loss=out.aux_loss,
        )

    model.forward = types.MethodType(forward, model)
    model._alignpress_prefix_shared = True


def _unpeft(model):
    """The transformers model under a PEFT wrapper (where TRL adds its fused LM head)."""
    return model.get_base_model() if is_peft_model(model) else model


class PrefixSharedDPOTrainer(StableKeyDPOTrainer):
    """TRL's DPOTrainer computing each pair in one prefix-shared segment, `pairs_per_row` pairs a row.

    Takes DPOTrainer's arguments (no data_collator: it builds its own) plus `pairs_per_row`.
    """

    def __init__(self, model, *, args, processing_class, pairs_per_row: int = 1, **kwargs):
        if kwargs.get("data_collator") is not None:
            raise ValueError("PrefixSharedDPOTrainer builds its own data collator")
        training_args, tok = args, processing_class
        if tok is None or not hasattr(tok, "pad_token_id"):
            raise ValueError("PrefixSharedDPOTrainer needs processing_class=<a tokenizer> (text models only)")
        # As DPOTrainer does when it builds its collator: pad with the configured, own or eos token.
        tok.pad_token = training_args.pad_token or tok.pad_token or tok.eos_token
        kwargs["data_collator"] = PrefixSharedCollator(
            pad_token_id=tok.pad_token_id,
            max_length=training_args.max_length,
            truncation_mode=training_args.truncation_mode,
            pad_to_multiple_of=training_args.pad_to_multiple_of,
            pairs_per_row=pairs_per_row,
        )
        super().__init__(model, args=args, processing_class=tok, **kwargs)
        _unpeft(self.model).config.get_text_config().pad_token_id = tok.pad_token_id
        self._wrap_models()

    def _wrap_models(self) -> None:
        # Also runs before TRL's precompute pass, which __init__ starts after adding the fused LM head.
        wrap_forward(_unpeft(self.model))
        if self.ref_model is not None:
            wrap_forward(_unpeft(self.accelerator.unwrap_model(self.ref_model)))

    def _precompute_ref_logps(self, dataset, name, batch_size):
        self._wrap_models()
        return super()._precompute_ref_logps(dataset, name, batch_size)
