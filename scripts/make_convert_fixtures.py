"""Regenerate tests/fixtures/hf/: tiny Hugging Face checkpoints and what llama.cpp's own
converter makes of them, the oracle of tests/test_convert.py.

For each fixture (the architecture table of scripts/make_arch_fixtures.py, same tiny
sizes, random weights and tokenizers):

1. transformers builds the model and saves it with `save_pretrained` in the dtype the
   entry asks for (bfloat16 by default: half the bytes, and the converter's widening is
   exercised; one entry float16 and sharded, one float32).
2. llama.cpp's `convert_hf_to_gguf.py` (vendored in llama-cpp-python's tree, run with the
   patches make_arch_fixtures.py applies) converts it at every outtype in OUTTYPES; the
   GGUF files themselves are not kept: `reference.json` records, per outtype, every tensor's
   name, shape, type and sha256 of its bytes, and every metadata key's value.
3. llama-cpp-python evaluates the F32 file on 16 token ids: `logits.npy` (an encoder's
   hidden states, pooling none).

    python scripts/make_convert_fixtures.py            # every fixture
    python scripts/make_convert_fixtures.py llama qwen3
    python scripts/make_convert_fixtures.py --pre-table  # rewrite mlxllm/_bpe_pre.py
    python scripts/make_convert_fixtures.py --hf-outputs [NAMES]  # hf_logits.npy only

`--hf-outputs` loads each committed checkpoint with transformers (float32, eager attention)
and saves its own outputs for reference.json's token ids as `hf_logits.npy` beside
logits.npy (a decoder's logits, an encoder's last hidden states), the checkpoint's truth
that tests/test_convert.py holds our converted file to; it prints how far llama.cpp's
logits.npy is from them. A checkpoint transformers has no class for (remote code) is
reported and skipped.

`--pre-table` reads the pre-tokenizer hashes (sha256 of the token ids of a fixed text ->
tokenizer.ggml.pre) out of llama.cpp's converter source into mlxllm/_bpe_pre.py: data,
regenerated here whenever the vendored llama.cpp is updated.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_arch_fixtures as F

ROOT = F.ROOT
OUT = ROOT / "tests" / "fixtures" / "hf"
OUTTYPES = ("f32", "f16", "bf16", "q8_0")
# Tensors computed through exp (Mamba's A = -exp(A_log)): torch's and numpy's float32 exp may
# differ in the last bit, so their values are kept for a comparison in units in the last place.
VALUES_KEPT = (".ssm_a",)
N_IDS = 16
# hf_logits.npy is stored in float16 where that rounding moves no value by more than this
# times the outputs' std (a fifth of tests/test_convert.py's 5e-3 bound; about 60% of the
# files, 1.1 MB in all instead of 1.7 MB), else in float32
F16_STORAGE_ERROR = 1e-3

# Rewritten checkpoints (make_arch_fixtures' `rewrite`) saved in the entry's dtype rather than
# float32 (half the bytes; the fixtures made before this set stay float32 as committed).
CAST_REWRITES = {"internlm2", "gpt-oss", "qwen3next", "qwen35", "qwen35moe", "rwkv6", "rwkv7", "xlm-roberta"}

FP4_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # E2M1 codes 0-7 (8-15: negated)


def _mxfp4_pack(w):
    """OpenAI's MXFP4 of w [..., cols] (torch, float): blocks [..., cols / 32, 16] holding
    values 2j and 2j + 1 in the low and high nibble, scales [..., cols / 32] (2^(s - 127)),
    the layout transformers' integrations/mxfp4.py reads back."""
    import numpy as np
    import torch

    x = w.detach().float().numpy().reshape(*w.shape[:-1], w.shape[-1] // 32, 32)
    amax = np.abs(x).max(-1)
    exp = np.where(amax > 0, np.ceil(np.log2(np.maximum(amax, 1e-30) / 6.0)), -127).astype(np.int32)
    exp = np.clip(exp, -127, 127)
    scaled = x / np.ldexp(1.0, exp)[..., None]
    lut = np.array(FP4_MAGNITUDES)
    codes = np.abs(np.abs(scaled)[..., None] - lut).argmin(-1).astype(np.uint8)
    codes |= np.where((scaled < 0) & (codes > 0), 8, 0).astype(np.uint8)
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return torch.from_numpy(np.ascontiguousarray(blocks)), torch.from_numpy((exp + 127).astype(np.uint8))


def _two_layer_gdn(name: str) -> dict:
    """A gated-delta-net spec of make_arch_fixtures with one layer of each kind (a delta net,
    a full attention) instead of two and experts half as wide: half the bytes, every tensor
    kind still converted (the rewrite adds the multi-token-prediction layer after them)."""
    spec = dict(F.ARCHS[name])
    spec["kw"] = {**spec["kw"], "num_hidden_layers": 2, "layer_types": ["linear_attention", "full_attention"]}
    if "moe_intermediate_size" in spec["kw"]:  # experts half as wide (they are most of the bytes)
        spec["kw"].update(moe_intermediate_size=32, shared_expert_intermediate_size=32)
    return spec


def _one_head_rwkv7() -> dict:
    """make_arch_fixtures' RWKV-7 spec at half the width: one head of 64 (ggml's SIMD wkv7
    needs heads of 64) over hidden 64, a quarter of the bytes; the converter's transforms do
    not depend on the head count."""
    spec = dict(F.ARCHS["rwkv7"])
    spec["kw"] = {**spec["kw"], "hidden_size": F.HIDDEN, "attention_hidden_size": F.HIDDEN}
    rewrite = spec["rewrite"]

    def narrow(model, config: dict, d: Path) -> dict:
        saved = F.RWKV7_HIDDEN
        F.RWKV7_HIDDEN = F.HIDDEN  # (the rewrite reads the module's width)
        try:
            return rewrite(model, config, d)
        finally:
            F.RWKV7_HIDDEN = saved

    spec["rewrite"] = narrow
    return spec


def _gpt_oss_mxfp4_checkpoint(model, config: dict, d: Path) -> dict:
    """The saved gpt-oss checkpoint with its experts in MXFP4, as openai/gpt-oss-* ship them:
    per layer gate_up_proj_blocks/_scales (rows = the interleaved gate/up outputs) and
    down_proj_blocks/_scales, biases kept, quantization_config mxfp4."""
    import torch
    from safetensors.torch import save_file

    out = {}
    for k, v in model.state_dict().items():
        v = v.detach().contiguous()
        if k.endswith(("experts.gate_up_proj", "experts.down_proj")):  # [E, in, out] -> rows = outputs
            blocks, scales = _mxfp4_pack(v.transpose(1, 2))
            out[k + "_blocks"], out[k + "_scales"] = blocks, scales
        else:
            out[k] = v
    for f in d.glob("*.safetensors"):
        f.unlink()
    save_file({k: v.contiguous() for k, v in out.items()}, str(d / "model.safetensors"), metadata={"format": "pt"})
    config["quantization_config"] = {"quant_method": "mxfp4",
                                     "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                                "model.embed_tokens", "lm_head"]}
    (d / "config.json").write_text(json.dumps(config, indent=1))
    return config


XLMR_SPM_VOCAB = F.VOCAB - 2  # transformers' XLM-R ids: 4 specials + pieces 3.. + <mask> = VOCAB
# A few normalization rules (code points -> replacement): a precompiled charsmap of about 1 KB,
# where the rules XLM-R ships (nmt_nfkc) make one of about 240 KB
XLMR_NORMALIZATION = (("FF21", "41"), ("FF22", "42"), ("3000", "20"), ("2026", "2E 2E 2E"))


def _xlmr_tokenizer(model, config: dict, d: Path) -> dict:
    """The checkpoint with XLM-R's tokenizer files: a unigram sentencepiece.bpe.model (ids
    0-2 <unk> <s> </s>, as XLM-R's) trained on make_arch_fixtures' text, and
    XLMRobertaTokenizer's tokenizer_config.json, in place of the spm tokenizer."""
    import io

    import sentencepiece as spmlib

    for f in ("tokenizer.model", "tokenizer_config.json"):
        (d / f).unlink(missing_ok=True)
    with tempfile.TemporaryDirectory() as td:
        rules = Path(td) / "rules.tsv"
        rules.write_text("".join(f"{src}\t{dst}\n" for src, dst in XLMR_NORMALIZATION))
        buf = io.BytesIO()
        spmlib.SentencePieceTrainer.train(
            sentence_iterator=iter(F._training_text()), model_writer=buf, vocab_size=XLMR_SPM_VOCAB,
            model_type="unigram", character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            normalization_rule_tsv=str(rules), num_threads=1, minloglevel=2)
    (d / "sentencepiece.bpe.model").write_bytes(buf.getvalue())
    cfg = {"tokenizer_class": "XLMRobertaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "sep_token": "</s>",
           "cls_token": "<s>", "unk_token": "<unk>", "pad_token": "<pad>", "mask_token": "<mask>",
           "model_max_length": F.ENC_POS - 2}
    (d / "tokenizer_config.json").write_text(json.dumps(cfg, indent=1))
    return config


XLM_ROBERTA = {"arch": "bert", "cfg": "XLMRobertaConfig", "model": "XLMRobertaModel", "tok": "spm", "encoder": True,
               "pooling": "cls", "merge": {}, "rewrite": _xlmr_tokenizer,
               "kw": F._bert_kw(type_vocab_size=1, layer_norm_eps=1e-5, bos_token_id=0, pad_token_id=1, eos_token_id=2)}

# name -> (make_arch_fixtures spec name or a spec, checkpoint dtype, max shard size)
FIXTURES: dict[str, tuple] = {
    "llama": ("llama", "bfloat16", None),
    "llama-rope3": ("llama-rope3", "bfloat16", None),
    "llama-tied": ("llama-tied", "float32", None),
    "qwen2": ("qwen2", "bfloat16", None),
    "qwen3": ("qwen3", "float16", "150KB"),
    "gemma": ("gemma", "bfloat16", None),
    "gemma2": ("gemma2", "bfloat16", None),
    "gemma3": ({"arch": "gemma3", "cfg": "Gemma3TextConfig", "model": "Gemma3ForCausalLM", "tok": "spm", "merge": {},
                "kw": F._base(rms_norm_eps=1e-6, hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True,
                               sliding_window=F.SWA, query_pre_attn_scalar=F.HEAD_DIM, final_logit_softcapping=None,
                               num_hidden_layers=F.N_LAYERS, layer_types=["sliding_attention", "full_attention"],
                               rope_parameters={"full_attention": F._rope(1e6), "sliding_attention": F._rope(1e4)})},
               "bfloat16", None),
    "mixtral": ("mixtral", "bfloat16", None),
    "qwen2moe": ("qwen2moe", "bfloat16", None),
    "qwen3moe": ("qwen3moe", "bfloat16", None),
    "smollm3": ("smollm3", "bfloat16", None),
    "arcee": ("arcee", "bfloat16", None),
    "granite": ("granite", "bfloat16", None),
    "seed_oss": ("seed_oss", "bfloat16", None),
    "starcoder2": ("starcoder2", "bfloat16", None),
    "olmo": ("olmo", "bfloat16", None),
    "olmo2": ("olmo2", "bfloat16", None),
    "olmo3": ("olmo3", "bfloat16", None),
    "olmoe": ("olmoe", "bfloat16", None),
    "bert": ("bert", "bfloat16", None),
    # under the masked-LM head (bert. prefix, cls.predictions dropped) and a classifier head
    "bert-mlm": ({**F.ARCHS["bert"], "model": "BertForMaskedLM"}, "bfloat16", None),
    "bert-classifier": ("bert-classifier", "bfloat16", None),
    "distilbert": ("distilbert", "bfloat16", None),
    # under the masked-LM head: the distilbert. prefix and the head's vocab_* tensors dropped
    "distilbert-mlm": ({**F.ARCHS["distilbert"], "model": "DistilBertForMaskedLM"}, "bfloat16", None),
    # a classifier with named labels: pre_classifier -> cls, classifier -> cls.output
    "distilbert-classifier": ({**F.ARCHS["distilbert"], "model": "DistilBertForSequenceClassification", "pooling": None,
                               "kw": {**F.ARCHS["distilbert"]["kw"], "id2label": {0: "negative", 1: "positive"},
                                      "label2id": {"negative": 0, "positive": 1}}}, "bfloat16", None),
    "roberta": ("roberta", "bfloat16", None),
    "roberta-rerank": ("roberta-rerank", "bfloat16", None),
    # XLM-R's sentencepiece vocabulary (llama.cpp's UGM tokenizer) under RoBERTa's layers
    "xlm-roberta": (XLM_ROBERTA, "bfloat16", None),
    "command-r": ("command-r", "bfloat16", None),
    "cohere2": ("cohere2", "bfloat16", None),
    "stablelm": ("stablelm", "bfloat16", None),
    "stablelm-12b": ("stablelm-12b", "bfloat16", None),
    "exaone4": ("exaone4", "bfloat16", None),
    "granitemoe": ("granitemoe", "bfloat16", None),
    "granitemoeshared": ("granitemoeshared", "bfloat16", None),
    "ernie4_5": ("ernie4_5", "bfloat16", None),
    "gpt2": ("gpt2", "bfloat16", None),
    "starcoder": ("starcoder", "bfloat16", None),
    "gptneox": ("gptneox", "bfloat16", None),
    "phi2": ("phi2", "bfloat16", None),
    "nemotron": ("nemotron", "bfloat16", None),
    # the folder name becomes general.name, and llama.cpp special-cases names containing "phi3"
    # (it looks up Phi-3's own tokens, which the tiny vocabulary lacks)
    "phi-mini": ("phi3", "bfloat16", None),
    "phi-mini-longrope": ("phi3-longrope", "bfloat16", None),
    "bloom": ("bloom", "bfloat16", None),
    "falcon": ("falcon", "bfloat16", None),
    "falcon-40b": ("falcon-40b", "bfloat16", None),
    "mistral3": ("mistral3", "bfloat16", None),
    "apertus": ("apertus", "bfloat16", None),
    "phimoe": ("phimoe", "bfloat16", None),
    "dbrx": ("dbrx", "bfloat16", None),
    "ernie4_5-moe": ("ernie4_5-moe", "bfloat16", None),
    "llama4": ("llama4", "bfloat16", None),
    "mamba": ("mamba", "bfloat16", None),
    "falcon-mamba": ("falcon-mamba", "bfloat16", None),
    "mamba2": ("mamba2", "bfloat16", None),
    "hunyuan-dense": ("hunyuan-dense", "bfloat16", None),
    "glm4": ("glm4", "bfloat16", None),
    "deepseek2": ("deepseek2", "bfloat16", None),
    "deepseek2-lite": ("deepseek2-lite", "bfloat16", None),
    "dots1": ("dots1", "bfloat16", None),
    "bailingmoe": ("bailingmoe", "bfloat16", None),
    "mpt": ("mpt", "bfloat16", None),
    "eurobert": ("eurobert", "bfloat16", None),
    "modern-bert": ("modern-bert", "bfloat16", None),
    "modern-bert-rerank": ("modern-bert-rerank", "bfloat16", None),
    "lfm2": ("lfm2", "bfloat16", None),
    "lfm2moe": ("lfm2moe", "bfloat16", None),
    "nomic-bert": ("nomic-bert", "bfloat16", None),
    "jina-bert-v2": ("jina-bert-v2", "bfloat16", None),
    "jamba": ("jamba", "bfloat16", None),
    "glm4moe": ("glm4moe", "bfloat16", None),
    "granitehybrid": ("granitehybrid", "bfloat16", None),
    "hunyuan-moe": ("hunyuan-moe", "bfloat16", None),
    "internlm2": ("internlm2", "bfloat16", None),
    "chatglm": ("chatglm", "bfloat16", None),
    "minimax-m2": ("minimax-m2", "bfloat16", None),
    # the experts in MXFP4 as the released checkpoints hold them (the rest cast to bfloat16)
    "gpt-oss": ({**F.ARCHS["gpt-oss"], "rewrite": _gpt_oss_mxfp4_checkpoint}, "bfloat16", None),
    "falcon-h1": ("falcon-h1", "bfloat16", None),
    "nemotron_h": ("nemotron_h", "bfloat16", None),
    "nemotron_h_moe": ("nemotron_h_moe", "bfloat16", None),
    "qwen3next": (_two_layer_gdn("qwen3next"), "bfloat16", None),
    "qwen35": (_two_layer_gdn("qwen35"), "bfloat16", None),
    "qwen35moe": (_two_layer_gdn("qwen35moe"), "bfloat16", None),
    "rwkv6": ("rwkv6", "bfloat16", None),
    "rwkv7": (_one_head_rwkv7(), "bfloat16", None),
}


def _cast_safetensors(d: Path, dtype) -> None:
    import json as _json

    from safetensors.torch import load_file, save_file

    for f in d.glob("*.safetensors"):
        tensors = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in load_file(f).items()}
        save_file(tensors, str(f), metadata={"format": "pt"})
    config = _json.loads((d / "config.json").read_text())
    for key in [k for k in ("dtype", "torch_dtype") if k in config] or ["dtype"]:
        config[key] = str(dtype).removeprefix("torch.")
    (d / "config.json").write_text(_json.dumps(config, indent=1))


def _float32_copy(src: Path, dst: Path) -> Path:
    """llama.cpp's own dequantization of src: its quantizer with ftype ALL_F32."""
    import llama_cpp as lc

    params = lc.llama_model_quantize_default_params()
    params.ftype, params.allow_requantize, params.nthread = lc.LLAMA_FTYPE_ALL_F32, True, 2
    if lc.llama_model_quantize(str(src).encode(), str(dst).encode(), params) != 0:
        raise RuntimeError(f"llama_model_quantize could not dequantize {src}")
    return dst


def write_pre_table() -> None:
    src = (F.LLAMACPP / "conversion" / "base.py").read_text(encoding="utf-8")
    pairs = re.findall(r'if chkhsh == "([0-9a-f]{64})":\n(?:\s*#[^\n]*\n)*\s*res = "([^"]+)"', src)
    if len(pairs) < 50:
        raise SystemExit(f"found only {len(pairs)} hashes in {F.LLAMACPP}/conversion/base.py")
    lines = ['"""BPE pre-tokenizer identities: sha256 of the token ids of convert.PRE_CHECK_TEXT ->',
             "tokenizer.ggml.pre, as llama.cpp's convert_hf_to_gguf.py records them (generated by",
             'scripts/make_convert_fixtures.py --pre-table; do not edit)."""', "",
             "BPE_PRE_HASHES = {"]
    table = dict(pairs)  # a hash listed twice: the later entry wins, as in llama.cpp's chain of ifs
    lines += [f'    "{h}": "{name}",' for h, name in table.items()]
    lines += ["}", ""]
    (ROOT / "mlxllm" / "_bpe_pre.py").write_text("\n".join(lines))
    print(f"{len(pairs)} hashes")


def _convert_main(hf_dir: str, out: str, outtype: str) -> None:
    """In a child process: llama.cpp's converter, patched as make_arch_fixtures patches it."""
    sys.path.insert(0, str(F.LLAMACPP / "gguf-py"))
    sys.path.insert(0, str(F.LLAMACPP))
    from conversion import base

    base.TextModel.get_vocab_base_pre = lambda self, tokenizer: F.PRE
    orig_load = base.ModelBase.load_hparams

    def load_hparams(dir_model, is_mistral_format):
        config = orig_load(dir_model, is_mistral_format)
        for k, v in json.loads((Path(dir_model) / "config.json").read_text()).items():
            config.setdefault(k, v)
        return config

    base.ModelBase.load_hparams = staticmethod(load_hparams)
    F.patch_converter_classes(base)
    import convert_hf_to_gguf

    sys.argv = ["convert_hf_to_gguf.py", hf_dir, "--outfile", out, "--outtype", outtype]
    convert_hf_to_gguf.main()


def llamacpp_convert(hf_dir: Path, out: Path, outtype: str) -> None:
    r = subprocess.run([sys.executable, __file__, "--_convert", str(hf_dir), str(out), outtype],
                       capture_output=True, text=True, check=False)
    if r.returncode != 0 or not out.exists():
        raise RuntimeError(f"convert_hf_to_gguf failed:\n{r.stderr[-4000:]}")


def digest(path: Path) -> dict:
    """Every tensor (shape, type, sha256 of its bytes) and metadata value of a GGUF file."""
    import hashlib

    import gguf

    from mlxllm.gguf import GGUFFile

    r = gguf.GGUFReader(str(path))
    tensors = {t.name: {"shape": [int(n) for n in t.shape], "type": t.tensor_type.name,
                        "sha256": hashlib.sha256(bytes(t.data.tobytes())).hexdigest()} for t in r.tensors}
    for t in r.tensors:  # values the test compares to the last bit rather than by hash
        if t.name.endswith(VALUES_KEPT):
            tensors[t.name]["base64"] = base64.b64encode(bytes(t.data.tobytes())).decode()
    gf = GGUFFile(path)
    meta = {k: _jsonable(v) for k, v in gf.metadata.items()}
    return {"tensors": tensors, "metadata": meta}


def _jsonable(v):
    import numpy as np

    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, bytes):
        return v.decode("utf-8", errors="surrogateescape")
    if isinstance(v, np.generic):
        return v.item()
    return v


def make(name: str) -> None:
    import numpy as np
    import torch

    spec_ref, dtype, shard = FIXTURES[name]
    spec = F.ARCHS[spec_ref] if isinstance(spec_ref, str) else spec_ref
    spec = {"notes": "", **spec}
    seed = F.hash_name(name)
    d = OUT / name
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    with tempfile.TemporaryDirectory(prefix=f"cfx-{name}-") as td:
        build = Path(td) / "hf"
        build.mkdir()
        model, _ = F.build_hf(name, spec, build, seed)
        if spec.get("encoder"):  # sentence-transformers' pooling files
            F._write_pooling(build, spec.get("pooling"), model.config.get_text_config().hidden_size)
        if spec.get("rewrite"):  # a checkpoint rewritten in another layout: kept as written (float32)
            if name not in CAST_REWRITES:
                dtype = "float32"
            for f in build.iterdir():
                (shutil.copytree if f.is_dir() else shutil.copy)(f, d / f.name)
            if name in CAST_REWRITES:
                _cast_safetensors(d, getattr(torch, dtype))
        else:
            model = model.to(getattr(torch, dtype))
            kw = {"max_shard_size": shard} if shard else {}
            model.save_pretrained(d, safe_serialization=True, **kw)
            config = json.loads((build / "config.json").read_text())
            config["dtype"] = dtype
            (d / "config.json").write_text(json.dumps(config, indent=1))
            for f in build.iterdir():  # tokenizer, generation and pooling files
                if f.is_dir():
                    shutil.copytree(f, d / f.name)
                elif not f.name.startswith("model") and f.name != "config.json":
                    shutil.copy(f, d / f.name)
        reference = {"fixture": name, "hf_class": spec["model"], "checkpoint_dtype": dtype,
                     "kind": "encoder" if spec.get("encoder") else "decoder",
                     "source": "llama.cpp convert_hf_to_gguf.py (vendored in llama-cpp-python 0.3.36)",
                     "outtypes": {}}
        for outtype in OUTTYPES:
            path = Path(td) / f"{name}.{outtype}.gguf"
            llamacpp_convert(d, path, outtype)
            reference["outtypes"][outtype] = digest(path)
        ids = F.eval_ids(seed)[:N_IDS]
        f32 = Path(td) / f"{name}.f32.gguf"
        if any(t["type"] not in ("F32", "F16", "BF16") for t in reference["outtypes"]["f32"]["tensors"].values()):
            # tensors the checkpoint held quantized (gpt-oss's MXFP4 experts) stay so in the F32
            # file, where llama.cpp rounds activations to 8 bits before their products: the
            # reference is llama.cpp on its own float32 copy of that file (exact arithmetic)
            f32 = _float32_copy(f32, Path(td) / f"{name}.dequantized.gguf")
            reference["logits_from"] = "llama.cpp's float32 copy of its F32 file (llama_model_quantize ALL_F32)"
        # a decoder's logits, an encoder's hidden states (pooling none)
        logits = (F.llama_hidden if spec.get("encoder") else F.llama_logits)(f32, ids)
    reference["eval_ids"] = ids
    (d / "reference.json").write_text(json.dumps(reference, indent=0, ensure_ascii=False))
    np.save(d / "logits.npy", logits.astype(np.float32))
    size = sum(f.stat().st_size for f in d.iterdir())
    print(f"[{name}] ok {size / 1024:.0f} KB", flush=True)


class NoTransformersClass(Exception):
    """The checkpoint is remote code: transformers has no class that loads it."""


def hf_outputs(name: str):
    """transformers' own run of the committed checkpoint tests/fixtures/hf/<name>/, float32
    weights and eager attention, on reference.json's token ids: a decoder's logits, an
    encoder's last hidden states (the encoder under a task head: its base model's, as
    llama.cpp's pooling-none embeddings are)."""
    import torch
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    d = OUT / name
    ref = json.loads((d / "reference.json").read_text())
    config = json.loads((d / "config.json").read_text())
    cls_name = (config.get("architectures") or [""])[0]
    if cls_name.lower() == ref["hf_class"].lower():  # the remote code's spelling (MPTForCausalLM) of
        cls_name = ref["hf_class"]                   # transformers' class (MptForCausalLM)
    cls = getattr(transformers, cls_name, None)
    if cls is None or config.get("model_type") not in CONFIG_MAPPING or "auto_map" in config:
        raise NoTransformersClass(f"{cls_name} ({config.get('model_type')}) is not a transformers class")
    kw = {}
    if config.get("quantization_config", {}).get("quant_method") == "mxfp4":  # no GPU kernels: dequantize
        kw["quantization_config"] = transformers.Mxfp4Config(dequantize=True)
    model, info = cls.from_pretrained(d, dtype=torch.float32, attn_implementation="eager",
                                      output_loading_info=True, **kw)
    if info["missing_keys"] or info["mismatched_keys"]:  # transformers would run random weights
        raise RuntimeError(f"transformers does not load {sorted(info['missing_keys'])[:4]} "
                           f"{info['mismatched_keys'][:4]} from the checkpoint")
    model = model.float().eval()
    for m in model.modules():
        if hasattr(m, "config") and hasattr(m.config, "_attn_implementation"):
            m.config._attn_implementation = "eager"
    ids = torch.tensor([ref["eval_ids"]])
    with torch.no_grad():
        if ref.get("kind") == "encoder":
            out = model.base_model(ids).last_hidden_state[0]
        else:
            out = model(ids, use_cache=False).logits[0]
    return out.float().numpy()


def write_hf_outputs(names: list[str]) -> int:
    """hf_logits.npy for each fixture, stored in float16 where that rounding stays under
    F16_STORAGE_ERROR x std, keeps the top token and llama.cpp's run is within the bound
    (half the files' bytes), else float32."""
    import numpy as np

    skipped, failed = [], []
    for name in names:
        try:
            hf = hf_outputs(name)
        except NoTransformersClass as e:
            print(f"[{name}] skipped: {e}", flush=True)
            skipped.append(name)
            continue
        except Exception as e:  # noqa: BLE001 - report and go on with the others
            print(f"[{name}] FAILED: {type(e).__name__}: {str(e)[-2000:]}", flush=True)
            failed.append(name)
            continue
        std = float(hf.std())
        llama = np.load(OUT / name / "logits.npy")
        half = hf.astype(np.float16)
        exact = half.astype(np.float32)
        decoder = llama.shape[-1] == F.VOCAB
        top2 = np.sort(exact, -1)[:, -2:]
        stored = half if (np.abs(exact - hf).max() <= F16_STORAGE_ERROR * std
                          # no near-tie for the top token turned or made by the rounding
                          and (not decoder or (np.array_equal(exact.argmax(-1), hf.argmax(-1))
                                               and (top2[:, 1] > top2[:, 0]).all()))
                          # a departure of llama.cpp's that the test lists by its value: exact
                          and np.abs(llama - hf).max() <= F16_STORAGE_ERROR * 5 * std) else hf
        np.save(OUT / name / "hf_logits.npy", stored)
        argmax = "" if llama.shape[-1] != F.VOCAB else f" argmax agree {np.mean(llama.argmax(-1) == hf.argmax(-1)):.3f}"
        print(f"[{name}] {stored.dtype} llama.cpp vs transformers: max|d|/std "
              f"{np.abs(llama - hf).max() / std:.3g}{argmax}", flush=True)
    print(f"done; skipped (no transformers class): {skipped}; failed: {failed}")
    return 1 if failed else 0


def main(argv: list[str]) -> int:
    if argv[:1] == ["--hf-outputs"]:
        return write_hf_outputs(argv[1:] or sorted(p.parent.name for p in OUT.glob("*/reference.json")))
    if argv[:1] == ["--_convert"]:
        _convert_main(*argv[1:4])
        return 0
    if argv[:1] == ["--pre-table"]:
        write_pre_table()
        return 0
    names = argv or list(FIXTURES)
    F.ensure_tokenizers()
    failed = []
    for name in names:
        try:
            make(name)
        except Exception as e:  # noqa: BLE001 - report and go on with the others
            print(f"[{name}] FAILED: {type(e).__name__}: {str(e)[-3000:]}", flush=True)
            failed.append(name)
    print(f"done; failed: {failed}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
