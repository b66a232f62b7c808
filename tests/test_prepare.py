"""The prepare stage through the real entry point: loading, filters with exact counts, bad input."""

import json

import pytest
import torch
import yaml

from conftest import ROOT, cli


def conv(q, a):
    return [{"role": "user", "content": q}, {"role": "assistant", "content": a}]


def capy(q, good, bad, rc=5.0, rr=1.0, prior=None):
    prior = prior or []
    return {"source": "t", "prompt": q, "chosen": prior + conv(q, good), "rejected": prior + conv(q, bad), "rating_chosen": rc, "rating_rejected": rr}


ROWS = [capy(f"Question {i}?", f"Good answer {i}.", f"Bad answer {i}.") for i in range(8)] + [
    capy("Low?", "Fine.", "Bad.", rc=3.0),  # rating_chosen < 4.5
    capy("Rej?", "Fine.", "Bad.", rr=4.0),  # rating_rejected > 2.5
    capy("Two turns?", "Fine.", "Bad.", prior=conv("First?", "Yes.")),  # 4 messages
    capy("Same?", "Same.", "Same."),  # identical answers
    capy("Question 0?", "Good answer 0.", "Bad answer 0."),  # duplicate of row 0
    capy("Empty?", "", "Bad."),  # empty chosen
    capy("  ", "Fine.", "Bad."),  # empty prompt: answers to nothing
    capy("Long?", "word " * 200, "Bad."),  # over max_tokens
]


def make_recipe(tmp_path, model_dir, rows=ROWS, data_name="pairs.jsonl", **overrides):
    data = tmp_path / data_name
    if data_name.endswith(".jsonl"):
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = {
        "name": "t",
        "model": {"name_or_path": str(model_dir)},
        "data": {"dataset": data_name, "split": "train", "eval_fraction": 0.25, "seed": 3,
                 "filters": {"min": {"rating_chosen": 4.5}, "max": {"rating_rejected": 2.5}, "max_messages": 2, "max_tokens": 64}},
    }
    for key, value in overrides.items():
        node = recipe
        *parents, leaf = key.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_filters_report_exact_counts(tmp_path, tiny_phi3):
    recipe = make_recipe(tmp_path, tiny_phi3)
    out = tmp_path / "out"
    proc = cli("prepare", recipe, "--output-dir", out)
    assert proc.returncode == 0, proc.stderr
    stats = json.loads((out / "data/stats.json").read_text())
    assert stats["format"] == "capybara" and stats["format_source"] == "detected"
    removed = {f["filter"]: f["removed"] for f in stats["splits"]["train"]["filters"]}
    assert removed == {
        "rating_chosen >= 4.5": 1,
        "rating_rejected <= 2.5": 1,
        "malformed for format capybara": 0,
        "more than 2 messages": 1,
        "empty answer": 1,
        "empty prompt": 1,
        "chosen identical to rejected": 1,
        "duplicate pair": 1,
        "rejected by the chat template": 0,
        "longer than 64 tokens": 1,
        "held out for evaluation (0.25, seed 3)": 2,
        "prompt also in the eval split": 0,
    }
    assert stats["splits"]["train"]["loaded"] == 16 and stats["splits"]["train"]["kept"] == 6
    train = [json.loads(x) for x in (out / "data/train.jsonl").read_text().splitlines()]
    evals = [json.loads(x) for x in (out / "data/eval.jsonl").read_text().splitlines()]
    assert len(train) == 6 and len(evals) == 2
    prompts = sorted(r["messages"]["prompt"][0]["content"] for r in train + evals)
    assert prompts == sorted(f"Question {i}?" for i in range(8))
    first = train[0]
    assert set(first) == {"prompt", "chosen", "rejected", "prompt_tokens", "chosen_tokens", "rejected_tokens", "messages"}
    assert first["prompt"].startswith("<|user|>\nQuestion ") and first["chosen"].endswith("<|end|>\n<|endoftext|>")
    # The rendered pair with its boundary is printed before training.
    assert "║" in proc.stdout and "<|assistant|> ║" in proc.stdout
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["stages"]["prepare"]["status"] == "done"
    assert manifest["data_fingerprint"] == stats["fingerprint"]


def test_same_seed_same_split(tmp_path, tiny_phi3):
    recipe = make_recipe(tmp_path, tiny_phi3)
    a, b = tmp_path / "a", tmp_path / "b"
    assert cli("prepare", recipe, "--output-dir", a).returncode == 0
    assert cli("prepare", recipe, "--output-dir", b).returncode == 0
    assert (a / "data/eval.jsonl").read_bytes() == (b / "data/eval.jsonl").read_bytes()


@pytest.mark.parametrize("suffix", ["json", "parquet", "csv"])
def test_other_file_types(tmp_path, tiny_phi3, suffix):
    import pandas as pd

    rows = [{"prompt": f"Q{i}?", "chosen": f"Yes {i}.", "rejected": f"No {i}."} for i in range(10)]
    path = tmp_path / f"pairs.{suffix}"
    frame = pd.DataFrame(rows)
    {"json": lambda: frame.to_json(path, orient="records"), "parquet": lambda: frame.to_parquet(path), "csv": lambda: frame.to_csv(path, index=False)}[suffix]()
    recipe = make_recipe(tmp_path, tiny_phi3, data_name=path.name, data__filters={})
    out = tmp_path / "out"
    proc = cli("prepare", recipe, "--output-dir", out)
    assert proc.returncode == 0, proc.stderr
    stats = json.loads((out / "data/stats.json").read_text())
    assert stats["format"] == "standard"
    assert stats["splits"]["train"]["kept"] + stats["splits"]["eval"]["kept"] == 10


def assert_refused(proc, out, *message_parts):
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip().splitlines()[-1]
    assert err.startswith("error: "), err
    for part in message_parts:
        assert part in err, err
    # Nothing a later run could mistake for a finished stage.
    assert not (out / "data").exists()
    if (out / "run.json").exists():
        stages = json.loads((out / "run.json").read_text())["stages"]
        assert all(s["status"] != "done" for s in stages.values())


def test_everything_filtered_out(tmp_path, tiny_phi3):
    recipe = make_recipe(tmp_path, tiny_phi3, data__filters={"min": {"rating_chosen": 9}})
    out = tmp_path / "out"
    assert_refused(cli("prepare", recipe, "--output-dir", out), out, f"{recipe}: field 'data.filters.min.rating_chosen': keeps none of the 16 rows of "
                                                                 f"split 'train' of {tmp_path / 'pairs.jsonl'} (rating_chosen: its values there run from 3 to 5)")


def test_no_rows_left_names_the_field_that_removed_them(tmp_path):
    """Not always data.filters: a train split inside the eval split, or a max_length no pair fits."""
    out = tmp_path / "out"
    assert_refused(cli("prepare", "recipes/demo.yaml", "--output-dir", out, "--set", "data.split=train[:100]"), out,
                   "error: --set data.split: field 'data.split': no training rows left after filtering (100 loaded; ")
    out = tmp_path / "out2"
    assert_refused(cli("prepare", "recipes/demo.yaml", "--output-dir", out, "--set", "data.filters.max_tokens=null", "--set", "dpo.max_length=8"), out,
                   "error: --set dpo.max_length: field 'dpo.max_length': no training rows left after filtering (")


def test_filter_on_missing_column(tmp_path, tiny_phi3):
    recipe = make_recipe(tmp_path, tiny_phi3, data__filters={"min": {"score_chosen": 4}})
    out = tmp_path / "out"
    assert_refused(cli("prepare", recipe, "--output-dir", out), out, f"{recipe}: field 'data.filters.min.score_chosen': column 'score_chosen' is not in {tmp_path / 'pairs.jsonl'} (its columns: chosen, prompt, rating_chosen, rating_rejected, rejected, source)")


def test_unknown_format(tmp_path, tiny_phi3):
    rows = [{"query": "a", "label": 1}]
    recipe = make_recipe(tmp_path, tiny_phi3, rows=rows)
    out = tmp_path / "out"
    assert_refused(cli("prepare", recipe, "--output-dir", out), out, f"error: {tmp_path / 'pairs.jsonl'}: cannot tell the preference format from the columns ['label', 'query']: missing chosen, rejected.")


def test_forced_format_missing_columns(tmp_path, tiny_phi3):
    recipe = make_recipe(tmp_path, tiny_phi3, data__format="system_question")
    out = tmp_path / "out"
    assert_refused(cli("prepare", recipe, "--output-dir", out), out, f"{recipe}: field 'data.format': format 'system_question' needs columns question, chosen, rejected; missing question")


def test_missing_data_file(tmp_path, tiny_phi3):
    recipe = make_recipe(tmp_path, tiny_phi3)
    (tmp_path / "pairs.jsonl").unlink()
    out = tmp_path / "out"
    assert_refused(cli("prepare", recipe, "--output-dir", out), out, "field 'data.dataset': data file 'pairs.jsonl' not found")


def test_hub_dataset_offline_is_clear(tmp_path, tiny_phi3):
    recipe = make_recipe(tmp_path, tiny_phi3, data__dataset="argilla/distilabel-capybara-dpo-7k-binarized")
    out = tmp_path / "out"
    proc = cli("prepare", recipe, "--output-dir", out, env={"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"})
    assert_refused(proc, out, "field 'data.dataset': could not load Hub dataset 'argilla/distilabel-capybara-dpo-7k-binarized'", "HF_TOKEN")


def test_model_folder_missing(tmp_path):
    recipe = make_recipe(tmp_path, tmp_path / "no-such-model")
    out = tmp_path / "out"
    assert_refused(cli("prepare", recipe, "--output-dir", out), out, "field 'model.name_or_path': model folder", "does not exist")


def test_hub_model_offline_is_clear(tmp_path):
    recipe = make_recipe(tmp_path, "microsoft/Phi-3-mini-4k-instruct")
    out = tmp_path / "out"
    proc = cli("prepare", recipe, "--output-dir", out, env={"HF_HUB_OFFLINE": "1"})
    assert_refused(proc, out, "field 'model.name_or_path': could not load 'microsoft/Phi-3-mini-4k-instruct': OSError: ")
    # transformers' sentence ends where ours begins: one period between them, not two.
    assert proc.stderr.strip().splitlines()[-1].endswith(
        "couldn't find them in the cached files. Check the Hub id and revision, your network, and HF_TOKEN for gated models")


def test_tokenizer_without_chat_template(tmp_path, tiny_no_template):
    recipe = make_recipe(tmp_path, tiny_no_template)
    out = tmp_path / "out"
    assert_refused(cli("prepare", recipe, "--output-dir", out), out, "field 'model.chat_template': the tokenizer of", "has no chat template")


def test_4bit_on_cpu_refused_before_anything(tmp_path, tiny_phi3):
    recipe = make_recipe(tmp_path, tiny_phi3, model__load_in_4bit=True)
    out = tmp_path / "out"
    proc = cli("run", recipe, "--output-dir", out)
    assert_refused(proc, out, f"{recipe}: field 'model.load_in_4bit': 4-bit QLoRA needs a CUDA GPU")
    assert not out.exists()


def test_compile_without_a_compiler_refused_before_anything(tmp_path, tiny_phi3):
    """Inductor writes C++ on the CPU (Triton a C launcher on a GPU) at the first training step, after
    the data and the model have loaded: the door looks for the compiler first."""
    recipe = make_recipe(tmp_path, tiny_phi3, train__compile_layers=True)
    out = tmp_path / "out"
    bare = tmp_path / "bin"
    bare.mkdir()
    proc = cli("run", recipe, "--output-dir", out, env={"PATH": str(bare), "CXX": ""})
    assert_refused(proc, out, f"{recipe}: field 'train.compile_layers': torch.compile needs a C++ compiler (c++, g++, clang++) on PATH; none was found "
                              "(apt-get install g++). Or set train.compile_layers: false")
    assert not out.exists()


def test_compile_with_deepspeed_refused(tmp_path, tiny_phi3):
    recipe = make_recipe(tmp_path, tiny_phi3, train__compile_layers=True, train__accelerate_config=str(ROOT / "recipes" / "accelerate" / "zero2.yaml"))
    proc = cli("validate", recipe)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (f"error: {recipe}: field 'train.compile_layers': is not supported with DeepSpeed "
                                                    f"({ROOT / 'recipes' / 'accelerate' / 'zero2.yaml'}); set train.compile_layers: false, or use the ddp config")
    ddp = make_recipe(tmp_path, tiny_phi3, train__compile_layers=True, train__accelerate_config=str(ROOT / "recipes" / "accelerate" / "ddp.yaml"))
    assert cli("validate", ddp).returncode == 0


def test_flex_attention_training_on_cpu_refused_before_anything(tmp_path, tiny_phi3):
    """torch would refuse FlexAttention's backward only at the first training step, after the data
    and the model have loaded; the door says so first."""
    recipe = make_recipe(tmp_path, tiny_phi3, model__attn_implementation="flex_attention")
    out = tmp_path / "out"
    proc = cli("run", recipe, "--output-dir", out)
    assert_refused(proc, out, f"{recipe}: field 'model.attn_implementation': flex_attention cannot train on the CPU: torch {torch.__version__} has no FlexAttention backward there. "
                              "Use sdpa (the default) on the CPU, e.g. --set model.attn_implementation=sdpa")
    assert not out.exists()


def test_dropped_rows_summary_stays_one_short_line():
    """Each reason quotes its row's value, so a column of bad values made one reason a row and a
    293,045-character "one line" on 3,000 rows: the 3 most frequent reasons are shown, the rest counted."""
    from alignpress.prepare import DroppedRows

    dropped = DroppedRows()
    for i in range(3000):
        dropped.add(f"rejected is text ('bad answer number {i}'), not a list of {{role, content}} messages", i)
    for i in (3000, 3001):
        dropped.add("chosen is missing (or null), not text or a list of {role, content} messages", i)
    assert dropped.summary() == (
        "chosen is missing (or null), not text or a list of {role, content} messages (2 rows: 3000, 3001); "
        "rejected is text ('bad answer number 0'), not a list of {role, content} messages (1 row: 0); "
        "rejected is text ('bad answer number 1'), not a list of {role, content} messages (1 row: 1); "
        "2998 more reasons (2998 rows)")
    assert len(dropped) == 3002 and len(dropped.stored()) == 20


def test_duplicates_are_whole_pairs_and_the_longer_answer_decides_the_cap(tmp_path, tiny_phi3):
    """UltraFeedback-style data has several pairs per prompt: only a pair seen before is a duplicate.
    A pair is kept only when its longer answer fits: a long rejected answer alone drops it."""
    rows = [capy(f"Question {i}?", f"Good answer {i}.", f"Bad answer {i}.") for i in range(6)] + [
        capy("Question 0?", "Another good answer.", "Another bad answer."),  # same prompt, other pair: kept
        capy("Question 1?", "Good answer 1.", "Bad answer 1."),  # the same pair again: dropped
        capy("LongRej?", "Fine.", "word " * 200),  # the rejected answer is over max_tokens
        capy("LongCho?", "word " * 200, "Bad."),
    ]
    recipe = make_recipe(tmp_path, tiny_phi3, rows=rows, data__filters={"max_tokens": 64})
    out = tmp_path / "out"
    proc = cli("prepare", recipe, "--output-dir", out)
    assert proc.returncode == 0, proc.stderr
    removed = {f["filter"]: f["removed"] for f in json.loads((out / "data/stats.json").read_text())["splits"]["train"]["filters"]}
    assert removed["duplicate pair"] == 1 and removed["longer than 64 tokens"] == 2


def test_a_local_model_that_fails_to_load_is_not_blamed_on_the_hub(tmp_path, tiny_phi3):
    """A model folder on this machine whose tokenizer does not load: the loader's error, without the
    advice to check the Hub id, the network and HF_TOKEN (it was given for a DeepSpeed assertion)."""
    import shutil

    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_phi3, broken)
    (broken / "tokenizer.json").write_text("{not json")
    recipe = make_recipe(tmp_path, broken)
    proc = cli("prepare", recipe, "--output-dir", tmp_path / "out")
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {recipe}: field 'model.name_or_path': could not load '{broken}': "), last
    assert last.endswith(f". {broken} is a folder on this machine: the error is its loader's, not the Hub's"), last
