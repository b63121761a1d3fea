"""RWKV's tokenizer (`tokenizer.ggml.model = rwkv`: a greedy longest match over escaped byte
tokens) against llama.cpp's on the same files: ids, pieces and round trips."""

from __future__ import annotations

from pathlib import Path

import pytest

from mlxllm.gguf import GGUFFile
from mlxllm.tokenizer import Tokenizer, _unescape_rwkv

llama_cpp = pytest.importorskip("llama_cpp")

FIXTURES = Path(__file__).parent / "fixtures" / "archs"
FILES = [FIXTURES / f"{name}.f32.gguf" for name in ("rwkv6", "rwkv7")]
TEXTS = ["Hello world", "User: hi\n\nAssistant:", "tabs\tand\r\nnewlines\n", "naïve café — 日本語 🦙",
         "\\x41 is not A", "a" * 300, "", " ", "<s>User: x</s>", "\x00\x01\x7f", "mixed 123 !@#$%^&*()"]


@pytest.fixture(scope="module", params=FILES, ids=lambda p: p.stem)
def pair(request):
    with GGUFFile(str(request.param)) as gf:
        ours = Tokenizer.from_metadata(gf.metadata)
    theirs = llama_cpp.Llama(str(request.param), vocab_only=True, verbose=False)
    return ours, theirs


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("special", [False, True])
def test_ids_equal_llama_cpp(pair, text, special):
    ours, theirs = pair
    expected = theirs.tokenize(text.encode(), add_bos=True, special=special)
    assert ours.encode(text, add_special=True, parse_special=special) == expected


def test_pieces_equal_llama_cpp(pair):
    ours, theirs = pair
    for i in range(ours.vocab_size):
        assert ours.token_to_bytes(i) == theirs.detokenize([i], special=True), i


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(pair, text):
    ours, _ = pair
    assert ours.decode(ours.encode(text)) == text


def test_unescape():
    assert _unescape_rwkv("\\x00") == b"\x00"
    assert _unescape_rwkv("a\\tb\\nc\\rd") == b"a\tb\nc\rd"
    assert _unescape_rwkv("\\\\") == b"\\"
    assert _unescape_rwkv("\\'") == b"'"
    assert _unescape_rwkv("é") == "é".encode()
    assert _unescape_rwkv("x\\") == b"x"  # an escape cut off gives nothing, as in llama.cpp
