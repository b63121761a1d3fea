"""`python -m mlxllm serve` in a subprocess, for the tests that drive the real server."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path


class Server:
    """`python -m mlxllm serve --port 0` in a subprocess; the port is read from its log."""

    def __init__(self, tmp: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.log_path = tmp / "server.log"
        self._log = open(self.log_path, "w")  # noqa: SIM115  (open while the server runs; closed in stop())
        self.proc = subprocess.Popen([sys.executable, "-m", "mlxllm", "serve", "--port", "0", *args],
                                     stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env={**os.environ, **(env or {})})
        deadline = time.time() + 60
        while time.time() < deadline:
            found = re.search(r"serving on (http://[\d.]+:\d+)", self.log())
            if found:
                self.url = found.group(1)
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"server did not start:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            self._log.close()
