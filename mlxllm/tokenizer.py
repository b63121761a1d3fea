"""Tokenizers built from GGUF metadata (`tokenizer.ggml.*`), giving the token ids llama.cpp gives.

llama.cpp's `llama_vocab` (src/llama-vocab.cpp, src/unicode.cpp) is the reference; each part here
names the function it mirrors. Three vocabulary types:

- "llama" -> SPM: the text (spaces escaped as U+2581) is split into UTF-8 characters and the
  adjacent pair whose concatenation is the highest-scoring vocabulary entry is merged until none
  is left; leftovers become `<0xNN>` byte tokens.
- "gpt2"  -> BPE: a regex pre-tokenizer chosen by `tokenizer.ggml.pre` cuts the text into words,
  each word is byte-level encoded (GPT-2's bytes-to-unicode table) and merged by merge rank.
- "bert"  -> WPM: BERT normalisation (first code point of NFD, lowercase, punctuation split)
  and greedy longest-match pieces.

Before any of those, special tokens are cut out of the text (`tokenizer_st_partition`):
user-defined tokens always, control tokens only when the caller asks (chat templates).
Character classes follow llama.cpp's tables, which are Unicode 15.1: code points assigned
later are treated as unassigned, as llama.cpp does.

Speed: llama.cpp merges over whole fragments in C++; here the text is cut at points no
vocabulary entry can span (word starts for SPM, pre-tokenizer words for BPE), each piece is
merged once and cached, so repeated words cost a dict lookup. Results stay identical: a merge
only ever joins neighbours into a vocabulary entry, so it cannot cross such a cut.
"""

from __future__ import annotations

import codecs
import heapq
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import regex
from gguf.constants import Keys, TokenType

from .chat_template import fallback_chat_template, render_chat_template

TK = Keys.Tokenizer

# llama_token_attr (include/llama.h): bit flags, a token can carry several.
ATTR_UNDEFINED = 0
ATTR_UNKNOWN = 1 << 0
ATTR_UNUSED = 1 << 1
ATTR_NORMAL = 1 << 2
ATTR_CONTROL = 1 << 3
ATTR_USER_DEFINED = 1 << 4
ATTR_BYTE = 1 << 5
ATTR_LSTRIP = 1 << 7
ATTR_RSTRIP = 1 << 8
_ATTR_PARTITION = ATTR_CONTROL | ATTR_USER_DEFINED | ATTR_UNKNOWN  # cut out before tokenizing
_ATTR_SPECIAL = ATTR_CONTROL | ATTR_UNKNOWN  # hidden when decoding with skip_special

# GGUF token type -> attribute, as `llama_vocab::impl::load` maps them; anything else is UNDEFINED.
_TYPE_TO_ATTR = {
    TokenType.NORMAL: ATTR_NORMAL,
    TokenType.UNKNOWN: ATTR_UNKNOWN,
    TokenType.CONTROL: ATTR_CONTROL,
    TokenType.USER_DEFINED: ATTR_USER_DEFINED,
    TokenType.UNUSED: ATTR_UNUSED,
    TokenType.BYTE: ATTR_BYTE,
}

# Token texts llama.cpp treats as end of generation (and forces to CONTROL) in `load`,
# because converters do not always mark them (ref: llama.cpp issue 9606).
_EOG_TEXTS = (
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
    "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
    "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
    "<｜end▁of▁sentence｜>", "[e~[",
)
_EOT_TEXTS = (
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>",
    "<EOT>", "_<EOT>", "[EOT]", "<｜end▁of▁sentence｜>", "<end_of_utterance>",
)
_EOM_TEXTS = ("<|eom_id|>",)
_FIM_TEXTS = {  # role -> texts, `load`'s "find FIM_* token" blocks
    "pre": ("<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<｜fim▁begin｜>", "<PRE>", "▁<PRE>",
            "<|code_prefix|>", "<|prefix|>"),
    "suf": ("<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<｜fim▁hole｜>", "<SUF>", "▁<SUF>",
            "<|code_suffix|>", "<|suffix|>"),
    "mid": ("<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<｜fim▁end｜>", "<MID>", "▁<MID>",
            "<|code_middle|>", "<|middle|>"),
    "pad": ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"),
    "rep": ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"),
    "sep": ("<|file_sep|>",),
}
_ALWAYS_RENDERED = ("<|channel|>", "<|message|>", "<|start|>", "<|constrain|>")  # gpt-oss

_SPACE_MARK = "\u2581"  # SentencePiece's escaped space
_C_SPACE = frozenset(" \t\n\v\f\r")  # C isspace() in the "C" locale, used by LSTRIP/RSTRIP
_NO_RANK = 1 << 62


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2's byte <-> printable character table (llama.cpp `unicode_byte_to_utf8_map`).
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {b: chr(b) for b in keep}
    n = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + n)
            n += 1
    return table


_BYTE_TO_CHAR = _bytes_to_unicode()
_CHAR_TO_BYTE = {c: b for b, c in _BYTE_TO_CHAR.items()}


def _unescape_rwkv(token: str) -> bytes:
    """An RWKV vocabulary entry's bytes, read as `llama_unescape_rwkv_token` reads them:
    backslash escapes \\t \\n \\r and \\xHH (lowercase hex digits), any other escaped byte
    as itself; an escape cut off at the end gives nothing."""
    out = bytearray()
    escaping, hex_left, hex_value = False, 0, 0
    for c in token.encode("utf-8", "surrogateescape"):
        if hex_left:
            hex_value = hex_value * 16 + (c - 0x61 + 10 if c >= 0x61 else c - 0x30)
            hex_left -= 1
            if not hex_left:
                out.append(hex_value & 0xFF)
                hex_value = 0
        elif escaping:
            escaping = False
            if c == 0x78:  # x
                hex_left = 2
            else:
                out.append({0x74: 0x09, 0x6E: 0x0A, 0x72: 0x0D}.get(c, c))
        elif c == 0x5C:  # backslash
            escaping = True
        else:
            out.append(c)
    return bytes(out)


class TokenizerError(ValueError):
    """Metadata that cannot make a tokenizer (or a bad call); the message is one line."""


# ----------------------------------------------------------------------------------------------
# BPE pre-tokenizers (`llm_tokenizer_bpe::llm_tokenizer_bpe` + `unicode_regex_split`)
#
# llama.cpp applies a list of regexes in turn; each one splits every current chunk into its
# matches and the gaps between them. The patterns below are llama.cpp's, in Python `regex`
# syntax, which is also the engine llama.cpp's Unicode tables were generated with
# (scripts/gen-unicode-data.py: \p{L}, \p{N}, ... and \s). Equivalences relied on:
# - llama.cpp's hand-written GPT-2 and Llama-3 splitters (`unicode_regex_split_custom_gpt2`,
#   `..._llama3`) behave like their regexes with a final `|\s+`.
# - Its "collapsed" std::regex path maps each non-ASCII code point to its category byte, so
#   \p{X} classes keep their Unicode meaning and `(?=[\p{L}])([^a-z])` means "a letter that is
#   not a-z" (any non-ASCII letter counts as both cases).
# - Patterns without \p{..} run on std::wregex over text whose non-ASCII whitespace became
#   \x0B; those are marked `wide` and get the same substitution here.
# ----------------------------------------------------------------------------------------------

_CONTRACTIONS_CS = r"'s|'t|'re|'ve|'m|'ll|'d"
_CONTRACTIONS_CI = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_UPPERISH = r"(?:(?=\p{L})[^a-z])"  # tekken/gpt-4o's rewrite of [\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]
_LOWERISH = r"(?:(?=\p{L})[^A-Z])"  # ... and of [\p{Ll}\p{Lm}\p{Lo}\p{M}]

_RE_GPT2 = _CONTRACTIONS_CS + r"| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_RE_LLAMA3 = (_CONTRACTIONS_CI + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_RE_QWEN2 = (_CONTRACTIONS_CI + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
             r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_RE_QWEN35 = (_CONTRACTIONS_CI + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_RE_SEED_CODER = (_CONTRACTIONS_CI + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}| ?[^\s\p{L}\p{N}\r\n]+"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_RE_BAILING = (r"'(?:[sSdDmMtT]|[lL][lL]|[vV][eE]|[rR][eE])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+")
_RE_TEKKEN = (rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPERISH}*{_LOWERISH}+|[^\r\n\p{{L}}\p{{N}}]?{_UPPERISH}+{_LOWERISH}*"
              r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_RE_GPT4O = (rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPERISH}*{_LOWERISH}+{_CONTRACTIONS_CI}?"
             rf"|[^\r\n\p{{L}}\p{{N}}]?{_UPPERISH}+{_LOWERISH}*{_CONTRACTIONS_CI}?"
             r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_RE_PORO = r" ?[^(\s|.,!?…。，、।۔،)]+"
# DeepSeek LLM's letter class, from its tokenizer.json (Latin, Greek, Cyrillic, ... with case).
# Code points that NFC would change are escaped, so an editor cannot rewrite them.
_DEEPSEEK_LETTERS = (
    "A-Za-zµÀ-ÖØ-öø-ƺƼ-ƿǄ-ʓʕ-ʯͰ-ͳͶͷͻ-ͽͿΆΈ-ΊΌΎ-ΡΣ-ϵϷ-ҁҊ-ԯԱ-ՖႠ-ჅᎠ-Ᏽᏸ-ᏽᲐ-ᲺᲽ-Ჿᴀ-ᴫᵫ-ᵷᵹ-ᶚḀ-ἕἘ-Ἕἠ-ὅὈ-Ὅ"
    "ὐ-ὗὙὛὝὟ-\u1f7dᾀ-ᾴᾶ-ᾼ\u1fbeῂ-ῄῆ-ῌῐ-\u1fd3ῖ-\u1fdbῠ-Ῥῲ-ῴῶ-ῼℂℇℊ-ℓℕℙ-ℝℤ\u2126ℨ\u212a-ℭℯ-ℴℹℼ-ℿⅅ-ⅉⅎↃↄⰀ-ⱻⱾ-ⳤⳫ-ⳮⳲⳳꙀ-ꙭꚀ-ꚛꜢ-ꝯꝱ-ꞇꞋ-ꞎꭰ-ꮿ"
    "ﬀ-ﬆﬓ-ﬗＡ-Ｚａ-ｚ𐐀-𐑏𐒰-𐓓𐓘-𐓻𐲀-𐲲𐳀-𐳲𑢠-𑣟𞤀-𞥃"
)


@dataclass(frozen=True)
class _Split:
    pattern: str
    wide: bool = False  # llama.cpp runs it on std::wregex with non-ASCII whitespace as \x0B


@dataclass(frozen=True)
class PreTokenizer:
    """One `llama_vocab_pre_type`: its regex splits and the flags `load` sets with it."""

    splits: tuple[_Split, ...]
    ignore_merges: bool = False  # a word that is itself a token is taken whole (llama3, tekken)
    add_bos: bool | None = None  # default before metadata; None keeps the BPE default (False)
    no_bos: bool = False  # chatglm: no BOS token at all
    add_sep: bool | None = None


_S = _Split
_PRE_DEFAULT = PreTokenizer((_S(r"[\p{P}$+<=>^~|]+"), _S(_RE_GPT2), _S(r"\p{N}+"), _S("[0-9][0-9][0-9]", wide=True)))
_PRE_LLAMA3 = PreTokenizer((_S(_RE_LLAMA3),), ignore_merges=True, add_bos=True)
_PRE_STARCODER = PreTokenizer((_S(r"\p{N}"), _S(_RE_GPT2)))
_PRE_GPT2 = PreTokenizer((_S(_RE_GPT2),))
_PRE_QWEN2 = PreTokenizer((_S(_RE_QWEN2),))

PRE_TOKENIZERS: dict[str, PreTokenizer] = {
    "default": _PRE_DEFAULT,
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral",
                     "midm-2.0", "lfm2", "jina-v5-nano"), _PRE_LLAMA3),
    **dict.fromkeys(("dbrx", "smaug-bpe"), PreTokenizer((_S(_RE_LLAMA3),))),
    **dict.fromkeys(("glm4", "chatglm-bpe"), PreTokenizer((_S(_RE_LLAMA3),), no_bos=True)),
    "deepseek-llm": PreTokenizer((
        _S(r"[\r\n]", wide=True),
        _S(rf"\s?[{_DEEPSEEK_LETTERS}]+", wide=True),
        _S(r"\s?[!-/:-~！-／：-～‘-‟　-。]+", wide=True),
        _S(r"\s+\Z", wide=True),  # std::regex `$`: end of the chunk only
        _S(r"[一-龥ࠀ-一가-퟿]+", wide=True),
        _S(r"\p{N}+"),
    )),
    "deepseek-coder": PreTokenizer((
        _S(r"[\r\n]", wide=True),
        _S(r"\s?\p{L}+"),
        _S(r"\s?\p{P}+"),
        _S(r"[一-龥ࠀ-一가-퟿]+", wide=True),
        _S(r"\p{N}"),
    )),
    "falcon": PreTokenizer((_S(r"[\p{P}$+<=>^~|`]+"), _S(_RE_GPT2), _S("[0-9][0-9][0-9]", wide=True))),
    **dict.fromkeys(("starcoder", "refact", "command-r", "smollm", "codeshell", "exaone",
                     "minerva-7b", "mellum2"), _PRE_STARCODER),
    **dict.fromkeys(("gpt-2", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v2-es", "jina-v2-de",
                     "a.x-4.0", "mellum", "modern-bert", "exaone4", "mpt", "olmo", "jais",
                     "trillion", "granite-docling"), _PRE_GPT2),
    **dict.fromkeys(("jina-v1-en", "jina-v2-code", "roberta-bpe"), PreTokenizer((_S(_RE_GPT2),), add_sep=True)),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez", "stablelm2",
                     "hunyuan", "solar-open"), _PRE_QWEN2),
    "qwen35": PreTokenizer((_S(_RE_QWEN35),)),
    **dict.fromkeys(("poro-chat", "bloom", "gpt3-finnish"), PreTokenizer((_S(_RE_PORO, wide=True),))),
    "viking": PreTokenizer((_S(_RE_PORO, wide=True), _S(r"\p{N}"))),
    # "mistral-nemo" is not a llama.cpp name: convert_hf_to_gguf.py writes "tekken" for Mistral
    # Nemo; accepted here as a spelling of the same thing.
    **dict.fromkeys(("tekken", "mistral-nemo"), PreTokenizer((_S(_RE_TEKKEN),), ignore_merges=True, add_bos=True)),
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), PreTokenizer((_S(_RE_GPT4O),))),
    "seed-coder": PreTokenizer((_S(_RE_SEED_CODER),)),
    **dict.fromkeys(("bailingmoe", "bailingmoe2", "llada-moe"), PreTokenizer((_S(_RE_BAILING),))),
    "chameleon": PreTokenizer((
        _S(r"<sentinel:[0-9]+>", wide=True),
        _S(r"(IMGIMG)((A|B|C|D|E|F|G|H|I){1,4})Z", wide=True),
        _S(r"([\t\n]|    |  )", wide=True),
        _S(r"\p{N}"),
        _S(r"[\p{P}!-/:-@\[-`{-~]"),
        _S(_RE_GPT2),
    ), add_bos=True),
}

# llama.cpp's code point table (src/unicode-data.cpp) is Unicode 15.1; the `regex` module knows
# later versions. Code points assigned since then are unassigned to llama.cpp, so they are
# replaced by an unassigned code point before category-based splitting and WPM normalisation.
# Generated by `scripts/make_tokenizer_fixtures.py unicode-table` with regex 2026.11.15
# (Unicode 17.0); regenerate when `regex` moves to a newer Unicode.
_ASSIGNED_AFTER_UNICODE_15_1 = (
    (0x00558, 0x00558), (0x0058B, 0x0058C), (0x005C8, 0x005C9), (0x0088F, 0x0088F), (0x00897, 0x00897),
    (0x00B53, 0x00B54), (0x00C5C, 0x00C5C), (0x00CDC, 0x00CDC), (0x01ACF, 0x01AF0), (0x01B4E, 0x01B4F),
    (0x01B7F, 0x01B7F), (0x01C89, 0x01C8A), (0x0208F, 0x0208F), (0x0209D, 0x0209F), (0x020C1, 0x020C4),
    (0x02427, 0x02429), (0x02B96, 0x02B96), (0x02E60, 0x02E63), (0x031E4, 0x031E5), (0x0A7CB, 0x0A7CF),
    (0x0A7D2, 0x0A7D2), (0x0A7D4, 0x0A7D4), (0x0A7DA, 0x0A7DD), (0x0A7E2, 0x0A7E2), (0x0A7F1, 0x0A7F1),
    (0x0AB6C, 0x0AB6D), (0x0FBC3, 0x0FBD2), (0x0FD90, 0x0FD91), (0x0FDC8, 0x0FDCE), (0x105C0, 0x105F3),
    (0x107BB, 0x107BF), (0x10940, 0x10959), (0x10D40, 0x10D65), (0x10D69, 0x10D85), (0x10D8E, 0x10D8F),
    (0x10EC2, 0x10EC7), (0x10EC9, 0x10EEE), (0x10EF0, 0x10EFC), (0x11380, 0x11389), (0x1138B, 0x1138B),
    (0x1138E, 0x1138E), (0x11390, 0x113B5), (0x113B7, 0x113C0), (0x113C2, 0x113C2), (0x113C5, 0x113C5),
    (0x113C7, 0x113CA), (0x113CC, 0x113D5), (0x113D7, 0x113D8), (0x113E1, 0x113E2), (0x116D0, 0x116E3),
    (0x11B0A, 0x11B0A), (0x11B60, 0x11B67), (0x11BC0, 0x11BE1), (0x11BF0, 0x11BF9), (0x11DB0, 0x11DDB),
    (0x11DE0, 0x11DE9), (0x11DF0, 0x11DF1), (0x11F5A, 0x11F5A), (0x1246F, 0x1246F), (0x12475, 0x1247F),
    (0x12550, 0x12686), (0x13460, 0x143FA), (0x16100, 0x16139), (0x16D40, 0x16D79), (0x16EA0, 0x16EB8),
    (0x16EBB, 0x16ED3), (0x16FF2, 0x16FF6), (0x187F8, 0x187FF), (0x18CD6, 0x18CDA), (0x18CFF, 0x18CFF),
    (0x18D09, 0x18D20), (0x18D80, 0x18DF2), (0x18E00, 0x19191), (0x191A0, 0x191D2), (0x1B123, 0x1B128),
    (0x1B168, 0x1B168), (0x1CC00, 0x1CCFC), (0x1CD00, 0x1CEB3), (0x1CEBA, 0x1CED0), (0x1CED2, 0x1CED4),
    (0x1CEDD, 0x1CEFD), (0x1D127, 0x1D128), (0x1D1EB, 0x1D1FF), (0x1D250, 0x1D281), (0x1D6A6, 0x1D6A6),
    (0x1DB00, 0x1DB1C), (0x1DF1F, 0x1DF24), (0x1DF2B, 0x1DF81), (0x1DF90, 0x1DF96), (0x1DFCD, 0x1DFFF),
    (0x1E5D0, 0x1E5FA), (0x1E5FF, 0x1E5FF), (0x1E6C0, 0x1E6DE), (0x1E6E0, 0x1E6F5), (0x1E6FE, 0x1E6FF),
    (0x1F1AE, 0x1F1AE), (0x1F6D8, 0x1F6D9), (0x1F777, 0x1F77A), (0x1F7DA, 0x1F7DB), (0x1F7F1, 0x1F7FF),
    (0x1F8B2, 0x1F8BB), (0x1F8C0, 0x1F8C1), (0x1F8D0, 0x1F8D8), (0x1FA54, 0x1FA57), (0x1FA89, 0x1FA8F),
    (0x1FABE, 0x1FABE), (0x1FAC6, 0x1FAC6), (0x1FAC8, 0x1FAC8), (0x1FACC, 0x1FACD), (0x1FADC, 0x1FADD),
    (0x1FADF, 0x1FADF), (0x1FAE9, 0x1FAEB), (0x1FAEF, 0x1FAEF), (0x1FAF9, 0x1FAFA), (0x1FBCB, 0x1FBEF),
    (0x1FBFA, 0x1FBFA), (0x2B73A, 0x2B73F), (0x2B81E, 0x2B81E), (0x2CEA2, 0x2CEAD), (0x323B0, 0x33479),
    (0x3D000, 0x3FC3F),
)
_LATER_UNICODE = regex.compile("[" + "".join(f"\\U{a:08x}-\\U{b:08x}" for a, b in _ASSIGNED_AFTER_UNICODE_15_1) + "]")
_UNASSIGNED = "\u0378"  # unassigned in every Unicode version so far


# Non-ASCII whitespace -> \x0B, what llama.cpp feeds std::wregex (see `unicode_regex_split`).
_WIDE_WS = {c: "\x0b" for c in (0x85, 0xA0, 0x1680, *range(0x2000, 0x200B), 0x2028, 0x2029, 0x202F,
                                0x205F, 0x3000)}


_WIDE_WS_CHARS = frozenset(map(chr, _WIDE_WS))
_FIRST_LATER = chr(_ASSIGNED_AFTER_UNICODE_15_1[0][0])


@lru_cache(maxsize=None)
def _compiled(pattern: str) -> regex.Pattern:
    return regex.compile(pattern)


def _split_spans(pattern: regex.Pattern, subject: str, start: int, end: int) -> list[tuple[int, int]]:
    """One chunk through one split regex (`unicode_regex_split_stl`): matches and the gaps
    between them, in order."""
    spans = []
    prev = start
    for m in pattern.finditer(subject, start, end):
        a, b = m.span()
        if a > prev:
            spans.append((prev, a))
        if b > a:
            spans.append((a, b))
        prev = b
    if prev < end:
        spans.append((prev, end))
    return spans


# ----------------------------------------------------------------------------------------------
# WPM helpers (`llm_tokenizer_wpm_session::preprocess`): llama.cpp's code point flags come from
# the `regex` module's categories, its NFD table keeps the first code point of the NFD form,
# and its lowercase table the first code point of str.lower().
# ----------------------------------------------------------------------------------------------

_WPM_KIND_SPACE, _WPM_KIND_DROP, _WPM_KIND_ALONE, _WPM_KIND_WORD = range(4)
_RE_WS = regex.compile(r"\s")
# \p{C} without Cn: llama.cpp's table (built from UnicodeData.txt) leaves unassigned code
# points UNDEFINED, so they stay in the word (which then becomes [UNK]) instead of being dropped
_RE_CONTROL = regex.compile(r"[\p{Cc}\p{Cf}\p{Co}\p{Cs}]")
_RE_PUNCT = regex.compile(r"\p{P}")
_RE_SYMBOL = regex.compile(r"\p{S}")
_RE_MARK = regex.compile(r"\p{M}")


def _is_chinese_char(cp: int) -> bool:
    # `llm_tokenizer_wpm_session::is_chinese_char` (its 0x2B920 start copies HF's Rust code)
    return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF
            or 0x2A700 <= cp <= 0x2B73F or 0x2B740 <= cp <= 0x2B81F or 0x2B920 <= cp <= 0x2CEAF
            or 0xF900 <= cp <= 0xFAFF or 0x2F800 <= cp <= 0x2FA1F)


def _wpm_char(ch: str, lowercase: bool, strip_accents: bool) -> tuple[int, str]:
    """(kind, normalised text) for one input character."""
    if _LATER_UNICODE.match(ch):  # unassigned to llama.cpp: no category, no case, no NFD
        return (_WPM_KIND_ALONE if _is_chinese_char(ord(ch)) else _WPM_KIND_WORD), ch
    if strip_accents:
        ch = unicodedata.normalize("NFD", ch)[0]
    cp = ord(ch)
    if _RE_WS.match(ch):
        return _WPM_KIND_SPACE, ""
    if cp == 0 or cp == 0xFFFD or _RE_CONTROL.match(ch) or (strip_accents and _RE_MARK.match(ch)):
        return _WPM_KIND_DROP, ""
    out = ch.lower()[0] if lowercase else ch
    if _RE_PUNCT.match(ch) or (cp < 0x7F and _RE_SYMBOL.match(ch)) or _is_chinese_char(cp):
        return _WPM_KIND_ALONE, out
    return _WPM_KIND_WORD, out


# ----------------------------------------------------------------------------------------------
# metadata helpers
# ----------------------------------------------------------------------------------------------

def _get_int(meta: Mapping[str, Any], key: str) -> int | None:
    value = meta.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TokenizerError(f"metadata {key} must be an integer, got {type(value).__name__}")
    return int(value)


def _get_bool(meta: Mapping[str, Any], key: str, default: bool) -> bool:
    value = meta.get(key)
    if value is None:
        return default
    if not isinstance(value, (bool, np.bool_)):
        raise TokenizerError(f"metadata {key} must be a bool, got {type(value).__name__}")
    return bool(value)


def _get_array(meta: Mapping[str, Any], key: str, n: int, kinds: str) -> np.ndarray | None:
    value = meta.get(key)
    if value is None:
        return None
    arr = np.asarray(value)
    if arr.ndim != 1 or arr.dtype.kind not in kinds:
        raise TokenizerError(f"metadata {key} must be a numeric array")
    if len(arr) < n:
        raise TokenizerError(f"metadata {key} has {len(arr)} entries for {n} tokens")
    return arr[:n]


# ----------------------------------------------------------------------------------------------
# the tokenizer
# ----------------------------------------------------------------------------------------------

_MAX_CACHE = 1 << 17  # cached words / SPM chunks before the cache is dropped and refilled


class Tokenizer:
    """A GGUF vocabulary: `encode`, `decode`, streaming detokenization and chat templates."""

    kind: str
    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    add_bos: bool
    add_eos: bool
    eos_ids: set[int]
    chat_template: str | None

    def __init__(self) -> None:  # use from_metadata
        self._cache: dict[str, tuple[int, ...]] = {}

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_metadata(cls, meta: Mapping[str, Any]) -> Tokenizer:
        """Build the tokenizer from GGUF metadata, as `llama_vocab::impl::load` does."""
        self = cls()
        model = meta.get(TK.MODEL)
        if not isinstance(model, str):
            raise TokenizerError(f"metadata has no {TK.MODEL}")
        pre_name = meta.get(TK.PRE)
        if pre_name is not None and not isinstance(pre_name, str):
            raise TokenizerError(f"metadata {TK.PRE} must be a string")

        tokens = meta.get(TK.LIST)
        if not isinstance(tokens, list) or not tokens or set(map(type, tokens)) != {str}:
            raise TokenizerError(f"metadata {TK.LIST} must be a non-empty string array")
        n = len(tokens)
        if not all(tokens):  # `load` renames empty entries
            tokens = [t if t else f"[EMPTY_{i}]" for i, t in enumerate(tokens)]
        tok2id = dict(zip(tokens, range(n), strict=True))
        if len(tok2id) != n:
            seen: set[str] = set()
            dup = next(t for t in tokens if t in seen or seen.add(t))
            raise TokenizerError(f"duplicate token in vocabulary: {dup!r}")

        self.kind = {"llama": "spm", "gpt2": "bpe", "bert": "wpm", "rwkv": "rwkv"}.get(model, "")
        if not self.kind:
            raise TokenizerError(f"unknown tokenizer model {model!r} (supported: llama, gpt2, bert, rwkv)")
        self.model = model
        self.pre = pre_name or "default"
        self.vocab_size = n
        self._tokens = tokens
        self._tok2id = tok2id

        # defaults per type (`load`), then metadata
        ids: dict[str, int | None] = dict(bos=None, eos=None, unk=None, sep=None, pad=None, mask=None)
        self.add_space_prefix = False
        self.add_bos = self.add_eos = self.add_sep = False
        self._ignore_merges = False
        if self.kind == "spm":
            ids.update(bos=1, eos=2, unk=0)
            self.add_space_prefix, self.add_bos = True, True
        elif self.kind == "wpm":
            ids.update(bos=101, unk=100, sep=102, pad=0, mask=103)
            self.add_bos, self.add_sep = True, True
        elif self.kind == "rwkv":
            pass  # no default ids, nothing added
        else:
            ids.update(bos=11, eos=11)
            if pre_name is not None and pre_name not in PRE_TOKENIZERS:
                raise TokenizerError(f"unknown pre-tokenizer {pre_name!r} for BPE "
                                     f"(known: {', '.join(sorted(PRE_TOKENIZERS))})")
            pre = PRE_TOKENIZERS[self.pre]
            self._pre = pre
            self._pre_patterns = [_compiled(split.pattern) for split in pre.splits]
            self._ignore_merges = pre.ignore_merges
            if pre.add_bos is not None:
                self.add_bos = pre.add_bos
            if pre.add_sep is not None:
                self.add_sep = pre.add_sep
            if pre.no_bos:
                ids["bos"] = None
            self._load_merges(meta)
        self.add_space_prefix = _get_bool(meta, TK.ADD_PREFIX, self.add_space_prefix)

        scores = _get_array(meta, TK.SCORES, n, "fiu")
        self._scores: list[float] = scores.astype(np.float32).tolist() if scores is not None else [0.0] * n
        # -inf/NaN scores would collide with the "no merge" marker of `_spm_merge`
        self._spm_heap_only = scores is not None and not bool(np.all(scores.astype(np.float32) > -np.inf))
        types = _get_array(meta, TK.TOKEN_TYPE, n, "iu")
        if types is None:
            attrs = [ATTR_NORMAL] * n
        else:
            lut = np.zeros(8, dtype=np.int64)
            for t, a in _TYPE_TO_ATTR.items():
                lut[int(t)] = a
            attrs = lut[np.where((types >= 0) & (types < 8), types, 0)].tolist()
        self._attrs: list[int] = attrs

        for role, key in (("bos", TK.BOS_ID), ("eos", TK.EOS_ID), ("unk", TK.UNK_ID),
                          ("sep", TK.SEP_ID), ("pad", TK.PAD_ID), ("mask", TK.MASK_ID)):
            if ids[role] is not None and ids[role] >= n:  # a default outside a small vocabulary
                ids[role] = None
            value = _get_int(meta, key)
            if value is not None and 0 <= value < n:  # out of range: keep the default, as llama.cpp
                ids[role] = value
        special: dict[str, int | None] = {}
        for role, key in (("eot", TK.EOT_ID), ("eom", TK.EOM_ID), ("fim_pre", TK.FIM_PRE_ID),
                          ("fim_suf", TK.FIM_SUF_ID), ("fim_mid", TK.FIM_MID_ID),
                          ("fim_pad", TK.FIM_PAD_ID), ("fim_rep", TK.FIM_REP_ID),
                          ("fim_sep", TK.FIM_SEP_ID)):
            value = _get_int(meta, key)
            special[role] = value if value is not None and 0 <= value < n else None
        for role, key in (("fim_pre", TK.PREFIX_ID), ("fim_suf", TK.SUFFIX_ID), ("fim_mid", TK.MIDDLE_ID)):
            value = _get_int(meta, key)  # deprecated spellings, read after the new ones as llama.cpp does
            if value is not None and 0 <= value < n:
                special[role] = value

        self.add_bos = _get_bool(meta, TK.ADD_BOS, self.add_bos)
        self.add_eos = _get_bool(meta, TK.ADD_EOS, self.add_eos)
        self.add_sep = _get_bool(meta, TK.ADD_SEP, self.add_sep)
        self.lowercase = _get_bool(meta, "tokenizer.ggml.normalizer.lowercase", True)
        self.strip_accents = _get_bool(meta, "tokenizer.ggml.normalizer.strip_accents", self.lowercase)

        self._detect_special_tokens(ids, special)
        self._apply_name_rules(meta)

        self.bos_id, self.eos_id, self.unk_id = ids["bos"], ids["eos"], ids["unk"]
        self.sep_id, self.pad_id, self.mask_id = ids["sep"], ids["pad"], ids["mask"]
        self.eot_id, self.eom_id = special["eot"], special["eom"]

        # special tokens in the order `tokenizer_st_partition` tries them: longest (in bytes) first
        partition = np.flatnonzero(np.array(self._attrs) & _ATTR_PARTITION).tolist()
        partition.sort(key=lambda i: (-len(tokens[i].encode("utf-8", "surrogateescape")), i))
        self._partition_all = [(tokens[i], i, self._attrs[i]) for i in partition]
        self._partition_user = [s for s in self._partition_all if not s[2] & _ATTR_SPECIAL]
        self._partition_first = {s[0][0] for s in self._partition_all}

        if self.kind == "spm":
            self._init_spm()
        elif self.kind == "wpm":
            self._max_token_chars = max(len(t) for t in tokens)
            self._wpm_chars: dict[str, tuple[int, str]] = {}
        elif self.kind == "rwkv":
            self._init_rwkv()

        self._pieces: list[bytes | None] = [None] * n
        template = meta.get(TK.CHAT_TEMPLATE)
        self.chat_template = template if isinstance(template, str) and template else None
        return self

    def _load_merges(self, meta: Mapping[str, Any]) -> None:
        merges = meta.get(TK.MERGES)
        if not isinstance(merges, list):
            raise TokenizerError(f"metadata has no {TK.MERGES} string array (required for gpt2)")
        pairs: list[tuple[str, str]] = []
        for m in merges:
            if not isinstance(m, str):
                raise TokenizerError(f"metadata {TK.MERGES} must hold strings")
            pos = m.find(" ", 1)  # `load`: the first space after the first character separates
            pairs.append((m[:pos], m[pos + 1:]) if pos >= 0 else ("", ""))
        # the first occurrence of a pair keeps its rank (`bpe_ranks.emplace`)
        self._ranks: dict[tuple[str, str], int] = {p: i for i, p in reversed(list(enumerate(pairs)))}

    def _detect_special_tokens(self, ids: dict[str, int | None], special: dict[str, int | None]) -> None:
        """End-of-generation and FIM tokens found by text, as `load` does after reading ids."""
        tok2id, attrs = self._tok2id, self._attrs

        def mark_control(i: int) -> None:
            attrs[i] |= ATTR_CONTROL

        for role, texts in (("eot", _EOT_TEXTS), ("eom", _EOM_TEXTS),
                            *((f"fim_{k}", v) for k, v in _FIM_TEXTS.items())):
            # llama.cpp walks an unordered_map, so which of several candidates wins is not
            # defined there; only the first in list order is taken here.
            found = [tok2id[t] for t in texts if t in tok2id]
            if special[role] is None and found:
                special[role] = found[0]
                mark_control(found[0])
        for i in np.flatnonzero(np.array(attrs) & ATTR_CONTROL).tolist():  # controls named "unused"
            if "unused" in self._tokens[i]:
                attrs[i] |= ATTR_UNUSED

        eog = {special[r] for r in ("fim_pad", "fim_rep", "fim_sep") if special[r] is not None}
        for text in _EOG_TEXTS:
            i = tok2id.get(text)
            if i is not None:
                eog.add(i)
                mark_control(i)
        for text in _ALWAYS_RENDERED:
            if text in tok2id:
                attrs[tok2id[text]] = ATTR_USER_DEFINED
        eog.update(i for i in (ids["eos"], special["eot"], special["eom"]) if i is not None)
        # o200k_harmony / solar-open: "<|end|>" ends a message, not the generation
        texts = {self._tokens[i] for i in eog}
        if "<|end|>" in texts and (("<|return|>" in texts and ("<|call|>" in texts or "<|calls|>" in texts))
                                   or ({"<|call|>", "<|calls|>"} & texts and "<|flush|>" in texts)):
            end = tok2id["<|end|>"]
            eog.discard(end)
            attrs[end] = ATTR_USER_DEFINED
        if "<|tool_response>" in texts and "</s>" in texts:  # gemma4 / paddleocr
            s = tok2id["</s>"]
            eog.discard(s)
            attrs[s] = ATTR_NORMAL
        self.eos_ids = eog

    def _apply_name_rules(self, meta: Mapping[str, Any]) -> None:
        """Per-model LSTRIP/RSTRIP attributes `load` sets from names (they are not in GGUF)."""
        name = str(meta.get("general.name", "")).lower()
        arch = str(meta.get("general.architecture", ""))
        tok2id, attrs = self._tok2id, self._attrs
        if any(s in self.pre for s in ("jina-v2-de", "jina-v2-es", "jina-v2-code")) or \
                any(s in arch for s in ("nomic-bert-moe", "jina-bert-v3")):
            if "<mask>" in tok2id:
                attrs[tok2id["<mask>"]] |= ATTR_LSTRIP
        elif "phi-3" in name or "phi3" in name:
            for i, a in enumerate(attrs):
                if a & _ATTR_PARTITION:
                    attrs[i] = a | ATTR_RSTRIP
            for text, on in (("</s>", True), ("<unk>", False), ("<s>", False), ("<|endoftext|>", False)):
                if text in tok2id:
                    i = tok2id[text]
                    attrs[i] = attrs[i] | ATTR_RSTRIP if on else attrs[i] & ~ATTR_RSTRIP
        elif "modern-bert" in name and "[MASK]" in tok2id:
            attrs[tok2id["[MASK]"]] |= ATTR_LSTRIP

    def _init_spm(self) -> None:
        tok2id = self._tok2id
        # `byte_to_token`: <0xNN>, else the byte itself as a one-byte token
        self._byte_ids: list[int | None] = []
        for b in range(256):
            i = tok2id.get(f"<0x{b:02X}>")
            if i is None:
                i = tok2id.get(bytes([b]).decode("utf-8", "surrogateescape"))
            self._byte_ids.append(i)
        # Vocabulary entries with U+2581 after another character can span a word start; chunks
        # are only cut where none of them occurs (see `_spm_fragment`).
        inner = [t for t in self._tokens if t.find(_SPACE_MARK, 1) > 0 and regex.search("[^\u2581]\u2581", t)]
        self._spm_inner = (regex.compile("|".join(regex.escape(t) for t in sorted(inner, key=len, reverse=True)))
                           if inner else None)
        self._spm_chunks = regex.compile("\u2581*[^\u2581]+|\u2581+")

    def _init_rwkv(self) -> None:
        """A byte trie of the unescaped tokens (`llm_tokenizer_rwkv`): nested dicts, byte ->
        [children, token id or None]; a later token with the same bytes wins, as there."""
        self._rwkv_trie: dict[int, list] = {}
        for i, token in enumerate(self._tokens):
            node, entry = self._rwkv_trie, None
            for b in _unescape_rwkv(token):
                entry = node.setdefault(b, [{}, None])
                node = entry[0]
            if entry is not None:
                entry[1] = i

    # ------------------------------------------------------------------ encoding

    def encode(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        """Token ids for `text`, as `llama_tokenize(text, add_special, parse_special)`.

        add_special: add BOS/EOS (SEP for BERT) as the metadata asks.
        parse_special: match control tokens written in the text (e.g. "<|im_start|>");
        user-defined tokens are always matched, as in llama.cpp.
        """
        if not isinstance(text, str):
            raise TokenizerError(f"encode takes a str, got {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates: what llama.cpp makes of invalid UTF-8
            text = text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
        fragments = self._partition(text, parse_special) if text else []
        out: list[int] = []
        if add_special and ((self.add_bos and self.bos_id is None) or (self.add_eos and self.eos_id is None)):
            # llama.cpp asserts here (newer versions refuse such a file in `load`)
            raise TokenizerError("the metadata asks for BOS/EOS tokens that the vocabulary does not have")
        if self.kind == "spm":
            # `llama_vocab::impl::tokenize`, LLAMA_VOCAB_TYPE_SPM
            if add_special and self.add_bos:
                out.append(self.bos_id)
            prev_special = True  # a space prefix goes at the start and after each special token
            for frag in fragments:
                if isinstance(frag, str):
                    self._spm_fragment(" " + frag if self.add_space_prefix and prev_special else frag, out)
                    prev_special = False
                else:
                    out.append(frag)
                    prev_special = True
            if add_special and self.add_eos:
                out.append(self.eos_id)
        elif self.kind == "bpe":
            if add_special and self.add_bos:
                out.append(self.bos_id)
            for frag in fragments:
                if isinstance(frag, str):
                    self._bpe_fragment(frag, out)
                else:
                    out.append(frag)
            if add_special and self.add_eos:
                out.append(self.eos_id)
        elif self.kind == "rwkv":  # `llm_tokenizer_rwkv_session`: no BOS/EOS
            for frag in fragments:
                if isinstance(frag, str):
                    self._rwkv_fragment(frag.encode("utf-8", "surrogateescape"), out)
                else:
                    out.append(frag)
        else:
            if add_special:  # BERT: [CLS] ... [SEP]
                if self.bos_id is None:
                    raise TokenizerError("this vocabulary has no CLS/BOS token")
                out.append(self.bos_id)
            for frag in fragments:
                if isinstance(frag, str):
                    self._wpm_fragment(frag, out)
                else:
                    out.append(frag)
            if add_special:
                if self.sep_id is None:
                    raise TokenizerError("this vocabulary has no SEP token")
                out.append(self.sep_id)
        return out

    def _rwkv_fragment(self, text: bytes, out: list[int]) -> None:
        """Greedy longest match through the byte trie, as `llm_tokenizer_rwkv_session`
        walks it (an unmatched byte is UNK)."""
        position, n = 0, len(text)
        while position < n:
            entry = self._rwkv_trie.get(text[position])
            if entry is None:
                if self.unk_id is None:
                    raise TokenizerError(f"byte {text[position]:#04x} has no token and the vocabulary has no UNK")
                out.append(self.unk_id)
                position += 1
                continue
            token_id, token_end = None, position + 1
            while entry is not None:
                if entry[1] is not None:
                    token_id, token_end = entry[1], position + 1
                if position + 1 >= n:
                    break
                position += 1
                entry = entry[0].get(text[position])
            if token_id is None:  # a prefix of tokens only: llama.cpp emits token 0 and restarts
                raise TokenizerError(f"bytes at {token_end - 1} start tokens but are none: a malformed RWKV vocabulary")
            out.append(token_id)
            position = token_end

    def _partition(self, text: str, parse_special: bool) -> list[str | int]:
        """Cut special tokens out of `text` (`llama_vocab::impl::tokenizer_st_partition`).

        llama.cpp takes the special tokens longest first and splits every remaining text
        fragment at each leftmost, non-overlapping occurrence. Fragments are the gaps between
        tokens already placed, so the same result comes from searching the whole text and
        rejecting any occurrence that overlaps a placed token.
        """
        specials = self._partition_all if parse_special else self._partition_user
        if not specials:
            return [text]
        first = self._partition_first
        present = {c for c in first if c in text} if len(first) <= 16 else first.intersection(text)
        if not present:
            return [text]
        n = len(text)
        covered: bytearray | None = None
        placed: list[tuple[int, int, int]] = []
        for tok, tid, attr in specials:
            if tok[0] not in present:
                continue
            pos = text.find(tok)
            if pos < 0:
                continue
            if covered is None:
                covered = bytearray(n)
            size = len(tok)
            while pos >= 0:
                end = pos + size
                hit = covered.find(1, pos, end)
                if hit >= 0:  # straddles a placed token: resume in the next free gap
                    free = covered.find(0, hit)
                    if free < 0:
                        break
                    pos = text.find(tok, free)
                    continue
                start, stop = pos, end
                if attr & ATTR_LSTRIP:
                    while start > 0 and not covered[start - 1] and text[start - 1] in _C_SPACE:
                        start -= 1
                if attr & ATTR_RSTRIP:
                    while stop < n and not covered[stop] and text[stop] in _C_SPACE:
                        stop += 1
                covered[start:stop] = b"\x01" * (stop - start)
                placed.append((start, stop, tid))
                pos = text.find(tok, stop)
        if not placed:
            return [text]
        placed.sort()
        out: list[str | int] = []
        prev = 0
        for start, stop, tid in placed:
            if start > prev:
                out.append(text[prev:start])
            out.append(tid)
            prev = stop
        if prev < n:
            out.append(text[prev:])
        return out

    # --- SPM

    def _spm_fragment(self, text: str, out: list[int]) -> None:
        """One raw fragment through `llm_tokenizer_spm_session::tokenize`, chunk by chunk.

        The escaped text is cut before each run of U+2581 that follows another character:
        merged symbols are always vocabulary entries, and no entry spans such a cut unless it
        is one of `_spm_inner` occurring right there, in which case the cut is skipped.
        """
        text = text.replace(" ", _SPACE_MARK)
        cache, extend = self._cache, out.extend
        if self._spm_inner is not None and self._spm_inner.search(text):
            chunks = self._spm_join_inner(text)
        else:
            chunks = self._spm_chunks.findall(text)
        for chunk in chunks:
            ids = cache.get(chunk)
            if ids is None:
                ids = self._spm_chunk(chunk)
                if len(cache) >= _MAX_CACHE:
                    cache.clear()
                cache[chunk] = ids
            extend(ids)

    def _spm_join_inner(self, text: str) -> list[str]:
        spans = [m.span() for m in self._spm_chunks.finditer(text)]
        blocked = set()
        for m in self._spm_inner.finditer(text, overlapped=True):
            blocked.update(range(m.start() + 1, m.end()))
        chunks: list[str] = []
        start = 0
        for a, _ in spans[1:]:
            if a not in blocked:
                chunks.append(text[start:a])
                start = a
        chunks.append(text[start:])
        return chunks

    def _spm_chunk(self, text: str) -> tuple[int, ...]:
        symbols = self._spm_merge_heap(text) if len(text) > 24 or self._spm_heap_only else self._spm_merge(text)
        tok2id, byte_ids = self._tok2id, self._byte_ids
        ids: list[int] = []
        for sym in symbols:  # `resegment`: a symbol is a token, or falls back to its bytes
            i = tok2id.get(sym)
            if i is not None:
                ids.append(i)
            else:
                for b in sym.encode("utf-8", "surrogateescape"):
                    bi = byte_ids[b]
                    ids.append(bi if bi is not None else self._unk_or_fail(b))
        return tuple(ids)

    def _unk_or_fail(self, byte: int) -> int:
        # llama.cpp throws (token_to_id.at) when a byte has no token; use UNK when there is one
        if self.unk_id is None:
            raise TokenizerError(f"byte 0x{byte:02X} has no token and the vocabulary has no UNK")
        return self.unk_id

    def _spm_merge(self, text: str) -> list[str]:
        """Short chunks: repeatedly merge the best adjacent pair (highest score, leftmost).

        The same choices as llama.cpp's priority queue: its live entries are exactly the
        current adjacent pairs that form a vocabulary entry, ordered by (score, left position).
        """
        tok2id, scores = self._tok2id, self._scores
        syms = list(text)
        neg_inf = float("-inf")
        pair = []
        for i in range(len(syms) - 1):
            t = tok2id.get(syms[i] + syms[i + 1])
            pair.append(scores[t] if t is not None else neg_inf)
        while pair:
            best = max(pair)
            if best == neg_inf:
                break
            i = pair.index(best)
            merged = syms[i] + syms[i + 1]
            syms[i:i + 2] = [merged]
            del pair[i]
            if i > 0:
                t = tok2id.get(syms[i - 1] + merged)
                pair[i - 1] = scores[t] if t is not None else neg_inf
            if i < len(pair):
                t = tok2id.get(merged + syms[i + 1])
                pair[i] = scores[t] if t is not None else neg_inf
        return syms

    def _spm_merge_heap(self, text: str) -> list[str]:
        """Long chunks: llama.cpp's work queue itself (`llm_tokenizer_spm_session::tokenize`)."""
        tok2id, scores = self._tok2id, self._scores
        syms = list(text)
        n = len(syms)
        nxt = list(range(1, n + 1))
        nxt[-1] = -1
        prv = list(range(-1, n - 1))
        heap: list[tuple[float, int, int, int]] = []

        def bigram(left: int, right: int) -> tuple[float, int, int, int] | None:
            t = tok2id.get(syms[left] + syms[right])
            if t is None:
                return None
            return (-scores[t], left, right, len(syms[left]) + len(syms[right]))

        for i in range(n - 1):
            b = bigram(i, i + 1)
            if b is not None:
                heap.append(b)
        heapq.heapify(heap)
        while heap:
            _, left, right, size = heapq.heappop(heap)
            sl, sr = syms[left], syms[right]
            if not sl or not sr or len(sl) + len(sr) != size:  # a side already changed
                continue
            syms[left], syms[right] = sl + sr, ""
            after = nxt[right]
            nxt[left] = after
            if after >= 0:
                prv[after] = left
            if prv[left] >= 0 and (b := bigram(prv[left], left)) is not None:
                heapq.heappush(heap, b)
            if after >= 0 and (b := bigram(left, after)) is not None:
                heapq.heappush(heap, b)
        return [s for s in syms if s]

    # --- BPE

    def _pretokenize(self, text: str) -> list[str]:
        """`unicode_regex_split`: each split regex cuts every chunk into matches and gaps."""
        wide_text = category_text = text
        if not text.isascii():
            chars = set(text)
            if not _WIDE_WS_CHARS.isdisjoint(chars):  # std::wregex sees non-ASCII whitespace as \x0B
                wide_text = text.translate(_WIDE_WS)
            later = [c for c in chars if c >= _FIRST_LATER and _LATER_UNICODE.match(c)]
            if later:  # categories as of Unicode 15.1; one code point for one keeps offsets valid
                category_text = text.translate(dict.fromkeys(map(ord, later), _UNASSIGNED))
        spans = [(0, len(text))]
        last = len(self._pre_patterns) - 1
        for k, (split, pattern) in enumerate(zip(self._pre.splits, self._pre_patterns, strict=True)):
            subject = wide_text if split.wide else category_text
            if k == last and subject is text and not pattern.groups:
                # last split on the text itself: where the matches tile a chunk (the usual case)
                # findall gives its words without building spans
                words: list[str] = []
                for start, end in spans:
                    found = pattern.findall(text, start, end)
                    if sum(map(len, found)) == end - start:
                        words.extend(found)
                    else:
                        words.extend(text[a:b] for a, b in _split_spans(pattern, text, start, end))
                return words
            new: list[tuple[int, int]] = []
            for start, end in spans:
                new.extend(_split_spans(pattern, subject, start, end))
            spans = new
        return [text[a:b] for a, b in spans]

    def _bpe_fragment(self, text: str, out: list[int]) -> None:
        """`llm_tokenizer_bpe_session::tokenize`, one cached result per pre-tokenized word."""
        cache, extend = self._cache, out.extend
        for word in self._pretokenize(text):
            ids = cache.get(word)
            if ids is None:
                ids = self._bpe_word(word)
                if len(cache) >= _MAX_CACHE:
                    cache.clear()
                cache[word] = ids
            extend(ids)

    def _bpe_word(self, word: str) -> tuple[int, ...]:
        encoded = word.encode("utf-8", "surrogatepass").decode("latin-1").translate(_BYTE_TO_CHAR)
        tok2id = self._tok2id
        if self._ignore_merges and encoded in tok2id:
            return (tok2id[encoded],)
        symbols = self._bpe_merge(encoded) if len(encoded) <= 48 else self._bpe_merge_heap(encoded)
        ids: list[int] = []
        for sym in symbols:
            i = tok2id.get(sym)
            if i is not None:
                ids.append(i)
                continue
            # no token: each byte of the symbol's UTF-8 as a one-byte token, else dropped
            for b in sym.encode("utf-8"):
                i = tok2id.get(bytes([b]).decode("utf-8", "surrogateescape"))
                if i is not None:
                    ids.append(i)
        return tuple(ids)

    def _bpe_merge(self, word: str) -> list[str]:
        """Short words: merge the adjacent pair of lowest rank (leftmost on ties) until none
        is left — the order llama.cpp's `llm_bigram_bpe` queue pops its live entries in."""
        ranks = self._ranks
        syms = list(word)
        rank = [ranks.get((syms[i], syms[i + 1]), _NO_RANK) for i in range(len(syms) - 1)]
        while rank:
            best = min(rank)
            if best == _NO_RANK:
                break
            i = rank.index(best)
            merged = syms[i] + syms[i + 1]
            syms[i:i + 2] = [merged]
            del rank[i]
            if i > 0:
                rank[i - 1] = ranks.get((syms[i - 1], merged), _NO_RANK)
            if i < len(rank):
                rank[i] = ranks.get((merged, syms[i + 1]), _NO_RANK)
        return syms

    def _bpe_merge_heap(self, word: str) -> list[str]:
        """Long words: llama.cpp's work queue itself (`llm_tokenizer_bpe_session::tokenize`)."""
        ranks = self._ranks
        syms = list(word)
        n = len(syms)
        nxt = list(range(1, n + 1))
        nxt[-1] = -1
        prv = list(range(-1, n - 1))
        heap: list[tuple[int, int, int, str]] = []

        def bigram(left: int, right: int) -> tuple[int, int, int, str] | None:
            r = ranks.get((syms[left], syms[right]))
            return None if r is None else (r, left, right, syms[left] + syms[right])

        for i in range(n - 1):
            b = bigram(i, i + 1)
            if b is not None:
                heap.append(b)
        heapq.heapify(heap)
        while heap:
            _, left, right, text = heapq.heappop(heap)
            sl, sr = syms[left], syms[right]
            if not sl or not sr or sl + sr != text:  # outdated entry
                continue
            syms[left], syms[right] = text, ""
            after = nxt[right]
            nxt[left] = after
            if after >= 0:
                prv[after] = left
            if prv[left] >= 0 and (b := bigram(prv[left], left)) is not None:
                heapq.heappush(heap, b)
            if after >= 0 and (b := bigram(left, after)) is not None:
                heapq.heappush(heap, b)
        return [s for s in syms if s]

    # --- WPM

    def _wpm_fragment(self, text: str, out: list[int]) -> None:
        """`llm_tokenizer_wpm_session::tokenize`: normalise and split (`preprocess`), then
        longest-match pieces per word, cached."""
        words: list[str] = []
        word: list[str] = []
        chars, lower, strip = self._wpm_chars, self.lowercase, self.strip_accents
        for ch in text:
            kind_norm = chars.get(ch)
            if kind_norm is None:
                kind_norm = chars[ch] = _wpm_char(ch, lower, strip)
            kind, norm = kind_norm
            if kind == _WPM_KIND_WORD:
                word.append(norm)
            elif kind == _WPM_KIND_ALONE:
                if word:
                    words.append("".join(word))
                    word = []
                words.append(norm)
            elif kind == _WPM_KIND_SPACE and word:
                words.append("".join(word))
                word = []
        if word:
            words.append("".join(word))
        cache = self._cache
        for w in words:
            ids = cache.get(w)
            if ids is None:
                ids = self._wpm_word(w)
                if len(cache) >= _MAX_CACHE:
                    cache.clear()
                cache[w] = ids
            out.extend(ids)

    def _wpm_word(self, word: str) -> tuple[int, ...]:
        tok2id, max_len = self._tok2id, self._max_token_chars
        w = _SPACE_MARK + word  # the phantom space marks a word start
        n = len(w)
        ids: list[int] = []
        i = 0
        while i < n:
            for j in range(min(n, i + max_len), i, -1):
                t = tok2id.get(w[i:j])
                if t is not None:
                    ids.append(t)
                    i = j
                    break
            else:  # a piece with no token: the whole word is unknown
                ids = []
                break
        if not ids:
            if self.unk_id is None:
                raise TokenizerError("a word has no tokens and the vocabulary has no UNK")
            ids = [self.unk_id]
        return tuple(ids)

    # ------------------------------------------------------------------ decoding

    def token_to_bytes(self, id: int) -> bytes:
        """The bytes a token stands for (`token_to_piece` with special tokens rendered)."""
        if not 0 <= id < self.vocab_size:
            raise TokenizerError(f"token id {id} is outside the vocabulary (0..{self.vocab_size - 1})")
        piece = self._pieces[id]
        if piece is None:
            piece = self._pieces[id] = self._make_piece(id)
        return piece

    def _make_piece(self, id: int) -> bytes:
        attr, text = self._attrs[id], self._tokens[id]
        if self.kind == "rwkv":  # every token is its escaped bytes
            return _unescape_rwkv(text)
        if attr & (_ATTR_SPECIAL | ATTR_USER_DEFINED):
            return text.encode("utf-8", "surrogateescape")
        if attr & ATTR_NORMAL:
            if self.kind == "bpe":
                # byte-level text -> bytes; a character outside the table is kept as UTF-8
                # (llama.cpp writes "[UNK_BYTE_0x..]" there)
                table = _CHAR_TO_BYTE
                return b"".join(bytes([table[c]]) if c in table else c.encode("utf-8", "surrogateescape")
                                for c in text)
            return text.replace(_SPACE_MARK, " ").encode("utf-8", "surrogateescape")
        if attr & ATTR_BYTE and len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
            return bytes([int(text[3:5], 16)])
        return b""

    def is_special(self, id: int) -> bool:
        """Control or unknown: hidden by `decode(skip_special=True)`."""
        if not 0 <= id < self.vocab_size:
            raise TokenizerError(f"token id {id} is outside the vocabulary (0..{self.vocab_size - 1})")
        return bool(self._attrs[id] & _ATTR_SPECIAL)

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        """Text for `ids`; invalid UTF-8 becomes U+FFFD.

        For SPM vocabularies with `add_space_prefix` the one space `encode` puts at the start
        (and after each special token) is removed again, so `decode(encode(s)) == s`.
        """
        strip = self.add_space_prefix and self.kind == "spm"
        detok = self.detokenizer(skip_special=skip_special, strip_prefix_space=strip)
        return "".join([detok.add(i) for i in ids]) + detok.flush()

    def detokenizer(self, skip_special: bool = False, strip_prefix_space: bool = False) -> StreamingDetokenizer:
        """A streaming detokenizer: `.add(id)` returns only complete UTF-8 text, `.flush()` the rest."""
        return StreamingDetokenizer(self, skip_special, strip_prefix_space)

    # ------------------------------------------------------------------ chat

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tools: list | None = None, **kwargs: Any) -> str:
        """Render the model's chat template (or the documented fallback) for `messages`."""
        template = self.chat_template or fallback_chat_template(self._tok2id)
        special = {"bos_token": self.bos_id, "eos_token": self.eos_id, "unk_token": self.unk_id,
                   "pad_token": self.pad_id, "sep_token": self.sep_id}
        for name, i in special.items():
            kwargs.setdefault(name, self._tokens[i] if i is not None else "")
        return render_chat_template(template, messages, add_generation_prompt=add_generation_prompt,
                                    tools=tools, **kwargs)

    def __repr__(self) -> str:
        pre = f", pre={self.pre!r}" if self.kind == "bpe" else ""
        return f"Tokenizer(kind={self.kind!r}{pre}, vocab_size={self.vocab_size})"


class StreamingDetokenizer:
    """Turns token ids into text one at a time without ever splitting a UTF-8 character.

    Bytes of a character cut across tokens (byte-fallback or byte-level pieces) are held back
    until the character is complete; bytes that can never form one come out as U+FFFD.
    With `strip_prefix_space`, the leading space of the first text piece, and of the first one
    after a special token, is dropped (SentencePiece's "▁" added by `encode`).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = False, strip_prefix_space: bool = False):
        self._tok = tokenizer
        self._skip_special = skip_special
        self._strip = strip_prefix_space
        self._at_start = True
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, id: int) -> str:
        tok = self._tok
        attr = tok._attrs[id] if 0 <= id < tok.vocab_size else 0
        piece = tok.token_to_bytes(id)
        if attr & _ATTR_PARTITION:
            self._at_start = True
            if self._skip_special and attr & _ATTR_SPECIAL:
                return ""
        elif piece and self._at_start:
            self._at_start = False
            if self._strip and piece[:1] == b" ":
                piece = piece[1:]
        return self._decoder.decode(piece)

    def flush(self) -> str:
        """Whatever is held back (an unfinished character becomes U+FFFD); resets the state."""
        text = self._decoder.decode(b"", final=True)
        self._decoder.reset()
        self._at_start = True
        return text
