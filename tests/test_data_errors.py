"""Bad data through the real entry point: every error names the file, the row and the column, and why.

Each file is built here (raw bytes, CSV, parquet); nothing may be marked done or left in data/.
"""

import json

import pytest
import yaml

from conftest import cli


def conv(q, a, system=None):
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": q}, {"role": "assistant", "content": a}]


def capy(i, system=None, **extra):
    q = f"Question {i}?"
    return {"prompt": q, "chosen": conv(q, f"Good answer {i}.", system), "rejected": conv(q, f"Bad answer {i}.", system), **extra}


def standard(i, **extra):
    return {"prompt": f"Question {i}?", "chosen": f"Good answer {i}.", "rejected": f"Bad answer {i}.", **extra}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def recipe_for(tmp_path, model_dir, data_path, **data):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"name": "t", "model": {"name_or_path": str(model_dir)}, "data": {"dataset": data_path.name, **data}}))
    return path


def refused(proc, out, message):
    """Exit 2, the last line is exactly `message`, and nothing is marked done or written to data/."""
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == message
    assert not (out / "data").exists()
    assert not (out / "data.partial").exists()
    if (out / "run.json").exists():
        stages = json.loads((out / "run.json").read_text())["stages"]
        assert stages["prepare"]["status"] == "failed"
        assert all(s["status"] != "done" for s in stages.values())


def test_jsonl_with_bytes_that_are_not_utf8(tmp_path, tiny_phi3):
    data = tmp_path / "pairs.jsonl"
    lines = [json.dumps(standard(i)).encode() for i in range(6)]
    lines[3] = lines[3].replace(b"Good answer 3.", b"Good\xff answer 3.")
    data.write_bytes(b"\n".join(lines) + b"\n")
    out = tmp_path / "out"
    proc = cli("prepare", recipe_for(tmp_path, tiny_phi3, data), "--output-dir", out)
    refused(proc, out, f"error: {data}: row 3, column 'chosen': not UTF-8 text (byte 0xff at byte 4 of the value); save the file as UTF-8")


def test_a_csv_saved_as_latin1_is_named_by_line(tmp_path, tiny_phi3):
    """The CSV reader said only "'utf-8' codec can't decode byte 0xe9 in position 3"."""
    data = tmp_path / "pairs.csv"
    data.write_bytes(b"prompt,chosen,rejected\n" + b"".join(f"q{i},Good {i}.,bad {i}\n".encode() for i in range(5)) + b"caf\xe9?,Good.,bad\n")
    out = tmp_path / "out"
    proc = cli("prepare", recipe_for(tmp_path, tiny_phi3, data), "--output-dir", out)
    refused(proc, out, f"error: {data}: line 7: not UTF-8 text (byte 0xe9 at column 4); save the file as UTF-8")


def test_rating_column_holding_text(tmp_path, tiny_phi3):
    import pandas as pd

    rows = [standard(i, rating_chosen="5.0") for i in range(6)]
    rows[2]["rating_chosen"] = "high"
    data = tmp_path / "pairs.csv"
    pd.DataFrame(rows).to_csv(data, index=False)
    out = tmp_path / "out"
    recipe = recipe_for(tmp_path, tiny_phi3, data, filters={"min": {"rating_chosen": 4.5}})
    # Through `run`: refused in prepare, before any training.
    proc = cli("run", recipe, "--output-dir", out)
    refused(proc, out, f"error: {data}: row 2, column 'rating_chosen': text ('high') is not a number, and the filter data.filters.min.rating_chosen compares numbers")
    assert not (out / "checkpoints").exists() and not (out / "adapter").exists()


def test_csv_without_rejected(tmp_path, tiny_phi3):
    import pandas as pd

    data = tmp_path / "pairs.csv"
    pd.DataFrame([standard(i) for i in range(6)]).drop(columns=["rejected"]).to_csv(data, index=False)
    out = tmp_path / "out"
    proc = cli("prepare", recipe_for(tmp_path, tiny_phi3, data), "--output-dir", out)
    refused(
        proc,
        out,
        f"error: {data}: cannot tell the preference format from the columns ['chosen', 'prompt']: missing rejected. Every layout needs "
        "chosen and rejected (plus prompt, or question); rename them with a column mapping (data.columns) or set data.format "
        "to one of: capybara, conversational, standard, implicit, hh, system_question",
    )


def test_parquet_with_an_integer_chosen_column(tmp_path, tiny_phi3):
    import pandas as pd

    data = tmp_path / "pairs.parquet"
    pd.DataFrame([{"prompt": f"Q{i}?", "chosen": i, "rejected": i + 1} for i in range(6)]).to_parquet(data)
    out = tmp_path / "out"
    proc = cli("prepare", recipe_for(tmp_path, tiny_phi3, data), "--output-dir", out)
    refused(
        proc,
        out,
        f"error: {data}: row 0, column 'chosen': an integer (0); a preference layout needs text or a list of {{role, content}} "
        "messages there (checked 6 rows, none fits a layout)",
    )


def test_prompt_that_is_a_list_of_strings(tmp_path, tiny_phi3):
    data = write_jsonl(tmp_path / "pairs.jsonl", [standard(i, prompt=[f"Q{i}?", "more"]) for i in range(6)])
    out = tmp_path / "out"
    proc = cli("prepare", recipe_for(tmp_path, tiny_phi3, data), "--output-dir", out)
    refused(
        proc,
        out,
        f"error: {data}: row 0, column 'prompt': a list of str; a preference layout needs text or a list of {{role, content}} "
        "messages there (checked 6 rows, none fits a layout)",
    )


def _bot(i):
    row = capy(i)
    row["chosen"][1]["role"] = "bot"
    return row


def _no_content(i):
    row = capy(i)
    del row["chosen"][1]["content"]
    return row


@pytest.mark.parametrize(
    "make, reason",
    [
        (_bot, "chosen has a message with role 'bot'; expected one of system, user, assistant"),
        (_no_content, "chosen has a message without 'content'"),
    ],
    ids=["role-bot", "no-content"],
)
def test_every_row_malformed_says_why(tmp_path, tiny_phi3, make, reason):
    data = write_jsonl(tmp_path / "pairs.jsonl", [make(i) for i in range(8)])
    out = tmp_path / "out"
    proc = cli("prepare", recipe_for(tmp_path, tiny_phi3, data), "--output-dir", out)
    refused(
        proc,
        out,
        f"error: {data}: 8 of 8 rows of split 'train' cannot be used, more than data.max_malformed_fraction (0.05) allows: "
        f"{reason} (8 rows: 0, 1, 2, …)",
    )
    # The reason is printed as a warning too, not only in the error.
    assert f"{data}, train: dropped 8 malformed row(s) for format capybara: {reason} (8 rows: 0, 1, 2, …)" in proc.stderr


def _end_by_hand(i):
    row = capy(i)
    row["chosen"][1]["content"] += "<|end|>\n"  # the seed notebook's hand-written end of turn
    return row


def test_answers_holding_the_templates_own_tokens_are_refused(tmp_path, tiny_phi3):
    """The tokenizer turns `<|end|>` in text into the special id: the answer would end its turn twice."""
    data = write_jsonl(tmp_path / "pairs.jsonl", [_end_by_hand(i) for i in range(8)])
    out = tmp_path / "out"
    proc = cli("prepare", recipe_for(tmp_path, tiny_phi3, data), "--output-dir", out)
    refused(proc, out, f"error: {data}: 8 of 8 rows of split 'train' cannot be used, more than data.max_malformed_fraction (0.05) allows: "
                       "chosen holds the special token '<|end|>' as text (the chat template writes it) (8 rows: 0, 1, 2, …)")


def test_a_template_that_leaves_out_the_system_message_is_refused(tmp_path, tiny_phi3):
    """Phi-3's first template had no system branch: the system prompts were dropped without a word."""
    template = tmp_path / "no-system.jinja"
    template.write_text("{% for m in messages %}{% if m['role'] in ['user', 'assistant'] %}{{ '<|' + m['role'] + '|>\n' + m['content'] + "
                        "'<|end|>\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}")
    data = write_jsonl(tmp_path / "pairs.jsonl", [capy(i, system="Be brief.") for i in range(8)])
    out = tmp_path / "out"
    recipe = recipe_for(tmp_path, tiny_phi3, data)
    raw = yaml.safe_load(recipe.read_text())
    raw["model"]["chat_template"] = template.name
    recipe.write_text(yaml.safe_dump(raw))
    proc = cli("prepare", recipe, "--output-dir", out)
    refused(proc, out, f"error: {data}: 8 of 8 rows of split 'train' cannot be used, more than data.max_malformed_fraction (0.05) allows: "
                       f"ValueError: the chat template leaves out the system message (8 rows: 0, 1, 2, …). Most were refused by the chat "
                       f"template: check model.chat_template ({template.name}) with one of these rows")
    # Without system turns the same template is fine
    write_jsonl(data, [capy(i) for i in range(8)])
    assert cli("prepare", recipe, "--output-dir", tmp_path / "out2").returncode == 0


def test_gemma_with_only_system_turns(tmp_path, tiny_gemma):
    data = write_jsonl(tmp_path / "pairs.jsonl", [capy(i, system="Be brief.") for i in range(8)])
    out = tmp_path / "out"
    proc = cli("prepare", recipe_for(tmp_path, tiny_gemma, data), "--output-dir", out)
    refused(
        proc,
        out,
        f"error: {data}: 8 of 8 rows of split 'train' cannot be used, more than data.max_malformed_fraction (0.05) allows: "
        f"TemplateError: System role not supported (8 rows: 0, 1, 2, …). Most were refused by the chat template: check the chat "
        f"template of {tiny_gemma} with one of these rows",
    )
    assert f"{data}, train: the chat template refused 8 row(s): TemplateError: System role not supported (8 rows: 0, 1, 2, …)" in proc.stderr


def mixed_rows():
    """20 good capybara rows, one row of plain strings (another layout), one with a system turn Gemma refuses."""
    rows = [capy(i) for i in range(20)]
    rows.append(standard(20))
    rows.append(capy(21, system="Be brief."))
    return rows


def test_a_few_bad_rows_are_dropped_with_row_and_reason(tmp_path, tiny_gemma):
    data = write_jsonl(tmp_path / "pairs.jsonl", mixed_rows())
    out = tmp_path / "out"
    proc = cli("prepare", recipe_for(tmp_path, tiny_gemma, data, max_malformed_fraction=0.1), "--output-dir", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Detection looked at every row (up to 1000) and names the one that disagrees.
    assert f"{data}: format capybara fits 21 of the first 22 rows; 1 look like standard (rows 20); they are checked as capybara rows" in proc.stderr
    assert f"{data}, train: dropped 1 malformed row(s) for format capybara: chosen is text ('Good answer 20.'), not a list of {{role, content}} messages (1 row: 20)" in proc.stderr
    assert f"{data}, train: the chat template refused 1 row(s): TemplateError: System role not supported (1 row: 21)" in proc.stderr
    stats = json.loads((out / "data/stats.json").read_text())
    (source,) = stats["sources"]
    assert source["format"] == "capybara" and source["format_source"] == "detected" and source["format_rows_checked"] == 22
    steps = {f["filter"]: f for f in source["splits"]["train"]["filters"]}
    assert steps["malformed for format capybara"]["removed"] == 1
    assert steps["malformed for format capybara"]["rows"] == {"chosen is text ('Good answer 20.'), not a list of {role, content} messages": [20]}
    assert steps["rejected by the chat template"]["removed"] == 1
    assert steps["rejected by the chat template"]["rows"] == {"TemplateError: System role not supported": [21]}
    assert stats["splits"]["train"]["kept"] + stats["splits"]["eval"]["kept"] == 20

    # The default bound (5%) refuses the same file, naming both reasons.
    out2 = tmp_path / "out2"
    proc = cli("prepare", tmp_path / "recipe.yaml", "--set", "data.max_malformed_fraction=0.05", "--output-dir", out2)
    refused(
        proc,
        out2,
        f"error: {data}: 2 of 22 rows of split 'train' cannot be used, more than data.max_malformed_fraction (0.05) allows: "
        "chosen is text ('Good answer 20.'), not a list of {role, content} messages (1 row: 20); "
        "TemplateError: System role not supported (1 row: 21)",
    )
    # A re-run of prepare on data that got worse is refused and leaves the finished data/ as it was.
    before = {p.name: p.read_bytes() for p in (out / "data").iterdir()}
    write_jsonl(data, mixed_rows() + [_bot(22), _bot(23)])
    proc = cli("prepare", tmp_path / "recipe.yaml", "--output-dir", out)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: {data}: 4 of 24 rows of split 'train' cannot be used, more than data.max_malformed_fraction (0.1) allows: "
        "chosen has a message with role 'bot'; expected one of system, user, assistant (2 rows: 22, 23); "
        "chosen is text ('Good answer 20.'), not a list of {role, content} messages (1 row: 20); "
        "TemplateError: System role not supported (1 row: 21)"
    )
    assert {p.name: p.read_bytes() for p in (out / "data").iterdir()} == before
    assert not (out / "data.partial").exists()
    assert json.loads((out / "run.json").read_text())["stages"]["prepare"]["status"] == "failed"


JSON_CASES = {
    # name: (file text, expected problem); lines are counted from 1, as an editor shows them
    "not_json": ('{"prompt": "q"}\n\n{"prompt": "q", "chosen": "a"\n', "line 3: not valid JSON: Expecting ',' delimiter (column 30); each line must be one JSON object"),
    "array_line": ('{"prompt": "q"}\n[1, 2]\n{"prompt": \n', "line 2: a JSON array, not an object with the pair's columns"),
    # a file that starts with `[` is read as one array, unless the array ends before the file does
    "array_first_line": ('[1, 2]\n{"prompt": "q"}\n', "line 1: a JSON array, not an object with the pair's columns"),
    "type_changes": ('{"chosen": [], "x": null}\n{"chosen": null, "x": 1}\n{"chosen": "a", "x": 2.5}\n',
                     "line 3: column 'chosen' is a JSON string, but a JSON array on line 1; one column holds one type"),
    "json_array_syntax": ('[\n  {"prompt": "q"},\n  {"prompt": "q",}\n]\n', "line 3: not valid JSON: Expecting property name enclosed in double quotes (column 18)"),
    "json_array_item": ('[{"prompt": "q"}, "q2"]', "item 1 of the array: a JSON string, not an object with the pair's columns"),
    "fine": ('{"prompt": "q", "n": 1}\n{"prompt": "r", "n": 2.5, "extra": true}\n', None),
}


@pytest.mark.parametrize("case", sorted(JSON_CASES))
def test_json_file_problem_names_the_line(tmp_path, case):
    from alignpress.prepare import json_file_problem

    text, expected = JSON_CASES[case]
    path = tmp_path / ("pairs.json" if case.startswith("json_") else "pairs.jsonl")
    path.write_text(text)
    assert json_file_problem(path) == expected


def test_jsonl_line_that_is_not_json_is_named(tmp_path, tiny_phi3):
    """datasets said only `DatasetGenerationError: An error occurred while generating the dataset`."""
    data = tmp_path / "pairs.jsonl"
    lines = [json.dumps(standard(i)) for i in range(8)]
    lines[5] = lines[5][:-1]  # the closing brace lost in an edit
    data.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    proc = cli("prepare", recipe_for(tmp_path, tiny_phi3, data), "--output-dir", out)
    refused(proc, out, f"error: {data}: line 6: not valid JSON: Expecting ',' delimiter (column {len(lines[5]) + 1}); each line must be one JSON object")


def test_a_line_that_is_not_json_is_one_line_on_stderr(tmp_path, tiny_phi3):
    """datasets' JSON reader logged its own unprefixed "Failed to load JSON from file ... in row 4"
    before alignpress's line: the row counted from 0, within a block."""
    data = tmp_path / "pairs.jsonl"
    lines = [json.dumps(standard(i)) for i in range(8)]
    lines[4] = "{" + lines[4]
    data.write_text("\n".join(lines) + "\n")
    proc = cli("validate", recipe_for(tmp_path, tiny_phi3, data))
    assert (proc.returncode, proc.stdout, proc.stderr) == (2, "", f"error: {data}: line 5: not valid JSON: Expecting property name enclosed in "
                                                                  "double quotes (column 2); each line must be one JSON object\n")


EMPTY_FILES = {"empty.jsonl": "", "blank.jsonl": "\n  \n\n", "empty.json": "[]\n", "header.csv": "prompt,chosen,rejected\n", "empty.csv": "",
               "empty.parquet": None}


@pytest.mark.parametrize("name", EMPTY_FILES)
def test_a_file_with_no_rows_says_so(tmp_path, tiny_phi3, name):
    """The reader's words were `StopIteration: `, `ValueError: Instruction "train" corresponds to no
    data!`, `EmptyDataError` or `ArrowInvalid: BatchSize must be greater than 0` (after a line of its own)."""
    import pandas as pd

    data = tmp_path / name
    if EMPTY_FILES[name] is None:
        pd.DataFrame({c: pd.Series([], dtype=str) for c in ("prompt", "chosen", "rejected")}).to_parquet(data)
    else:
        data.write_text(EMPTY_FILES[name])
    recipe = recipe_for(tmp_path, tiny_phi3, data)
    proc = cli("validate", recipe)
    assert (proc.returncode, proc.stdout, proc.stderr) == (2, "", f"error: {recipe}: field 'data.dataset': {data} has no rows\n")


def test_csv_that_pandas_cannot_parse_gives_pandas_reason(tmp_path, tiny_phi3):
    """Not the wrapper's `DatasetGenerationError: An error occurred while generating the dataset`."""
    data = tmp_path / "pairs.csv"
    data.write_text("prompt,chosen,rejected\nq1,a,b\nq2,a,b,c,d\n")
    out = tmp_path / "out"
    proc = cli("prepare", recipe_for(tmp_path, tiny_phi3, data), "--output-dir", out)
    refused(proc, out, f"error: {tmp_path / 'recipe.yaml'}: field 'data.dataset': could not read {data}: ParserError: Error tokenizing data. "
                       "C error: Expected 3 fields in line 3, saw 5")
