"""The architecture registry: one record per architecture, found through entry points.

Every architecture, built-in or third-party, is a module named by an entry point in the
group `mlxllm.archs` whose name is the GGUF `general.architecture` it serves:

    [project.entry-points."mlxllm.archs"]
    llama = "mlxllm.archs.llama"

The module exports `ARCH = Arch(...)`, or `ARCHS = (Arch(...), ...)` when one module serves
several GGUF names (one entry point per name). Modules are imported only when their architecture is
asked for, so start-up stays fast; one that fails to import is reported and the rest keep
working; two distributions claiming one name is an error that names both.
"""

from __future__ import annotations

import importlib
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points
from typing import Any

GROUP = "mlxllm.archs"
log = logging.getLogger(__name__)

KINDS = ("decoder", "encoder")
HOW_TO_ADD = (f"an architecture is added by a package that registers a module exporting "
              f"`ARCH = mlxllm.Arch(...)` under the entry-point group {GROUP!r} (see README, 'Plugins')")


@dataclass(frozen=True)
class Arch:
    """One architecture: the runtime (args + model) and the converter, in one record.

    args:   `args(gguf_file) -> hyperparameters`, or a class with `from_gguf(gguf_file)`
            (`mlxllm.gguf.GGUFFile`: `.metadata`, `.tensors`).
    model:  `model(args)` -> an `mlx.nn.Module` whose parameter names are GGUF tensor names,
            called as `model(tokens[B, L], cache=None) -> logits[B, L, vocab]`.
    hf_architectures: Hugging Face `architectures` entries the converter accepts.
    convert: optional Hugging Face -> GGUF hook: a subclass of `mlxllm.convert.Converter`
            (what this architecture's conversion does beyond the generic one; see
            mlxllm/convert_hooks.py), which `mlxllm convert` instantiates as
            `convert(hf_dir, config, arch_name)` for a checkpoint whose config.json
            `architectures` is in hf_architectures.
    kind:   "decoder" (a language model: `model(tokens, cache) -> logits`) or "encoder" (an
            embedding model: `model(tokens[B, L], lengths=None) -> hidden states[B, L, D]`
            after the final norm, bidirectional, no cache; `mlxllm.embed` pools them).
    """

    name: str
    args: type
    model: type
    aliases: tuple[str, ...] = ()
    hf_architectures: tuple[str, ...] = ()
    convert: Callable[..., Any] | None = None
    description: str = ""
    kind: str = "decoder"  # KINDS

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"Arch {self.name!r}: kind {self.kind!r} is not one of {KINDS}")

    def hparams(self, gf: Any) -> Any:
        """The model's hyperparameters read from an open GGUF file."""
        return self.args.from_gguf(gf) if hasattr(self.args, "from_gguf") else self.args(gf)


class ArchError(LookupError):
    pass


@dataclass
class Entry:
    """What the registry knows about one architecture name before and after import."""

    name: str
    distributions: list[str]
    targets: list[str]  # entry-point values, e.g. "mlxllm.archs.llama"
    arch: Arch | None = None
    error: str | None = None
    _entry_points: list[EntryPoint] = field(default_factory=list, repr=False)

    @property
    def distribution(self) -> str:
        return ", ".join(self.distributions)


class Registry:
    def __init__(self) -> None:
        self._entries: dict[str, Entry] | None = None
        # The server resolves architectures from executor threads: discovery and imports run
        # under one lock so no thread sees a half-filled table.
        self._lock = threading.RLock()

    def refresh(self) -> None:
        """Forget what was discovered (after a package was installed or removed)."""
        with self._lock:
            self._entries = None
            importlib.invalidate_caches()

    @property
    def entries(self) -> dict[str, Entry]:
        with self._lock:
            if self._entries is None:
                self._entries = self._discover()
            return self._entries

    @staticmethod
    def _discover() -> dict[str, Entry]:
        entries: dict[str, Entry] = {}
        seen: set[tuple[str, str, str]] = set()
        for ep in entry_points(group=GROUP):
            dist = ep.dist.name if ep.dist is not None else "<unknown>"
            if (ep.name, dist, ep.value) in seen:  # the same distribution found twice on sys.path
                continue
            seen.add((ep.name, dist, ep.value))
            entry = entries.setdefault(ep.name, Entry(ep.name, [], []))
            entry.distributions.append(dist)
            entry.targets.append(ep.value)
            entry._entry_points.append(ep)
        return entries

    def _load(self, entry: Entry) -> Arch | None:
        with self._lock:
            return self._import(entry)

    def _import(self, entry: Entry) -> Arch | None:
        if entry.arch is not None or entry.error is not None:
            return entry.arch
        if len(entry.distributions) > 1:
            claims = " and ".join(f"{d} ({t})" for d, t in zip(entry.distributions, entry.targets))
            entry.error = f"architecture {entry.name!r} is claimed by two distributions: {claims}; uninstall one"
            return None
        try:
            obj = entry._entry_points[0].load()
            records = getattr(obj, "ARCHS", None) or (getattr(obj, "ARCH", obj),)
            if not all(isinstance(a, Arch) for a in records):
                raise TypeError(f"{entry.targets[0]} exports no ARCH = Arch(...) or ARCHS = (Arch(...), ...)")
            arch = next((a for a in records if a.name == entry.name), None)
            if arch is None:
                declared = ", ".join(repr(a.name) for a in records)
                raise TypeError(f"{entry.targets[0]} declares {declared} but is registered as {entry.name!r}")
        except Exception as e:  # a broken plugin must not take the others down
            entry.error = f"plugin {entry.targets[0]!r} from {entry.distribution} failed to load: {type(e).__name__}: {e}"
            log.warning(entry.error)
            return None
        entry.arch = arch
        return arch

    def all(self) -> list[Entry]:
        """Every discovered entry, each imported (used by `mlxllm archs`)."""
        entries = list(self.entries.values())
        for entry in entries:
            self._load(entry)
        return sorted(entries, key=lambda e: e.name)

    def get(self, name: str) -> Arch:
        """The architecture for a GGUF `general.architecture` (or one of its aliases)."""
        entry = self.entries.get(name)
        if entry is None:  # aliases are only known once modules are imported
            owners = [e for e in self.all() if e.arch is not None and name in e.arch.aliases]
            if len(owners) > 1:
                raise ArchError(f"alias {name!r} is claimed by " + " and ".join(f"{e.name} ({e.distribution})" for e in owners))
            entry = owners[0] if owners else None
        if entry is None:
            known = ", ".join(sorted(self.entries)) or "none"
            raise ArchError(f"unknown architecture {name!r} (known: {known}); {HOW_TO_ADD}")
        arch = self._load(entry)
        if arch is None:
            raise ArchError(entry.error)
        return arch


REGISTRY = Registry()


def get_arch(name: str) -> Arch:
    return REGISTRY.get(name)
