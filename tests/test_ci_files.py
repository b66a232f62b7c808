"""Linters on the files the tests cannot run here: the image workflow, the Dockerfile, the shell scripts.

The linters live in their own environment, .venv-tools (requirements-tools.lock, `make tools`;
`make test` builds it): actionlint for .github/workflows/*.yml (with shellcheck for their `run:`
steps), hadolint for the Dockerfile, shellcheck for sky/*.sh and scripts/*.sh, and ruff's pyflakes
rules for the Python code.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TOOLS = REPO / ".venv-tools" / "bin"
WORKFLOWS = sorted((REPO / ".github" / "workflows").glob("*.yml"))
SCRIPTS = sorted([*(REPO / "sky").glob("*.sh"), *(REPO / "scripts").glob("*.sh")])


def tool(name, *args, cwd=REPO):
    exe = TOOLS / name
    if not exe.exists():
        pytest.fail(f"{exe} is missing: run `make tools` (requirements-tools.lock)")
    # actionlint finds shellcheck on PATH
    env = {"PATH": f"{TOOLS}:/usr/bin:/bin"}
    return subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, timeout=120, cwd=cwd, env=env)


def test_the_image_workflow_exists():
    assert [p.name for p in WORKFLOWS] == ["image.yml"]


def test_workflows_pass_actionlint():
    proc = tool("actionlint", *WORKFLOWS)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_actionlint_catches_a_broken_workflow(tmp_path):
    """The linter really checks: a misspelt permission and a wrong output reference are reported."""
    text = (REPO / ".github" / "workflows" / "image.yml").read_text()
    broken = text.replace("packages: write", "packages: writ").replace("steps.meta.outputs.tags", "steps.meta.output.tags")
    assert broken != text
    (tmp_path / "broken.yml").write_text(broken)
    proc = tool("actionlint", "-no-color", tmp_path / "broken.yml")
    assert proc.returncode == 1
    assert '"writ" is invalid as permission of scope "packages"' in proc.stdout
    assert 'property "output" is not defined' in proc.stdout


def test_dockerfile_passes_hadolint():
    proc = tool("hadolint", REPO / "Dockerfile")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerignore_lets_in_what_the_dockerfile_copies():
    """.dockerignore is an allow-list (`*`, then `!path`): every COPY source must be let in, or the
    image build stops at that COPY (it did, for requirements-gpu.lock, until this test)."""
    ignore = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines() if line.strip() and not line.startswith("#")]
    assert ignore[0] == "*"
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    sources = []
    for line in (REPO / "Dockerfile").read_text().splitlines():
        words = line.split()
        if words[:1] == ["COPY"] and not any(w.startswith("--from") for w in words):
            sources += [w.rstrip("/") for w in words[1:-1] if not w.startswith("--")]
    assert sorted(sources) == ["entrypoint.py", "pyproject.toml", "recipes", "requirements-gpu.lock", "requirements.lock", "src"]
    assert [src for src in sources if src not in allowed] == []


def test_shell_scripts_pass_shellcheck():
    assert {p.name for p in SCRIPTS} >= {"setup.sh", "run.sh", "env.sh", "podman-base.sh"}
    proc = tool("shellcheck", "-x", *[p.relative_to(REPO) for p in SCRIPTS])
    assert proc.returncode == 0, proc.stdout + proc.stderr


PYTHON_CODE = [REPO / "src", REPO / "tests", REPO / "benchmarks", REPO / "sky", REPO / "entrypoint.py"]


def test_python_passes_pyflakes_rules():
    """ruff's F rules: undefined names, a name defined twice, unused imports and variables."""
    proc = tool("ruff", "check", "--isolated", "--no-cache", "--select", "F", "--output-format", "concise", *PYTHON_CODE)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_ruff_catches_a_function_defined_twice(tmp_path):
    """What happened once in plan.py: a second function of the same name replaced one still in use."""
    (tmp_path / "twice.py").write_text("def prices():\n    return offers()\n\n\ndef offers():\n    return 1\n\n\ndef offers(recipe):\n    return recipe\n")
    proc = tool("ruff", "check", "--isolated", "--no-cache", "--select", "F", "--output-format", "concise", "twice.py", cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stdout.splitlines()[0] == "twice.py:9:5: F811 Redefinition of unused `offers` from line 5: `offers` redefined here"


def test_pyproject_builds_without_setuptools_deprecations(tmp_path):
    """`make venv` builds the package with the newest setuptools; a deprecated pyproject field (the
    license table: "by 2027-Feb-18 ... your builds will no longer be supported") would one day stop
    `make demo` on a fresh machine. Setuptools' own reading of the file, its warnings made errors."""
    code = ("import warnings, setuptools.config.pyprojecttoml as p\n"
            "warnings.simplefilter('error')\n"
            "from setuptools.dist import Distribution\n"
            "d = Distribution()\n"
            "p.apply_configuration(d, 'pyproject.toml')\n"
            "print(d.metadata.license_expression, d.get_version())\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert (proc.returncode, proc.stdout) == (0, "Apache-2.0 0.1.0\n"), proc.stderr[-2000:]


def test_make_says_when_python_is_too_old(tmp_path):
    """Ubuntu 22.04's python3 is 3.10: `make demo` used to start pip, which failed on the lock with
    pages of resolver errors. A stand-in for it: this python, reporting 3.10.12."""
    old = tmp_path / "python3.10"
    old.write_text(f'#!/bin/sh\nif [ "$1" = "-c" ]; then exec {sys.executable} -c "import sys; sys.version_info = (3, 10, 12, \'final\', 0); '
                   f'exec(sys.argv[1])" "$2"; fi\nexec {sys.executable} "$@"\n')
    old.chmod(0o755)
    venv = tmp_path / "venv"
    # not as a sub-make of `make test` (it would say "Entering directory" and take its flags)
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS", "MAKEOVERRIDES")}
    proc = subprocess.run(["make", "demo", f"PYTHON={old}", f"VENV={venv}"], capture_output=True, text=True, cwd=REPO, timeout=120, env=env)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines()[0] == (f"error: alignpress needs Python >= 3.11 (the locked transformers, numpy and pandas need it), and {old} "
                                           "is 3.10.12: give another, e.g. make demo PYTHON=python3.12")
    assert not venv.exists()


def test_no_tracked_symlink_or_environment():
    """A clean checkout must build its own environments: a tracked `.venv*` or a link that points
    outside the repo (a helper's `.venv-tools -> /elsewhere`) breaks `make test` on CI."""
    files = subprocess.run(["git", "ls-files", "-s"], capture_output=True, text=True, cwd=REPO, check=True).stdout
    bad = []
    for line in files.splitlines():
        mode, _, _, path = line.split(None, 3)
        if path.split("/")[0].startswith(".venv"):
            bad.append(f"{path}: an environment is built, not tracked")
        elif mode == "120000":
            target = (REPO / path).parent / Path(os.readlink(REPO / path))
            if not target.resolve().is_relative_to(REPO):
                bad.append(f"{path}: a link out of the repo")
    assert bad == []


def test_make_clean_keeps_finished_runs(tmp_path):
    """`make clean` used to delete outputs/, where `run` writes by default: on a user's own GPU
    machine, a trained and exported model. It removes caches only, and says outputs/ is kept."""
    work = tmp_path / "checkout"
    for name in ("Makefile", "requirements-sky.lock", "entrypoint.py"):
        (work / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / name, work / name)
    for folder in ("src/alignpress/__pycache__", "tests/__pycache__", ".pytest_cache/v", "outputs/phi3/model", "outputs/phi3/__pycache__",
                   ".venv/lib/__pycache__"):
        (work / folder).mkdir(parents=True)
        (work / folder / "f").write_text("x")
    # as a user types it: not a sub-make of `make test` (whose MAKEFLAGS add "Entering directory" lines)
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
    proc = subprocess.run(["make", "clean"], cwd=work, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "outputs/ kept: it holds finished runs; delete a run's folder yourself"
    left = sorted(str(p.relative_to(work)) for p in work.rglob("f"))
    assert left == [".venv/lib/__pycache__/f", "outputs/phi3/__pycache__/f", "outputs/phi3/model/f"]
