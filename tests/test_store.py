"""The store (mlxllm/store.py): names and digests checked before they become paths, manifests
checked before use, writes atomic, rm pruning only unused blobs; and an Ollama-layout store
made here (manifests + blobs) listed and run in place, never written to."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mlxllm import models, store
from mlxllm.models import ModelNotFound, resolve
from mlxllm.store import (
    CONFIG_V1,
    MODEL,
    PARAMS,
    SYSTEM,
    TEMPLATE,
    InvalidDigest,
    InvalidName,
    Layer,
    Manifest,
    ModelName,
    Store,
    StoreError,
    check_digest,
    manifest_json,
)

HEX = "0123456789abcdef" * 4


@pytest.fixture
def stores(tmp_path, monkeypatch):
    """Empty stores of our own and Ollama's, in tmp_path."""
    monkeypatch.setenv("MLXLLM_MODELS", str(tmp_path / "mlxllm"))
    monkeypatch.setenv("OLLAMA_MODELS", str(tmp_path / "ollama"))
    return tmp_path


@pytest.mark.parametrize("text,parts", [
    ("smollm2", ("registry.ollama.ai", "library", "smollm2", "latest")),
    ("smollm2:135m", ("registry.ollama.ai", "library", "smollm2", "135m")),
    ("me/mine:q4", ("registry.ollama.ai", "me", "mine", "q4")),
    ("example.com:5000/team/model:v1.2", ("example.com:5000", "team", "model", "v1.2")),
    ("127.0.0.1:5000/tiny:1b", ("127.0.0.1:5000", "library", "tiny", "1b")),
    ("hf.co/bartowski/SmolLM2-135M-Instruct-GGUF:Q4_K_M",
     ("hf.co", "bartowski", "SmolLM2-135M-Instruct-GGUF", "Q4_K_M")),
    ("huggingface.co/org/repo", ("hf.co", "org", "repo", "latest")),
])
def test_names_parse(text, parts):
    assert ModelName.parse(text).parts == parts


def test_names_show_as_ollama_does():
    assert str(ModelName.parse("registry.ollama.ai/library/qwen3:0.6b")) == "qwen3:0.6b"
    assert str(ModelName.parse("qwen3")) == "qwen3:latest"
    assert str(ModelName.parse("me/mine")) == "me/mine:latest"
    assert str(ModelName.parse("hf.co/org/repo:Q8_0")) == "hf.co/org/repo:Q8_0"


HOSTILE_NAMES = ["", "..", "../x", "../../etc/passwd", "/etc/passwd", "a/../../b", "x:../../y", "x:..",
                 "library/..", "./x", "a/b/c/d", "a//b", "x:", ":tag", "x\0y", "x y", "x\\..\\y",
                 "host/ns/..:t", "-rf", "a" * 600, "x:a/b", "~/x", "%2e%2e/x"]


@pytest.mark.parametrize("text", HOSTILE_NAMES)
def test_hostile_names_are_refused(text):
    with pytest.raises(InvalidName):
        ModelName.parse(text)


HOSTILE_DIGESTS = ["sha256:../../../etc/passwd", f"sha256:{HEX[:63]}", f"sha256:{HEX}0", f"sha256:{HEX.upper()}",
                   f"md5:{HEX[:32]}", f"sha512:{HEX * 2}", f"sha256-{HEX}", f"SHA256:{HEX}", f"sha256:{HEX}/../x",
                   f"sha256:{HEX}\n", f"/sha256:{HEX}", "", None, 5, f"sha256:{HEX[:60]}/../"]


@pytest.mark.parametrize("digest", HOSTILE_DIGESTS)
def test_hostile_digests_are_refused(digest, tmp_path):
    with pytest.raises(InvalidDigest):
        check_digest(digest)
    with pytest.raises(InvalidDigest):
        Store(tmp_path).blob_path(digest)
    manifest = {"schemaVersion": 2, "layers": [{"mediaType": MODEL, "digest": digest, "size": 1}]}
    with pytest.raises(InvalidDigest):
        Manifest.parse(json.dumps(manifest).encode())


@pytest.mark.parametrize("doc,message", [
    ({"schemaVersion": 1, "layers": []}, "not an image manifest"),
    ({"schemaVersion": 2}, "not an image manifest"),
    ({"schemaVersion": 2, "layers": [{"mediaType": TEMPLATE, "digest": f"sha256:{HEX}", "size": 1}]},
     "exactly one model layer"),
    ({"schemaVersion": 2, "layers": [{"mediaType": MODEL, "digest": f"sha256:{HEX}", "size": -1}]}, "byte count"),
    ({"schemaVersion": 2, "layers": [{"mediaType": MODEL, "digest": f"sha256:{HEX}", "size": "9"}]}, "byte count"),
    ({"schemaVersion": 2, "layers": ["x"]}, "not an object"),
    ([1, 2], "not an image manifest"),
])
def test_bad_manifests_are_refused(doc, message):
    with pytest.raises(StoreError, match=message):
        Manifest.parse(json.dumps(doc).encode())
    with pytest.raises(StoreError, match="at most"):
        Manifest.parse(b" " * (store.MAX_MANIFEST_BYTES + 1))


def make_model(st: Store, name: str, gguf: bytes, system: str | None = None, params: dict | None = None) -> Layer:
    model = st.add_blob_bytes(gguf, MODEL)
    extra = [st.add_blob_bytes(system.encode(), SYSTEM)] if system else []
    if params:
        extra.append(st.add_blob_bytes(json.dumps(params).encode(), PARAMS))
    st.write_manifest(ModelName.parse(name), manifest_json(model, st.add_blob_bytes(b"{}", CONFIG_V1), extra))
    return model


def test_write_list_copy_remove_prune(stores):
    st = store.local_store()
    shared = make_model(st, "one:a", b"GGUF-one", system="Be brief.", params={"temperature": 0.5})
    make_model(st, "two:b", b"GGUF-two")
    assert [str(e.name) for e in st.entries()] == ["one:a", "two:b"]
    config = models.lookup("one:a")
    assert (config.source, config.system, config.params) == ("store", "Be brief.", {"temperature": 0.5})
    assert Path(config.path).read_bytes() == b"GGUF-one"
    assert config.digest == st.find(ModelName.parse("one:a")).manifest.digest
    assert "one:a" in models.available() and "two:b" in models.available()

    st.copy(st.find(ModelName.parse("one:a")), ModelName.parse("me/three:c"))
    assert models.lookup("me/three:c").path == config.path  # the same blob, one copy on disk
    st.remove(ModelName.parse("one:a"))
    assert st.blob_path(shared.digest).is_file()  # me/three:c still uses it
    st.remove(ModelName.parse("me/three:c"))
    assert not st.blob_path(shared.digest).exists()
    assert not (st.manifests / "registry.ollama.ai" / "me").exists()  # empty folders go too
    with pytest.raises(StoreError, match="not found"):
        st.remove(ModelName.parse("one:a"))
    with pytest.raises(ModelNotFound, match="mlxllm pull one:a"):
        resolve("one:a")


def test_prune_waits_for_pulls(stores):
    """A pull holds the store shared: pruning then keeps its blobs, whose manifest is not
    written yet."""
    st = store.local_store()
    orphan = st.add_blob_bytes(b"a pull's blob", MODEL)
    with st.lock(exclusive=False):
        assert st.prune() == 0
        assert st.blob_path(orphan.digest).is_file()
    assert st.prune() == 1
    assert not st.blob_path(orphan.digest).exists()


def test_partial_and_incomplete_models_are_not_models(stores):
    st = store.local_store()
    model = make_model(st, "half:a", b"GGUF-half")
    st.blob_path(model.digest).rename(st.partial_path(model.digest))
    assert store.find("half:a") is None
    assert "half:a" not in models.available()
    with pytest.raises(ModelNotFound):
        models.lookup("half:a")


def test_a_manifest_write_is_atomic(stores, monkeypatch):
    st = store.local_store()
    make_model(st, "keep:a", b"GGUF-old")
    before = st.manifest_path(ModelName.parse("keep:a")).read_bytes()

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(OSError, match="disk full"):
        make_model(st, "keep:a", b"GGUF-new")
    assert st.manifest_path(ModelName.parse("keep:a")).read_bytes() == before
    assert [p.name for p in st.manifest_path(ModelName.parse("keep:a")).parent.iterdir()] == ["a"]


def test_strays_in_the_manifests_folder_are_not_models(stores):
    st = store.local_store()
    make_model(st, "real:a", b"GGUF")
    (st.manifests / "registry.ollama.ai" / "library" / "real" / "notjson").write_text("{")
    (st.manifests / "registry.ollama.ai" / "library" / "..x").mkdir()
    (st.manifests / "registry.ollama.ai" / "library" / "..x" / "t").write_bytes(
        st.manifest_path(ModelName.parse("real:a")).read_bytes())
    assert [str(e.name) for e in st.entries()] == ["real:a"]


def test_store_locations(tmp_path, monkeypatch):
    """Ours at ~/.mlxllm/models and Ollama's at ~/.ollama/models unless MLXLLM_MODELS and
    OLLAMA_MODELS move them; one folder named by both is one store, ours."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("MLXLLM_MODELS", raising=False)
    monkeypatch.delenv("OLLAMA_MODELS", raising=False)
    assert [(s.root, s.writable) for s in store.stores()] == [(tmp_path / ".mlxllm" / "models", True),
                                                              (tmp_path / ".ollama" / "models", False)]
    monkeypatch.setenv("MLXLLM_MODELS", str(tmp_path / "mine"))
    monkeypatch.setenv("OLLAMA_MODELS", str(tmp_path / "theirs"))
    assert [s.root for s in store.stores()] == [tmp_path / "mine", tmp_path / "theirs"]
    monkeypatch.setenv("OLLAMA_MODELS", str(tmp_path / "mine"))
    assert [(s.root, s.writable) for s in store.stores()] == [(tmp_path / "mine", True)]


# --- an Ollama store, read in place ---

SMOLLM2 = "smollm2:135m"


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def ollama_layout(root: Path, name: str, gguf: Path, system: str | None = None) -> str:
    """An Ollama store as `ollama pull` leaves it: blobs/sha256-HEX, manifests/HOST/NS/MODEL/TAG."""
    blobs = root / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    digest = file_digest(gguf)
    shutil.copyfile(gguf, blobs / digest.replace(":", "-"))
    layers = [{"mediaType": MODEL, "digest": digest, "size": gguf.stat().st_size}]
    if system:
        data = system.encode()
        sd = "sha256:" + hashlib.sha256(data).hexdigest()
        (blobs / sd.replace(":", "-")).write_bytes(data)
        layers.append({"mediaType": SYSTEM, "digest": sd, "size": len(data)})
    config = b'{"model_format":"gguf","model_family":"llama"}'
    cd = "sha256:" + hashlib.sha256(config).hexdigest()
    (blobs / cd.replace(":", "-")).write_bytes(config)
    n = ModelName.parse(name)
    path = root / "manifests" / n.host / n.namespace / n.model / n.tag
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
                                "config": {"mediaType": CONFIG_V1, "digest": cd, "size": len(config)},
                                "layers": layers}))
    return digest


def tree(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def mlxllm(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mlxllm", *args], check=False, capture_output=True, text=True,
                          timeout=300,
                          env={**os.environ, **env}, stdin=subprocess.DEVNULL)


def test_an_ollama_store_is_listed_and_run_in_place(tmp_path):
    try:
        gguf = Path(resolve(SMOLLM2))
    except ModelNotFound as e:
        pytest.skip(str(e))
    ollama_root = tmp_path / "ollama"
    digest = ollama_layout(ollama_root, "smol:in-place", gguf)
    ollama_layout(ollama_root, "someone/smol:sys", gguf, system="Answer in French.")
    env = {"MLXLLM_MODELS": str(tmp_path / "mlxllm"), "OLLAMA_MODELS": str(ollama_root), "MLXLLM_NO_PROGRESS": "1"}
    before = tree(ollama_root)

    listing = mlxllm("list", "--json", env=env)
    assert listing.returncode == 0, listing.stderr
    rows = {r["name"]: r for r in json.loads(listing.stdout)}
    assert rows["smol:in-place"]["source"] == "ollama"
    assert rows["smol:in-place"]["path"] == str(ollama_root / "blobs" / digest.replace(":", "-"))  # not a copy
    assert rows["someone/smol:sys"]["size"] > gguf.stat().st_size
    text = mlxllm("list", env=env).stdout
    assert text.splitlines()[0].split() == ["NAME", "ID", "SIZE", "MODIFIED"] and "smol:in-place" in text

    prompt = ["Name one color.", "--max-tokens", "12", "--temperature", "0"]
    ran = mlxllm("run", "smol:in-place", *prompt, env=env)
    assert ran.returncode == 0, ran.stderr
    packaged = mlxllm("run", SMOLLM2, *prompt, env=env)
    assert ran.stdout == packaged.stdout and ran.stdout.strip()
    # its SYSTEM layer applies as --system does
    with_system = mlxllm("run", "someone/smol:sys", *prompt, env=env)
    explicit = mlxllm("run", SMOLLM2, *prompt, "--system", "Answer in French.", env=env)
    assert with_system.stdout == explicit.stdout != packaged.stdout

    refused = mlxllm("rm", "smol:in-place", env=env)
    assert refused.returncode == 1 and "ollama rm" in refused.stderr and len(refused.stderr.splitlines()) == 1
    copied = mlxllm("cp", "smol:in-place", "mine:copy", env=env)  # a copy of it is ours, the blob linked
    assert copied.returncode == 0, copied.stderr
    rows = {r["name"]: r for r in json.loads(mlxllm("list", "--json", env=env).stdout)}
    assert rows["mine:copy"]["source"] == "store"
    assert Path(rows["mine:copy"]["path"]).parent == tmp_path / "mlxllm" / "blobs"
    assert rows["mine:copy"]["id"] == rows["smol:in-place"]["id"]  # the same manifest
    assert tree(ollama_root) == before  # read in place: nothing written there
