"""Values that used to pass `validate` and crash on the GPU: refused at the door by TRL's and
transformers' own rules and by the model's shape (meta device), before anything is written.

Most cases call alignpress.cli.main in this process (the function entrypoint.py calls), so TRL is
imported once; `test_entrypoint_*` run entrypoint.py itself as a user would.
"""

import dataclasses
import json
import os
import re
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import trl
import yaml

from alignpress.checks import check_model, check_training_settings, check_truncation, trl_loss_types
from alignpress.cli import main
from alignpress.errors import AlignpressError
from alignpress.recipe import load_recipe
from conftest import ROOT, cli

DATA = ROOT / "recipes/data/arithmetic-capybara.jsonl"
PHI3_LINEAR = "down_proj, gate_up_proj, lm_head, o_proj, qkv_proj"


def write_recipe(tmp_path, model_dir, **sections):
    recipe = {
        "name": "t",
        "model": {"name_or_path": str(model_dir)},
        "data": {"dataset": str(DATA), "split": "train[100:160]", "eval_split": "train[:20]",
                 "filters": {"max_messages": 2, "max_tokens": 64}},
        "dpo": {"max_length": 64},
        "train": {"max_steps": 2, "per_device_train_batch_size": 2},
        "eval": {"max_rows": 8, "generation_rows": 2, "max_new_tokens": 8},
    }
    for name, values in sections.items():
        recipe.setdefault(name, {}).update(values)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def call(capsys, *args):
    rc = main([str(a) for a in args])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


# (override, field, message after "field 'FIELD': ") for the nine cases of issue 11 and neighbours.
CASES = [
    ("dpo.loss_type=sigmoidd", "dpo.loss_type", f"'sigmoidd' is not a loss type of TRL {trl.__version__}; did you mean 'sigmoid'?"),
    ("dpo.loss_type=[sigmoid,rpo_bogus]", "dpo.loss_type", f"'rpo_bogus' is not a loss type of TRL {trl.__version__} (known: {', '.join(trl_loss_types())})"),
    ("train.lr_scheduler_type=cosin", "train.lr_scheduler_type", "'cosin' is not a learning-rate scheduler of transformers {tf}; did you mean 'cosine'?"),
    ("train.optim=paged_adamw_32", "train.optim", "'paged_adamw_32' is not an optimizer of transformers {tf}; did you mean 'paged_adamw_32bit'?"),
    ("lora.target_modules=[]", "lora.target_modules", "the list is empty: name at least one module (e.g. [q_proj, v_proj]) or write all-linear"),
    ("lora.target_modules=[q_projj]", "lora.target_modules", f"'q_projj' matches no module of Phi3ForCausalLM; did you mean 'qkv_proj'? (its linear layers: {PHI3_LINEAR})"),
    ("lora.target_modules=[qkv_proj,gate_projj]", "lora.target_modules", f"'gate_projj' matches no module of Phi3ForCausalLM; did you mean 'gate_up_proj'? (its linear layers: {PHI3_LINEAR})"),
    ("model.attn_implementation=flash_attention_3", "model.attn_implementation",
     "'flash_attention_3' cannot be used for Phi3ForCausalLM with the installed libraries: FlashAttention3 has been toggled on, "
     "but it cannot be used due to the following error: the package for FlashAttention3 doesn't seem to be installed"),
    ("dpo.beta=nan", "dpo.beta", "must be a finite number, got nan"),
    ("train.learning_rate=inf", "train.learning_rate", "must be a finite number, got inf"),
    ("dpo.loss_weights=[1.0,.inf]", "dpo.loss_weights", "must be a finite number, got inf"),
    # Rules that only the library knows, reported from DPOConfig itself with the field it names.
    ("train.lr_scheduler_type=reduce_lr_on_plateau", "train.lr_scheduler_type",
     f"TRL {trl.__version__} refuses the training settings: lr_scheduler_type reduce_lr_on_plateau requires an eval strategy"),
    ("dpo.max_length=8192", "dpo.max_length",
     "training sequences of up to 64 tokens exceed Phi3ForCausalLM's 4096 positions (config max_position_embeddings); "
     "set dpo.max_length (or data.filters.max_tokens, which prepare keeps pairs within) to at most 4096"),
    ("train.checkpointed_layers=3", "train.checkpointed_layers",
     "3 layers to recompute, but Phi3ForCausalLM has 2 decoder layers (config num_hidden_layers); at most 2, or null for every layer"),
]


@pytest.mark.parametrize("override, field, message", CASES, ids=[c[0] for c in CASES])
def test_validate_and_run_refuse_at_the_door(tmp_path, tiny_phi3, capsys, override, field, message):
    import transformers

    if override == "dpo.max_length=8192":  # the cap follows: the longest pair is 8192 tokens
        recipe = write_recipe(tmp_path, tiny_phi3, data={"filters": {"max_messages": 2}})
        message = message.replace("up to 64", "up to 8192")
    else:
        recipe = write_recipe(tmp_path, tiny_phi3)
    expected = f"error: --set {override.split('=')[0]}: field '{field}': " + message.replace("{tf}", transformers.__version__)

    rc, out, err = call(capsys, "validate", recipe, "--set", override)
    assert (rc, out, err.strip()) == (2, "", expected)

    output = tmp_path / "out"
    rc, out, err = call(capsys, "run", recipe, "--set", override, "--output-dir", output)
    assert (rc, err.strip().splitlines()[-1]) == (2, expected)
    assert not output.exists()  # no data/, no checkpoints/, no run.json marking anything done


def test_entrypoint_validate_and_run_exit_2(tmp_path, tiny_phi3):
    recipe = write_recipe(tmp_path, tiny_phi3)
    proc = cli("validate", recipe, "--set", "dpo.loss_type=sigmoidd")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip() == f"error: --set dpo.loss_type: field 'dpo.loss_type': 'sigmoidd' is not a loss type of TRL {trl.__version__}; did you mean 'sigmoid'?"
    out = tmp_path / "out"
    proc = cli("run", recipe, "--set", "lora.target_modules=[q_projj]", "--output-dir", out)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: --set lora.target_modules: field 'lora.target_modules': 'q_projj' matches no module")
    assert not out.exists()


def test_a_command_line_mistake_is_one_line():
    """argparse printed its usage block before its `error:` line; --help still prints the usage."""
    gpus = "L4, A10G, L40S, A100-40GB, A100-80GB, H100-80GB, H200"
    cases = [
        (["run", "recipes/demo.yaml", "--bogus"], "error: unrecognized arguments: --bogus; see `entrypoint.py run --help`"),
        (["plan", "recipes/demo.yaml", "--gpu", "L5"], f"error: argument --gpu: unknown GPU 'L5'; known: {gpus}; see `entrypoint.py plan --help`"),
        (["validate"], "error: the following arguments are required: recipe; see `entrypoint.py validate --help`"),
        (["nope"], "error: argument command: invalid choice: 'nope' (choose from 'run', 'validate', 'prepare', 'train', 'evaluate', "
                   "'export', 'publish', 'schema', 'plan'); see `entrypoint.py --help`"),
        # the recipe without its command; a program name, as `docker run IMAGE bash` passes it to the entrypoint
        (["recipes/demo.yaml"], "error: argument command: invalid choice: 'recipes/demo.yaml' (choose from 'run', 'validate', 'prepare', "
                                "'train', 'evaluate', 'export', 'publish', 'schema', 'plan'); to run every stage of a recipe: "
                                "`entrypoint.py run recipes/demo.yaml`; see `entrypoint.py --help`"),
        (["bash"], "error: argument command: invalid choice: 'bash' (choose from 'run', 'validate', 'prepare', 'train', 'evaluate', "
                   "'export', 'publish', 'schema', 'plan'); this is alignpress's command line (in the image it is the entrypoint, so "
                   "`docker run IMAGE bash` arrives here); to run bash in the image instead: docker run -it --entrypoint bash IMAGE ...; "
                   "see `entrypoint.py --help`"),
    ]
    for args, line in cases:
        proc = cli(*args)
        assert (proc.returncode, proc.stdout, proc.stderr) == (2, "", line + "\n"), args
    proc = cli("run", "--help")
    assert (proc.returncode, proc.stderr) == (0, "") and proc.stdout.startswith("usage: alignpress run [-h]")


def test_help_examples_parse():
    """`--help` ends with examples; each one is a command the parser takes (RECIPE and COMMAND filled in),
    so they stay right as the options change."""
    import shlex

    from alignpress.cli import _parser

    proc = cli("--help")
    assert (proc.returncode, proc.stderr) == (0, "")
    examples = proc.stdout.split("\nexamples:\n", 1)[1].split("\n\n")[0].splitlines()
    commands = [shlex.split(line.split("#")[0])[2:] for line in examples]
    assert [c[0] for c in commands] == ["run", "validate", "prepare", "plan", "run", "COMMAND"]
    for words in commands:
        if words == ["COMMAND", "--help"]:
            continue
        parsed = _parser().parse_args([w.replace("RECIPE", "recipes/demo.yaml") for w in words])
        assert parsed.command == words[0] and parsed.recipe.endswith("demo.yaml"), words


def test_a_section_given_twice_stops_validate_in_one_line(tmp_path, tiny_phi3, capsys):
    """The second `train:` would have replaced the first, learning rate and all, without a word."""
    recipe = write_recipe(tmp_path, tiny_phi3)
    text = recipe.read_text() + "train: {num_train_epochs: 3}\n"
    recipe.write_text(text)
    first = text.splitlines().index("train:") + 1
    rc, out, err = call(capsys, "validate", recipe)
    assert (rc, out, err) == (2, "", f"error: {recipe}: not valid YAML: line {len(text.splitlines())}, column 1: key 'train' is given twice "
                                     f"in one mapping (first on line {first}); YAML would keep only the last, dropping the first silently: merge them\n")


def test_validate_finds_local_data_problems(tmp_path, tiny_phi3, capsys):
    """A local data source is checked by validate as prepare reads it, short of the tokenizer (it
    exists, is a type prepare reads, split `train`, its slice, columns and rating filters); a Hub
    dataset is left to prepare. Each mistake used to pass validate, and was found on the rented VM."""
    recipe = write_recipe(tmp_path, tiny_phi3)
    rc, out, err = call(capsys, "validate", recipe)
    assert (rc, err) == (0, "")
    size = f"{DATA.stat().st_size / 1e6:.1f} MB"
    assert out.splitlines()[2] == f"# data: {DATA} ({size}): 60 rows in train[100:160], 20 rows in train[:20]; format capybara (detected)"
    rc, out, err = call(capsys, "validate", recipe, "--set", "data.filters.min.rating_chosen=4.5")
    assert (rc, err, out.splitlines()[2]) == (0, "", f"# data: {DATA} ({size}): 60 rows in train[100:160] (59 after the rating filters), "
                                                     "20 rows in train[:20] (19 after the rating filters); format capybara (detected)")
    columns = ("chosen, chosen_model, conversation, generation_prompt, new_generations, original_response, prompt, rating_chosen, "
               "rating_rejected, raw_generation_responses, rejected, rejected_model, source")
    bad_value = tmp_path / "bad-value.jsonl"
    lines = DATA.read_text().splitlines()
    bad_value.write_text("\n".join(lines[:7] + [lines[7].replace('"rating_chosen": ', '"rating_chosen": "high", "x": ', 1)] + lines[8:]) + "\n")
    read_cases = [
        ("data.split=train[5000:]", f"field 'data.split': split 'train[5000:]' of {DATA} has no rows (the whole split has 640)"),
        ("data.eval_split=train[700:]", f"field 'data.eval_split': split 'train[700:]' of {DATA} has no rows (the whole split has 640): the "
                                        "evaluate stage would score nothing after training; fix the slice, or set eval.enabled: false"),
        ("data.columns.prompt=question", f"field 'data.columns.prompt': column 'question' is not in {DATA} (its columns: {columns})"),
        ("data.format=system_question", f"field 'data.format': format 'system_question' needs columns question, chosen, rejected; "
                                        f"missing question in {DATA} (the data has: {columns})"),
        ("data.filters.min.ratin=4", f"field 'data.filters.min.ratin': column 'ratin' is not in {DATA} (its columns: {columns})"),
        ("data.filters.min.rating_chosen=6", f"field 'data.filters.min.rating_chosen': keeps none of the 60 rows of split 'train[100:160]' of {DATA} "
                                             "(rating_chosen: its values there run from 3 to 5)"),
        ("data.filters.max={rating_chosen: 4.5, rating_rejected: 0.5}",
         f"field 'data.filters.max.rating_rejected': keeps none of the 28 rows of split 'train[100:160]' of {DATA} left by the filters "
         "before it (rating_rejected: its values there run from 1 to 2.5)"),
    ]
    for override, message in read_cases:
        rc, out, err = call(capsys, "validate", recipe, "--set", override)
        assert (rc, out) == (2, ""), override
        assert err.startswith(f"error: --set {override.split('=')[0]}: {message}") and err.count("\n") == 1, (override, err)
    rc, out, err = call(capsys, "validate", recipe, "--set", "data.format=hh")  # columns there, but conversations, not transcripts
    assert (rc, out, err) == (2, "", f"error: {DATA}: 60 of 60 rows of split 'train[100:160]' cannot be used, more than data.max_malformed_fraction "
                                     "(0.05) allows: HH chosen/rejected must be transcript strings (60 rows: 100, 101, 102, …)\n")
    rc, out, err = call(capsys, "validate", recipe, "--set", "data.eval_split=train[700:]", "--set", "eval.enabled=false")
    assert (rc, err) == (0, "") and "0 rows in train[700:]" in out
    rc, out, err = call(capsys, "validate", recipe, "--set", f"data.dataset={bad_value}", "--set", "data.filters.min.rating_chosen=4")
    assert (rc, out, err) == (2, "", f"error: {bad_value}: row 7, column 'rating_chosen': text ('high') is not a number, and the filter "
                                     "data.filters.min.rating_chosen compares numbers\n")
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "two").mkdir()
    for name in ("a.jsonl", "b.jsonl"):
        shutil.copy(DATA, tmp_path / "two" / name)
    cases = [
        ("data.dataset=missing.jsonl", f"field 'data.dataset': data file 'missing.jsonl' not found (resolved to {tmp_path / 'missing.jsonl'})"),
        ("data.dataset=empty", f"field 'data.dataset': folder {tmp_path / 'empty'} has no .jsonl/.json/.parquet/.csv files"),
        ("data.dataset=notes.txt", "field 'data.dataset': unsupported data file type '.txt'; use .jsonl, .json, .parquet or .csv"),
        ("data.split=tran[100:]", "field 'data.split': a local file has one split, 'train'; got 'tran[100:]'"),
        ("data.eval_split=test", "field 'data.eval_split': a local file has one split, 'train'; got 'test'"),
        ("data.config_name=default", "field 'data.config_name': a local file has no configurations; 'default' would be ignored: leave it unset"),
    ]
    for override, message in cases:
        rc, out, err = call(capsys, "validate", recipe, "--set", override)
        assert (rc, out, err) == (2, "", f"error: --set {override.split('=')[0]}: {message}\n"), override
    rc, out, err = call(capsys, "validate", recipe, "--set", "data.dataset=null", "--set", f"data.datasets=[{{dataset: {DATA}}}, {{dataset: nope.jsonl}}]")
    assert (rc, err) == (2, f"error: --set data.datasets: field 'data.datasets[1].dataset': data file 'nope.jsonl' not found (resolved to {tmp_path / 'nope.jsonl'})\n")
    rc, out, err = call(capsys, "validate", recipe, "--set", "data.dataset=two")
    assert (rc, err, out.splitlines()[2]) == (0, "", f"# data: {tmp_path / 'two'} (2 files, {2 * DATA.stat().st_size / 1e6:.1f} MB): "
                                                     "60 rows in train[100:160], 20 rows in train[:20]; format capybara (detected)")
    rc, out, err = call(capsys, "validate", recipe, "--set", "data.dataset=argilla/distilabel-capybara-dpo-7k-binarized", "--set", "data.split=train[300:]")
    assert (rc, err, out.splitlines()[2]) == (0, "", "# data: argilla/distilabel-capybara-dpo-7k-binarized (Hub dataset: read by prepare; `validate --hub` checks its card)")


def test_validate_prepares_local_data_in_a_scratch_folder(tmp_path, tiny_phi3, capsys):
    """With local data and the tokenizer on this machine, validate runs prepare in a scratch folder:
    what only rendering or the later filters find (answers all identical here) used to pass validate
    and stop prepare on the rented VM. Nothing is written beside the recipe."""
    recipe = write_recipe(tmp_path, tiny_phi3)
    rc, out, err = call(capsys, "validate", recipe)
    assert (rc, err) == (0, "")
    assert out.splitlines()[3].startswith("# prepare (run in a scratch folder): ") and out.splitlines()[3].endswith(" eval pairs; format capybara")
    same = tmp_path / "same.jsonl"
    rows = [json.loads(x) for x in DATA.read_text().splitlines()]
    same.write_text("".join(json.dumps({**r, "rejected": r["chosen"]}) + "\n" for r in rows))
    before = sorted(p.name for p in tmp_path.iterdir())
    rc, out, err = call(capsys, "validate", recipe, "--set", f"data.dataset={same}")
    assert (rc, out) == (2, "")
    assert err.splitlines()[-1].startswith(f"error: {recipe}: field 'data.filters': no training rows left after filtering (60 loaded; ")
    assert "chosen identical to rejected: -" in err.splitlines()[-1]
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_validate_refuses_an_evaluation_the_rating_filters_empty(tmp_path, tiny_phi3, capsys):
    """validate used to pass (and print "0 after the rating filters") an eval split the filters empty,
    which prepare then refused: the same refusal now comes at the door, unless eval is off or another
    source holds out rows."""
    low = tmp_path / "low.jsonl"
    lines = DATA.read_text().splitlines()
    low.write_text("\n".join([re.sub(r'"rating_chosen": [0-9.]+', '"rating_chosen": 1.0', x) for x in lines[:20]] + lines[20:]) + "\n")
    recipe = write_recipe(tmp_path, tiny_phi3, data={"dataset": str(low), "filters": {"min": {"rating_chosen": 4.5}}})
    rc, out, err = call(capsys, "validate", recipe)
    assert (rc, out, err) == (2, "", f"error: {recipe}: field 'data.eval_split': no evaluation rows left (20 loaded; rating_chosen >= 4.5: -20): "
                                     "the evaluate stage would score nothing after training; hold out more rows, or set eval.enabled: false\n")
    rc, out, err = call(capsys, "validate", recipe, "--set", "eval.enabled=false")
    assert (rc, err) == (0, "") and "20 rows in train[:20] (0 after the rating filters)" in out
    # A second source without an eval split holds out some of its training rows: prepare evaluates those.
    rc, out, err = call(capsys, "validate", recipe, "--set", "data.dataset=null", "--set", "data.eval_split=null", "--set",
                        f"data.datasets=[{{dataset: {low}, eval_split: 'train[:20]'}}, {{dataset: {DATA}}}]")
    assert (rc, err) == (0, "") and "20 rows in train[:20] (0 after the rating filters)" in out


def test_an_unknown_builtin_model_is_refused_at_the_door_with_the_file(tmp_path):
    """validate deferred the model checks of `builtin:nope` (not built yet) and passed; run then
    refused it without naming the recipe file."""
    recipe = write_recipe(tmp_path, "builtin:nope")
    expected = f"error: {recipe}: field 'model.name_or_path': unknown builtin model 'nope'; known: tiny-phi3-arithmetic\n"
    proc = cli("validate", recipe)
    assert (proc.returncode, proc.stdout, proc.stderr) == (2, "", expected)
    out = tmp_path / "out"
    proc = cli("run", recipe, "--output-dir", out)
    assert (proc.returncode, proc.stdout, proc.stderr) == (2, "", expected)
    assert not out.exists()


def test_the_judge_is_checked_before_training(tmp_path, tiny_phi3, capsys):
    """eval.judge is loaded by evaluate, after training: its config is checked at the door instead
    (validate, and run before anything is written). Config-only folders: no weights are read."""
    from transformers import LlamaConfig

    def judge(name, **kw):
        folder = tmp_path / name
        LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1, **kw).save_pretrained(folder)
        return folder

    good = judge("reward", num_labels=1, architectures=["LlamaForSequenceClassification"])
    two = judge("classifier", num_labels=2, architectures=["LlamaForSequenceClassification"])
    recipe = write_recipe(tmp_path, tiny_phi3)
    rc, out, err = call(capsys, "validate", recipe, "--set", f"eval.judge={good}")
    assert (rc, err, out.splitlines()[3]) == (0, "", f"# judge LlamaForSequenceClassification with one output (config from {good})")
    cases = [
        (str(tiny_phi3), f"the judge '{tiny_phi3}' is a Phi3ForCausalLM, a generative model; a judge is a reward model (sequence classification with one output)"),
        (str(two), f"the judge '{two}' has 2 outputs; a reward model has one (num_labels=1)"),
        (f"{tmp_path}/missing", f"judge folder '{tmp_path}/missing' does not exist"),
    ]
    for value, message in cases:
        rc, out, err = call(capsys, "validate", recipe, "--set", f"eval.judge={value}")
        assert (rc, out, err) == (2, "", f"error: --set eval.judge: field 'eval.judge': {message}\n"), value
    output = tmp_path / "out"
    rc, out, err = call(capsys, "run", recipe, "--set", f"eval.judge={two}", "--output-dir", output)
    assert (rc, err.strip().splitlines()[-1]) == (2, f"error: --set eval.judge: field 'eval.judge': {cases[1][1]}")
    assert not output.exists()
    # A Hub judge not on this machine: validate (offline) defers it, run fetches its config first.
    rc, out, err = call(capsys, "validate", recipe, "--set", "eval.judge=someone/not-cached-reward-model")
    assert (rc, err, out.splitlines()[3]) == (0, "", "# judge check deferred: the config of 'someone/not-cached-reward-model' is not on this machine "
                                                     "(run and train check it before anything else; `validate --hub` fetches it now)")
    # No judge, no judge line: the scratch prepare's line follows the model and data lines, then the resolved recipe.
    rc, out, err = call(capsys, "validate", recipe)
    assert (rc, err, out.splitlines()[4]) == (0, "", "name: t") and out.splitlines()[3].startswith("# prepare (run in a scratch folder): ")


def test_unexpected_failure_before_the_output_folder_is_one_line(monkeypatch, capsys, alignpress_home):
    """plan has no output folder to log into: the traceback goes to ALIGNPRESS_HOME/logs/, as a
    stage's goes to its folder's logs/ (it used to be printed to the terminal)."""
    from alignpress import plan

    def broken(args):
        raise RuntimeError("a bug\nwith a second line")

    monkeypatch.setattr(plan, "main", broken)
    before = set((alignpress_home / "logs").glob("plan-*.log"))
    rc, out, err = call(capsys, "plan", "recipes/demo.yaml")
    (log,) = set((alignpress_home / "logs").glob("plan-*.log")) - before
    assert (rc, out, err) == (1, "", f"error: RuntimeError: a bug (see {log})\n")
    text = log.read_text()
    assert text.startswith("alignpress plan recipes/demo.yaml: RuntimeError: a bug\n\nTraceback (most recent call last):") and "in broken" in text


def test_cuda_asked_but_unusable_stops_at_the_door(tmp_path):
    """sky/run.sh asks for train.device=cuda on a GPU VM: a torch that cannot use CUDA (here the CPU
    wheel; on a VM, a driver older than the wheel's CUDA) stops the job before anything is written."""
    import torch

    out = tmp_path / "out"
    proc = cli("run", "recipes/demo.yaml", "--set", "train.device=cuda", "--output-dir", out)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: --set train.device: field 'train.device': train.device is cuda but no CUDA GPU can be used: ")
    if torch.version.cuda is None:
        assert last.endswith(f": this torch ({torch.__version__}) is built without CUDA")
    assert not out.exists()


def test_auto_device_without_a_usable_gpu_in_a_gpu_container_stops_at_the_door(tmp_path):
    """`docker run --gpus all` with a driver older than the wheel's CUDA (or the CUDA image without
    --gpus, whose base sets NVIDIA_VISIBLE_DEVICES): train.device auto used to fall back to the CPU
    and train there, for days. The container's NVIDIA_VISIBLE_DEVICES says a GPU was meant."""
    import torch

    from alignpress.modeling import cuda_problem

    out = tmp_path / "out"
    proc = cli("run", "recipes/demo.yaml", "--output-dir", out, env={"NVIDIA_VISIBLE_DEVICES": "all"})
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: recipes/demo.yaml: field 'train.device': train.device is auto and torch cannot use a CUDA GPU ({cuda_problem()}), "
        "but NVIDIA_VISIBLE_DEVICES is 'all' (a GPU container): the run would go on on the CPU. Make the GPU usable "
        "(docker run --gpus all; a driver for this torch's CUDA), or set train.device=cpu to run on the CPU on purpose")
    if torch.version.cuda is None:
        assert cuda_problem() == f"this torch ({torch.__version__}) is built without CUDA"
    assert not out.exists()


def test_auto_device_falls_back_to_the_cpu_only_for_a_model_the_cpu_can_train(tmp_path, tiny_phi3, monkeypatch):
    """A model of 1B parameters or more with no usable GPU is refused under train.device auto (a GPU
    setup gone wrong), and allowed with train.device: cpu; the tiny models pass. Only the config is
    read: the weights stay tiny, the check never loads them."""
    from alignpress import modeling

    monkeypatch.delenv("NVIDIA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(modeling.os.path, "exists", lambda path: False if path == "/dev/nvidia0" else Path(path).exists())
    big = tmp_path / "phi3-mini-shape"
    shutil.copytree(tiny_phi3, big)
    config = json.loads((big / "config.json").read_text())
    # Phi-3-mini's shape (shared/reference/models-and-data.md) with the tiny tokenizer's vocabulary
    config.update(hidden_size=3072, intermediate_size=8192, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32)
    (big / "config.json").write_text(json.dumps(config))
    recipe = load_recipe(write_recipe(tmp_path, big))
    with pytest.raises(AlignpressError) as refused:
        modeling.preflight(recipe, training=True)
    assert refused.value.field == "train.device"
    assert f"but {big} has 3.6B parameters (days of training on a CPU): the run would go on on the CPU" in str(refused.value)
    # an evaluation or export of it on the CPU is slow, not days: allowed
    assert modeling.gpu_expected(recipe, training=False) is None
    modeling.preflight(dataclasses.replace(recipe, train=dataclasses.replace(recipe.train, device="cpu")), training=True)
    assert modeling.gpu_expected(load_recipe(write_recipe(tmp_path, tiny_phi3)), training=True) is None


def test_several_gpu_processes_need_shared_memory_for_nccl(tmp_path, tiny_phi3, monkeypatch):
    """`docker run --gpus all ... --set train.accelerate_config=ddp`: NCCL keeps its buffers in
    /dev/shm, which Docker makes 64 MB, and failed as the processes started, after the relaunch,
    with a line about /dev/shm/nccl-*. A real 64 MB tmpfs stands for the container's /dev/shm;
    torch's CUDA answers are stood in for (no GPU here)."""
    import subprocess

    import torch

    from alignpress import modeling

    if os.geteuid() != 0:
        pytest.skip("mounts a 64 MB tmpfs, which needs root")
    shm = tmp_path / "shm"
    shm.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(shm)], capture_output=True).returncode != 0:
        pytest.skip("this machine does not let root mount a tmpfs")
    try:
        recipe = write_recipe(tmp_path, tiny_phi3)
        ddp = load_recipe(recipe, ["train.accelerate_config=ddp"])
        with pytest.raises(AlignpressError) as refused:
            modeling.check_shared_memory(ddp, 4, shm=shm)
        assert str(refused.value) == (
            f"{recipe}: field 'train.accelerate_config': the 4 GPU processes would talk through NCCL, which keeps its buffers in {shm}, "
            f"and {shm} holds 64.0 MB (Docker gives a container 64 MB unless told): NCCL would fail as they start. Give the container "
            "more, as NCCL's guide asks: docker run --shm-size=1g (or --ipc=host)")
        assert refused.value.exit_code == 2
        modeling.check_shared_memory(ddp, 1, shm=shm)  # one process: no NCCL
        monkeypatch.setenv("NCCL_SHM_DISABLE", "1")
        modeling.check_shared_memory(ddp, 4, shm=shm)  # NCCL told not to use it
        monkeypatch.delenv("NCCL_SHM_DISABLE")
        modeling.check_shared_memory(ddp, 4, shm=tmp_path / "absent")  # no /dev/shm: not Linux
        # check_gpus asks it for the relaunch's processes, one per visible GPU (this machine's /dev/shm when not told)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
        monkeypatch.delenv("LOCAL_RANK", raising=False)
        monkeypatch.delenv("WORLD_SIZE", raising=False)
        monkeypatch.setattr(modeling, "SHM", shm)
        with pytest.raises(AlignpressError, match=r"the 4 GPU processes would talk through NCCL"):
            modeling.check_gpus(ddp)
        with pytest.raises(AlignpressError, match=r"the 2 GPU processes would talk through NCCL"):
            modeling.check_gpus(load_recipe(recipe, ["train.accelerate_config=ddp", "train.num_processes=2"]))
        modeling.check_gpus(load_recipe(recipe, ["train.accelerate_config=ddp", "train.num_processes=1"]))
    finally:
        subprocess.run(["umount", str(shm)], check=True)


def test_one_process_that_sees_several_gpus_is_refused_before_training(tmp_path, tiny_phi3, monkeypatch, capsys, demo_run):
    """One process that sees several GPUs (`docker run --gpus all` on a 4-GPU host, a VM rented with
    --gpus L40S:4): transformers would train with DataParallel on 4x the recipe's micro-batch while
    the run's records said one process and its batch. Refused at the door, nothing written. This
    machine has no GPU: torch's CUDA answers are stood in for, and preflight's own GPU checks (bf16,
    4-bit, Liger; tested above) are skipped."""
    import torch

    from alignpress import modeling

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(modeling, "preflight", lambda *a, **k: None)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    recipe = write_recipe(tmp_path, tiny_phi3)
    out = tmp_path / "out"
    rc, _, err = call(capsys, "run", recipe, "--output-dir", out)
    assert rc == 2
    assert err.strip().splitlines()[-1] == (
        f"error: {recipe}: field 'train.accelerate_config': 4 CUDA GPUs are visible to this one process: transformers would train with "
        "DataParallel on 4x train.per_device_train_batch_size pairs per micro-batch, not the recipe's batch. Use them all, one process "
        "each: --set train.accelerate_config=ddp (each optimizer step then takes 4x the pairs); or one: CUDA_VISIBLE_DEVICES=0 "
        "(docker run --gpus device=0)")
    assert not out.exists()
    # A launched process (one per GPU), a recipe that relaunches itself, one GPU: nothing to refuse
    loaded = load_recipe(recipe)
    monkeypatch.setenv("LOCAL_RANK", "0")
    modeling.check_gpus(loaded)
    monkeypatch.delenv("LOCAL_RANK")
    modeling.check_gpus(load_recipe(recipe, ["train.accelerate_config=ddp"]))
    # More processes than GPUs: those past the last one would fail on their device after loading
    with pytest.raises(AlignpressError) as refused:
        modeling.check_gpus(load_recipe(recipe, ["train.accelerate_config=ddp", "train.num_processes=8"]))
    assert str(refused.value) == (f"{recipe}: field 'train.num_processes': is 8, but this machine has 4 CUDA GPUs: one process per GPU, "
                                  "so at most 4 (or leave it unset: one per visible GPU)")
    modeling.check_gpus(load_recipe(recipe, ["train.accelerate_config=ddp", "train.num_processes=4"]))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    modeling.check_gpus(loaded)
    # The processes a resumed training will have (a checkpoint of another count is refused: test_distributed)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert modeling.planned_processes(loaded) == 1
    assert modeling.planned_processes(load_recipe(recipe, ["train.accelerate_config=ddp"])) == 4  # one per visible GPU
    assert modeling.planned_processes(load_recipe(recipe, ["train.accelerate_config=ddp", "train.num_processes=3"])) == 3
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert modeling.planned_processes(loaded) == 2
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    # A finished training trains nothing: `train` on the demo's folder says so, not the refusal
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    done = tmp_path / "done"
    shutil.copytree(demo_run[0], done)
    rc, _, err = call(capsys, "train", ROOT / "recipes/demo.yaml", "--output-dir", done)
    assert rc == 0, err[-3000:]
    assert "train is done (step " in err and "CUDA GPUs are visible" not in err


def test_a_mistake_in_the_file_names_the_file(tmp_path, tiny_gemma, capsys):
    recipe = write_recipe(tmp_path, tiny_gemma, lora={"target_modules": ["q_proj", "v_projj"]})
    rc, out, err = call(capsys, "validate", recipe)
    assert rc == 2
    assert err.strip() == (f"error: {recipe}: field 'lora.target_modules': 'v_projj' matches no module of GemmaForCausalLM; did you mean 'v_proj'? "
                           "(its linear layers: down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj)")


def test_validate_reports_the_model_checks(tmp_path, tiny_phi3, tiny_gemma, capsys):
    rc, out, err = call(capsys, "validate", write_recipe(tmp_path, tiny_phi3), "--set", "model.attn_implementation=eager")
    assert rc == 0, err
    assert out.splitlines()[1] == (f"# model checks passed on Phi3ForCausalLM (config from {tiny_phi3}, meta device); "
                                   "LoRA on down_proj, gate_up_proj, o_proj, qkv_proj; attention eager; sequences up to 64 tokens")
    rc, out, err = call(capsys, "validate", write_recipe(tmp_path, tiny_gemma, lora={"target_modules": ["q_proj", "v_proj"]}))
    assert rc == 0, err
    assert out.splitlines()[1] == (f"# model checks passed on GemmaForCausalLM (config from {tiny_gemma}, meta device); "
                                   "LoRA on q_proj, v_proj; attention sdpa; sequences up to 64 tokens")


def test_hub_model_not_on_this_machine_is_deferred_but_attention_still_checked(tmp_path, capsys):
    recipe = write_recipe(tmp_path, "someone/not-cached-model")
    rc, out, err = call(capsys, "validate", recipe)
    assert rc == 0, err
    assert out.splitlines()[1] == ("# model checks deferred: the config of 'someone/not-cached-model' is not on this machine "
                                   "(run, prepare and train check LoRA targets, attention and lengths before anything else; `validate --hub` fetches it now)")
    # Without the config, the attention name and its package are checked on a probe architecture.
    rc, out, err = call(capsys, "validate", recipe, "--set", "model.attn_implementation=flash_attention_3")
    assert rc == 2
    assert err.strip() == ("error: --set model.attn_implementation: field 'model.attn_implementation': 'flash_attention_3' cannot be used with the "
                           "installed libraries: FlashAttention3 has been toggled on, but it cannot be used due to the following error: "
                           "the package for FlashAttention3 doesn't seem to be installed")
    # run needs the config before anything else; offline it names the model field and writes nothing.
    out_dir = tmp_path / "out"
    rc, out, err = call(capsys, "run", recipe, "--output-dir", out_dir)
    assert rc == 2 and "field 'model.name_or_path': could not load 'someone/not-cached-model'" in err
    assert not out_dir.exists()


def test_sliding_window_against_the_longest_sequence(tmp_path, tiny_phi3, capsys):
    model = tmp_path / "windowed"
    shutil.copytree(tiny_phi3, model)
    config = json.loads((model / "config.json").read_text())
    config["sliding_window"] = 48
    (model / "config.json").write_text(json.dumps(config))
    recipe = write_recipe(tmp_path, model, dpo={"max_length": 128})  # the 64-token cap sets the longest sequence
    rc, out, err = call(capsys, "validate", recipe)
    assert rc == 2
    assert err.strip() == (f"error: {recipe}: field 'data.filters.max_tokens': training sequences of up to 64 tokens are longer than "
                           "Phi3ForCausalLM's sliding attention window of 48 tokens (config sliding_window): the end of a long answer "
                           "would not attend to the start of its prompt; set dpo.max_length (or data.filters.max_tokens, which prepare "
                           "keeps pairs within) to at most 48")
    rc, out, err = call(capsys, "validate", recipe, "--set", "data.filters.max_tokens=48")
    assert rc == 0, err


def test_seed_recipes_on_the_real_architectures(tmp_path):
    """Configs with the sizes in shared/reference/models-and-data.md (no weights: meta device)."""
    from transformers import GemmaConfig, Phi3Config

    Phi3Config(vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
               max_position_embeddings=4096, sliding_window=2047, architectures=["Phi3ForCausalLM"]).save_pretrained(tmp_path / "phi3")
    GemmaConfig(vocab_size=256000, hidden_size=2048, intermediate_size=16384, num_hidden_layers=18, num_attention_heads=8, num_key_value_heads=1,
                head_dim=256, max_position_embeddings=8192, architectures=["GemmaForCausalLM"]).save_pretrained(tmp_path / "gemma")
    phi3 = load_recipe(ROOT / "recipes/phi3-mini-capybara.yaml", [f"model.name_or_path={tmp_path / 'phi3'}"])
    gemma = load_recipe(ROOT / "recipes/gemma-2b-it-capybara.yaml", [f"model.name_or_path={tmp_path / 'gemma'}"])
    assert check_model(phi3, local_only=True).endswith("LoRA on down_proj, gate_up_proj, o_proj, qkv_proj; attention sdpa; sequences up to 1024 tokens")
    assert check_model(gemma, local_only=True).endswith("LoRA on down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj; attention sdpa; sequences up to 2048 tokens")
    # Without its 1,024-token cap, Phi-3's seed would train 2,048-token pairs on a 2,047-token window.
    uncapped = load_recipe(ROOT / "recipes/phi3-mini-capybara.yaml", [f"model.name_or_path={tmp_path / 'phi3'}", "data.filters.max_tokens=null"])
    with pytest.raises(Exception, match=r"field 'dpo.max_length': training sequences of up to 2048 tokens are longer than Phi3ForCausalLM's sliding attention window of 2047"):
        check_model(uncapped, local_only=True)


def test_loss_types_are_trls_own():
    """Read from DPOTrainer's dispatch; the same names DPOConfig's help lists for TRL 1.16."""
    from trl import DPOConfig

    help_ = next(f for f in dataclasses.fields(DPOConfig) if f.name == "loss_type").metadata["help"]
    documented = re.findall(r"`'([a-z_]+)'`", help_.split("If multiple")[0])
    assert sorted(trl_loss_types()) == sorted(documented)
    assert {"sigmoid", "ipo", "sft", "robust"} <= set(trl_loss_types())


@pytest.mark.parametrize("path", ["recipes/demo.yaml", "recipes/phi3-mini-capybara.yaml", "recipes/gemma-2b-it-capybara.yaml"])
def test_shipped_recipes_pass_the_library_checks(path):
    check_training_settings(load_recipe(ROOT / path))


def rows(*lengths):
    return [{"prompt_tokens": p, "chosen_tokens": c, "rejected_tokens": r} for p, c, r in lengths]


def test_truncation_count_and_limit(tmp_path):
    recipe = load_recipe(ROOT / "recipes/demo.yaml", ["dpo.max_length=10", "data.filters.max_tokens=null"])
    assert check_truncation(recipe, rows((5, 5, 4), (4, 3, 3))) == 0
    with pytest.raises(Exception) as e:
        check_truncation(recipe, rows((5, 5, 4), (4, 3, 3), (8, 1, 3)))
    assert str(e.value) == ("--set dpo.max_length: field 'dpo.max_length': 1 of 3 prepared training pairs (33.3%) are longer than 10 tokens and "
                            "TRL would cut their answers (dpo.max_truncated_fraction allows 0.0%); run the prepare stage again (it keeps pairs "
                            "within dpo.max_length), raise dpo.max_length, or raise dpo.max_truncated_fraction")
    allowed = load_recipe(ROOT / "recipes/demo.yaml", ["dpo.max_length=10", "data.filters.max_tokens=null", "dpo.max_truncated_fraction=0.5"])
    assert check_truncation(allowed, rows((5, 5, 4), (4, 3, 3), (8, 1, 3))) == 1


def test_prepare_keeps_pairs_within_max_length_and_train_refuses_a_shorter_one(tmp_path, tiny_phi3, capsys):
    # No data.filters.max_tokens: prepare's cap is dpo.max_length (40 tokens).
    recipe = write_recipe(tmp_path, tiny_phi3, data={"filters": {"max_messages": 2}}, dpo={"max_length": 40})
    out = tmp_path / "out"
    rc, _, err = call(capsys, "prepare", recipe, "--output-dir", out)
    assert rc == 0, err
    stats = json.loads((out / "data/stats.json").read_text())
    filters = {f["filter"]: f["removed"] for f in stats["splits"]["train"]["filters"]}
    assert "longer than 40 tokens" in filters
    train = [json.loads(line) for line in (out / "data/train.jsonl").read_text().splitlines()]
    longest = max(r["prompt_tokens"] + max(r["chosen_tokens"], r["rejected_tokens"]) for r in train)
    assert longest <= 40
    # dpo settings may change before training starts; a shorter max_length would cut prepared pairs.
    over = sum(1 for r in train if r["prompt_tokens"] + max(r["chosen_tokens"], r["rejected_tokens"]) > longest - 1)
    rc, _, err = call(capsys, "train", recipe, "--set", f"dpo.max_length={longest - 1}", "--output-dir", out)
    assert rc == 2
    assert err.strip().splitlines()[-1] == (
        f"error: --set dpo.max_length: field 'dpo.max_length': {over} of {len(train)} prepared training pairs ({over / len(train):.1%}) "
        f"are longer than {longest - 1} tokens and TRL would cut their answers (dpo.max_truncated_fraction allows 0.0%); run the prepare "
        "stage again (it keeps pairs within dpo.max_length), raise dpo.max_length, or raise dpo.max_truncated_fraction")
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["stages"]["prepare"]["status"] == "done" and manifest["stages"]["train"]["status"] != "done"
    assert not (out / "checkpoints").exists()


def test_seed_recipes_have_a_gate_and_the_card_says_whether_one_was_set():
    from alignpress import gate
    from alignpress.card import evaluation_lines

    for path in ("recipes/phi3-mini-capybara.yaml", "recipes/gemma-2b-it-capybara.yaml"):
        r = load_recipe(ROOT / path)
        assert (r.eval.gate_min_gain, r.eval.gate_max_kl) == (0.02, 50.0)
    seed = load_recipe(ROOT / "recipes/phi3-mini-capybara.yaml")
    unchanged = {"n_pairs": 300, "n_generations": 32, "behaviour_measure": "closer to chosen",
                 "base": {"preference_accuracy": 0.61}, "aligned": {"preference_accuracy": 0.61, "kl_estimate": 0.0}}
    verdict = gate.verdict(seed, unchanged)
    assert verdict["passed"] is False and verdict["reasons"][0]["field"] == "eval.gate_min_gain"  # a run that changed nothing
    lines = evaluation_lines({**unchanged, "gate": verdict})
    assert "Publish gate failed: the aligned model does not beat the base on held-out preference accuracy by 0.02: 0.6100 -> 0.6100 (gain +0.0000)." in lines
    lines = evaluation_lines({**unchanged, "gate": None})
    assert ("No publish gate was set (eval.gate_min_gain, eval.gate_max_kl): nothing checked that this model improved on the base "
            "before it was published.") in lines


def test_a_reader_that_stops_early_is_not_an_error():
    """`entrypoint.py schema | head -1` used to end in a BrokenPipeError traceback (exit 1)."""
    import subprocess
    import sys

    proc = subprocess.run(f"{sys.executable} entrypoint.py schema | head -1", shell=True, capture_output=True, text=True,
                          cwd=ROOT, executable="/bin/bash")
    assert proc.stdout == "name  (a string; default the recipe file's name without .yaml)\n"
    assert proc.stderr == ""
    status = subprocess.run(f"{sys.executable} entrypoint.py schema | head -1 >/dev/null; echo ${{PIPESTATUS[0]}}", shell=True,
                            capture_output=True, text=True, cwd=ROOT, executable="/bin/bash")
    assert status.stdout.strip() == "0"


def test_a_stage_error_names_the_set_flag_that_gave_the_field(tmp_path, capsys):
    """The stages raise naming the recipe file; a field given with --set is fixed on the command line."""
    out = tmp_path / "out"
    rc, _, err = call(capsys, "run", "recipes/demo.yaml", "--output-dir", str(out), "--set", "model.dtype=float16", "--set", "train.device=cpu")
    assert rc == 2
    assert err.strip().splitlines()[-1] == "error: --set model.dtype: field 'model.dtype': float16 training is not supported on the CPU; use float32 or bfloat16"
    rc, _, err = call(capsys, "run", "recipes/demo.yaml", "--output-dir", str(out), "--set", "train.device=cpu", "--set", "train.report_to=wandb")
    assert rc == 2 and err.strip().splitlines()[-1].startswith("error: --set train.report_to: field 'train.report_to': ")


def test_prefix_sharing_on_a_mixture_of_experts_model_is_refused_at_the_door(tmp_path):
    """TRL's router load-balancing loss reads a [rows, positions] mask; the prefix-shared step, given a
    4-D one, failed in the first step ("The size of tensor a (112) must match ... (6272)")."""
    from transformers import MixtralConfig

    from alignpress.errors import AlignpressError

    folder = tmp_path / "moe"
    MixtralConfig(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                  num_local_experts=4, architectures=["MixtralForCausalLM"]).save_pretrained(folder)
    sets = [f"model.name_or_path={folder}", "dpo.max_length=64"]
    with pytest.raises(AlignpressError) as e:
        check_model(load_recipe(ROOT / "recipes/demo.yaml", [*sets, "dpo.prefix_sharing=true"]))
    assert (e.value.field, str(e.value)) == ("dpo.prefix_sharing", (
        "--set dpo.prefix_sharing: field 'dpo.prefix_sharing': MixtralForCausalLM is a mixture-of-experts model: TRL adds its router's load-balancing loss (router_aux_loss_coef 0.001), "
        "which needs the standard layout's attention mask; set dpo.prefix_sharing: false"))
    assert check_model(load_recipe(ROOT / "recipes/demo.yaml", [*sets, "dpo.prefix_sharing=false"])).startswith("model checks passed on MixtralForCausalLM")


FOUND_LATE = {
    # --set: the one line validate (and run, before prepare) now gives; each used to pass the door and fail or
    # waste the run later: after the model loaded (seed, optimizer package, schedule), or after training and
    # evaluation (zero loss weights, check_tolerance 0, a gate no trained model passes)
    "train.seed=-1": "field 'train.seed': must be between 0 and 2**32 - 1, got -1",
    "train.seed=4294967296": "field 'train.seed': must be between 0 and 2**32 - 1, got 4294967296",
    "data.seed=-5": "field 'data.seed': must be between 0 and 2**32 - 1, got -5",
    "train.lr_scheduler_type=cosine_with_min_lr": (
        "field 'train.lr_scheduler_type': transformers {tv} cannot set up the schedule 'cosine_with_min_lr': One of min_lr or min_lr_rate "
        "should be set through the `lr_scheduler_kwargs` (a recipe gives no scheduler arguments)"),
    "train.lr_scheduler_type=warmup_stable_decay": (
        "field 'train.lr_scheduler_type': transformers {tv} cannot set up the schedule 'warmup_stable_decay': get_wsd_schedule() missing 1 "
        "required positional argument: 'num_decay_steps' (a recipe gives no scheduler arguments)"),
    "train.optim=schedule_free_adamw": (
        "field 'train.optim': transformers {tv} cannot set up the optimizer 'schedule_free_adamw': You need to install `schedulefree` "
        "in order to use schedulefree optimizers. Install it with `pip install schedulefree.`"),
    "dpo.loss_weights=[0,0]": "field 'dpo.loss_weights': must be >= 0 with at least one above 0, got [0.0, 0.0]",
    "dpo.loss_weights=[1,-1]": "field 'dpo.loss_weights': must be >= 0 with at least one above 0, got [1.0, -1.0]",
    "export.check_tolerance=0": "field 'export.check_tolerance': must be > 0 (a merge changes the logits by float rounding), got 0.0",
    "eval.gate_max_kl=0": "field 'eval.gate_max_kl': must be > 0 (a KL divergence; 0 lets no trained model pass), got 0.0",
    "lora.r=100000": ("field 'lora.r': 100000 is larger than any adapted layer of Phi3ForCausalLM can use: a rank above 128 (the largest "
                      "smaller side among them) adds weights but no capacity"),
    "train.report_to=wandb": ("field 'train.report_to': tracker 'wandb' needs the wandb package, which is not installed: install it, "
                              "or choose another tracker (none turns tracking off)"),
}


@pytest.mark.parametrize("setting", sorted(FOUND_LATE))
def test_mistakes_that_surfaced_late_are_refused_by_validate(setting, capsys):
    import transformers

    if setting.startswith(("train.optim=", "train.report_to=")):
        package = {"train.optim=schedule_free_adamw": "schedulefree", "train.report_to=wandb": "wandb"}[setting]
        if __import__("importlib.util").util.find_spec(package):
            pytest.skip(f"{package} is installed here")
    rc, out, err = call(capsys, "validate", "recipes/demo.yaml", "--set", setting)
    field = setting.split("=")[0]
    assert (rc, out) == (2, "")
    assert err == f"error: --set {field}: {FOUND_LATE[setting].format(tv=transformers.__version__)}\n"


def test_a_warmup_that_never_ends_is_refused(capsys):
    """transformers' linear warmup gives step s the share s / warmup_steps of the learning rate: one
    step with the demo's 5 warmup steps trains at 0; 3 steps reach 0.4 and are allowed."""
    rc, out, err = call(capsys, "validate", "recipes/demo.yaml", "--set", "train.max_steps=1")
    assert (rc, err) == (2, "error: recipes/demo.yaml: field 'train.warmup_steps': 5 warmup steps for a run of 1 optimizer steps: its "
                            "largest learning rate would be 0 x train.learning_rate, so training would change almost nothing; lower train.warmup_steps\n")
    assert call(capsys, "validate", "recipes/demo.yaml", "--set", "train.max_steps=3")[0] == 0


def test_a_token_in_any_recipe_text_is_refused_without_printing_it(capsys, monkeypatch):
    """A token typed into a text field reached recipe.resolved.yaml, run.json, the model cards and the
    checkpoints, and (commit message, tag) the Hub unscanned. Any string field, by the token's form
    or as this environment's HF_TOKEN."""
    monkeypatch.setenv("HF_TOKEN", "localSecret42")
    form = "hf_" + "A1b2C3d4" * 4
    for setting, field in ((f"card.description=key {form}", "card.description"), ("publish.commit_message=deploy localSecret42", "publish.commit_message"),
                           ("eval.prompts=[\"hi\", \"localSecret42\"]", "eval.prompts[1]")):
        rc, out, err = call(capsys, "validate", "recipes/demo.yaml", "--set", setting)
        assert (rc, out) == (2, "")
        assert err.endswith(f"field '{field}': holds a Hub token: a recipe is written to the output folder, the model card and the Hub; "
                            "give the token only through HF_TOKEN or `hf auth login`\n"), err
        assert form not in err and "localSecret42" not in err


def test_a_recipe_that_is_a_folder_or_not_utf8_is_named(tmp_path, capsys):
    folder = tmp_path / "r.yaml"
    folder.mkdir()
    assert call(capsys, "validate", folder)[:3:2] == (2, f"error: {folder}: is a folder, not a recipe file (a .yaml file, such as recipes/demo.yaml)\n")
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes(b"# ok\nname: caf\xe9\n")
    assert call(capsys, "validate", latin1)[:3:2] == (2, f"error: {latin1}: line 2: not UTF-8 (byte 0xe9); save the recipe as UTF-8\n")


def test_a_schedule_that_cannot_train_stops_before_the_model_loads(tmp_path, demo_run):
    """Known once prepare has counted the pairs: a warmup longer than the run, or an optimizer step
    bigger than the data (one partial step). Both used to train and export a model that barely moved.
    The step count is the Trainer's: the demo's training logged its last step as 53."""
    from alignpress.train import optimizer_steps

    demo = demo_run[0]
    pairs = len((demo / "data" / "train.jsonl").read_text().splitlines())
    last = json.loads((demo / "metrics" / "train.jsonl").read_text().splitlines()[-1])["step"]
    assert optimizer_steps(load_recipe(ROOT / "recipes/demo.yaml"), pairs) == (8, last) == (8, 53)
    for setting, line in (
        ("train.warmup_steps=100000", "error: --set train.warmup_steps: field 'train.warmup_steps': 100000 warmup steps for a run of 53 optimizer "
                                      "steps: its largest learning rate would be 0.00052 x train.learning_rate, so training would change almost "
                                      "nothing; lower train.warmup_steps (417 training pairs, 8 a step)"),
        ("train.gradient_accumulation_steps=100", "error: --set train.gradient_accumulation_steps: field 'train.gradient_accumulation_steps': "
                                                  "each optimizer step takes 800 pairs (per_device_train_batch_size x gradient_accumulation_steps "
                                                  "x processes), more than the 417 training pairs prepared: lower train.gradient_accumulation_steps"),
    ):
        out = tmp_path / setting.split("=")[0]
        proc = cli("run", "recipes/demo.yaml", "--output-dir", out, "--set", setting)
        assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == line, proc.stderr[-2000:]
        assert "Loading weights" not in proc.stderr and not (out / "checkpoints").exists()
        assert json.loads((out / "run.json").read_text())["stages"]["prepare"]["status"] == "done"


UNCLEAR = {
    # --set: messages that used to be vague, cut short or aimed at the wrong field; now one line each
    "eval.gate_min_gain=1": ("field 'eval.gate_min_gain': must be above -1 and below 1 (a difference of two accuracies as fractions: "
                             "0.01 is one percentage point), got 1"),
    "eval.judge=builtin:tiny-phi3-arithmetic": (
        "field 'eval.judge': 'builtin:tiny-phi3-arithmetic': builtin: models are alignpress's generative demo models; a judge is a "
        "reward model (sequence classification with one output): give its Hub id or folder"),
    "name=" + "a" * 97: ("field 'name': is 97 characters; at most 96 (it names the output folder and the suggested Hub repo, whose "
                         "names stop at 96)"),
    "lora.target_modules=[qkv_proj,layers]": (
        f"field 'lora.target_modules': 'layers' matches model.layers, a ModuleList, which LoRA cannot adapt; name linear layers "
        f"(those of Phi3ForCausalLM: {PHI3_LINEAR})"),
    "lora.target_modules=[mlp]": (
        f"field 'lora.target_modules': 'mlp' matches model.layers.0.mlp, a Phi3MLP, which LoRA cannot adapt; name linear layers "
        f"(those of Phi3ForCausalLM: {PHI3_LINEAR})"),
    "data.filters.min.rating_chosen=abc": "field 'data.filters.min.rating_chosen': expected a number, got 'abc'",
}


@pytest.mark.parametrize("setting", sorted(UNCLEAR))
def test_unclear_mistakes_get_a_clear_line(setting, capsys):
    rc, out, err = call(capsys, "validate", "recipes/demo.yaml", "--set", setting)
    assert (rc, out, err) == (2, "", f"error: --set {setting.split('=')[0]}: {UNCLEAR[setting]}\n")


def test_data_files_read_without_complaint_but_not_rows_are_refused(tmp_path, capsys):
    """A JSON object wrapping the rows was read as one row ("has no rows"); a null or {} line became an
    all-null row that the rating filters dropped without a word."""
    lines = DATA.read_text().splitlines()
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"data": [json.loads(x) for x in lines]}))
    nulls = tmp_path / "nulls.jsonl"
    nulls.write_text("\n".join(lines[:300] + ["null"] + lines[300:]) + "\n")
    empty = tmp_path / "empty-row.jsonl"
    empty.write_text("\n".join(lines[:250] + ["{}"] + lines[250:]) + "\n")
    cases = {
        wrapped: (f"error: --set data.dataset: field 'data.dataset': {wrapped} is one JSON object whose 'data' holds 640 items, not rows "
                  "of pairs: write the rows one JSON object per line (.jsonl) or as a top-level array\n"),
        nulls: f"error: {nulls}: line 301: a JSON null, not an object with the pair's columns\n",
        empty: f"error: {empty}: row 250: empty (every column is null); remove it or fix the file\n",
    }
    for path, message in cases.items():
        rc, out, err = call(capsys, "validate", "recipes/demo.yaml", "--set", f"data.dataset={path}")
        assert (rc, out, err) == (2, "", message), path
    # The same rows as a top-level array are fine.
    listed = tmp_path / "listed.json"
    listed.write_text(json.dumps([json.loads(x) for x in lines]))
    rc, out, err = call(capsys, "validate", "recipes/demo.yaml", "--set", f"data.dataset={listed}")
    assert (rc, err) == (0, "") and "540 rows in train[100:]" in out


def test_the_sliding_window_binds_only_when_every_layer_slides():
    """Gemma-2/3 and Mistral-style configs alternate sliding and full attention layers: a full layer
    sees the whole sequence, so a sequence longer than the window is fine there; all sliding is not."""
    from types import SimpleNamespace

    from alignpress.checks import _check_lengths

    recipe = load_recipe(ROOT / "recipes/demo.yaml")  # sequences up to 64 tokens
    mixed = SimpleNamespace(max_position_embeddings=4096, sliding_window=16, layer_types=["sliding_attention", "full_attention"])
    assert _check_lengths(recipe, mixed, "Mixed") == 64
    every = SimpleNamespace(max_position_embeddings=4096, sliding_window=16, layer_types=["sliding_attention"] * 2)
    with pytest.raises(AlignpressError, match="longer than Every's sliding attention window of 16 tokens"):
        _check_lengths(recipe, every, "Every")
    with pytest.raises(AlignpressError, match="sliding attention window of 16"):
        _check_lengths(recipe, SimpleNamespace(max_position_embeddings=4096, sliding_window=16), "NoTypes")


def test_the_error_line_is_one_write(monkeypatch):
    """Launched processes share one stderr, which Python writes through: print() wrote the line and its
    newline apart, and another process's line could land between them (seen in CI with a test's own line)."""
    from alignpress import cli as cli_module

    writes = []
    monkeypatch.setattr(sys, "stderr", SimpleNamespace(write=writes.append, flush=lambda: None))
    monkeypatch.delenv("ALIGNPRESS_EXIT_DIR", raising=False)
    assert cli_module._fail("error: recipe.yaml: field 'dpo.beta': expected a number", 2) == 2
    assert writes == ["error: recipe.yaml: field 'dpo.beta': expected a number\n"]
