"""Names, not paths, over HTTP (issue 19): a request's model resolves only to names the
server knows (the models folder, `--models-dir` folders, the stores, model packages,
`--preload`), and a route parameter never reaches the filesystem. The command line still
takes paths."""

from __future__ import annotations

import http.client
import shutil
from pathlib import Path

import httpx
import pytest
from server_proc import Server

from mlxllm.models import lookup
from mlxllm.server.common import ApiError
from mlxllm.server.pool import model_config, serve_names

FIXTURES = Path(__file__).parent / "fixtures" / "archs"
SERVED = FIXTURES / "llama-tied.q8_0.gguf"  # small; copied into a served folder
OUTSIDE = FIXTURES / "gemma.q8_0.gguf"  # a real GGUF in no served folder
HOSTILE = ["/etc/passwd", "../../x", "../../../../etc/passwd", str(OUTSIDE), "~/.ssh/id_rsa", "/dev/zero",
           "/proc/self/environ", "x\0y", "a" * 5000, "%2e%2e/%2e%2e/etc/passwd", ".", "..", "/", "served/../x"]


@pytest.fixture
def folder(tmp_path, monkeypatch):
    monkeypatch.setenv("MLXLLM_MODELS", str(tmp_path / "store"))
    monkeypatch.setenv("OLLAMA_MODELS", str(tmp_path / "ollama"))
    served = tmp_path / "served"
    served.mkdir()
    shutil.copyfile(SERVED, served / "tiny.gguf")
    yield served
    serve_names()


@pytest.mark.parametrize("name", HOSTILE)
def test_a_path_is_not_a_name(folder, name):
    serve_names((str(folder),))
    with pytest.raises(ApiError) as e:
        model_config(name)
    assert e.value.status == 404
    assert len(e.value.message) < 2000


def test_served_folders_and_operator_names(folder):
    serve_names((str(folder),), (str(OUTSIDE),))
    assert model_config("tiny").path == str(folder.resolve() / "tiny.gguf")
    assert model_config("tiny.gguf").path == model_config(str(folder / "tiny.gguf")).path
    assert model_config(str(OUTSIDE)).path == str(OUTSIDE)  # --preload PATH: the operator's
    serve_names()
    with pytest.raises(ApiError):
        model_config("tiny")
    assert lookup(str(OUTSIDE)).path == str(OUTSIDE)  # the command line takes paths


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("names")
    served = tmp / "served"
    served.mkdir()
    shutil.copyfile(SERVED, served / "tiny.gguf")
    srv = Server(tmp, "--models-dir", str(served), "--preload", str(OUTSIDE),
                 env={"MLXLLM_MODELS": str(tmp / "store"), "OLLAMA_MODELS": str(tmp / "ollama")})
    yield srv
    srv.stop()


def raw_get(server, path: str) -> tuple[int, bytes]:
    """GET with the path exactly as written (no client normalizes its dots)."""
    host, port = server.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("GET", path)
    r = conn.getresponse()
    return r.status, r.read()


@pytest.mark.parametrize("route,key", [("/api/generate", "model"), ("/api/chat", "model"), ("/api/show", "model"),
                                       ("/api/embed", "model"), ("/v1/chat/completions", "model"),
                                       ("/v1/completions", "model"), ("/v1/embeddings", "model")])
@pytest.mark.parametrize("name", ["/etc/passwd", "../../x", str(SERVED), "/etc/shadow"])
def test_requests_cannot_name_files(server, route, key, name):
    body = {key: name, "prompt": "hi", "messages": [{"role": "user", "content": "hi"}], "input": "hi"}
    r = httpx.post(server.url + route, json=body, timeout=60)
    assert r.status_code == 404, r.text
    assert "root:" not in r.text and "magic" not in r.text  # nothing read from the file
    assert "pytest-of" not in r.text  # nor a server path told


@pytest.mark.parametrize("path", ["/v1/models/../../etc/passwd", "/v1/models/..%2F..%2Fetc%2Fpasswd",
                                  "/v1/models/%2Fetc%2Fpasswd", "/v1/models//etc/passwd",
                                  "/v1/models/" + "%2E%2E%2F" * 8 + "etc%2Fpasswd"])
def test_route_parameters_never_reach_the_filesystem(server, path):
    status, body = raw_get(server, path)
    assert status == 404, body
    assert b"root:" not in body


def test_served_names_answer(server):
    tags = {m["name"] for m in httpx.get(server.url + "/api/tags").json()["models"]}
    assert {"tiny", str(OUTSIDE)} <= tags
    models = {m["id"] for m in httpx.get(server.url + "/v1/models").json()["data"]}
    assert {"tiny", str(OUTSIDE)} <= models
    assert httpx.get(server.url + "/v1/models/tiny").json()["id"] == "tiny"
    shown = httpx.post(server.url + "/api/show", json={"model": "tiny"})
    assert shown.status_code == 200 and shown.json()["details"]["family"] == "llama"
    r = httpx.post(server.url + "/api/generate", json={"model": "tiny", "prompt": "hi", "stream": False,
                                                        "options": {"num_predict": 2}}, timeout=120)
    assert r.status_code == 200 and r.json()["eval_count"] >= 1
