"""The recipe schema: every shipped recipe validates; every kind of mistake names its file and field."""

import dataclasses
import os
from pathlib import Path

import pytest
import yaml

from alignpress import yamlfile
from alignpress.errors import AlignpressError
from alignpress.recipe import Recipe, accelerate_config_path, check_repo_id, check_tag, describe, load_recipe, token_cap
from conftest import ROOT, cli

RECIPES = sorted(p for p in (ROOT / "recipes").rglob("*.yaml") if "accelerate" not in p.parts)


def test_recipes_are_found():
    names = {p.name for p in RECIPES}
    assert {"demo.yaml", "phi3-mini-capybara.yaml", "gemma-2b-it-capybara.yaml"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_recipe_validates(path):
    recipe = load_recipe(path)
    assert recipe.name == yaml.safe_load(path.read_text()).get("name", path.stem)


def test_seed_recipes_reproduce_the_notebooks():
    phi3 = load_recipe(ROOT / "recipes/phi3-mini-capybara.yaml")
    gemma = load_recipe(ROOT / "recipes/gemma-2b-it-capybara.yaml")
    # Facts from shared/reference/models-and-data.md (the seeds' training setup).
    assert (phi3.data.split, phi3.data.eval_split) == ("train[300:2500]", "train[:300]")
    assert (gemma.data.split, gemma.data.eval_split) == ("train[500:]", "train[:500]")
    assert phi3.data.filters.min == {"rating_chosen": 4.5} and gemma.data.filters.min == {"rating_chosen": 4.0}
    for r in (phi3, gemma):
        assert r.data.filters.max == {"rating_rejected": 2.5}
        assert r.data.filters.max_messages == 2
        assert (r.lora.r, r.lora.alpha, r.lora.dropout, r.lora.target_modules) == (16, 32.0, 0.05, "all-linear")
        # Systems settings: the fastest measured (benchmarks/results/2026-11-26-h200), the seed's one --set list away
        assert r.model.load_in_4bit is False and r.train.use_liger_kernel and r.train.group_by_length
        assert (r.train.gradient_checkpointing, r.dpo.precompute_ref_log_probs, r.train.optim) == ("auto", "auto", "adamw_torch_fused")
        assert (r.train.learning_rate, r.train.lr_scheduler_type, r.train.warmup_steps) == (5e-6, "cosine", 2)
        assert (r.train.num_train_epochs, r.dpo.beta, r.dpo.max_length) == (6.0, 0.1, 2048)
        assert r.publish.private is True
        assert (r.eval.gate_min_gain, r.eval.gate_max_kl) == (0.02, 50.0)  # a run that changed nothing is not published
    assert (phi3.train.per_device_train_batch_size, phi3.train.gradient_accumulation_steps) == (4, 1)  # the seed's 2 x 2 pairs a step
    assert (gemma.train.per_device_train_batch_size, gemma.train.gradient_accumulation_steps) == (3, 1)  # the seed's 1 x 3
    # The seed notebooks' own systems settings, as each header documents them
    for path, batch, accumulation in (("recipes/phi3-mini-capybara.yaml", 2, 2), ("recipes/gemma-2b-it-capybara.yaml", 1, 3)):
        line = next(x for x in (ROOT / path).read_text().splitlines() if x.startswith("#   --set "))
        seed = load_recipe(ROOT / path, [a for a in line.removeprefix("#").split() if a != "--set"])
        assert seed.model.load_in_4bit is True and seed.train.gradient_checkpointing is True and seed.train.optim == "paged_adamw_32bit"
        assert (seed.train.per_device_train_batch_size, seed.train.gradient_accumulation_steps) == (batch, accumulation)
        assert not seed.train.use_liger_kernel and not seed.train.group_by_length and seed.dpo.precompute_ref_log_probs is False
    assert (phi3.card.license, gemma.card.license) == ("mit", "gemma")
    # Phi-3's seed capped rows (3,800 characters, here 1,024 tokens); Gemma's had no cap: prepare keeps
    # its pairs within dpo.max_length, so TRL cuts none.
    assert (token_cap(phi3), token_cap(gemma)) == (1024, 2048)


def test_a_cap_above_max_length_is_allowed_with_a_truncation_budget():
    r = load_recipe(ROOT / "recipes/demo.yaml", ["data.filters.max_tokens=128", "dpo.max_truncated_fraction=0.1"])
    assert (token_cap(r), r.dpo.max_length) == (128, 64)


def test_overrides_are_typed():
    r = load_recipe(ROOT / "recipes/demo.yaml", ["train.learning_rate=1e-5", "dpo.beta=0.25", "lora.target_modules=[q_proj, v_proj]", "data.filters.min.rating_chosen=3"])
    assert r.train.learning_rate == 1e-5 and isinstance(r.train.learning_rate, float)
    assert r.dpo.beta == 0.25
    assert r.lora.target_modules == ["q_proj", "v_proj"]
    assert r.data.filters.min == {"rating_chosen": 3.0}


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


BASE = "name: t\nmodel: {name_or_path: x/y}\ndata: {dataset: d.jsonl}\n"


@pytest.mark.parametrize(
    "extra, overrides, expected",
    [
        ("dpo: {betta: 0.1}\n", [], "field 'dpo.betta'... unknown field 'dpo.betta'; did you mean 'beta'?"),
        ("dpo: {beta: fast}\n", [], "field 'dpo.beta': expected a number, got 'fast'"),
        ("dpo: {beta: 0}\n", [], "field 'dpo.beta': must be > 0, got 0.0"),
        ("train: {per_device_train_batch_size: 1.5}\n", [], "field 'train.per_device_train_batch_size': expected an integer, got 1.5"),
        ("model: {name_or_path: x/y, load_in_4bit: yes please}\n", [], "field 'model.load_in_4bit': expected true or false, got 'yes please'"),
        ("data: {dataset: d.jsonl, format: csvish}\n", [], "field 'data.format': unknown format 'csvish'"),
        ("data: {dataset: d.jsonl, eval_split: 'train[:10]', eval_fraction: 0.1}\n", [], "field 'data.eval_fraction': set either"),
        ("publish: {repo_id: 'no-namespace'}\n", [], "field 'publish.repo_id': 'no-namespace': expected namespace/name"),
        ("publish: {repo_id: 'me/bad--name'}\n", [], "field 'publish.repo_id': 'me/bad--name': 'bad--name' is not a valid Hub name"),
        ("", ["dpo.bta=0.2"], "--set dpo.bta: unknown field 'dpo.bta'; did you mean 'beta'?"),
        # TRL's DPOConfig holds beta, max_length and learning_rate together: a field of another section is named there
        ("train: {beta: 0.2}\n", [], "field 'train.beta'... unknown field 'train.beta'; did you mean 'dpo.beta'?"),
        ("", ["dpo.learning_rate=1e-5"], "--set dpo.learning_rate: unknown field 'dpo.learning_rate'; did you mean 'train.learning_rate'?"),
        ("", ["seed=1"], "--set seed: unknown field 'seed'; did you mean 'data.seed' or 'train.seed'?"),
        ("", ["model.name_or_path=microsoft/Phi 3 mini"], "--set model.name_or_path: field 'model.name_or_path': 'microsoft/Phi 3 mini' is neither a local path "
                                                          "nor a valid Hub model id: 'Phi 3 mini' may hold only letters, digits, '-', '_', '.' (no spaces), at most 96 characters"),
        ("", ["data.dataset=argilla distilabel"], "field 'data.dataset': 'argilla distilabel' is neither a local path nor a valid Hub dataset id"),
        ("data: {datasets: [{dataset: 'a b/c'}]}\n", [], "field 'data.datasets[0].dataset': 'a b/c' is neither a local path nor a valid Hub dataset id: 'a b'"),
        ("", ["eval.judge=not a model"], "field 'eval.judge': 'not a model' is neither a local path nor a valid Hub model id"),
        ("", ["data.split=train[2500:300]"], "--set data.split: field 'data.split': 'train[2500:300]' selects no rows: the slice ends where it starts or before"),
        ("data: {datasets: [{dataset: a.jsonl, eval_split: 'train[5:5]'}]}\n", [], "field 'data.datasets[0].eval_split': 'train[5:5]' selects no rows"),
        ("", ["publish.repo_id="], "--set publish.repo_id: the value is empty (an unset shell variable?); write publish.repo_id=null for none"),
        ("", ["eval.gate_min_gain= "], "--set eval.gate_min_gain: the value is empty (an unset shell variable?); write eval.gate_min_gain=null for none"),
        ("", ["dpo.beta=abc"], "--set dpo.beta: field 'dpo.beta': expected a number, got 'abc'"),
        ("", ["train.max_steps=0"], "--set train.max_steps: field 'train.max_steps': must be -1"),
        ("", ["train.max_steps=-2"], "--set train.max_steps: field 'train.max_steps': must be -1 (use epochs) or at least 1, got -2"),
        ("", ["dpo.loss_type=robust", "dpo.label_smoothing=0.5"], "field 'dpo.label_smoothing': must be in [0, 0.5), got 0.5"),
        ("", ["data.eval_split=null", "data.eval_fraction=1"], "field 'data.eval_fraction': must be between 0 and 1, got 1.0"),
        ("lora: {enabled: false}\nmodel: {name_or_path: x/y, load_in_4bit: true}\n", [], "field 'model.load_in_4bit': 4-bit training needs a LoRA adapter"),
        ("dpo: {loss_type: [sigmoid, sft], loss_weights: [1.0]}\n", [], "field 'dpo.loss_weights': has 1 weights for 2 loss types"),
        ("dpo: {beta: .nan}\n", [], "field 'dpo.beta': must be a finite number, got nan"),
        ("data: {dataset: d.jsonl, filters: {min: {rating_chosen: -.inf}}}\n", [], "field 'data.filters.min.rating_chosen': must be a finite number, got -inf"),
        ("", ["eval.gate_max_kl=inf"], "--set eval.gate_max_kl: field 'eval.gate_max_kl': must be a finite number, got inf"),
        ("lora: {target_modules: []}\n", [], "field 'lora.target_modules': the list is empty: name at least one module (e.g. [q_proj, v_proj]) or write all-linear"),
        ("lora: {target_modules: [q_proj, '']}\n", [], "field 'lora.target_modules': a module name is empty"),
        ("data: {dataset: d.jsonl, filters: {max_tokens: 2048}}\ndpo: {max_length: 1024}\n", [],
         "field 'data.filters.max_tokens': 2048 is more than dpo.max_length (1024): TRL would cut the pairs in between, losing the end of their "
         "answers; lower it (or leave it unset: prepare then keeps pairs within dpo.max_length), or allow some cut pairs with dpo.max_truncated_fraction"),
        ("", ["train.learning_rate=0"], "--set train.learning_rate: field 'train.learning_rate': must be > 0, got 0.0 (training would change nothing)"),
        ("", ["dpo.label_smoothing=0.3"], "field 'dpo.label_smoothing': 0.3 would be ignored: TRL applies it only to the loss types robust, "
                                          "exo_pair, aot, aot_unpaired, not sigmoid; set it to 0 or choose one of those"),
        ("", ["dpo.loss_type=exo_pair"], "field 'dpo.label_smoothing': loss type exo_pair needs label_smoothing > 0"),
        ("", ["lora.target_modules=[qkv_proj, lm_head]"], "field 'lora.target_modules': lm_head cannot be adapted"),
        ("", ["export.check_tolerance=-1"], "field 'export.check_tolerance': must be > 0 (a merge changes the logits by float rounding), got -1.0"),
        ("", ["train.save_total_limit=0"], "field 'train.save_total_limit': must be at least 1 or null (keep every checkpoint), got 0"),
        ("", ["train.max_grad_norm=-1"], "field 'train.max_grad_norm': must be >= 0, got -1.0"),
        ("eval: {behaviour_pattern: ''}\n", [], "field 'eval.behaviour_pattern': is empty, so every answer would match"),
        ("data: {datasets: [{dataset: a.jsonl, filters: {max_tokens: 64}}]}\ndpo: {max_length: 16}\n", [],
         "field 'data.datasets[0].filters.max_tokens': 64 is more than dpo.max_length (16)"),
        ("", [f"train.accelerate_config={ROOT}/recipes/demo.yaml"], f"field 'train.accelerate_config': {ROOT}/recipes/demo.yaml is not an accelerate "
                                                                    "config: ValueError: A `distributed_type` must be specified in the config file."),
        ("", ["dpo.max_truncated_fraction=1.5"], "--set dpo.max_truncated_fraction: field 'dpo.max_truncated_fraction': must be in [0, 1), got 1.5"),
        # Settings nothing would read: the run used to go on without them.
        ("", ["train.num_processes=8"], "--set train.num_processes: field 'train.num_processes': is read only with train.accelerate_config "
                                        "(alignpress starts `accelerate launch` with both); set train.accelerate_config (e.g. ddp), or leave this unset"),
        ("model: {name_or_path: 'builtin:tiny-phi3-arithmetic', revision: main}\n", [],
         "field 'model.revision': a revision selects a commit of a Hub model; 'builtin:tiny-phi3-arithmetic' is built by alignpress, which has none"),
        ("", ["model.name_or_path=.", "model.revision=v1"], "field 'model.revision': a revision selects a commit of a Hub model; '.' is a local folder, which has none"),
        ("model: {name_or_path: x/y, revision: ''}\n", [], "field 'model.revision': must not be empty"),
        ("publish: {tag: 'v1..0'}\n", [], "field 'publish.tag': 'v1..0': git refuses '..' in a tag name"),
        ("", ["train.checkpointed_layers=0"], "--set train.checkpointed_layers: field 'train.checkpointed_layers': must be at least 1 (or null: every layer), got 0; "
                                              "to recompute none, set train.gradient_checkpointing: false"),
        ("train: {gradient_checkpointing: false, checkpointed_layers: 12}\n", [], "field 'train.checkpointed_layers': 12 layers to recompute, but "
                                                                                  "train.gradient_checkpointing is false: set it to true or auto, or drop this field"),
        ("", ["train.checkpointed_layers=true"], "field 'train.checkpointed_layers': expected an integer or null, got True"),
        ("", ["train.learning_rate=0x10"], "--set train.learning_rate: field 'train.learning_rate': must be at most 1, got 16 (DPO learning rates are about 1e-7 to 1e-4)"),
        ("", ["card.description=key: value"], "--set card.description: field 'card.description': expected a string or null, got {'key': 'value'}; "
                                              "for text, quote it inside: --set 'card.description=\"...\"'"),
        ("publish: {repo_id: a/b, adapter_repo_id: a/b-lora}\n", [], "field 'publish.adapter_repo_id': publish.push is model, which pushes no adapter: "
                                                                     "set publish.push: both (or adapter), or remove adapter_repo_id"),
    ],
)
def test_bad_recipes_name_file_and_field(tmp_path, extra, overrides, expected):
    # Later keys win in YAML mappings, so `extra` may redefine a section of BASE.
    text = BASE + extra
    data = yaml.safe_load(text)
    path = write(tmp_path, yaml.safe_dump(data))
    with pytest.raises(AlignpressError) as e:
        load_recipe(path, overrides)
    message = str(e.value)
    if not overrides:
        assert message.startswith(f"{path}: "), message
    for part in expected.split("..."):
        assert part.strip() in message, message


def test_a_choice_under_another_name_gets_a_guess_and_a_close_spelling_does_not():
    """bf16/fp16 are accelerate's and TrainingArguments' names, a GPU is cuda; a close spelling is not
    guessed: 'gpu' is nearest 'cpu', 'keep_begin' nearest 'keep_end'."""
    cases = [
        ("model.dtype=bf16", "expected one of 'auto', 'bfloat16', 'float16', 'float32', got 'bf16'; did you mean 'bfloat16'?"),
        ("export.dtype=FP16", "expected one of 'bfloat16', 'float16', 'float32', got 'FP16'; did you mean 'float16'?"),
        ("train.device=gpu", "expected one of 'auto', 'cpu', 'cuda', got 'gpu'; did you mean 'cuda'?"),
        ("train.device=CUDA", "expected one of 'auto', 'cpu', 'cuda', got 'CUDA'; did you mean 'cuda'?"),
        ("train.gradient_checkpointing=Auto", "expected one of 'auto' or true or false, got 'Auto'; did you mean 'auto'?"),
        ("publish.push=merged", "expected one of 'model', 'adapter', 'both', got 'merged'; did you mean 'model'?"),
        ("dpo.truncation_mode=keep_begin", "expected one of 'keep_start', 'keep_end', got 'keep_begin'"),
        ("export.dtype=auto", "expected one of 'bfloat16', 'float16', 'float32', got 'auto'"),
    ]
    for override, expected in cases:
        field = override.split("=")[0]
        with pytest.raises(AlignpressError) as e:
            load_recipe(ROOT / "recipes/demo.yaml", [override])
        assert str(e.value) == f"--set {field}: field '{field}': {expected}", override


def test_schema_lists_every_field_with_its_type_and_default_as_a_recipe_writes_them(capsys):
    from alignpress.cli import main

    assert main(["schema"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for line in ("model.dtype  (one of 'auto', 'bfloat16', 'float16', 'float32'; default 'auto')",
                 "model.revision  (a string or null; default null)",
                 "model.load_in_4bit  (true or false; default false)",
                 "model.name_or_path  (a string; default required)",
                 "lora.target_modules  (a list of strings or a string; default 'all-linear')",
                 "data.filters.min  (a mapping of names to numbers; default {})",
                 "train.learning_rate  (a number; default 5.0e-06)",
                 "dpo.precompute_ref_log_probs  (one of 'auto' or true or false; default 'auto')",
                 "card.language  (a list of strings; default [])"):
        assert line in lines, line
    # every field of a resolved recipe, and nothing else, with its help on the next line
    def fields(tree, prefix=""):
        return [k for key, v in tree.items() for k in (fields(v, f"{prefix}{key}.") if isinstance(v, dict) and key not in ("min", "max", "columns") else [prefix + key])]
    resolved = dataclasses.asdict(load_recipe(ROOT / "recipes/demo.yaml"))
    del resolved["source"]  # where the recipe was read from: not a field a recipe writes
    shown = [line.split("  (")[0] for line in lines if not line.startswith(" ")]
    assert [f for f in shown if "[]" not in f] == fields(resolved)
    assert len(lines) == 2 * len(shown)  # one line of help each
    assert all(line.startswith("    ") and len(line) > 8 for line in lines[1::2])


def test_missing_accelerate_config_named_before_any_gpu_time():
    with pytest.raises(AlignpressError) as e:
        load_recipe(ROOT / "recipes/demo.yaml", ["train.accelerate_config=zero4"])
    assert str(e.value) == (
        f"--set train.accelerate_config: field 'train.accelerate_config': no accelerate config 'zero4' "
        f"(names in {ROOT / 'recipes/accelerate'}: ddp, zero2, zero3-offload; or give a path to a .yaml file)"
    )
    assert load_recipe(ROOT / "recipes/demo.yaml", ["train.accelerate_config=zero3-offload"]).train.accelerate_config == "zero3-offload"


def test_shipped_accelerate_names_work_for_a_recipe_outside_recipes(tmp_path):
    """The names were looked up in the recipe's own folder only: a copy of demo.yaml anywhere else
    was refused with "names in .../accelerate: none". Its own accelerate/ still comes first."""
    import shutil

    recipe = tmp_path / "demo.yaml"
    shutil.copy(ROOT / "recipes/demo.yaml", recipe)
    assert accelerate_config_path(load_recipe(recipe, ["train.accelerate_config=ddp"])) == ROOT / "recipes/accelerate/ddp.yaml"
    (tmp_path / "accelerate").mkdir()
    shutil.copy(ROOT / "recipes/accelerate/ddp.yaml", tmp_path / "accelerate/ddp.yaml")
    assert accelerate_config_path(load_recipe(recipe, ["train.accelerate_config=ddp"])) == tmp_path / "accelerate/ddp.yaml"
    with pytest.raises(AlignpressError) as e:
        load_recipe(recipe, ["train.accelerate_config=zero4"])
    assert str(e.value) == (
        f"--set train.accelerate_config: field 'train.accelerate_config': no accelerate config 'zero4' (names in {tmp_path / 'accelerate'}: ddp; "
        f"names in {ROOT / 'recipes/accelerate'}: ddp, zero2, zero3-offload; or give a path to a .yaml file)"
    )


def test_missing_required_field(tmp_path):
    path = write(tmp_path, "name: t\nmodel: {name_or_path: x/y}\n")
    with pytest.raises(AlignpressError, match=r"r\.yaml: field 'data': required field is missing"):
        load_recipe(path)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(AlignpressError, match="nope.yaml: recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")
    # a pipe (`validate <(cat r.yaml)`) was "recipe file not found"
    fifo = tmp_path / "piped.yaml"
    os.mkfifo(fifo)
    with pytest.raises(AlignpressError) as e:
        load_recipe(fifo)
    assert str(e.value) == (f"{fifo}: not a regular file (a pipe or a device): give the recipe's own path, since its relative paths "
                            "(data, chat template) are read from its folder")
    # One line, with where: PyYAML's own message spans four lines with a caret drawing.
    with pytest.raises(AlignpressError) as e:
        load_recipe(write(tmp_path, "name: t\nmodel: [unclosed\n"))
    assert str(e.value) == f"{tmp_path / 'r.yaml'}: not valid YAML: line 3, column 1: expected ',' or ']', but got '<stream end>' (while parsing a flow sequence on line 2)"
    with pytest.raises(AlignpressError) as e:
        load_recipe(write(tmp_path, "name: t\n  model: x\n"))
    assert str(e.value) == f"{tmp_path / 'r.yaml'}: not valid YAML: line 2, column 8: mapping values are not allowed here"


def test_a_key_given_twice_is_refused(tmp_path):
    """YAML keeps the last of two equal keys: a second `train:` section silently dropped the first's
    learning rate (the run trained at the default 5e-06)."""
    base = "name: t\nmodel: {name_or_path: x/y}\ndata: {dataset: d.jsonl}\n"
    with pytest.raises(AlignpressError) as e:
        load_recipe(write(tmp_path, base + "train: {learning_rate: 1.0e-3}\ntrain: {num_train_epochs: 3}\n"))
    assert str(e.value) == (f"{tmp_path / 'r.yaml'}: not valid YAML: line 5, column 1: key 'train' is given twice in one mapping "
                            "(first on line 4); YAML would keep only the last, dropping the first silently: merge them")
    with pytest.raises(AlignpressError, match=r"line 6, column 3: key 'beta' is given twice in one mapping \(first on line 5\)"):
        load_recipe(write(tmp_path, base + "dpo:\n  beta: 0.1\n  beta: 0.2\n"))
    # Not duplicates: equal keys in different mappings, and a merged anchor that a key overrides (YAML's meaning).
    recipe = load_recipe(write(tmp_path, base.replace("d.jsonl}", "d.jsonl, seed: 3}") + "train: {seed: 7, max_steps: 2}\n"))
    assert (recipe.data.seed, recipe.train.seed, recipe.train.max_steps) == (3, 7, 2)
    assert yamlfile.load("a: &a {x: 1, y: 2}\nb: {<<: *a, y: 3}\n") == {"a": {"x": 1, "y": 2}, "b": {"x": 1, "y": 3}}
    # Two merge keys in one mapping: PyYAML lets the second win where both anchors set a key, one
    # `<<: [*a, *c]` lets the first win. Refused, naming the list form.
    anchors = "a: &a {x: 1, y: 2}\nc: &c {y: 5, z: 6}\n"
    with pytest.raises(yaml.YAMLError) as e:
        yamlfile.load(anchors + "b:\n  <<: *a\n  <<: *c\n")
    assert yamlfile.describe(e.value) == ("line 5, column 3: key '<<' is given twice in one mapping (first on line 4); YAML would "
                                          "keep only the last, dropping the first silently: write one `<<: [*first, *second]` (earlier anchors win)")
    assert yamlfile.load(anchors + "b: {<<: [*a, *c]}\n")["b"] == {"x": 1, "y": 2, "z": 6}


@pytest.mark.parametrize(
    "value, expected",
    [
        ("missing.jinja", "'missing.jinja' is neither a Jinja template (it has no {{ }} or {% %}) nor a template file ({dir}/missing.jinja not found)"),
        ("{% for m in messages %}{{ m.content }{% endfor %}", "not a valid Jinja template: line 1: unexpected '}'"),
        ("{{ bos_token }}{% if add_generation_prompt %}x{% endif %}", "the template never reads `messages`, so every conversation would render as the same text"),
        ("bad.jinja", "{dir}/bad.jinja: not a valid Jinja template: line 3: unexpected end of template, expected 'end of statement block'."),
        ("{% for m in messages %}{% generation %}{{ m.content }}{% endgeneration %}{% endfor %}", None),  # transformers' assistant-mask tag
        ("good.jinja", None),
    ],
)
def test_chat_template_must_be_jinja_that_reads_messages(tmp_path, value, expected):
    (tmp_path / "bad.jinja").write_text("{% for m in messages %}\n{{ m.content }}\n{% endfor\n")
    (tmp_path / "good.jinja").write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    path = write(tmp_path, "name: t\nmodel: {name_or_path: x/y}\ndata: {dataset: d.jsonl}\n")
    if expected is None:
        assert load_recipe(path, [f"model.chat_template={value}"]).model.chat_template == value
        return
    with pytest.raises(AlignpressError) as e:
        load_recipe(path, [f"model.chat_template={value}"])
    assert str(e.value) == "--set model.chat_template: field 'model.chat_template': " + expected.replace("{dir}", str(tmp_path))


def test_export_merge_false_is_refused_not_ignored(tmp_path):
    path = write(tmp_path, "name: t\nmodel: {name_or_path: x/y}\ndata: {dataset: d.jsonl}\nexport: {merge: false}\n")
    with pytest.raises(AlignpressError) as e:
        load_recipe(path)
    assert str(e.value) == (f"{path}: field 'export.merge': false is not supported: export always saves the merged model in model/; "
                            "to publish the adapter alone, set publish.push: adapter")


def test_lora_settings_with_lora_off_are_named_as_unused(tmp_path):
    """Not refused: a shipped recipe with `--set lora.enabled=false` is a full fine-tune on purpose."""
    from alignpress.recipe import unused_settings

    path = write(tmp_path, BASE + "lora: {enabled: false, r: 64, dropout: 0.05}\n")
    assert unused_settings(load_recipe(path)) == [f"{path}: lora.enabled is false (every weight is trained), so lora.r is not used"]
    demo = ROOT / "recipes/demo.yaml"
    assert unused_settings(load_recipe(demo, ["lora.enabled=false"])) == [
        "--set lora.enabled: lora.enabled is false (every weight is trained), so lora.r, lora.alpha, lora.dropout are not used"]
    assert unused_settings(load_recipe(demo)) == [] and unused_settings(load_recipe(path, ["lora.enabled=true"])) == []
    assert unused_settings(load_recipe(demo, ["dpo.precompute_ref_log_probs=false", "dpo.precompute_ref_batch_size=16", "eval.generation_rows=0",
                                              "eval.behaviour_pattern=x", "train.per_device_eval_batch_size=8"])) == [
        "--set dpo.precompute_ref_batch_size: dpo.precompute_ref_log_probs is false, so dpo.precompute_ref_batch_size is not used",
        "--set eval.behaviour_pattern: eval.generation_rows is 0 (no generations), so eval.behaviour_pattern is not used",
        "--set train.per_device_eval_batch_size: train.per_device_eval_batch_size is not used (training runs no evaluation); "
        "evaluate scores eval.batch_size pairs at a time"]
    proc = cli("validate", demo, "--set", "lora.enabled=false")
    assert proc.returncode == 0 and proc.stderr.splitlines()[0] == (
        "[alignpress] --set lora.enabled: lora.enabled is false (every weight is trained), so lora.r, lora.alpha, lora.dropout are not used")


def test_repo_id_rules():
    assert check_repo_id("alice/my-model.v2") is None
    assert check_repo_id("alice/-bad") is not None
    assert check_repo_id("alice/a..b") is not None
    assert check_repo_id("a/b/c") is not None
    assert check_repo_id("alice/x.git") is not None
    assert check_repo_id("alice/" + "x" * 97) is not None


def test_tag_rules():
    """Names a Hub repo's git refuses fail at the door; the tag is created after the whole push."""
    assert [check_tag(t) for t in ("v1", "v1.0.2", "run-20261127_0516", "1.x")] == [None] * 4
    assert check_tag("v1..0") == "git refuses '..' in a tag name"
    assert check_tag("v1.lock") == check_tag("v1.") == "git refuses a tag name that ends with '.' or '.lock'"
    assert check_tag("a" * 40) == "40 hex digits read as a commit id, not as a tag"
    for bad in ("-v1", ".v1", "v 1", "v1/x", "v1@{0}", "x" * 101, ""):
        assert check_tag(bad) == "use 1-100 letters, digits, '.', '_', '-', starting with a letter or digit", bad


def test_every_field_is_documented():
    rows = describe(Recipe)
    undocumented = [dotted for dotted, _, _, help_ in rows if not help_]
    assert undocumented == []
    assert ("dpo.beta", "a number", "0.1") == rows[[r[0] for r in rows].index("dpo.beta")][:3]
    # name has no dataclass default but is not required: load_recipe fills in the file's name
    assert rows[0][:3] == ("name", "a string", "the recipe file's name without .yaml")
    assert rows[[r[0] for r in rows].index("model.name_or_path")][2] == "required"


def test_validate_command_prints_resolved_recipe():
    proc = cli("validate", "recipes/demo.yaml", "--set", "dpo.beta=0.2")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "# recipes/demo.yaml: valid"
    resolved = yaml.safe_load(proc.stdout)
    assert resolved["dpo"]["beta"] == 0.2 and resolved["name"] == "demo"


def test_validate_command_bad_input_exit_code(tmp_path):
    path = write(tmp_path, BASE + "train: {learning_rate: lots}\n")
    proc = cli("validate", path)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: {path}: field 'train.learning_rate': expected a number, got 'lots'"
