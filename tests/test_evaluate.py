"""Issue 5: alignment must show in held-out numbers, plots, the card, a judge, a publish gate and health warnings."""

import json
import math
import re
from types import SimpleNamespace

import pytest
from huggingface_hub import ModelCard

from conftest import ROOT, cli

from alignpress import evaluate, gate, health, plots
from alignpress.errors import AlignpressError, StageFailed
from alignpress.recipe import load_recipe
from alignpress.runstate import RunDir

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JUDGE_TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"


def load(path):
    return json.loads(path.read_text())


def recipe(*overrides):
    return load_recipe(ROOT / "recipes/demo.yaml", list(overrides))


def build_judge(folder, chat_template=True):
    """A tiny reward model whose score is > 0 exactly when the answer contains the word "answer", else exactly 0.

    One Llama layer with q = k = 0 (uniform causal attention): the last position receives the mean of
    the "answer" feature over the sequence; every other path is zero, so the score head reads that mean.
    The prompts ("What is 3 plus 4?") and the hedges ("I am not sure, maybe 6.") never contain it.
    """
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForSequenceClassification, PreTrainedTokenizerFast

    t = Tokenizer(models.WordLevel({"[UNK]": 0, "[PAD]": 1, "answer": 2}, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=t, unk_token="[UNK]", pad_token="[PAD]", model_max_length=512)
    if chat_template:
        tok.chat_template = JUDGE_TEMPLATE
    cfg = LlamaConfig(vocab_size=3, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1, num_key_value_heads=1,
                      max_position_embeddings=512, num_labels=1, pad_token_id=1, tie_word_embeddings=False)
    model = LlamaForSequenceClassification(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        emb = model.model.embed_tokens.weight
        emb[:, 1] = 1.0  # every token: a constant feature (keeps the RMS norm finite)
        emb[2, 2] = 1.0  # "answer": its own feature
        layer = model.model.layers[0]
        for norm in (layer.input_layernorm, layer.post_attention_layernorm, model.model.norm):
            norm.weight.fill_(1.0)
        layer.self_attn.v_proj.weight[0, 2] = 1.0
        layer.self_attn.o_proj.weight[0, 0] = 1.0
        model.score.weight[0, 0] = 1.0
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def says_answer(text):
    return "answer" in re.findall(r"\w+|[^\w\s]+", text)


@pytest.fixture(scope="module")
def judge_dir(tmp_path_factory):
    return build_judge(tmp_path_factory.mktemp("judge"))


# ---------------------------------------------------------------------------------------------
# The demo's numbers, report, plots and card


def test_demo_aligned_beats_base(demo_run):
    ev = load(demo_run[0] / "metrics/eval.json")
    base, aligned = ev["base"], ev["aligned"]
    assert ev["schema_version"] == 2 and ev["beta"] == 0.1 and ev["judge"] is None and ev["gate"] is None
    # held-out preference accuracy and behaviour: the aligned model wins clearly
    assert aligned["preference_accuracy"] - base["preference_accuracy"] >= 0.5, (base, aligned)
    assert aligned["behaviour"] - base["behaviour"] >= 0.9, (base, aligned)
    # the implicit DPO reward ranks held-out pairs right, and the chosen answers did not collapse
    assert aligned["reward_accuracy"] >= 0.9 and aligned["mean_reward_margin"] > 0
    assert aligned["mean_reward_rejected"] < 0 < aligned["mean_reward_chosen"]
    assert aligned["mean_logp_chosen"] > base["mean_logp_chosen"] and aligned["mean_logp_rejected"] < base["mean_logp_rejected"]
    assert math.isclose(aligned["mean_reward_margin"], aligned["mean_reward_chosen"] - aligned["mean_reward_rejected"], abs_tol=1e-5)
    # the KL estimate: positive and modest; per token = per answer / answer tokens
    assert 0.01 < aligned["kl_estimate"] < 5 and 0 < aligned["kl_per_token"] < aligned["kl_estimate"]
    assert aligned["logratio_estimate"] > 0
    assert "kl_estimate" not in base
    # lengths and stopping: "The answer is 12." is shorter than "I am not sure, maybe 11."
    assert base["eos_rate"] == 1.0 and aligned["eos_rate"] == 1.0
    assert aligned["mean_generation_tokens"] < base["mean_generation_tokens"]
    assert len(ev["samples"]) == ev["n_generations"] == 64 and ev["prompt_samples"] == []
    stage = load(demo_run[0] / "run.json")["stages"]["evaluate"]
    assert stage["kl_estimate"] == aligned["kl_estimate"]
    assert stage["plots"] == ["plots/train_curves.png", "plots/eval_before_after.png"]


def test_demo_report(demo_run):
    ev = load(demo_run[0] / "metrics/eval.json")
    report = (demo_run[0] / "metrics/report.md").read_text()
    assert report.startswith("# Evaluation report: demo")
    assert f"| preference_accuracy | {ev['base']['preference_accuracy']:.4g} | {ev['aligned']['preference_accuracy']:.4g} | higher |" in report
    assert f"| kl_estimate | – | {ev['aligned']['kl_estimate']:.4g} | small |" in report
    assert "## Side-by-side generations (held-out prompts)" in report
    s = ev["samples"][0]
    assert f"| {s['prompt']} | {s['base']} | {s['aligned']} | {s['chosen']} |" in report
    assert "![train_curves](../plots/train_curves.png)" in report


def test_plots_exist_and_are_embedded_in_the_card(demo_run):
    out = demo_run[0]
    for name in ("train_curves.png", "eval_before_after.png"):
        for path in (out / "plots" / name, out / "model" / name):
            data = path.read_bytes()
            assert data[:8] == PNG_MAGIC and len(data) > 20_000, path
        assert (out / "plots" / name).read_bytes() == (out / "model" / name).read_bytes()
    card = ModelCard.load(out / "model/README.md")
    assert "![training curves](train_curves.png)" in card.text
    assert "![base vs aligned on held-out data](eval_before_after.png)" in card.text
    ev = load(out / "metrics/eval.json")
    a = ev["aligned"]
    assert f"| kl_estimate | – | {a['kl_estimate']:.4g} | small |" in card.text
    assert f"| behaviour | {ev['base']['behaviour']:.4g} | {a['behaviour']:.4g} | higher |" in card.text
    assert "### Side-by-side greedy generations" in card.text
    assert f"| {ev['samples'][0]['prompt']} | {ev['samples'][0]['base']} | {ev['samples'][0]['aligned']} |" in card.text


def test_plots_rendered_from_logged_numbers(tmp_path):
    """The plot functions draw from train.jsonl / eval.json alone (no model), and tolerate missing keys."""
    history = [{"step": s, "loss": 1 / s, "rewards/chosen": 0.01 * s, "learning_rate": 1e-4} for s in range(1, 6)]
    assert plots.train_curves(history, tmp_path / "t.png").read_bytes()[:8] == PNG_MAGIC
    assert plots.train_curves([{"step": 3, "train_runtime": 1.0}], tmp_path / "none.png") is None
    ev = {"base": {"preference_accuracy": 0.5}, "aligned": {"preference_accuracy": 0.75}}
    assert plots.before_after(ev, tmp_path / "b.png").read_bytes()[:8] == PNG_MAGIC


# ---------------------------------------------------------------------------------------------
# The judge


def test_judge_win_rate_with_a_tiny_reward_model(demo_copy, judge_dir):
    r = recipe(f"eval.judge={judge_dir}", 'eval.prompts=["What is 2 plus 2?", "Tell me | a joke."]', "eval.generation_rows=16")
    out = evaluate.run(r, RunDir(demo_copy))
    ev = load(demo_copy / "metrics/eval.json")
    judged = ev["samples"] + ev["prompt_samples"]
    assert len(ev["samples"]) == 16 and [s["prompt"] for s in ev["prompt_samples"]] == ["What is 2 plus 2?", "Tell me | a joke."]
    # The exact expectation, from the texts: the judge prefers an answer that says "answer".
    wins = sum(says_answer(s["aligned"]) and not says_answer(s["base"]) for s in judged)
    losses = sum(says_answer(s["base"]) and not says_answer(s["aligned"]) for s in judged)
    ties = len(judged) - wins - losses
    j = ev["judge"]
    assert (j["n"], j["wins"], j["ties"], j["losses"]) == (18, wins, ties, losses)
    assert j["win_rate"] == pytest.approx((wins + ties / 2) / 18, abs=1e-6) == out["judge_win_rate"]
    assert wins >= 16  # every held-out answer of the aligned model says "The answer is ...", no base hedge does
    assert j["ci95"] == pytest.approx(evaluate.wilson(j["win_rate"], 18), abs=1e-6)
    assert j["ci95"][0] < j["win_rate"] <= j["ci95"][1] <= 1.0
    for s in judged:
        assert (s["judge_base"] > 0) == says_answer(s["base"]) and (s["judge_base"] == 0) != says_answer(s["base"])
        assert (s["judge_aligned"] > 0) == says_answer(s["aligned"])
    report = (demo_copy / "metrics/report.md").read_text()
    assert "## Judge" in report and f"win rate **{j['win_rate']:.4g}**" in report
    assert "## Side-by-side generations (eval.prompts)" in report and "Tell me \\| a joke." in report


def test_judge_scores_text_pairs_without_a_chat_template(tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder = build_judge(tmp_path / "plain", chat_template=False)
    jtok = AutoTokenizer.from_pretrained(folder)
    judge = AutoModelForSequenceClassification.from_pretrained(folder)
    assert not jtok.chat_template
    q = [{"role": "user", "content": "What is 3 plus 4?"}]
    scores = evaluate.judge_scores(judge, jtok, [q + [{"role": "assistant", "content": a}] for a in ("The answer is 7.", "I am not sure, maybe 6.")])
    assert scores[0] > 0 and scores[1] == 0.0


def test_judge_errors_name_the_field(demo_copy, tmp_path):
    with pytest.raises(AlignpressError, match="field 'eval.judge': judge folder .* does not exist"):
        evaluate.load_judge(recipe(f"eval.judge={tmp_path}/missing"), "cpu", None)
    # a causal LM is not a one-output reward model
    with pytest.raises(AlignpressError, match="field 'eval.judge'"):
        evaluate.load_judge(recipe(f"eval.judge={demo_copy / 'model'}"), "cpu", None)


def test_wilson_interval():
    assert evaluate.wilson(1.0, 64) == pytest.approx([0.943, 1.0], abs=1e-3)
    lo, hi = evaluate.wilson(0.5, 100)
    assert lo == pytest.approx(0.404, abs=1e-3) and hi == pytest.approx(0.596, abs=1e-3)


# ---------------------------------------------------------------------------------------------
# The publish gate


def test_gate_on_the_demo(demo_run):
    run_dir = RunDir(demo_run[0])
    gate.check(recipe(), run_dir)  # no gate set: nothing to check
    gate.check(recipe("eval.gate_min_gain=0.5", "eval.gate_max_kl=10"), run_dir)  # the demo passes
    with pytest.raises(StageFailed) as e:
        gate.check(recipe("eval.gate_max_kl=0.01"), run_dir)
    assert e.value.field == "eval.gate_max_kl" and e.value.exit_code == 3
    assert "exceeds the limit 0.01" in str(e.value) and "Nothing was pushed" in str(e.value)
    with pytest.raises(StageFailed, match="does not beat the base on held-out preference accuracy by 0.9"):
        gate.check(recipe("eval.gate_min_gain=0.9"), run_dir)


NO_CHANGE = ["--set", "train.max_steps=1", "--set", "train.warmup_steps=0", "--set", "train.learning_rate=1e-30"]


def test_gate_refuses_a_run_that_did_not_improve(tmp_path, demo_run):
    """One step at a learning rate of 1e-30 (0 is refused at the door, and so is a warmup that never
    ends): the adapter's update is below float rounding, the aligned model is the base; the gate must refuse it."""
    out = tmp_path / "lr0"
    proc = cli("run", "recipes/demo.yaml", "--output-dir", out, *NO_CHANGE, "--set", "eval.gate_min_gain=0.05",
               "--set", "eval.max_rows=30", "--set", "eval.generation_rows=8")
    manifest = load(out / "run.json")
    assert manifest["stages"]["evaluate"]["status"] == "done", proc.stderr[-3000:]
    assert manifest["stages"]["evaluate"]["gate_passed"] is False
    assert "publish gate will refuse this run: eval.gate_min_gain: the aligned model does not beat the base" in proc.stderr
    ev = load(out / "metrics/eval.json")
    assert ev["aligned"]["preference_accuracy"] == ev["base"]["preference_accuracy"]
    assert ev["aligned"]["kl_estimate"] == 0.0 and ev["aligned"]["behaviour"] == ev["base"]["behaviour"]
    assert ev["gate"]["passed"] is False and ev["gate"]["reasons"][0]["field"] == "eval.gate_min_gain"
    assert "**Refused: publish will push nothing.**" in (out / "metrics/report.md").read_text()
    # Nothing is pushed: the run stops before publish (export refuses a merge that changed nothing,
    # and the publish stage's gate refuses it too).
    assert proc.returncode != 0
    assert manifest["stages"]["publish"]["status"] != "done"
    with pytest.raises(StageFailed) as e:
        gate.check(recipe(*NO_CHANGE[1::2], "eval.gate_min_gain=0.05"), RunDir(out))
    assert e.value.field == "eval.gate_min_gain"
    assert "(gain +0.0000)" in str(e.value)


def test_gate_needs_an_evaluation(tmp_path):
    run_dir = RunDir(tmp_path / "empty")
    with pytest.raises(AlignpressError, match="field 'eval.gate_min_gain': the publish gate needs the evaluate stage"):
        gate.check(recipe("eval.gate_min_gain=0.05"), run_dir)


@pytest.mark.parametrize("override, field, message", [
    ("eval.gate_min_gain=2", "eval.gate_min_gain", "must be above -1 and below 1 (a difference of two accuracies as fractions: 0.01 is one percentage point), got 2"),
    ("eval.gate_max_kl=-1", "eval.gate_max_kl", "must be > 0 (a KL divergence; 0 lets no trained model pass), got -1.0"),
    ('eval.prompts=["  "]', "eval.prompts", "prompt 1 is empty"),
])
def test_gate_and_eval_settings_are_validated(override, field, message):
    with pytest.raises(AlignpressError, match=re.escape(f"field '{field}': {message}")):
        recipe(override)


def test_gate_without_evaluation_is_refused_at_load():
    with pytest.raises(AlignpressError, match="field 'eval.gate_min_gain': needs the evaluate stage"):
        recipe("eval.enabled=false", "eval.gate_min_gain=0.1")
    with pytest.raises(AlignpressError, match="field 'eval.gate_max_kl': the KL estimate needs greedy generations"):
        recipe("eval.generation_rows=0", "eval.gate_max_kl=1")


# ---------------------------------------------------------------------------------------------
# Training health


def _state(step, max_steps=100):
    return SimpleNamespace(global_step=step, max_steps=max_steps, is_world_process_zero=True)


def test_health_nan_stops_training_with_a_clear_error(tmp_path):
    cb = health.HealthCallback(recipe(), RunDir(tmp_path))
    control = SimpleNamespace(should_training_stop=False)
    cb.on_log(None, _state(3), control, logs={"loss": 0.7, "rewards/chosen": 0.1})
    # The Trainer replaces a NaN step loss in `loss`: the rewards and log-probs still show it.
    with pytest.raises(AlignpressError, match=r"field 'train.learning_rate': training stopped at step 4: logps/chosen is nan"):
        cb.on_log(None, _state(4), control, logs={"loss": 0.7, "logps/chosen": float("nan")})
    assert control.should_training_stop
    with pytest.raises(AlignpressError, match="loss is inf"):
        cb.on_log(None, _state(5), control, logs={"loss": float("inf")})


def test_health_warns_on_too_easy_pairs_and_collapsing_chosen(tmp_path):
    run_dir = RunDir(tmp_path)
    run_dir.init("demo", "recipes/demo.yaml")
    cb = health.HealthCallback(recipe(), run_dir)
    control = SimpleNamespace(should_training_stop=False)
    cb.on_log(None, _state(5), control, logs={"loss": 0.6, "rewards/accuracies": 1.0, "rewards/chosen": 0.0})
    for step, chosen in zip(range(10, 60, 10), (-0.01, -0.05, -0.2, -0.4, -0.9)):
        cb.on_log(None, _state(step), control, logs={"loss": 0.5, "rewards/accuracies": 1.0, "rewards/chosen": chosen, "logps/chosen": -20 + chosen * 10})
    warnings = run_dir.load()["warnings"]
    assert len(warnings) == 2 and cb.warnings == warnings
    assert warnings[0].startswith("training health: rewards/accuracies reached 1 at step 5 of 100 (within the first 10% of steps): the pairs look too easy")
    assert warnings[1].startswith("training health: rewards/chosen fell at each of the last 5 logged steps, to -0.4 at step 40 (logps/chosen -24)")
    assert "both log-probs are collapsing" in warnings[1]
    # accuracy 1.0 later in training, or chosen rewards that wobble, are no warning
    quiet = health.check_logged_history(recipe(), RunDir(tmp_path / "q"), [
        {"step": s, "loss": 0.5, "rewards/accuracies": 1.0 if s > 20 else 0.6, "rewards/chosen": (-1) ** s * 0.1 - s / 100} for s in range(1, 100, 5)
    ], max_steps=100)
    assert quiet == []
    # Chosen rewards that fall but stay positive: the policy still prefers the chosen answers more than the reference does
    falling = [{"step": s, "loss": 0.5, "rewards/chosen": c} for s, c in zip(range(10, 60, 10), (0.5, 0.4, 0.3, 0.2, 0.1))]
    assert health.check_logged_history(recipe(), RunDir(tmp_path / "f"), falling, max_steps=100) == []


def test_health_is_quiet_when_some_answers_stop(tmp_path, monkeypatch):
    """The eos warning is for answers that never stop: one of two stopping is no warning."""
    run_dir = RunDir(tmp_path)
    run_dir.init("demo", "recipes/demo.yaml")
    (tmp_path / "data").mkdir()
    (tmp_path / "data/train.jsonl").write_text(json.dumps({"messages": {"prompt": [{"role": "user", "content": "Hi"}]}}) + "\n")
    some = [evaluate.Generation([1], [5, 2], True, "a"), evaluate.Generation([1], [5] * 24, False, "b")]
    monkeypatch.setattr(evaluate, "generate_ids", lambda *a, **k: some)
    model = SimpleNamespace(training=True, eval=lambda: None, train=lambda mode=True: None)
    health.HealthCallback(recipe(), run_dir).on_train_end(SimpleNamespace(world_size=1), _state(100), None, model=model, processing_class=object())
    assert run_dir.load().get("warnings", []) == []


def test_answer_length_leaves_out_the_stop_token_and_no_overlap_is_no_behaviour():
    assert evaluate.Generation([1], [5, 6, 2], True, "").n_tokens == 2
    assert evaluate.Generation([1], [5, 6], False, "").n_tokens == 2
    row = {"messages": {"chosen": [{"role": "assistant", "content": "The answer is 12."}], "rejected": [{"role": "assistant", "content": "Maybe 11"}]}}
    for answer in ("", "xyz"):  # shares no word with either: it shows neither behaviour
        assert evaluate.shows_chosen_behaviour(answer, row, None) is False
    assert evaluate.shows_chosen_behaviour("The answer is 12", row, None) is True


def test_health_warns_when_eos_is_never_generated(tmp_path, monkeypatch):
    run_dir = RunDir(tmp_path)
    run_dir.init("demo", "recipes/demo.yaml")
    (tmp_path / "data").mkdir()
    (tmp_path / "data/train.jsonl").write_text(json.dumps({"messages": {"prompt": [{"role": "user", "content": "Hi"}]}}) + "\n")
    never = [evaluate.Generation([1], [5] * 24, False, "la la")]
    monkeypatch.setattr(evaluate, "generate_ids", lambda *a, **k: never)
    model = SimpleNamespace(training=True, eval=lambda: None, train=lambda mode=True: None)
    cb = health.HealthCallback(recipe(), run_dir)
    cb.on_train_end(SimpleNamespace(world_size=1), _state(100), None, model=model, processing_class=object())
    assert run_dir.load()["warnings"] == [health.eos_warning("training prompts", 1, 24)]
    assert "generated no end-of-turn token in 1 greedy answers to training prompts (each capped at 24 new tokens)" in run_dir.load()["warnings"][0]


def test_demo_training_is_healthy(demo_run):
    """The demo's logged history raises no health warning, and the end-of-training eos check ran."""
    out, proc = demo_run
    assert [w for w in load(out / "run.json").get("warnings", []) if w.startswith("training health")] == []
    history = [json.loads(x) for x in (out / "metrics/train.jsonl").read_text().splitlines()]
    steps = load(out / "run.json")["stages"]["train"]["global_step"]
    assert health.check_logged_history(recipe(), RunDir(out / "replay"), history, max_steps=steps) == []
    assert "training health: 8 of 8 greedy answers to training prompts ended with an end-of-turn token" in proc.stderr


class _FixedLogits:
    """A stand-in model whose logits at a position are a fixed row of `table` chosen by the token
    there (no context): divergence's maths alone, whatever order its batches take the answers in."""

    def __init__(self, table):
        import torch

        self.table = table
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def parameters(self):
        return iter([self.weight])

    def __call__(self, input_ids, attention_mask):
        return SimpleNamespace(logits=self.table[input_ids])


def test_divergence_is_kl_of_the_aligned_model_from_the_base():
    """KL(pi || pi_ref) summed over the answer's positions, checked against torch's kl_div in float64. The
    reverse direction (KL(pi_ref || pi)) gave the demo 0.272 instead of 0.362 and passed every test."""
    import contextlib

    import torch

    torch.manual_seed(0)
    aligned, base = torch.randn(11, 11) * 2, torch.randn(11, 11)  # logits by the token at the position
    models = {"aligned": _FixedLogits(aligned), "base": _FixedLogits(base)}
    policies = SimpleNamespace(use=contextlib.contextmanager(lambda side: iter([models[side]])))
    # shortest first: divergence scores longest first, so its answers come back in another order
    gens = [evaluate.Generation([1, 2], [7, 8], True, ""), evaluate.Generation([1, 2, 3], [4, 5, 6], True, ""),
            evaluate.Generation([3, 2, 1], [9, 10, 4, 5], True, "")]
    tok = SimpleNamespace(pad_token_id=0)
    out = evaluate.divergence(policies, tok, gens, batch_size=2)
    for j, g in enumerate(gens):
        at = (g.prompt_ids + g.answer_ids)[len(g.prompt_ids) - 1 : -1]  # the tokens at the positions predicting the answer
        a, r = (torch.log_softmax(x[at].double(), -1) for x in (aligned, base))
        kl = torch.nn.functional.kl_div(r, a, log_target=True, reduction="sum").item()
        ratio = sum(a[i, t] - r[i, t] for i, t in enumerate(g.answer_ids)).item()
        assert out[j][0] == pytest.approx(kl, rel=1e-5) and out[j][1] == pytest.approx(ratio, rel=1e-5) and out[j][2] == len(g.answer_ids)
        reverse = torch.nn.functional.kl_div(a, r, log_target=True, reduction="sum").item()
        assert abs(kl - reverse) > 0.1  # the test tells the two directions apart


@pytest.mark.parametrize("arch", ["phi3", "gemma", "gemma2"])
def test_span_logits_and_divergence_read_only_the_answer_positions(arch, monkeypatch):
    """span_logits sends only the answer positions through the LM head (a boolean logits_to_keep) for
    transformers' own classes under a LoRA adapter, Gemma-2's logit soft-capping included, and gives
    the logits of the whole forward there; the KL estimate is the same either way."""
    import contextlib

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Gemma2Config, Gemma2ForCausalLM, GemmaConfig, GemmaForCausalLM, Phi3Config, Phi3ForCausalLM

    torch.manual_seed(0)
    small = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, pad_token_id=0)
    if arch == "phi3":
        model = Phi3ForCausalLM(Phi3Config(**small))
    elif arch == "gemma":
        model = GemmaForCausalLM(GemmaConfig(**small, num_key_value_heads=1, head_dim=16))
    else:
        model = Gemma2ForCausalLM(Gemma2Config(**small, num_key_value_heads=1, head_dim=16, final_logit_softcapping=3.0, sliding_window=4))
    model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)).eval()
    assert evaluate._keeps_positions(model)
    gens = [evaluate.Generation([5, 6, 7, 8], [9, 10, 11], True, ""), evaluate.Generation([5, 6], [12, 13, 14, 15, 16], False, ""),
            evaluate.Generation([5, 6, 7], [], False, "")]
    width = max(len(g.prompt_ids) + len(g.answer_ids) for g in gens)
    ids, attn = torch.zeros(len(gens), width, dtype=torch.long), torch.zeros(len(gens), width, dtype=torch.long)
    for j, g in enumerate(gens):
        ids[j, : len(g.prompt_ids) + len(g.answer_ids)] = torch.tensor(g.prompt_ids + g.answer_ids)
        attn[j, : len(g.prompt_ids) + len(g.answer_ids)] = 1
    spans = [(len(g.prompt_ids) - 1, len(g.prompt_ids) - 1 + len(g.answer_ids)) for g in gens]
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=attn).logits
        kept = evaluate.span_logits(model, ids, attn, spans)
    assert [tuple(k.shape) for k in kept] == [(3, 97), (5, 97), (0, 97)]
    for j, (first, end) in enumerate(spans):
        assert torch.allclose(kept[j], full[j, first:end], atol=1e-6, rtol=0), j
    if arch == "gemma2":
        assert full.abs().max().item() <= 3.0 and kept[1].abs().max().item() <= 3.0  # soft-capped on the kept positions too

    @contextlib.contextmanager
    def use(side):
        if side == "aligned":
            yield model
        else:
            with model.disable_adapter():
                yield model

    policies = SimpleNamespace(use=use)
    tok = SimpleNamespace(pad_token_id=0)
    with torch.no_grad():
        ours = evaluate.divergence(policies, tok, gens, batch_size=3)
        monkeypatch.setattr(evaluate, "_keeps_positions", lambda model: False)  # the whole forward's logits instead
        whole = evaluate.divergence(policies, tok, gens, batch_size=3)
    assert ours[2] == whole[2] == (0.0, 0.0, 0)
    for (kl, ratio, n), (kl_whole, ratio_whole, n_whole) in zip(ours[:2], whole[:2]):
        assert n == n_whole and kl > 1e-3 and kl == pytest.approx(kl_whole, rel=1e-5) and ratio == pytest.approx(ratio_whole, rel=1e-5, abs=1e-6)


def test_span_logits_when_the_model_ignores_the_mask_or_answers_in_another_shape():
    """A model whose forward takes logits_to_keep but returns every position's logits anyway gives the
    same rows; one that returns some other shape is an error that names it, not rows read at the wrong
    positions."""
    import torch

    class IgnoresTheMask(torch.nn.Module):
        def __init__(self, table, shape=None):
            super().__init__()
            self.table, self.shape = torch.nn.Parameter(table), shape

        def forward(self, input_ids, attention_mask=None, logits_to_keep=0):
            logits = self.table[input_ids]
            return SimpleNamespace(logits=logits if self.shape is None else logits.reshape(self.shape))

    IgnoresTheMask.__module__ = "transformers.models.stand_in"  # taken for one of transformers' own classes
    torch.manual_seed(0)
    table = torch.randn(20, 7)
    ids, attn = torch.tensor([[1, 2, 3, 4, 5], [6, 7, 8, 0, 0]]), torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    spans = [(2, 4), (1, 2)]
    model = IgnoresTheMask(table)
    assert evaluate._keeps_positions(model)
    with torch.no_grad():
        rows = evaluate.span_logits(model, ids, attn, spans)
    assert [r.tolist() for r in rows] == [table[[3, 4]].tolist(), table[[7]].tolist()]
    with torch.no_grad(), pytest.raises(RuntimeError, match=r"^IgnoresTheMask returned logits of shape \(2, 35\) for logits_to_keep over 3 positions$"):
        evaluate.span_logits(IgnoresTheMask(table, shape=(2, 35)), ids, attn, spans)


@pytest.mark.parametrize(("arch", "max_length", "mode"), [("phi3", 1024, "keep_start"), ("gemma", 1024, "keep_start"),
                                                          ("phi3", 24, "keep_start"), ("gemma", 24, "keep_end")])
def test_answer_log_probs_are_trls(arch, max_length, mode, tmp_path):
    """evaluate's summed answer log-probs are the ones TRL's DPOTrainer trains on (its collator's
    tokens and truncation, its policy forward), for answers of different lengths. keep_end used to be
    cut as keep_start (a pair whose prompt filled max_length scored 0 against 0)."""
    import copy

    import torch
    from datasets import Dataset
    from transformers import GemmaConfig, GemmaForCausalLM, Phi3Config, Phi3ForCausalLM
    from trl import DPOConfig, DPOTrainer

    from alignpress.tiny import gemma_tokenizer, phi3_tokenizer

    torch.manual_seed(0)
    if arch == "phi3":
        tok = phi3_tokenizer()
        model = Phi3ForCausalLM(Phi3Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                           pad_token_id=tok.pad_token_id))
    else:
        tok = gemma_tokenizer()
        model = GemmaForCausalLM(GemmaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                             num_key_value_heads=1, head_dim=16, pad_token_id=tok.pad_token_id))
    model.eval()
    pairs = [{"prompt": [{"role": "user", "content": f"What is 2 plus {i} ?"}], "chosen": [{"role": "assistant", "content": f"The answer is {i + 2} ."}],
              "rejected": [{"role": "assistant", "content": f"Maybe it is {i} , I am not sure " * (i + 1)}]} for i in range(5)]
    rows = [{"messages": p} for p in pairs]
    ours = {w: torch.tensor(evaluate.answer_logps(model, tok, rows, w, batch_size=3, max_length=max_length, truncation_mode=mode))
            for w in ("chosen", "rejected")}
    args = DPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=5, use_cpu=True, bf16=False, report_to="none", max_length=max_length,
                     truncation_mode=mode)
    trainer = DPOTrainer(model=model, ref_model=copy.deepcopy(model), args=args, train_dataset=Dataset.from_list(pairs), processing_class=tok)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(5)])
    with torch.no_grad():
        labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
        trl_logps = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels, fused_lm_head=True).log_probs.sum(1)
    chosen, rejected = trl_logps.chunk(2)
    assert (batch["input_ids"].shape[1] == max_length) == (max_length < 1024)  # the short cases do truncate
    assert (ours["chosen"] - chosen).abs().max().item() < 1e-4 and (ours["rejected"] - rejected).abs().max().item() < 1e-4
    assert (ours["chosen"] - ours["rejected"]).abs().min().item() > 1e-2  # different answers: the comparison means something


def test_the_gate_refuses_a_stale_evaluation_and_one_without_accuracy(demo_copy):
    """An eval.json left from before evaluate was invalidated is not trusted; an evaluation with no
    held-out accuracy cannot pass a minimum gain."""
    from alignpress.runstate import RunDir

    r = recipe("eval.gate_min_gain=0.05")
    run_dir = RunDir(demo_copy)
    gate.check(r, run_dir)  # the demo passes
    run_dir.invalidate_from("evaluate")
    assert (demo_copy / "metrics/eval.json").exists()
    with pytest.raises(AlignpressError, match="field 'eval.gate_min_gain': the publish gate needs the evaluate stage's metrics/eval.json, and it is missing or stale"):
        gate.check(r, run_dir)
    v = gate.verdict(r, {"base": {}, "aligned": {}})
    assert v["passed"] is False
    assert v["reasons"] == [{"field": "eval.gate_min_gain", "reason": "no held-out preference accuracy to compare (no held-out pairs were scored)"}]


def test_progress_lines_say_the_time_so_far_and_left(caplog, monkeypatch):
    """A line at each quarter, with the pace so far; the last one says the whole time (the clock a
    stand-in: 12 s after the start at every line). A quick pass says only the last."""
    import logging

    from alignpress import evaluate

    monkeypatch.setattr(evaluate.time, "monotonic", lambda: 1012.0)
    with caplog.at_level(logging.INFO, logger="alignpress"):
        for done in (8, 16, 24, 32, 40, 48, 56, 64):
            evaluate.progress("evaluate base: greedy generation", done, 8, 64, "answers", started=1000.0)
        evaluate.progress(None, 64, 8, 64, "answers", started=1000.0)  # no label: no line
    assert [r.getMessage() for r in caplog.records] == [
        "evaluate base: greedy generation: 16/64 answers; 12.0 s so far, about 36.0 s left",
        "evaluate base: greedy generation: 32/64 answers; 12.0 s so far, about 12.0 s left",
        "evaluate base: greedy generation: 48/64 answers; 12.0 s so far, about 4.0 s left",
        "evaluate base: greedy generation: 64/64 answers in 12.0 s",
    ]
    # a quick pass (5 s so far at each quarter): the last line only
    caplog.clear()
    monkeypatch.setattr(evaluate.time, "monotonic", lambda: 1005.0)
    with caplog.at_level(logging.INFO, logger="alignpress"):
        for done in (8, 16, 24, 32, 40, 48, 56, 64):
            evaluate.progress("evaluate base: chosen log-probs", done, 8, 64, "pairs", started=1000.0)
    assert [r.getMessage() for r in caplog.records] == ["evaluate base: chosen log-probs: 64/64 pairs in 5.0 s"]


def test_generations_run_longest_prompt_first_and_come_back_in_the_prompts_order():
    """generate_ids batches the longest prompts first (least padding; a batch that runs out of memory
    is the first one, not one an hour in) and returns each answer at its prompt's place: the same
    greedy answers as one prompt at a time."""
    import torch
    from transformers import Phi3Config, Phi3ForCausalLM

    from alignpress.tiny import phi3_tokenizer

    torch.manual_seed(0)
    tok = phi3_tokenizer()
    model = Phi3ForCausalLM(Phi3Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                       pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)).eval()
    prompts = [[{"role": "user", "content": "What is 2 plus 3 ? " * n}] for n in (1, 4, 2, 5, 3)]
    widths = []
    generate = model.generate

    def recording(**kw):
        widths.append((kw["input_ids"].shape[0], kw["input_ids"].shape[1]))
        return generate(**kw)

    model.generate = recording
    batched = evaluate.generate_ids(model, tok, prompts, max_new_tokens=6, batch_size=2)
    lengths = [len(tok(tok.apply_chat_template(p, add_generation_prompt=True, tokenize=False), add_special_tokens=False)["input_ids"]) for p in prompts]
    assert [len(g.prompt_ids) for g in batched] == lengths
    assert widths == [(2, lengths[3]), (2, lengths[4]), (1, lengths[0])]  # prompts of 5 and 4 times, then 3 and 2, then 1
    alone = [evaluate.generate_ids(model, tok, [p], max_new_tokens=6, batch_size=1)[0] for p in prompts]
    assert [(g.prompt_ids, g.answer_ids) for g in batched] == [(g.prompt_ids, g.answer_ids) for g in alone]
    assert len({tuple(g.answer_ids) for g in batched}) > 1  # the answers differ: a mix-up would show
    assert evaluate.generate_ids(model, tok, [], max_new_tokens=6, batch_size=2) == []
