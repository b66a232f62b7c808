"""Stage 4, export: merge the adapter into the base, save a standalone model, and check it.

Reads: the base model, adapter/ (or full/), metrics and data stats for the card.
Writes: model/ — safetensors weights, config, generation config, tokenizer with its chat
template, and README.md (the model card).

Checks, each an error when it fails:
- the merged model's logits equal the adapter model's on probe inputs (within
  export.check_tolerance, computed in float32);
- they differ from the base model's (a merge that changed nothing is an error);
- the saved folder loads with AutoModelForCausalLM/AutoTokenizer, gives the same logits
  (within the saved dtype's rounding) and generates through the chat template.

The saved generation config stops at the chat template's end-of-turn token too (export.stop_at_turn_end):
gemma-2b-it's stops only at <eos>, so its answers ran on past <end_of_turn> in a user's `generate`.

Memory: the merge holds the model in float32 (4 bytes a weight), in host memory first (from_pretrained
loads there) and then on the GPU. The job checks the host's at the door (alignpress.hostmemory),
and export merges on the CPU when the GPU has no room for the float32 model (export_device), or
when the GPU runs out of memory after all: slower, the same result.
"""

from __future__ import annotations

import gc
import logging
from typing import Any

import torch

from . import card, plots
from .disk import size_text
from .errors import StageFailed, cuda_oom_numbers
from .evaluate import generate
from .modeling import eos_ids, load_model, load_tokenizer, pick_device, resolve_model_path, turn_end_id
from .prepare import read_jsonl
from .recipe import Recipe
from .runstate import RunDir

log = logging.getLogger("alignpress")

# Max abs logit difference expected from rounding float32 weights to each saved dtype, for the reload check.
RELOAD_TOLERANCE = {"float32": 1e-4, "bfloat16": 0.5, "float16": 0.05}
# The probe's rows are cut to this many tokens: the merge check needs every layer's output, not
# long rows, and each logits tensor kept is rows x tokens x vocabulary floats (Gemma: 256k a token).
PROBE_TOKENS = 128


def export_device(device: str, params: int, probe_rows: int, probe_tokens: int, vocab: int, free: int | None) -> tuple[str, str | None]:
    """Where the merge runs: the recipe's device, unless it is a GPU without room (`free` bytes) for
    the float32 model and the probe's logits (two of them at once, 4 bytes a float, plus 1 GiB for
    the forward's own work): then the CPU, slower but not short of memory (the door checked it).
    The line says which and why, with the numbers."""
    if device != "cuda" or free is None:
        return device, None
    weights = 4 * params
    need = weights + 2 * probe_rows * probe_tokens * vocab * 4 + 2**30
    if need <= free:
        return "cuda", f"export merges on the GPU: the float32 model and its probe need about {size_text(need)}, {size_text(free)} free"
    return "cpu", (f"export merges on the CPU: the float32 model ({size_text(weights)}) and its probe need about {size_text(need)} "
                   f"of GPU memory and the GPU has {size_text(free)} free; slower, the same result")


def gpu_free_bytes() -> int:
    """Free GPU memory, counting what torch's allocator holds unused (training's, reusable here)."""
    return torch.cuda.mem_get_info()[0] + torch.cuda.memory_reserved() - torch.cuda.memory_allocated()


def probe_batch(tok, rows: list[dict], n: int = 4):
    seqs = [tok.apply_chat_template(r["messages"]["prompt"] + r["messages"]["chosen"], tokenize=True, return_dict=True)["input_ids"][:PROBE_TOKENS]
            for r in rows[:n]]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), tok.pad_token_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        attn[i, : len(s)] = 1
    return ids, attn


@torch.no_grad()
def logits(model, ids, attn):
    device = next(model.parameters()).device
    out = model(input_ids=ids.to(device), attention_mask=attn.to(device)).logits.float()
    return (out * attn.to(device).unsqueeze(-1)).cpu()  # ignore padded positions; kept on the host, off the GPU's budget


def generation_stops(recipe: Recipe, model, tok) -> dict[str, Any]:
    """Adds the template's end-of-turn token to the model's generation config when it stops without it
    (export.stop_at_turn_end). Returns the ids before and after, and the token added (or None), for the card."""
    base = eos_ids(model.generation_config) or [tok.eos_token_id]
    end = turn_end_id(tok)
    if not recipe.export.stop_at_turn_end or end is None or end in base:
        return {"base_eos_token_id": base, "eos_token_id": base, "eos_added": None}
    model.generation_config.eos_token_id = [*base, end]
    added = tok.convert_ids_to_tokens(end)
    log.info("generation config: eos_token_id %s -> %s (the chat template ends each answer with %s; export.stop_at_turn_end)", base, [*base, end], added)
    return {"base_eos_token_id": base, "eos_token_id": [*base, end], "eos_added": added}


def run(recipe: Recipe, run_dir: RunDir) -> dict[str, Any]:
    base_path = resolve_model_path(recipe)
    tok = load_tokenizer(recipe, base_path)
    rows = read_jsonl(run_dir.data / "eval.jsonl") or read_jsonl(run_dir.data / "train.jsonl")
    ids, attn = probe_batch(tok, rows)
    device = pick_device(recipe)
    if device == "cuda":
        from .checks import model_sizes

        device, line = export_device(device, model_sizes(recipe).params, *ids.shape, len(tok), gpu_free_bytes())
        log.info("%s", line)
    if device == "cuda":
        numbers = None
        try:
            return merge_and_save(recipe, run_dir, tok, base_path, rows, ids, attn, "cuda")
        except torch.OutOfMemoryError as e:
            numbers = cuda_oom_numbers(str(e)) or "torch gave no numbers"
        # Out of the except block: its traceback held the GPU tensors of the failed attempt.
        gc.collect()
        torch.cuda.empty_cache()
        log.warning("CUDA out of memory in the export stage (%s): merging on the CPU instead (slower, the same result)", numbers)
        device = "cpu"
    return merge_and_save(recipe, run_dir, tok, base_path, rows, ids, attn, device)


def merge_and_save(recipe: Recipe, run_dir: RunDir, tok, base_path: str, rows: list[dict], ids, attn, device: str) -> dict[str, Any]:
    """The merge, its checks, the saved folder and its cards, on `device`."""
    # Merge in float32 from an unquantized base: merging into 4-bit weights would round the adapter away.
    base = load_model(recipe, base_path, device=device, dtype=torch.float32, tokenizer=tok).eval()
    base_logits = logits(base, ids, attn)
    if recipe.lora.enabled:
        from peft import PeftModel

        model = PeftModel.from_pretrained(base, str(run_dir.adapter)).eval()
        adapter_logits = logits(model, ids, attn)
        merged = model.merge_and_unload()
    else:
        merged = model = load_model(recipe, str(run_dir.full), device=device, dtype=torch.float32, tokenizer=tok).eval()
        adapter_logits = logits(merged, ids, attn)
    merged_logits = logits(merged, ids, attn)

    merge_error = (merged_logits - adapter_logits).abs().max().item()
    change = (merged_logits - base_logits).abs().max().item()
    checks = {"device": device, "merge_max_abs_diff": merge_error, "change_from_base_max_abs_diff": change}
    log.info("export checks: merged vs adapter %.2e (tolerance %.0e), merged vs base %.3e", merge_error, recipe.export.check_tolerance, change)
    if merge_error > recipe.export.check_tolerance:
        raise StageFailed(f"merged model's logits differ from the adapter model's by {merge_error:.3g} (> export.check_tolerance {recipe.export.check_tolerance:g})")
    if change <= 1e-6:
        raise StageFailed("the merged model gives the same logits as the base model: training or the merge changed nothing")

    checks.update(generation_stops(recipe, merged, tok))
    dtype = getattr(torch, recipe.export.dtype)
    merged = merged.to(dtype)
    tmp = run_dir.partial(run_dir.model)
    merged.save_pretrained(str(tmp), safe_serialization=True)
    tok.save_pretrained(str(tmp))
    plots.copy_into(run_dir, tmp)  # train_curves.png, eval_before_after.png: the card links them
    # The merged weights go before the reload: base, the PEFT wrapper and merged are one model, and
    # one still held would keep a second copy beside the reloaded float32 one (host memory first:
    # from_pretrained loads there).
    del base, merged, model
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()

    # Reload the folder exactly as a user would.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp), dtype=torch.float32).to(device).eval()
    reloaded_tok = AutoTokenizer.from_pretrained(str(tmp))
    reload_diff = (logits(reloaded, ids, attn) - merged_logits).abs().max().item()
    checks["reload_max_abs_diff"] = reload_diff
    if reload_diff > RELOAD_TOLERANCE[recipe.export.dtype]:
        raise StageFailed(f"the saved model's logits differ from the merged model's by {reload_diff:.3g} after reload")
    sample = generate(reloaded, reloaded_tok, [rows[0]["messages"]["prompt"]], max_new_tokens=min(recipe.eval.max_new_tokens, 32), batch_size=1)[0]
    if not sample:
        raise StageFailed("the saved model generated an empty answer through its chat template")
    checks["sample_generation"] = sample
    # The cards last, with every check's number. The base card's license is looked up once: a card
    # written again later (card.write_again) reuses it.
    checks["base_license"] = card.base_license(recipe)
    (tmp / "README.md").write_text(card.render_model_card(recipe, run_dir, data=card.metadata(recipe, base=checks), tokenizer_dir=tmp, export=checks))
    if recipe.lora.enabled:
        card.write_adapter_card(recipe, run_dir, base=checks)  # replaces PEFT's empty template, now that the numbers exist
    run_dir.commit(tmp, run_dir.model)
    log.info("exported %s (%s); sample answer: %r", run_dir.model, recipe.export.dtype, sample)
    return checks
