"""Several datasets (data.datasets) through the real entry point: mixing, column mappings, per-source counts, bad input."""

import json

import pytest
import yaml

from conftest import cli


def conv(q, a):
    return [{"role": "user", "content": q}, {"role": "assistant", "content": a}]


def capy_rows():
    """10 capybara rows; rows 8 and 9 have a low rating."""
    rows = []
    for i in range(10):
        q = f"Capybara question {i}?"
        rows.append({"prompt": q, "chosen": conv(q, f"Good {i}."), "rejected": conv(q, f"Bad {i}."), "rating_chosen": 5.0 if i < 8 else 2.0})
    return rows


def write_sources(tmp_path):
    import pandas as pd

    (tmp_path / "capy.jsonl").write_text("".join(json.dumps(r) + "\n" for r in capy_rows()))
    # A layout not in the format table: question/good/bad.
    pd.DataFrame([{"question": f"Plain question {i}?", "good": f"Yes {i}.", "bad": f"No {i}."} for i in range(10)]).to_csv(tmp_path / "plain.csv", index=False)


def write_recipe(tmp_path, model_dir, data):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"name": "t", "model": {"name_or_path": str(model_dir)}, "data": data}, sort_keys=False))
    return path


TWO_SOURCES = {
    "datasets": [
        {"dataset": "capy.jsonl", "filters": {"min": {"rating_chosen": 4.5}}},
        {"dataset": "plain.csv", "columns": {"prompt": "question", "chosen": "good", "rejected": "bad"}, "fraction": 0.5},
    ],
    "eval_fraction": 0.2,
    "seed": 3,
}


def test_two_sources_mixed_with_per_source_counts(tmp_path, tiny_phi3):
    write_sources(tmp_path)
    recipe = write_recipe(tmp_path, tiny_phi3, TWO_SOURCES)
    out = tmp_path / "out"
    proc = cli("prepare", recipe, "--output-dir", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stats = json.loads((out / "data/stats.json").read_text())
    assert stats["dataset"] == ["capy.jsonl", "plain.csv"]
    assert stats["format"] == "capybara, standard"
    capy, plain = stats["sources"]
    assert (capy["field"], capy["format"], capy["file"]) == ("data.datasets[0]", "capybara", str(tmp_path / "capy.jsonl"))
    assert (plain["field"], plain["format"], plain["columns"]) == ("data.datasets[1]", "standard", {"prompt": "question", "chosen": "good", "rejected": "bad"})
    removed = lambda split: {f["filter"]: f["removed"] for f in split["filters"] if f["removed"]}  # noqa: E731
    # capy: 10 loaded, 2 below the rating, 2 of 8 held out -> 6 train, 2 eval.
    assert capy["splits"]["train"]["loaded"] == 10 and capy["splits"]["train"]["kept"] == 6 and capy["splits"]["eval"]["kept"] == 2
    assert removed(capy["splits"]["train"]) == {"rating_chosen >= 4.5": 2, "held out for evaluation (0.2, seed 3)": 2}
    # plain: 10 loaded, 2 held out, half of the other 8 used -> 4 train, 2 eval.
    assert plain["splits"]["train"]["kept"] == 4 and plain["splits"]["eval"]["kept"] == 2
    assert removed(plain["splits"]["train"]) == {"held out for evaluation (0.2, seed 3)": 2, "over the source's fraction 0.5": 4}
    assert stats["splits"]["train"]["loaded"] == 20 and stats["splits"]["train"]["kept"] == 10 and stats["splits"]["eval"]["kept"] == 4
    train = [json.loads(x) for x in (out / "data/train.jsonl").read_text().splitlines()]
    prompts = [r["messages"]["prompt"][0]["content"] for r in train]
    assert sum(p.startswith("Capybara") for p in prompts) == 6 and sum(p.startswith("Plain") for p in prompts) == 4
    assert "data.datasets[1] (plain.csv): 4 training, 2 eval pairs" in proc.stderr


@pytest.mark.parametrize(
    "data, expected",
    [
        ({"datasets": [{"dataset": "a.jsonl", "splt": "train"}]}, "unknown field 'data.datasets[0].splt'; did you mean 'split'?"),
        ({"datasets": [{"dataset": "a.jsonl"}, {"dataset": "b.jsonl", "fraction": 1.5}]}, "field 'data.datasets[1].fraction': must be in (0, 1], got 1.5"),
        ({"datasets": [{"dataset": "a.jsonl", "fraction": 0}]}, "field 'data.datasets[0].fraction': must be in (0, 1], got 0.0"),
        ({"datasets": [{"dataset": "a.jsonl", "fraction": 0.5, "max_rows": 10}]}, "field 'data.datasets[0].max_rows': set either fraction or max_rows for a source, not both"),
        ({"dataset": "a.jsonl", "datasets": [{"dataset": "b.jsonl"}]}, "field 'data.datasets': set either data.dataset (one source) or data.datasets (several), not both"),
        ({"split": "train"}, "field 'data.dataset': required: name one dataset (data.dataset) or several (data.datasets)"),
        ({"datasets": [{"dataset": "a.jsonl", "columns": {"answer": "x"}}]},
         "field 'data.datasets[0].columns.answer': unknown layout column 'answer'; map one of prompt, chosen, rejected, system, question to a column of the source"),
        ({"datasets": [{"dataset": "a.jsonl", "format": "standard", "columns": {"question": "q"}}]},
         "field 'data.datasets[0].columns.question': format 'standard' reads no 'question' column (it reads prompt, chosen, rejected)"),
        ({"datasets": [{"dataset": "a.jsonl", "columns": {"prompt": "q", "question": "q"}}]}, "field 'data.datasets[0].columns.question': column 'q' is already mapped to 'prompt'"),
        ({"datasets": [{"dataset": "a.jsonl", "format": "sharegpt"}]}, "field 'data.datasets[0].format': unknown format 'sharegpt'; expected one of auto, capybara, conversational, standard, implicit, hh, system_question"),
        ({"datasets": [{"dataset": "a.jsonl"}, {"dataset": "a.jsonl"}]}, "field 'data.datasets[1]': the same dataset, config and split as data.datasets[0] ('a.jsonl', 'train')"),
        ({"datasets": [{"dataset": "a.jsonl", "eval_split": "train[:10]"}], "eval_fraction": 0.1},
         "field 'data.eval_fraction': every source has an eval_split, so there is nothing to hold a fraction out of"),
        ({"dataset": "a.jsonl", "max_malformed_fraction": 1.5}, "field 'data.max_malformed_fraction': must be between 0 and 1, got 1.5"),
        ({"datasets": "a.jsonl"}, "field 'data.datasets': expected a list of mappings, got 'a.jsonl'"),
        ({"dataset": "a.jsonl", "columns": {"answer": "x"}},
         "field 'data.columns.answer': unknown layout column 'answer'; map one of prompt, chosen, rejected, system, question to a column of the source"),
        ({"dataset": "a.jsonl", "format": "capybara", "columns": {"prompt": "q", "system": "s"}},
         "field 'data.columns.system': format 'capybara' reads no 'system' column (it reads prompt, chosen, rejected)"),
        ({"dataset": "a.jsonl", "columns": {"chosen": " "}}, "field 'data.columns.chosen': must name a column of the source"),
        ({"datasets": [{"dataset": "a.jsonl"}], "columns": {"prompt": "q"}},
         "field 'data.columns': with data.datasets, map columns per source (data.datasets[].columns)"),
    ],
)
def test_bad_sources_refused_at_validate(tmp_path, data, expected):
    recipe = write_recipe(tmp_path, "x/y", data)
    proc = cli("validate", recipe)
    assert proc.returncode == 2, proc.stdout
    assert proc.stderr.strip().splitlines()[-1] == f"error: {recipe}: {expected}"


def test_a_folder_of_mixed_file_types_is_refused(tmp_path):
    """The first file's type used to be read and the others skipped without a word."""
    folder = tmp_path / "dd"
    folder.mkdir()
    (folder / "a.jsonl").write_text('{"prompt": "p", "chosen": "c", "rejected": "r"}\n')
    (folder / "b.csv").write_text("prompt,chosen,rejected\np,c,r\n")
    recipe = write_recipe(tmp_path, "x/y", {"dataset": "dd"})
    proc = cli("validate", recipe)
    assert (proc.returncode, proc.stderr.strip().splitlines()[-1]) == (2, (
        f"error: {recipe}: field 'data.dataset': folder {folder} mixes file types (a.jsonl, b.csv, ...): one type a folder, "
        "or one source each (data.datasets)"))


def assert_refused_at_prepare(proc, out, message):
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == message
    assert not (out / "data").exists()
    stages = json.loads((out / "run.json").read_text())["stages"]
    assert stages["prepare"]["status"] == "failed" and all(s["status"] != "done" for s in stages.values())


def test_column_mapping_to_a_missing_column(tmp_path, tiny_phi3):
    write_sources(tmp_path)
    data = json.loads(json.dumps(TWO_SOURCES))
    data["datasets"][1]["columns"]["prompt"] = "query"
    recipe = write_recipe(tmp_path, tiny_phi3, data)
    out = tmp_path / "out"
    proc = cli("run", recipe, "--output-dir", out)
    assert_refused_at_prepare(proc, out, f"error: {recipe}: field 'data.datasets[1].columns.prompt': column 'query' is not in {tmp_path / 'plain.csv'} (its columns: bad, good, question)")
    assert not (out / "checkpoints").exists()


def test_single_source_column_mapping(tmp_path, tiny_phi3):
    """data.dataset with data.columns: the question/good/bad CSV becomes standard pairs."""
    write_sources(tmp_path)
    data = {"dataset": "plain.csv", "columns": {"prompt": "question", "chosen": "good", "rejected": "bad"}, "eval_fraction": 0.2, "seed": 3}
    recipe = write_recipe(tmp_path, tiny_phi3, data)
    out = tmp_path / "out"
    proc = cli("prepare", recipe, "--output-dir", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stats = json.loads((out / "data/stats.json").read_text())
    (only,) = stats["sources"]
    assert (only["field"], only["format"], only["columns"]) == ("data", "standard", {"prompt": "question", "chosen": "good", "rejected": "bad"})
    assert stats["splits"]["train"]["kept"] == 8 and stats["splits"]["eval"]["kept"] == 2
    train = [json.loads(x) for x in (out / "data/train.jsonl").read_text().splitlines()]
    assert len(train) == 8
    for row in train:  # each answer pair stays with its own question
        i = row["messages"]["prompt"][0]["content"].removeprefix("Plain question ").removesuffix("?")
        assert row["messages"]["prompt"] == [{"role": "user", "content": f"Plain question {i}?"}]
        assert row["messages"]["chosen"] == [{"role": "assistant", "content": f"Yes {i}."}]
        assert row["messages"]["rejected"] == [{"role": "assistant", "content": f"No {i}."}]
    # A mapping to a column the file lacks: refused at prepare, naming the field.
    bad = write_recipe(tmp_path, tiny_phi3, data | {"columns": {"prompt": "query", "chosen": "good", "rejected": "bad"}})
    out2 = tmp_path / "out2"
    proc = cli("prepare", bad, "--output-dir", out2)
    assert_refused_at_prepare(proc, out2, f"error: {bad}: field 'data.columns.prompt': column 'query' is not in {tmp_path / 'plain.csv'} (its columns: bad, good, question)")


def test_a_source_that_is_not_pairs_cannot_be_mixed(tmp_path, tiny_phi3):
    write_sources(tmp_path)
    sft = tmp_path / "sft.jsonl"
    sft.write_text("".join(json.dumps({"messages": conv(f"Q{i}?", f"A{i}.")}) + "\n" for i in range(5)))
    data = json.loads(json.dumps(TWO_SOURCES))
    data["datasets"].append({"dataset": "sft.jsonl"})
    recipe = write_recipe(tmp_path, tiny_phi3, data)
    out = tmp_path / "out"
    proc = cli("prepare", recipe, "--output-dir", out)
    assert_refused_at_prepare(
        proc,
        out,
        f"error: {sft}: the columns ['messages'] hold conversations for supervised fine-tuning (a messages column), not preference pairs; "
        "DPO needs a chosen and a rejected answer in every row, so this cannot be used or mixed with pairs",
    )


def test_sources_given_with_set_name_the_flag():
    proc = cli("validate", "recipes/demo.yaml", "--set", "data.dataset=null", "--set", "data.datasets=[{dataset: a.jsonl, fraction: 2}]")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == "error: --set data.datasets: field 'data.datasets[0].fraction': must be in (0, 1], got 2.0"


def test_filters_that_keep_nothing_stop_prepare_before_rendering(tmp_path, tiny_phi3, capsys):
    """A Hub source is read only by prepare; there, a rating filter that keeps none of a source's
    training rows is named (it used to end in "no training rows left", or pass in a mix), and an
    evaluation left with no rows stops prepare instead of scoring nothing after training.
    In this process (alignpress.cli.main, what entrypoint.py calls): the entry point's own exit is
    covered by the tests above."""
    from types import SimpleNamespace

    from alignpress.cli import main

    def prepare(recipe, out, *more):
        rc = main(["prepare", str(recipe), "--output-dir", str(out), *more])
        return SimpleNamespace(returncode=rc, stderr=capsys.readouterr().err)

    write_sources(tmp_path)
    data = json.loads(json.dumps(TWO_SOURCES))
    data["datasets"][0]["filters"]["min"]["rating_chosen"] = 6
    recipe = write_recipe(tmp_path, tiny_phi3, data)
    out = tmp_path / "out"
    assert_refused_at_prepare(prepare(recipe, out), out, f"error: {recipe}: field 'data.datasets[0].filters.min.rating_chosen': keeps none of the "
                                                         f"10 rows of split 'train' of {tmp_path / 'capy.jsonl'} (rating_chosen: its values there run from 2 to 5)")

    one = {"dataset": "capy.jsonl", "split": "train[:8]", "eval_split": "train[8:]", "filters": {"min": {"rating_chosen": 4.5}}}
    recipe = write_recipe(tmp_path, tiny_phi3, one)
    out = tmp_path / "out2"
    assert_refused_at_prepare(prepare(recipe, out), out, f"error: {recipe}: field 'data.eval_split': no evaluation rows left (2 loaded; "
                                                         "rating_chosen >= 4.5: -2): the evaluate stage would score nothing after training; "
                                                         "hold out more rows, or set eval.enabled: false")
    done = prepare(recipe, out, "--set", "eval.enabled=false")
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((out / "data/stats.json").read_text())["splits"]["eval"]["kept"] == 0
