"""The two real models from the package registry: described, loaded into MLX, and their
tensors equal to gguf-py's dequantization of the same bytes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from gguf.quants import dequantize as gguf_dequantize

from mlxllm.gguf import GGUFFile
from mlxllm.kernels import cpu as cpu_kernels
from mlxllm.loader import load_model, load_tensors
from mlxllm.models import resolve
from mlxllm.quant import QuantizedTensor

SCRIPTS = Path(__file__).parent.parent / "scripts"

EXPECTED = {
    "smollm2:135m": {"architecture": "llama", "layers": 30, "heads": 9, "kv_heads": 3, "tokenizer": "BPE",
                     "chat_template": True, "tensor_types": {"Q4_1": 210, "F32": 61, "Q8_0": 1}},
    "gemma3:270m": {"architecture": "gemma3", "layers": 18, "heads": 4, "kv_heads": 1, "tokenizer": "SPM",
                    "chat_template": False, "tensor_types": {"F32": 109, "Q5_0": 81, "Q4_K": 27, "Q8_0": 10, "Q6_K": 9}},
}


@pytest.mark.parametrize("name", EXPECTED)
def test_show(name):
    r = subprocess.run([sys.executable, "-m", "mlxllm", "show", name, "--json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    for key, value in EXPECTED[name].items():
        assert info[key] == value, key
    r = subprocess.run([sys.executable, "-m", "mlxllm", "show", name], capture_output=True, text=True)
    assert r.returncode == 0 and EXPECTED[name]["architecture"] in r.stdout


@pytest.mark.parametrize("name", EXPECTED)
def test_every_tensor_loads_and_matches_gguf_py(name):
    gf = GGUFFile(resolve(name))
    weights = load_tensors(gf)
    assert set(weights) == set(gf.tensors)
    seen = set()
    for tname, value in weights.items():
        info = gf.tensors[tname]
        assert tuple(value.shape) == info.shape
        if info.qtype in seen:  # one tensor per type is enough to compare whole
            continue
        seen.add(info.qtype)
        ref = gguf_dequantize(gf.tensor_bytes(tname), info.qtype).astype(np.float32)
        ours = value.dequantize() if isinstance(value, QuantizedTensor) else value.astype(mx.float32)
        ours = np.array(ours)
        # +-0 may differ for Q5_0/Q8_0 (see test_quant.py); every value is equal.
        np.testing.assert_array_equal(ours, ref)
    assert {t.name for t in seen} == set(EXPECTED[name]["tensor_types"])


def test_smollm2_model_runs():
    model, gf, arch, stats = load_model(resolve("smollm2:135m"))
    logits = model(mx.array([[1, 504, 3458, 282, 4649, 314]]))
    assert logits.shape == (1, 6, 49152) and np.isfinite(np.array(logits)).all()


def test_all_native_file_peak_rss_within_1_5x_file_size():
    r = subprocess.run([sys.executable, str(SCRIPTS / "measure_load.py"), "--one", "smollm2:135m"],
                       capture_output=True, text=True, check=True)
    m = json.loads(r.stdout)
    assert m["loaded"] == "model"
    assert m["peak_delta"] <= 1.5 * m["file_size"], m


def test_packed_types_peak_rss_within_the_widening():
    # Gemma 3's Q6_K tensors are a packed type. With the CPU kernels' blocks (opt-in,
    # MLXLLM_CPU_BLOCKS=1) every 2-D tensor stays GGUF blocks as stored (kernels/cpu/gguf.cpp):
    # the weights are the file's size. Without them a packed type loads as its wider exact
    # image (kernels/widen.py), so the weights outgrow the file by the widening factor. Either
    # way the load itself must add little.
    r = subprocess.run([sys.executable, str(SCRIPTS / "measure_load.py"), "--one", "gemma3:270m"],
                       capture_output=True, text=True, check=True, env={**os.environ, "MLXLLM_CPU_BLOCKS": "1"})
    m = json.loads(r.stdout)
    assert m["loaded"] == "model"
    if cpu_kernels.KERNELS is not None:
        assert m["widening"] <= 1.0 and m["ratio"] <= 1.15, m
    else:
        assert m["widening"] > 1.0
    assert m["peak_over_weights"] <= 1.25, m
