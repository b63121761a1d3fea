"""Shared fixtures and the reports printed at the end of the run."""

import gc

import mlxllm  # noqa: F401  first: it puts an optimized BLAS under mlx.core (see _blas.py)
import mlx.core as mx
import pytest

_QUANT_REPORT: dict[str, tuple[str, ...]] = {}
_FIDELITY_REPORT: list[tuple] = []


@pytest.fixture(scope="module", autouse=True)
def release_memory_after_each_module():
    """Models, llama.cpp contexts (reference cycles) and MLX's buffer cache of one module
    are freed before the next loads its own: the suite's peak is one module's, not their sum."""
    yield
    gc.collect()
    mx.clear_cache()


@pytest.fixture
def quant_report():
    return _QUANT_REPORT


@pytest.fixture
def fidelity_report():
    return _FIDELITY_REPORT


def pytest_terminal_summary(terminalreporter):
    tr = terminalreporter
    if _FIDELITY_REPORT:
        tr.section("teacher-forced agreement with llama.cpp")
        tr.write_line(f"{'model':<18}{'positions':>10}  {'argmax agrees':<16}max |logit diff| (top-8)")
        for name, n, agree, diff in _FIDELITY_REPORT:
            tr.write_line(f"{name:<18}{n:>10}  {agree:<16}{diff}")
    if not _QUANT_REPORT:
        return
    tr.section("quant types vs gguf.quants.dequantize")
    tr.write_line(f"{'type':<9}{'layout':<8}{'MLX bpw':>9}{'GGUF bpw':>10}  result")
    for name, (kind, bpw, gguf_bpw, result) in sorted(_QUANT_REPORT.items()):
        tr.write_line(f"{name:<9}{kind:<8}{bpw:>9}{gguf_bpw:>10}  {result}")


def pytest_collection_modifyitems(session, config, items):
    """tests/test_fuzz.py's cases fork children from this process, which is only safe before
    anything has evaluated an MLX array (MLX's worker threads do not survive a fork: a
    forked child of a process that ran other tests hangs). So they run first."""
    forking = [item for item in items if item.nodeid.startswith("tests/test_fuzz.py") and "kernel" not in item.name]
    if forking:
        rest = [item for item in items if item not in set(forking)]
        items[:] = forking + rest
