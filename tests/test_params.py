"""Bad params stop a script before any work: one line on stderr naming the key, exit code 2, no traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dictlearn.errors import UserError
from dictlearn.params import Params, load_params, parse_params
from tests.conftest import tiny_gpt2

REPO = Path(__file__).resolve().parents[1]


def run_script(script: str, params: dict | None, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    path = tmp_path / "params.json"
    if params is not None:
        path.write_text(json.dumps(params))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, str(REPO / script), "--params", str(path), *extra],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=300,
    )


def assert_one_line_error(result: subprocess.CompletedProcess, pattern: str) -> None:
    import re

    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert re.search(pattern, lines[0]), lines[0]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-gpt2")
    tiny_gpt2().save_pretrained(folder)
    return folder


def test_default_params_file_is_valid():
    params = load_params(REPO / "params.json")
    assert params.model.name == "smollm2-135m" and params.data.source == "austen"


@pytest.mark.parametrize(
    ("data", "pattern"),
    [
        ({"data": {"contxt_size": 64}}, r"unknown key 'data.contxt_size'; did you mean 'context_size'\?"),
        ({"buffr": {}}, r"unknown key 'buffr'; did you mean 'buffer'\?"),
        ({"data": {"context_size": -3}}, r"data.context_size: input should be greater than 0; found -3"),
        ({"data": {"context_size": "long"}}, r"data.context_size: input should be a valid integer.*found \"long\""),
        ({"model": {"dtype": "float8"}}, r"model.dtype: input should be 'auto', 'float32'.*found \"float8\""),
        ({"model": {"device": "tpu"}}, r"model.device: expected 'auto', 'cpu', 'cuda' or 'cuda:N', found 'tpu'"),
        ({"buffer": {"refill_fraction": 1.5}}, r"buffer.refill_fraction: input should be less than or equal to 1"),
        ([1, 2], r"expected a JSON object of sections"),
        (
            {"buffer": {"batch_size": True}},
            r"^params.json: buffer.batch_size: input should be a valid integer; found tr",
        ),
        ({"data": {"context_size": "64"}}, r"data.context_size: input should be a valid integer; found \"64\"$"),
        ({"data": {"context_size": 64.0}}, r"data.context_size: input should be a valid integer; found 64.0$"),
    ],
)
def test_bad_values_name_the_key(data, pattern):
    import re

    with pytest.raises(UserError) as caught:
        parse_params(data, source="params.json")
    assert re.search(pattern, str(caught.value)), str(caught.value)


def test_json_integers_are_accepted_for_float_fields():
    params = parse_params({"train": {"lr": 1, "max_grad_norm": 2}, "analysis": {"levels": [0.5, 1]}})
    assert params.train.lr == 1.0 and isinstance(params.train.lr, float) and params.analysis.levels == [0.5, 1.0]


def test_params_are_frozen():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="frozen"):
        Params().data.context_size = 3  # type: ignore[misc]


def test_script_rejects_misspelled_key(tmp_path):
    result = run_script("get_activations.py", {"data": {"contex_size": 64}}, tmp_path)
    assert_one_line_error(result, r"^error: .*params.json: unknown key 'data.contex_size'; did you mean 'context_size'")


def test_script_rejects_missing_params_file(tmp_path):
    result = run_script("get_activations.py", None, tmp_path)
    assert_one_line_error(result, r"params file .*params.json not found")


def test_script_rejects_invalid_json(tmp_path):
    (tmp_path / "params.json").write_text('{"model": }')
    result = run_script("get_activations.py", None, tmp_path)
    assert_one_line_error(result, r"params.json: params file is not valid JSON at line 1, column 11")
    (tmp_path / "params.json").write_text("[]")
    result = run_script("get_activations.py", None, tmp_path)
    assert_one_line_error(result, r"params.json: expected a JSON object of sections at the top level, found list")


def test_script_rejects_missing_text_files(tmp_path):
    result = run_script("get_activations.py", {"data": {"source": "files", "path": "nowhere/*.txt"}}, tmp_path)
    assert_one_line_error(result, r"data.path: no .txt/.jsonl/.csv/.parquet files found at 'nowhere/\*.txt'")


def test_script_rejects_bad_hook_and_layer(tmp_path, tiny_checkpoint):
    (tmp_path / "t.txt").write_text("some text")
    base = {"model": {"name": str(tiny_checkpoint)}, "data": {"source": "files", "path": str(tmp_path / "t.txt")}}
    result = run_script("get_activations.py", {**base, "hook": "blocks.1.hook_resid"}, tmp_path)
    assert_one_line_error(result, r"unknown hook name 'blocks.1.hook_resid'; valid for this model: blocks\.\{0\.\.2\}")
    result = run_script("get_activations.py", {**base, "hook": "blocks.9.hook_resid_post"}, tmp_path)
    assert_one_line_error(
        result, r"hook: layer 9 out of range in 'blocks.9.hook_resid_post'; this model has layers 0\.\.2"
    )


def test_script_rejects_unreachable_hub_model(tmp_path):
    (tmp_path / "t.txt").write_text("some text")
    params = {"model": {"name": "EleutherAI/pythia-70m-deduped"}, "data": {"source": "files", "path": "t.txt"}}
    result = run_script("get_activations.py", params, tmp_path)
    assert_one_line_error(result, r"model.name: could not load 'EleutherAI/pythia-70m-deduped'.*smollm2-135m")
    assert not any(tmp_path.glob("data/activations/*"))


def test_an_unreachable_hub_fails_at_once_in_one_line(tmp_path):
    from tests.test_feature_db import free_port

    (tmp_path / "t.txt").write_text("some text")
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens: the hub is down, whatever this machine's network
    (tmp_path / "params.json").write_text(
        json.dumps({"model": {"name": "nobody/no-such-model"}, "data": {"source": "files", "path": "t.txt"}})
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_ENDPOINT": endpoint, "HF_HOME": str(tmp_path / "hf")}
    env.pop("HF_HUB_OFFLINE", None)
    result = subprocess.run(
        [sys.executable, str(REPO / "get_activations.py"), "--params", "params.json"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=300,
    )
    assert_one_line_error(
        result,
        rf"^error: model.name: could not load 'nobody/no-such-model': not a local folder, not in the local Hugging "
        rf"Face cache, and the hub at {endpoint} cannot be reached \(.*\); use 'smollm2-135m' to run offline$",
    )


def test_a_hub_that_answers_is_used():
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    from dictlearn.lm.models import hub_unreachable

    class NotFound(BaseHTTPRequestHandler):
        def do_HEAD(self):
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args):
            pass

    with HTTPServer(("127.0.0.1", 0), NotFound) as server:
        threading.Thread(target=server.handle_request, daemon=True).start()
        assert hub_unreachable(f"http://127.0.0.1:{server.server_port}") is None
