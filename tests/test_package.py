"""fcapp installs as a package: `pip install .` into a fresh virtual environment gives the `fcapp`
command and the library, with the shipped data, working from any folder with no PYTHONPATH.

The fresh environment reuses the dependencies already installed for this interpreter (a .pth file
adds its site-packages), so the install takes seconds; fcapp itself is built from a copy of the
working tree and installed as a wheel."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _working_tree() -> list[str]:
    """The checkout's files as git sees them: tracked and new ones, not ignored ones (.venv, caches)."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    return [name for name in listed if name and (ROOT / name).is_file()]


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A fresh venv with fcapp installed from the working tree: its bin/ and site-packages."""
    base = tmp_path_factory.mktemp("package")
    source = base / "source"
    for name in _working_tree():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_bytes((ROOT / name).read_bytes())
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    ours = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    (site / "project-dependencies.pth").write_text("\n".join(ours) + "\n")
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "--no-cache-dir", str(source)], check=True, env=_clean_env(base))
    return {"bin": venv / "bin", "site": site, "home": base / "home", "outside": base}


def _clean_env(base: Path) -> dict[str, str]:
    """This environment less anything that would point Python at the checkout."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    return env | {"FCAPP_HOME": str(base / "home"), "HF_HUB_OFFLINE": "1"}


def _run(installed: dict[str, Path], *command: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """A command of the fresh venv, run in a folder outside the checkout."""
    done = subprocess.run([str(installed["bin"] / command[0]), *command[1:]], cwd=installed["outside"],
                          env=_clean_env(installed["outside"]), capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{command}: exit {done.returncode}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done


def test_the_fcapp_command_starts_and_lists_its_commands(installed: dict[str, Path]) -> None:
    usage = _run(installed, "fcapp", "--help").stdout
    assert usage.startswith("usage: fcapp")
    for command in ("solve", "generate", "pairs", "train", "eval", "serve", "models", "export", "app"):
        assert command in usage
    assert "usage:" in _run(installed, "python", "-m", "fcapp", "--help").stdout


def test_the_library_and_its_data_come_from_the_installed_wheel(installed: dict[str, Path]) -> None:
    report = _run(installed, "python", "-c", "import fcapp, fcapp.paths; "
                  "print(fcapp.__file__); print(fcapp.paths.shipped('gsm8k/train.jsonl'))").stdout.split()
    package = installed["site"] / "fcapp"
    assert report == [str(package / "__init__.py"), str(package / "assets" / "gsm8k" / "train.jsonl")]
    modules = {p.relative_to(ROOT / "fcapp") for p in (ROOT / "fcapp").rglob("*.py")}
    assert modules <= {p.relative_to(package) for p in package.rglob("*.py")}, "a package is missing from pyproject"
    shipped = {str(p.relative_to(package / "assets")) for p in (package / "assets").rglob("*") if p.is_file()}
    assert shipped == {"gsm8k/LICENSE", "gsm8k/train.jsonl", "folio/LICENSE", "folio/train.jsonl"}  # no screenshots


def test_solve_runs_the_embedded_model_from_outside_the_checkout(installed: dict[str, Path]) -> None:
    out = _run(installed, "fcapp", "solve", "--task", "fol", "--problem-id", "0").stdout
    assert "task fol | problem fol-0-0 | model smollm2" in out
    assert "\nAnswer: " in out and "verdict: " in out


def test_an_isolated_tool_worker_imports_the_installed_package(installed: dict[str, Path]) -> None:
    """The sympy tools run in `python -m fcapp.tools.worker` processes: no PYTHONPATH is handed down."""
    call = ("from fcapp.tools.math import math_toolkit; "
            "print(math_toolkit().get('solve_equation').call({'equation': '2*x + 3 = 11', 'variable': 'x'}))")
    assert _run(installed, "python", "-c", call).stdout.strip() == "x = 4"


def test_models_lists_the_tuned_models_as_json(installed: dict[str, Path]) -> None:
    assert json.loads(_run(installed, "fcapp", "models", "--json").stdout) == []
    run = installed["home"] / "models" / "mine"
    (run / "model").mkdir(parents=True)
    (run / "model" / "config.json").write_text("{}")
    (run / "card.json").write_text(json.dumps({"base": "smollm2", "method": "lora", "finished": "2026-11-01"}))
    [listed] = json.loads(_run(installed, "fcapp", "models", "--json").stdout)
    assert (listed["name"], listed["path"], listed["base"]) == ("mine", str(run / "model"), "smollm2")


def test_records_tasks_and_the_store_stand_without_the_agent_loop_or_torch() -> None:
    """The chain records live in fcapp.records: the store, the tasks and the training sets import them
    without pulling in the agent loop (or torch), so a script that only reads chains stays light."""
    import subprocess
    import sys

    probe = ("import sys, fcapp.store, fcapp.tasks, fcapp.trainsets, fcapp.records\n"
             "from fcapp.tasks import get_task\nget_task('fol').split('train')\n"
             "print(sorted(m for m in ('fcapp.agent', 'torch') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
