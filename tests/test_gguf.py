"""GGUF reading: metadata access, tensor table, and one clear error for each bad file."""

import struct
import subprocess
import sys

import numpy as np
import pytest
from gguf import GGUFValueType as V, GGUFWriter

from gguf_bytes import ARCH, Raw, build, valid
from mlxllm.gguf import GGUFError, GGUFFile


def write(tmp_path, data: bytes, name="m.gguf"):
    p = tmp_path / name
    p.write_bytes(data)
    return p


def test_reads_what_gguf_py_writes(tmp_path):
    path = tmp_path / "w.gguf"
    w = GGUFWriter(str(path), "llama")
    w.add_context_length(2048)
    w.add_float32("llama.rope.freq_base", 5e5)
    w.add_array("tokenizer.ggml.tokens", ["a", "b", "ü", "\u2581x"])
    w.add_array("tokenizer.ggml.scores", [0.5, -1.0, 2.0, 0.0])
    w.add_tensor("blk.0.w", np.arange(96, dtype=np.float32).reshape(3, 32))
    w.add_tensor("h", np.ones(7, dtype=np.float16))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()

    gf = GGUFFile(path)
    m = gf.metadata
    assert gf.architecture == "llama"
    assert m["context_length"] == 2048 == m["llama.context_length"]  # arch prefix implied
    assert m.get("rope.freq_base") == pytest.approx(5e5)
    assert m.get("rope.scaling.factor", 1.0) == 1.0  # default when absent
    assert m["tokenizer.ggml.tokens"] == ["a", "b", "ü", "\u2581x"]
    np.testing.assert_array_equal(m["tokenizer.ggml.scores"], [0.5, -1.0, 2.0, 0.0])
    t = gf.tensors["blk.0.w"]
    assert t.shape == (3, 32) and t.qtype.name == "F32" and t.offset % gf.alignment == 0
    np.testing.assert_array_equal(gf.tensor_bytes("blk.0.w").view(np.float32), np.arange(96).reshape(3, 32))
    assert gf.tensors["h"].shape == (7,) and gf.tensors["h"].qtype.name == "F16"


def mapped_kib(path) -> int:
    """Resident KiB of this process's mappings of `path` (Linux /proc/self/smaps)."""
    total, current = 0, None
    with open("/proc/self/smaps") as f:
        for line in f:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5 and ":" not in fields[0]:
                current = fields[5] if len(fields) > 5 else None
            elif fields[0] == "Rss:" and current == str(path):
                total += int(fields[1])
    return total


def test_tensor_data_is_a_view_of_the_mapping(tmp_path):
    n = 1 << 22  # 16 MiB of float32
    path = write(tmp_path, valid(n))
    gf = GGUFFile(path)
    view = gf.tensor_bytes("t.weight")
    assert not view.flags.owndata and not view.flags.writeable
    assert view.sum() == 0  # touches every page
    assert mapped_kib(path) >= 16 * 1024
    gf.release_through(gf.tensors["t.weight"].offset + 4 * n)
    assert mapped_kib(path) < 1024  # dropped; the header pages may stay
    assert view[-1] == 0  # and the mapping still reads


# Every bad file: (name, bytes, words the one-line message must contain)
T_DIMS = [("t.weight", [64], 0, 0)]
BAD = [
    ("truncated header", valid()[:20], "truncated"),
    ("truncated metadata", valid()[:40], "truncated"),
    ("wrong magic", b"GGML" + valid()[4:], "not a GGUF file"),
    ("unsupported version", build([ARCH], version=99), "unsupported GGUF version 99"),
    ("big-endian", build([ARCH], version=3 << 24), "big-endian"),
    ("data past end of file", build([ARCH], T_DIMS, data=b"\0" * 100), "truncated: tensor 't.weight'"),
    ("absurd dimensions", build([ARCH], [("t", [1 << 40, 1 << 40], 0, 0)]), "larger than the file"),
    ("too many dimensions", build([ARCH], [("t", [1, 1, 1, 1, 1], 0, 0)]), "5 dimensions"),
    ("absurd metadata count", build([ARCH], n_kv=1 << 60), "more than"),
    ("absurd tensor count", build([ARCH], n_tensors=1 << 40), "more than"),
    ("absurd array length", build([ARCH, ("a", V.ARRAY, Raw(struct.pack("<IQ", V.UINT32, 1 << 62)))]), "truncated"),
    ("absurd string array", build([ARCH, ("a", V.ARRAY, Raw(struct.pack("<IQ", V.STRING, 1 << 40)))]), "truncated"),
    ("absurd string length", build([ARCH, ("s", V.STRING, Raw(struct.pack("<Q", 1 << 62) + b"xx"))]), "truncated"),
    ("overlapping tensors", build([ARCH], [("a", [64], 0, 0), ("b", [64], 0, 128)], data=b"\0" * 512)
        .replace((128).to_bytes(8, "little"), (32).to_bytes(8, "little")), "overlap"),
    ("unknown type id", build([ARCH], [("t", [32], 200, 0)], data=b"\0" * 256), "unknown ggml type id 200"),
    ("removed type id", build([ARCH], [("t", [32], 4, 0)], data=b"\0" * 256), "unknown ggml type id 4"),
    ("unknown value type", build([ARCH, ("k", 77, Raw(b"\0" * 16))]), "unknown value type 77"),
    ("duplicate key", build([ARCH, ARCH]), "duplicate metadata key"),
    ("duplicate tensor", build([ARCH], [("t", [32], 0, 0), ("t", [32], 0, 128)], data=b"\0" * 256), "duplicate tensor"),
    ("misaligned tensor", build([ARCH], [("t", [32], 0, 4)], data=b"\0" * 256), "not aligned"),
    ("bad alignment", build([ARCH, ("general.alignment", V.UINT32, 3)]), "power of two"),
    ("row not whole blocks", build([ARCH], [("t", [33], 8, 0)], data=b"\0" * 256), "not a multiple"),
    ("zero rank", build([ARCH], [("t", [], 0, 0)]), "0 dimensions"),
    ("empty file", b"", "truncated"),
]


@pytest.mark.parametrize("data,words", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_file_is_one_clear_error(tmp_path, data, words):
    path = write(tmp_path, data)
    with pytest.raises(GGUFError) as e:
        GGUFFile(path)
    msg = str(e.value)
    assert words in msg and "\n" not in msg and str(path) in msg


def test_missing_path_and_directory(tmp_path):
    with pytest.raises(GGUFError, match="no such file"):
        GGUFFile(tmp_path / "nope.gguf")
    with pytest.raises(GGUFError, match="is a directory"):
        GGUFFile(tmp_path)


@pytest.mark.parametrize("which", ["wrong magic", "data past end of file", "absurd dimensions", "unknown type id"])
def test_cli_reports_bad_files_in_one_line(tmp_path, which):
    data = next(b[1] for b in BAD if b[0] == which)
    path = write(tmp_path, data)
    r = subprocess.run([sys.executable, "-m", "mlxllm", "show", str(path)], capture_output=True, text=True)
    assert r.returncode == 1
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert r.stdout == ""


def test_cli_missing_and_directory(tmp_path):
    for target in (str(tmp_path / "missing.gguf"), str(tmp_path)):
        r = subprocess.run([sys.executable, "-m", "mlxllm", "show", target], capture_output=True, text=True)
        assert r.returncode == 1 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
