"""A real OCI registry on 127.0.0.1 for the pull tests: Debian's `docker-registry` (the CNCF
distribution server) started with a temporary config, loaded over its HTTP API with
Ollama-format manifests and blobs; and a TCP relay in front of it that records each request
head and can stall a response after some bytes (an interrupted transfer)."""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import httpx

BINARY = shutil.which("docker-registry") or shutil.which("registry")
MANIFEST_V2 = "application/vnd.docker.distribution.manifest.v2+json"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Registry:
    def __init__(self, tmp: Path) -> None:
        self.root = tmp / "registry-data"
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.url = f"http://{self.host}"
        config = tmp / "registry.yml"
        config.write_text(f"""version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: {self.root}
  delete:
    enabled: true
http:
  addr: {self.host}
""")
        self.log = open(tmp / "registry.log", "w")  # noqa: SIM115  (the registry writes it until stop())
        self.proc = subprocess.Popen([BINARY, "serve", str(config)], stdout=self.log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                if httpx.get(self.url + "/v2/", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"docker-registry did not start: {(tmp / 'registry.log').read_text()[-2000:]}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()

    def push_blob(self, repo: str, data: bytes | Path, media_type: str) -> dict:
        """A monolithic upload: POST an upload session, PUT the bytes with their digest."""
        if isinstance(data, Path):
            h = hashlib.sha256()
            with open(data, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            digest, size = "sha256:" + h.hexdigest(), data.stat().st_size
        else:
            digest, size = "sha256:" + hashlib.sha256(data).hexdigest(), len(data)
        r = httpx.post(f"{self.url}/v2/{repo}/blobs/uploads/")
        r.raise_for_status()
        location = r.headers["location"]
        location = location if location.startswith("http") else self.url + location
        location += ("&" if "?" in location else "?") + f"digest={digest}"
        if isinstance(data, Path):
            with open(data, "rb") as f:
                r = httpx.put(location, content=f, headers={"Content-Type": "application/octet-stream",
                                                            "Content-Length": str(size)}, timeout=120)
        else:
            r = httpx.put(location, content=data, headers={"Content-Type": "application/octet-stream"})
        r.raise_for_status()
        return {"mediaType": media_type, "digest": digest, "size": size}

    def push_model(self, repo: str, tag: str, gguf: Path, template: str | None = None, system: str | None = None,
                   params: dict | None = None, license_: str | None = None) -> dict:
        """An Ollama-format model: config, then the model, template, system, params and license layers."""
        layers = [self.push_blob(repo, gguf, "application/vnd.ollama.image.model")]
        for kind, value in (("template", template), ("system", system), ("license", license_),
                            ("params", json.dumps(params) if params is not None else None)):
            if value is not None:
                layers.append(self.push_blob(repo, value.encode(), f"application/vnd.ollama.image.{kind}"))
        config = self.push_blob(repo, json.dumps({"model_format": "gguf", "model_family": "llama",
                                                  "rootfs": {"type": "layers",
                                                             "diff_ids": [x["digest"] for x in layers]}}).encode(),
                                "application/vnd.docker.container.image.v1+json")
        manifest = {"schemaVersion": 2, "mediaType": MANIFEST_V2, "config": config, "layers": layers}
        self.put_manifest(repo, tag, manifest)
        return manifest

    def put_manifest(self, repo: str, tag: str, manifest: dict) -> None:
        r = httpx.put(f"{self.url}/v2/{repo}/manifests/{tag}", content=json.dumps(manifest),
                      headers={"Content-Type": MANIFEST_V2})
        r.raise_for_status()

    def blob_file(self, digest: str) -> Path:
        """Where the filesystem driver keeps a blob's bytes (for tampering with them)."""
        hexdigest = digest.removeprefix("sha256:")
        return self.root / "docker/registry/v2/blobs/sha256" / hexdigest[:2] / hexdigest / "data"


class Relay:
    """127.0.0.1:PORT -> the registry, a connection per request (urllib closes each). It
    records every request head; while `stall_after` is set, a blob response stops after that
    many body bytes and the connection stays open, silent."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.requests: list[str] = []
        self.stall_after: int | None = None
        self.sent_bodies: list[int] = []
        self.server = socket.socket()
        self.server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(16)
        self.port = self.server.getsockname()[1]
        self.host = f"127.0.0.1:{self.port}"
        self._closing = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self._closing.set()
        self.server.close()

    def _accept(self) -> None:
        while not self._closing.is_set():
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        with client, socket.create_connection(("127.0.0.1", self.target_port)) as upstream:
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = client.recv(65536)
                if not chunk:
                    return
                head += chunk
            self.requests.append(head.split(b"\r\n\r\n")[0].decode("latin-1"))
            upstream.sendall(head)
            is_blob = b"/blobs/sha256:" in head.split(b"\r\n")[0]
            stall = self.stall_after if is_blob else None
            buffer = b""
            while b"\r\n\r\n" not in buffer:
                chunk = upstream.recv(65536)
                if not chunk:
                    client.sendall(buffer)
                    return
                buffer += chunk
            header, _, body = buffer.partition(b"\r\n\r\n")
            client.sendall(header + b"\r\n\r\n")
            sent = 0
            while True:
                if stall is not None and sent + len(body) >= stall:
                    client.sendall(body[:stall - sent])
                    self.sent_bodies.append(stall)
                    self._closing.wait()  # silent until the test ends
                    return
                client.sendall(body)
                sent += len(body)
                body = upstream.recv(65536)
                if not body:
                    return
