"""`mlxllm pull` and /api/pull against a real OCI registry on 127.0.0.1 (Debian's
docker-registry, the CNCF distribution server; tests/oci_registry.py) loaded with
Ollama-format manifests of the real SmolLM2 file: pull, run by name, list, rm, a transfer
killed and resumed, a tampered blob, hostile names and digests, concurrent pulls, the
server's pull/show/copy/delete; and the Hugging Face path against a local server that stands
in for the hub (this machine has no network), implementing the endpoints huggingface_hub uses."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from oci_registry import BINARY, Registry, Relay
from server_proc import Server

from mlxllm import pull as pull_module
from mlxllm.models import ModelNotFound, lookup, resolve
from mlxllm.pull import DigestMismatch, PullError, choose_gguf, pull
from mlxllm.store import InvalidDigest, InvalidName, ModelName, Store, StoreError

pytestmark = pytest.mark.skipif(BINARY is None, reason="docker-registry (Debian's CNCF distribution server) is not "
                                "installed: apt-get install docker-registry (scripts/test.sh does)")
SMOLLM2 = "smollm2:135m"
TINY = Path(__file__).parent / "fixtures" / "archs" / "llama-tied.q8_0.gguf"
# other small files, each its own blob in the registry (which shares blobs across repos, so
# the tampered-blob test's flipped byte in TINY's blob must not reach these)
ARCEE = Path(__file__).parent / "fixtures" / "archs" / "arcee.q8_0.gguf"
APERTUS = Path(__file__).parent / "fixtures" / "archs" / "apertus.q8_0.gguf"
SYSTEM = "Answer in French."
# A Go template of the form Ollama's older models use, which the server's render applies.
TEMPLATE = ("{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
            "<|im_start|>user\n{{ .Prompt }}<|im_end|>\n<|im_start|>assistant\n")
PARAMS = {"temperature": 0, "num_predict": 6, "stop": ["<|im_end|>"]}
PROMPT = ["Name one color.", "--max-tokens", "12", "--temperature", "0"]


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


@pytest.fixture(scope="module")
def gguf() -> Path:
    try:
        return Path(resolve(SMOLLM2))
    except ModelNotFound as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def registry(tmp_path_factory, gguf):
    reg = Registry(tmp_path_factory.mktemp("registry"))
    reg.plain = f"{reg.host}/library/smol:plain"
    reg.tuned = f"{reg.host}/library/smol:tuned"
    reg.manifests = {
        "plain": reg.push_model("library/smol", "plain", gguf),
        "tuned": reg.push_model("library/smol", "tuned", gguf, template=TEMPLATE, system=SYSTEM, params=PARAMS,
                                license_="Apache 2.0"),
    }
    yield reg
    reg.stop()


@pytest.fixture
def env(tmp_path, monkeypatch):
    """An empty store (and no Ollama store), for this process and the CLI's."""
    values = {"MLXLLM_MODELS": str(tmp_path / "store"), "OLLAMA_MODELS": str(tmp_path / "no-ollama"),
              "MLXLLM_NO_PROGRESS": "1"}
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    return values


def mlxllm(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mlxllm", *args], check=False, capture_output=True, text=True,
                          timeout=600, env={**os.environ, **env}, stdin=subprocess.DEVNULL)


def store_files(env: dict[str, str]) -> list[str]:
    root = Path(env["MLXLLM_MODELS"])
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) if root.exists() else []


def test_run_pulls_then_list_pull_again_rm(registry, env, gguf):
    # `run` pulls a model it does not have, as `ollama run` does, then answers as the same file does
    ran = mlxllm("run", registry.plain, *PROMPT, env=env)
    assert ran.returncode == 0, ran.stderr
    packaged = mlxllm("run", SMOLLM2, *PROMPT, env=env)
    assert ran.stdout == packaged.stdout and ran.stdout.strip()
    config = lookup(registry.plain)
    assert config.source == "store" and sha256_of(Path(config.path)) == sha256_of(gguf)

    again = mlxllm("pull", registry.plain, env=env)  # every blob is here: nothing is fetched
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == f"pulled {registry.plain} (98.4 MB)" and again.stderr == ""  # not a terminal: quiet
    listed = {r["name"]: r for r in json.loads(mlxllm("list", "--json", env=env).stdout)}
    digest = hashlib.sha256(json.dumps(registry.manifests["plain"]).encode()).hexdigest()
    assert listed[registry.plain]["id"] == digest[:12] and listed[registry.plain]["source"] == "store"

    removed = mlxllm("rm", registry.plain, env=env)
    assert removed.returncode == 0 and removed.stdout.strip() == f"deleted '{registry.plain}'"
    assert registry.plain not in mlxllm("list", env=env).stdout
    assert [f for f in store_files(env) if f.startswith("blobs/")] == []  # its blobs went with it
    missing = mlxllm("rm", registry.plain, env=env)
    assert missing.returncode == 1 and missing.stderr.startswith("error: ") and len(missing.stderr.splitlines()) == 1


def test_run_and_show_apply_a_pulled_manifest(registry, env):
    """`run` on a model whose manifest has a system prompt, `temperature 0` and `num_predict 6`:
    as the bare model given them on the command line (run's own defaults: temperature 0.8 with
    a random seed, 512 tokens); `show NAME` reports the manifest's template, system prompt,
    parameters and license."""
    prompt = ["Name one color.", "--local"]
    tuned = mlxllm("run", registry.tuned, *prompt, env=env)
    assert tuned.returncode == 0, tuned.stderr
    explicit = mlxllm("run", registry.plain, *prompt, "--max-tokens", "6", "--temperature", "0", "--system", SYSTEM,
                      env=env)
    longer = mlxllm("run", registry.plain, *prompt, "--max-tokens", "12", "--temperature", "0", "--system", SYSTEM,
                    env=env)
    bare = mlxllm("run", registry.plain, *prompt, "--max-tokens", "6", "--temperature", "0", env=env)
    assert tuned.stdout == explicit.stdout and tuned.stdout.strip()
    assert explicit.stdout not in (longer.stdout, bare.stdout)  # num_predict and the system prompt both tell

    def show(*args: str) -> str:
        shown = mlxllm("show", registry.tuned, *args, env=env)
        assert shown.returncode == 0, shown.stderr
        return shown.stdout

    assert show("--template") == TEMPLATE + "\n" and show("--system") == SYSTEM + "\n"
    assert show("--license") == "Apache 2.0\n"
    assert show("--parameters").splitlines() == ['temperature                    0', 'num_predict                    6',
                                                 'stop                           "<|im_end|>"']
    modelfile = show("--modelfile")
    assert f'SYSTEM """{SYSTEM}"""' in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile
    info = show()
    assert "architecture      llama" in info and SYSTEM in info
    plain = mlxllm("show", registry.plain, "--parameters", env=env).stdout  # no params layer: the file's own
    assert "temperature" not in plain and "stop" in plain


def test_insecure_is_plain_http(registry, env):
    """`--insecure` talks plain HTTP to a registry; without it HTTPS, except on a loopback
    address. `127.1` is 127.0.0.1 to the resolver but not to the loopback check, so here it
    stands for a registry on another host."""
    registry.push_model("library/plain-http", "x", ARCEE)
    name = f"127.1:{registry.port}/library/plain-http:x"
    refused = mlxllm("pull", name, env=env)
    assert refused.returncode == 1 and f"cannot reach https://127.1:{registry.port}" in refused.stderr
    assert len(refused.stderr.splitlines()) == 1
    pulled = mlxllm("pull", "--insecure", name, env=env)
    assert pulled.returncode == 0, pulled.stderr
    assert sha256_of(Path(lookup(name).path)) == sha256_of(ARCEE)


def test_progress_on_a_terminal(registry, env):
    pexpect = pytest.importorskip("pexpect")
    pull(registry.plain)
    child = pexpect.spawn(sys.executable, ["-m", "mlxllm", "pull", registry.plain], encoding="utf-8", timeout=120,
                          env={**os.environ, **env, "MLXLLM_NO_PROGRESS": ""}, dimensions=(24, 160))
    child.expect(pexpect.EOF)
    screen = child.before
    child.close()
    assert child.exitstatus == 0, screen
    model = registry.manifests["plain"]["layers"][0]
    assert "pulling manifest" in screen and f"pulling {model['digest'][7:19]}" in screen and "100%" in screen
    assert "verifying sha256 digest" in screen and "success" in screen


def test_a_killed_transfer_resumes(registry, env, gguf):
    relay = Relay(registry.port)
    try:
        name = f"{relay.host}/library/smol:plain"
        model = registry.manifests["plain"]["layers"][0]
        partial = Path(env["MLXLLM_MODELS"]) / "blobs" / (model["digest"].replace(":", "-") + "-partial")
        relay.stall_after = 40 << 20
        proc = subprocess.Popen([sys.executable, "-m", "mlxllm", "pull", name], env={**os.environ, **env},
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while time.time() < deadline and not (partial.exists() and partial.stat().st_size >= 40 << 20):
            time.sleep(0.1)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        have = partial.stat().st_size
        assert have == 40 << 20
        assert ModelName.parse(name) not in [e.name for e in Store(env["MLXLLM_MODELS"]).entries()]
        with pytest.raises(ModelNotFound):
            lookup(name)  # a partial download is not a model

        relay.stall_after = None
        resumed = mlxllm("pull", name, env=env)
        assert resumed.returncode == 0, resumed.stderr
        ranges = [r for r in relay.requests if model["digest"] in r.split("\r\n")[0]]
        assert f"Range: bytes={have}-" in ranges[-1]  # only the rest was fetched
        assert sha256_of(Path(lookup(name).path)) == sha256_of(gguf)
        assert not partial.exists()
    finally:
        relay.close()


def test_a_tampered_blob_never_becomes_a_model(registry, env):
    manifest = registry.push_model("library/tampered", "x", TINY)
    blob = registry.blob_file(manifest["layers"][0]["digest"])
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF  # the same size, one byte changed: only the digest can tell
    blob.write_bytes(bytes(data))
    name = f"{registry.host}/library/tampered:x"
    failed = mlxllm("pull", name, env=env)
    assert failed.returncode == 1
    assert "digest mismatch" in failed.stderr and len(failed.stderr.splitlines()) == 1
    assert not any("manifests" in f for f in store_files(env))
    assert not any(manifest["layers"][0]["digest"][7:] in f for f in store_files(env))  # neither final nor partial
    with pytest.raises(ModelNotFound):
        lookup(name)


class HostileRegistry:
    """A registry that serves whatever manifest or blob a test sets, for what the real one
    would refuse to store: hostile digests, lying sizes."""

    def __init__(self) -> None:
        self.manifest: bytes = b"{}"
        self.blobs: dict[str, bytes] = {}
        self.token: str | None = None  # set: Docker's bearer challenge, answered by GET /token
        self.seen: list[tuple[str, str | None]] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                outer.seen.append((self.path, self.headers.get("Authorization")))
                if self.path.startswith("/token?"):
                    body = json.dumps({"token": outer.token}).encode()
                elif outer.token and self.headers.get("Authorization") != f"Bearer {outer.token}":
                    realm = f"http://{outer.host}/token"
                    self.send_response(401)
                    self.send_header("WWW-Authenticate", f'Bearer realm="{realm}",service="test",'
                                                         f'scope="repository:library/x:pull"')
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                elif "/manifests/" in self.path:
                    body = outer.manifest
                else:
                    body = outer.blobs.get(self.path.rsplit("/", 1)[-1])
                    if body is None:
                        self.send_error(404)
                        return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.host = f"127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


HEX = "ab" * 32


@pytest.mark.parametrize("digest", ["sha256:../../../../evil", f"sha256:{HEX}/../../../../evil", f"md5:{HEX[:32]}",
                                    f"sha512:{HEX * 2}", f"sha256:{HEX.upper()}", f"sha256:{HEX[:62]}", "../evil",
                                    f"/tmp/evil-{HEX}", f"sha256-{HEX}"])
def test_hostile_digests_in_a_manifest(env, tmp_path, digest):
    hostile = HostileRegistry()
    try:
        for field in ("layers", "config"):
            layer = {"mediaType": "application/vnd.ollama.image.model", "digest": digest, "size": 4}
            good = {"mediaType": "application/vnd.ollama.image.model", "digest": "sha256:" + HEX, "size": 4}
            doc = {"schemaVersion": 2, "layers": [layer if field == "layers" else good]}
            if field == "config":
                doc["config"] = {"mediaType": "application/vnd.docker.container.image.v1+json", "digest": digest,
                                 "size": 4}
            hostile.manifest = json.dumps(doc).encode()
            with pytest.raises(PullError, match="invalid blob digest"):
                pull(f"{hostile.host}/library/evil:x")
        assert not list(tmp_path.rglob("*evil*"))
        assert not any(f.startswith(("blobs/", "manifests/")) for f in store_files(env))
    finally:
        hostile.close()


def test_hostile_blobs_and_manifests(env):
    hostile = HostileRegistry()
    try:
        data = b"GGUF and then some"
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        hostile.blobs[digest] = data
        layer = {"mediaType": "application/vnd.ollama.image.model", "digest": digest, "size": 4}
        hostile.manifest = json.dumps({"schemaVersion": 2, "layers": [layer]}).encode()
        with pytest.raises(PullError, match="longer than the manifest"):  # a blob past its size stops there
            pull(f"{hostile.host}/library/long:x")
        hostile.manifest = json.dumps({"schemaVersion": 2, "layers": [layer, layer]}).encode()
        with pytest.raises(PullError, match="exactly one model layer"):
            pull(f"{hostile.host}/library/two:x")
        hostile.manifest = b"not json"
        with pytest.raises(PullError, match="not JSON"):
            pull(f"{hostile.host}/library/junk:x")
        assert not any(f.startswith("manifests/") for f in store_files(env))
    finally:
        hostile.close()


def test_a_bearer_challenge_is_answered(env):
    """Docker's token flow, anonymously, as registries that require it for pulls expect."""
    hostile = HostileRegistry()
    try:
        data = TINY.read_bytes()
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        hostile.blobs[digest] = data
        hostile.manifest = json.dumps({"schemaVersion": 2, "layers": [
            {"mediaType": "application/vnd.ollama.image.model", "digest": digest, "size": len(data)}]}).encode()
        hostile.token = "t0k3n"
        entry = pull(f"{hostile.host}/library/x:y")
        assert Path(entry.model_path).read_bytes() == data
        assert ("/token?service=test&scope=repository%3Alibrary%2Fx%3Apull", None) in hostile.seen
        assert hostile.seen[-1] == (f"/v2/library/x/blobs/{digest}", "Bearer t0k3n")
    finally:
        hostile.close()


@pytest.mark.parametrize("name", ["../../etc/passwd", "/etc/passwd", "127.0.0.1:1/../x", "a/b/c/d", "x:../y"])
def test_hostile_names(env, name):
    with pytest.raises(InvalidName):
        pull(name)
    refused = mlxllm("pull", name, env=env)
    assert refused.returncode == 1 and "invalid model name" in refused.stderr
    assert store_files(env) == []


def test_concurrent_pulls_of_one_model(registry, env, gguf):
    results, errors = [], []

    def one() -> None:
        try:
            results.append(pull(registry.plain).model_path)
        except Exception as e:  # noqa: BLE001  (the test reports it)
            errors.append(e)

    threads = [threading.Thread(target=one) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert errors == [] and len(set(results)) == 1
    assert sha256_of(Path(results[0])) == sha256_of(gguf)
    assert not [f for f in store_files(env) if f.endswith("-partial")]
    assert len([f for f in store_files(env) if f.startswith("manifests/")]) == 1


def openers(path: Path) -> int:
    """How many of this process's file descriptors are open on `path`."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            count += os.readlink(f"/proc/self/fd/{fd}") == str(path)
    return count


def test_a_waiting_pull_locks_the_file_the_path_names(registry, env):
    """A pull waits on a blob's partial file while the pull holding it discards it (a digest
    mismatch unlinks it) and a third pull starts a new one: the waiter must wait for the new
    file, not keep its lock on the unlinked one and rename the third pull's half-written
    bytes into the blob's final name."""
    manifest = registry.push_model("library/race", "x", APERTUS)
    digest = manifest["layers"][0]["digest"]
    st = Store(env["MLXLLM_MODELS"])
    st.blobs.mkdir(parents=True)
    partial, final = st.partial_path(digest), st.blob_path(digest)
    first = open(partial, "ab+")  # noqa: SIM115  (the pull that will discard its file)
    fcntl.flock(first, fcntl.LOCK_EX)
    errors: list[Exception] = []

    def waiter() -> None:
        try:
            pull(f"{registry.host}/library/race:x")
        except Exception as e:  # noqa: BLE001  (the test reports it)
            errors.append(e)

    thread = threading.Thread(target=waiter)
    thread.start()
    deadline = time.time() + 60
    while openers(partial) < 2 and time.time() < deadline:  # the waiter has opened the same file
        time.sleep(0.02)
    assert openers(partial) == 2
    os.unlink(partial)
    third = open(partial, "ab+")  # noqa: SIM115  (a third pull, halfway)
    fcntl.flock(third, fcntl.LOCK_EX)
    third.write(b"half")
    third.flush()
    first.close()  # the discarding pull lets go
    time.sleep(1.5)
    assert thread.is_alive() and not final.exists()  # waiting on the third pull's file
    third.truncate(0)
    third.close()
    thread.join(120)
    assert errors == [] and sha256_of(final) == digest == sha256_of(APERTUS)
    assert not partial.exists()


@pytest.fixture
def server(env, tmp_path):
    srv = Server(tmp_path, env=env)
    yield srv
    srv.stop()


def test_server_pull_show_generate_copy_delete(registry, server):
    with httpx.stream("POST", server.url + "/api/pull", json={"model": registry.tuned}, timeout=300) as r:
        assert r.status_code == 200 and r.headers["content-type"] == "application/x-ndjson"
        events = [json.loads(line) for line in r.iter_lines() if line]
    assert events[0] == {"status": "pulling manifest"}
    assert [e["status"] for e in events[-3:]] == ["verifying sha256 digest", "writing manifest", "success"]
    manifest = registry.manifests["tuned"]
    layers = [manifest["config"], *manifest["layers"]]
    for layer in layers:
        mine = [e for e in events if e.get("digest") == layer["digest"]]
        assert mine and all(e["status"] == f"pulling {layer['digest'][7:19]}" and e["total"] == layer["size"]
                            for e in mine)
        done = [e["completed"] for e in mine]
        assert done == sorted(done) and done[-1] == layer["size"]

    tags = {m["name"]: m for m in httpx.get(server.url + "/api/tags").json()["models"]}
    assert tags[registry.tuned]["size"] == sum(x["size"] for x in layers)
    assert tags[registry.tuned]["digest"] == hashlib.sha256(json.dumps(manifest).encode()).hexdigest()
    shown = httpx.post(server.url + "/api/show", json={"model": registry.tuned}).json()
    assert shown["template"] == TEMPLATE and shown["system"] == SYSTEM and shown["license"] == "Apache 2.0"
    assert shown["parameters"].splitlines() == ['temperature                    0', 'num_predict                    6',
                                                'stop                           "<|im_end|>"']

    # the manifest's template, system prompt and parameters apply as Ollama applies them:
    # the same answer as the bare model given them in the request
    httpx.post(server.url + "/api/pull", json={"model": registry.plain, "stream": False}, timeout=300)
    tuned = httpx.post(server.url + "/api/generate", json={"model": registry.tuned, "prompt": "Name one color.",
                                                            "stream": False}, timeout=120).json()
    explicit = httpx.post(server.url + "/api/generate", json={
        "model": registry.plain, "prompt": "Name one color.", "stream": False, "template": TEMPLATE,
        "system": SYSTEM, "options": PARAMS}, timeout=120).json()
    bare = httpx.post(server.url + "/api/generate", json={
        "model": registry.plain, "prompt": "Name one color.", "stream": False, "options": {"temperature": 0}},
        timeout=120).json()
    assert tuned["response"] == explicit["response"] and tuned["eval_count"] <= 6
    assert tuned["response"] != bare["response"]

    # `mlxllm ps` and `stop` on the running server
    cli_env = {"MLXLLM_HOST": server.url, "MLXLLM_MODELS": os.environ["MLXLLM_MODELS"]}
    ps = mlxllm("ps", env=cli_env)
    assert ps.returncode == 0 and ps.stdout.split()[:5] == ["NAME", "ID", "SIZE", "PROCESSOR", "UNTIL"]
    assert registry.tuned in ps.stdout  # (the plain model is the same file, loaded once)
    assert mlxllm("stop", registry.tuned, env=cli_env).returncode == 0
    assert httpx.get(server.url + "/api/ps").json()["models"] == []

    copied = httpx.post(server.url + "/api/copy", json={"source": registry.tuned, "destination": "mine:copy"})
    assert copied.status_code == 200
    assert "mine:copy" in {m["name"] for m in httpx.get(server.url + "/api/tags").json()["models"]}
    deleted = httpx.request("DELETE", server.url + "/api/delete", json={"model": "mine:copy"})
    assert deleted.status_code == 200
    gone = httpx.request("DELETE", server.url + "/api/delete", json={"model": "mine:copy"})
    assert gone.status_code == 404 and "not found" in gone.json()["error"]
    for hostile in ("../../etc/passwd", "/etc/passwd", "a/b/c/d"):
        assert httpx.request("DELETE", server.url + "/api/delete", json={"model": hostile}).status_code == 400

    assert httpx.post(server.url + "/api/pull", json={"model": "../../etc/passwd"}).status_code == 400
    nope = f"{registry.host}/library/smol:nope"
    unknown = httpx.post(server.url + "/api/pull", json={"model": nope, "stream": False})
    assert unknown.status_code == 404 and "not found" in unknown.json()["error"]
    streamed = [json.loads(x) for x in httpx.post(server.url + "/api/pull", json={"model": nope}).text.splitlines()]
    assert streamed[0] == {"status": "pulling manifest"} and "not found" in streamed[-1]["error"]  # as Ollama streams it
    assert httpx.post(server.url + "/api/copy", json={"source": "nope:x", "destination": "y"}).status_code == 404
    assert httpx.post(server.url + "/api/copy", json={"source": registry.tuned,
                                                      "destination": "../x"}).status_code == 400

    # `insecure`: plain HTTP to a registry that is not on a loopback name (see test_insecure_is_plain_http)
    registry.push_model("library/plain-http", "x", ARCEE)
    elsewhere = f"127.1:{registry.port}/library/plain-http:x"
    https = httpx.post(server.url + "/api/pull", json={"model": elsewhere, "stream": False}, timeout=60)
    assert https.status_code == 502 and "cannot reach https://" in https.json()["error"]
    plain = httpx.post(server.url + "/api/pull", json={"model": elsewhere, "stream": False, "insecure": True},
                       timeout=60)
    assert plain.json() == {"status": "success"}
    assert elsewhere in {m["name"] for m in httpx.get(server.url + "/api/tags").json()["models"]}


def test_ollamas_client_pulls_lists_shows_copies_deletes(registry, server):
    ollama = pytest.importorskip("ollama")
    client = ollama.Client(host=server.url)
    progress = list(client.pull(registry.plain, insecure=True, stream=True))
    assert progress[0].status == "pulling manifest" and progress[-1].status == "success"
    assert any(p.total and p.completed == p.total for p in progress)
    assert registry.plain in [m.model for m in client.list().models]
    shown = client.show(registry.plain)
    assert shown.details.family == "llama" and shown.modelinfo["general.architecture"] == "llama"
    client.copy(registry.plain, "copied:one")
    assert "copied:one" in [m.model for m in client.list().models]
    client.delete("copied:one")
    with pytest.raises(ollama.ResponseError) as e:
        client.delete("copied:one")
    assert e.value.status_code == 404
    with pytest.raises(ollama.ResponseError):
        list(client.pull(f"{registry.host}/library/smol:nope", insecure=True, stream=True))


# --- Hugging Face: a local server stands in for the hub (no network here) ---


class HubStandIn:
    """The endpoints huggingface_hub's model_info and hf_hub_download use: GET
    /api/models/ORG/REPO (siblings with LFS sha256), HEAD and GET (with Range)
    /ORG/REPO/resolve/REVISION/FILE. `cut_after`: the first GET ends after that many bytes."""

    COMMIT = "c0ffee" * 6 + "c0ff"

    def __init__(self, files: dict[str, Path], lfs_sha256: dict[str, str] | None = None) -> None:
        from aiohttp import web

        self.files, self.requests, self.cut_after = files, [], None
        self.lfs = lfs_sha256 or {name: sha256_of(path)[7:] for name, path in files.items()}

        async def info(request):
            self.requests.append(("info", request.path_qs, None))
            siblings = [{"rfilename": "README.md", "size": 10}]
            siblings += [{"rfilename": n, "size": p.stat().st_size,
                          "lfs": {"sha256": self.lfs[n], "size": p.stat().st_size, "pointerSize": 134}}
                         for n, p in self.files.items()]
            return web.json_response({"id": request.match_info["org"] + "/" + request.match_info["repo"],
                                      "sha": self.COMMIT, "private": False, "siblings": siblings})

        async def resolve_file(request):
            self.requests.append((request.method, request.path, request.headers.get("Range")))
            path = self.files.get(request.match_info["file"])
            if path is None:
                return web.json_response({"error": "Entry not found"}, status=404)
            headers = {"X-Repo-Commit": self.COMMIT, "ETag": f'"{self.lfs[request.match_info["file"]]}"'}
            if request.method == "GET" and self.cut_after is not None and "Range" not in request.headers:
                cut, self.cut_after = self.cut_after, None
                response = web.StreamResponse(headers={**headers, "Content-Length": str(path.stat().st_size)})
                await response.prepare(request)
                await response.write(path.read_bytes()[:cut])
                request.transport.close()  # the connection drops mid-file
                return response
            return web.FileResponse(path, headers=headers)

        app = web.Application()
        app.router.add_get("/api/models/{org}/{repo}", info)
        app.router.add_get("/api/models/{org}/{repo}/revision/{rev}", info)
        app.router.add_get("/{org}/{repo}/resolve/{rev}/{file}", resolve_file)
        self.loop = asyncio.new_event_loop()
        self.runner = web.AppRunner(app)
        self.loop.run_until_complete(self.runner.setup())
        self.loop.run_until_complete(web.TCPSite(self.runner, "127.0.0.1", 0).start())
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}"
        threading.Thread(target=self.loop.run_forever, daemon=True).start()

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)


HF_FILES = {"SmolLM2-135M-Instruct-Q4_1.gguf": None, "SmolLM2-135M-Instruct-Q8_0.gguf": TINY}


@pytest.fixture
def hub(gguf):
    pytest.importorskip("huggingface_hub")
    stand_in = HubStandIn({**HF_FILES, "SmolLM2-135M-Instruct-Q4_1.gguf": gguf})
    yield stand_in
    stand_in.close()


def test_hf_pull_by_quant(hub, env, gguf):
    events = []
    entry = pull("hf.co/org/SmolLM2-135M-Instruct-GGUF:Q4_1", progress=events.append, hf_endpoint=hub.url)
    assert str(entry.name) == "hf.co/org/SmolLM2-135M-Instruct-GGUF:Q4_1"
    config = lookup("hf.co/org/SmolLM2-135M-Instruct-GGUF:Q4_1")
    assert config.source == "store" and sha256_of(Path(config.path)) == sha256_of(gguf)
    assert events[0] == {"status": "pulling manifest"} and events[-1] == {"status": "success"}
    assert max(e.get("completed", 0) for e in events) == gguf.stat().st_size
    assert not (Path(env["MLXLLM_MODELS"]) / "partial-hf").exists() or \
        not any((Path(env["MLXLLM_MODELS"]) / "partial-hf").iterdir())
    # the CLI takes the hub from HF_ENDPOINT, as huggingface_hub does
    cli = mlxllm("pull", "hf.co/org/SmolLM2-135M-Instruct-GGUF:q8_0", env={**env, "HF_ENDPOINT": hub.url})
    assert cli.returncode == 0, cli.stderr
    assert sha256_of(Path(lookup("hf.co/org/SmolLM2-135M-Instruct-GGUF:q8_0").path)) == sha256_of(TINY)


def test_hf_interrupted_download_resumes(hub, env, gguf):
    hub.cut_after = 30 << 20
    try:
        pull("hf.co/org/repo:Q4_1", hf_endpoint=hub.url)
    except PullError:  # huggingface_hub may give up on the dropped connection: a second pull resumes
        pull("hf.co/org/repo:Q4_1", hf_endpoint=hub.url)
    gets = [r for r in hub.requests if r[0] == "GET" and r[1].endswith("Q4_1.gguf")]
    assert gets[0][2] is None and gets[-1][2] == f"bytes={30 << 20}-"
    assert sha256_of(Path(lookup("hf.co/org/repo:Q4_1").path)) == sha256_of(gguf)


def test_hf_digest_mismatch(env, gguf):
    pytest.importorskip("huggingface_hub")
    hub = HubStandIn({"m-Q8_0.gguf": TINY}, {"m-Q8_0.gguf": "00" * 32})  # the hub's LFS sha256 disagrees
    try:
        with pytest.raises(DigestMismatch, match="digest mismatch"):
            pull("hf.co/org/repo:Q8_0", hf_endpoint=hub.url)
        assert store_files(env) == [".lock"]
        with pytest.raises(ModelNotFound):
            lookup("hf.co/org/repo:Q8_0")
    finally:
        hub.close()


@pytest.mark.parametrize("files,quant,chosen", [
    (["a-Q4_K_M.gguf", "a-Q8_0.gguf", "README.md"], "latest", "a-Q4_K_M.gguf"),
    (["a-Q4_K_M.gguf", "a-Q8_0.gguf"], "q8_0", "a-Q8_0.gguf"),
    (["a.Q4_K_S.gguf", "a.Q4_K_M.gguf"], "Q4_K", None),
    (["only-f16.gguf"], "latest", "only-f16.gguf"),
    (["a-Q4_0.gguf", "mmproj-a-f16.gguf"], "latest", "a-Q4_0.gguf"),
    (["a-Q4_K_M-00001-of-00002.gguf", "a-Q4_K_M-00002-of-00002.gguf"], "Q4_K_M", None),
    # a hub's file names become paths under the download folder: none that leaves it
    (["../../evil-Q4_K_M.gguf", "/tmp/evil-Q4_K_M.gguf", "a/../../evil-Q4_K_M.gguf", "a-Q8_0.gguf"], "Q4_K_M", None),
    (["../evil-Q4_K_M.gguf", "sub/a-Q4_K_M.gguf"], "latest", "sub/a-Q4_K_M.gguf"),
    (["..\\evil-Q8_0.gguf"], "latest", None),
])
def test_choose_gguf(files, quant, chosen):
    if chosen is None:
        with pytest.raises(PullError):
            choose_gguf(files, quant)
    else:
        assert choose_gguf(files, quant) == chosen


def test_errors_are_one_line(env):
    no_registry = mlxllm("pull", "127.0.0.1:9/library/x:y", env=env)  # port 9: nothing listens
    assert no_registry.returncode == 1 and "cannot reach" in no_registry.stderr
    assert len(no_registry.stderr.splitlines()) == 1
    assert issubclass(InvalidDigest, ValueError) and issubclass(StoreError, ValueError)
    assert pull_module.is_loopback("127.0.0.1") and not pull_module.is_loopback("example.com")
