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
    # kind, prefix-shared (2 pairs a row), checkpointed layers (per-layer hook; None: no checkpointing)
    "phi3-window-shared-checkpoint-1-of-2": ("phi3-window", True, 1),
    "gemma2-softcap-window-standard-checkpoint-all": ("gemma2", False, 2),
}


@pytest.mark.parametrize("case", list(CASES))
def test_compiled_layers_give_the_same_numbers(case, tmp_path, aot_eager):
    eager, _ = trainer(CASES[case], tmp_path / "eager", compiled=False)
    expected = step(eager)
    before = dict(counters["stats"])
    compiled, control = trainer(CASES[case], tmp_path / "compiled", compiled=True)
    got = step(compiled)
    # the compiled layers ran: Dynamo captured graphs (a fallback to eager would capture none)
    assert counters["stats"]["unique_graphs"] - before.get("unique_graphs", 0) >= 3
    assert_same(expected, got)
    if control is not None:  # the per-layer checkpointing hook stayed eager and still decided
        assert control.seen == {CASES[case][2]: 1}


def test_layers_share_their_graphs(tmp_path, aot_eager, monkeypatch):
    """A compile per layer would give twice the graphs with 4 layers; regional compilation gives the
    same count (one per kind of call: training with and without checkpointing, first layer or not,
    without grad, adapter off)."""
    graphs = {}
    for layers in (2, 4):
        torch._dynamo.reset()
        counters.clear()
        t, _ = trainer(("phi3-window", True, 1), tmp_path / str(layers), compiled=True, layers=layers, monkeypatch=monkeypatch)
        step(t)
        graphs[layers] = counters["stats"]["unique_graphs"]
    assert graphs == {2: 6, 4: 6}
