"""The model card of the demo run, parsed with huggingface_hub's ModelCard: every section and field.

Also: no stray auto-generated cards (checkpoints carry none; adapter/README.md is alignpress's
PEFT card, not PEFT's empty template).
"""

from __future__ import annotations

import json
import os
import re

import yaml
from huggingface_hub import ModelCard
from transformers import AutoTokenizer

from alignpress.card import inherited_limitations, intended_use_lines, limitation_lines
from alignpress.recipe import load_recipe
from conftest import ROOT

SECTIONS = [
    "# demo", "## What was done", "## Intended use", "## Limitations and bias", "## Hyperparameters", "## Training data",
    "## Training results", "## Evaluation (held-out pairs)", "## Usage", "## Framework versions", "## Reproduce", "### Recipe",
    "## Citations",
]


def headings(text: str) -> list[str]:
    """Markdown headings outside code blocks, in order."""
    out, fenced = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and re.match(r"^#{1,3} ", line):
            out.append(line)
    return out


def section(text: str, title: str) -> str:
    start = text.index(title + "\n")
    rest = text[start + len(title) + 1 :]
    nxt = re.search(r"^## ", rest, flags=re.M)
    return rest[: nxt.start()] if nxt else rest


def test_model_card_sections_and_fields(demo_run):
    out = demo_run[0]
    card = ModelCard.load(out / "model" / "README.md")
    assert card.data.to_dict() == {
        "language": ["en"], "library_name": "transformers", "license": "mit", "pipeline_tag": "text-generation",
        "tags": ["dpo", "trl", "alignpress", "lora", "demo", "arithmetic"],
    }
    text = card.text
    assert [h for h in headings(text) if h in SECTIONS] == SECTIONS
    manifest = json.loads((out / "run.json").read_text())
    stats = json.loads((out / "data" / "stats.json").read_text())

    assert section(text, "## Intended use").strip().startswith(
        "A version of alignpress's built-in toy model `builtin:tiny-phi3-arithmetic`, made to demonstrate and test the alignment job."
    )
    assert ("`builtin:tiny-phi3-arithmetic` aligned with Direct Preference Optimization (TRL `DPOTrainer`, loss `sigmoid` + `sft`, beta 0.1) "
            "on `data/arithmetic-capybara.jsonl` (capybara format)") in section(text, "## What was done")
    assert "\n| loss_type | sigmoid, sft |\n| max_length | 64 |\n" in section(text, "## Hyperparameters")
    limits = section(text, "## Limitations and bias")
    assert "DPO moves the model towards the chosen answers of `data/arithmetic-capybara.jsonl`" in limits
    assert "Its behaviour score checks the form of an answer (matching `^The answer is \\d+\\.$`), not whether the answer is correct." in limits
    # The base model's card has no limitations section: its description is quoted.
    assert "From the base model's card (`builtin:tiny-phi3-arithmetic`):\n\n> A 4-layer Phi-3-architecture model built by alignpress" in limits
    assert "Not useful for anything else." in limits

    # One process: each optimizer step took 8 pairs x 1 accumulation step
    assert section(text, "## Hyperparameters").strip().splitlines()[-4:] == [
        "| optim | adamw_torch |", "| seed | 42 |", "| training processes | 1 |", "| pairs per optimizer step | 8 |"]

    data = section(text, "## Training data")
    assert "- source: `data/arithmetic-capybara.jsonl` (a local file), split `train[100:]`, format `auto`; held out: split `train[:100]`\n" in data
    assert ("- filters: rating_chosen >= 4.5, rating_rejected <= 2.5, at most 2 messages, at most 64 tokens, no empty prompts or answers, "
            "chosen differs from rejected, no duplicate pairs\n") in data
    for split, info in stats["splits"].items():
        assert f"- {split}: {info['loaded']} rows loaded, {info['kept']} kept" in data

    usage = section(text, "## Usage")
    first = json.loads((out / "data" / "eval.jsonl").read_text().splitlines()[0])["messages"]["prompt"]
    assert f"messages = {json.dumps(first, ensure_ascii=False)}\n" in usage
    assert "max_new_tokens=24" in usage  # eval.max_new_tokens
    tok = AutoTokenizer.from_pretrained(out / "model")
    rendered = tok.apply_chat_template(first, add_generation_prompt=True, tokenize=False)
    assert f"```text\n{rendered}\n```" in usage and rendered.startswith("<|user|>\n")

    repro = section(text, "## Reproduce")
    commit = manifest["alignpress"]["commit"]
    assert commit is None or re.fullmatch(r"[0-9a-f]{40}(-dirty)?", commit)
    assert repro.startswith(f"\nalignpress 0.1.0{f', commit `{commit}`' if commit else ''}; recipe `demo` (from `recipes/demo.yaml`, every `--set` applied).")
    assert "```bash\npython entrypoint.py run recipe.yaml\n```" in repro
    # Paths of the machine it ran on are said to be so (the builtin model is alignpress's own).
    assert ("The recipe reads local files that are not in this repository: the data `data/arithmetic-capybara.jsonl`; put them where "
            "it names them to run it.\n") in repro
    recipe_yaml = repro.split("```yaml\n", 1)[1].split("\n```", 1)[0]
    assert yaml.safe_load(recipe_yaml) == yaml.safe_load((out / "recipe.resolved.yaml").read_text())


def test_no_stray_cards(demo_run):
    out = demo_run[0]
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("README.md")) == ["adapter/README.md", "model/README.md"]
    adapter = ModelCard.load(out / "adapter" / "README.md")
    # A builtin base is no Hub id, so no base_model (test_adapter_card_metadata_for_a_hub_base covers one).
    assert adapter.data.to_dict() == {
        "language": ["en"], "library_name": "peft", "license": "mit", "pipeline_tag": "text-generation",
        "tags": ["dpo", "trl", "alignpress", "lora", "demo", "arithmetic"],
    }
    assert "A LoRA adapter for alignpress's built-in toy model" in adapter.text
    assert "merged into the base weights" not in adapter.text and "## Evaluation (held-out pairs)" in adapter.text
    assert "Provide a quick summary" not in adapter.text  # PEFT's template


def test_a_hub_base_without_a_reachable_card_links_it():
    r = load_recipe(ROOT / "recipes/gemma-2b-it-capybara.yaml")
    lines = limitation_lines(r, None)
    assert lines[-2] == "See the base model's card for its own limitations, biases and risks: https://huggingface.co/google/gemma-2b-it"
    use = "\n".join(intended_use_lines(r, "finetune"))
    assert "A version of `google/gemma-2b-it` tuned towards the preferences in its training data" in use
    assert "(see its card: https://huggingface.co/google/gemma-2b-it)." in use


def test_limitations_are_taken_from_the_base_cards_sections():
    base = """# Some model

Intro paragraph.

## Uses

Chat.

## Bias, Risks, and Limitations

It may be wrong.

### Recommendations

Review its answers.

## Training Details

Lots of data.
"""
    assert inherited_limitations(base) == ["#### Bias, Risks, and Limitations", "", "It may be wrong.", "", "##### Recommendations", "", "Review its answers.", ""]
    assert inherited_limitations("# M\n\nA small model.\nSecond line.\n\nMore.") == ["> A small model. Second line."]


def test_card_names_the_local_files_a_recipe_reads(tmp_path, tiny_phi3):
    """The card's recipe names a model folder, a template file and a data file of the machine it ran
    on: the Reproduce section says they are not in the repo; a Hub dataset is not named."""
    from alignpress.card import local_inputs
    from alignpress.recipe import load_recipe

    (tmp_path / "t.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    (tmp_path / "pairs.jsonl").write_text('{"prompt": "p", "chosen": "c", "rejected": "r"}\n')
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: r\nmodel: {{name_or_path: {tiny_phi3}, chat_template: t.jinja}}\n"
                      "data: {datasets: [{dataset: pairs.jsonl}, {dataset: someone/prefs}]}\n")
    assert local_inputs(load_recipe(recipe)) == [f"the base model `{tiny_phi3}`", "the chat template `t.jinja`", "the data `pairs.jsonl`"]


def test_the_card_says_what_was_held_out_when_the_recipe_names_no_split():
    """With neither eval_split nor eval_fraction, prepare holds out 10% of the rows: the card says so
    (it used to say "no held-out split" of a model evaluated on the held-out rows)."""
    from alignpress.card import data_lines

    lines = data_lines(load_recipe(ROOT / "recipes/demo.yaml", ["data.eval_split=null", "data.split=train"]))
    assert lines[0] == "- source: `data/arithmetic-capybara.jsonl` (a local file), split `train`, format `auto`; held out: 0.1 of the rows (seeded)"
    lines = data_lines(load_recipe(ROOT / "recipes/demo.yaml", ["data.eval_split=null", "data.split=train", "data.eval_fraction=0.25"]))
    assert lines[0].endswith("; held out: 0.25 of the rows (seeded)")


def test_reproduce_keeps_a_copy_local_and_shows_no_local_path():
    """The card's recipe names the author's repository: `run recipe.yaml` as the card said failed
    for anyone else (no token, or another namespace). An absolute recipe path named the author's
    home folder on a public card."""
    from alignpress.card import reproduce_lines
    from alignpress.recipe import load_recipe

    recipe = load_recipe(ROOT / "recipes/demo.yaml", ["publish.repo_id=alice/demo-dpo", "publish.push=both", "publish.adapter_repo_id=alice/demo-lora"])
    lines = reproduce_lines(recipe, {"recipe_file": "/home/alice/work/recipes/demo.yaml", "alignpress": {"version": "0.1.0"}})
    assert lines[2] == "alignpress 0.1.0; recipe `demo` (from `demo.yaml`, every `--set` applied). Save the recipe below as `recipe.yaml` and run:"
    assert lines[5] == "python entrypoint.py run recipe.yaml --set publish.repo_id=null --set publish.adapter_repo_id=null"
    assert lines[8].startswith("The `--set` keeps the result in `outputs/` instead of pushing it to this repository")
    local = reproduce_lines(load_recipe(ROOT / "recipes/demo.yaml"), {"recipe_file": "recipes/demo.yaml"})
    assert local[5] == "python entrypoint.py run recipe.yaml" and "from `recipes/demo.yaml`" in local[2]
    assert not any(line.startswith("The `--set`") for line in local)


def test_the_cards_gate_sentence_has_each_number_in_its_place(demo_run):
    """Gain and minimum, KL and limit: each where the sentence says it is."""
    from alignpress.card import evaluation_lines

    evals = json.loads((demo_run[0] / "metrics/eval.json").read_text())
    evals["gate"] = {"passed": True, "preference_accuracy_gain": 0.6889, "min_gain": 0.02, "kl_estimate": 0.3623, "max_kl": 50.0}
    assert "Publish gate passed: preference accuracy gain 0.6889 (minimum 0.02), KL estimate 0.3623 (limit 50)." in evaluation_lines(evals)
    evals["gate"] = {"passed": False, "reasons": [{"field": "eval.gate_max_kl", "reason": "the KL estimate exceeds the limit"}]}
    assert "Publish gate failed: the KL estimate exceeds the limit." in evaluation_lines(evals)


def test_hardware_text(monkeypatch):
    """What trained, as run.json and the card say it (the GPU's name from torch: a stand-in here)."""
    import torch

    from alignpress.train import hardware_text

    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert hardware_text("cpu", 1) == f"CPU ({os.cpu_count()} cores)"
    assert hardware_text("cpu", 2) == "CPU (2 processes)"
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
    assert hardware_text("cuda", 1) == "1 x NVIDIA H100 80GB HBM3"
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert hardware_text("cuda", 16) == "16 x NVIDIA H100 80GB HBM3 on 2 nodes"
    assert hardware_text("cuda", 8) == "8 x NVIDIA H100 80GB HBM3"
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert hardware_text("cpu", 2) == "CPU (2 processes on 2 nodes)"


def test_the_training_table_says_what_a_resumed_runs_time_covers():
    from alignpress.card import training_result_lines

    info = {"global_step": 53, "resumed_from_step": 20, "train_runtime_s": 9.46, "hardware": "1 x NVIDIA L40S", "final_loss": 1.1378824,
            "final_window_steps": [46, 50]}
    assert training_result_lines(info) == [
        "| metric | value |", "| --- | --- |", "| global_step | 53 |", "| train_runtime_s | 9.46 |", "| hardware | 1 x NVIDIA L40S |",
        "| final_loss | 1.138 |",
        "", "final_loss and rewards/*: means over the last logged window, steps 46–50.",
        "", "Training resumed from the checkpoint of step 20 (the run had been stopped); train_runtime_s counts steps 21–53 only.",
    ]
    assert training_result_lines(info | {"resumed_from_step": 0})[-1] == "final_loss and rewards/*: means over the last logged window, steps 46–50."


def test_the_loss_is_written_as_trl_sums_it():
    from alignpress.card import _fmt, loss_text

    assert loss_text("sigmoid", None) == "`sigmoid`"
    assert loss_text(["sigmoid", "sft"], None) == "`sigmoid` + `sft`"
    assert loss_text(["sigmoid", "sft"], [1.0, 0.5]) == "1 x `sigmoid` + 0.5 x `sft`"
    assert (_fmt(["sigmoid", "sft"]), _fmt([1.0, 0.25])) == ("sigmoid, sft", "1, 0.25")
