"""The SkyPilot task files (sky/*.yaml), checked offline with SkyPilot's own parser.

SkyPilot lives in its own environment (.venv-sky, built from requirements-sky.lock by
`make .venv-sky/.installed`): it cannot share one with huggingface_hub. These tests therefore drive
sky/check_tasks.py and the parser through that environment's python, in a subprocess.
"""
import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SKY_PY = REPO / ".venv-sky" / "bin" / "python"
CHECK = REPO / "sky" / "check_tasks.py"
TASK_FILES = sorted((REPO / "sky").glob("*.yaml"))
GUARDED = ("HUB_REPO", "HF_TOKEN")


def sky_python(*args, timeout=120):
    if not SKY_PY.exists():
        pytest.fail(f"{SKY_PY} is missing: run `make .venv-sky/.installed` (SkyPilot's own environment)")
    return subprocess.run([str(SKY_PY), *args], capture_output=True, text=True, timeout=timeout, cwd=REPO)


def check(*paths):
    """Run check_tasks.py; return (exit code, {file name: its output line})."""
    proc = sky_python(str(CHECK), *map(str, paths))
    lines = {}
    for line in proc.stdout.splitlines():
        status, _, rest = line.partition(" ")
        name = rest.strip().split(":", 1)[0]
        lines[Path(name).name] = line
    return proc.returncode, lines, proc


def test_task_files_exist():
    assert {p.name for p in TASK_FILES} >= {"phi3.yaml", "gemma.yaml", "multinode.yaml"}


def test_every_task_file_passes_the_checks():
    code, lines, proc = check()
    assert set(lines) == {p.name for p in TASK_FILES}, proc.stdout + proc.stderr
    assert code == 0, proc.stdout + proc.stderr
    assert all(line.startswith("ok ") for line in lines.values())


# --- negative cases: each a copy of a real task file with one thing broken -----------------------

def _phi3():
    return yaml.safe_load((REPO / "sky" / "phi3.yaml").read_text())


def _multinode():
    return yaml.safe_load((REPO / "sky" / "multinode.yaml").read_text())


def token_as_plain_env():
    task = _phi3()
    del task["secrets"]
    task["envs"]["HF_TOKEN"] = "hf_should_not_be_here"
    return task


def token_value_in_secrets():
    task = _phi3()
    task["secrets"]["HF_TOKEN"] = "hf_should_not_be_here"
    return task


def no_bucket():
    task = _phi3()
    del task["file_mounts"]
    return task


def output_outside_bucket():
    task = _phi3()
    task["run"] = task["run"].replace('--output-dir "/outputs/$RUN_NAME"', "--output-dir /tmp/out")
    return task


def colon_question_guard():
    task = _phi3()
    lines = task["run"].splitlines()
    lines[0] = ': "${HUB_REPO:?set HUB_REPO}"'
    task["run"] = "\n".join(lines) + "\n"
    return task


def no_token_guard():
    task = _phi3()
    task["run"] = "\n".join(ln for ln in task["run"].splitlines() if "HF_TOKEN" not in ln) + "\n"
    return task


def no_spot_single_node():
    task = _phi3()
    task["resources"]["any_of"] = [c for c in task["resources"]["any_of"] if not c["use_spot"]]
    return task


def missing_h100():
    task = _phi3()
    task["resources"]["any_of"] = [c for c in task["resources"]["any_of"] if "H100" not in c["accelerators"]]
    return task


def no_job_recovery():
    task = _phi3()
    del task["resources"]["job_recovery"]
    return task


def multinode_without_rank():
    task = _multinode()
    task["run"] = task["run"].replace('--machine_rank "$SKYPILOT_NODE_RANK"', "--machine_rank 0")
    return task


def bare_python():
    task = _phi3()
    task["run"] = task["run"].replace("/opt/venv/bin/python entrypoint.py", "python entrypoint.py")
    return task


def unknown_field():
    task = _phi3()
    task["resource"] = task.pop("resources")  # a typo SkyPilot's schema rejects
    return task


NEGATIVE = {
    # case: (task, text the file's FAIL line must contain: the field and the problem)
    "token_as_plain_env": (token_as_plain_env, "envs.HF_TOKEN: the token must not be a plain env"),
    "token_value_in_secrets": (token_value_in_secrets, "secrets.HF_TOKEN: has a value in the file"),
    "no_bucket": (no_bucket, "file_mounts: no bucket mounted"),
    "output_outside_bucket": (output_outside_bucket, "run: --output-dir /tmp/out is not inside a mounted bucket"),
    "colon_question_guard": (colon_question_guard, "run: the HUB_REPO guard uses ${HUB_REPO:?}"),
    "no_token_guard": (no_token_guard, "run: does not start with a guard that exits when HF_TOKEN is empty"),
    "no_spot_single_node": (no_spot_single_node, "resources.use_spot: single-node task offers no spot candidate"),
    "missing_h100": (missing_h100, "resources.any_of: missing ['H100']"),
    "no_job_recovery": (no_job_recovery, "resources.job_recovery: candidates ['A100-80GB:1', 'A100:1', 'H100:1'] have no"),
    "multinode_without_rank": (multinode_without_rank, "run: --machine_rank is not derived from $SKYPILOT_NODE_RANK"),
    "bare_python": (bare_python, "run: calls bare `python`; use /opt/venv/bin/python"),
    "unknown_field": (unknown_field, "parse: "),
}


@pytest.fixture(scope="module")
def negative_results(tmp_path_factory):
    """Write every broken variant to a temp file and check them all in one SkyPilot start."""
    folder = tmp_path_factory.mktemp("sky_negative")
    paths = []
    for case, (build, _) in NEGATIVE.items():
        path = folder / f"{case}.yaml"
        path.write_text(yaml.safe_dump(build(), sort_keys=False))
        paths.append(path)
    return check(*paths)


@pytest.mark.parametrize("case", sorted(NEGATIVE))
def test_broken_task_file_is_rejected_naming_file_and_field(negative_results, case):
    code, lines, proc = negative_results
    assert code != 0
    line = lines.get(f"{case}.yaml", "")
    assert line.startswith(f"FAIL ") and f"{case}.yaml:" in line, proc.stdout + proc.stderr
    assert NEGATIVE[case][1] in line, line


# --- the run guards, executed the way SkyPilot executes them --------------------------------------

@pytest.fixture(scope="module")
def run_scripts():
    """The run script of each task file, as SkyPilot's parser returns it (Task.run)."""
    code = ("import json, sys, sky\n"
            "print(json.dumps({p: sky.Task.from_yaml(p).run for p in sys.argv[1:]}))")
    proc = sky_python("-c", code, *map(str, TASK_FILES))
    assert proc.returncode == 0, proc.stderr
    return {Path(p).name: run for p, run in json.loads(proc.stdout.splitlines()[-1]).items()}


def run_guards(script: str, env: dict, home: Path):
    """Run the first lines of a run script (one guard per variable) with `bash -i`, as SkyPilot does
    (sky/skylet/log_lib.py runs `/bin/bash -i script`); a sentinel after them shows whether they stopped it."""
    commands = [ln for ln in script.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    guards = commands[: len(GUARDED)]
    path = home / "guards.sh"
    path.write_text("\n".join(guards + ["echo GUARDS-PASSED", ""]))
    base = {"PATH": os.environ["PATH"], "HOME": str(home)}  # a bare HOME: no ~/.bashrc of the user
    return subprocess.run(["bash", "-i", str(path)], capture_output=True, text=True, timeout=30,
                          env={**base, **env}, stdin=subprocess.DEVNULL)


SET = {"HUB_REPO": "someone/model", "HF_TOKEN": "hf_dummy"}


@pytest.mark.parametrize("task_file", [p.name for p in TASK_FILES])
@pytest.mark.parametrize("missing,how", [("HUB_REPO", "unset"), ("HF_TOKEN", "unset"), ("HUB_REPO", "empty"),
                                         ("HF_TOKEN", "empty")])
def test_run_refuses_to_start_without_repo_or_token(run_scripts, tmp_path, task_file, missing, how):
    env = dict(SET)
    if how == "unset":
        del env[missing]
    else:
        env[missing] = ""
    proc = run_guards(run_scripts[task_file], env, tmp_path)
    assert proc.returncode != 0
    assert f"{missing} is not set" in proc.stderr
    assert "GUARDS-PASSED" not in proc.stdout


@pytest.mark.parametrize("task_file", [p.name for p in TASK_FILES])
def test_run_guards_pass_when_repo_and_token_are_set(run_scripts, tmp_path, task_file):
    proc = run_guards(run_scripts[task_file], SET, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "GUARDS-PASSED" in proc.stdout


def test_colon_question_guard_does_not_stop_bash_i(tmp_path):
    """Why the guards test and exit explicitly: under `bash -i`, "${VAR:?}" prints but carries on."""
    proc = run_guards(': "${HUB_REPO:?set HUB_REPO}"\ntrue\n', {}, tmp_path)
    assert "set HUB_REPO" in proc.stderr
    assert "GUARDS-PASSED" in proc.stdout
