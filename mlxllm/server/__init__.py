"""`mlxllm serve`: Ollama's and OpenAI's HTTP APIs over aiohttp, on the generation loop
the CLI uses (`mlxllm.generate.BatchGenerator`).

- `engine`: the `Worker` thread, the only one that runs MLX, ticks each loaded model's
  `Engine` (a prompt chunk and one token for every active job per tick);
- `pool`: `ModelPool` loads models by name on demand and unloads each after keep_alive;
- `generation`: one request in API-neutral terms (`Request`), its prompt, its job and the
  events read back (`Run`);
- `ollama`, `openai`, `embeddings`: each API's routes (`ROUTES`), which validate a request
  and turn the engine's events into that API's shapes; `common`: what they share;
- `app`: the routes together, and `serve`.

Events flow back to the handlers through asyncio queues (`loop.call_soon_threadsafe`); a
handler whose client went away sets its job's cancel flag, which the engine checks between
steps, freeing the slot."""

from .app import DEFAULT_PORT, StartError, make_app, serve, serve_async
from .common import ApiError, keep_alive_of
from .embeddings import rerank_tokens
from .engine import DEFAULT_PARALLEL
from .pool import DEFAULT_KEEP_ALIVE, ModelPool
from .security import Security

__all__ = ["DEFAULT_KEEP_ALIVE", "DEFAULT_PARALLEL", "DEFAULT_PORT", "ApiError", "ModelPool", "Security", "StartError", "keep_alive_of",
           "make_app", "rerank_tokens", "serve", "serve_async"]
