"""The server is safe to leave running: web pages cannot drive it (Host and Origin checks,
CORS), an API key locks it when asked, idle and slow connections are closed, bad input is
a bounded 4xx, and start-up failures are one line. Real server, real clients."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import pytest
from server_proc import Server

httpx = pytest.importorskip("httpx")
ollama = pytest.importorskip("ollama")
openai = pytest.importorskip("openai")

KEY = "test-key-1234"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("security"), "--api-key", KEY, "--allowed-host", "my.box",
                 "--allowed-origin", "https://app.example", env={"MLXLLM_IDLE_TIMEOUT": "2"})
    yield srv
    srv.stop()


def get(server, path: str, **headers: str) -> httpx.Response:
    return httpx.get(server.url + path, headers={"Authorization": f"Bearer {KEY}", **headers}, timeout=30)


@pytest.mark.parametrize("host", ["evil.example", "evil.example:11434", "localhost.evil.example", "127.0.0.1.nip.io"])
def test_foreign_host_names_are_refused(server, host):
    r = get(server, "/api/version", Host=host)
    assert r.status_code == 403 and "is not allowed" in r.json()["error"]
    r = get(server, "/v1/models", Host=host)
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"


@pytest.mark.parametrize("host", ["localhost", "localhost:11434", "127.0.0.1:5", "[::1]:11434", "10.1.2.3",
                                  "my.box", "printer.local", socket.gethostname()])
def test_local_names_ip_literals_and_allowed_hosts_are_served(server, host):
    assert get(server, "/api/version", Host=host).status_code == 200


def test_cross_site_post_is_refused_before_any_work(server):
    # a page's no-preflight POST (text/plain) from another origin
    r = httpx.post(server.url + "/api/generate", content=b'{"model": "nope", "prompt": "hi"}',
                   headers={"Origin": "https://evil.example", "Content-Type": "text/plain",
                            "Authorization": f"Bearer {KEY}"}, timeout=30)
    assert r.status_code == 403 and "origin" in r.json()["error"]
    assert "Access-Control-Allow-Origin" not in r.headers


@pytest.mark.parametrize("origin", ["http://localhost:3000", "https://127.0.0.1", "app://obsidian.md",
                                    "vscode-webview://abc", "https://app.example"])
def test_allowed_origins_get_cors_headers_and_preflights(server, origin):
    r = get(server, "/api/version", Origin=origin)
    assert r.status_code == 200 and r.headers["Access-Control-Allow-Origin"] == origin
    r = httpx.options(server.url + "/v1/chat/completions", timeout=30,
                      headers={"Origin": origin, "Access-Control-Request-Method": "POST",
                               "Access-Control-Request-Headers": "authorization, content-type"})
    assert r.status_code == 204
    assert "POST" in r.headers["Access-Control-Allow-Methods"]
    assert "Authorization" in r.headers["Access-Control-Allow-Headers"]


def test_preflight_from_a_foreign_origin_is_refused(server):
    r = httpx.options(server.url + "/api/chat", headers={"Origin": "https://evil.example",
                                                         "Access-Control-Request-Method": "POST"}, timeout=30)
    assert r.status_code == 403 and "Access-Control-Allow-Origin" not in r.headers


def test_api_key_is_required_on_every_route_but_liveness(server):
    assert httpx.get(server.url + "/health", timeout=30).json()["status"] == "ok"
    assert httpx.get(server.url + "/", timeout=30).status_code == 200
    r = httpx.get(server.url + "/api/tags", timeout=30)
    assert r.status_code == 401 and "API key" in r.json()["error"]
    r = httpx.post(server.url + "/v1/chat/completions", json={}, headers={"Authorization": "Bearer wrong"}, timeout=30)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert get(server, "/api/tags").status_code == 200
    assert httpx.get(server.url + "/api/tags", headers={"x-api-key": KEY}, timeout=30).status_code == 200  # Anthropic's


def test_official_clients_with_the_key(server):
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert isinstance(openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0).models.list().data, list)
    with pytest.raises(ollama.ResponseError) as e:
        ollama.Client(host=server.url).list()
    assert e.value.status_code == 401
    assert ollama.Client(host=server.url, headers={"Authorization": f"Bearer {KEY}"}).list() is not None


def test_every_answer_names_its_request(server):
    a, b = get(server, "/api/version"), get(server, "/nope")
    assert len(a.headers["X-Request-Id"]) == 16 and a.headers["X-Request-Id"] != b.headers["X-Request-Id"]


def test_deeply_nested_json_is_a_400(server):
    for path in ("/api/chat", "/v1/chat/completions"):
        r = httpx.post(server.url + path, content=b"[" * 100_000 + b"]" * 100_000,
                       headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
        assert r.status_code == 400 and "nested too deeply" in json.dumps(r.json())


def test_error_texts_are_bounded(server):
    r = httpx.get(server.url + "/api/" + "x" * 6000, headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    assert r.status_code == 404 and len(r.json()["error"]) <= 1001


def test_idle_and_slow_connections_are_closed(server):
    host, port = server.url.removeprefix("http://").split(":")
    for first in (b"", b"GET / HTTP/1.1\r\nHost: localhost\r\n"):  # silent; headers never finished (slowloris)
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.sendall(first)
            started = time.time()
            assert s.recv(100) == b""  # closed by the server
            assert time.time() - started < 8


def test_a_slow_body_is_a_408(server):
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(f"POST /api/chat HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {KEY}\r\n"
                  "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{".encode())
        answer = s.recv(4096)
    assert b" 408 " in answer.split(b"\r\n")[0] and b"did not arrive within 4 s" in answer


def _serve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mlxllm", "serve", *args], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=120, check=False)


def test_port_in_use_is_one_line_with_the_fix(server):
    port = server.url.rsplit(":", 1)[1]
    out = _serve("--port", port)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1].startswith("error: cannot listen on")
    assert "--port" in out.stderr and "Traceback" not in out.stderr


def test_unknown_preload_is_one_line_before_taking_the_port():
    out = _serve("--port", "0", "--preload", "no-such-model")
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith("error: --preload no-such-model:")
    assert "serving on" not in out.stderr
