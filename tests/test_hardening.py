"""Hardening, as a specification:

(a) names from users cannot escape their folders: model names, run names, uploaded file names;
(b) nothing is exposed to the network by accident: a non-loopback bind needs credentials, and is
    refused before anything binds or loads;
(c) a bad file (problem set, preference file, tool definition, training config) fails with an
    error naming the file and the line, and changes nothing;
(d) a labelling process SIGKILLed mid-loop loses no committed label and leaves a consistent
    SQLite file;
(e) a pair export SIGKILLed mid-write leaves the old file or a complete new one, never a part.

(d) and (e) use real processes and real files; kill moments come from a seeded RNG.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from fcapp.files import DataFileError
from fcapp.models.base import ModelError
from fcapp.paths import data_dir, data_home, models_dir, safe_name
from fcapp.store import Store
from fcapp.tools.base import SchemaError
from helpers import label_history

REPO = Path(__file__).resolve().parents[1]
CHILD_ENV = os.environ | {"PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}

TRAVERSAL = ["../../etc/passwd", "/abs/path", "a/../../b", "..", ".", "a\x00b", "", "a/b", "..\\..\\x", ".hidden",
             "~", "~/x", "x" * 101, "name with space", "nul\x00/../../x", "ok/../../../../tmp/x", "\u202eevil"]


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh data folder (models, uploads, user tools) for the test."""
    monkeypatch.setenv("FCAPP_HOME", str(tmp_path / "home"))
    return data_home()


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` with its content: to show that something changed nothing."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---- (a) path traversal ------------------------------------------------------------------------
@pytest.mark.parametrize("name", TRAVERSAL)
def test_unsafe_model_names_are_refused_with_a_clear_error(name: str) -> None:
    with pytest.raises(ValueError, match="invalid model name .*no path separators"):
        safe_name(name, "model name")


@pytest.mark.parametrize("name", ["smollm2-dpo", "run_1", "v1.2", "A", "x" * 100])
def test_plain_model_names_are_accepted(name: str) -> None:
    assert safe_name(name) == name


@pytest.mark.parametrize("name", TRAVERSAL)
def test_a_training_run_cannot_be_named_out_of_the_models_folder(home: Path, name: str) -> None:
    from fcapp.training import TrainConfig

    before = tree(home)
    with pytest.raises(ValueError, match="invalid model name"):
        TrainConfig(data="pairs.jsonl", name=name)
    with pytest.raises(ValueError, match="invalid model name"):
        TrainConfig.from_dict({"data": "pairs.jsonl", "name": name})
    assert tree(home) == before


@pytest.mark.parametrize("name", [n for n in TRAVERSAL if "/" not in n])
def test_attach_refuses_names_that_are_not_plain(home: Path, name: str) -> None:
    from fcapp.training import attach

    with pytest.raises(ValueError, match="invalid model name"):
        attach(name)


@pytest.mark.parametrize("name", [n for n in TRAVERSAL if "/" in n and "\x00" not in n])
def test_attach_reads_a_path_only_where_a_run_lives(home: Path, tmp_path: Path, name: str) -> None:
    """A name with a separator is taken as a run folder; a folder without a run is refused."""
    from fcapp.training import attach

    before = tree(tmp_path)
    with pytest.raises(FileNotFoundError, match="no training run in"):
        attach(name)
    assert tree(tmp_path) == before


def test_a_model_name_resolves_inside_the_models_folder_only(home: Path, monkeypatch: pytest.MonkeyPatch,
                                                             tmp_path: Path) -> None:
    """A registered name maps to models/<name>/model; '..' or '.' never reach a model folder beside
    or above models/ (before the fix, '..' resolved to <data home>/model)."""
    from fcapp.models.registry import resolve_model_path

    for folder in (models_dir() / "good" / "model", home / "model", models_dir() / "model"):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text("{}")
    monkeypatch.chdir(tmp_path)  # relative paths resolve here, away from the data folder
    assert resolve_model_path("good") == str(models_dir() / "good" / "model")
    planted = {(home / "model").resolve(), (models_dir() / "model").resolve()}
    for spec in ("..", ".", "../model", "./model", "good/../..", "../../model"):
        try:
            assert Path(resolve_model_path(spec)).resolve() not in planted, spec
        except ModelError as exc:  # a path to no folder at all
            assert "does not exist" in str(exc)


@pytest.mark.parametrize("spec", ["/nonexistent", "/nonexistent/model", "./no-such-folder", "~/no-such-model",
                                  "models/tuned/missing"])
def test_a_model_path_that_does_not_exist_says_so(spec: str) -> None:
    """Before the fix `--base /nonexistent` failed later with a hub error about repo ids."""
    from fcapp.models.local import resolve_model_path

    with pytest.raises(ModelError, match=f"no model at {re.escape(spec)}: that folder does not exist"):
        resolve_model_path(spec)
    assert resolve_model_path("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_the_cli_names_a_missing_model_folder(capsys: pytest.CaptureFixture[str]) -> None:
    from fcapp.cli import main

    assert main(["solve", "--task", "gsm8k", "--problem-id", "0", "--model", "/nonexistent"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no model at /nonexistent: that folder does not exist") and "Repo id" not in err


@pytest.mark.parametrize("upload_name", ["../../etc/passwd", "/abs/path", "a/../../b", "..", ".", "a\x00b",
                                         "..\\..\\windows\\system32", "", None, ".bashrc", "x" * 300,
                                         "../" * 50 + "deep", "\u202eexe.txt", "con", "nul\x00.txt"])
def test_uploaded_files_land_in_the_uploads_folder_whatever_their_name(home: Path, tmp_path: Path,
                                                                        upload_name: str | None) -> None:
    from fcapp.ui.common import safe_upload

    source = tmp_path / "gradio-temp" / "upload.bin"
    source.parent.mkdir()
    source.write_bytes(b"payload")
    outside = tree(tmp_path / "gradio-temp")
    stored = safe_upload(source, upload_name)
    assert stored.parent == data_dir("uploads").resolve()
    assert stored.read_bytes() == b"payload"
    assert not stored.name.startswith(".") and "\x00" not in stored.name and "/" not in stored.name
    assert len(stored.name) <= 120
    assert tree(tmp_path / "gradio-temp") == outside  # the source is only read
    assert not (tmp_path / "etc").exists() and not Path("/abs/path").exists()


# ---- (b) network exposure ------------------------------------------------------------------------
NON_LOOPBACK = ["0.0.0.0", "::", "192.168.1.5", "10.0.0.1", "example.com", "8.8.8.8", "[::]", "0", "127.0.0.1.nip.io",
                "LOCALHOST.evil.com", "::ffff:8.8.8.8"]
LOOPBACK = ["127.0.0.1", "::1", "localhost", "127.0.0.2"]


class _FakeDemo:
    """Stands in for the Gradio app: records the launch instead of binding a port."""

    def __init__(self) -> None:
        self.launched: dict[str, Any] | None = None

    def launch(self, **kwargs: Any) -> None:
        self.launched = kwargs


@pytest.fixture
def fake_app(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[_FakeDemo]]:
    """fcapp.ui.app with build_app recorded: a refused launch must not even build the app."""
    from fcapp.ui import app

    built: list[_FakeDemo] = []

    def build_app(db: str | None = None) -> _FakeDemo:
        built.append(_FakeDemo())
        return built[-1]

    monkeypatch.setattr(app, "build_app", build_app)
    yield built


@pytest.mark.parametrize("host", NON_LOOPBACK)
def test_the_app_refuses_a_network_bind_without_auth(fake_app: list[_FakeDemo], host: str) -> None:
    from fcapp.ui.app import launch

    with pytest.raises(ValueError, match=r"reachable from other machines.*--auth user:password"):
        launch(host=host, port=1)
    assert fake_app == []  # refused before anything was built or bound


@pytest.mark.parametrize("auth", ["user", ":pw", "user:", ""])
def test_malformed_auth_does_not_open_the_app(fake_app: list[_FakeDemo], auth: str) -> None:
    from fcapp.ui.app import launch

    with pytest.raises(ValueError):
        launch(host="0.0.0.0", port=1, auth=auth)
    assert fake_app == []


def test_the_app_binds_to_the_network_with_auth(fake_app: list[_FakeDemo]) -> None:
    from fcapp.ui.app import launch

    launch(host="0.0.0.0", port=1, auth="ann:secret")
    assert fake_app[0].launched["server_name"] == "0.0.0.0"
    assert fake_app[0].launched["auth"] == ("ann", "secret")


@pytest.mark.parametrize("host", LOOPBACK + ["[::1]"])
def test_the_app_serves_loopback_without_auth(fake_app: list[_FakeDemo], host: str) -> None:
    from fcapp.ui.app import launch

    launch(host=host, port=1)
    assert fake_app[0].launched["server_name"] == host and fake_app[0].launched["auth"] is None


def test_the_apps_temporary_files_are_deleted_after_an_hour(tmp_path: Path) -> None:
    """Before the fix uploads piled up in Gradio's temporary folder for as long as the app ran."""
    from fcapp.ui.app import build_app

    assert build_app(str(tmp_path / "app.db")).delete_cache == (3600, 3600)


def test_the_default_host_is_loopback() -> None:
    import inspect

    from fcapp.cli import build_parser
    from fcapp.serve import serve
    from fcapp.ui.app import launch

    assert inspect.signature(launch).parameters["host"].default == "127.0.0.1"
    assert inspect.signature(serve).parameters["host"].default == "127.0.0.1"
    parser = build_parser()
    assert parser.parse_args(["app"]).host == "127.0.0.1"
    assert parser.parse_args(["serve", "--model", "smollm2"]).host == "127.0.0.1"


@pytest.mark.parametrize("host", NON_LOOPBACK)
@pytest.mark.parametrize("key", [None, ""])
def test_the_model_server_refuses_a_network_bind_without_a_key(host: str, key: str | None) -> None:
    from fcapp.serve import check_exposure

    with pytest.raises(ValueError, match=r"refusing to serve on .* without an API key"):
        check_exposure(host, key)


@pytest.mark.parametrize("host", LOOPBACK)
def test_the_model_server_allows_loopback_and_keyed_binds(host: str) -> None:
    from fcapp.serve import check_exposure

    check_exposure(host, None)
    check_exposure("0.0.0.0", "a-long-key")


def test_serve_checks_the_host_before_loading_a_model(monkeypatch: pytest.MonkeyPatch) -> None:
    import fcapp.models.local as local
    from fcapp.serve import serve

    loaded: list[str] = []
    monkeypatch.setattr(local, "load_model", lambda spec: loaded.append(spec))
    with pytest.raises(ValueError, match="without an API key"):
        serve("smollm2", host="0.0.0.0", port=1)
    assert loaded == []


def test_the_cli_reports_a_refused_bind_as_a_clear_error(fake_app: list[_FakeDemo], monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    import fcapp.models.local as local
    from fcapp.cli import main

    monkeypatch.setattr(local, "load_model", lambda spec: pytest.fail("the model was loaded"))
    assert main(["app", "--host", "0.0.0.0"]) == 2
    assert "error: binding to 0.0.0.0" in capsys.readouterr().err
    assert main(["serve", "--model", "smollm2", "--host", "0.0.0.0"]) == 2
    assert "error: refusing to serve on 0.0.0.0" in capsys.readouterr().err
    assert fake_app == []


def test_the_app_logs_how_user_functions_run(fake_app: list[_FakeDemo], caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from fcapp.tools import namespaces
    from fcapp.ui.app import launch

    with caplog.at_level(logging.INFO, logger="fcapp"):
        launch(port=1)
    assert namespaces.status() in caplog.text and fake_app[0].launched


def test_the_cli_hands_teachers_and_the_sandbox_opt_in_to_the_app(fake_app: list[_FakeDemo]) -> None:
    from fcapp.cli import main
    from fcapp.models import teachers
    from fcapp.tools import namespaces

    try:
        assert main(["app", "--teacher", "box=http://gpu-box:8000/v1#llama,BOX_KEY",
                     "--allow-unsandboxed-functions"]) == 0
        assert [t.spec for t in teachers.configured()] == ["teacher:box"] and namespaces.refusal() is None
        assert fake_app[0].launched
    finally:
        teachers.configure()
        namespaces.allow_unsandboxed(False)


def test_a_bad_teacher_flag_stops_the_app_before_it_is_built(fake_app: list[_FakeDemo],
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    from fcapp.cli import main

    assert main(["app", "--teacher", "box=gpu-box"]) == 2
    assert "error: --teacher 'box=gpu-box': write NAME=URL#MODEL" in capsys.readouterr().err
    assert fake_app == []


# ---- (c) bad files ------------------------------------------------------------------------------
GSM8K_OK = json.dumps({"question": "Tom has 2 apples and buys 3. How many?", "answer": "2 + 3 = 5\n#### 5"})
FOLIO_OK = json.dumps({"premises-FOL": ["Cat(tom)", "∀x (Cat(x) → Furry(x))"], "conclusion": "Tom is furry.",
                       "conclusion-FOL": "Furry(tom)", "label": "True"})


@pytest.mark.parametrize("task_name, good", [("gsm8k", GSM8K_OK), ("folio", FOLIO_OK)])
@pytest.mark.parametrize("bad, message", [
    ("{not json", "not valid JSON"),
    ('{"question": "q"', "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ("[" * 5_000 + "]" * 5_000, "nested too deeply"),
    ('{"question": ' + "9" * 5_000 + "}", "not valid JSON"),
    ("{}", "missing field"),
    ('{"question": "why \\ud800?", "answer": "#### 1"}', "lone UTF-16 surrogate"),
])
def test_a_malformed_problem_file_names_the_file_and_line(tmp_path: Path, task_name: str, good: str, bad: str,
                                                          message: str) -> None:
    from fcapp.tasks import get_task

    path = tmp_path / "problems.jsonl"
    path.write_text(f"{good}\n\n{good}\n{bad}\n{good}\n", encoding="utf-8")
    with pytest.raises(DataFileError, match=rf"^{re.escape(str(path))}:4: .*{message}"):
        get_task(task_name).load_file(path, strict=True)
    loaded = get_task(task_name).load_file(path)  # by default the good rows load and the bad one is reported
    assert len(loaded.problems) == 3 and len(loaded.skipped) == 1
    assert re.match(rf"^{re.escape(str(path))}:4: .*{message}", loaded.skipped[0])


def test_a_problem_file_that_is_not_utf8_names_the_file(tmp_path: Path) -> None:
    from fcapp.tasks import get_task

    path = tmp_path / "latin1.jsonl"
    path.write_bytes(GSM8K_OK.encode() + b"\n" + '{"question": "café", "answer": "#### 1"}'.encode("latin-1") + b"\n")
    with pytest.raises(DataFileError, match=rf"^{re.escape(str(path))}: cannot read"):
        get_task("gsm8k").load_file(path)


def _pair_row(n: int) -> dict[str, Any]:
    return {"prompt": [{"role": "user", "content": f"q{n}"}], "chosen": [{"role": "assistant", "content": "a"}],
            "rejected": [{"role": "assistant", "content": "b"}], "task": "gsm8k", "problem_id": f"p{n}"}


@pytest.mark.parametrize("bad, message", [
    ("{broken", "not valid JSON"),
    (json.dumps(_pair_row(9))[:-30], "not valid JSON"),  # a truncated line, as a killed writer leaves
    (json.dumps({"prompt": [], "chosen": [], "rejected": "text"}), "'rejected' must be a list"),
    (json.dumps({"chosen": [], "rejected": []}), "'prompt' must be a list"),
    ("[" * 5_000 + "]" * 5_000, "nested too deeply"),
    (json.dumps(_pair_row(9)).replace('"q9"', "1" + "0" * 5_000), "not valid JSON"),
    (json.dumps(_pair_row(9)).replace('"q9"', '"q\\udfff"'), "lone UTF-16 surrogate"),  # SQLite could not store it
])
def test_a_broken_preference_file_names_the_line_and_leaves_the_store_unchanged(tmp_path: Path, bad: str,
                                                                                message: str) -> None:
    from fcapp.trainsets import import_pairs

    path = tmp_path / "prefs.jsonl"
    path.write_text("\n".join([json.dumps(_pair_row(1)), json.dumps(_pair_row(2)), bad, json.dumps(_pair_row(3))])
                    + "\n", encoding="utf-8")
    with Store(tmp_path / "fcapp.db") as store:
        store.save_pairs("gsm8k", "imported", [_pair_row(0)])  # an earlier import of the same policy
        before = store.list_pairs()
        with pytest.raises(DataFileError, match=rf"^{re.escape(str(path))}:3: .*{message}"):
            import_pairs(path, store)
        assert store.list_pairs() == before
        assert store.check() == "ok"


def test_a_parquet_preference_file_with_broken_tools_names_the_row(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from fcapp.trainsets import import_pairs

    rows = [_pair_row(1) | {"tools": "[]"}, _pair_row(2) | {"tools": "[{oops"}]  # Parquet keeps tools as JSON text
    path = tmp_path / "prefs.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    with Store(tmp_path / "fcapp.db") as store:
        with pytest.raises(DataFileError, match=rf"^{re.escape(str(path))}:2: 'tools' is not valid JSON"):
            import_pairs(path, store)
        assert store.list_pairs() == []


def test_a_tool_definition_with_a_syntax_error_names_the_line() -> None:
    from fcapp.tools.sandbox import define_user_tool

    source = 'def half(x: float) -> float:\n    """Half of x."""\n    return x /\n'
    with pytest.raises(SchemaError, match=r"syntax error on line 3.*return x /"):
        define_user_tool(source)


@pytest.mark.parametrize("source, examples, message", [
    ('def f(x: int) -> int:\n    """Doc."""\n    return (x\n', None, "line 3"),
    ('def f(x: int) -> int:\n    """Doc."""\n\treturn x\n  return 1\n', None, "line 3"),
    ("def f(x):\n    return x\n", None, "docstring"),
    ('def f(x) -> int:\n    """Doc."""\n    return x\n', None, "type hint"),
    ('def f(x: int) -> int:\n    """Doc."""\n    return x\n', '[{"x": "not a number"}]', "example"),
    ('def f(x: int) -> int:\n    """Doc."""\n    return x\n', "[{broken", "examples are not valid JSON"),
    ("x = 1\n", None, "defines no function"),
    ("def f(x: int) -> int:\n    return x\x00\n", None, "line 2: source code string cannot contain null bytes"),
    ("(" * 500 + ")" * 500, None, "line 1|cannot be parsed"),
])
def test_a_bad_user_function_is_refused_and_nothing_is_saved(home: Path, source: str, examples: str | None,
                                                             message: str) -> None:
    from fcapp import user_tools

    before = tree(home)
    with pytest.raises(SchemaError, match=message):
        user_tools.save_function(source, examples, enable_for=["gsm8k"])
    assert tree(home) == before
    assert user_tools.list_functions() == []


def test_unknown_training_options_are_named() -> None:
    from fcapp.training import TrainConfig

    with pytest.raises(ValueError, match="unknown training option.*epochz.*lerning_rate"):
        TrainConfig.from_dict({"data": "p.jsonl", "name": "run", "epochz": 1, "lerning_rate": 1e-5})
    with pytest.raises(ValueError, match="object of TrainConfig fields, not list"):
        TrainConfig.from_dict(["data", "name"])  # type: ignore[arg-type]


@pytest.mark.parametrize("text, message", [
    ('{\n  "data": "p.jsonl",\n  "name": "run"\n  "epochs": 1\n}\n', r":4: invalid JSON \(Expecting ',' delimiter"),
    ('{"data": "p.jsonl", "name": "run", "epochz": 1}', "unknown training option.*epochz"),
    ('{"data": "p.jsonl", "name": "../../escape"}', "invalid model name"),
    ('{"data": "p.jsonl"}', "missing 1 required positional argument: 'name'"),
    ("[]", "object of TrainConfig fields"),
    ("", r":1: invalid JSON"),
])
def test_a_broken_config_file_stops_the_training_worker_with_a_clear_message(home: Path, tmp_path: Path, text: str,
                                                                             message: str) -> None:
    config = tmp_path / "run.json"
    config.write_text(text, encoding="utf-8")
    before = tree(home)
    done = subprocess.run([sys.executable, "-m", "fcapp.training.worker", "--config", str(config)], capture_output=True,
                          text=True, timeout=120, env=CHILD_ENV | {"FCAPP_HOME": str(home)})
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    assert str(config) in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert re.search(message, done.stderr), done.stderr
    assert tree(home) == before


def _rest_of_output(child: subprocess.Popen) -> str:
    """What a killed child printed that was not read yet. Not communicate(timeout=...): after
    readline() it reads the pipe's descriptor directly and drops what readline had buffered."""
    rest = child.stdout.read()
    child.wait(timeout=30)
    return rest


# ---- (d) a labelling process killed mid-loop ---------------------------------------------------------
_LABELLER = """
import sys
from fcapp.store import Store

store = Store(sys.argv[1])
ids = [int(x) for x in sys.argv[2].split(",")]
for i in range(10_000_000):
    chain_id = ids[i % len(ids)]
    if i % 5 == 4:
        record = store.get_chain(chain_id)["record"] | {"answer": str(i)}
        label_id = store.label_chain(chain_id, "edited", f"w{i}", edited_record=record, edited_verdict=bool(i % 2))
    else:
        label_id = store.label_chain(chain_id, ("accept", "reject")[i % 2], f"w{i}")
    print(label_id, i, flush=True)
"""


def _expected_label(i: int, ids: list[int]) -> tuple[int, str, str]:
    return ids[i % len(ids)], ("edited" if i % 5 == 4 else ("accept", "reject")[i % 2]), f"w{i}"


@pytest.mark.parametrize("attempt", range(3))
def test_a_labeller_killed_mid_loop_loses_no_committed_label(tmp_path: Path, attempt: int) -> None:
    from test_store import make_chain

    path = tmp_path / "labels.db"
    with Store(path) as store:
        ids = [store.add_chain(make_chain(f"p{n}", seed=n), verdict=bool(n % 2)) for n in range(20)]
    child = subprocess.Popen([sys.executable, "-c", _LABELLER, str(path), ",".join(map(str, ids))],
                             stdout=subprocess.PIPE, text=True, env=CHILD_ENV)
    rng = random.Random(attempt)
    wanted = rng.randint(20, 200)  # labels to see committed before the kill, then a random extra moment
    reported: list[tuple[int, int]] = []
    deadline = time.monotonic() + 60
    while len(reported) < wanted and time.monotonic() < deadline:
        line = child.stdout.readline()
        if not line:
            break
        reported.append(tuple(map(int, line.split())))
    time.sleep(rng.uniform(0, 0.05))
    os.kill(child.pid, signal.SIGKILL)
    rest = _rest_of_output(child)
    reported += [tuple(map(int, line.split())) for line in rest.splitlines() if len(line.split()) == 2]
    assert child.returncode == -signal.SIGKILL
    assert len(reported) >= wanted, "the labeller did not get going"

    with Store(path) as store:
        assert store.check() == "ok"
        stored = {row["id"]: (chain_id, row["label"], row["who"], row["edited_record"])
                  for chain_id in ids for row in label_history(store, chain_id)}
        for label_id, i in reported:  # every reported label is there, exactly as written
            chain_id, label, who = _expected_label(i, ids)
            assert stored[label_id][:3] == (chain_id, label, who)
            if label == "edited":
                assert stored[label_id][3]["answer"] == str(i)
        assert len(stored) - len(reported) <= 1  # at most the one committed before it was printed
        last_i = max(i for _, i in reported)
        for label_id, (chain_id, label, who, _) in stored.items():  # nothing half-written or invented
            i = int(who[1:])
            assert i <= last_i + 1 and _expected_label(i, ids) == (chain_id, label, who)
        # the current label of each chain is its latest one
        for chain_id in ids:
            history = label_history(store, chain_id)
            if history:
                assert store.get_chain(chain_id)["label"] == history[-1]["label"]


# ---- (e) a pair export killed mid-write ---------------------------------------------------------------
_EXPORTER = """
import sys
from pathlib import Path
from fcapp.trainsets import export_pairs


def rows(tag: str, n: int = 5000) -> list:
    text = (tag + " ") * 300
    return [{"prompt": [{"role": "user", "content": f"{tag} question {i}"}],
             "chosen": [{"role": "assistant", "content": text}],
             "rejected": [{"role": "assistant", "content": text[::-1]}],
             "tools": [], "task": "gsm8k", "problem_id": f"{tag}-{i}"} for i in range(n)]


if __name__ == "__main__":
    target = Path(sys.argv[1])
    sets = [rows("A"), rows("B")]
    print("ready", flush=True)
    for k in range(10_000_000):
        export_pairs(sets[k % 2], target)
        print(k, flush=True)
"""


@pytest.fixture(scope="module")
def exporter(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, bytes]]:
    """The exporter script, and the exact bytes an export of set A and of set B writes."""
    folder = tmp_path_factory.mktemp("exporter")
    script = folder / "exporter.py"
    script.write_text(_EXPORTER)
    spec = importlib.util.spec_from_file_location("exporter", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    from fcapp.trainsets import export_pairs

    expected = {}
    for tag in ("A", "B"):
        export_pairs(module.rows(tag), folder / f"{tag}.jsonl")
        expected[tag] = (folder / f"{tag}.jsonl").read_bytes()
    assert len(expected["A"]) > 5_000_000  # big enough that writing it takes a while
    return script, expected


def _wait_for_temporary_file(folder: Path, deadline_s: float = 60) -> None:
    """Until the exporter is writing the target's temporary file (it exists and is not empty)."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        for entry in os.scandir(folder):
            try:
                if (entry.name.startswith(".pairs.jsonl.") and not entry.name.startswith(".pairs.jsonl.card.md.")
                        and entry.stat().st_size > 0):
                    return
            except FileNotFoundError:  # renamed into place between the listing and the stat
                continue
    pytest.fail("the exporter never started writing")


@pytest.mark.parametrize("moment", ["random-0", "random-1", "random-2", "writing-the-first", "writing-the-second"])
def test_an_export_killed_mid_write_leaves_a_complete_file(tmp_path: Path, exporter: tuple[Path, dict[str, bytes]],
                                                           moment: str) -> None:
    """The target holds the previous complete file or a complete new one, whenever the kill comes:
    at a random moment, or while the temporary file of the first or the second export is being
    written (the kill then lands mid-write: the temporary file is left half written)."""
    script, expected = exporter
    target = tmp_path / "pairs.jsonl"
    old = b"".join(json.dumps(_pair_row(n)).encode() + b"\n" for n in range(3))
    target.write_bytes(old)
    child = subprocess.Popen([sys.executable, str(script), str(target)], stdout=subprocess.PIPE, text=True,
                             env=CHILD_ENV)
    assert child.stdout.readline().strip() == "ready"
    finished: list[int] = []
    if moment.startswith("random"):
        time.sleep(random.Random(moment).uniform(0.0, 2.0))  # somewhere within the first few exports
    else:
        if moment == "writing-the-second":
            finished.append(int(child.stdout.readline()))  # the first export is complete
        _wait_for_temporary_file(tmp_path)
    os.kill(child.pid, signal.SIGKILL)
    finished += [int(line) for line in _rest_of_output(child).split()]
    content = target.read_bytes()
    # Export k writes set A for even k, B for odd. With n exports reported finished, the file holds
    # the last reported one, or the next one (finished just before the kill, not yet reported).
    n = len(finished)
    allowed = {("A", "B")[(n - 1) % 2], ("A", "B")[n % 2]} if n else {"old", "A"}
    outcome = next((tag for tag, data in expected.items() if content == data), "old" if content == old else None)
    assert outcome is not None, f"partial file: {len(content)} bytes"
    assert outcome in allowed, (outcome, n)
    # a killed writer leaves at most hidden temporary files beside the target
    leftovers = [p.name for p in tmp_path.iterdir() if p.name not in ("pairs.jsonl", "pairs.jsonl.card.md")]
    assert all(name.startswith(".pairs.jsonl.") for name in leftovers), leftovers
    from fcapp.trainsets import export_pairs, load_pair_file

    assert len(load_pair_file(target)) in (3, 5000)
    export_pairs([_pair_row(0)], target)  # the next export clears what the killed one left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pairs.jsonl", "pairs.jsonl.card.md"]
