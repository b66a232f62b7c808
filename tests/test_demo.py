"""The README's demo through the real entry point: artifacts, numbers, resume, export checks, card."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import torch
from huggingface_hub import ModelCard

from conftest import ROOT, cli

STAGES = ["prepare", "train", "evaluate", "export", "publish"]


def load(path):
    return json.loads(path.read_text())


def test_demo_artifacts(demo_run):
    out, proc = demo_run
    for rel in ["recipe.resolved.yaml", "data/train.jsonl", "data/eval.jsonl", "data/stats.json", "adapter/adapter_model.safetensors",
                "adapter/adapter_config.json", "model/model.safetensors", "model/config.json", "model/generation_config.json",
                "model/tokenizer.json", "model/README.md", "metrics/train.jsonl", "metrics/eval.json", "run.json"]:
        assert (out / rel).is_file(), rel
    assert (out / "model/chat_template.jinja").is_file() or "chat_template" in (out / "model/tokenizer_config.json").read_text()
    manifest = load(out / "run.json")
    assert [manifest["stages"][s]["status"] for s in STAGES] == ["done"] * 5
    assert manifest["base_model"]["id"] == "builtin:tiny-phi3-arithmetic"
    assert len(manifest["data_fingerprint"]) == 64
    for lib in ("torch", "transformers", "trl", "peft", "datasets", "accelerate", "huggingface_hub"):
        assert manifest["versions"][lib], lib
    assert manifest["stages"]["publish"]["pushed"] is False
    assert "no publish.repo_id: skipped the push; the finished model is in" in proc.stdout
    assert not list(out.glob("*.partial"))


def test_demo_stdout_holds_results_and_stderr_one_line_per_log(demo_run):
    """stdout: the rendered pair, the push line and the summary, nothing else (no Trainer log dicts,
    no DeepSpeed line). stderr: one progress line per logged step, from the values in train.jsonl."""
    from alignpress.train import done_line, progress_line

    out, proc = demo_run
    lines = proc.stdout.splitlines()
    assert lines[0] == "One rendered pair (text, then tokens; ║ marks where the answer starts):"
    assert [line.split()[0] for line in lines[1:5]] == ["prompt", "chosen", "rejected", "tokens"]
    assert lines[5].startswith("no publish.repo_id: skipped the push") and lines[6].startswith("summary of run demo-")
    assert all(line.startswith("  ") for line in lines[7:]) and len(lines) == 17, lines
    steps = load(out / "run.json")["stages"]["train"]["global_step"]
    logged = [json.loads(line) for line in (out / "metrics/train.jsonl").read_text().splitlines()]
    expected = [f"[alignpress] {progress_line(e['step'], steps, e)}" for e in logged if "loss" in e and "train_runtime" not in e]
    assert len(expected) == 10 and expected[0].startswith("[alignpress] step 5/53: loss ")
    shown = [part for line in proc.stderr.splitlines() for part in line.split("\r") if part.startswith("[alignpress] step ")]
    # each line goes on with the time since training started and the time left at that pace
    timing = re.compile(r"; (\S.*) so far, about (\S.*) left$")
    assert [line[: line.index("; ")] for line in shown] == expected and all(timing.search(line) for line in shown), shown
    times = [[seconds(x) for x in timing.search(line).groups()] for line in shown]
    assert times == sorted(times, key=lambda t: t[0]) and times[-1][1] < times[-1][0]  # step 50 of 53: little left
    assert "Setting accelerator to CPU" not in proc.stdout + proc.stderr
    train = load(out / "run.json")["stages"]["train"]
    assert f"[alignpress] {done_line(train)}\n" in proc.stderr and "training done: {" not in proc.stderr


def seconds(text: str) -> float:
    """duration_text's words back to seconds: `4.3 s`, `2 min 05 s`, `1 h 58 min`."""
    units = {"s": 1, "min": 60, "h": 3600}
    words = text.split()
    assert len(words) in (2, 4) and all(w in units for w in words[1::2]), text
    return sum(float(n) * units[u] for n, u in zip(words[::2], words[1::2]))


def test_progress_line():
    from alignpress.train import progress_line

    logs = {"loss": 0.693147, "grad_norm": 8.2671, "learning_rate": 5e-6, "rewards/accuracies": 0.5, "rewards/margins": -4.511e-05, "epoch": 0.5}
    assert progress_line(4, 12, logs) == "step 4/12: loss 0.6931, reward accuracy 0.5, margin -4.511e-05, grad norm 8.267, lr 5e-06"
    assert progress_line(12, 12, {"train_runtime": 3.0, "train_loss": 0.69, "loss": 0.69}) is None
    assert progress_line(12, 12, {"eval_loss": 0.69}) is None
    # 3 s a step: 100 steps to go take 300 s at that pace
    assert progress_line(20, 120, {"loss": 0.5}, (30.0, 3.0)) == "step 20/120: loss 0.5; 30.0 s so far, about 5 min 00 s left"
    assert progress_line(12, 12, {"loss": 0.5}, (7261.0, 600.0)) == "step 12/12: loss 0.5; 2 h 01 min so far, about 0.0 s left"
    assert progress_line(10, 120, {"loss": 0.5}) == "step 10/120: loss 0.5"


def test_the_pace_leaves_out_what_the_first_steps_pay_once():
    """A resumed run from step 100: its first 10 steps took 60 s (a compile, say), the next 10 took
    20 s. The first line's pace is the only one there is (6 s a step); the second's is from the first
    line on (2 s a step), not the 4 s a step of the whole."""
    from alignpress.train import step_pace

    clock = {"started": 1000.0, "step": 100}
    assert step_pace(1000.0, 100, clock) is None  # no step taken yet
    assert step_pace(1060.0, 110, clock) == (60.0, 6.0)
    assert step_pace(1080.0, 120, clock) == (80.0, 2.0)
    assert step_pace(1081.0, 120, clock) == (81.0, 2.1)  # the last line again, at the end of training


def test_duration_text():
    from alignpress.runstate import duration_text

    assert [duration_text(s) for s in (0.04, 4.33, 59.94, 59.96, 125.4, 3599.4, 3599.6, 7079, 86400 * 2 + 61)] == [
        "0.0 s", "4.3 s", "59.9 s", "1 min 00 s", "2 min 05 s", "59 min 59 s", "1 h 00 min", "1 h 58 min", "48 h 01 min"]


def test_done_line():
    """The closing line of training: what a user reads (it used to be the summary's dict, systems decisions and all)."""
    from alignpress.train import done_line

    summary = {"global_step": 53, "resumed_from_step": 0, "train_runtime_s": 4.33, "final_loss": 1.1378824, "systems": {"device": "cpu"},
               "rewards/accuracies": 1.0, "rewards/margins": 0.12875094, "final_window_steps": [46, 50]}
    assert done_line(summary) == "training done: 53 steps in 4.3 s; steps 46-50: loss 1.138, reward accuracy 1, margin 0.1288 (run.json: stages.train)"
    resumed = {"global_step": 53, "resumed_from_step": 40, "train_runtime_s": 1.0, "final_loss": None}
    assert done_line(resumed) == "training done: 53 steps in 1.0 s (resumed from step 40) (run.json: stages.train)"
    assert done_line({**resumed, "train_runtime_s": 7234.5}).startswith("training done: 53 steps in 2 h 01 min (resumed")


def test_deepspeed_warnings_go_to_stderr():
    """DeepSpeed's logger writes to stdout; after setup_logging its records reach stderr, except the
    CPU-accelerator line, and stdout stays empty (DeepSpeed really imported, its accelerator chosen)."""
    code = ("from alignpress.cli import setup_logging; setup_logging()\n"
            "import deepspeed\n"
            "from deepspeed.accelerator import get_accelerator\n"
            "from deepspeed.utils import logger\n"
            "print(get_accelerator()._name)\n"
            "logger.warning('a DeepSpeed warning')\n"
            "logger.info('not shown')\n")
    env = {k: v for k, v in os.environ.items() if k not in ("DS_ACCELERATOR", "CUDA_VISIBLE_DEVICES")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env | {"PYTHONPATH": str(ROOT / "src")}, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ("cuda\n" if torch.cuda.is_available() else "cpu\n")
    ours = [line for line in proc.stderr.splitlines() if "DeepSpeed" in line or "accelerator" in line]
    assert ours == ["[DeepSpeed] WARNING: a DeepSpeed warning"], proc.stderr


def test_hub_retries_say_one_line_a_request():
    """huggingface_hub's own retry loop (http_backoff), run for real: against a closed port (no answer)
    and a local server that answers 503 twice, then 200. The retries happen (the call succeeds on the
    third try); their lines shrink to one a request."""
    code = textwrap.dedent("""
        import http.server, socket, sys, threading
        from alignpress.cli import setup_logging
        setup_logging()
        from huggingface_hub.utils import http_backoff
        answers = [503, 503, 200]
        class Flaky(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(answers.pop(0)); self.send_header("Content-Length", "0"); self.end_headers()
            def log_message(self, *a):
                pass
        server = http.server.HTTPServer(("127.0.0.1", 0), Flaky)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        print(http_backoff("GET", f"http://127.0.0.1:{server.server_port}/flaky", base_wait_time=0.01).status_code, flush=True)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0)); closed = s.getsockname()[1]
        print(f"closed {closed}", flush=True)
        try:
            http_backoff("HEAD", f"http://127.0.0.1:{closed}/gone", max_retries=3, base_wait_time=0.01)
        except Exception as e:
            print(type(e).__name__, file=sys.stderr)
        print(len(answers))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"} | {"PYTHONPATH": str(ROOT / "src")}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    status, closed, left = proc.stdout.splitlines()
    assert status == "200" and left == "0"  # three requests made: two retried 503s, then the answer
    port = re.search(r"http://127\.0\.0\.1:(\d+)/flaky", proc.stderr)
    assert port, proc.stderr
    assert proc.stderr.splitlines() == [
        f"HTTP Error 503 thrown while requesting GET http://127.0.0.1:{port.group(1)}/flaky; retrying up to 5 times (those lines not shown)",
        f"'[Errno 111] Connection refused' thrown while requesting HEAD http://127.0.0.1:{closed.split()[1]}/gone; retrying up to 3 times (those lines not shown)",
        "ConnectError",
    ]


def test_demo_data_counts(demo_run):
    stats = load(demo_run[0] / "data/stats.json")
    assert stats["format"] == "capybara"
    assert stats["splits"]["train"]["loaded"] == 540 and stats["splits"]["eval"]["loaded"] == 100
    removed = {f["filter"]: f["removed"] for f in stats["splits"]["train"]["filters"]}
    # The shipped data plants rows for each filter (alignpress.demo.data.make_rows).
    assert removed["rating_chosen >= 4.5"] == 13 and removed["more than 2 messages"] == 13
    # the log says what each filter dropped: a rating filter is named by what it keeps
    err = demo_run[1].stderr
    assert "[alignpress]   train: removed 13 (failing rating_chosen >= 4.5)" in err and "[alignpress]   train: removed 13 (more than 2 messages)" in err
    assert removed["chosen identical to rejected"] == 14 and removed["longer than 64 tokens"] == 0
    assert stats["splits"]["train"]["kept"] == len((demo_run[0] / "data/train.jsonl").read_text().splitlines())


def test_demo_alignment_is_measurable(demo_run):
    """DPO must change held-out preference and behaviour, not only the training reward."""
    ev = load(demo_run[0] / "metrics/eval.json")
    base, aligned = ev["base"], ev["aligned"]
    assert ev["n_pairs"] == 90 and ev["n_generations"] == 64
    for side in (base, aligned):
        assert 0.0 <= side["preference_accuracy"] <= 1.0 and 0.0 <= side["behaviour"] <= 1.0
    assert base["behaviour"] <= 0.1, base  # the base hedges
    assert aligned["behaviour"] >= 0.9, aligned  # the aligned model states the answer
    assert base["preference_accuracy"] <= 0.5 and aligned["preference_accuracy"] >= 0.9
    assert aligned["reward_accuracy"] >= 0.9 and aligned["mean_reward_margin"] > 0
    assert aligned["mean_logp_margin"] > base["mean_logp_margin"]
    sample = ev["samples"][0]
    assert sample["base"].startswith("I am not sure") and sample["aligned"].startswith("The answer is")


def test_train_metrics_logged(demo_run):
    lines = [json.loads(x) for x in (demo_run[0] / "metrics/train.jsonl").read_text().splitlines()]
    steps = [x["step"] for x in lines if "loss" in x]
    assert steps == sorted(set(steps)) and steps[0] == 5
    assert all(k in lines[0] for k in ("loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected", "learning_rate"))
    assert lines[-1]["step"] == load(demo_run[0] / "run.json")["stages"]["train"]["global_step"]
    # The summary's loss and rewards come from one window: the last that logged a loss (steps 46-50
    # of 53); the end of training logs 51-53 without a loss, and the rewards used to come from there.
    train = load(demo_run[0] / "run.json")["stages"]["train"]
    window = [x for x in lines if "loss" in x][-1]
    assert (train["global_step"], window["step"], train["final_window_steps"]) == (53, 50, [46, 50])
    assert [train[k] for k in ("final_loss", "rewards/accuracies", "rewards/margins")] == [window[k] for k in ("loss", "rewards/accuracies", "rewards/margins")]
    assert "\nfinal_loss and rewards/*: means over the last logged window, steps 46–50.\n" in (demo_run[0] / "model/README.md").read_text()


def test_exported_model_loads_and_generates(demo_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = demo_run[0] / "model"
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert tok.pad_token_id != tok.eos_token_id
    ids = tok.apply_chat_template([{"role": "user", "content": "What is 3 plus 4?"}], add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=16, do_sample=False)
    assert tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip().startswith("The answer is")
    checks = load(demo_run[0] / "run.json")["stages"]["export"]
    assert checks["merge_max_abs_diff"] <= 1e-4 and checks["change_from_base_max_abs_diff"] > 1.0


def test_model_card(demo_run):
    card = ModelCard.load(demo_run[0] / "model/README.md")
    data = card.data.to_dict()
    assert data["license"] == "mit"  # inherited from the base model's card
    assert data["library_name"] == "transformers" and data["pipeline_tag"] == "text-generation"
    assert data["tags"] == ["dpo", "trl", "alignpress", "lora", "demo", "arithmetic"]
    assert data["language"] == ["en"]
    assert "base_model" not in data and "datasets" not in data  # a builtin base and a local file are not Hub ids
    for heading in ("## What was done", "## Hyperparameters", "## Training data", "## Training results", "## Evaluation (held-out pairs)", "## Usage", "## Framework versions", "## Reproduce", "### Recipe", "## Citations"):
        assert heading in card.text, heading
    ev = load(demo_run[0] / "metrics/eval.json")
    # what trained it, next to how long: on this machine, the CPU with its cores
    train = load(demo_run[0] / "run.json")["stages"]["train"]
    assert train["hardware"] == f"CPU ({os.cpu_count()} cores)" and f"| hardware | CPU ({os.cpu_count()} cores) |" in card.text
    assert f"| preference_accuracy | {ev['base']['preference_accuracy']:.4g} | {ev['aligned']['preference_accuracy']:.4g} |" in card.text
    # What the numbers were measured on, against the weights this card describes.
    checks = load(demo_run[0] / "run.json")["stages"]["export"]
    assert ev["scored"] == {"weights": "the base with the LoRA adapter", "dtype": "float32", "device": "cpu"}
    assert checks["reload_max_abs_diff"] == 0.0  # saved in float32: the merge itself
    assert ("Scored on the base with the LoRA adapter in float32 (cpu), before the merge. This model is the merge saved in float32: "
            "on export's probe prompts its logits equal the float32 merge's, and the "
            f"merge's are within {checks['merge_max_abs_diff']:.2g} of the adapter model's.\n") in card.text
    assert "\nScored on the base with the LoRA adapter in float32 (cpu).\n" in (demo_run[0] / "adapter/README.md").read_text()
    # The base's generation config already stops at <|end|>: nothing added, nothing said.
    assert load(demo_run[0] / "run.json")["stages"]["export"]["eos_added"] is None and "Generation stops at" not in card.text


def test_card_metadata_for_a_hub_base(tmp_path):
    from alignpress.card import metadata
    from alignpress.recipe import load_recipe

    r = load_recipe(ROOT / "recipes/gemma-2b-it-capybara.yaml")
    assert metadata(r).to_dict() == {
        "base_model": "google/gemma-2b-it",
        "base_model_relation": "finetune",
        "datasets": ["argilla/distilabel-capybara-dpo-7k-binarized"],
        "language": ["en"],
        "library_name": "transformers",
        "license": "gemma",
        "pipeline_tag": "text-generation",
        "tags": ["dpo", "trl", "alignpress", "lora"],
    }
    assert metadata(r, relation="adapter").to_dict()["library_name"] == "peft"


def test_rerun_skips_finished_stages(demo_copy):
    before = (demo_copy / "model/model.safetensors").stat().st_mtime_ns
    proc = cli("run", "recipes/demo.yaml", "--output-dir", demo_copy)
    assert proc.returncode == 0, proc.stderr
    for stage in STAGES:
        assert f"== {stage}: already done, skipping" in proc.stderr
    assert (demo_copy / "model/model.safetensors").stat().st_mtime_ns == before


def test_different_recipe_in_same_folder_refused(demo_copy):
    proc = cli("run", "recipes/demo.yaml", "--output-dir", demo_copy, "--set", "dpo.beta=0.3")
    assert proc.returncode == 2
    assert "holds a run of a different recipe (dpo.beta differs); use another --output-dir" in proc.stderr


def _training_pending(folder):
    """The folder as a training stopped before its end leaves it: train and the later stages pending."""
    manifest = json.loads((folder / "run.json").read_text())
    for s in ("train", "evaluate", "export", "publish"):
        manifest["stages"][s] = {"status": "pending"}
    (folder / "run.json").write_text(json.dumps(manifest))


def test_settings_of_how_training_runs_may_change_when_it_resumes(demo_copy):
    """A save cadence for spot, the logging, the device: a resumed training may change them (it used
    to be refused as a different recipe, and `--restart` threw the finished steps away). A setting of
    what training computes is still refused, named by itself, not by its section."""
    _training_pending(demo_copy)
    proc = cli("train", "recipes/demo.yaml", "--output-dir", demo_copy, "--set", "train.seed=7", "--set", "train.save_minutes=5",
               "--set", "dpo.beta=0.2")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: {demo_copy / 'recipe.resolved.yaml'}: this folder holds a run of a different recipe (dpo.beta, train.seed differ); "
        "use another --output-dir (on SkyPilot: another --env RUN_NAME), or `train --restart` to redo it here")
    proc = cli("train", "recipes/demo.yaml", "--output-dir", demo_copy, "--set", "train.save_minutes=5", "--set", "train.logging_steps=2",
               "--set", "train.device=cpu", "--set", "train.report_to=none")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resuming training from {demo_copy / 'checkpoints' / 'checkpoint-53'} (step 53)" in proc.stderr
    assert json.loads((demo_copy / "run.json").read_text())["stages"]["train"]["status"] == "done"


def test_a_resumed_training_saves_and_logs_at_the_recipes_new_cadence(demo_copy):
    """The checkpoint's trainer_state.json carries the old save_steps and logging_steps, and the Trainer
    used to take them on resume: a spot user who shortened save_steps got no more checkpoints."""
    shutil.rmtree(demo_copy / "checkpoints" / "checkpoint-53")
    _training_pending(demo_copy)
    proc = cli("train", "recipes/demo.yaml", "--output-dir", demo_copy, "--set", "train.save_steps=6", "--set", "train.logging_steps=2",
               "--set", "train.save_total_limit=10")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resuming training from {demo_copy / 'checkpoints' / 'checkpoint-40'} (step 40)" in proc.stderr
    assert sorted(int(p.name.split("-")[1]) for p in (demo_copy / "checkpoints").glob("checkpoint-*")) == [40, 42, 48, 53]
    steps = [json.loads(x)["step"] for x in (demo_copy / "metrics/train.jsonl").read_text().splitlines() if "loss" in json.loads(x)]
    assert [s for s in steps if s > 40] == [42, 44, 46, 48, 50, 52]


def test_folder_from_an_older_version_is_the_same_recipe(demo_copy):
    """Fields a newer alignpress added are missing from an old recipe.resolved.yaml: at their
    defaults they change nothing, so the finished run is kept; set to something else, they differ."""
    import yaml

    path = demo_copy / "recipe.resolved.yaml"
    old = yaml.safe_load(path.read_text())
    del old["dpo"]["max_truncated_fraction"], old["data"]["max_malformed_fraction"], old["train"]["report_to"]
    path.write_text(yaml.safe_dump(old))
    proc = cli("run", "recipes/demo.yaml", "--output-dir", demo_copy)
    assert proc.returncode == 0, proc.stderr
    assert "== train: already done, skipping" in proc.stderr
    path.write_text(yaml.safe_dump(old))
    proc = cli("run", "recipes/demo.yaml", "--output-dir", demo_copy, "--set", "dpo.max_truncated_fraction=0.1")
    assert proc.returncode == 2
    assert "holds a run of a different recipe (dpo.max_truncated_fraction differs)" in proc.stderr


def test_merge_that_changed_nothing_is_an_error(demo_copy):
    """An adapter whose LoRA B matrices are zero changes nothing: export must refuse it."""
    from safetensors.torch import load_file, save_file

    path = demo_copy / "adapter/adapter_model.safetensors"
    weights = load_file(path)
    save_file({k: torch.zeros_like(v) if "lora_B" in k else v for k, v in weights.items()}, path)
    old_model = (demo_copy / "model/model.safetensors").read_bytes()
    published = load(demo_copy / "run.json")["stages"]["publish"]
    proc = cli("export", "recipes/demo.yaml", "--output-dir", demo_copy)
    assert proc.returncode == 3
    assert "error: the merged model gives the same logits as the base model" in proc.stderr
    manifest = load(demo_copy / "run.json")
    assert manifest["stages"]["export"]["status"] == "failed"
    # A failed stage leaves the later ones as they were: the old export is untouched, and so is the
    # record of what was published from it (`run` redoes export, then publish).
    assert manifest["stages"]["publish"] == published
    assert (demo_copy / "model/model.safetensors").read_bytes() == old_model


def test_stage_needs_its_inputs(tmp_path):
    """A folder with no run is named as such (the line used to cite a run.json that was not there)."""
    fresh = tmp_path / "fresh"
    proc = cli("train", "recipes/demo.yaml", "--output-dir", fresh)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: {fresh}: stage train needs prepare to be done first, and this folder holds no run (no run.json): "
        f"run `entrypoint.py prepare recipes/demo.yaml --output-dir {fresh}` (or `run`) first, or give the folder of a run with --output-dir")
    assert not fresh.exists()


def test_alignpress_outputs_moves_the_default_folder(tmp_path):
    """The image sets ALIGNPRESS_OUTPUTS=/outputs: without --output-dir a run lands where the results are mounted."""
    proc = cli("prepare", "recipes/demo.yaml", env={"ALIGNPRESS_OUTPUTS": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "demo" / "run.json").read_text())["stages"]["prepare"]["status"] == "done"
    # The default folder is the one a refusal leaves out of the command it suggests.
    proc = cli("train", "recipes/demo.yaml", env={"ALIGNPRESS_OUTPUTS": str(tmp_path / "elsewhere")})
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: {tmp_path / 'elsewhere' / 'demo'}: stage train needs prepare to be done first, and this folder holds no run (no run.json): "
        "run `entrypoint.py prepare recipes/demo.yaml` (or `run`) first, or give the folder of a run with --output-dir")


def test_resume_after_kill(tmp_path, demo_run):
    """kill -9 during training, run again: it resumes from the newest checkpoint, not step 0."""
    out = tmp_path / "killed"
    args = ["--output-dir", str(out), "--set", "train.save_steps=10"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, str(ROOT / "entrypoint.py"), "run", "recipes/demo.yaml", *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and not (out / "checkpoints/checkpoint-20/trainer_state.json").exists():
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    manifest = load(out / "run.json")
    assert manifest["stages"]["train"]["status"] == "running"  # killed: never marked done
    assert not (out / "adapter").exists()

    again = cli("run", "recipes/demo.yaml", *args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "prepare: already done, skipping" in again.stderr
    resumed = load(out / "run.json")["stages"]["train"]["resumed_from_step"]
    assert resumed >= 20
    assert f"resuming training from {out}/checkpoints/checkpoint-{resumed}" in again.stderr
    steps = [json.loads(x)["step"] for x in (out / "metrics/train.jsonl").read_text().splitlines()]
    assert len(steps) == len(set(steps)), "metrics logged twice for the same step"
    # Same data order, scheduler and RNG: the resumed adapter matches the uninterrupted demo's.
    from safetensors.torch import load_file

    a = load_file(out / "adapter/adapter_model.safetensors")
    b = load_file(demo_run[0] / "adapter/adapter_model.safetensors")
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4


def test_a_new_gate_threshold_alone_needs_no_new_evaluation(demo_copy):
    """The verdict is made again on metrics/eval.json (the generations and scores of the finished
    evaluation): evaluate is not redone, nor the merge; the exported card, which states the gate, is
    written again."""
    ev_before = json.loads((demo_copy / "metrics/eval.json").read_text())
    weights = (demo_copy / "model/model.safetensors").stat().st_mtime_ns
    proc = cli("run", "recipes/demo.yaml", "--output-dir", demo_copy, "--set", "eval.gate_max_kl=100")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "== evaluate: already done, skipping" in proc.stderr and "== export: already done, skipping" in proc.stderr
    assert (demo_copy / "model/model.safetensors").stat().st_mtime_ns == weights
    assert f"publish gate judged again on {demo_copy / 'metrics/eval.json'} with the new thresholds: passed" in proc.stderr
    ev = json.loads((demo_copy / "metrics/eval.json").read_text())
    assert ev["gate"]["max_kl"] == 100 and ev["gate"]["passed"] is True and ev_before["gate"] is None
    assert {k: v for k, v in ev.items() if k != "gate"} == {k: v for k, v in ev_before.items() if k != "gate"}
    assert "Publish gate passed" in (demo_copy / "model/README.md").read_text()
    assert json.loads((demo_copy / "run.json").read_text())["stages"]["evaluate"]["gate_passed"] is True


def test_a_card_change_writes_the_cards_again_without_a_new_merge(demo_copy, tmp_path):
    """`card` and `description` reach only the cards: after export they are written again in place
    (the merged weights stay), and they say what a new export would write."""
    again = tmp_path / "exported"
    shutil.copytree(demo_copy, again)
    weights = (demo_copy / "model/model.safetensors").stat().st_mtime_ns
    flags = ["--set", "description=Says the answer plainly.", "--set", "card.tags=[arithmetic]", "--set", "card.license=apache-2.0"]
    proc = cli("run", "recipes/demo.yaml", "--output-dir", demo_copy, *flags)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "== export: already done, skipping" in proc.stderr
    assert f"recipe card or gate changed: {demo_copy / 'model/README.md'} written again (the merged model stays)" in proc.stderr
    assert (demo_copy / "model/model.safetensors").stat().st_mtime_ns == weights
    text = (demo_copy / "model/README.md").read_text()
    assert "\nlicense: apache-2.0\n" in text and "- arithmetic\n" in text and "\nSays the answer plainly.\n" in text
    assert "\nSays the answer plainly.\n" in (demo_copy / "adapter/README.md").read_text()
    # The same cards as a new export of the same recipe writes.
    exported = cli("export", "recipes/demo.yaml", "--output-dir", again, *flags)
    assert exported.returncode == 0, exported.stderr[-3000:]
    for name in ("model/README.md", "adapter/README.md"):
        assert (demo_copy / name).read_text() == (again / name).read_text(), name


def test_changed_eval_settings_rerun_evaluate_only(demo_copy):
    proc = cli("run", "recipes/demo.yaml", "--output-dir", demo_copy, "--set", "eval.generation_rows=8")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "stages from evaluate on will run again" in proc.stderr
    assert "== train: already done, skipping" in proc.stderr
    assert json.loads((demo_copy / "metrics/eval.json").read_text())["n_generations"] == 8


def test_export_saves_the_merged_model_in_export_dtype(demo_copy):
    """The GPU recipes export bfloat16 (the default); the demo exports float32. A merged model saved
    without the cast passed every other test."""
    from safetensors import safe_open

    proc = cli("export", "recipes/demo.yaml", "--output-dir", demo_copy, "--set", "export.dtype=bfloat16")
    assert proc.returncode == 0, proc.stderr[-3000:]
    with safe_open(demo_copy / "model/model.safetensors", "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes == {"BF16"}
    assert json.loads((demo_copy / "model/config.json").read_text())["dtype"] == "bfloat16"
    checks = load(demo_copy / "run.json")["stages"]["export"]
    assert 0 < checks["reload_max_abs_diff"] <= 0.5  # bfloat16 rounding, within export's reload tolerance
    assert (f"This model is the merge saved in bfloat16: on export's probe prompts its logits are within "
            f"{checks['reload_max_abs_diff']:.2g} of the float32 merge's") in (demo_copy / "model/README.md").read_text()


def test_export_adds_the_templates_turn_end_to_a_generation_config_that_stops_only_at_eos(demo_run, tmp_path):
    """gemma-2b-it's generation config stops only at <eos> (id 1), while its chat template ends each
    answer with <end_of_turn>: the published model's `generate` ran on past its turn. The demo's base
    here gets such a config (eos 3 only, where the template ends answers with <|end|> = 440)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignpress.modeling import built_builtin

    base = tmp_path / "base"
    shutil.copytree(built_builtin("builtin:tiny-phi3-arithmetic"), base)
    config = load(base / "generation_config.json")
    assert config["eos_token_id"] == [440, 3]
    config["eos_token_id"] = 3
    (base / "generation_config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    proc = cli("run", "recipes/demo.yaml", "--output-dir", out, "--set", f"model.name_or_path={base}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[alignpress] generation config: eos_token_id [3] -> [3, 440] (the chat template ends each answer with <|end|>; export.stop_at_turn_end)" in proc.stderr.splitlines()
    assert load(out / "model/generation_config.json")["eos_token_id"] == [3, 440]
    checks = load(out / "run.json")["stages"]["export"]
    assert (checks["base_eos_token_id"], checks["eos_token_id"], checks["eos_added"]) == ([3], [3, 440], "<|end|>")
    card = (out / "model/README.md").read_text()
    assert ("Generation stops at `<|end|>`, the token the chat template ends each answer with: export added it to this model's "
            "`generation_config.json` (`eos_token_id` [3, 440]). The base model's generation config stops only at `eos_token_id` [3].") in card
    adapter_card = (out / "adapter/README.md").read_text()  # an adapter is used with the base's own config
    assert "out = model.generate(**inputs, max_new_tokens=24, eos_token_id=[3, 440])" in adapter_card
    assert "Generation stops at `<|end|>`, the token the chat template ends each answer with: `eos_token_id` in `generate` adds it." in adapter_card

    # A user's plain generate now ends the answer at <|end|>.
    tok = AutoTokenizer.from_pretrained(out / "model")
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    ids = tok.apply_chat_template([{"role": "user", "content": "What is 3 plus 4?"}], add_generation_prompt=True, return_tensors="pt", return_dict=True)
    answer = model.generate(**ids, max_new_tokens=24, do_sample=False)[0, ids["input_ids"].shape[1]:].tolist()
    assert answer[-1] == 440 and 440 not in answer[:-1] and 3 not in answer

    # stop_at_turn_end: false keeps the base's config (a new export, under a new run id).
    proc = cli("run", "recipes/demo.yaml", "--output-dir", out, "--set", f"model.name_or_path={base}", "--set", "export.stop_at_turn_end=false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert load(out / "model/generation_config.json")["eos_token_id"] == 3
    assert "Generation stops at" not in (out / "model/README.md").read_text()


def test_builds_killed_before_the_end_leave_no_folders_behind(tmp_path, caplog):
    """A build of the builtin model killed mid-way left its `.partial-PID` folder in the cache for
    good. The next use removes the ones untouched for an hour; a younger one may be another
    process's build in progress (a cache shared between containers: its PID means nothing here)."""
    from alignpress.demo import STALE_BUILD_S, VERSION, build_builtin_model

    final = tmp_path / f"tiny-phi3-arithmetic-v{VERSION}"
    final.mkdir()
    (final / "config.json").write_text("{}")
    (final / ".complete").write_text("1s\n")
    stale, fresh = final.with_name(f"{final.name}.partial-4242"), final.with_name(f"{final.name}.partial-4343")
    for folder in (stale, fresh):
        (folder / "sub").mkdir(parents=True)
        (folder / "sub/model.safetensors").write_bytes(b"x")
    old = time.time() - STALE_BUILD_S - 60
    os.utime(stale, (old, old))
    os.utime(fresh, (time.time() - STALE_BUILD_S + 60,) * 2)
    with caplog.at_level("INFO", logger="alignpress"):
        assert build_builtin_model("tiny-phi3-arithmetic", tmp_path) == final
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([final.name, fresh.name])
    assert caplog.messages == [f"removed {stale}, left by a build that did not finish"]
