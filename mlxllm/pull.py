"""`mlxllm pull`: models from an Ollama registry (the OCI distribution protocol) or from a
Hugging Face repo (`hf.co/ORG/REPO[:QUANT]`, through huggingface_hub) into the store.

A registry pull: the manifest (GET /v2/NAMESPACE/MODEL/manifests/TAG), then each blob it
names (GET /v2/NAMESPACE/MODEL/blobs/DIGEST) into `blobs/sha256-HEX-partial`, resumed with
a Range request after an interruption, hashed as it arrives and renamed to its final name
only when the bytes hash to the digest; the manifest is written last. Progress events have
the shape of Ollama's /api/pull stream."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import http.client
import inspect
import ipaddress
import json
import os
import re
import shutil
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path

from .store import (
    CONFIG_V1,
    MANIFEST_V2,
    MODEL,
    OCI_MANIFEST,
    Entry,
    Layer,
    Manifest,
    ModelName,
    Store,
    StoreError,
    local_store,
    manifest_json,
)

Progress = Callable[[dict], None]
CHUNK = 1 << 20
TIMEOUT = 60.0  # seconds without a byte from the registry
USER_AGENT = "mlxllm"


class PullError(RuntimeError):
    pass


class DigestMismatch(PullError):
    pass


def _quiet(event: dict) -> None:
    pass


# --- HTTP: urllib, with redirects that drop the registry's credentials on another host ---


class _Redirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and urllib.parse.urlsplit(newurl).netloc != urllib.parse.urlsplit(req.full_url).netloc:
            new.remove_header("Authorization")  # a blob store's signed URL carries its own
        return new


_OPENER = urllib.request.build_opener(_Redirect)


class Registry:
    """One registry host: its scheme, and the bearer token its challenge hands out."""

    def __init__(self, host: str, insecure: bool = False) -> None:
        # a registry on this machine speaks plain HTTP, as Docker assumes for 127.0.0.0/8
        plain = insecure or is_loopback(host.rsplit(":", 1)[0] if host.count(":") == 1 else host)
        self.base = f"{'http' if plain else 'https'}://{host}"
        self.token: str | None = None

    def open(self, path: str, headers: dict[str, str] | None = None):
        """A response for GET base+path; a 401 with a Bearer challenge is answered once."""
        for attempt in (0, 1):
            request = urllib.request.Request(self.base + path, headers={"User-Agent": USER_AGENT, **(headers or {})})
            if self.token:
                request.add_header("Authorization", f"Bearer {self.token}")
            try:
                return _OPENER.open(request, timeout=TIMEOUT)
            except urllib.error.HTTPError as e:
                if e.code == 401 and attempt == 0 and self._authenticate(e.headers.get("WWW-Authenticate", "")):
                    continue
                raise

    def _authenticate(self, challenge: str) -> bool:
        """Docker's token flow, anonymously: GET realm?service=..&scope=.. -> {"token": ...}."""
        if not challenge.lower().startswith("bearer "):
            return False
        fields = dict(re.findall(r'(\w+)="([^"]*)"', challenge))
        realm = fields.pop("realm", None)
        if not realm or urllib.parse.urlsplit(realm).scheme not in ("http", "https"):
            return False
        url = realm + ("&" if "?" in realm else "?") + urllib.parse.urlencode(fields)
        try:
            with _OPENER.open(urllib.request.Request(url, headers={"User-Agent": USER_AGENT}), timeout=TIMEOUT) as r:
                doc = json.loads(r.read(1 << 20))
        except (urllib.error.URLError, ValueError, OSError):
            return False
        self.token = doc.get("token") or doc.get("access_token") if isinstance(doc, dict) else None
        return bool(self.token)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _http_error(e: urllib.error.HTTPError, what: str) -> PullError:
    detail = ""
    with contextlib.suppress(Exception):
        doc = json.loads(e.read(1 << 16))
        detail = "; ".join(str(x.get("message", x)) for x in doc.get("errors", []))[:200]
    return PullError(f"{what}: HTTP {e.code}" + (f" ({detail})" if detail else ""))


def fetch_manifest(registry: Registry, name: ModelName) -> Manifest:
    path = f"/v2/{name.namespace}/{name.model}/manifests/{name.tag}"
    try:
        with registry.open(path, {"Accept": f"{MANIFEST_V2}, {OCI_MANIFEST}"}) as r:
            raw = r.read(8 << 20)
    except urllib.error.HTTPError as e:
        if e.code == 404:
            raise PullError(f"pull model manifest: {name} not found in {registry.base}") from None
        raise _http_error(e, f"pull model manifest {name}") from None
    except urllib.error.URLError as e:
        raise PullError(f"cannot reach {registry.base}: {e.reason}") from None
    try:
        return Manifest.parse(raw)
    except (StoreError, ValueError) as e:
        raise PullError(f"{name}: {e}") from None


def download_blob(registry: Registry, name: ModelName, store: Store, layer: Layer, progress: Progress) -> None:
    """One blob into the store: resumed from its partial file, checked against its digest.
    Two pulls of one blob queue on the partial file's lock; the second finds it done."""
    final = store.blob_path(layer.digest)
    status = f"pulling {layer.digest[7:19]}"
    if final.is_file():
        progress({"status": status, "digest": layer.digest, "total": layer.size, "completed": layer.size})
        return
    store.blobs.mkdir(parents=True, exist_ok=True)
    partial = store.partial_path(layer.digest)
    with _locked_partial(partial) as f:
        if final.is_file():  # another pull finished it while we waited
            with contextlib.suppress(OSError):
                os.unlink(partial)  # ours: _locked_partial checked the path names the file we hold
            progress({"status": status, "digest": layer.digest, "total": layer.size, "completed": layer.size})
            return
        have = os.fstat(f.fileno()).st_size
        if have > layer.size:
            f.truncate(0)
            have = 0
        digest = hashlib.sha256()
        f.seek(0)
        for chunk in iter(lambda: f.read(CHUNK), b""):
            digest.update(chunk)
        progress({"status": status, "digest": layer.digest, "total": layer.size, "completed": have})
        if have < layer.size:
            digest = _fetch_into(registry, name, layer, f, have, digest, status, progress)
        if digest.hexdigest() != layer.digest[7:]:
            f.truncate(0)
            os.unlink(partial)
            raise DigestMismatch(f"digest mismatch for {name}: blob {layer.digest} hashed to sha256:"
                                 f"{digest.hexdigest()}; the download was discarded")
        f.flush()
        os.fsync(f.fileno())
        os.replace(partial, final)


@contextlib.contextmanager
def _locked_partial(partial: Path):
    """The partial file, opened and locked; the lock is on the file the path names now. A pull
    that held it before us may have unlinked it (a digest mismatch) and a third pull made a new
    one: a lock on the unlinked file would let us rename that third pull's half-written file
    into the blob's final name."""
    while True:
        f = open(partial, "ab+")  # noqa: SIM115  (closed below or by the caller's with)
        try:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                same = os.stat(partial).st_ino == os.fstat(f.fileno()).st_ino
            except FileNotFoundError:
                same = False
        except BaseException:
            f.close()
            raise
        if same:
            break
        f.close()
    with f:
        yield f


def _fetch_into(registry, name, layer, f, have, digest, status, progress):
    """The rest of a blob appended to `f`; the digest of all its bytes."""
    path = f"/v2/{name.namespace}/{name.model}/blobs/{layer.digest}"
    headers = {"Range": f"bytes={have}-"} if have else {}
    try:
        response = registry.open(path, headers)
    except urllib.error.HTTPError as e:
        raise _http_error(e, f"pull blob {layer.digest}") from None
    except urllib.error.URLError as e:
        raise PullError(f"cannot reach {registry.base}: {e.reason}") from None
    with response:
        if have and response.status != 206:  # the server ignored the Range: start over
            f.seek(0)
            f.truncate(0)
            digest = hashlib.sha256()
            have = 0
        f.seek(have)
        last = have
        while True:
            try:
                chunk = response.read(CHUNK)
            except (http.client.HTTPException, OSError) as e:  # a dropped or stalled connection
                raise PullError(f"blob {layer.digest}: the connection failed at {have} of {layer.size} bytes "
                                f"({type(e).__name__}: {e}); pull again to resume") from None
            if not chunk:
                break
            have += len(chunk)
            if have > layer.size:
                raise PullError(f"blob {layer.digest} is longer than the manifest's {layer.size} bytes")
            f.write(chunk)
            digest.update(chunk)
            if have - last >= 8 * CHUNK or have == layer.size:
                f.flush()
                last = have
                progress({"status": status, "digest": layer.digest, "total": layer.size, "completed": have})
    if have != layer.size:
        raise PullError(f"blob {layer.digest}: the connection ended at {have} of {layer.size} bytes "
                        "(pull again to resume)")
    return digest


def pull(text: str, insecure: bool = False, progress: Progress = _quiet, store: Store | None = None,
         hf_endpoint: str | None = None) -> Entry:
    """Pull a model into our store; the entry once its manifest is written."""
    name = ModelName.parse(text)
    store = store or local_store()
    with store.lock(exclusive=False):
        if name.is_hf:
            return _pull_hf(name, store, progress, hf_endpoint)
        progress({"status": "pulling manifest"})
        registry = Registry(name.host, insecure)
        manifest = fetch_manifest(registry, name)
        for layer in manifest.blobs:
            download_blob(registry, name, store, layer, progress)
        progress({"status": "verifying sha256 digest"})
        for layer in manifest.blobs:  # hashed on arrival; a blob that was already here is checked by size
            if store.blob_path(layer.digest).stat().st_size != layer.size:
                raise DigestMismatch(f"blob {layer.digest} in the store is not {layer.size} bytes")
        progress({"status": "writing manifest"})
        store.write_manifest(name, manifest.raw)
        progress({"status": "success"})
    return store.find(name)


# --- Hugging Face: the GGUF file of a repo that matches a quantization ---

_SPLIT = re.compile(r"-\d{5}-of-\d{5}\.gguf$")


def _inside(filename: str) -> bool:
    """A repo file name that stays inside the folder it is joined to: relative, no `..`."""
    parts = filename.split("/")
    return "\\" not in filename and "\0" not in filename and all(p not in ("", ".", "..") for p in parts)


def choose_gguf(files: list[str], quant: str) -> str:
    """The repo's GGUF for a tag: `latest` is Q4_K_M where the repo has one (llama.cpp's and
    Ollama's default), else the only file; otherwise the file whose name holds the tag."""
    # a file name from the hub becomes a path under the download folder: none that could leave it
    ggufs = [f for f in files if f.lower().endswith(".gguf") and "mmproj" not in f.lower() and _inside(f)]
    if not ggufs:
        raise PullError("the repository has no GGUF file")
    wanted = "q4_k_m" if quant == "latest" else quant.lower()
    matches = [f for f in ggufs if re.search(rf"(?<![a-z0-9]){re.escape(wanted)}(?![a-z0-9_])", Path(f).name.lower())]
    if not matches and quant == "latest" and len(ggufs) == 1:
        matches = ggufs
    if not matches:
        raise PullError(f"no GGUF for {quant!r}; the repository has: {', '.join(sorted(ggufs))}")
    whole = [f for f in matches if not _SPLIT.search(f)]
    if not whole:
        raise PullError(f"{matches[0]} is split into parts; mlxllm reads single-file GGUFs")
    return min(whole, key=len)


def _pull_hf(name: ModelName, store: Store, progress: Progress, endpoint: str | None) -> Entry:
    try:
        import huggingface_hub
    except ImportError:
        raise PullError("pulling from Hugging Face needs huggingface_hub: pip install huggingface_hub") from None
    repo = f"{name.namespace}/{name.model}"
    endpoint = endpoint or os.environ.get("HF_ENDPOINT") or None
    progress({"status": "pulling manifest"})
    api = huggingface_hub.HfApi(endpoint=endpoint)
    try:
        info = api.model_info(repo, files_metadata=True)
    except Exception as e:  # noqa: BLE001  (its errors differ across huggingface_hub versions)
        raise PullError(f"cannot read {repo} from Hugging Face: {type(e).__name__}: {str(e)[:200]}") from None
    siblings = {s.rfilename: s for s in info.siblings or []}
    filename = choose_gguf(list(siblings), name.tag)
    lfs = getattr(siblings[filename], "lfs", None)
    expect = f"sha256:{lfs.sha256}" if lfs is not None and getattr(lfs, "sha256", None) else None
    total = getattr(siblings[filename], "size", None) or 0
    status = f"pulling {(expect or 'sha256:' + filename)[7:19]}"

    class Bar(huggingface_hub.utils.tqdm):
        """huggingface_hub's progress as our events (which the CLI and /api/pull show), silent itself."""

        def __init__(self, *args, **kwargs):
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)
            self.bytes_done = kwargs.get("initial") or 0

        def update(self, n=1):
            self.bytes_done += n or 0
            progress({"status": status, "digest": expect or "", "total": int(self.total or total),
                      "completed": int(self.bytes_done)})

    folder = store.root / "partial-hf" / f"{name.namespace}--{name.model}"
    kwargs = {"revision": info.sha, "local_dir": folder, "endpoint": endpoint}
    if "tqdm_class" in inspect.signature(huggingface_hub.hf_hub_download).parameters:
        kwargs["tqdm_class"] = Bar
    try:
        path = Path(huggingface_hub.hf_hub_download(repo, filename, **kwargs))
    except Exception as e:  # noqa: BLE001  (as above)
        raise PullError(f"cannot download {filename} from {repo}: {type(e).__name__}: {str(e)[:200]}") from None
    progress({"status": "verifying sha256 digest"})
    try:
        model = store.adopt_file(path, MODEL, expect)
    except StoreError as e:
        shutil.rmtree(folder, ignore_errors=True)
        raise DigestMismatch(str(e)) from None
    config = store.add_blob_bytes(json.dumps({"model_format": "gguf", "file_type": name.tag,
                                              "source": f"hf.co/{repo}/{filename}@{info.sha}"}).encode(), CONFIG_V1)
    progress({"status": "writing manifest"})
    store.write_manifest(name, manifest_json(model, config))
    shutil.rmtree(folder, ignore_errors=True)  # huggingface_hub's resume metadata
    progress({"status": "success"})
    return store.find(name)
