"""Rendering through the model's own chat template, for the Phi-3 and Gemma formats.

The tiny tokenizers reproduce the formats in shared/reference/models-and-data.md: Phi-3's
'<|role|>\\n{content}<|end|>\\n' turns with eos after the last turn and specials that strip the
whitespace to their right; Gemma's bos + '<start_of_turn>{role}\\n{content}<end_of_turn>\\n' with
'model' for the assistant.
"""

import json

import pytest
from jinja2.exceptions import TemplateError

from alignpress.modeling import load_tokenizer
from alignpress.prepare import render_pair
from alignpress.recipe import DataSection, ModelSection, Recipe

PAIR = {
    "prompt": [{"role": "user", "content": "What is 2 plus 3?"}],
    "chosen": [{"role": "assistant", "content": "The answer is 5."}],
    "rejected": [{"role": "assistant", "content": "Maybe 6."}],
}


def recipe_for(folder) -> Recipe:
    return Recipe(name="t", model=ModelSection(name_or_path=str(folder)), data=DataSection(dataset="x.jsonl"))


def tokens(tok, ids):
    return tok.convert_ids_to_tokens(ids)


def test_phi3_rendering_exact(tiny_phi3):
    tok = load_tokenizer(recipe_for(tiny_phi3))
    row = render_pair(tok, PAIR)
    assert row["prompt"] == "<|user|>\nWhat is 2 plus 3?<|end|>\n<|assistant|>\n"
    # One <|end|> and one eos: nothing is appended by hand.
    assert row["chosen"] == "The answer is 5.<|end|>\n<|endoftext|>"
    assert row["rejected"] == "Maybe 6.<|end|>\n<|endoftext|>"
    full = tok.apply_chat_template(PAIR["prompt"] + PAIR["chosen"], tokenize=True, return_dict=True)["input_ids"]
    n = row["prompt_tokens"]
    # The specials eat the newline after them, as Phi-3's do; the answer starts right after <|assistant|>.
    assert tokens(tok, full[:n])[0] == "<|user|>" and tokens(tok, full[:n])[-2:] == ["<|end|>", "<|assistant|>"]
    assert "".join(tokens(tok, full[n:])).replace("Ġ", " ") == "The answer is 5.<|end|><|endoftext|>"
    assert full[-1] == tok.eos_token_id
    assert row["chosen_tokens"] == len(full) - n


def test_phi3_pad_is_not_eos(tiny_phi3):
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(tiny_phi3).pad_token == "<|endoftext|>"  # as Phi-3 ships it
    tok = load_tokenizer(recipe_for(tiny_phi3))
    assert tok.pad_token == "<unk>" and tok.pad_token_id != tok.eos_token_id


def test_gemma_rendering_exact(tiny_gemma):
    tok = load_tokenizer(recipe_for(tiny_gemma))
    row = render_pair(tok, PAIR)
    assert row["prompt"] == "<bos><start_of_turn>user\nWhat is 2 plus 3?<end_of_turn>\n<start_of_turn>model\n"
    assert row["chosen"] == "The answer is 5.<end_of_turn>\n"
    full = tok.apply_chat_template(PAIR["prompt"] + PAIR["chosen"], tokenize=True, return_dict=True)["input_ids"]
    # Exactly one bos: the template writes it and tokenizing the template's output adds none.
    assert full.count(tok.bos_token_id) == 1 and full[0] == tok.bos_token_id
    n = row["prompt_tokens"]
    assert tok.decode(full[:n]) == row["prompt"] and tok.decode(full[n:]) == row["chosen"]
    assert tokens(tok, full[:n])[-7:] == ["<start_of_turn>", "m", "o", "d", "e", "l", "Ċ"]
    assert tokens(tok, full)[-2:] == ["<end_of_turn>", "Ċ"]
    assert tok.pad_token == "<pad>"


def test_gemma_refuses_system_turns(tiny_gemma):
    tok = load_tokenizer(recipe_for(tiny_gemma))
    pair = dict(PAIR, prompt=[{"role": "system", "content": "Be brief."}] + PAIR["prompt"])
    with pytest.raises(TemplateError, match="System role not supported"):
        render_pair(tok, pair)


@pytest.mark.parametrize("kind", ["tiny_phi3", "tiny_gemma"])
def test_token_counts_match_trl(kind, request, tmp_path):
    """Our prompt/answer boundary and counts are the ones TRL's DPOTrainer trains on."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    folder = request.getfixturevalue(kind)
    tok = load_tokenizer(recipe_for(folder))
    pairs = [PAIR, {"prompt": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "Hello there"}],
                    "chosen": [{"role": "assistant", "content": "Hi!"}], "rejected": [{"role": "assistant", "content": "What do you want"}]}]
    ours = [render_pair(tok, p) for p in pairs]
    model = AutoModelForCausalLM.from_pretrained(folder)
    args = DPOConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, max_length=None, per_device_train_batch_size=2)
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(pairs), processing_class=tok)
    for pair, mine, theirs in zip(pairs, ours, trainer.train_dataset):
        assert (mine["prompt_tokens"], mine["chosen_tokens"], mine["rejected_tokens"]) == (len(theirs["prompt_ids"]), len(theirs["chosen_ids"]), len(theirs["rejected_ids"]))
        full = tok.apply_chat_template(pair["prompt"] + pair["chosen"], tokenize=True, return_dict=True)["input_ids"]
        assert theirs["prompt_ids"] + theirs["chosen_ids"] == full
        assert theirs["chosen_ids"][-1] == (tok.eos_token_id if kind == "tiny_phi3" else tok.convert_tokens_to_ids("Ċ"))


def test_a_template_that_drops_the_answer_is_refused_per_row(tiny_phi3):
    """Such a template used to prepare pairs whose answers were empty, and training went on."""
    tok = load_tokenizer(recipe_for(tiny_phi3))
    tok.chat_template = "{% for m in messages %}{% if m.role == 'user' %}{{ m.content }}{% endif %}{% endfor %}"
    with pytest.raises(ValueError, match=r"^the chat template renders the chosen answer as no tokens: it does not write the assistant's message$"):
        render_pair(tok, PAIR)
    tok.chat_template = "{% for m in messages %}{% if m.role == 'user' %}{{ m.content }}{% else %}{{ eos_token }}{% endif %}{% endfor %}"
    with pytest.raises(ValueError, match=r"^the chat template renders the chosen and rejected answers as the same tokens"):
        render_pair(tok, PAIR)


def test_chat_template_from_a_file_next_to_the_recipe(tiny_phi3, tmp_path):
    from alignpress.recipe import load_recipe

    template = "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    (tmp_path / "phi3.jinja").write_text(template)
    path = tmp_path / "r.yaml"
    path.write_text(f"name: t\nmodel: {{name_or_path: {tiny_phi3}, chat_template: phi3.jinja}}\ndata: {{dataset: x.jsonl}}\n")
    tok = load_tokenizer(load_recipe(path))
    assert tok.chat_template == template
    assert render_pair(tok, PAIR)["chosen"] == "The answer is 5.<|end|>\n"


def test_an_edited_template_file_is_a_different_recipe(tiny_phi3, tmp_path, capsys):
    """The recipe text names the file, not its contents: editing the file after prepare used to go
    unseen, and later stages saved a tokenizer with another template than the data was prepared with."""
    import shutil

    from alignpress.cli import main

    template = "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    (tmp_path / "t.jinja").write_text(template)
    shutil.copy("recipes/data/arithmetic-capybara.jsonl", tmp_path / "d.jsonl")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: t\nmodel: {{name_or_path: {tiny_phi3}, chat_template: t.jinja}}\n"
                      "data: {dataset: d.jsonl, max_train_rows: 16, max_eval_rows: 8}\ntrain: {device: cpu}\n")
    out = tmp_path / "out"
    assert main(["prepare", str(recipe), "--output-dir", str(out)]) == 0
    capsys.readouterr()

    (tmp_path / "t.jinja").write_text(template.replace("<|end|>", "<|end|><|end|>"))
    assert main(["train", str(recipe), "--output-dir", str(out)]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: {out}/recipe.resolved.yaml: this folder holds a run of a different recipe (model.chat_template "
        f"(the file {tmp_path}/t.jinja was edited) differs); use another --output-dir (on SkyPilot: another --env RUN_NAME), or `run --restart` to redo it here"
    )
    # Putting the file back makes it the same recipe again; `prepare --restart` accepts the new one.
    (tmp_path / "t.jinja").write_text(template)
    assert main(["validate", str(recipe)]) == 0
    (tmp_path / "t.jinja").write_text(template.replace("<|end|>", "<|end|><|end|>"))
    assert main(["prepare", str(recipe), "--output-dir", str(out), "--restart"]) == 0
    assert main(["prepare", str(recipe), "--output-dir", str(out)]) == 0


@pytest.mark.parametrize("kind, end", [("tiny_phi3", "<|end|>"), ("tiny_gemma", "<end_of_turn>")])
def test_greedy_answers_stop_where_the_templates_turn_ends(kind, end, request):
    """Training answers end with the template's end-of-turn token; gemma-2b-it's generation config
    stops only at <eos> (id 1), so evaluation's greedy answers ran on past the turn. The stop ids
    now hold the token the template writes after an answer, whatever the generation config says."""
    from transformers import GenerationConfig

    from alignpress.modeling import stop_token_ids, turn_end_id

    tok = load_tokenizer(recipe_for(request.getfixturevalue(kind)))
    end_id = tok.convert_tokens_to_ids(end)
    assert turn_end_id(tok) == end_id
    model = type("M", (), {"generation_config": GenerationConfig(eos_token_id=tok.eos_token_id)})()
    assert stop_token_ids(tok, model) == [tok.eos_token_id, end_id]
    model.generation_config = GenerationConfig(eos_token_id=[end_id, tok.eos_token_id])
    assert stop_token_ids(tok, model) == [end_id, tok.eos_token_id]  # already there: nothing added
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"  # writes nothing after an answer
    assert turn_end_id(tok) is None and stop_token_ids(tok) == [tok.eos_token_id]


def test_a_generation_prompt_the_answers_do_not_begin_with_is_said_at_prepare(tiny_phi3, tmp_path, capsys):
    """A template whose generation prompt ends with more than the rendered conversation has before an
    answer (a reasoning template's opened think block): TRL trains from where the two part and warns
    once, at training. Prepare says it first, with the count and the text left out."""
    import shutil

    from alignpress.cli import main

    tok = load_tokenizer(recipe_for(tiny_phi3))
    assert "left_out" not in render_pair(tok, PAIR)
    template = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|assistant|>\nThink first.{% endif %}")
    tok.chat_template = template
    row = render_pair(tok, PAIR)
    assert row["left_out"] == "Think first." and row["prompt"].endswith("<|assistant|>\nThink first.")
    ids = tok.apply_chat_template(PAIR["prompt"], add_generation_prompt=True, return_dict=True)["input_ids"]
    assert tok.decode(ids[:row["prompt_tokens"]]).endswith("<|assistant|>")

    (tmp_path / "t.jinja").write_text(template)
    shutil.copy("recipes/data/arithmetic-capybara.jsonl", tmp_path / "d.jsonl")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: t\nmodel: {{name_or_path: {tiny_phi3}, chat_template: t.jinja}}\n"
                      "data: {dataset: d.jsonl, split: 'train[:40]', eval_split: 'train[40:50]'}\ntrain: {device: cpu}\n")
    assert main(["prepare", str(recipe), "--output-dir", str(tmp_path / "out")]) == 0
    said = [m for m in capsys.readouterr().err.splitlines() if "begin with" in m]
    assert said == [f"[alignpress] {tmp_path}/d.jsonl, {split}: in {n} of {n} rows the chat template ends the prompt alone with 'Think first.', which the "
                    "rendered answers do not begin with: training leaves it out, and generation (add_generation_prompt) puts it back"
                    for split, n in (("train[:40]", 38), ("train[40:50]", 10))]  # 2 of 40 filtered out
    assert all("left_out" not in json.loads(line) for line in (tmp_path / "out/data/train.jsonl").read_text().splitlines())
