"""The model card (model/README.md): Hub metadata plus what was done, with the run's numbers.

Metadata goes through huggingface_hub's ModelCardData so the Hub parses it as it expects.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from .modeling import resolve_model_path
from .recipe import Recipe, data_sources, dump
from .runstate import RunDir

log = logging.getLogger("alignpress")

CITATIONS = """```bibtex
@inproceedings{rafailov2023direct,
  title     = {Direct Preference Optimization: Your Language Model is Secretly a Reward Model},
  author    = {Rafailov, Rafael and Sharma, Archit and Mitchell, Eric and Ermon, Stefano and Manning, Christopher D. and Finn, Chelsea},
  booktitle = {Advances in Neural Information Processing Systems},
  year      = {2023}
}
@misc{vonwerra2020trl,
  title        = {TRL: Transformer Reinforcement Learning},
  author       = {von Werra, Leandro and others},
  howpublished = {\\url{https://github.com/huggingface/trl}},
  year         = {2020}
}
```"""


def is_hub_id(name: str, recipe: Recipe | None = None) -> bool:
    """namespace/name that is not a local path (relative paths are resolved against the recipe too)."""
    if name.startswith(("builtin:", ".", "/", "~")) or name.count("/") != 1 or Path(name).exists():
        return False
    if recipe is not None and Path(recipe.resolve_path(name)).exists():
        return False
    return Path(name).suffix.lower() not in (".jsonl", ".json", ".parquet", ".csv")


def base_license(recipe: Recipe) -> str | None:
    """The base model's card license: from its local README.md, or from the Hub when reachable."""
    try:
        path = Path(resolve_model_path(recipe))
        if path.is_dir():
            readme = path / "README.md"
            return ModelCard.load(readme).data.license if readme.exists() else None
        return ModelCard.load(recipe.model.name_or_path).data.license
    except Exception:  # noqa: BLE001 - offline or no card: the recipe must say
        return None


def _read(path: Path) -> Any:
    return json.loads(path.read_text()) if path.exists() else None


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.4g}"
    return "–" if x is None else str(x)


CARD_SAMPLES = 5  # side-by-side generations shown in the card; metrics/report.md has them all


def evaluation_lines(evals: dict[str, Any]) -> list[str]:
    """The card's evaluation section from metrics/eval.json: before/after numbers, judge, gate, samples."""
    from .evaluate import _cell, number_rows

    aligned = evals["aligned"]
    lines = [
        f"{evals['n_pairs']} held-out pairs, {evals['n_generations']} greedy generations; behaviour = {evals['behaviour_measure']}. "
        "Base = the model before alignment (DPO's reference); implicit reward = beta * (log pi - log pi_ref).",
        "",
        "| metric | base | aligned | better | meaning |",
        "| --- | --- | --- | --- | --- |",
        *number_rows(evals),
        "",
    ]
    if aligned.get("kl_estimate") is not None:
        lines += [f"KL estimate: {evals.get('kl_method', 'see alignpress.evaluate')}.", ""]
    j = evals.get("judge")
    if j:
        lines += [
            f"Judge `{j['model']}` (a reward model) on {j['n']} prompts: aligned wins {j['wins']}, ties {j['ties']}, loses {j['losses']}; "
            f"win rate **{_fmt(j['win_rate'])}** (95% CI {_fmt(j['ci95'][0])}–{_fmt(j['ci95'][1])}).",
            "",
        ]
    g = evals.get("gate")
    if g:
        if g["passed"]:
            lines += [f"Publish gate passed: preference accuracy gain {_fmt(g['preference_accuracy_gain'])} (minimum {_fmt(g['min_gain'])}), "
                      f"KL estimate {_fmt(g['kl_estimate'])} (limit {_fmt(g['max_kl'])}).", ""]
        else:
            lines += ["Publish gate failed: " + "; ".join(r["reason"] for r in g["reasons"]) + ".", ""]
    else:
        lines += ["No publish gate was set (eval.gate_min_gain, eval.gate_max_kl): nothing checked that this model improved on the base before it was published.", ""]
    shown = [s for s in evals.get("samples", [])[:CARD_SAMPLES]] + list(evals.get("prompt_samples") or [])
    if shown:
        lines += ["### Side-by-side greedy generations", "", "| prompt | base | aligned |", "| --- | --- | --- |"]
        lines += [f"| {_cell(s['prompt'])} | {_cell(s['base'])} | {_cell(s['aligned'])} |" for s in shown]
        lines.append("")
    return lines


def plot_lines(run_dir: RunDir, relation: str) -> list[str]:
    """Images for the plots the run made; export copies them next to the card (top level of model/, which
    publish uploads). The adapter's repo gets no PNGs, so its card links none."""
    from .plots import BEFORE_AFTER, TRAIN_CURVES, folder

    if relation == "adapter":
        return []
    found = [(alt, name) for alt, name in (("training curves", TRAIN_CURVES), ("base vs aligned on held-out data", BEFORE_AFTER))
             if (folder(run_dir) / name).exists()]
    if not found:
        return []
    lines = ["", "### Plots", ""]
    for alt, name in found:
        lines += [f"![{alt}]({name})", ""]
    return lines


def metadata(recipe: Recipe, relation: str = "finetune") -> ModelCardData:
    c = recipe.card
    license_ = c.license or base_license(recipe) or "other"
    tags = list(dict.fromkeys(["dpo", "trl", "alignpress", *(["lora"] if recipe.lora.enabled else []), *c.tags]))
    data: dict[str, Any] = {
        "license": license_,
        "library_name": "peft" if relation == "adapter" else "transformers",
        "pipeline_tag": "text-generation",
        "tags": tags,
    }
    if is_hub_id(recipe.model.name_or_path, recipe):
        data["base_model"] = recipe.model.name_or_path
        data["base_model_relation"] = relation
    hub_data = [s.dataset for _, s in data_sources(recipe.data) if is_hub_id(s.dataset, recipe)]
    if hub_data:
        data["datasets"] = list(dict.fromkeys(hub_data))
    if c.language:
        data["language"] = c.language
    return ModelCardData(**data)


def render_model_card(
    recipe: Recipe,
    run_dir: RunDir,
    relation: str = "finetune",
    *,
    data: ModelCardData | None = None,
    repo_id: str | None = None,
    revision: str | None = None,
) -> str:
    """The card as Markdown with its metadata block.

    publish renders the card again for the repo it pushes to: `repo_id` and `revision` (a branch)
    go into the usage snippet, and `data` (the exported card's metadata, adjusted for an adapter)
    replaces metadata(), so the published card never depends on a network lookup.
    """
    stats = _read(run_dir.data / "stats.json") or {}
    evals = _read(run_dir.metrics / "eval.json")
    manifest = run_dir.load()
    versions = manifest.get("versions", {})
    train_info = manifest.get("stages", {}).get("train", {})
    repo = repo_id or recipe.publish.repo_id or f"<namespace>/{recipe.name}"
    rev = f', revision="{revision}"' if revision and revision != "main" else ""
    r, d, t, lo = recipe, recipe.dpo, recipe.train, recipe.lora

    lines = [f"# {recipe.name}", ""]
    if recipe.card.description or recipe.description:
        lines += [recipe.card.description or recipe.description or "", ""]
    what = f"LoRA (r={lo.r}, alpha={lo.alpha:g}, dropout={lo.dropout:g}, modules {lo.target_modules})" if lo.enabled else "full fine-tuning"
    quant = " on a 4-bit NF4 base (QLoRA)" if r.model.load_in_4bit else ""
    lines += [
        "## What was done",
        "",
        f"`{r.model.name_or_path}`" + (f" (revision `{r.model.revision}`)" if r.model.revision else "")
        + f" aligned with Direct Preference Optimization (TRL `DPOTrainer`, loss `{d.loss_type}`, beta {d.beta:g}) "
        f"on {', '.join(f'`{s.dataset}`' for _, s in data_sources(r.data))} ({stats.get('format', '?')} format), with {what}{quant}."
        + (" The adapter was merged into the base weights." if lo.enabled and relation != "adapter" else ""),
        f"Built with alignpress recipe `{r.name}`, run `{manifest.get('run_id', '?')}`.",
        "",
        "## Hyperparameters",
        "",
        "| setting | value |",
        "| --- | --- |",
    ]
    for k, v in [
        ("beta", d.beta), ("loss_type", d.loss_type), ("max_length", d.max_length), ("learning_rate", t.learning_rate),
        ("lr_scheduler_type", t.lr_scheduler_type), ("warmup_steps", t.warmup_steps), ("num_train_epochs", t.num_train_epochs),
        ("max_steps", t.max_steps), ("per_device_train_batch_size", t.per_device_train_batch_size),
        ("gradient_accumulation_steps", t.gradient_accumulation_steps), ("optim", t.optim), ("seed", t.seed),
    ]:
        lines.append(f"| {k} | {_fmt(v)} |")

    lines += ["", "## Data", ""]
    for split, info in (stats.get("splits") or {}).items():
        removed = ", ".join(f"{f['filter']}: {f['removed']}" for f in info["filters"] if f["removed"]) or "none"
        lines.append(f"- {split}: {info['loaded']} rows loaded, {info['kept']} kept (removed — {removed})")
    tokens = (stats.get("tokens") or {}).get("train") or {}
    if tokens.get("pairs"):
        lines.append(
            f"- training tokens: prompt median {_fmt(tokens['prompt']['median'])}, chosen median {_fmt(tokens['chosen']['median'])}, "
            f"rejected median {_fmt(tokens['rejected']['median'])}; {tokens['tokens_per_epoch']} tokens per epoch"
        )

    lines += ["", "## Training results", ""]
    lines.append("| metric | value |")
    lines.append("| --- | --- |")
    for k in ("global_step", "train_runtime_s", "final_loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected"):
        if k in train_info:
            lines.append(f"| {k} | {_fmt(train_info[k])} |")

    lines += ["", "## Evaluation (held-out pairs)", ""]
    if evals:
        lines += evaluation_lines(evals)
    else:
        lines.append("Not evaluated.")
    lines += plot_lines(run_dir, relation)

    lines += [
        "",
        "## Usage",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'tok = AutoTokenizer.from_pretrained("{repo}"{rev})',
        f'model = AutoModelForCausalLM.from_pretrained("{repo}"{rev})',
        'messages = [{"role": "user", "content": "What is 7 plus 5?"}]',
        "inputs = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\", return_dict=True)",
        "out = model.generate(**inputs, max_new_tokens=64)",
        'print(tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))',
        "```",
        "",
        "## Framework versions",
        "",
    ]
    lines += [f"- {k}: {v}" for k, v in versions.items() if v]
    lines += ["", "## Recipe", "", "```yaml", dump(recipe).rstrip(), "```", "", "## Citations", "", CITATIONS, ""]
    # Built as text, not through a Jinja template: a recipe's chat template may contain '{{'.
    content = f"---\n{(data or metadata(recipe, relation)).to_yaml()}\n---\n\n" + "\n".join(lines)
    return str(ModelCard(content))
