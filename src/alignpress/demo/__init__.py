"""Models alignpress builds itself, named `builtin:NAME` in a recipe.

`tiny-phi3-arithmetic`: a Phi-3-architecture model (hidden 128, 4 layers) with Phi-3's chat
format, supervised on arithmetic answers in both demo styles (35% confident, 65% hedging). It can
produce either style and greedily prefers hedging, which is what an instruct model looks like
before preference tuning: DPO from random weights raises rewards/accuracies without changing
what the model says (measured, see shared/reference/workplace.md).

The build is deterministic (seeded) and cached under $ALIGNPRESS_HOME/models/<name>-v<version>.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import time
from pathlib import Path

import torch

from . import data as demo_data

log = logging.getLogger("alignpress")

VERSION = 1
BUILTINS = ("tiny-phi3-arithmetic",)


STALE_BUILD_S = 3600  # a build takes minutes; a partial folder untouched this long was left by a killed one


def remove_stale_builds(final: Path) -> None:
    """Removes the `.partial-PID` folders of builds that were killed (SIGTERM, SIGKILL). Their age, not
    their PID, says so: a cache shared between containers sees other PID namespaces."""
    for old in final.parent.glob(f"{final.name}.partial-*"):
        try:
            if time.time() - old.stat().st_mtime > STALE_BUILD_S:
                shutil.rmtree(old)
                log.info("removed %s, left by a build that did not finish", old)
        except FileNotFoundError:  # another process removed it first
            continue


def build_builtin_model(name: str, root: Path) -> Path:
    if name not in BUILTINS:
        from ..errors import AlignpressError

        raise AlignpressError(f"unknown builtin model {name!r}; known: {', '.join(BUILTINS)}", field="model.name_or_path")
    final = Path(root) / f"{name}-v{VERSION}"
    remove_stale_builds(final)
    if (final / "config.json").exists() and (final / ".complete").exists():
        return final
    tmp = final.with_name(f"{final.name}.partial-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    started = time.time()
    log.info("building %s (first use; cached in %s)", name, final)
    build_tiny_phi3_arithmetic(tmp)
    (tmp / ".complete").write_text(f"{time.time() - started:.1f}s\n")
    if final.exists():  # another process finished first
        shutil.rmtree(tmp)
    else:
        os.replace(tmp, final)
    log.info("built %s in %.1f s", name, time.time() - started)
    return final


def sft_texts(n: int, seed: int, confident_share: float) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        q, op, a, b = demo_data.question(rng)
        answer = demo_data.confident(op, a, b) if rng.random() < confident_share else demo_data.hedging(rng, op, a, b)
        out.append((q, answer))
    return out


def build_tiny_phi3_arithmetic(out: Path, steps: int = 250, seed: int = 0) -> None:
    from transformers import GenerationConfig, Phi3Config, Phi3ForCausalLM

    from ..tiny import phi3_tokenizer

    torch.manual_seed(seed)
    pairs = sft_texts(4000, seed=seed + 1, confident_share=0.35)
    corpus = [q + " " + a for q, a in pairs] + [demo_data.confident(op, a, b) for op in demo_data.OPS for a in range(13) for b in range(13)]
    tok = phi3_tokenizer(corpus, vocab_size=512)
    config = Phi3Config(
        vocab_size=len(tok),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = Phi3ForCausalLM(config)

    # Supervised warm-up on whole rendered conversations (the template adds the end tokens).
    seqs = [tok.apply_chat_template([{"role": "user", "content": q}, {"role": "assistant", "content": a}], tokenize=True, return_dict=True)["input_ids"] for q, a in pairs]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(seed)
    model.train()
    batch = 32
    for step in range(steps):
        idx = torch.randint(len(seqs), (batch,), generator=g).tolist()
        width = max(len(seqs[i]) for i in idx)
        ids = torch.full((batch, width), tok.pad_token_id)
        labels = torch.full((batch, width), -100)
        mask = torch.zeros((batch, width), dtype=torch.long)
        for r, i in enumerate(idx):
            s = torch.tensor(seqs[i])
            ids[r, : len(s)] = s
            labels[r, : len(s)] = s
            mask[r, : len(s)] = 1
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == steps - 1:
            log.info("  base warm-up step %d/%d loss %.3f", step + 1, steps, loss.item())
    model.eval()
    # Phi-3 stops on <|end|> as well as on the eos token.
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id,
        eos_token_id=[tok.convert_tokens_to_ids("<|end|>"), tok.eos_token_id],
        pad_token_id=tok.pad_token_id,
        do_sample=False,
    )
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    (out / "README.md").write_text(
        "---\nlicense: mit\nlanguage:\n- en\npipeline_tag: text-generation\ntags:\n- alignpress-demo\n---\n\n"
        "# tiny-phi3-arithmetic\n\nA 4-layer Phi-3-architecture model built by alignpress for its offline demo: "
        "supervised on arithmetic answers in a confident and a hedging style. Not useful for anything else.\n"
    )
    (out / "build.json").write_text(json.dumps({"name": "tiny-phi3-arithmetic", "version": VERSION, "steps": steps, "seed": seed, "final_loss": round(loss.item(), 4)}, indent=2))
