"""Local inputs edited after prepare read them (alignpress.inputs): a data file with rows added, a
base model folder overwritten. The commands that would use the folder's results refuse, naming the
file; a copy with the same bytes (new mtimes) is the same input."""

from __future__ import annotations

import json
import os
import shutil

from alignpress.inputs import changed_data, changed_model
from alignpress.runstate import RunDir
from conftest import ROOT, cli


def prepared(tmp_path, tiny_phi3, extra="train: {device: cpu}\n"):
    model = tmp_path / "base"
    shutil.copytree(tiny_phi3, model)
    data = tmp_path / "pairs.jsonl"
    lines = (ROOT / "recipes/data/arithmetic-capybara.jsonl").read_text().splitlines()
    data.write_text("\n".join(lines[:60]) + "\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: r\nmodel: {{name_or_path: {model}}}\ndata: {{dataset: pairs.jsonl, eval_fraction: 0.2}}\n"
                      + extra)
    out = tmp_path / "out"
    proc = cli("prepare", recipe, "--output-dir", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return recipe, model, data, out


def test_a_data_file_edited_after_prepare_stops_run_and_train(tmp_path, tiny_phi3):
    recipe, _, data, out = prepared(tmp_path, tiny_phi3)
    recorded = json.loads((out / "run.json").read_text())["inputs"]
    assert list(recorded["data"]) == [str(data)] and recorded["data"][str(data)]["size"] == data.stat().st_size
    original = data.read_bytes()
    # The same bytes with a new mtime (a copy, a checkout): unchanged.
    os.utime(data, ns=(1, 1))
    assert changed_data(RunDir(out)) == []
    data.write_bytes(original + original.splitlines(keepends=True)[0])
    assert changed_data(RunDir(out)) == [str(data)]
    for command in ("run", "train"):
        proc = cli(command, recipe, "--output-dir", out)
        assert proc.returncode == 2
        assert proc.stderr.strip().splitlines()[-1] == (
            f"error: {recipe}: field 'data.dataset': {data} changed since this folder's prepare stage read it: its results are of the "
            "old data. Run `entrypoint.py prepare` on this folder to prepare the new data (training then starts over), use another "
            "--output-dir, or put the old file back")
    assert not (out / "checkpoints").exists()
    # `prepare` reads it again and records the new file.
    assert cli("prepare", recipe, "--output-dir", out).returncode == 0
    assert changed_data(RunDir(out)) == []


def test_a_base_model_overwritten_after_prepare_stops_the_stages_that_load_it(tmp_path, tiny_phi3):
    recipe, model, _, out = prepared(tmp_path, tiny_phi3)
    weights = model / "model.safetensors"
    saved = weights.read_bytes()
    shutil.copy(weights, tmp_path / "copy.safetensors")
    shutil.copy(tmp_path / "copy.safetensors", weights)  # the same bytes, a new mtime
    assert changed_model(RunDir(out)) == []
    weights.write_bytes(saved[:-4] + bytes(4))  # other weights of the same shape
    (model / "extra.txt").write_text("new file")
    assert changed_model(RunDir(out)) == ["extra.txt", "model.safetensors"]
    proc = cli("train", recipe, "--output-dir", out)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: {recipe}: field 'model.name_or_path': the base model's files changed since this folder's run began (extra.txt, "
        f"model.safetensors in {model}): its checkpoints and adapter were trained on the old weights. Put them back, or `run --restart` "
        "to train on the new ones (or use another --output-dir)")
    proc = cli("run", recipe, "--output-dir", out)  # run too: it would resume training on the new weights
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith(
        f"error: {recipe}: field 'model.name_or_path': the base model's files changed since this folder's run began (extra.txt, ")
    weights.write_bytes(saved)
    (model / "extra.txt").unlink()
    assert changed_model(RunDir(out)) == []


def test_undoing_a_data_edit_gets_the_finished_stages_back(tmp_path, tiny_phi3):
    """An edited data file prepared again set the finished stages aside (training starts over on new
    data); putting the file back and preparing again used to leave them pending, and `run` retrained
    from step 0 and deleted the old checkpoints. Now the stages of that data stand again."""
    recipe, _, data, out = prepared(tmp_path, tiny_phi3, "eval: {max_rows: 8, generation_rows: 2, max_new_tokens: 8}\n"
                                                          "train: {device: cpu, max_steps: 4, save_steps: 2, logging_steps: 1}\n")
    proc = cli("run", recipe, "--output-dir", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    finished = json.loads((out / "run.json").read_text())["stages"]
    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir())
    original = data.read_bytes()
    data.write_bytes(b"".join(original.splitlines(keepends=True)[:-5]))  # five pairs fewer
    assert cli("prepare", recipe, "--output-dir", out).returncode == 0
    stages = json.loads((out / "run.json").read_text())["stages"]
    assert [stages[s]["status"] for s in ("train", "evaluate", "export", "publish")] == ["pending"] * 4
    assert not (out / "checkpoints").exists() and (out / "checkpoints.previous").is_dir()
    # A training on the edited data that saved a checkpoint and stopped (its files do not matter here)
    (out / "checkpoints" / "checkpoint-2").mkdir(parents=True)
    data.write_bytes(original)
    proc = cli("prepare", recipe, "--output-dir", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "prepared data is again the data of the later stages' results" in proc.stderr
    assert f"dropping {out / 'checkpoints'}: an unfinished training on the edited data" in proc.stderr
    manifest = json.loads((out / "run.json").read_text())
    assert {s: manifest["stages"][s] for s in ("train", "evaluate", "export", "publish")} == {s: finished[s] for s in ("train", "evaluate", "export", "publish")}
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == checkpoints and not (out / "checkpoints.previous").exists()
    proc = cli("run", recipe, "--output-dir", out)
    assert proc.returncode == 0 and "== train: already done, skipping" in proc.stderr


def test_a_copy_with_new_mtimes_is_hashed_once(tmp_path, tiny_phi3, monkeypatch):
    """The record takes the new mtime of a file whose bytes are the same: a 16 GB local base model copied
    again is hashed by the next command only, not by every command after it."""
    from alignpress import inputs
    from alignpress.recipe import load_recipe

    recipe, model, data, out = prepared(tmp_path, tiny_phi3)
    os.utime(data, ns=(5, 5))
    os.utime(model / "model.safetensors", ns=(7, 7))
    inputs.check(load_recipe(recipe), RunDir(out), "train")
    recorded = json.loads((out / "run.json").read_text())["inputs"]
    assert recorded["data"][str(data)]["mtime_ns"] == 5 and recorded["model"]["files"]["model.safetensors"]["mtime_ns"] == 7

    def no_hashing(path):
        raise AssertionError(f"hashed {path} again")

    monkeypatch.setattr(inputs, "file_sha256", no_hashing)
    inputs.check(load_recipe(recipe), RunDir(out), "train")
    # A changed file is still found, and its record is not touched.
    data.write_text(data.read_text() + data.read_text().splitlines(keepends=True)[0])
    assert inputs.changed_data(RunDir(out)) == [str(data)]
    assert json.loads((out / "run.json").read_text())["inputs"] == recorded
