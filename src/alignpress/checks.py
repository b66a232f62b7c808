"""Checks that must fail before any data is prepared or any GPU time is spent.

- Training settings: the names TRL and transformers accept (loss types, schedulers, optimizers),
  read from the installed libraries, then the real `DPOConfig` built from the recipe by the same
  function training uses, so each of their own checks runs at the door.
- The model's shape: the architecture built from its config on PyTorch's meta device (no
  weights, no memory): LoRA target modules, the attention implementation, and the longest
  sequence training sees against the model's positions and sliding window.
- Truncation: how many prepared pairs TRL would cut at dpo.max_length (at the start of training).

`validate` runs the first two (the model check only when the config is on this machine); the
commands that lead to training (run, prepare, train) run both before writing anything, and train
checks truncation before loading the model.
"""

from __future__ import annotations

import ast
import contextlib
import copy
import difflib
import functools
import inspect
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from .errors import AlignpressError, first_line
from .recipe import Recipe, longest_sequence, token_cap

log = logging.getLogger("alignpress")


def _fail(recipe: Recipe, field: str, message: str) -> AlignpressError:
    return AlignpressError(message, source=recipe.where(field), field=field)


def _did_you_mean(value: str, known: list[str]) -> str:
    close = difflib.get_close_matches(value, known, n=1, cutoff=0.75)
    return f"; did you mean '{close[0]}'?" if close else ""


def _adaptable(module: Any) -> bool:
    """Whether PEFT's LoRA can wrap `module`: a linear, embedding or convolution layer (GPT-2's Conv1D has nf)."""
    return any(hasattr(module, a) for a in ("in_features", "num_embeddings", "in_channels", "nf"))


def _first_line(e: BaseException) -> str:
    return first_line(e) or type(e).__name__


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Library warnings and log lines about a configuration we only check, never run."""
    import transformers

    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        transformers.logging.set_verbosity(level)


# ---------------------------------------------------------------------------------------------
# Training settings


@functools.cache
def trl_loss_types() -> tuple[str, ...]:
    """The loss types the installed TRL computes: the `loss_type == "..."` branches of
    DPOTrainer (TRL 1.16 has no list of them; its DPOConfig accepts any string and the trainer
    fails at the first training step on an unknown one)."""
    from trl import DPOTrainer

    tree = ast.parse(inspect.getsource(inspect.getmodule(DPOTrainer)))
    found: list[str] = []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Compare) and isinstance(node.left, ast.Name) and node.left.id == "loss_type"
                and len(node.ops) == 1 and isinstance(node.ops[0], ast.Eq)
                and isinstance(node.comparators[0], ast.Constant) and isinstance(node.comparators[0].value, str)):
            if node.comparators[0].value not in found:
                found.append(node.comparators[0].value)
    return tuple(found)


def _check_name(recipe: Recipe, field: str, value: str, known: list[str], what: str) -> None:
    if value not in known:
        hint = _did_you_mean(value, known) or f" (known: {', '.join(known)})"
        raise _fail(recipe, field, f"{value!r} is not {what}{hint}")


def check_training_settings(recipe: Recipe) -> None:
    """Names against the installed libraries, then the real DPOConfig (TrainingArguments) built
    from the recipe with the device flags neutral (CPU, float32): no GPU needed, nothing written."""
    import torch
    import transformers
    import trl
    from transformers import SchedulerType
    from transformers.training_args import OptimizerNames

    known_losses = list(trl_loss_types())
    types_ = [recipe.dpo.loss_type] if isinstance(recipe.dpo.loss_type, str) else recipe.dpo.loss_type
    if known_losses:  # an empty list means TRL changed how it dispatches: let DPOConfig judge
        for name in types_:
            _check_name(recipe, "dpo.loss_type", name, known_losses, f"a loss type of TRL {trl.__version__}")
    _check_name(recipe, "train.lr_scheduler_type", recipe.train.lr_scheduler_type, [s.value for s in SchedulerType],
                f"a learning-rate scheduler of transformers {transformers.__version__}")
    _check_name(recipe, "train.optim", recipe.train.optim, [o.value for o in OptimizerNames],
                f"an optimizer of transformers {transformers.__version__}")

    # Building TrainingArguments sets up accelerate's process state; under `accelerate launch` that
    # state is the launch's own, so only a plain process (validate, the parent that relaunches) builds it.
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 or os.environ.get("ALIGNPRESS_LAUNCHED") == "1":
        return
    from .runstate import RunDir, default_output_dir
    from .train import dpo_config

    try:
        with _quiet():
            args = dpo_config(recipe, RunDir(default_output_dir(recipe.name), writer=False), "cpu", torch.float32)
    except Exception as e:  # noqa: BLE001 - every refusal of TRL/transformers names the field it concerns
        raise _fail(recipe, _field_named_in(str(e)) or "dpo", f"TRL {trl.__version__} refuses the training settings: {_first_line(e)}") from None
    # The optimizer and the schedule as the Trainer builds them, on a stand-in parameter: a package
    # the optimizer needs (galore_torch, torchao, schedulefree...) or scheduler arguments the recipe
    # cannot give (cosine_with_min_lr, warmup_stable_decay) used to fail after the model had loaded.
    from transformers import Trainer, get_scheduler

    try:
        Trainer.get_optimizer_cls_and_kwargs(args)
    except Exception as e:  # noqa: BLE001 - transformers' reason names the missing package
        raise _fail(recipe, "train.optim", f"transformers {transformers.__version__} cannot set up the optimizer {recipe.train.optim!r}: "
                                           f"{_first_line(e)}") from None
    try:
        stand_in = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        get_scheduler(args.lr_scheduler_type, stand_in, num_warmup_steps=1, num_training_steps=10, scheduler_specific_kwargs=args.lr_scheduler_kwargs)
    except Exception as e:  # noqa: BLE001
        raise _fail(recipe, "train.lr_scheduler_type", f"transformers {transformers.__version__} cannot set up the schedule "
                                                       f"{recipe.train.lr_scheduler_type!r}: {_first_line(e)} (a recipe gives no scheduler arguments)") from None


def _field_named_in(message: str) -> str | None:
    """The recipe field (dpo.* and train.* use TRL's names) that a library error message mentions."""
    import dataclasses
    import re

    from .recipe import DPOSection, TrainSection

    hits = []
    for section, cls in (("dpo", DPOSection), ("train", TrainSection)):
        for f in dataclasses.fields(cls):
            m = re.search(rf"\b{re.escape(f.name)}\b", message)
            if m:
                hits.append((m.start(), f"{section}.{f.name}"))
    return min(hits)[1] if hits else None


# ---------------------------------------------------------------------------------------------
# The model's shape, on the meta device


def _local_config(recipe: Recipe, local_only: bool) -> tuple[Any, str] | None:
    """(config, where it came from), or None when it is not on this machine and local_only is set."""
    from transformers import AutoConfig

    from .modeling import _hub_error, built_builtin, builtin_name, resolve_model_path

    name = recipe.model.name_or_path
    if name.startswith("builtin:") and local_only:
        builtin_name(recipe)  # an unknown name is refused here, not deferred to run
        folder = built_builtin(name)
        if folder is None:
            return None  # built on first use by run/prepare, which check it then
        path = str(folder)
    else:
        path = resolve_model_path(recipe)
    kwargs: dict[str, Any] = {"trust_remote_code": recipe.model.trust_remote_code}
    if not Path(path).is_dir():
        kwargs.update(revision=recipe.model.revision, local_files_only=local_only)
    try:
        with _quiet():
            return AutoConfig.from_pretrained(path, **kwargs), path
    except Exception as e:  # noqa: BLE001
        if local_only and not Path(path).is_dir():
            return None
        raise _hub_error(recipe, name, e, path) from None


def _meta_model(recipe: Recipe, config, attn: str | None):
    import torch
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"trust_remote_code": recipe.model.trust_remote_code}
    if attn:
        kwargs["attn_implementation"] = attn
    with _quiet(), torch.device("meta"):
        # A copy: from_config records the attention implementation in the config it is given.
        return AutoModelForCausalLM.from_config(copy.deepcopy(config), **kwargs)


def _check_attention(recipe: Recipe, config, arch: str):
    """The meta model with the recipe's attention implementation; transformers decides whether
    the name exists, its package is installed and this architecture supports it."""
    attn = recipe.model.attn_implementation
    try:
        return _meta_model(recipe, config, attn)
    except Exception as e:  # noqa: BLE001
        if not attn:
            raise _fail(recipe, "model.name_or_path", f"transformers cannot build {arch} from its config: {_first_line(e)}") from None
        try:
            _meta_model(recipe, config, None)
        except Exception as e2:  # noqa: BLE001 - the config itself is the problem
            raise _fail(recipe, "model.name_or_path", f"transformers cannot build {arch} from its config: {_first_line(e2)}") from None
        raise _fail(recipe, "model.attn_implementation", f"{attn!r} cannot be used for {arch} with the installed libraries: {_first_line(e)}") from None


def _probe_attention(recipe: Recipe) -> None:
    """Without the model's config: is the attention implementation a name transformers knows,
    with its package installed? Checked on a tiny Llama (which supports every kind) on the meta device."""
    from transformers import LlamaConfig

    attn = recipe.model.attn_implementation
    if not attn:
        return
    probe = LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1, num_key_value_heads=1)
    try:
        _meta_model(recipe, probe, attn)
    except Exception as e:  # noqa: BLE001
        raise _fail(recipe, "model.attn_implementation", f"{attn!r} cannot be used with the installed libraries: {_first_line(e)}") from None


def _check_lora(recipe: Recipe, model, arch: str) -> list[str]:
    """Every listed target module matches a module of the model (PEFT's own matching), and PEFT
    can wrap them; returns the names of the adapted modules."""
    from peft import get_peft_model
    from peft.tuners.tuners_utils import check_target_module_exists

    from .train import lora_config

    config = lora_config(recipe)
    if isinstance(recipe.lora.target_modules, list):
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if hasattr(m, "in_features")})
        for target in recipe.lora.target_modules:
            one = lora_config(recipe, target_modules=[target])
            matched = [(n, m) for n, m in model.named_modules() if n and check_target_module_exists(one, n)]
            if not matched:
                raise _fail(recipe, "lora.target_modules", f"{target!r} matches no module of {arch}{_did_you_mean(target, linear)} "
                                                           f"(its linear layers: {', '.join(linear)})")
            # PEFT refuses a container (a ModuleList, a decoder layer) with the container's whole repr
            if other := next(((n, m) for n, m in matched if not _adaptable(m)), None):
                raise _fail(recipe, "lora.target_modules", f"{target!r} matches {other[0]}, a {type(other[1]).__name__}, which LoRA cannot "
                                                           f"adapt; name linear layers (those of {arch}: {', '.join(linear)})")
    try:
        with _quiet():
            peft_model = get_peft_model(model, config, low_cpu_mem_usage=True)
    except Exception as e:  # noqa: BLE001
        raise _fail(recipe, "lora.target_modules", f"PEFT cannot adapt {arch} with these target modules: {_first_line(e)}") from None
    adapted = {n: m for n, m in peft_model.named_modules() if hasattr(m, "lora_A") and hasattr(m, "in_features")}
    if adapted:
        # A rank above every adapted layer's smaller side adds weights and memory (found as an OOM on the
        # GPU) but no expressive power. A narrow layer alone (a mixture-of-experts router, out = the
        # number of experts) is no reason to refuse: the wider layers use the rank.
        usable = max(min(m.in_features, m.out_features) for m in adapted.values())
        if recipe.lora.r > usable:
            raise _fail(recipe, "lora.r", f"{recipe.lora.r} is larger than any adapted layer of {arch} can use: a rank above {usable} "
                                          f"(the largest smaller side among them) adds weights but no capacity")
    return sorted({n.rsplit(".", 1)[-1] for n, m in peft_model.named_modules() if hasattr(m, "lora_A")})


def _check_lengths(recipe: Recipe, config, arch: str) -> int:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    longest = longest_sequence(recipe)
    # Blame the setting that makes the longest sequence what it is.
    field = "data.filters.max_tokens" if token_cap(recipe) < recipe.dpo.max_length else "dpo.max_length"
    fix = "set dpo.max_length (or data.filters.max_tokens, which prepare keeps pairs within)"
    positions = getattr(text, "max_position_embeddings", None)
    if positions and longest > positions:
        raise _fail(recipe, field, f"training sequences of up to {longest} tokens exceed {arch}'s {positions} positions "
                                   f"(config max_position_embeddings); {fix} to at most {positions}")
    window = getattr(text, "sliding_window", None)
    layer_types = getattr(text, "layer_types", None) or []
    every_layer_slides = not layer_types or all(t == "sliding_attention" for t in layer_types)
    if window and every_layer_slides and longest > window:
        raise _fail(recipe, field, f"training sequences of up to {longest} tokens are longer than {arch}'s sliding attention window of {window} "
                                   f"tokens (config sliding_window): the end of a long answer would not attend to the start of its prompt; "
                                   f"{fix} to at most {window}")
    return longest


def _check_checkpointed_layers(recipe: Recipe, config, arch: str) -> None:
    wanted = recipe.train.checkpointed_layers
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers = getattr(text, "num_hidden_layers", None)
    if wanted is not None and layers and wanted > layers:
        raise _fail(recipe, "train.checkpointed_layers", f"{wanted} layers to recompute, but {arch} has {layers} decoder layers "
                                                         f"(config num_hidden_layers); at most {layers}, or null for every layer")


def _check_router_loss(recipe: Recipe, config, arch: str) -> None:
    """A mixture-of-experts model gets TRL's load-balancing loss (DPOTrainer.aux_loss_enabled: the config has
    output_router_logits and a router_aux_loss_coef other than 0), which reads the batch's attention mask
    as [rows, positions]: prefix-shared DPO passes a 4-D mask, and the step fails."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if recipe.dpo.prefix_sharing and hasattr(text, "output_router_logits") and getattr(text, "router_aux_loss_coef", 0.0):
        raise _fail(recipe, "dpo.prefix_sharing", f"{arch} is a mixture-of-experts model: TRL adds its router's load-balancing loss "
                                                  f"(router_aux_loss_coef {text.router_aux_loss_coef:g}), which needs the standard layout's "
                                                  "attention mask; set dpo.prefix_sharing: false")


def check_model(recipe: Recipe, local_only: bool = False) -> str:
    """Checks that need the model's shape, from its config alone. Returns a line saying what was
    checked, or why it was deferred (local_only: the config is not on this machine)."""
    found = _local_config(recipe, local_only)
    if found is None:
        _probe_attention(recipe)
        hint = "" if recipe.model.name_or_path.startswith("builtin:") else "; `validate --hub` fetches it now"
        return (f"model checks deferred: the config of {recipe.model.name_or_path!r} is not on this machine "
                f"(run, prepare and train check LoRA targets, attention and lengths before anything else{hint})")
    config, where = found
    arch = (getattr(config, "architectures", None) or [type(config).__name__])[0]
    _check_router_loss(recipe, config, arch)
    model = _check_attention(recipe, config, arch)
    longest = _check_lengths(recipe, config, arch)
    _check_checkpointed_layers(recipe, config, arch)
    parts = [f"model checks passed on {arch} (config from {where}, meta device)"]
    if recipe.lora.enabled:
        parts.append(f"LoRA on {', '.join(_check_lora(recipe, model, arch))}")
    parts.append(f"attention {model.config._attn_implementation}")
    parts.append(f"sequences up to {longest} tokens")
    return "; ".join(parts)


@dataclass(frozen=True)
class ModelSizes:
    """Parameter counts from the meta model, for the disk estimate (alignpress.disk)."""

    params: int  # every weight, tied ones once (what the merged model saves)
    trainable: int  # the LoRA adapter's weights, or every weight when lora.enabled is false
    stored_bytes: float  # bytes per weight as the base model is stored (config dtype; 0.5 for a 4-bit checkpoint)


def model_sizes(recipe: Recipe) -> ModelSizes:
    """The model's parameter counts, built on the meta device from its config (fetched for a Hub
    model, as check_model does; nothing else is downloaded)."""
    config, _ = _local_config(recipe, local_only=False)
    model = _meta_model(recipe, config, None)
    params = model.num_parameters()
    trainable = params
    if recipe.lora.enabled:
        from peft import get_peft_model

        from .train import lora_config

        with _quiet():
            peft_model = get_peft_model(model, lora_config(recipe), low_cpu_mem_usage=True)
        trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    return ModelSizes(params=params, trainable=trainable, stored_bytes=_stored_bytes(config))


def _stored_bytes(config) -> float:
    """Bytes per weight as a checkpoint stores them, by its config (2 when it does not say)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    dtype = str(getattr(text, "dtype", None) or getattr(config, "dtype", None) or "").removeprefix("torch.")
    return 0.5 if getattr(config, "quantization_config", None) else {"float32": 4, "float64": 8}.get(dtype, 2)


def judge_sizes(recipe: Recipe) -> ModelSizes | None:
    """The judge's parameter count (eval.judge), from its config on the meta device; None without one."""
    if not (recipe.eval.enabled and recipe.eval.judge):
        return None
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    try:
        with _quiet():
            config = AutoConfig.from_pretrained(judge_path(recipe), trust_remote_code=recipe.model.trust_remote_code)
            with torch.device("meta"):
                model = AutoModelForSequenceClassification.from_config(config, trust_remote_code=recipe.model.trust_remote_code)
    except Exception:  # noqa: BLE001 - check_judge and evaluate say what is wrong with it, in their words
        return None
    params = model.num_parameters()
    return ModelSizes(params=params, trainable=0, stored_bytes=_stored_bytes(config))


# ---------------------------------------------------------------------------------------------
# The judge (eval.judge), from its config: evaluate loads it only after training


def judge_path(recipe: Recipe) -> str:
    """eval.judge as a local folder (as written, or relative to the recipe) or a Hub id."""
    name = recipe.eval.judge or ""
    for candidate in (Path(name).expanduser(), Path(recipe.resolve_path(name))):
        if candidate.is_dir():
            return str(candidate)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise AlignpressError(f"judge folder {name!r} does not exist", source=recipe.where("eval.judge"), field="eval.judge")
    return name


def check_judge(recipe: Recipe, local_only: bool = False) -> str | None:
    """A reward model named in eval.judge, from its config alone: it is found, it is not a
    generative model, and it has one output. None when there is no judge to run; a line saying
    what was checked, or why it was deferred (local_only: a Hub judge not on this machine)."""
    if not (recipe.eval.enabled and recipe.eval.judge):
        return None
    from transformers import AutoConfig

    name, field = recipe.eval.judge, "eval.judge"
    path = judge_path(recipe)
    kwargs: dict[str, Any] = {"trust_remote_code": recipe.model.trust_remote_code}
    if not Path(path).is_dir():
        kwargs["local_files_only"] = local_only
    try:
        with _quiet():
            config = AutoConfig.from_pretrained(path, **kwargs)
    except Exception as e:  # noqa: BLE001
        if local_only and not Path(path).is_dir():
            return f"judge check deferred: the config of {name!r} is not on this machine (run and train check it before anything else; `validate --hub` fetches it now)"
        raise AlignpressError(
            f"could not load the judge {name!r}'s config: {type(e).__name__}: {_first_line(e)}. Check the Hub id, your network, and HF_TOKEN for gated models",
            source=recipe.where(field), field=field,
        ) from None
    archs = list(getattr(config, "architectures", None) or [])
    arch = archs[0] if archs else type(config).__name__
    if archs and all(a.endswith(("ForCausalLM", "ForConditionalGeneration")) for a in archs):
        raise AlignpressError(f"the judge {name!r} is a {arch}, a generative model; a judge is a reward model (sequence classification with one output)",
                              source=recipe.where(field), field=field)
    if config.num_labels != 1:
        raise AlignpressError(f"the judge {name!r} has {config.num_labels} outputs; a reward model has one (num_labels=1)", source=recipe.where(field), field=field)
    return f"judge {arch} with one output (config from {path})"


# ---------------------------------------------------------------------------------------------
# Truncation, from the prepared pairs' token counts


def check_truncation(recipe: Recipe, rows: list[dict[str, Any]]) -> int:
    """The number of training pairs TRL would cut at dpo.max_length; refuses more than
    dpo.max_truncated_fraction of them (dpo.max_length may have changed since prepare ran)."""
    limit = recipe.dpo.max_length
    cut = sum(1 for r in rows if r["prompt_tokens"] + max(r["chosen_tokens"], r["rejected_tokens"]) > limit)
    if rows and cut / len(rows) > recipe.dpo.max_truncated_fraction:
        raise _fail(recipe, "dpo.max_length", f"{cut} of {len(rows)} prepared training pairs ({cut / len(rows):.1%}) are longer than "
                                              f"{limit} tokens and TRL would cut their answers (dpo.max_truncated_fraction allows "
                                              f"{recipe.dpo.max_truncated_fraction:.1%}); run the prepare stage again (it keeps pairs within "
                                              "dpo.max_length), raise dpo.max_length, or raise dpo.max_truncated_fraction")
    if cut:
        log.warning("%d of %d training pairs are longer than dpo.max_length (%d tokens): TRL cuts their answers", cut, len(rows), limit)
    return cut
