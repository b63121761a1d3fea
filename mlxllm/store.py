"""The content-addressed model store, in Ollama's layout, so one reader serves both ours and
an existing Ollama store read in place:

    ROOT/manifests/HOST/NAMESPACE/MODEL/TAG   an OCI image manifest (JSON) naming layers by digest
    ROOT/blobs/sha256-HEX                     each layer (the GGUF, template, params...) by its sha256

Ours is `MLXLLM_MODELS` (default ~/.mlxllm/models, which also holds loose .gguf files);
Ollama's is `OLLAMA_MODELS` (default ~/.ollama/models), never written to.

Safety: a name becomes a path only after every component matched a strict pattern, and a
digest only as `sha256:` and 64 lowercase hex digits (Ollama's CVE-2024-37032 was a digest
that walked out of the blobs folder); a blob gets its final name only once its bytes hashed
to its digest (pull.py), and a manifest is written last, atomically."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

DEFAULT_HOST = "registry.ollama.ai"
DEFAULT_NAMESPACE = "library"
DEFAULT_TAG = "latest"
HF_HOSTS = ("hf.co", "huggingface.co")

MANIFEST_V2 = "application/vnd.docker.distribution.manifest.v2+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
CONFIG_V1 = "application/vnd.docker.container.image.v1+json"
MODEL = "application/vnd.ollama.image.model"
TEMPLATE = "application/vnd.ollama.image.template"
PARAMS = "application/vnd.ollama.image.params"
SYSTEM = "application/vnd.ollama.image.system"
LICENSE = "application/vnd.ollama.image.license"
MAX_MANIFEST_BYTES = 4 << 20  # a real one is ~1 KB
MAX_TEXT_LAYER_BYTES = 4 << 20  # template, system, params, license: read into memory

_HOST = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,252}[A-Za-z0-9])?(?::[0-9]{1,5})?")
_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")  # namespace, model and tag
DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


class InvalidName(ValueError):
    pass


class InvalidDigest(ValueError):
    pass


class StoreError(ValueError):
    pass


@dataclass(frozen=True)
class ModelName:
    """`[HOST[:PORT]/][NAMESPACE/]MODEL[:TAG]`, Ollama's naming, every part checked."""

    host: str
    namespace: str
    model: str
    tag: str

    @classmethod
    def parse(cls, text: str) -> ModelName:
        if not isinstance(text, str) or not text or len(text) > 512:
            raise InvalidName(f"invalid model name {text!r}")
        rest, tag = text, DEFAULT_TAG
        slash = rest.rfind("/")
        colon = rest.rfind(":")
        if colon > slash:
            rest, tag = rest[:colon], rest[colon + 1:]
        parts = rest.split("/")
        if len(parts) == 1:
            host, namespace, model = DEFAULT_HOST, DEFAULT_NAMESPACE, parts[0]
        elif len(parts) == 2:
            # `127.0.0.1:5000/tiny` (a port marks a host, as Docker reads it) or `NAMESPACE/MODEL`
            if ":" in parts[0] or parts[0] == "localhost":
                host, namespace, model = parts[0], DEFAULT_NAMESPACE, parts[1]
            else:
                host, namespace, model = DEFAULT_HOST, parts[0], parts[1]
        elif len(parts) == 3:
            host, namespace, model = parts
        else:
            raise InvalidName(f"invalid model name {text!r}: at most HOST/NAMESPACE/MODEL:TAG")
        if host.lower() == "huggingface.co":
            host = "hf.co"
        for what, value, pattern in (("host", host, _HOST), ("namespace", namespace, _PART),
                                     ("model", model, _PART), ("tag", tag, _PART)):
            if not pattern.fullmatch(value) or value in (".", ".."):
                raise InvalidName(f"invalid model name {text!r}: bad {what} {value!r}")
        return cls(host, namespace, model, tag)

    @property
    def parts(self) -> tuple[str, str, str, str]:
        return self.host, self.namespace, self.model, self.tag

    @property
    def is_hf(self) -> bool:
        return self.host in HF_HOSTS

    def __str__(self) -> str:
        """As Ollama shows it: the default host and namespace left out."""
        if self.host == DEFAULT_HOST:
            base = self.model if self.namespace == DEFAULT_NAMESPACE else f"{self.namespace}/{self.model}"
        else:
            base = f"{self.host}/{self.namespace}/{self.model}"
        return f"{base}:{self.tag}"

    @property
    def full(self) -> str:
        return f"{self.host}/{self.namespace}/{self.model}:{self.tag}"


def check_digest(digest: object) -> str:
    if not isinstance(digest, str) or not DIGEST.fullmatch(digest):
        raise InvalidDigest(f"invalid blob digest {str(digest)[:80]!r}: expected sha256:<64 hex digits>")
    return digest


@dataclass(frozen=True)
class Layer:
    media_type: str
    digest: str
    size: int


@dataclass(frozen=True)
class Manifest:
    config: Layer | None
    layers: tuple[Layer, ...]
    raw: bytes = field(repr=False)

    @property
    def digest(self) -> str:
        """The model's id in listings (Ollama's): the sha256 of the manifest's bytes."""
        return "sha256:" + hashlib.sha256(self.raw).hexdigest()

    @property
    def blobs(self) -> tuple[Layer, ...]:
        return ((self.config,) if self.config else ()) + self.layers

    @property
    def size(self) -> int:
        return sum(layer.size for layer in self.blobs)

    def layer(self, media_type: str) -> Layer | None:
        return next((layer for layer in self.layers if layer.media_type == media_type), None)

    @classmethod
    def parse(cls, raw: bytes) -> Manifest:
        """A manifest checked before anything in it is used: digests, sizes, media types."""
        if len(raw) > MAX_MANIFEST_BYTES:
            raise StoreError(f"manifest is {len(raw)} bytes; at most {MAX_MANIFEST_BYTES} are accepted")
        try:
            doc = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise StoreError(f"manifest is not JSON: {e}") from None
        if not isinstance(doc, dict) or doc.get("schemaVersion") != 2 or not isinstance(doc.get("layers"), list):
            raise StoreError("not an image manifest (schemaVersion 2 with layers)")

        def layer_of(item: object) -> Layer:
            if not isinstance(item, dict):
                raise StoreError("manifest layer is not an object")
            size, media_type = item.get("size"), item.get("mediaType")
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise StoreError(f"manifest layer size {size!r} is not a byte count")
            if not isinstance(media_type, str) or len(media_type) > 255:
                raise StoreError("manifest layer has no media type")
            return Layer(media_type, check_digest(item.get("digest")), size)

        config = layer_of(doc["config"]) if doc.get("config") is not None else None
        layers = tuple(layer_of(item) for item in doc["layers"])
        if sum(1 for layer in layers if layer.media_type == MODEL) != 1:
            raise StoreError("manifest must have exactly one model layer "
                             f"({MODEL}); this one has media types "
                             f"{sorted({layer.media_type for layer in layers})}")
        return cls(config, layers, raw)


def manifest_json(model: Layer, config: Layer | None, extra: list[Layer] = ()) -> bytes:
    """A manifest as Ollama writes one."""
    def item(layer: Layer) -> dict:
        return {"mediaType": layer.media_type, "digest": layer.digest, "size": layer.size}

    doc = {"schemaVersion": 2, "mediaType": MANIFEST_V2, "layers": [item(model)] + [item(x) for x in extra]}
    if config is not None:
        doc["config"] = item(config)
    return json.dumps(doc, indent=None, separators=(",", ":")).encode()


@dataclass(frozen=True)
class Entry:
    """A model in a store: its name, manifest, and where it lives."""

    name: ModelName
    manifest: Manifest
    store: Store
    modified: float

    @property
    def model_path(self) -> str:
        return str(self.store.blob_path(self.manifest.layer(MODEL).digest))

    @property
    def modified_at(self) -> str:
        return datetime.fromtimestamp(self.modified, timezone.utc).isoformat().replace("+00:00", "Z")

    def text(self, media_type: str) -> str | None:
        """A small text layer (template, system, license); None if the manifest has none."""
        layer = self.manifest.layer(media_type)
        if layer is None:
            return None
        if layer.size > MAX_TEXT_LAYER_BYTES:
            raise StoreError(f"{self.name}: the {media_type} layer is {layer.size} bytes; too large")
        return self.store.blob_path(layer.digest).read_bytes().decode("utf-8", "replace")

    def params(self) -> dict:
        """The params layer (Ollama's options for this model: stop, temperature, num_ctx...)."""
        text = self.text(PARAMS)
        if not text:
            return {}
        try:
            value = json.loads(text)
        except ValueError:
            raise StoreError(f"{self.name}: the params layer is not JSON") from None
        return value if isinstance(value, dict) else {}

    def missing_blobs(self) -> list[Layer]:
        return [layer for layer in self.manifest.blobs if not self.store.blob_path(layer.digest).is_file()]


class Store:
    """One store folder: manifests and blobs. `writable` False for Ollama's store, read in place."""

    def __init__(self, root: Path | str, writable: bool = True, label: str = "mlxllm") -> None:
        self.root = Path(root)
        self.writable = writable
        self.label = label

    def __repr__(self) -> str:
        return f"Store({str(self.root)!r}, {self.label})"

    @property
    def manifests(self) -> Path:
        return self.root / "manifests"

    @property
    def blobs(self) -> Path:
        return self.root / "blobs"

    def blob_path(self, digest: str) -> Path:
        return self.blobs / check_digest(digest).replace(":", "-")

    def partial_path(self, digest: str) -> Path:
        return self.blobs / (check_digest(digest).replace(":", "-") + "-partial")

    def manifest_path(self, name: ModelName) -> Path:
        # the parts matched ModelName's patterns: no separators, no "." or ".."
        return self.manifests.joinpath(*name.parts)

    def entries(self) -> Iterator[Entry]:
        """Every model in the store; a file that is not a valid manifest is left out."""
        if not self.manifests.is_dir():
            return
        for path in sorted(self.manifests.glob("*/*/*/*")):
            if not path.is_file() or path.name.startswith("."):
                continue
            host, namespace, model, tag = path.relative_to(self.manifests).parts
            try:
                name = ModelName.parse(f"{host}/{namespace}/{model}:{tag}")
                if name.parts != (host, namespace, model, tag):
                    continue
                manifest = Manifest.parse(path.read_bytes())
                yield Entry(name, manifest, self, path.stat().st_mtime)
            except (InvalidName, StoreError, OSError):
                continue

    def find(self, name: ModelName) -> Entry | None:
        """The entry for a name, matched against the listing (a name is compared, not opened)."""
        return next((e for e in self.entries() if e.name == name), None)

    # Writing: only our store.

    def _check_writable(self) -> None:
        if not self.writable:
            raise StoreError(f"{self.root} is {self.label}'s store, read in place: mlxllm does not change it")

    def write_manifest(self, name: ModelName, raw: bytes) -> None:
        """Atomically: a reader sees the old manifest or the new one, never a part."""
        self._check_writable()
        Manifest.parse(raw)
        path = self.manifest_path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".manifest-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(raw)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def add_blob_bytes(self, data: bytes, media_type: str) -> Layer:
        """A small blob (config, template, params) written by mlxllm itself."""
        self._check_writable()
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        path = self.blob_path(digest)
        if not path.is_file():
            self.blobs.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.blobs, prefix=".blob-")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        return Layer(media_type, digest, len(data))

    def adopt_file(self, src: Path, media_type: str, expect: str | None = None) -> Layer:
        """Move a finished download into the store under its sha256 (checked against `expect`)."""
        self._check_writable()
        h = hashlib.sha256()
        with open(src, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        digest = "sha256:" + h.hexdigest()
        if expect is not None and digest != expect:
            os.unlink(src)
            raise StoreError(f"digest mismatch: {src.name} hashed to {digest}, expected {expect}; removed")
        self.blobs.mkdir(parents=True, exist_ok=True)
        os.replace(src, self.blob_path(digest))
        return Layer(media_type, digest, self.blob_path(digest).stat().st_size)

    @contextlib.contextmanager
    def lock(self, exclusive: bool, wait: bool = True) -> Iterator[bool]:
        """The store-wide lock: pulls hold it shared, pruning exclusive (so pruning never takes
        a blob from a pull whose manifest is not written yet). Yields whether it was taken."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a+") as f:
            flags = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | (0 if wait else fcntl.LOCK_NB)
            try:
                fcntl.flock(f, flags)
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def remove(self, name: ModelName) -> Entry:
        """Remove a model's manifest, then the blobs no other manifest uses."""
        self._check_writable()
        entry = self.find(name)
        if entry is None:
            raise StoreError(f"model {str(name)!r} not found")
        os.unlink(self.manifest_path(name))
        for parent in self.manifest_path(name).parents:  # empty MODEL, NAMESPACE, HOST folders
            if parent == self.manifests:
                break
            with contextlib.suppress(OSError):
                parent.rmdir()
        self.prune()
        return entry

    def prune(self) -> int:
        """Delete blobs no manifest names; skipped (0) while a pull holds the store."""
        with self.lock(exclusive=True, wait=False) as taken:
            if not taken or not self.blobs.is_dir():
                return 0
            used = {layer.digest.replace(":", "-") for e in self.entries() for layer in e.manifest.blobs}
            removed = 0
            for path in self.blobs.iterdir():
                name = path.name
                if DIGEST.fullmatch(name.replace("-", ":", 1)) and name not in used:
                    path.unlink()
                    removed += 1
            return removed

    def copy(self, src: Entry, dst: ModelName) -> Entry:
        """`cp`: a new name for a model; blobs from another store are hard-linked (or copied)."""
        self._check_writable()
        if src.store.root != self.root:
            for layer in src.manifest.blobs:
                target = self.blob_path(layer.digest)
                if target.is_file():
                    continue
                self.blobs.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(dir=self.blobs, prefix=".blob-")
                os.close(fd)
                os.unlink(tmp)
                try:
                    os.link(src.store.blob_path(layer.digest), tmp)
                except OSError:
                    shutil.copyfile(src.store.blob_path(layer.digest), tmp)
                os.replace(tmp, target)
        self.write_manifest(dst, src.manifest.raw)
        return self.find(dst)


def store_root() -> Path:
    return Path(os.environ.get("MLXLLM_MODELS") or Path.home() / ".mlxllm" / "models")


def ollama_root() -> Path:
    return Path(os.environ.get("OLLAMA_MODELS") or Path.home() / ".ollama" / "models")


def local_store() -> Store:
    return Store(store_root())


def ollama_store() -> Store:
    return Store(ollama_root(), writable=False, label="Ollama")


def stores() -> list[Store]:
    """Ours, then Ollama's (a name in both is ours)."""
    ours, theirs = local_store(), ollama_store()
    return [ours] if theirs.root.resolve() == ours.root.resolve() else [ours, theirs]


def find(name: str | ModelName) -> Entry | None:
    """A stored model by name, in our store first; None if no store has it (or the name
    is not a valid model name)."""
    try:
        parsed = name if isinstance(name, ModelName) else ModelName.parse(name)
    except InvalidName:
        return None
    for store in stores():
        entry = store.find(parsed)
        if entry is not None and not entry.missing_blobs():
            return entry
    return None


def entries() -> list[Entry]:
    """Every complete model in both stores, a name once (ours first)."""
    seen, out = set(), []
    for store in stores():
        for entry in store.entries():
            if entry.name not in seen and not entry.missing_blobs():
                seen.add(entry.name)
                out.append(entry)
    return out
