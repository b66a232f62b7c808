"""Loading the base model and tokenizer the way every stage needs them.

The loading code is the real transformers path (`from_pretrained` on a Hub id or a folder);
`builtin:` names are folders alignpress builds itself (the demo's tiny model) and then loads
through that same path.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch

from .errors import AlignpressError, first_line
from .recipe import Recipe, chat_template_text

log = logging.getLogger("alignpress")

PAD_TOKEN = "<|pad|>"


def cache_home() -> Path:
    return Path(os.environ.get("ALIGNPRESS_HOME", Path.home() / ".cache" / "alignpress"))


def builtin_name(recipe: Recipe) -> str:
    """NAME of the recipe's `builtin:NAME` model, refused with the recipe's file when alignpress has
    no such model (validate used to defer it, and run named no file)."""
    from .demo import BUILTINS

    short = recipe.model.name_or_path.removeprefix("builtin:")
    if short not in BUILTINS:
        raise AlignpressError(f"unknown builtin model {short!r}; known: {', '.join(BUILTINS)}", source=recipe.source, field="model.name_or_path")
    return short


def built_builtin(name: str) -> Path | None:
    """The folder of a `builtin:NAME` model when it is already built, else None (checks never build it)."""
    from .demo import BUILTINS, VERSION

    short = name.removeprefix("builtin:")
    folder = cache_home() / "models" / f"{short}-v{VERSION}"
    return folder if short in BUILTINS and (folder / ".complete").exists() else None


def resolve_model_path(recipe: Recipe) -> str:
    """A local folder or a Hub id for `model.name_or_path`; builds builtin models on first use."""
    name = recipe.model.name_or_path
    if name.startswith("builtin:"):
        from .demo import build_builtin_model

        return str(build_builtin_model(builtin_name(recipe), cache_home() / "models"))
    for candidate in (Path(name).expanduser(), Path(recipe.resolve_path(name))):
        if candidate.is_dir():
            if not (candidate / "config.json").exists():
                raise AlignpressError(f"{candidate} has no config.json: not a transformers model folder", source=recipe.source, field="model.name_or_path")
            return str(candidate)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise AlignpressError(f"model folder {name!r} does not exist", source=recipe.source, field="model.name_or_path")
    return name  # a Hub id


def cuda_problem() -> str:
    """Why torch cannot use a CUDA GPU here, in torch's own words where it has them."""
    if torch.version.cuda is None:
        return f"this torch ({torch.__version__}) is built without CUDA"
    try:
        torch.cuda.init()
    except Exception as e:  # noqa: BLE001 - torch raises RuntimeError/AssertionError with the driver's reason
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return f"torch {torch.__version__} (CUDA {torch.version.cuda}): {reason}"
    return f"torch {torch.__version__} (CUDA {torch.version.cuda}) finds no GPU"


def pick_device(recipe: Recipe) -> str:
    want = recipe.train.device
    if want == "cuda" and not torch.cuda.is_available():
        raise AlignpressError(f"train.device is cuda but no CUDA GPU can be used: {cuda_problem()}", source=recipe.source, field="train.device")
    if want == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return want


def pick_dtype(recipe: Recipe, device: str) -> torch.dtype:
    name = recipe.model.dtype
    if name == "auto":
        if device == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if device == "cpu" and name == "float16":
        raise AlignpressError("float16 training is not supported on the CPU; use float32 or bfloat16", source=recipe.source, field="model.dtype")
    return getattr(torch, name)


def weights_dtype(recipe: Recipe, dtype: torch.dtype) -> torch.dtype:
    """The dtype training loads the model's weights in, for the compute dtype `dtype` (pick_dtype)."""
    from .disk import full_weights_in_fp32

    return torch.float32 if full_weights_in_fp32(recipe) else dtype


def preflight(recipe: Recipe, needs_gpu: bool = True, training: bool = False) -> None:
    """Environment checks that must fail before any data or model is loaded: the GPU and 4-bit
    needs (needs_gpu=False for prepare, which loads only the tokenizer); and for the commands that
    lead to training (training=True), TRL's and transformers' judgement of the training settings
    and the model's shape from its config (checks.py; for a Hub model this fetches config.json)."""
    from .checks import check_judge, check_model, check_training_settings

    if training:
        check_training_settings(recipe)
        log.info("%s", check_model(recipe))
        if judged := check_judge(recipe):
            log.info("%s", judged)
    if not needs_gpu:
        return
    if recipe.model.load_in_4bit:
        if not torch.cuda.is_available():
            raise AlignpressError(
                "4-bit QLoRA needs a CUDA GPU (bitsandbytes); this machine has none. "
                "Set model.load_in_4bit: false (e.g. --set model.load_in_4bit=false) to train in 16/32-bit",
                source=recipe.source,
                field="model.load_in_4bit",
            )
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise AlignpressError("4-bit QLoRA needs the bitsandbytes package: pip install bitsandbytes", source=recipe.source, field="model.load_in_4bit") from None
    device = pick_device(recipe)
    if recipe.train.device == "auto" and device == "cpu" and (expected := gpu_expected(recipe, training)):
        raise AlignpressError(
            f"train.device is auto and torch cannot use a CUDA GPU ({cuda_problem()}), but {expected}: the run would "
            "go on on the CPU. Make the GPU usable (docker run --gpus all; a driver for this torch's CUDA), or set "
            "train.device=cpu to run on the CPU on purpose",
            source=recipe.source,
            field="train.device",
        )
    pick_dtype(recipe, device)
    if recipe.train.use_liger_kernel and device == "cuda" and (problem := liger_problem(device)):
        raise AlignpressError(problem, source=recipe.source, field="train.use_liger_kernel")
    if training and recipe.train.compile_layers and (problem := compile_problem(device)):
        raise AlignpressError(f"{problem}. Or set train.compile_layers: false", source=recipe.source, field="train.compile_layers")
    if training and device == "cpu" and recipe.model.attn_implementation == "flex_attention":
        # torch raises this only at the first backward, after the data and model have loaded.
        raise AlignpressError(
            f"flex_attention cannot train on the CPU: torch {torch.__version__} has no FlexAttention backward there. "
            "Use sdpa (the default) on the CPU, e.g. --set model.attn_implementation=sdpa",
            source=recipe.source,
            field="model.attn_implementation",
        )


def check_gpus(recipe: Recipe) -> None:
    """One process that sees several CUDA GPUs, not started by a launcher and with no
    train.accelerate_config to relaunch under: transformers would train with torch's DataParallel
    (4-bit: on the first GPU alone) on GPUs x train.per_device_train_batch_size pairs per micro-batch,
    not the recipe's batch, while the run's records say one process. And a relaunch asked for more
    processes (train.num_processes) than there are GPUs. Refused before anything loads."""
    if "LOCAL_RANK" in os.environ or pick_device(recipe) != "cuda":
        return
    n = torch.cuda.device_count()
    wanted = recipe.train.num_processes
    if recipe.train.accelerate_config and wanted and wanted > n:
        # The relaunch would start them all; those past the last GPU fail on their device, after loading.
        raise AlignpressError(f"is {wanted}, but this machine has {n} CUDA GPU{'s' if n != 1 else ''}: one process per GPU, "
                              f"so at most {n} (or leave it unset: one per visible GPU)", source=recipe.source, field="train.num_processes")
    if recipe.train.accelerate_config:
        check_shared_memory(recipe, planned_processes(recipe) or n)
    if recipe.train.accelerate_config or n < 2:
        return
    raise AlignpressError(
        f"{n} CUDA GPUs are visible to this one process: transformers would train with DataParallel on {n}x "
        f"train.per_device_train_batch_size pairs per micro-batch, not the recipe's batch. Use them all, one process each: "
        f"--set train.accelerate_config=ddp (each optimizer step then takes {n}x the pairs); or one: CUDA_VISIBLE_DEVICES=0 "
        "(docker run --gpus device=0)",
        source=recipe.source,
        field="train.accelerate_config",
    )


# NCCL's troubleshooting guide asks a container for --shm-size=1g: below that it may fail to start.
NCCL_SHM_BYTES = 1 << 30
SHM = Path("/dev/shm")


def check_shared_memory(recipe: Recipe, processes: int, shm: Path | None = None) -> None:
    """Several GPU processes on one machine talk through NCCL, which keeps buffers in /dev/shm and
    fails as they start ("failed to extend /dev/shm/nccl-...") when it is small: Docker gives a
    container 64 MiB unless told otherwise (SkyPilot's containers get more). Refused before the
    launch; NCCL_SHM_DISABLE=1 (NCCL without it) is the user's own choice."""
    if processes < 2 or os.environ.get("NCCL_SHM_DISABLE") == "1":
        return
    import shutil

    shm = shm or SHM

    try:
        total = shutil.disk_usage(shm).total
    except OSError:
        return  # no /dev/shm (not Linux): NCCL does not run there either
    if total < NCCL_SHM_BYTES:
        from .disk import size_text

        raise AlignpressError(
            f"the {processes} GPU processes would talk through NCCL, which keeps its buffers in {shm}, and {shm} holds "
            f"{size_text(total)} (Docker gives a container 64 MB unless told): NCCL would fail as they start. Give the container more, "
            "as NCCL's guide asks: docker run --shm-size=1g (or --ipc=host)",
            source=recipe.source, field="train.accelerate_config")


def planned_processes(recipe: Recipe) -> int | None:
    """How many processes this command trains with: the launcher's (WORLD_SIZE), the relaunch's
    (train.num_processes, its accelerate config's, else one per visible GPU), or 1; None when the
    launch decides it and this process cannot tell (a relaunch on the CPU without a number)."""
    if "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    if not recipe.train.accelerate_config:
        return 1
    if recipe.train.num_processes:
        return recipe.train.num_processes
    import yaml

    from .recipe import accelerate_config_path

    config = yaml.safe_load(Path(accelerate_config_path(recipe)).read_text()) or {}
    if config.get("num_processes"):
        return int(config["num_processes"])
    return torch.cuda.device_count() if pick_device(recipe) == "cuda" else None


# A model this large trains for days on a CPU: `auto` falling back to the CPU is then a broken GPU
# setup, not a choice (train.device: cpu makes it one).
CPU_TRAINING_MAX_PARAMS = 1_000_000_000


def gpu_expected(recipe: Recipe, training: bool) -> str | None:
    """Why this run is meant for a GPU although torch cannot use one, or None: an NVIDIA container
    (`docker run --gpus`, and CUDA base images, set NVIDIA_VISIBLE_DEVICES), an NVIDIA device node
    on the machine, or (training) a model too large for the CPU."""
    visible = os.environ.get("NVIDIA_VISIBLE_DEVICES", "")
    if visible not in ("", "void", "none"):
        return f"NVIDIA_VISIBLE_DEVICES is {visible!r} (a GPU container)"
    if os.path.exists("/dev/nvidia0"):
        return "this machine has an NVIDIA GPU (/dev/nvidia0)"
    if training:
        from .checks import model_sizes

        params = model_sizes(recipe).params
        if params >= CPU_TRAINING_MAX_PARAMS:
            return f"{recipe.model.name_or_path} has {params / 1e9:.1f}B parameters (days of training on a CPU)"
    return None


def compile_problem(device: str) -> str | None:
    """Why torch.compile (train.compile_layers) cannot run here, or None when it can: Inductor writes
    Triton kernels on a GPU (Triton builds a small C launcher with the system's compiler) and C++ on
    the CPU, both at the first step, after the data and the model have loaded."""
    import shutil

    if device == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return "torch.compile on a GPU needs Triton, which comes with the CUDA torch wheel; this torch has none"
    compilers = ("cc", "gcc", "clang") if device == "cuda" else ("c++", "g++", "clang++")
    if not any(shutil.which(c) for c in (os.environ.get("CC" if device == "cuda" else "CXX"), *compilers) if c):
        return f"torch.compile needs a C{'' if device == 'cuda' else '++'} compiler ({', '.join(compilers)}) on PATH; none was found (apt-get install g++)"
    return None


def compile_layers(model) -> int:
    """torch.compile every decoder layer's forward in place (regional compilation); returns how many.

    The layers share compiled graphs: Dynamo caches by code and treats each layer's parameters as
    inputs, so 32 layers compile once per kind of call (training, no grad, adapter off, checkpointed).
    In place, because TRL's fused LM head and prefix sharing wrap the model's forward around the
    original modules: accelerate's compile_regions returns a copy of the module tree, whose compiled
    layers those wrappers would never call. The bound `forward` is compiled, not the module
    (`Module.compile` would trace its hooks too): forward hooks such as the per-batch checkpointing
    choice (CheckpointedLayers) mutate Python state and stay eager; transformers' checkpoint
    decision is inside `forward`, so a checkpointed layer and a plain one get a graph each.
    dynamic=True: length grouping gives every micro-batch another length, and one symbolic graph
    replaces a compile per length. Calls with a KV cache (the greedy samples of the training health
    check) run eager: each cache layer's state is guarded on, so every layer and every decoding step
    would compile again, up to Dynamo's limit.
    """
    layers = decoder_layers(model)
    for layer in layers:
        eager = layer.forward
        compiled = torch.compile(eager, dynamic=True)

        def forward(*args, _eager=eager, _compiled=compiled, **kwargs):
            return (_eager if kwargs.get("past_key_values") is not None else _compiled)(*args, **kwargs)

        layer.forward = forward
    return len(layers)


def liger_problem(device: str) -> str | None:
    """Why Liger's kernels (train.use_liger_kernel) cannot run here, or None when they can."""
    if device != "cuda":
        return "Liger's kernels are Triton code for CUDA GPUs; this run is on the CPU"
    try:
        import liger_kernel  # noqa: F401
    except ImportError:
        return "the liger-kernel package is not installed (pip install -r requirements-gpu.lock)"
    return None


def _hub_error(recipe: Recipe, name: str, e: Exception, path: str | None = None) -> AlignpressError:
    """A model that did not load. The Hub's advice only where the Hub was asked: a folder on this
    machine (a builtin model, a local one) failed in its loader, and the advice sent users to check
    a token for a DeepSpeed assertion."""
    advice = (f"{path} is a folder on this machine: the error is its loader's, not the Hub's" if path and Path(path).is_dir()
              else "Check the Hub id and revision, your network, and HF_TOKEN for gated models")
    return AlignpressError(
        f"could not load {name!r}: {type(e).__name__}: {first_line(e)}. {advice}",
        source=recipe.source,
        field="model.name_or_path",
    )


def load_tokenizer(recipe: Recipe, path: str | None = None):
    """The model's tokenizer, with a chat template and a pad token that is not the eos token.

    Padding with the eos token lets a collator or generation mask hide the real end of an answer,
    so the model never learns to stop; alignpress gives the tokenizer a distinct pad token.
    """
    from transformers import AutoTokenizer

    path = path or resolve_model_path(recipe)
    try:
        tok = AutoTokenizer.from_pretrained(path, revision=recipe.model.revision, trust_remote_code=recipe.model.trust_remote_code)
    except Exception as e:  # noqa: BLE001 - every loading failure gets the same clear message
        raise _hub_error(recipe, recipe.model.name_or_path, e, path) from None
    if recipe.model.chat_template:
        tok.chat_template = chat_template_text(recipe)
    if not getattr(tok, "chat_template", None):
        raise AlignpressError(
            f"the tokenizer of {recipe.model.name_or_path!r} has no chat template; set model.chat_template in the recipe",
            source=recipe.source,
            field="model.chat_template",
        )
    if tok.eos_token is None:
        raise AlignpressError("the tokenizer has no eos token", source=recipe.source, field="model.name_or_path")
    fix_pad_token(tok)
    tok.padding_side = "left"  # generation pads on the left; TRL's collator pads by length, not by id
    return tok


def fix_pad_token(tok) -> str:
    """Make pad distinct from eos. Returns what was done, for the log."""
    if tok.pad_token is not None and tok.pad_token_id != tok.eos_token_id:
        return "kept"
    if tok.unk_token is not None and tok.unk_token_id != tok.eos_token_id:
        tok.pad_token = tok.unk_token
        return "unk"
    tok.add_special_tokens({"pad_token": PAD_TOKEN})
    return "added"


def eos_ids(generation_config) -> list[int]:
    """A generation config's eos_token_id (None, one id or a list) as a list."""
    eos = getattr(generation_config, "eos_token_id", None)
    return list(eos) if isinstance(eos, (list, tuple)) else [eos] if eos is not None else []


def stop_token_ids(tok, model=None) -> list[int]:
    """Token ids that end an answer: the generation config's eos ids plus the tokenizer's eos."""
    ids = eos_ids(getattr(model, "generation_config", None))
    if tok.eos_token_id not in ids:
        ids.append(tok.eos_token_id)
    if (end := turn_end_id(tok)) is not None and end not in ids:
        ids.append(end)
    return ids


def turn_end_id(tok) -> int | None:
    """The special token the chat template writes right after an assistant's answer (Gemma's
    <end_of_turn>, Phi-3's <|end|>), or None. Training answers end with it, but gemma-2b-it's
    generation config stops only at <eos>, so greedy answers ran on past the end of the turn."""
    mark = "Zq7Xv"
    try:
        text = tok.apply_chat_template([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": mark}], tokenize=False)
    except Exception:  # noqa: BLE001 - no template, or one that refuses this conversation: no end token to add
        return None
    rest = text[text.rfind(mark) + len(mark):] if mark in text else ""
    ids = tok(rest, add_special_tokens=False)["input_ids"] if rest else []
    special = set(tok.all_special_ids) | {i for i, t in getattr(tok, "added_tokens_decoder", {}).items() if t.special}
    return ids[0] if ids and ids[0] in special else None


def load_model(recipe: Recipe, path: str, *, device: str, dtype: torch.dtype, quantized: bool = False, tokenizer=None, training: bool = False):
    """AutoModelForCausalLM from `path`, on `device`; resizes embeddings if the tokenizer gained a pad token.

    FlexAttention (model.attn_implementation: flex_attention) is for training only: evaluation and
    export (training=False) run padded batches and generation, whose shapes change every call, and
    each new shape would cost a compile (on the CPU, where export may run, an Inductor build), for
    no gain; they load transformers' default (SDPA). config.json never records the backend.
    """
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": recipe.model.trust_remote_code}
    if recipe.model.revision and not Path(path).is_dir():
        kwargs["revision"] = recipe.model.revision
    if recipe.model.attn_implementation and (training or recipe.model.attn_implementation != "flex_attention"):
        kwargs["attn_implementation"] = recipe.model.attn_implementation
    if quantized:
        from transformers import BitsAndBytesConfig

        # The seed's QLoRA settings: NF4 with double quantisation, compute in the training dtype.
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
        )
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except Exception as e:  # noqa: BLE001
        raise _hub_error(recipe, recipe.model.name_or_path, e, path) from None
    if tokenizer is not None and len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    if tokenizer is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
        if model.generation_config is not None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id
    if not quantized:
        model.to(device)
    return model


def base_model_revision(recipe: Recipe, path: str) -> str | None:
    """The commit the base was loaded from, when it came from the Hub cache; None for local folders."""
    if Path(path).is_dir():
        return None
    try:
        from huggingface_hub import HfApi

        return HfApi().model_info(path, revision=recipe.model.revision).sha
    except Exception:  # noqa: BLE001 - offline: the revision asked for is the best we know
        return recipe.model.revision


def decoder_layers(model) -> list[torch.nn.Module]:
    """The repeated decoder layers that transformers can checkpoint, in order (input to output)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


class CheckpointedLayers:
    """Gradient checkpointing for the first `count` decoder layers only; the others keep their
    activations. With `decide`, the count is chosen again for every training forward from the
    shape of its hidden states, (rows, positions) -> count: a short micro-batch then recomputes
    less than the longest one, whose count `auto` sized for the GPU.

    transformers 5.23 can checkpoint a subset itself (`every_n_layers`), but TRL 1.16 turns
    checkpointing off around every reference forward and back on with
    `gradient_checkpointing_enable(kwargs)`, which resets every layer to checkpointed and passes the
    argument on to torch, which refuses it (trl.models.utils.disable_gradient_checkpointing; pinned
    in tests/test_checkpointing.py). So each layer sets its own flag just before it runs (a forward
    pre-hook): checkpointed when it is among the first `count`, the forward builds a graph (grad
    enabled, training) and checkpointing was enabled on the model (its function installed), however
    often TRL switched it. The first layers are the ones recomputed because backward rebuilds them
    last, when the later layers have already freed their activations (flops.memory_estimate counts
    it so). `seen` counts training forwards by the count they ran with.
    """

    def __init__(self, model, count: int, decide: Callable[[int, int], int] | None = None):
        self.layers = decoder_layers(model)
        self.count = count
        self.decide = decide
        self.seen: Counter[int] = Counter()
        for i, layer in enumerate(self.layers):
            layer.register_forward_pre_hook(partial(self._before, i), with_kwargs=True)

    def _before(self, index: int, module, args, kwargs) -> None:
        building = torch.is_grad_enabled() and module.training
        if index == 0 and building:
            if self.decide is not None:
                hidden = args[0] if args else kwargs["hidden_states"]
                self.count = self.decide(hidden.shape[0], hidden.shape[1])
            self.seen[self.count] += 1
        module.gradient_checkpointing = building and index < self.count and getattr(module, "_gradient_checkpointing_func", None) is not None


def limit_checkpointing(model, layers: int, decide: Callable[[int, int], int] | None = None) -> CheckpointedLayers:
    """Checkpoint the first `layers` decoder layers of `model` (or as `decide` says, per forward)."""
    return CheckpointedLayers(model, layers, decide)
