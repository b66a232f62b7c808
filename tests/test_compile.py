"""train.compile_layers: decoder layers compiled in place give the eager numbers, and share graphs.

Each case builds the same trainer twice on identical tiny models (float32, CPU; the helpers of
test_prefix_dpo.py), compiles the decoder layers of the second (alignpress.modeling.compile_layers)
and compares the policy and reference log-probs, the loss, the logged metrics and every gradient
within 1e-5. Here torch.compile runs with backend aot_eager: Dynamo and AOTAutograd capture the
layers exactly as in a run (the same graphs, guards, checkpointing and backward), and torch's own
kernels run them. That is what our wiring can get wrong. The Inductor code a run really uses is
checked through the entry point, once (test_levers.py); on the CPU it takes about a minute to compile.
"""

import pytest
import torch
from test_prefix_dpo import assert_same, build, step
from torch._dynamo.utils import counters
from transformers import Phi3Config

import alignpress.modeling as modeling
from alignpress.modeling import compile_layers, limit_checkpointing
from alignpress.prefix_dpo import PrefixSharedDPOTrainer
from alignpress.refcache import StableKeyDPOTrainer


@pytest.fixture
def aot_eager(monkeypatch):
    compile_ = torch.compile
    monkeypatch.setattr(modeling.torch, "compile", lambda fn, **kw: compile_(fn, backend="aot_eager", **kw))
    torch._dynamo.reset()


def trainer(case, tmp, compiled, layers=2, monkeypatch=None):
    kind, shared, checkpointed = case
    kw = {"loss_type": ["sigmoid", "sft"], "max_length": 40, "gradient_checkpointing": checkpointed is not None}
    if shared:
        kw["pairs_per_row"] = 2
    if layers != 2:  # test_prefix_dpo.fresh_model builds 2
        import test_prefix_dpo

        monkeypatch.setattr(test_prefix_dpo, "Phi3Config", lambda **c: Phi3Config(**{**c, "num_hidden_layers": layers}))
    t = build(PrefixSharedDPOTrainer if shared else StableKeyDPOTrainer, kind, True, tmp, attn="eager" if kind == "gemma2" else "sdpa", **kw)
    control = limit_checkpointing(t.model, checkpointed) if checkpointed else None
    if compiled:
        assert compile_layers(t.model) == layers
    return t, control


CASES = {
    # kind, prefix-shared (2 pairs a row), checkpointed layers (per-layer hook), decoder layers, graphs compiled
    "phi3-window-shared-checkpoint-1-of-4": ("phi3-window", True, 1, 4, 6),
    "gemma2-softcap-window-standard-checkpoint-all": ("gemma2", False, 2, 2, 5),
}


@pytest.mark.parametrize("case", list(CASES))
def test_compiled_layers_give_the_same_numbers(case, tmp_path, aot_eager, monkeypatch):
    kind, shared, checkpointed, layers, graphs = CASES[case]
    eager, _ = trainer((kind, shared, checkpointed), tmp_path / "eager", compiled=False, layers=layers, monkeypatch=monkeypatch)
    expected = step(eager)
    counters.clear()
    compiled, control = trainer((kind, shared, checkpointed), tmp_path / "compiled", compiled=True, layers=layers, monkeypatch=monkeypatch)
    got = step(compiled)
    assert_same(expected, got)
    # The compiled layers ran (a fallback to eager captures nothing), and the layers share graphs: one
    # per kind of call (training with and without checkpointing, the first layer or a later one,
    # without grad, adapter off): Phi-3 compiles 6 with 4 layers as with 2 (a compile per layer: 4 x more).
    assert counters["stats"]["unique_graphs"] == graphs
    assert control.seen == {checkpointed: 1}  # the per-layer checkpointing hook stayed eager and still decided


def test_graphs_at_the_recompile_limit_are_reported(caplog):
    """Beyond Dynamo's recompile limit (8 for the one code object all layers share) a new kind of
    call runs eager: the run says so rather than leaving a slow step unexplained."""
    from test_prefix_dpo import fresh_model

    from alignpress.tiny import phi3_tokenizer
    from alignpress.train import apply_compile

    systems = {"compile_layers": True}
    record = apply_compile(fresh_model("phi3", phi3_tokenizer()), systems)
    counters["stats"]["unique_graphs"] += 7  # as if 7 kinds of call had compiled
    with caplog.at_level("INFO", logger="alignpress"):
        record()
    assert systems["compiled_graphs"] == 7 and "reach Dynamo's recompile limit" not in caplog.text
    counters["stats"]["unique_graphs"] += 1
    with caplog.at_level("INFO", logger="alignpress"):
        record()
    assert systems["compiled_graphs"] == 8
    assert "torch.compile: 8 graphs reach Dynamo's recompile limit (8); calls of any further kind ran eager" in caplog.text
    assert apply_compile(fresh_model("phi3", phi3_tokenizer()), {"compile_layers": False}) is None
