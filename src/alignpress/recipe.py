"""The recipe: a YAML file that says everything about one alignment run.

Every section is a dataclass; every field documents its meaning, unit and default in its
`help`. Loading checks unknown keys (with a suggestion), types and ranges, then the rules that
tie fields together. Errors name the file (or the `--set` flag) and the dotted field.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from . import yamlfile
from .errors import AlignpressError, holds_token
from .hubnames import REPO_PART, check_repo_id


def _f(default: Any = dataclasses.MISSING, help: str = "", metadata_default: str | None = None, **kw: Any) -> Any:
    """A dataclass field with its documentation attached (metadata_default: how a field without a
    dataclass default is filled in, for `schema`)."""
    meta = {"help": help, **({"default": metadata_default} if metadata_default else {})}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


DATA_FORMATS = ("auto", "capybara", "conversational", "standard", "implicit", "hh", "system_question")


@dataclass
class ModelSection:
    name_or_path: str = _f(help="Base model: a Hub id (org/name), a local folder, or builtin:NAME for the models alignpress builds (demo).")
    revision: str | None = _f(None, help="Hub revision (branch, tag or commit) to load; recorded in run.json.")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = _f("auto", help="Training dtype. auto = bfloat16 on a GPU that supports it, float32 on the CPU.")
    load_in_4bit: bool = _f(False, help="QLoRA: load the base in 4-bit NF4 (bitsandbytes, CUDA only). Export reloads the base unquantized.")
    attn_implementation: str | None = _f(None, help="transformers attention backend (eager, sdpa, flash_attention_2, flex_attention); None = library default (sdpa). flex_attention trains on CUDA only (torch has no FlexAttention backward on the CPU); with dpo.prefix_sharing it skips the attention blocks the mask hides.")
    trust_remote_code: bool = _f(False, help="Allow model code from the Hub repo. Off unless you trust the repo.")
    chat_template: str | None = _f(None, help="Chat template to use instead of the tokenizer's own: Jinja text, or a template file (.jinja) relative to the recipe.")


@dataclass
class FilterSection:
    min: dict[str, float] = _f({}, help="Keep rows whose column >= value, e.g. {rating_chosen: 4.5}.")
    max: dict[str, float] = _f({}, help="Keep rows whose column <= value, e.g. {rating_rejected: 2.5}.")
    max_messages: int | None = _f(None, help="Keep rows whose chosen conversation (prompt + answer) has at most this many messages.")
    max_tokens: int | None = _f(None, help="Keep rows whose prompt + longer answer is at most this many tokens after the chat template. None = dpo.max_length, so TRL never cuts a pair; a larger cap needs dpo.max_truncated_fraction.")
    drop_empty: bool = _f(True, help="Drop rows with an empty chosen or rejected answer, or an empty last prompt turn (the one answered).")
    drop_identical: bool = _f(True, help="Drop rows whose chosen and rejected answers are the same text.")
    drop_duplicates: bool = _f(True, help="Drop repeated (prompt, chosen, rejected) triples, keeping the first.")


# The columns a layout reads; data.datasets[].columns maps these names to a source's own columns.
DATA_COLUMNS = ("prompt", "chosen", "rejected", "system", "question")
DEFAULT_EVAL_FRACTION = 0.1  # held out from a source with no eval_split when data.eval_fraction is null


@dataclass
class SourceSection:
    """One entry of data.datasets. Unset fields (null) take the value of the same field in `data`."""

    dataset: str = _f(help="Hub dataset id, or a local .jsonl/.json/.parquet/.csv file or folder (relative to the recipe file).")
    split: str | None = _f(None, help="Split (with slice) to train on; null = data.split.")
    eval_split: str | None = _f(None, help="Split (with slice) held out for evaluation; null = data.eval_split; when neither is set, data.eval_fraction of this source's filtered rows is held out.")
    config_name: str | None = _f(None, help="Hub dataset configuration name.")
    format: str | None = _f(None, help="Preference layout of this source; null = data.format.")
    columns: dict[str, str] = _f({}, help=f"Column mapping for layouts not in the format table: {{layout column: this source's column}}, layout columns being {', '.join(DATA_COLUMNS)}. E.g. {{prompt: question, chosen: good, rejected: bad}}.")
    filters: FilterSection | None = _f(None, help="Row filters for this source; null = data.filters. When given they replace data.filters for this source (unset fields take their defaults).")
    fraction: float | None = _f(None, help="Use this fraction, in (0, 1], of this source's filtered training rows (seeded sample); exclusive with max_rows.")
    max_rows: int | None = _f(None, help="Use at most this many of this source's filtered training rows (seeded sample); exclusive with fraction.")


@dataclass
class DataSection:
    dataset: str | None = _f(None, help="Hub dataset id, or a local .jsonl/.json/.parquet/.csv file (relative paths are relative to the recipe file). Exclusive with data.datasets; one of the two is required.")
    datasets: list[SourceSection] = _f([], help="Several sources mixed into one training set, each with the fields data.datasets[].*; exclusive with data.dataset.")
    split: str = _f("train", help="Split to train on, with optional slice: train, train[300:2500], train[:90%].")
    eval_split: str | None = _f(None, help="Split (with slice) held out for evaluation, e.g. train[:300]. Exclusive with eval_fraction.")
    eval_fraction: float | None = _f(None, help=f"Fraction of the filtered training rows held out for evaluation (seeded); null = {DEFAULT_EVAL_FRACTION:g} for the sources without an eval_split.")
    format: str = _f("auto", help=f"Preference layout: one of {', '.join(DATA_FORMATS)}. auto detects it.")
    columns: dict[str, str] = _f({}, help="Column mapping of data.dataset for layouts not in the format table, as in data.datasets[].columns: {prompt: question, chosen: good, rejected: bad}.")
    config_name: str | None = _f(None, help="Hub dataset configuration name, if the dataset has several.")
    max_train_rows: int | None = _f(None, help="Use at most this many training rows after filtering (seeded shuffle); None = all.")
    max_eval_rows: int | None = _f(None, help="Use at most this many evaluation rows after filtering.")
    seed: int = _f(42, help="Seed for shuffles and the eval_fraction split.")
    max_malformed_fraction: float = _f(0.05, help="Refuse the data when more than this fraction of a split's rows (per source, after the min/max filters) is malformed or refused by the chat template; such rows are otherwise dropped and reported.")
    filters: FilterSection = field(default_factory=FilterSection, metadata={"help": "Row filters, applied in the order listed."})


@dataclass
class LoraSection:
    enabled: bool = _f(True, help="Train a LoRA adapter (true) or fine-tune every weight (false).")
    r: int = _f(16, help="LoRA rank.")
    alpha: float = _f(32, help="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = _f(0.05, help="Dropout on the LoRA input, in [0, 1). Applies only with dpo.disable_dropout false: TRL turns every dropout off by default, the adapter's included (it did for the seed notebook's 0.05 too).")
    target_modules: list[str] | str = _f("all-linear", help="Modules to adapt: all-linear or a list of module names.")


@dataclass
class DPOSection:
    beta: float = _f(0.1, help="DPO beta: strength of the KL pull towards the reference model (> 0).")
    loss_type: str | list[str] = _f("sigmoid", help="TRL loss_type: sigmoid (standard DPO), ipo, hinge, robust, ...; a list combines several (e.g. [sigmoid, sft] = RPO).")
    loss_weights: list[float] | None = _f(None, help="Weights for a list of loss types (TRL loss_weights), each >= 0 and not all 0; None = 1.0 each.")
    label_smoothing: float = _f(0.0, help="Label smoothing, in [0, 0.5): read by the loss types robust, exo_pair (needs > 0), aot and aot_unpaired only.")
    max_length: int = _f(1024, help="Truncate prompt + answer to this many tokens (TRL max_length).")
    truncation_mode: Literal["keep_start", "keep_end"] = _f("keep_start", help="Which end to keep when truncating.")
    max_truncated_fraction: float = _f(0.0, help="Share of training pairs allowed to be longer than max_length (TRL cuts them, losing the end of the answer and its end-of-turn token). Checked when training starts; 0 = none.")
    precompute_ref_log_probs: Literal["auto"] | bool = _f("auto", help="Compute reference log-probs once before training (saves a forward per step) and keep them in the output folder for resumed runs. auto = when the run is long enough to repay the pass (alignpress.flops.precompute_decision: about 5.4 epochs on the measured GPU), or when this data's log-probs are already stored.")
    precompute_ref_batch_size: int | None = _f(None, help="Pairs per forward in the precompute pass (TRL precompute_ref_batch_size); None = train.per_device_train_batch_size. The pass needs no activations for backward, so it can take a larger batch.")
    prefix_sharing: bool = _f(False, help="Prefix-shared DPO (alignpress.prefix_dpo): each pair runs as one sequence [prompt | chosen | rejected] with a mask that hides the chosen answer from the rejected one, so the prompt is computed once, not twice; same numbers as TRL's path. Needs attention sdpa, eager or flex_attention.")
    disable_dropout: bool = _f(True, help="TRL disable_dropout: every dropout module off while training (the model's and the LoRA adapter's), so the policy and the reference run the same network. false: lora.dropout and the model config's dropout apply (prefix-shared DPO then draws one dropout mask for the prompt both answers share, where TRL's path draws two).")
    pairs_per_row: int = _f(1, help="With prefix_sharing: pack this many pairs into one row (block-diagonal mask) instead of padding every pair to the longest; 1 = one pair a row.")


@dataclass
class TrainSection:
    learning_rate: float = _f(5e-6, help="Peak learning rate.")
    lr_scheduler_type: str = _f("cosine", help="transformers scheduler name: cosine, linear, constant, ...")
    warmup_steps: int = _f(0, help="Linear warm-up steps. A warmup that keeps every step of the run below 0.1 x learning_rate is refused.")
    num_train_epochs: float = _f(1.0, help="Epochs over the training rows (ignored when max_steps > 0).")
    max_steps: int = _f(-1, help="Stop after this many optimizer steps; -1 = use num_train_epochs.")
    per_device_train_batch_size: int = _f(2, help="Pairs per device per forward.")
    per_device_eval_batch_size: int = _f(4, help="Not used (training runs no evaluation; kept so older recipes load): the evaluate stage uses eval.batch_size.")
    gradient_accumulation_steps: int = _f(1, help="Forwards per optimizer step.")
    gradient_checkpointing: Literal["auto"] | bool = _f("auto", help="Recompute activations in backward to save memory (about 25% slower with LoRA when every layer recomputes). auto = on only when the memory estimate without it exceeds 90% of the GPU's free memory, and then for as few layers as bring it within (decided at run time for the longest micro-batch and again for each one, logged and recorded in run.json); off on the CPU.")
    checkpointed_layers: int | None = _f(None, help="With gradient checkpointing on: recompute only the first N decoder layers; the others keep their activations (faster, more memory). null = every layer when gradient_checkpointing is true; with auto, for each micro-batch the fewest layers whose memory estimate for its shape stays within 90% of the GPU's free memory.")
    use_liger_kernel: bool = _f(False, help="Liger's Triton kernels (RMSNorm, RoPE, SwiGLU/GeGLU; TRL use_liger_kernel): less activation memory and faster steps on a CUDA GPU. Needs liger-kernel (requirements-gpu.lock); ignored with a logged warning on the CPU.")
    group_by_length: bool = _f(False, help="Batch pairs of similar length (transformers LengthGroupedSampler) to cut padding; the data order is still seeded.")
    compile_layers: bool = _f(False, help="torch.compile each decoder layer in place (regional compilation: the layers share their compiled graphs, so compiling costs about one layer's worth, once per run, in the first steps): fewer kernels and less Python per step, for the fixed cost each micro-batch pays. Needs a C compiler (Triton on a GPU, Inductor on the CPU); not with DeepSpeed. Not yet measured on a GPU (benchmarks: tuned-compiled).")
    optim: str = _f("adamw_torch", help="transformers optimizer name (adamw_torch, paged_adamw_32bit, ...).")
    weight_decay: float = _f(0.0, help="AdamW weight decay.")
    max_grad_norm: float = _f(1.0, help="Gradient clipping norm.")
    seed: int = _f(42, help="Training seed (adapter init, data order).")
    logging_steps: int = _f(1, help="Log metrics to metrics/train.jsonl every N steps.")
    save_steps: int = _f(50, help="Save a checkpoint every N optimizer steps.")
    save_minutes: float | None = _f(None, help="Also save a checkpoint when this many minutes have passed since the last one (spot instances).")
    save_total_limit: int | None = _f(2, help="Keep at most this many checkpoints.")
    device: Literal["auto", "cpu", "cuda"] = _f("auto", help="Where to train: auto = cuda when torch can use it, else the CPU, except where a GPU was meant (a GPU container, an NVIDIA device, a model of 1B parameters or more to train): that is refused, exit 2; cpu runs there on purpose.")
    accelerate_config: str | None = _f(None, help="Multi-GPU/DeepSpeed: a config name in the recipe folder's accelerate/, else alignpress's recipes/accelerate/ (ddp, zero2, zero3-offload), or a path; `run` relaunches itself under `accelerate launch` with it.")
    num_processes: int | None = _f(None, help="Processes for accelerate_config (default: the config's, else one per visible GPU).")
    report_to: str | list[str] = _f("tensorboard", help="Experiment tracker(s) transformers supports (tensorboard, wandb, trackio, mlflow, ...), or none. tensorboard writes event files to <output>/tensorboard/, no account needed.")


@dataclass
class EvalSection:
    enabled: bool = _f(True, help="Run the evaluate stage.")
    max_rows: int | None = _f(200, help="Score at most this many held-out pairs.")
    generation_rows: int = _f(32, help="Greedy-generate for this many held-out prompts (behaviour measure).")
    max_new_tokens: int = _f(64, help="Generation length cap in the behaviour measure.")
    behaviour_pattern: str | None = _f(None, help="Regex a generation must match to count as the chosen behaviour; None = closer to the chosen than the rejected answer.")
    batch_size: int = _f(8, help="Pairs per forward when scoring.")
    prompts: list[str] = _f([], help="Extra user prompts generated greedily by the base and the aligned model, side by side in metrics/report.md and the card (the eval split's first generation_rows prompts are always shown).")
    judge: str | None = _f(None, help="Reward model that judges base vs aligned generations (any sequence-classification model with one output: Hub id or local folder); gives a win rate with a 95% interval. None = no judge.")
    gate_min_gain: float | None = _f(None, help="Publish gate: refuse to publish unless aligned held-out preference accuracy minus the base's is at least this (e.g. 0.05). None = no such check.")
    gate_max_kl: float | None = _f(None, help="Publish gate: refuse to publish when the KL estimate from the base (nats per answer, metrics/eval.json aligned.kl_estimate) exceeds this. None = no such check.")


@dataclass
class ExportSection:
    merge: bool = _f(True, help="Merge the LoRA adapter into the base and save a full model in model/: always true (export, evaluate's card and publish's model push need model/); publish.push: adapter pushes the adapter alone.")
    dtype: Literal["bfloat16", "float16", "float32"] = _f("bfloat16", help="dtype of the saved model.")
    check_tolerance: float = _f(1e-3, help="Max abs logit difference allowed between merged and adapter model (float32 probe); > 0, since merging rounds.")
    stop_at_turn_end: bool = _f(True, help="Add the token the chat template ends each answer with (Gemma's <end_of_turn>) to the saved generation_config.json's eos_token_id when the base's config lacks it, so the model's generate stops at the end of its turn; false keeps the base's generation config.")


@dataclass
class CardSection:
    license: str | None = _f(None, help="License for the card; None = inherit the base model's license.")
    language: list[str] = _f([], help="Language codes for the card metadata.")
    tags: list[str] = _f([], help="Extra tags (dpo, trl, alignpress are always added).")
    description: str | None = _f(None, help="A paragraph for the card's introduction.")


@dataclass
class PublishSection:
    repo_id: str | None = _f(None, help="Hub repo to push to (namespace/name). None = do not push.")
    private: bool = _f(True, help="Create the repo private. Refuses to push to an existing public repo when true.")
    push: Literal["model", "adapter", "both"] = _f("model", help="What to push: the merged model, the adapter, or both.")
    adapter_repo_id: str | None = _f(None, help="Repo for the adapter; None = the `adapter` branch of repo_id (push: both) or repo_id itself (push: adapter).")
    tag: str | None = _f(None, help="Tag to create on the pushed commit; None = the run id.")
    allow_update: bool = _f(False, help="Allow pushing to a repo that already exists.")
    commit_message: str | None = _f(None, help="Commit message; None = one naming the recipe and run id.")


@dataclass
class Recipe:
    name: str = _f(help="Run name; the default output folder is outputs/<name>/.", metadata_default="the recipe file's name without .yaml")
    model: ModelSection = field(metadata={"help": "The base model."})
    data: DataSection = field(metadata={"help": "Preference data and filters."})
    lora: LoraSection = field(default_factory=LoraSection, metadata={"help": "LoRA adapter or full fine-tuning."})
    dpo: DPOSection = field(default_factory=DPOSection, metadata={"help": "DPO settings, with TRL's names."})
    train: TrainSection = field(default_factory=TrainSection, metadata={"help": "Optimizer and schedule."})
    eval: EvalSection = field(default_factory=EvalSection, metadata={"help": "Held-out evaluation."})
    export: ExportSection = field(default_factory=ExportSection, metadata={"help": "Merge and save."})
    card: CardSection = field(default_factory=CardSection, metadata={"help": "Model card metadata."})
    publish: PublishSection = field(default_factory=PublishSection, metadata={"help": "Hub upload."})
    description: str | None = _f(None, help="What this recipe is for (shown in validate and the card).")

    # Where the recipe came from; not a YAML field.
    source: str = field(default="<recipe>", metadata={"internal": True}, repr=False)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.pop("source")
        return out

    def where(self, field_path: str) -> str:
        """The file or `--set` flag a field's value came from, for error messages."""
        return _where(getattr(self, "_overridden", ()), self.source, field_path)

    def resolve_path(self, value: str) -> str:
        """A path written in the recipe, relative to the recipe file's folder."""
        p = Path(value).expanduser()
        if p.is_absolute() or self.source.startswith("<"):
            return str(p)
        return str((Path(self.source).parent / p).resolve())


def with_new_defaults(old: dict, new: dict, cls) -> dict:
    """The folder's resolved recipe with the fields a newer alignpress added filled in, where the
    current recipe leaves them at their defaults: an upgrade alone never makes a run "different"."""
    if not isinstance(old, dict):
        return old
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    hints = typing.get_type_hints(cls)
    out = dict(old)
    for name, f in fields.items():
        if name not in new:
            continue
        tp = hints[name]
        if name in out:
            if dataclasses.is_dataclass(tp) and isinstance(out[name], dict) and isinstance(new[name], dict):
                out[name] = with_new_defaults(out[name], new[name], tp)
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
            default = dataclasses.asdict(default) if dataclasses.is_dataclass(default) else default
        else:
            continue
        if new[name] == default:
            out[name] = default
    return out


# train fields that say how training runs, not what it computes: a resumed run may change them (a save
# cadence for spot, a tracker, checkpointing for a GPU with less memory, the device sky/run.sh sets).
RUN_ONLY_TRAIN = {"logging_steps", "save_steps", "save_minutes", "save_total_limit", "report_to", "per_device_eval_batch_size",
                  "device", "gradient_checkpointing", "checkpointed_layers"}
TRAINING_SECTIONS = ("model", "data", "lora", "dpo", "train")


def training_fields_changed(old: dict, new: dict) -> list[str]:
    """changed_fields that change what training computes (not eval, export, card, publish, nor how it runs)."""
    return [f for f in changed_fields(old, new)
            if f.split(".")[0] in TRAINING_SECTIONS and not (f.startswith("train.") and f.split(".")[1] in RUN_ONLY_TRAIN)]


def changed_sections(old: dict, new: dict) -> list[str]:
    """The top-level sections of a resolved recipe (`old`, as a folder's recipe.resolved.yaml holds it)
    that differ from `new` (Recipe.to_dict()), fields added by a newer alignpress not counted."""
    return sorted({f.split(".")[0] for f in changed_fields(old, new)})


def changed_fields(old: dict, new: dict) -> list[str]:
    """changed_sections, field by field: dotted names (a list, such as data.datasets, counts whole)."""
    def walk(a: Any, b: Any, prefix: str) -> list[str]:
        if isinstance(a, dict) and isinstance(b, dict):
            return [f for k in sorted(set(a) | set(b), key=str) for f in walk(a.get(k), b.get(k), f"{prefix}{k}.")]
        return [] if a == b else [prefix.rstrip(".")]

    return walk(with_new_defaults(old, new, Recipe), new, "")


# ---------------------------------------------------------------------------------------------
# Loading


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override, type-check and validate a recipe file."""
    path = Path(path)
    source = str(path)
    if path.is_dir():
        raise AlignpressError("is a folder, not a recipe file (a .yaml file, such as recipes/demo.yaml)", source=source)
    if path.exists() and not path.is_file():
        # a pipe (`<(...)`) or a device: a recipe's relative paths are read from its folder, which these lack
        raise AlignpressError("not a regular file (a pipe or a device): give the recipe's own path, since its relative paths "
                              "(data, chat template) are read from its folder", source=source)
    if not path.is_file():
        raise AlignpressError("recipe file not found", source=source)
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise AlignpressError(f"line {line}: not UTF-8 (byte 0x{data[e.start]:02x}); save the recipe as UTF-8", source=source) from None
    try:
        raw = yamlfile.load(text)
    except yaml.YAMLError as e:
        raise AlignpressError(f"not valid YAML: {yamlfile.describe(e)}", source=source) from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise AlignpressError("a recipe must be a mapping of sections", source=source)
    raw.setdefault("name", path.stem)
    overridden: set[str] = set()
    for item in overrides or []:
        key = apply_override(raw, item)
        overridden.add(key)

    def src(field_path: str) -> str:
        return _where(overridden, source, field_path)

    recipe = _build(Recipe, raw, "", src)
    recipe.source = source
    recipe._overridden = sorted(overridden)  # not a field: for Recipe.where in later checks
    validate(recipe, src)
    return recipe


def _where(overridden: typing.Iterable[str], source: str, field_path: str) -> str:
    hit = [k for k in overridden if field_path == k or field_path.startswith((k + ".", k + "[")) or k.startswith(field_path + ".")]
    return f"--set {hit[0]}" if hit else source


def apply_override(raw: dict, item: str) -> str:
    """Apply one `--set a.b.c=value` to the raw recipe dict; the value is parsed as YAML."""
    if "=" not in item:
        raise AlignpressError(f"--set expects key=value, got {item!r}")
    key, _, text = item.partition("=")
    key = key.strip()
    parts = key.split(".")
    # Check the path against the schema now so a typo names the flag, not a missing field later.
    cls: Any = Recipe
    for i, part in enumerate(parts):
        names = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
        if part not in names:
            prefix = ".".join(parts[:i])
            raise AlignpressError(_unknown(part, names, prefix), source=f"--set {key}")
        hint = _hints(cls)[part]
        if i < len(parts) - 1:
            if dataclasses.is_dataclass(hint):
                cls = hint
            elif typing.get_origin(hint) is dict:
                if i != len(parts) - 2:
                    raise AlignpressError("too many dotted parts", source=f"--set {key}")
                break
            else:
                raise AlignpressError(f"'{'.'.join(parts[: i + 1])}' is not a section", source=f"--set {key}")
    if not text.strip():
        # `--set publish.repo_id=$HUB_REPO` with the variable unset would quietly turn publishing off
        raise AlignpressError(f"the value is empty (an unset shell variable?); write {key}=null for none", source=f"--set {key}")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = text
    node = raw
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value
    return key


def _hints(cls: Any) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unknown(key: str, names: typing.Iterable[str], prefix: str) -> str:
    where = f"'{prefix}.{key}'" if prefix else f"'{key}'"
    # A field of another section (TRL's DPOConfig has beta, max_length and learning_rate side by side):
    # name where it lives, before a close spelling in this section.
    elsewhere = [dotted for dotted, *_ in describe() if dotted.rsplit(".", 1)[-1] == key and "[]" not in dotted]
    close = difflib.get_close_matches(key, list(names), n=1, cutoff=0.6)
    if elsewhere:
        hint = f"; did you mean {' or '.join(repr(d) for d in elsewhere)}?"
    elif close:
        hint = f"; did you mean '{close[0]}'?"
    else:
        hint = f"; known fields: {', '.join(sorted(names))}"
    return f"unknown field {where}{hint}"


def _build(cls: Any, raw: Any, prefix: str, src: typing.Callable[[str], str]) -> Any:
    where = prefix or "<top level>"
    if not isinstance(raw, dict):
        raise AlignpressError(f"expected a mapping, got {type(raw).__name__}", source=src(prefix), field=where)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    for key in raw:
        if key not in fields:
            raise AlignpressError(_unknown(str(key), fields, prefix), source=src(_join(prefix, str(key))))
    hints = _hints(cls)
    kwargs = {}
    for name, f in fields.items():
        dotted = _join(prefix, name)
        if name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise AlignpressError(f"required field is missing ({f.metadata.get('help', '')})", source=src(dotted), field=dotted)
            continue
        kwargs[name] = _coerce(hints[name], raw[name], dotted, src)
    return cls(**kwargs)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_plural(typing.get_args(tp)[0])}"
    if origin is dict:
        return f"a mapping of names to {_plural(typing.get_args(tp)[1])}"
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false", type(None): "null"}.get(tp, getattr(tp, "__name__", str(tp)))


def _plural(tp: Any) -> str:
    return {str: "strings", int: "integers", float: "numbers", bool: "true or false values"}.get(tp) or _type_name(tp)


def _coerce(tp: Any, value: Any, dotted: str, src: typing.Callable[[str], str]) -> Any:
    if dataclasses.is_dataclass(tp):
        return _build(tp, value if value is not None else {}, dotted, src)
    args = typing.get_args(tp)
    # A section that may be null (data.datasets[].filters), or a list of sections (data.datasets).
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and any(dataclasses.is_dataclass(a) for a in args):
        if value is None and type(None) in args:
            return None
        return _build(next(a for a in args if dataclasses.is_dataclass(a)), value, dotted, src)
    if typing.get_origin(tp) is list and args and dataclasses.is_dataclass(args[0]):
        if not isinstance(value, list):
            raise AlignpressError(f"expected a list of mappings, got {value!r}", source=src(dotted), field=dotted)
        return [_build(args[0], v, f"{dotted}[{i}]", src) for i, v in enumerate(value)]
    # A mapping's values one by one, so a bad one is named by its key (data.filters.min.rating_chosen).
    if typing.get_origin(tp) is dict and isinstance(value, dict):
        return {str(k): _coerce(args[1], v, f"{dotted}.{k}", src) for k, v in value.items()}
    try:
        checked = _check(tp, value)
    except (TypeError, ValueError):
        shown = value if not isinstance(value, str) else repr(value)
        # A --set value is read as YAML: `key: value` in text became a mapping, 2024-01-01 a date.
        hint = (f"; for text, quote it inside: --set '{dotted}=\"...\"'" if src(dotted).startswith("--set") and "str" in _type_name(tp) + str(tp)
                and not isinstance(value, str) else _choice_hint(tp, value))
        raise AlignpressError(f"expected {_type_name(tp)}, got {shown}{hint}", source=src(dotted), field=dotted) from None
    # nan and inf parse as numbers (YAML .nan/.inf, or the strings) but no field means them.
    bad = [v for v in _numbers(checked) if not math.isfinite(v)]
    if bad:
        raise AlignpressError(f"must be a finite number, got {bad[0]}", source=src(dotted), field=dotted)
    return checked


# Other names for these choices (accelerate's and TrainingArguments' bf16/fp16, a GPU for cuda). Only
# these and case differences get a guess: a close spelling can mean the opposite ('gpu' is nearest 'cpu').
CHOICE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32",
                  "gpu": "cuda", "merged": "model"}


def _choices(tp: Any) -> list[str]:
    if typing.get_origin(tp) is Literal:
        return [a for a in typing.get_args(tp) if isinstance(a, str)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return [c for a in typing.get_args(tp) for c in _choices(a)]
    return []


def _choice_hint(tp: Any, value: Any) -> str:
    """'; did you mean ...?' for another name of one of a field's choices ('bf16', 'Auto', 'gpu')."""
    options = _choices(tp)
    if not isinstance(value, str) or not options:
        return ""
    key = value.strip().lower()
    guess = {o.lower(): o for o in options}.get(key) or CHOICE_ALIASES.get(key)
    return f"; did you mean {guess!r}?" if guess in options else ""


def _numbers(value: Any) -> list[float]:
    if isinstance(value, float):
        return [value]
    if isinstance(value, list):
        return [x for v in value for x in _numbers(v)]
    if isinstance(value, dict):
        return [x for v in value.values() for x in _numbers(v)]
    return []


def _check(tp: Any, value: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _check(arg, value)
            except (TypeError, ValueError):
                continue
        raise TypeError
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise ValueError
    if origin is list:
        if not isinstance(value, list):
            raise TypeError
        (inner,) = typing.get_args(tp)
        return [_check(inner, v) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise TypeError
        _, inner = typing.get_args(tp)
        return {str(k): _check(inner, v) for k, v in value.items()}
    if tp is type(None):
        if value is None:
            return None
        raise TypeError
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise TypeError
    if tp is int:
        if isinstance(value, bool):
            raise TypeError
        if isinstance(value, int):
            return value
        if isinstance(value, str) and re.fullmatch(r"[+-]?\d+", value.strip()):
            return int(value)
        raise TypeError
    if tp is float:
        # PyYAML reads 5e-6 (no dot) as a string: accept numeric strings for number fields.
        if isinstance(value, bool):
            raise TypeError
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            return float(value)
        raise TypeError
    if tp is str:
        if isinstance(value, str):
            return value
        raise TypeError
    raise TypeError


# ---------------------------------------------------------------------------------------------
# Range checks and cross-field rules

NAME_MAX = 96  # the Hub's limit for a repo name (hubnames.REPO_PART)

_SPLIT = re.compile(r"^[A-Za-z0-9_.-]+(\[\s*[-+]?\d*%?\s*:\s*[-+]?\d*%?\s*\])?$")


def name_problem(r: "Recipe", value: str, what: str) -> str | None:
    """What makes `value` (model.name_or_path, a dataset, eval.judge) neither a local path nor a
    name the Hub could hold: `microsoft/Phi 3 mini` would pass every check up to the download."""
    if value.startswith(("builtin:", ".", "/", "~")) or Path(value).expanduser().exists() or Path(r.resolve_path(value)).exists():
        return None  # builtins and paths: checked where they are built or read
    if Path(value).suffix.lower() in (".jsonl", ".json", ".parquet", ".csv") or value.count("/") > 1:
        return None  # a local file or folder that is missing: reported, named, where it is read
    for part in value.split("/"):
        if not REPO_PART.match(part):
            return (f"{value!r} is neither a local path nor a valid Hub {what} id: '{part}' may hold only letters, digits, "
                    "'-', '_', '.' (no spaces), at most 96 characters")
    return None


def empty_slice(split: str) -> bool:
    """`train[2500:300]`: a slice of plain indices whose end is not after its start selects nothing."""
    m = re.search(r"\[\s*(\d+)\s*:\s*(\d+)\s*\]$", split)
    return bool(m) and int(m.group(2)) <= int(m.group(1))


# The accelerate configs alignpress ships (ddp, zero2, zero3-offload), beside the shipped recipes:
# in a checkout, the Docker image (/app) and a SkyPilot workdir alike.
SHIPPED_ACCELERATE = Path(__file__).resolve().parents[2] / "recipes" / "accelerate"


def accelerate_folders(r: Recipe) -> list[Path]:
    """Where a config name is looked up, in order: <recipe folder>/accelerate/, then the shipped ones
    (a recipe outside recipes/ used to find none of them)."""
    return list(dict.fromkeys([Path(r.resolve_path("accelerate")), SHIPPED_ACCELERATE]))


def accelerate_config_path(r: Recipe) -> Path | None:
    """train.accelerate_config as a file: a name in one of accelerate_folders, or a path."""
    value = r.train.accelerate_config
    if value is None:
        return None
    candidates = [Path(r.resolve_path(value))]
    if "/" not in value and not value.endswith((".yaml", ".yml")):
        candidates[:0] = [folder / f"{value}.yaml" for folder in accelerate_folders(r)]
    return next((p for p in candidates if p.is_file()), None)


# A run whose warmup keeps every step below this share of train.learning_rate trains to nearly nothing.
WARMUP_MIN_PEAK = 0.1


def warmup_problem(warmup: int, steps: int) -> str | None:
    """Why `warmup` linear warmup steps leave a run of `steps` optimizer steps without training, or
    None. transformers' warmup gives step s (from 0) the share s / warmup of the learning rate, so the
    largest share a run reaches is (steps - 1) / warmup while it is still warming up."""
    if warmup <= 0 or steps > warmup:
        return None
    peak = (steps - 1) / warmup
    if peak >= WARMUP_MIN_PEAK:
        return None
    return (f"{warmup} warmup steps for a run of {steps:,} optimizer steps: its largest learning rate would be "
            f"{peak:.3g} x train.learning_rate, so training would change almost nothing; lower train.warmup_steps")


def token_cap(r: Recipe, filters: FilterSection | None = None) -> int:
    """The longest pair (prompt + longer answer, in tokens) prepare keeps: the filters' max_tokens
    (a source's own filters, else data.filters), or dpo.max_length when unset, so that TRL's
    max_length never cuts an answer by default."""
    filters = filters or r.data.filters
    return filters.max_tokens if filters.max_tokens is not None else r.dpo.max_length


def longest_sequence(r: Recipe) -> int:
    """The longest sequence training can see: the token cap, cut at dpo.max_length."""
    return min(token_cap(r), r.dpo.max_length)


def chat_template_text(r: Recipe) -> str | None:
    """model.chat_template as template text: the value itself when it is Jinja, else the file it
    names (relative to the recipe, like data files)."""
    path = chat_template_file(r)
    return Path(path).read_text(encoding="utf-8") if path else r.model.chat_template


def chat_template_file(r: Recipe) -> str | None:
    """The template file model.chat_template names, or None when the value is the template itself."""
    value = r.model.chat_template
    if value is None or "{{" in value or "{%" in value:
        return None
    return r.resolve_path(value.strip())


def chat_template_sha256(r: Recipe) -> str | None:
    """The digest of the template a file names: the recipe text alone does not show a change to it."""
    import hashlib

    path = chat_template_file(r)
    return hashlib.sha256(Path(path).read_bytes()).hexdigest() if path else None


def _check_chat_template(r: Recipe, fail: typing.Callable[[str, str], typing.NoReturn]) -> None:
    """The template parses as Jinja and reads `messages`: a bad one used to surface row by row in
    prepare, and a file name taken as the template rendered every conversation as that name."""
    import jinja2
    import jinja2.ext
    import jinja2.meta

    value, field_path = r.model.chat_template or "", "model.chat_template"
    where = ""
    if "{{" not in value and "{%" not in value:
        path = Path(r.resolve_path(value.strip())) if value.strip() else None
        if path is None or not path.is_file():
            fail(field_path, f"{value!r} is neither a Jinja template (it has no {{{{ }}}} or {{% %}}) nor a template file"
                 + (f" ({path} not found)" if path else ""))
        where = f"{path}: "

    class Generation(jinja2.ext.Extension):
        """Parses `{% generation %}...{% endgeneration %}`, the tag transformers adds for assistant masks."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.Scope(body).set_lineno(lineno)

    env = jinja2.Environment(extensions=[jinja2.ext.loopcontrols, Generation])
    try:
        tree = env.parse(chat_template_text(r))
    except jinja2.TemplateSyntaxError as e:
        fail(field_path, f"{where}not a valid Jinja template: line {e.lineno}: {e.message}")
    if "messages" not in jinja2.meta.find_undeclared_variables(tree):
        fail(field_path, f"{where}the template never reads `messages`, so every conversation would render as the same text")


# The DPO loss types whose TRL 1.16 formula reads label_smoothing (DPOTrainer's loss, read in its source).
LABEL_SMOOTHING_LOSSES = ("robust", "exo_pair", "aot", "aot_unpaired")


def check_tag(tag: str) -> str | None:
    """Why a Hub repo would refuse `tag` as a git tag name (git check-ref-format's rules for the
    characters this allows), or None. Checked at the door: the tag is created after the push."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", tag):
        return "use 1-100 letters, digits, '.', '_', '-', starting with a letter or digit"
    if ".." in tag:
        return "git refuses '..' in a tag name"
    if tag.endswith((".", ".lock")):
        return "git refuses a tag name that ends with '.' or '.lock'"
    if re.fullmatch(r"[0-9a-fA-F]{40}", tag):
        return "40 hex digits read as a commit id, not as a tag"
    return None


def recipe_strings(obj: typing.Any, path: str = "") -> typing.Iterator[tuple[str, str]]:
    """(field path, text) for every string in a recipe (sections, lists and mappings included)."""
    if dataclasses.is_dataclass(obj):
        for f in dataclasses.fields(obj):
            yield from recipe_strings(getattr(obj, f.name), f"{path}.{f.name}" if path else f.name)
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield from recipe_strings(value, f"{path}.{key}")
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield from recipe_strings(value, f"{path}[{i}]")
    elif isinstance(obj, str):
        yield path, obj


def validate(r: Recipe, src: typing.Callable[[str], str] = lambda f: "<recipe>") -> None:
    def fail(field_path: str, msg: str) -> typing.NoReturn:
        raise AlignpressError(msg, source=src(field_path), field=field_path)

    # First: a token in any text field would reach run.json, recipe.resolved.yaml, the model card,
    # the checkpoints and the Hub (a commit message or tag is not among the files publish scans).
    for field_path, text in recipe_strings(r):
        if holds_token(text):
            fail(field_path, "holds a Hub token: a recipe is written to the output folder, the model card and the Hub; "
                                "give the token only through HF_TOKEN or `hf auth login`")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", r.name):
        fail("name", f"{r.name!r}: use letters, digits, '.', '_', '-' (it names the output folder)")
    if len(r.name) > NAME_MAX:
        fail("name", f"is {len(r.name)} characters; at most {NAME_MAX} (it names the output folder and the suggested Hub repo, "
                     f"whose names stop at {NAME_MAX})")
    if not r.model.name_or_path.strip():
        fail("model.name_or_path", "must not be empty")
    if problem := name_problem(r, r.model.name_or_path, "model"):
        fail("model.name_or_path", problem)
    if r.model.chat_template is not None:
        _check_chat_template(r, fail)
    if r.model.revision is not None:
        if not r.model.revision.strip():
            fail("model.revision", "must not be empty: name a branch, tag or commit of the Hub model, or null")
        name = r.model.name_or_path
        if name.startswith("builtin:") or Path(name).expanduser().is_dir() or Path(r.resolve_path(name)).is_dir():
            # transformers ignores a revision for a folder: the pin would be recorded, not used.
            fail("model.revision", f"a revision selects a commit of a Hub model; {name!r} is {'built by alignpress' if name.startswith('builtin:') else 'a local folder'}, which has none")
    if not r.export.merge:  # the field was read by nothing: false used to be ignored silently
        fail("export.merge", "false is not supported: export always saves the merged model in model/; to publish the adapter alone, set publish.push: adapter")
    if r.data.format not in DATA_FORMATS:
        fail("data.format", f"unknown format {r.data.format!r}; expected one of {', '.join(DATA_FORMATS)}")
    for name in ("split", "eval_split"):
        value = getattr(r.data, name)
        if value is not None and not _SPLIT.match(value):
            fail(f"data.{name}", f"{value!r} is not a split name with an optional [start:end] slice")
    if r.data.eval_split and r.data.eval_fraction is not None:
        fail("data.eval_fraction", "set either data.eval_split or data.eval_fraction, not both")
    if r.data.eval_fraction is not None and not 0 < r.data.eval_fraction < 1:
        fail("data.eval_fraction", f"must be between 0 and 1, got {r.data.eval_fraction}")
    positive_ints = {
        "data.filters.max_messages": r.data.filters.max_messages,
        "data.filters.max_tokens": r.data.filters.max_tokens,
        "data.max_train_rows": r.data.max_train_rows,
        "data.max_eval_rows": r.data.max_eval_rows,
        "lora.r": r.lora.r,
        "dpo.max_length": r.dpo.max_length,
        "train.per_device_train_batch_size": r.train.per_device_train_batch_size,
        "train.per_device_eval_batch_size": r.train.per_device_eval_batch_size,
        "dpo.precompute_ref_batch_size": r.dpo.precompute_ref_batch_size,
        "train.gradient_accumulation_steps": r.train.gradient_accumulation_steps,
        "train.logging_steps": r.train.logging_steps,
        "train.save_steps": r.train.save_steps,
        "eval.max_rows": r.eval.max_rows,
        "eval.max_new_tokens": r.eval.max_new_tokens,
        "eval.batch_size": r.eval.batch_size,
    }
    for name, value in positive_ints.items():
        if value is not None and value < 1:
            fail(name, f"must be at least 1, got {value}")
    if r.data.filters.max_messages is not None and r.data.filters.max_messages < 2:
        fail("data.filters.max_messages", "must be at least 2 (one prompt and one answer)")
    validate_data(r, fail)
    if r.eval.generation_rows < 0:
        fail("eval.generation_rows", f"must be 0 or more, got {r.eval.generation_rows}")
    types_ = [r.dpo.loss_type] if isinstance(r.dpo.loss_type, str) else r.dpo.loss_type
    if not types_:
        fail("dpo.loss_type", "must name at least one loss type")
    if r.dpo.loss_weights is not None and len(r.dpo.loss_weights) != len(types_):
        fail("dpo.loss_weights", f"has {len(r.dpo.loss_weights)} weights for {len(types_)} loss types")
    if r.dpo.loss_weights is not None and (min(r.dpo.loss_weights) < 0 or not any(r.dpo.loss_weights)):
        # all zero: no gradient, found only by export's check after the whole run; negative: that loss maximised
        fail("dpo.loss_weights", f"must be >= 0 with at least one above 0, got {r.dpo.loss_weights}")
    if r.train.checkpointed_layers is not None:
        if r.train.checkpointed_layers < 1:
            fail("train.checkpointed_layers", f"must be at least 1 (or null: every layer), got {r.train.checkpointed_layers}; to recompute none, set train.gradient_checkpointing: false")
        if r.train.gradient_checkpointing is False:
            fail("train.checkpointed_layers", f"{r.train.checkpointed_layers} layers to recompute, but train.gradient_checkpointing is false: set it to true or auto, or drop this field")
    if r.dpo.pairs_per_row < 1:
        fail("dpo.pairs_per_row", f"must be at least 1, got {r.dpo.pairs_per_row}")
    if r.dpo.pairs_per_row > 1 and not r.dpo.prefix_sharing:
        fail("dpo.pairs_per_row", "packing pairs into rows needs dpo.prefix_sharing: true")
    if r.dpo.prefix_sharing and r.model.attn_implementation not in (None, "sdpa", "eager", "flex_attention"):
        fail("dpo.prefix_sharing", f"needs model.attn_implementation sdpa, eager or flex_attention (a custom attention mask); {r.model.attn_implementation!r} cannot express it")
    if r.dpo.beta <= 0:
        fail("dpo.beta", f"must be > 0, got {r.dpo.beta}")
    if not 0 <= r.dpo.label_smoothing < 0.5:
        fail("dpo.label_smoothing", f"must be in [0, 0.5), got {r.dpo.label_smoothing}")
    smoothed = [t for t in types_ if t in LABEL_SMOOTHING_LOSSES]
    if r.dpo.label_smoothing and not smoothed:
        fail("dpo.label_smoothing", f"{r.dpo.label_smoothing} would be ignored: TRL applies it only to the loss types "
                                    f"{', '.join(LABEL_SMOOTHING_LOSSES)}, not {', '.join(types_)}; set it to 0 or choose one of those")
    if "exo_pair" in types_ and r.dpo.label_smoothing == 0:
        fail("dpo.label_smoothing", "loss type exo_pair needs label_smoothing > 0 (TRL refuses 0; the EXO paper uses 1e-3)")
    if r.train.learning_rate <= 0:
        fail("train.learning_rate", f"must be > 0, got {r.train.learning_rate} (training would change nothing)")
    if r.train.learning_rate > 1:  # 0x10 is YAML for 16; any step that size wrecks the weights at once
        fail("train.learning_rate", f"must be at most 1, got {r.train.learning_rate:g} (DPO learning rates are about 1e-7 to 1e-4)")
    for name in ("weight_decay", "max_grad_norm"):
        if getattr(r.train, name) < 0:
            fail(f"train.{name}", f"must be >= 0, got {getattr(r.train, name)}")
    if r.train.save_total_limit is not None and r.train.save_total_limit < 1:
        fail("train.save_total_limit", f"must be at least 1 or null (keep every checkpoint), got {r.train.save_total_limit}; "
                                       "transformers would keep every checkpoint")
    if r.export.check_tolerance <= 0:
        # 0 can never pass: a merged model's float32 logits differ from the adapter's by rounding (~1e-6)
        fail("export.check_tolerance", f"must be > 0 (a merge changes the logits by float rounding), got {r.export.check_tolerance}")
    if r.train.max_steps == 0 or r.train.max_steps < -1:
        fail("train.max_steps", f"must be -1 (use epochs) or at least 1, got {r.train.max_steps}")
    if r.train.max_steps == -1 and r.train.num_train_epochs <= 0:
        fail("train.num_train_epochs", f"must be > 0, got {r.train.num_train_epochs}")
    if r.train.accelerate_config is not None and accelerate_config_path(r) is None:
        known = "; ".join(f"names in {folder}: {', '.join(sorted(p.stem for p in folder.glob('*.yaml'))) or 'none'}" for folder in accelerate_folders(r))
        fail("train.accelerate_config", f"no accelerate config {r.train.accelerate_config!r} ({known}; or give a path to a .yaml file)")
    if r.train.accelerate_config is not None:
        # accelerate's own reader, as `accelerate launch` reads it: any YAML file used to pass here and
        # fail at the launch with a traceback (e.g. "A `distributed_type` must be specified").
        from accelerate.commands.config.config_args import load_config_from_file

        try:
            load_config_from_file(str(accelerate_config_path(r)))
        except Exception as e:  # noqa: BLE001 - any reason accelerate has is the user's to read
            fail("train.accelerate_config", f"{accelerate_config_path(r)} is not an accelerate config: {type(e).__name__}: {' '.join(str(e).split())}")
    if r.train.compile_layers and r.train.accelerate_config is not None and accelerate_config_path(r) is not None:
        from .disk import deepspeed_stage

        if deepspeed_stage(r) is not None:
            # DeepSpeed wraps the layers' parameters (ZeRO-3 gathers them in hooks): never run together here
            fail("train.compile_layers", f"is not supported with DeepSpeed ({r.train.accelerate_config}); set train.compile_layers: false, or use the ddp config")
    if r.train.num_processes is not None and r.train.num_processes < 1:
        fail("train.num_processes", f"must be at least 1, got {r.train.num_processes}")
    if r.train.num_processes is not None and r.train.accelerate_config is None:
        # Nothing would start the processes: the run trained in one, while max_steps' epochs and
        # `plan`'s cost counted them all.
        fail("train.num_processes", "is read only with train.accelerate_config (alignpress starts `accelerate launch` with both); "
                                    "set train.accelerate_config (e.g. ddp), or leave this unset")
    if r.train.save_minutes is not None and r.train.save_minutes <= 0:
        fail("train.save_minutes", f"must be > 0, got {r.train.save_minutes}")
    from . import tracking

    tracking.validate(r, fail)
    if r.train.warmup_steps < 0:
        fail("train.warmup_steps", f"must be >= 0, got {r.train.warmup_steps}")
    if r.train.max_steps > 0 and (problem := warmup_problem(r.train.warmup_steps, r.train.max_steps)):
        fail("train.warmup_steps", problem)
    for name, value in (("data.seed", r.data.seed), ("train.seed", r.train.seed)):
        if not 0 <= value < 2**32:  # numpy's and torch's seeding refuse others, after the model has loaded
            fail(name, f"must be between 0 and 2**32 - 1, got {value}")
    if not 0 <= r.lora.dropout < 1:
        fail("lora.dropout", f"must be in [0, 1), got {r.lora.dropout}")
    if r.lora.alpha <= 0:
        fail("lora.alpha", f"must be > 0, got {r.lora.alpha}")
    if isinstance(r.lora.target_modules, str) and r.lora.target_modules != "all-linear":
        fail("lora.target_modules", f"write 'all-linear' or a list of module names, got {r.lora.target_modules!r}")
    if isinstance(r.lora.target_modules, list):
        if not r.lora.target_modules:
            fail("lora.target_modules", "the list is empty: name at least one module (e.g. [q_proj, v_proj]) or write all-linear")
        if "lm_head" in r.lora.target_modules:
            fail("lora.target_modules", "lm_head cannot be adapted: TRL computes the log-probabilities from lm_head.weight "
                                        "directly, so an adapter there would never train (TRL refuses it)")
        for name in r.lora.target_modules:
            if not name.strip():
                fail("lora.target_modules", "a module name is empty")
    if not 0 <= r.dpo.max_truncated_fraction < 1:
        fail("dpo.max_truncated_fraction", f"must be in [0, 1), got {r.dpo.max_truncated_fraction}")
    caps = [("data.filters.max_tokens", r.data.filters.max_tokens)] + [
        (f"data.datasets[{i}].filters.max_tokens", s.filters.max_tokens) for i, s in enumerate(r.data.datasets) if s.filters is not None]
    for cap_field, cap in caps:
        if cap is not None and cap > r.dpo.max_length and r.dpo.max_truncated_fraction == 0:
            fail(cap_field, f"{cap} is more than dpo.max_length ({r.dpo.max_length}): TRL would cut the pairs in between, "
                            "losing the end of their answers; lower it (or leave it unset: prepare then keeps pairs within "
                            "dpo.max_length), or allow some cut pairs with dpo.max_truncated_fraction")
    if r.model.load_in_4bit and not r.lora.enabled:
        fail("model.load_in_4bit", "4-bit training needs a LoRA adapter (lora.enabled: true)")
    if r.eval.behaviour_pattern is not None:
        if not r.eval.behaviour_pattern.strip():
            fail("eval.behaviour_pattern", "is empty, so every answer would match; give a regex, or null to compare answers with the chosen ones")
        try:
            re.compile(r.eval.behaviour_pattern)
        except re.error as e:
            fail("eval.behaviour_pattern", f"not a valid regex: {e}")
    for i, prompt in enumerate(r.eval.prompts):
        if not prompt.strip():
            fail("eval.prompts", f"prompt {i + 1} is empty")
    if r.eval.judge is not None and not r.eval.judge.strip():
        fail("eval.judge", "must name a reward model (Hub id or folder), or be null")
    if r.eval.judge is not None and r.eval.judge.startswith("builtin:"):
        fail("eval.judge", f"{r.eval.judge!r}: builtin: models are alignpress's generative demo models; a judge is a reward "
                           "model (sequence classification with one output): give its Hub id or folder")
    if r.eval.judge is not None and (problem := name_problem(r, r.eval.judge, "model")):
        fail("eval.judge", problem)
    if r.eval.gate_min_gain is not None and not -1 < r.eval.gate_min_gain < 1:
        # 1 passes only a perfect score over a base that got every pair wrong: meant as one point, 0.01
        fail("eval.gate_min_gain", f"must be above -1 and below 1 (a difference of two accuracies as fractions: 0.01 is one "
                                   f"percentage point), got {r.eval.gate_min_gain:g}")
    if r.eval.gate_max_kl is not None and r.eval.gate_max_kl <= 0:
        # 0 refuses every model that training changed (and export refuses one it did not change)
        fail("eval.gate_max_kl", f"must be > 0 (a KL divergence; 0 lets no trained model pass), got {r.eval.gate_max_kl}")
    if not r.eval.enabled:
        for name in ("gate_min_gain", "gate_max_kl", "judge"):
            if getattr(r.eval, name) is not None:
                fail(f"eval.{name}", "needs the evaluate stage: eval.enabled is false")
    if r.eval.gate_max_kl is not None and r.eval.generation_rows == 0:
        fail("eval.gate_max_kl", "the KL estimate needs greedy generations: set eval.generation_rows >= 1")
    if not r.lora.enabled and r.publish.push in ("adapter", "both"):
        fail("publish.push", "there is no adapter to push when lora.enabled is false")
    if r.publish.adapter_repo_id is not None and r.publish.push == "model":
        # Read by nothing with push: model: the adapter the user meant to publish would go nowhere.
        fail("publish.adapter_repo_id", "publish.push is model, which pushes no adapter: set publish.push: both (or adapter), or remove adapter_repo_id")
    for name in ("repo_id", "adapter_repo_id"):
        value = getattr(r.publish, name)
        if value is not None:
            problem = check_repo_id(value)
            if problem:
                fail(f"publish.{name}", f"{value!r}: {problem}")
    if r.publish.tag is not None:
        problem = check_tag(r.publish.tag)
        if problem:
            fail("publish.tag", f"{r.publish.tag!r}: {problem}")


def unused_settings(r: Recipe) -> list[str]:
    """Warnings for settings a valid recipe gives that nothing will read (LoRA's with LoRA off: a
    shipped recipe with `--set lora.enabled=false` is fine, so this warns rather than refuses)."""
    out = []
    if not r.lora.enabled:
        unused = [f"lora.{f.name}" for f in dataclasses.fields(LoraSection) if f.name != "enabled" and getattr(r.lora, f.name) != f.default]
        if unused:
            out.append(f"{r.where('lora.enabled')}: lora.enabled is false (every weight is trained), so {', '.join(unused)} "
                       f"{'is' if len(unused) == 1 else 'are'} not used")
    if r.dpo.precompute_ref_batch_size is not None and r.dpo.precompute_ref_log_probs is False:
        out.append(f"{r.where('dpo.precompute_ref_batch_size')}: dpo.precompute_ref_log_probs is false, so dpo.precompute_ref_batch_size is not used")
    if r.eval.behaviour_pattern is not None and r.eval.generation_rows == 0:
        out.append(f"{r.where('eval.behaviour_pattern')}: eval.generation_rows is 0 (no generations), so eval.behaviour_pattern is not used")
    if r.train.per_device_eval_batch_size != TrainSection.per_device_eval_batch_size:
        out.append(f"{r.where('train.per_device_eval_batch_size')}: train.per_device_eval_batch_size is not used (training runs no "
                   "evaluation); evaluate scores eval.batch_size pairs at a time")
    return out


def data_sources(d: DataSection) -> list[tuple[str, SourceSection]]:
    """Every data source with the fields it inherits from `data` filled in, and its field prefix.

    The single-source form (data.dataset) is one source whose fields are data.split,
    data.eval_split, data.config_name, data.format and data.filters.
    """
    if not d.datasets:
        one = SourceSection(dataset=d.dataset or "", split=d.split, eval_split=d.eval_split, config_name=d.config_name, format=d.format, columns=d.columns, filters=d.filters)
        return [("data", one)]
    out = []
    for i, s in enumerate(d.datasets):
        resolved = dataclasses.replace(
            s,
            split=s.split if s.split is not None else d.split,
            eval_split=s.eval_split if s.eval_split is not None else d.eval_split,
            format=s.format if s.format is not None else d.format,
            filters=s.filters if s.filters is not None else d.filters,
        )
        out.append((f"data.datasets[{i}]", resolved))
    return out


def _check_columns(prefix: str, s: SourceSection, fail: typing.Callable[[str, str], typing.NoReturn]) -> None:
    """A source's column mapping: layout columns its format reads, each from a distinct column."""
    from .formats import LAYOUT_COLUMNS

    targets: dict[str, str] = {}
    for key, column in s.columns.items():
        if key not in DATA_COLUMNS:
            fail(f"{prefix}.columns.{key}", f"unknown layout column {key!r}; map one of {', '.join(DATA_COLUMNS)} to a column of the source")
        if s.format in LAYOUT_COLUMNS and key not in LAYOUT_COLUMNS[s.format]:
            fail(f"{prefix}.columns.{key}", f"format {s.format!r} reads no {key!r} column (it reads {', '.join(LAYOUT_COLUMNS[s.format])})")
        if not isinstance(column, str) or not column.strip():
            fail(f"{prefix}.columns.{key}", "must name a column of the source")
        if column in targets:
            fail(f"{prefix}.columns.{key}", f"column {column!r} is already mapped to {targets[column]!r}")
        targets[column] = key


def validate_data(r: Recipe, fail: typing.Callable[[str, str], typing.NoReturn]) -> None:
    """The data section's own rules: one of dataset/datasets, and each source's fields."""
    d = r.data
    if d.dataset is None and not d.datasets:
        fail("data.dataset", "required: name one dataset (data.dataset) or several (data.datasets)")
    if d.dataset is not None and d.datasets:
        fail("data.datasets", "set either data.dataset (one source) or data.datasets (several), not both")
    if d.dataset is not None and not d.dataset.strip():
        fail("data.dataset", "must not be empty")
    if not 0 <= d.max_malformed_fraction <= 1:
        fail("data.max_malformed_fraction", f"must be between 0 and 1, got {d.max_malformed_fraction}")
    if d.datasets and d.columns:
        fail("data.columns", "with data.datasets, map columns per source (data.datasets[].columns)")
    seen: dict[tuple, str] = {}
    for prefix, s in data_sources(d):
        _check_columns(prefix, s, fail)
        if s.dataset.strip() and (problem := name_problem(r, s.dataset, "dataset")):
            fail(f"{prefix}.dataset", problem)
        for name in ("split", "eval_split"):
            value = getattr(s, name)
            if value is not None and empty_slice(value):
                fail(f"{prefix}.{name}", f"{value!r} selects no rows: the slice ends where it starts or before")
        if prefix == "data":
            continue
        if not s.dataset.strip():
            fail(f"{prefix}.dataset", "must not be empty")
        for name in ("split", "eval_split"):
            value = getattr(s, name)
            if value is not None and not _SPLIT.match(value):
                fail(f"{prefix}.{name}", f"{value!r} is not a split name with an optional [start:end] slice")
        if s.format not in DATA_FORMATS:
            fail(f"{prefix}.format", f"unknown format {s.format!r}; expected one of {', '.join(DATA_FORMATS)}")
        if s.fraction is not None and not 0 < s.fraction <= 1:
            fail(f"{prefix}.fraction", f"must be in (0, 1], got {s.fraction}")
        if s.max_rows is not None and s.max_rows < 1:
            fail(f"{prefix}.max_rows", f"must be at least 1, got {s.max_rows}")
        if s.fraction is not None and s.max_rows is not None:
            fail(f"{prefix}.max_rows", "set either fraction or max_rows for a source, not both")
        own = d.datasets[int(prefix.split("[")[1].rstrip("]"))].filters
        if own is not None:
            for name, low in (("max_messages", 2), ("max_tokens", 1)):
                value = getattr(own, name)
                if value is not None and value < low:
                    fail(f"{prefix}.filters.{name}", f"must be at least {low}, got {value}")
        key = (s.dataset, s.config_name, s.split)
        if key in seen:
            fail(prefix, f"the same dataset, config and split as {seen[key]} ({s.dataset!r}, {s.split!r})")
        seen[key] = prefix
    if d.datasets and d.eval_fraction is not None and all(s.eval_split for _, s in data_sources(d)):
        fail("data.eval_fraction", "every source has an eval_split, so there is nothing to hold a fraction out of")


# ---------------------------------------------------------------------------------------------
# Documentation, generated from the schema (used by `entrypoint.py schema` and the README)


def _yaml_text(value: Any) -> str:
    """A default as a recipe writes it (null, true, [en]), with text quoted as the types say it ('auto')."""
    if isinstance(value, str):
        return repr(value)
    return yaml.safe_dump(value, default_flow_style=True).removesuffix("\n").removesuffix("\n...")


def describe(cls: Any = Recipe, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(dotted field, type, default, help) for every field, recursively."""
    rows = []
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        if f.metadata.get("internal"):
            continue
        dotted = _join(prefix, f.name)
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows.extend(describe(tp, dotted))
            continue
        if typing.get_origin(tp) is list and dataclasses.is_dataclass(typing.get_args(tp)[0]):
            rows.append((dotted, "a list of sections", "[]", f.metadata.get("help", "")))
            rows.extend(describe(typing.get_args(tp)[0], dotted + "[]"))
            continue
        if f.default is not dataclasses.MISSING:
            default = _yaml_text(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            default = _yaml_text(f.default_factory())
        else:
            default = f.metadata.get("default", "required")
        rows.append((dotted, _type_name(tp), default, f.metadata.get("help", "")))
    return rows


def dump(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False, width=100)
