"""The model card (model/README.md): Hub metadata plus what was done, with the run's numbers.

Metadata goes through huggingface_hub's ModelCardData so the Hub parses it as it expects.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from .modeling import built_builtin, resolve_model_path
from .recipe import DEFAULT_EVAL_FRACTION, Recipe, chat_template_file, data_sources, dump
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
    found = base_card(recipe)
    return found.data.license if found is not None else None


def base_card(recipe: Recipe) -> ModelCard | None:
    """The base model's card: its local README.md, or from the Hub when reachable; None otherwise."""
    try:
        name = recipe.model.name_or_path
        if name.startswith("builtin:"):  # its card is in its folder; a check must not build the model
            folder = built_builtin(name)
            return ModelCard.load(folder / "README.md") if folder is not None and (folder / "README.md").exists() else None
        path = Path(resolve_model_path(recipe))
        if path.is_dir():
            readme = path / "README.md"
            return ModelCard.load(readme) if readme.exists() else None
        return ModelCard.load(recipe.model.name_or_path)
    except Exception:  # noqa: BLE001 - offline or no card
        return None


LIMITATION_HEADINGS = re.compile(r"(?i)limitation|bias|risk|out-of-scope|out of scope|responsible|safety")


def inherited_limitations(text: str) -> list[str]:
    """The base card's sections about limitations, bias and risks (heading and body, headings demoted
    under ours); when it has none, its first paragraph, which says what the model is."""
    lines = text.splitlines()
    out: list[str] = []
    keep_level = None
    for line in lines:
        m = re.match(r"^(#+)\s+(.*)", line)
        if m:
            level = len(m.group(1))
            if keep_level is not None and level <= keep_level:
                keep_level = None
            if keep_level is None and LIMITATION_HEADINGS.search(m.group(2)):
                keep_level = level
                out.append(f"#### {m.group(2).strip()}")
                continue
            if keep_level is not None:
                out.append("#" * (4 + level - keep_level) + " " + m.group(2).strip())
                continue
        if keep_level is not None:
            out.append(line)
    if any(line.strip() for line in out if not line.startswith("####")):
        return out
    paragraphs = [p.strip() for p in "\n".join(l for l in lines if not l.startswith("#")).split("\n\n") if p.strip()]
    return ["> " + paragraphs[0].replace("\n", " ")] if paragraphs else []


def _read(path: Path) -> Any:
    return json.loads(path.read_text()) if path.exists() else None


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.4g}"
    if isinstance(x, list):  # a list of loss types or weights: as the recipe writes it, not Python's repr
        return ", ".join(_fmt(v) for v in x)
    return "–" if x is None else str(x)


CARD_SAMPLES = 5  # side-by-side generations shown in the card; metrics/report.md has them all


def scored_lines(evals: dict[str, Any], export: dict[str, Any], dtype: str, relation: str) -> list[str]:
    """Which weights the evaluation scored, against the merged model the card describes: with
    export.dtype bfloat16 the published weights are rounded, and the numbers came from before the merge."""
    s = evals.get("scored")
    if not s:
        return []
    if relation == "adapter" or "reload_max_abs_diff" not in export:
        return [f"Scored on {s['weights']} in {s['dtype']} ({s['device']}).", ""]
    reload = export["reload_max_abs_diff"]
    # float32 saves the merge as it is: the same logits, not "within 0" of them
    same = "equal the float32 merge's" if reload == 0 else f"are within {reload:.2g} of the float32 merge's"
    return [
        f"Scored on {s['weights']} in {s['dtype']} ({s['device']}), before the merge. This model is the merge saved in {dtype}: "
        f"on export's probe prompts its logits {same}, and the merge's are within {export['merge_max_abs_diff']:.2g} of the adapter model's.",
        "",
    ]


def loss_text(loss_type: str | list[str], weights: list[float] | None) -> str:
    """`sigmoid`, or a weighted sum as TRL computes it: `sigmoid` + `sft`, 1 x `sigmoid` + 0.5 x `sft`."""
    types_ = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    if weights is None:
        return " + ".join(f"`{t}`" for t in types_)
    return " + ".join(f"{w:g} x `{t}`" for w, t in zip(weights, types_, strict=True))


def training_result_lines(train_info: dict[str, Any]) -> list[str]:
    """The training table from run.json's stages.train, and what its numbers cover."""
    lines = ["| metric | value |", "| --- | --- |"]
    for k in ("global_step", "train_runtime_s", "hardware", "final_loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected"):
        if k in train_info:
            lines.append(f"| {k} | {_fmt(train_info[k])} |")
    if window := train_info.get("final_window_steps"):
        lines += ["", f"final_loss and rewards/*: means over the last logged window, steps {window[0]}–{window[1]}."]
    if resumed := train_info.get("resumed_from_step"):
        # A stopped or preempted run went on from its checkpoint: the same steps, but the timer restarted.
        lines += ["", f"Training resumed from the checkpoint of step {resumed} (the run had been stopped); train_runtime_s counts "
                      f"steps {resumed + 1}–{train_info.get('global_step', '?')} only."]
    return lines


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


def intended_use_lines(recipe: Recipe, relation: str) -> list[str]:
    base = recipe.model.name_or_path
    what = "A LoRA adapter for" if relation == "adapter" else "A version of"
    lines = ["## Intended use", ""]
    if base.startswith("builtin:"):
        lines.append(f"{what} alignpress's built-in toy model `{base}`, made to demonstrate and test the alignment job. "
                     "It knows a few arithmetic answer styles and nothing else: use it to try alignpress, not as an assistant.")
    else:
        lines.append(f"{what} `{base}` tuned towards the preferences in its training data (below), for the same uses as the base model: "
                     "chat and instruction following in the base model's languages, research on preference alignment, and comparison with the base. "
                     "The base model's license and use policy apply" + (f" (see its card: https://huggingface.co/{base})." if is_hub_id(base, recipe) else "."))
        lines.append("")
        lines.append("Not intended for decisions about people, for medical, legal or financial advice, or for any use without human review of its answers.")
    return lines + [""]


def limitation_lines(recipe: Recipe, evals: dict[str, Any] | None) -> list[str]:
    base = recipe.model.name_or_path
    lines = [
        "## Limitations and bias",
        "",
        f"DPO moves the model towards the chosen answers of {', '.join(f'`{s.dataset}`' for _, s in data_sources(recipe.data))}: it inherits that data's preferences, gaps and biases, "
        "as well as everything the base model learned. Alignment changes how the model answers, not what it knows; it can still state wrong "
        "facts with confidence and reproduce social biases of its training text.",
        "",
    ]
    if evals:
        measure = (f"The evaluation below uses {evals['n_pairs']} held-out pairs from the same data and does not measure factual accuracy, "
                   "safety, or behaviour outside that distribution.")
        if recipe.eval.behaviour_pattern:
            measure += f" Its behaviour score checks the form of an answer (matching `{recipe.eval.behaviour_pattern}`), not whether the answer is correct."
        lines += [measure, ""]
    found = base_card(recipe)
    inherited = inherited_limitations(found.text) if found is not None else []
    if inherited:
        lines += [f"From the base model's card (`{base}`):", "", *inherited, ""]
    elif is_hub_id(base, recipe):
        lines += [f"See the base model's card for its own limitations, biases and risks: https://huggingface.co/{base}", ""]
    return lines


def data_lines(recipe: Recipe) -> list[str]:
    """Where the pairs came from and which filters the recipe applied, one source at a time."""
    d = recipe.data
    lines = []
    for _, source in data_sources(d):
        name = source.dataset
        src = f"[{name}](https://huggingface.co/datasets/{name})" if is_hub_id(name, recipe) else f"`{name}` (a local file)"
        fraction = d.eval_fraction if d.eval_fraction is not None else DEFAULT_EVAL_FRACTION
        held = f"held out: split `{source.eval_split}`" if source.eval_split else f"held out: {fraction:g} of the rows (seeded)"
        share = f"; {source.fraction:g} of its rows" if source.fraction else (f"; at most {source.max_rows} rows" if source.max_rows else "")
        lines.append(f"- source: {src}, split `{source.split}`, format `{source.format}`; {held}{share}")
        lines.append("- filters: " + filter_text(source.filters))
    return lines


def filter_text(f) -> str:
    rules = [f"{k} >= {v:g}" for k, v in (f.min or {}).items()] + [f"{k} <= {v:g}" for k, v in (f.max or {}).items()]
    if f.max_messages:
        rules.append(f"at most {f.max_messages} messages")
    if f.max_tokens:
        rules.append(f"at most {f.max_tokens} tokens")
    rules += [text for on, text in ((f.drop_empty, "no empty prompts or answers"), (f.drop_identical, "chosen differs from rejected"),
                                    (f.drop_duplicates, "no duplicate pairs")) if on]
    return ", ".join(rules) if rules else "none"


def usage_prompt(run_dir: RunDir) -> list[dict[str, str]]:
    """The first held-out prompt (its messages up to the answer), else the first training prompt."""
    for name in ("eval.jsonl", "train.jsonl"):
        path = run_dir.data / name
        if path.exists():
            with open(path) as fh:
                first = fh.readline()
            if first.strip():
                return json.loads(first)["messages"]["prompt"]
    return [{"role": "user", "content": "Hello! What can you do?"}]


def _render_prompt(folder: Path, messages: list[dict[str, str]]) -> str | None:
    """The prompt as the model's chat template writes it (None without a tokenizer there)."""
    if not (folder / "tokenizer_config.json").exists():
        return None
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(folder))
        return tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception:  # noqa: BLE001 - the card is still useful without the rendered prompt
        log.debug("card: could not render the usage prompt with %s", folder, exc_info=True)
        return None


def local_inputs(recipe: Recipe) -> list[str]:
    """What the recipe reads from the machine it ran on (not a Hub id, not a builtin), for the card."""
    out = []
    name = recipe.model.name_or_path
    if not name.startswith("builtin:") and (Path(name).expanduser().exists() or Path(recipe.resolve_path(name)).exists()):
        out.append(f"the base model `{name}`")
    if chat_template_file(recipe) is not None:
        out.append(f"the chat template `{recipe.model.chat_template}`")
    for _, src in data_sources(recipe.data):
        if Path(src.dataset).expanduser().exists() or Path(recipe.resolve_path(src.dataset)).exists():
            out.append(f"the data `{src.dataset}`")
    return out


def shown_recipe_file(manifest: dict[str, Any]) -> str:
    """The recipe's path as the card and the commit show it: a path outside the working folder is
    the author's machine (/home/NAME/...), so only its file name."""
    path = str(manifest.get("recipe_file") or "?")
    return Path(path).name if Path(path).is_absolute() or path.startswith(("~", "..")) else path


def reproduce_lines(recipe: Recipe, manifest: dict[str, Any]) -> list[str]:
    ap = manifest.get("alignpress") or {}
    version = ap.get("version") or (manifest.get("versions") or {}).get("alignpress") or "?"
    commit = ap.get("commit")
    # The recipe names this repository: anyone else's token cannot push there, and run checks that first
    unpublish = [f"--set publish.{f}=null" for f in ("repo_id", "adapter_repo_id") if getattr(recipe.publish, f)]
    return [
        "## Reproduce",
        "",
        f"alignpress {version}" + (f", commit `{commit}`" if commit else "") + f"; recipe `{recipe.name}` "
        f"(from `{shown_recipe_file(manifest)}`, every `--set` applied). Save the recipe below as `recipe.yaml` and run:",
        "",
        "```bash",
        " ".join(["python entrypoint.py run recipe.yaml", *unpublish]),
        "```",
        "",
        *(["The `--set` keeps the result in `outputs/` instead of pushing it to this repository; give `publish.repo_id` a repository of yours "
           "to publish it.", ""] if unpublish else []),
        "The exact library versions are under Framework versions above (requirements.lock pins them for alignpress).",
        "",
        *([f"The recipe reads local files that are not in this repository: {', '.join(local)}; put them where it names them to run it.", ""]
          if (local := local_inputs(recipe)) else []),
        "### Recipe",
        "",
        "```yaml",
        dump(recipe).rstrip(),
        "```",
        "",
    ]


def metadata(recipe: Recipe, relation: str = "finetune", base: dict[str, Any] | None = None) -> ModelCardData:
    """The card's metadata block. `base`: export's record of the base model's license ({"base_license": ...}),
    so a card written again later needs no Hub lookup."""
    c = recipe.card
    license_ = c.license or (base["base_license"] if base and "base_license" in base else base_license(recipe)) or "other"
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
    tokenizer_dir: Path | None = None,
    export: dict[str, Any] | None = None,
) -> str:
    """The card as Markdown with its metadata block.

    publish renders the card again for the repo it pushes to: `repo_id` and `revision` (a branch)
    go into the usage snippet, and `data` (the exported card's metadata, adjusted for an adapter)
    replaces metadata(), so the published card never depends on a network lookup.
    `tokenizer_dir` (default model/): the tokenizer whose chat template renders the usage prompt.
    `export`: export's checks (default: as run.json records them), for the stop tokens.
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
    dropout = "dropout off (TRL's disable_dropout)" if d.disable_dropout else f"dropout={lo.dropout:g}"
    what = f"LoRA (r={lo.r}, alpha={lo.alpha:g}, {dropout}, modules {lo.target_modules})" if lo.enabled else "full fine-tuning"
    quant = " on a 4-bit NF4 base (QLoRA)" if r.model.load_in_4bit else ""
    lines += [
        "## What was done",
        "",
        f"`{r.model.name_or_path}`" + (f" (revision `{r.model.revision}`)" if r.model.revision else "")
        + f" aligned with Direct Preference Optimization (TRL `DPOTrainer`, loss {loss_text(d.loss_type, d.loss_weights)}, beta {d.beta:g}) "
        f"on {', '.join(f'`{s.dataset}`' for _, s in data_sources(r.data))} ({stats.get('format', '?')} format), with {what}{quant}."
        + (" The adapter was merged into the base weights." if lo.enabled and relation != "adapter" else ""),
        f"Built with alignpress recipe `{r.name}`, run `{manifest.get('run_id', '?')}`.",
        "",
        *intended_use_lines(recipe, relation),
        *limitation_lines(recipe, evals),
        "## Hyperparameters",
        "",
        "| setting | value |",
        "| --- | --- |",
    ]
    for k, v in [
        ("beta", d.beta), ("loss_type", d.loss_type), *([("loss_weights", d.loss_weights)] if d.loss_weights else []),
        ("max_length", d.max_length), ("learning_rate", t.learning_rate),
        ("lr_scheduler_type", t.lr_scheduler_type), ("warmup_steps", t.warmup_steps), ("num_train_epochs", t.num_train_epochs),
        ("max_steps", t.max_steps), ("per_device_train_batch_size", t.per_device_train_batch_size),
        ("gradient_accumulation_steps", t.gradient_accumulation_steps), ("optim", t.optim), ("seed", t.seed),
    ]:
        lines.append(f"| {k} | {_fmt(v)} |")
    if processes := train_info.get("world_size"):
        # Several GPUs: each optimizer step took their pairs together (the same rate, more pairs).
        lines.append(f"| training processes | {processes} |")
        lines.append(f"| pairs per optimizer step | {processes * t.per_device_train_batch_size * t.gradient_accumulation_steps} |")

    lines += ["", "## Training data", ""]
    lines += data_lines(recipe)
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
    url = (manifest.get("tracking") or {}).get("url")
    if url:  # only a public address (alignpress.tracking.public_url); local event files are not linked
        lines += [f"Training run, with its loss curves: [{url}]({url})", ""]
    lines += training_result_lines(train_info)

    stops = export if export is not None else manifest.get("stages", {}).get("export", {})
    lines += ["", "## Evaluation (held-out pairs)", ""]
    if evals:
        lines += evaluation_lines(evals)
        lines += scored_lines(evals, stops, recipe.export.dtype, relation)
    else:
        lines.append("Not evaluated.")
    lines += plot_lines(run_dir, relation)

    added = stops.get("eos_added")
    generate_args = f"max_new_tokens={recipe.eval.max_new_tokens}"
    if added and relation == "adapter":  # the base's own generation config is loaded: name the stops
        generate_args += f", eos_token_id={stops['eos_token_id']}"
    prompt = usage_prompt(run_dir)
    rendered = _render_prompt(tokenizer_dir or run_dir.model, prompt)
    if relation == "adapter" and not is_hub_id(recipe.model.name_or_path, recipe):
        # The adapter names no base it can load (the base was a folder on the machine that trained it)
        load = ["from peft import PeftModel", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                f'tok = AutoTokenizer.from_pretrained("{repo}"{rev})',
                f"base = AutoModelForCausalLM.from_pretrained(BASE)  # the base model `{recipe.model.name_or_path}`: not on the Hub",
                f'model = PeftModel.from_pretrained(base, "{repo}"{rev})']
    else:
        load = ["from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                f'tok = AutoTokenizer.from_pretrained("{repo}"{rev})',
                f'model = AutoModelForCausalLM.from_pretrained("{repo}"{rev})']
    lines += [
        "",
        "## Usage",
        "",
        "```python",
        *load,
        f"messages = {json.dumps(prompt, ensure_ascii=False)}",
        "inputs = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\", return_dict=True)",
        f"out = model.generate(**inputs, {generate_args})",
        'print(tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))',
        "```",
        "",
    ]
    if added:
        base_ids = stops["base_eos_token_id"]
        where = "`eos_token_id` in `generate` adds it" if relation == "adapter" else \
            f"export added it to this model's `generation_config.json` (`eos_token_id` {stops['eos_token_id']})"
        lines += [f"Generation stops at `{added}`, the token the chat template ends each answer with: {where}. "
                  f"The base model's generation config stops only at `eos_token_id` {base_ids}.", ""]
    if rendered:
        lines += ["The prompt is the first one of the held-out split; the model's chat template turns it into:", "", "```text", rendered, "```", ""]
    lines += ["## Framework versions", ""]
    lines += [f"- {k}: {v}" for k, v in versions.items() if v]
    lines += ["", *reproduce_lines(recipe, manifest), "## Citations", "", CITATIONS, ""]
    # Built as text, not through a Jinja template: a recipe's chat template may contain '{{'.
    content = f"---\n{(data or metadata(recipe, relation)).to_yaml()}\n---\n\n" + "\n".join(lines)
    return str(ModelCard(content))


def write_adapter_card(recipe: Recipe, run_dir: RunDir, base: dict[str, Any] | None = None) -> None:
    """adapter/README.md: the card as a PEFT adapter's (library_name peft, base_model for a Hub base),
    in place of the empty template PEFT's save_pretrained writes."""
    from .publish import adapter_card_data

    if not (run_dir.adapter / "adapter_config.json").exists():
        return
    text = render_model_card(recipe, run_dir, "adapter", data=adapter_card_data(metadata(recipe, base=base)), tokenizer_dir=run_dir.adapter, export=base)
    tmp = run_dir.adapter / ".README.md.tmp"
    tmp.write_text(text)
    tmp.replace(run_dir.adapter / "README.md")


def write_again(recipe: Recipe, run_dir: RunDir) -> None:
    """The exported cards (model/README.md, adapter/README.md) written again from the recipe, for a
    change that reaches only the card (`card`, `description`, the publish gate): the merged weights
    stay, and the merge (minutes and a base model in memory) is not redone."""
    base = run_dir.load().get("stages", {}).get("export", {})
    text = render_model_card(recipe, run_dir, data=metadata(recipe, base=base), export=base)
    tmp = run_dir.model / ".README.md.tmp"
    tmp.write_text(text)
    tmp.replace(run_dir.model / "README.md")
    if recipe.lora.enabled:
        write_adapter_card(recipe, run_dir, base=base)
    log.info("recipe card or gate changed: %s written again (the merged model stays)", run_dir.model / "README.md")
