"""Regenerate tests/fixtures/archs/: tiny random-weight GGUF files, one per architecture.

Each fixture is made the way real GGUF files are made:

1. ``transformers`` builds a tiny model from its config class (no download), with random
   weights redrawn so that logits are far from zero (matrices N(0, 1/fan_in), embeddings and
   the output head N(0, 4/hidden), 1-D parameters = their init value + N(0, 0.1)); fixed seed
   per architecture. It is saved with ``save_pretrained`` together with a tiny tokenizer
   trained locally (byte-level BPE with ``tokenizers``, or a SentencePiece model where the
   arch's converter insists on ``tokenizer.model``).
2. llama.cpp's own ``convert_hf_to_gguf.py`` (vendored in llama-cpp-python's source tree)
   converts it to ``<name>.f32.gguf``. The converter's pre-tokenizer hash check does not
   know our tokenizer, so ``get_vocab_base_pre`` is patched to return ``"gpt-2"``.
3. llama.cpp's quantizer (``llama_cpp.llama_model_quantize``, LLAMA_FTYPE_MOSTLY_Q8_0)
   makes ``<name>.q8_0.gguf`` from the F32 file.
4. Both files are loaded in llama-cpp-python (F32 KV cache); 40 token ids are evaluated and
   the logits are checked (finite, not degenerate) and compared with transformers' logits
   for the same ids on the same HF model. ``manifest.json`` records per fixture the source,
   the HF class, its config, the token ids, logits statistics and the llama.cpp-vs-HF
   max|diff|/std.

Usage (needs torch, transformers, tokenizers, sentencepiece, llama-cpp-python, gguf; CI does
not run this, it only reads the committed files):

    python scripts/make_arch_fixtures.py            # every fixture
    python scripts/make_arch_fixtures.py llama qwen3
    python scripts/make_arch_fixtures.py --list

Environment: LLAMACPP_SRC points at the llama.cpp source tree holding
convert_hf_to_gguf.py (default: the vendored copy in /work/llamacpp-src).
The trained tokenizers are cached in tests/fixtures/archs/_tokenizer/ so that
regeneration is reproducible.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "archs"
TOKDIR = OUT / "_tokenizer"
MANIFEST = OUT / "manifest.json"
LLAMACPP = Path(os.environ.get(
    "LLAMACPP_SRC", "/work/llamacpp-src/llama_cpp_python-0.3.36/vendor/llama.cpp"))

HIDDEN = 64
HEADS = 4
HEAD_DIM = 16
KV_HEADS = 2
INTER = 128
N_LAYERS = 2
MAX_POS = 2048
SWA = 16
LEARNED_POS = 256  # n_positions where positions are a learned table (gpt2, starcoder)
N_EVAL = 40
VOCAB = 384  # both tokenizers are trained to exactly this size
PRE = "gpt-2"  # tokenizer.ggml.pre written for our BPE tokenizer

BPE_SPECIALS = ["<|endoftext|>", "<s>", "</s>", "<unk>", "<pad>",
                "<|user|>", "<|assistant|>", "<|im_start|>", "<|im_end|>"]
BOS_ID, EOS_ID, UNK_ID, PAD_ID = 1, 2, 3, 4  # ids in the BPE tokenizer
SPM_BOS, SPM_EOS, SPM_UNK = 1, 2, 0


# --------------------------------------------------------------------------------------
# tokenizers


def _training_text() -> list[str]:
    """ASCII lines from a fixed set of stdlib sources (only used when no cached tokenizer)."""
    import sysconfig

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    lines: list[str] = []
    for name in ["textwrap", "string", "json/decoder", "json/encoder", "argparse", "shlex",
                 "difflib", "fractions", "calendar", "pprint", "heapq", "bisect", "random",
                 "statistics", "dataclasses", "functools", "inspect", "typing"]:
        p = stdlib / f"{name}.py"
        if not p.exists():
            continue
        for line in p.read_text(encoding="utf-8", errors="ignore").splitlines():
            line = line.strip()
            if line and line.isascii():
                lines.append(line)
    return lines


def ensure_tokenizers() -> None:
    TOKDIR.mkdir(parents=True, exist_ok=True)
    bpe = TOKDIR / "tokenizer.json"
    spm = TOKDIR / "tokenizer.model"
    if bpe.exists() and spm.exists():
        return
    lines = _training_text()
    if not bpe.exists():
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=VOCAB, special_tokens=BPE_SPECIALS, show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(lines, trainer)
        assert tok.get_vocab_size() == VOCAB, tok.get_vocab_size()
        tok.save(str(bpe))
    if not spm.exists():
        import io

        import sentencepiece as spmlib

        buf = io.BytesIO()
        spmlib.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=buf, vocab_size=VOCAB,
            model_type="bpe", byte_fallback=True, character_coverage=1.0,
            unk_id=SPM_UNK, bos_id=SPM_BOS, eos_id=SPM_EOS, pad_id=-1,
            normalization_rule_name="identity", num_threads=1, minloglevel=2)
        spm.write_bytes(buf.getvalue())


def write_tokenizer(d: Path, kind: str) -> dict:
    """Copy the cached tokenizer into HF dir d; returns the token ids of bos/eos/pad."""
    if kind == "bpe":
        shutil.copy(TOKDIR / "tokenizer.json", d / "tokenizer.json")
        cfg = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
            "model_max_length": MAX_POS, "clean_up_tokenization_spaces": False,
        }
        (d / "tokenizer_config.json").write_text(json.dumps(cfg, indent=1))
        return {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID}
    if kind == "spm":
        shutil.copy(TOKDIR / "tokenizer.model", d / "tokenizer.model")
        cfg = {
            "tokenizer_class": "LlamaTokenizer",
            "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
            "model_max_length": MAX_POS, "add_bos_token": True, "add_eos_token": False,
        }
        (d / "tokenizer_config.json").write_text(json.dumps(cfg, indent=1))
        return {"bos_token_id": SPM_BOS, "eos_token_id": SPM_EOS, "pad_token_id": None}
    if kind == "wpm":
        return _write_wordpiece(d)
    raise ValueError(kind)


# --------------------------------------------------------------------------------------
# architecture table

def _base(**kw) -> dict:
    d = dict(hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=N_LAYERS,
             num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
             head_dim=HEAD_DIM, max_position_embeddings=MAX_POS, vocab_size=VOCAB,
             tie_word_embeddings=False)
    d.update(kw)
    return d


# name -> spec. spec keys:
#   cfg: transformers config class; model: transformers model class; kw: config kwargs
#   tok: "bpe" | "spm"; arch: expected general.architecture; merge: keys merged into
#   config.json after save_pretrained (legacy keys transformers 5 no longer writes);
#   notes: free text; sliding_window: recorded in the manifest
ARCHS: dict[str, dict] = {}


def arch(name: str, **spec) -> None:
    spec.setdefault("arch", name)
    spec.setdefault("tok", "bpe")
    spec.setdefault("merge", {})
    spec.setdefault("notes", "")
    ARCHS[name] = spec


arch("llama", cfg="LlamaConfig", model="LlamaForCausalLM",
     kw=_base(rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
     notes="plain Llama, GQA 4q/2kv, untied output")
arch("llama-tied", arch="llama", cfg="LlamaConfig", model="LlamaForCausalLM",
     kw=_base(rms_norm_eps=1e-5, tie_word_embeddings=True,
              rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
     notes="tie_word_embeddings: no output.weight in the GGUF")
arch("llama-rope3", arch="llama", cfg="LlamaConfig", model="LlamaForCausalLM",
     kw=_base(rms_norm_eps=1e-5,
              max_position_embeddings=32768,
              rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                               "original_max_position_embeddings": 8192}),
     notes="rope_scaling llama3 -> rope_freqs tensor (all three regimes: 1, smooth, factor)")



def _rope(theta: float = 10000.0, **kw) -> dict:
    return {"rope_type": "default", "rope_theta": theta, **kw}


arch("qwen2", cfg="Qwen2Config", model="Qwen2ForCausalLM",
     kw=_base(rms_norm_eps=1e-6, tie_word_embeddings=True, rope_parameters=_rope(1e6)),
     notes="q/k/v biases, tied embeddings (as Qwen2 0.5B)")
arch("qwen3", cfg="Qwen3Config", model="Qwen3ForCausalLM",
     kw=_base(rms_norm_eps=1e-6, tie_word_embeddings=True, rope_parameters=_rope(1e6)),
     notes="per-head q/k RMSNorm, tied embeddings (as Qwen3 0.6B)")
arch("mistral3", cfg="Ministral3Config", model="Ministral3ForCausalLM",
     kw=_base(rms_norm_eps=1e-5, sliding_window=None,
              rope_parameters={"rope_type": "yarn", "rope_theta": 1e6, "factor": 128.0,
                               "original_max_position_embeddings": 16, "beta_fast": 32.0,
                               "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0,
                               "llama_4_scaling_beta": 0.1}),
     notes="Ministral 3 text model: YaRN rope + llama-4 attention temperature scaling; "
           "original_max_position_embeddings=16 so that the temperature scale (floor(pos/16)) "
           "changes inside a 40-token test")
arch("phi2", cfg="PhiConfig", model="PhiForCausalLM",
     kw=dict(hidden_size=HIDDEN, intermediate_size=4 * HIDDEN, num_hidden_layers=N_LAYERS,
             num_attention_heads=HEADS, num_key_value_heads=HEADS, vocab_size=VOCAB,
             max_position_embeddings=MAX_POS, hidden_act="gelu_new", layer_norm_eps=1e-5,
             qk_layernorm=False, tie_word_embeddings=False,
             rope_parameters=_rope(partial_rotary_factor=0.5)),
     notes="parallel attn+MLP sharing one LayerNorm, partial rotary 0.5 (n_rot 8), biases "
           "everywhere incl. lm_head; converter hardcodes n_ff = 4*n_embd, so intermediate=256")
arch("phi3", cfg="Phi3Config", model="Phi3ForCausalLM", tok="spm",
     kw=_base(rms_norm_eps=1e-5, sliding_window=None, pad_token_id=None,
              rope_parameters=_rope()),
     notes="fused qkv_proj and gate_up_proj; SentencePiece vocab. sliding_window=None: "
           "llama.cpp disables Phi-3 SWA (phi3.cpp), so HF is built without it to compare")
arch("gemma", cfg="GemmaConfig", model="GemmaForCausalLM", tok="spm",
     kw=_base(num_key_value_heads=1, rms_norm_eps=1e-6, hidden_activation="gelu_pytorch_tanh",
              tie_word_embeddings=True, rope_parameters=_rope()),
     notes="MQA (1 kv head, as gemma-2b), embeddings scaled by sqrt(n_embd), (1+w) RMSNorm "
           "(converter stores w+1), GeGLU tanh")
arch("gemma2", cfg="Gemma2Config", model="Gemma2ForCausalLM", tok="spm", sliding_window=SWA,
     kw=_base(rms_norm_eps=1e-6, hidden_activation="gelu_pytorch_tanh",
              tie_word_embeddings=True, sliding_window=SWA, query_pre_attn_scalar=HEAD_DIM,
              attn_logit_softcapping=8.0, final_logit_softcapping=6.0,
              rope_parameters=_rope()),
     notes="alternating sliding (even layers, window 16) / global attention (llama.cpp "
           "hardcodes pattern 2), pre+post norms, attention and final logit soft-capping "
           "(8 and 6, smaller than Gemma 2's 50/30 so that they bite)")
arch("gpt2", cfg="GPT2Config", model="GPT2LMHeadModel",
     kw=dict(n_embd=HIDDEN, n_layer=N_LAYERS, n_head=HEADS, n_positions=LEARNED_POS,
             n_inner=None, vocab_size=VOCAB, activation_function="gelu_new",
             layer_norm_epsilon=1e-5, tie_word_embeddings=True),
     merge={"n_ctx": LEARNED_POS},
     notes="learned absolute positions (n_positions 256 to keep the file small), Conv1D weights (transposed by the converter), fused "
           "qkv with biases; n_ff = 4*n_embd")
arch("falcon", cfg="FalconConfig", model="FalconForCausalLM",
     kw=dict(hidden_size=HIDDEN, num_hidden_layers=N_LAYERS, num_attention_heads=HEADS,
             num_kv_heads=1, multi_query=True, new_decoder_architecture=False,
             parallel_attn=True, bias=False, alibi=False, vocab_size=VOCAB,
             max_position_embeddings=MAX_POS, layer_norm_epsilon=1e-5,
             tie_word_embeddings=True, rope_parameters=_rope()),
     notes="Falcon-7B style: multi-query, parallel attn+MLP off one LayerNorm, no biases, "
           "rotary; n_ff = 4*n_embd; GELU exact in HF vs tanh in ggml")
arch("starcoder", cfg="GPTBigCodeConfig", model="GPTBigCodeForCausalLM",
     kw=dict(n_embd=HIDDEN, n_layer=N_LAYERS, n_head=HEADS, n_positions=LEARNED_POS,
             n_inner=4 * HIDDEN, multi_query=True, activation_function="gelu_pytorch_tanh",
             layer_norm_epsilon=1e-5, vocab_size=VOCAB, tie_word_embeddings=True),
     notes="GPTBigCode: multi-query, learned positions (n_positions 256 to keep the file small), fused qkv with biases; n_ff = 4*n_embd")
arch("starcoder2", cfg="Starcoder2Config", model="Starcoder2ForCausalLM",
     kw=_base(use_bias=True, norm_epsilon=1e-5, hidden_act="gelu_pytorch_tanh",
              sliding_window=None, tie_word_embeddings=True, rope_parameters=_rope(1e5)),
     notes="LayerNorm with bias, biases on all projections, plain GELU MLP. sliding_window=None:"
           " llama.cpp's starcoder2 has no SWA (real models: 4096)")
arch("stablelm", cfg="StableLmConfig", model="StableLmForCausalLM",
     kw=_base(num_key_value_heads=HEADS, layer_norm_eps=1e-5, use_qkv_bias=True,
              qk_layernorm=False, use_parallel_residual=False,
              rope_parameters=_rope(partial_rotary_factor=0.25)),
     notes="StableLM 2: LayerNorm with bias, q/k/v biases, partial rotary 0.25 (n_rot 4), "
           "sequential residual")
arch("gptneox", cfg="GPTNeoXConfig", model="GPTNeoXForCausalLM",
     kw=dict(hidden_size=HIDDEN, num_hidden_layers=N_LAYERS, num_attention_heads=HEADS,
             intermediate_size=4 * HIDDEN, hidden_act="gelu", layer_norm_eps=1e-5,
             use_parallel_residual=True, vocab_size=VOCAB, max_position_embeddings=MAX_POS,
             tie_word_embeddings=False, rope_parameters=_rope(partial_rotary_factor=0.25)),
     merge={"rotary_pct": 0.25},
     notes="Pythia style: parallel residual, rotary_pct 0.25 (n_rot 4), interleaved per-head "
           "fused qkv (converter regroups), exact GELU in HF vs tanh in ggml")
arch("olmo", cfg="OlmoConfig", model="OlmoForCausalLM",
     kw=_base(num_key_value_heads=HEADS, clip_qkv=3.0, rope_parameters=_rope()),
     notes="non-parametric LayerNorm (no norm tensors at all), clip_qkv=3 (real OLMo 1.7: 8; "
           "smaller so the clamp bites)")
arch("olmo2", cfg="Olmo2Config", model="Olmo2ForCausalLM",
     kw=_base(num_key_value_heads=HEADS, rms_norm_eps=1e-6, rope_parameters=_rope(500000.0)),
     notes="post-norms only (attn/ffn output norms), q/k RMSNorm over the whole projection")
arch("olmo3", arch="olmo2", cfg="Olmo3Config", model="Olmo3ForCausalLM", sliding_window=SWA,
     kw=_base(num_hidden_layers=4, num_key_value_heads=HEADS, rms_norm_eps=1e-6,
              sliding_window=SWA, rope_parameters=_rope(500000.0)),
     notes="OLMo 3 has no GGUF arch of its own: general.architecture=olmo2 plus "
           "sliding_window and a per-layer sliding_window_pattern array (3 sliding, 1 full)")
arch("granite", cfg="GraniteConfig", model="GraniteForCausalLM",
     kw=_base(rms_norm_eps=1e-5, tie_word_embeddings=True, embedding_multiplier=4.0,
              residual_multiplier=0.5, attention_multiplier=0.1, logits_scaling=0.5,
              rope_parameters=_rope()),
     notes="Granite 3 multipliers: embedding 4, residual 0.5, attention 0.1 (replaces "
           "1/sqrt(head_dim)), logits divided by 0.5")
arch("command-r", cfg="CohereConfig", model="CohereForCausalLM",
     kw=_base(layer_norm_eps=1e-5, use_qk_norm=False, logit_scale=0.75,
              tie_word_embeddings=True, rope_parameters=_rope()),
     notes="Cohere: LayerNorm without bias, parallel attn+MLP, interleaved (GPT-J) rotary, "
           "logit_scale 0.75")
arch("cohere2", cfg="Cohere2Config", model="Cohere2ForCausalLM", sliding_window=SWA,
     kw=_base(num_hidden_layers=4, layer_norm_eps=1e-5, logit_scale=0.75, sliding_window=SWA,
              tie_word_embeddings=True, rope_parameters=_rope()),
     merge={"rotary_pct": 1.0},
     notes="Command R7B: layers 0-2 sliding (window 16) with rope, layer 3 global without rope "
           "(llama.cpp hardcodes pattern 4)")
arch("smollm3", cfg="SmolLM3Config", model="SmolLM3ForCausalLM",
     kw=_base(num_hidden_layers=4, rms_norm_eps=1e-6, tie_word_embeddings=True,
              no_rope_layer_interval=4, rope_parameters=_rope(2e6)),
     notes="NoPE every 4th layer (layer 3; llama.cpp hardcodes step 4)")
arch("glm4", cfg="Glm4Config", model="Glm4ForCausalLM",
     kw=_base(rms_norm_eps=1e-5, attention_bias=True, eos_token_id=EOS_ID,
              rope_parameters=_rope(partial_rotary_factor=0.5)),
     notes="GLM-4-0414: q/k/v biases, post-attn and post-mlp norms, fused gate_up, partial "
           "interleaved rotary 0.5")
arch("chatglm", cfg="GlmConfig", model="GlmForCausalLM",
     kw=_base(rms_norm_eps=1e-5, attention_bias=True, eos_token_id=EOS_ID,
              rope_parameters=_rope(partial_rotary_factor=0.5)),
     notes="transformers' native GlmForCausalLM (GLM-4-9b-hf), which llama.cpp's converter "
           "maps to the chatglm arch")
arch("bloom", cfg="BloomConfig", model="BloomForCausalLM",
     kw=dict(hidden_size=HIDDEN, n_layer=N_LAYERS, n_head=HEADS, vocab_size=VOCAB,
             layer_norm_epsilon=1e-5, tie_word_embeddings=True),
     merge={"seq_length": MAX_POS},
     notes="ALiBi, embedding LayerNorm, per-head interleaved fused qkv (converter regroups), "
           "n_ff = 4*n_embd")
arch("mpt", cfg="MptConfig", model="MptForCausalLM", hf_arch="MPTForCausalLM",
     kw=dict(d_model=HIDDEN, n_heads=HEADS, n_layers=N_LAYERS, expansion_ratio=4,
             max_seq_len=MAX_POS, vocab_size=VOCAB, no_bias=True, layer_norm_epsilon=1e-5,
             attn_config={"alibi": True, "alibi_bias_max": 8, "clip_qkv": None},
             tie_word_embeddings=True),
     notes="config.json says MPTForCausalLM as the real (remote-code) checkpoints do; the "
           "converter does not register transformers' MptForCausalLM spelling. MPT-7B style: ALiBi (max bias 8), no biases, LayerNorm without bias, fused qkv")
arch("exaone4", cfg="Exaone4Config", model="Exaone4ForCausalLM",
     kw=_base(rms_norm_eps=1e-5, sliding_window=None, sliding_window_pattern=None,
              layer_types=["full_attention"] * N_LAYERS, rope_parameters=_rope(1e6)),
     notes="EXAONE 4.0 1.2B style: post-norms, q/k RMSNorm, all layers global with rope. "
           "llama.cpp (exaone4.cpp) turns on its SWA (pattern 4, global layers NoPE) only when "
           "n_layer == 64 (the 32B); any other depth runs every layer as global+rope, so a "
           "tiny SWA variant cannot match HF and is not produced")
arch("ernie4_5", cfg="Ernie4_5Config", model="Ernie4_5ForCausalLM", tok="spm",
     kw=_base(rms_norm_eps=1e-5, use_bias=False, tie_word_embeddings=True,
              rope_parameters=_rope(500000.0)),
     notes="ERNIE 4.5 0.3B style: tied embeddings, interleaved rotary")
arch("seed_oss", cfg="SeedOssConfig", model="SeedOssForCausalLM",
     kw=_base(rms_norm_eps=1e-6, attention_bias=True, attention_out_bias=False,
              rope_parameters=_rope(1e7)),
     notes="q/k/v biases, no o_proj bias")
arch("apertus", cfg="ApertusConfig", model="ApertusForCausalLM",
     kw=_base(rms_norm_eps=1e-5, hidden_act="xielu", max_position_embeddings=32768,
              rope_parameters={"rope_type": "llama3", "rope_theta": 12000000.0, "factor": 8.0,
                               "original_max_position_embeddings": 8192,
                               "low_freq_factor": 1.0, "high_freq_factor": 4.0}),
     notes="xIELU MLP (no gate), q/k RMSNorm, llama3 rope scaling")
arch("arcee", cfg="ArceeConfig", model="ArceeForCausalLM",
     kw=_base(rms_norm_eps=1e-5, hidden_act="relu2", rope_parameters=_rope()),
     notes="AFM: ReLU^2 MLP without gate")
arch("hunyuan-dense", cfg="HunYuanDenseV1Config", model="HunYuanDenseV1ForCausalLM",
     kw=_base(rms_norm_eps=1e-5, tie_word_embeddings=True, eod_token_id=EOS_ID,
              rope_parameters=_rope()),
     notes="q/k RMSNorm applied after rope; plain rope (real models: dynamic NTK alpha)")
arch("nemotron", cfg="NemotronConfig", model="NemotronForCausalLM", tok="spm",
     kw=_base(norm_eps=1e-5, hidden_act="relu2",
              rope_parameters=_rope(partial_rotary_factor=0.5)),
     notes="LayerNorm1p (converter stores w+1), ReLU^2 MLP without gate, partial rotary 0.5")

def _internlm2_checkpoint(model, config: dict, d: Path) -> dict:
    """Rewrite the saved Llama checkpoint in d as an InternLM2 (remote-code) checkpoint.

    transformers has no InternLM2 class (the real models ship modeling_internlm2.py); its math
    is Llama's, with q/k/v fused per kv group: wqkv rows = for each kv group g, its q heads,
    then k head g, then v head g (the layout llama.cpp's converter un-groups)."""
    import torch
    from safetensors.torch import save_file

    c = model.config
    n_head, n_kv, hd, E = c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.hidden_size
    qpk = n_head // n_kv
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    out = {"model.tok_embeddings.weight": sd["model.embed_tokens.weight"],
           "model.norm.weight": sd["model.norm.weight"],
           "output.weight": sd["lm_head.weight"]}
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        q = sd[p + "self_attn.q_proj.weight"].reshape(n_kv, qpk, hd, E)
        k = sd[p + "self_attn.k_proj.weight"].reshape(n_kv, 1, hd, E)
        v = sd[p + "self_attn.v_proj.weight"].reshape(n_kv, 1, hd, E)
        out[p + "attention.wqkv.weight"] = torch.cat([q, k, v], dim=1).reshape(-1, E).contiguous()
        out[p + "attention.wo.weight"] = sd[p + "self_attn.o_proj.weight"]
        out[p + "attention_norm.weight"] = sd[p + "input_layernorm.weight"]
        out[p + "ffn_norm.weight"] = sd[p + "post_attention_layernorm.weight"]
        out[p + "feed_forward.w1.weight"] = sd[p + "mlp.gate_proj.weight"]
        out[p + "feed_forward.w3.weight"] = sd[p + "mlp.up_proj.weight"]
        out[p + "feed_forward.w2.weight"] = sd[p + "mlp.down_proj.weight"]
    for f in d.glob("*.safetensors"):
        f.unlink()
    save_file(out, str(d / "model.safetensors"), metadata={"format": "pt"})
    rope = config.get("rope_parameters") or {}
    new = {
        "architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2",
        "auto_map": {"AutoConfig": "configuration_internlm2.InternLM2Config",
                     "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM"},
        "bias": False, "hidden_act": "silu", "hidden_size": E,
        "intermediate_size": c.intermediate_size, "initializer_range": 0.02,
        "max_position_embeddings": c.max_position_embeddings,
        "num_attention_heads": n_head, "num_hidden_layers": c.num_hidden_layers,
        "num_key_value_heads": n_kv, "rms_norm_eps": c.rms_norm_eps, "rope_scaling": None,
        "rope_theta": rope.get("rope_theta", 10000.0), "tie_word_embeddings": False,
        "vocab_size": c.vocab_size, "bos_token_id": config.get("bos_token_id"),
        "eos_token_id": config.get("eos_token_id"), "pad_token_id": config.get("pad_token_id"),
        "torch_dtype": "float32", "use_cache": True,
    }
    (d / "config.json").write_text(json.dumps(new, indent=1))
    return new


arch("internlm2", cfg="LlamaConfig", model="LlamaForCausalLM", hf_arch="InternLM2ForCausalLM",
     tok="spm", rewrite=_internlm2_checkpoint,
     kw=_base(rms_norm_eps=1e-5, rope_parameters=_rope(1e6)),
     notes="InternLM2 is remote code (no transformers class). The checkpoint is written in "
           "InternLM2's own layout (tok_embeddings, per-kv-group fused attention.wqkv, "
           "feed_forward.w1/w2/w3, output) from a transformers LlamaForCausalLM (same math) "
           "and converted by convert_hf_to_gguf.py's InternLM2Model; the reference logits "
           "are that LlamaForCausalLM's")


# --------------------------------------------------------------------------------------
# variants of the archs above that exercise code paths the base fixtures miss

_ROPE_DIMS = HEAD_DIM  # phi3-longrope: full rotary, rope_dims/2 = 8 factors each
arch("phi3-longrope", arch="phi3", cfg="Phi3Config", model="Phi3ForCausalLM", tok="spm",
     kw=_base(rms_norm_eps=1e-5, sliding_window=None, pad_token_id=None,
              max_position_embeddings=8192, original_max_position_embeddings=2048,
              rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                               "original_max_position_embeddings": 2048,
                               "short_factor": [1.0 + 2.0 * i / (_ROPE_DIMS // 2 - 1)
                                                for i in range(_ROPE_DIMS // 2)],
                               "long_factor": [2.0 + 6.0 * i / (_ROPE_DIMS // 2 - 1)
                                               for i in range(_ROPE_DIMS // 2)]}),
     notes="Phi-3 LongRoPE: rope_factors_short (1..3) / rope_factors_long (2..8) tensors, "
           "original ctx 2048, ctx 8192 -> rope.scaling.attn_factor sqrt(1+ln4/ln2048). "
           "llama.cpp picks the SHORT factors when n_ctx <= 2048 (the test's n_ctx 256); HF "
           "picks short for sequences shorter than 2048, so both use short_factor. No 'factor' "
           "key and original_max_position_embeddings also passed top-level: Phi3Config otherwise "
           "overrides the rope_parameters value with its default 4096")
arch("falcon-40b", arch="falcon", cfg="FalconConfig", model="FalconForCausalLM",
     kw=dict(hidden_size=HIDDEN, num_hidden_layers=N_LAYERS, num_attention_heads=HEADS,
             num_kv_heads=KV_HEADS, multi_query=False, new_decoder_architecture=True,
             parallel_attn=True, bias=False, alibi=False, vocab_size=VOCAB,
             max_position_embeddings=MAX_POS, layer_norm_epsilon=1e-5,
             tie_word_embeddings=True, rope_parameters=_rope()),
     notes="Falcon-40B style (new_decoder_architecture): two LayerNorms per block (ln_attn "
           "-> attn_norm_2 feeding attention, ln_mlp -> attn_norm feeding the MLP), GQA 4q/2kv "
           "with fused per-group qkv (converter regroups), parallel attn+MLP, no biases; "
           "GELU exact in HF vs tanh in ggml")
arch("stablelm-12b", arch="stablelm", cfg="StableLmConfig", model="StableLmForCausalLM",
     kw=_base(layer_norm_eps=1e-5, use_qkv_bias=False, qk_layernorm=True,
              use_parallel_residual=True,
              rope_parameters=_rope(partial_rotary_factor=0.25)),
     notes="StableLM 2 12B style: per-head q/k LayerNorm (no bias; distinct weights per head, "
           "converter stacks them into attn_q_norm [16,4] / attn_k_norm [16,2]), GQA 4q/2kv, "
           "parallel residual (no post_attention_layernorm -> no ffn_norm), no qkv bias, "
           "partial rotary 0.25")
arch("qwen2-yarn", arch="qwen2", cfg="Qwen2Config", model="Qwen2ForCausalLM",
     kw=_base(rms_norm_eps=1e-6, tie_word_embeddings=True, max_position_embeddings=64,
              rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                               "original_max_position_embeddings": 16}),
     notes="Qwen2 with YaRN factor 4 over original ctx 16 (max_position_embeddings 64): "
           "rope.scaling.type yarn, factor 4, original_context_length 16; the ramp between "
           "beta_fast 32 / beta_slow 1 and the mscale 0.1*ln(4)+1 both matter within 40 tokens")
arch("gptneox-seq", arch="gptneox", cfg="GPTNeoXConfig", model="GPTNeoXForCausalLM",
     kw=dict(hidden_size=HIDDEN, num_hidden_layers=N_LAYERS, num_attention_heads=HEADS,
             intermediate_size=4 * HIDDEN, hidden_act="gelu", layer_norm_eps=1e-5,
             use_parallel_residual=False, vocab_size=VOCAB, max_position_embeddings=MAX_POS,
             tie_word_embeddings=False, rope_parameters=_rope(partial_rotary_factor=0.25)),
     merge={"rotary_pct": 0.25},
     notes="GPT-NeoX with use_parallel_residual=False (sequential: x += attn(ln1(x)); "
           "x += mlp(ln2(x))), otherwise as gptneox")


MPT_POS_CTX = 256   # learned position table size (max_seq_len)
MPT_CLIP = 2.0
# qk_ln is NOT used: the converter writes attn_q_norm/attn_k_norm and llama.cpp loads them,
# but mpt.cpp then does ggml_reshape_2d on the Q/K views of the fused qkv (build_qkv returns
# non-contiguous views for wqkv, and MPT requires wqkv) -> GGML_ASSERT(ggml_is_contiguous(a))
# aborts the process on the first eval (mpt.cpp carries "FIXME test-llama-archs crashes if
# q_norm is created"). Set True to reproduce.
MPT_QK_LN = False


def _mpt_pos_checkpoint(model, config: dict, d: Path) -> dict:
    """Turn the saved (ALiBi-only) transformers MPT checkpoint into an MPT remote-code
    checkpoint with learned positions (transformer.wpe), clip_qkv and (if MPT_QK_LN) qk_ln
    (attn.q_ln / attn.k_ln, LayerNorm over the whole projection, no bias).

    transformers' MptForCausalLM has no learned positions, no qk_ln and always applies ALiBi,
    so the reference logits come from _mpt_pos_reference (a direct torch forward of the
    remote-code math) instead of the transformers model."""
    import torch
    from safetensors.torch import save_file

    c = model.config
    E = c.d_model
    g = torch.Generator().manual_seed(12345)
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()
          if k != "lm_head.weight"}  # tied
    sd["transformer.wpe.weight"] = torch.randn(MPT_POS_CTX, E, generator=g) * (2.0 / math.sqrt(E))
    for i in range(c.n_layers if MPT_QK_LN else 0):
        for nm in ("q_ln", "k_ln"):
            sd[f"transformer.blocks.{i}.attn.{nm}.weight"] = 1.0 + 0.3 * torch.randn(E, generator=g)
    for f in d.glob("*.safetensors"):
        f.unlink()
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    config = dict(config)
    config["max_seq_len"] = MPT_POS_CTX
    config["learned_pos_emb"] = True
    config["attn_config"] = dict(config.get("attn_config") or {}, alibi=False, qk_ln=MPT_QK_LN,
                                 clip_qkv=MPT_CLIP)
    (d / "config.json").write_text(json.dumps(config, indent=1))
    model._mpt_pos_sd = sd
    return config


def _mpt_pos_reference(model, ids: list[int]):
    """MPT forward (remote-code math): wte+wpe, pre-LN blocks (LayerNorm without bias),
    fused Wqkv clamped to +-clip_qkv, [q_ln/k_ln over the whole projection,] causal softmax
    attention scaled 1/sqrt(head_dim), no ALiBi, exact-GELU MLP, tied output head."""
    import torch
    import torch.nn.functional as F

    sd, c = model._mpt_pos_sd, model.config
    E, H = c.d_model, c.n_heads
    hd = E // H
    eps = c.layer_norm_epsilon
    T = len(ids)
    ln = lambda x, w: F.layer_norm(x, (E,), w, None, eps)  # noqa: E731
    with torch.no_grad():
        x = sd["transformer.wte.weight"][ids] + sd["transformer.wpe.weight"][:T]
        mask = torch.full((T, T), float("-inf")).triu(1)
        for i in range(c.n_layers):
            p = f"transformer.blocks.{i}."
            h = ln(x, sd[p + "norm_1.weight"])
            qkv = (h @ sd[p + "attn.Wqkv.weight"].T).clamp(-MPT_CLIP, MPT_CLIP)
            q, k, v = qkv.split(E, dim=-1)
            if MPT_QK_LN:
                q = ln(q, sd[p + "attn.q_ln.weight"])
                k = ln(k, sd[p + "attn.k_ln.weight"])
            q, k, v = (t.reshape(T, H, hd).transpose(0, 1) for t in (q, k, v))
            a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd) + mask, dim=-1) @ v
            x = x + a.transpose(0, 1).reshape(T, E) @ sd[p + "attn.out_proj.weight"].T
            h = ln(x, sd[p + "norm_2.weight"])
            x = x + F.gelu(h @ sd[p + "ffn.up_proj.weight"].T) @ sd[p + "ffn.down_proj.weight"].T
        x = ln(x, sd["transformer.norm_f.weight"])
        return (x @ sd["transformer.wte.weight"].T).float().numpy()


arch("mpt-pos", arch="mpt", cfg="MptConfig", model="MptForCausalLM", hf_arch="MPTForCausalLM",
     rewrite=_mpt_pos_checkpoint, reference=_mpt_pos_reference,
     kw=dict(d_model=HIDDEN, n_heads=HEADS, n_layers=N_LAYERS, expansion_ratio=4,
             max_seq_len=MPT_POS_CTX, vocab_size=VOCAB, no_bias=True, layer_norm_epsilon=1e-5,
             attn_config={"alibi": True, "alibi_bias_max": 8, "clip_qkv": None},
             tie_word_embeddings=True),
     notes="MPT with learned absolute positions (transformer.wpe, max_seq_len 256) instead of "
           "ALiBi (max_alibi_bias 0) and clip_qkv 2 (clamp of the fused qkv). qk_ln is left "
           "out: llama.cpp's mpt.cpp aborts (GGML_ASSERT ggml_is_contiguous in ggml_reshape_2d "
           "of the fused-qkv Q/K views) when attn_q_norm is present. transformers' "
           "MptForCausalLM implements neither learned positions nor no-ALiBi, so the checkpoint is "
           "written in the remote-code layout and the reference logits come from a direct "
           "torch forward of that math (_mpt_pos_reference), not from transformers")

# --------------------------------------------------------------------------------------
# mixture-of-experts fixtures. Expert width MOE_INTER (a multiple of 32 for Q8_0), 4 experts,
# top-2. The router is redrawn N(0, 1/fan_in) * ROUTER_SCALE so that routing is decisive (the
# manifest's router_min_gap is the smallest margin, over tokens and MoE layers, between the
# last selected and the first rejected expert score as HF computes it: a near-tie there would
# let rounding pick a different expert in llama.cpp). Expert tensors (3-D, one slice per
# expert) are drawn N(0, 1/fan_in) with fan_in = the input width of one expert matrix.

N_EXPERTS = 4
TOP_K = 2
MOE_INTER = 64
ROUTER_SCALE = 3.0
# Seed search: starting at the name's crc, the first seed (of MOE_SEED_TRIES) whose HF routing
# on its eval ids has router_min_gap >= the threshold is used (deterministic). Softmax gating:
# margin in logit units (router logits have std ~3); deepseek: in group-score units (sums of
# two sigmoids). The thresholds keep routing identical under Q8_0 / half-precision activations.
MOE_MIN_GAP = {"softmax": 0.1, "deepseek": 0.12,
               # sigmoid(logit)+bias units (~0.1 logit at the steepest slope)
               "sigmoid": 0.025,
               # softmax-probability(+bias) units (ERNIE selects on probs + bias)
               "ernie": 0.02,
               # MiniMax-M2: sigmoid + the bias its router is called with; Llama 4: top-1 on logits
               "minimax": 0.025, "top1": 0.1}
MOE_SEED_TRIES = 60


def _moe(**kw) -> dict:
    d = _base(intermediate_size=MOE_INTER)
    d.update(kw)
    return d


def _deepseek_tweak(model, seed: int) -> None:
    """DeepSeek-V3's e_score_correction_bias (a buffer, zero at init): nonzero, so that the
    selection-only bias (llama.cpp exp_probs_b) is exercised."""
    import torch

    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)


arch("mixtral", arch="llama", cfg="MixtralConfig", model="MixtralForCausalLM", moe="softmax",
     kw=_moe(rms_norm_eps=1e-5, num_local_experts=N_EXPERTS, num_experts_per_tok=TOP_K,
             sliding_window=None, rope_parameters=_rope(1e6)),
     notes="Mixtral: general.architecture llama with expert tensors (ffn_gate_inp, 3-D "
           "ffn_gate_exps/ffn_up_exps/ffn_down_exps); softmax over all experts, top-2, "
           "renormalised (llama.cpp hard-codes norm_w=true = HF Mixtral)")
arch("qwen2moe", cfg="Qwen2MoeConfig", model="Qwen2MoeForCausalLM", moe="softmax",
     kw=_moe(rms_norm_eps=1e-6, num_experts=N_EXPERTS, num_experts_per_tok=TOP_K,
             moe_intermediate_size=MOE_INTER, shared_expert_intermediate_size=2 * MOE_INTER,
             intermediate_size=2 * MOE_INTER, norm_topk_prob=False, decoder_sparse_step=1,
             mlp_only_layers=[], rope_parameters=_rope(1e6)),
     notes="Qwen1.5/Qwen2 MoE: q/k/v biases, 4 experts top-2 with raw (not renormalised) "
           "softmax weights (norm_topk_prob False as the released models; llama.cpp hard-codes "
           "norm_w=false), shared expert of width 128 gated by sigmoid(shared_expert_gate . x) "
           "(ffn_gate_inp_shexp). llama.cpp ignores HF norm_topk_prob / decoder_sparse_step / "
           "mlp_only_layers: a True / dense-layer config would NOT match")
arch("qwen3moe", cfg="Qwen3MoeConfig", model="Qwen3MoeForCausalLM", moe="softmax",
     kw=_moe(rms_norm_eps=1e-6, num_experts=N_EXPERTS, num_experts_per_tok=TOP_K,
             moe_intermediate_size=MOE_INTER, norm_topk_prob=True, decoder_sparse_step=1,
             mlp_only_layers=[], rope_parameters=_rope(1e6)),
     notes="Qwen3 MoE: per-head q/k RMSNorm, 4 experts top-2 renormalised (norm_topk_prob "
           "True; llama.cpp hard-codes norm_w=true), no shared expert, untied output")
arch("olmoe", cfg="OlmoeConfig", model="OlmoeForCausalLM", moe="softmax",
     kw=_moe(num_key_value_heads=HEADS, rms_norm_eps=1e-5, num_experts=N_EXPERTS,
             num_experts_per_tok=TOP_K, norm_topk_prob=False, clip_qkv=None,
             rope_parameters=_rope()),
     notes="OLMoE: q/k RMSNorm over the full projection width (attn_q_norm/attn_k_norm "
           "[64]), 4 experts top-2, raw softmax weights (norm_topk_prob False; llama.cpp "
           "hard-codes false). MHA (4 kv heads) as the real OLMoE: llama.cpp's olmoe loader "
           "creates attn_k_norm as {n_embd}, so a GQA OLMoE (k_norm width 32) does not load. "
           "rms eps 1e-5 because the converter hard-codes it")
arch("granitemoe", cfg="GraniteMoeConfig", model="GraniteMoeForCausalLM", moe="softmax",
     kw=_moe(rms_norm_eps=1e-5, tie_word_embeddings=True, num_local_experts=N_EXPERTS,
             num_experts_per_tok=TOP_K, embedding_multiplier=4.0, residual_multiplier=0.5,
             attention_multiplier=0.1, logits_scaling=0.5, rope_parameters=_rope()),
     notes="Granite 3 MoE: multipliers embedding 4, residual 0.5, attention 0.1, logits / 0.5; "
           "HF fused block_sparse_moe.input_linear [E, 2*64, 64] split by the converter into "
           "ffn_gate_exps|ffn_up_exps; router top-2 then softmax over the 2 logits (= softmax + "
           "renormalise, llama.cpp norm_w=true)")
arch("granitemoeshared", arch="granitemoe", cfg="GraniteMoeSharedConfig",
     model="GraniteMoeSharedForCausalLM", moe="softmax",
     kw=_moe(rms_norm_eps=1e-5, tie_word_embeddings=True, num_local_experts=N_EXPERTS,
             num_experts_per_tok=TOP_K, shared_intermediate_size=2 * MOE_INTER,
             embedding_multiplier=4.0, residual_multiplier=0.5, attention_multiplier=0.1,
             logits_scaling=0.5, rope_parameters=_rope()),
     notes="GraniteMoeShared: as granitemoe plus an ungated shared SwiGLU expert of width 128 "
           "(shared_mlp.input_linear split into ffn_gate_shexp|ffn_up_shexp, "
           "expert_shared_feed_forward_length 128); GGUF arch granitemoe")
ARCH_SEED_DEEPSEEK2 = 4535  # what pick_moe_seed finds for deepseek2; deepseek2-kvb reuses it
arch("deepseek2", cfg="DeepseekV3Config", model="DeepseekV3ForCausalLM", moe="deepseek",
     tweak=_deepseek_tweak, merge={"scoring_func": "sigmoid", "topk_method": "noaux_tc"},
     kw={k: v for k, v in _base(num_hidden_layers=3, num_key_value_heads=HEADS,
              intermediate_size=2 * MOE_INTER, moe_intermediate_size=MOE_INTER,
              rms_norm_eps=1e-6, q_lora_rank=32, kv_lora_rank=32, qk_rope_head_dim=8,
              qk_nope_head_dim=16, v_head_dim=16, first_k_dense_replace=1,
              n_routed_experts=N_EXPERTS, n_shared_experts=1, n_group=2, topk_group=1,
              num_experts_per_tok=TOP_K, routed_scaling_factor=2.5, norm_topk_prob=True,
              num_nextn_predict_layers=0, rope_interleave=True, rope_parameters=_rope()).items()
         if k != "head_dim"},  # DeepseekV3Config derives head_dim (= qk_rope_head_dim)
     notes="DeepSeek-V3 (DeepseekV3ForCausalLM -> GGUF deepseek2): MLA with q_lora_rank 32, "
           "kv_lora_rank 32, qk_rope 8 / qk_nope 16 / v 16 (kq scale 1/sqrt(24); converter "
           "splits kv_b_proj into attn_k_b/attn_v_b, head_count_kv 1), interleaved rope on raw "
           "weights (llama.cpp NORM rope); layer 0 dense (first_k_dense_replace 1, width 128), "
           "layers 1-2 MoE: sigmoid scores, e_score_correction_bias (random N(0,0.1), "
           "selection only -> exp_probs_b.bias), 2 groups of 2 with topk_group 1 (group score "
           "= sum of top-2), top-2, renormalised, x routed_scaling_factor 2.5, one shared "
           "expert (width 64). scoring_func/topk_method written to config.json (transformers "
           "hard-codes sigmoid; the converter needs scoring_func to write expert_gating_func "
           "sigmoid, else llama.cpp would use softmax)")
def _deepseek2_legacy_kv_b(path: Path) -> None:
    """Rewrite a deepseek2 GGUF from today's converter into the layout converters wrote before
    llama.cpp's MLA support (its PR 12801, April 2025), in place: one attn_kv_b per layer, HF's
    kv_b_proj unchanged ((heads * (qk_nope + v), kv_lora), each head's k_nope rows then its v
    rows), where today's converter writes attn_k_b = k rows transposed per head and attn_v_b =
    v rows; key_length qk_nope + qk_rope, value_length v and head_count_kv = head_count (the
    config's num_key_value_heads) where today's say kv_lora + qk_rope, kv_lora and 1; no
    key_length_mla / value_length_mla (llama.cpp runs a file without them through its
    non-absorbed path). Everything else is copied as it is."""
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(path)
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    meta = {f.name: f.contents() for f in reader.fields.values()}

    def key(template: str) -> str:
        return template.format(arch=arch)

    n_head = meta[key(gguf.Keys.Attention.HEAD_COUNT)]
    k_mla, v_mla = meta[key(gguf.Keys.Attention.KEY_LENGTH_MLA)], meta[key(gguf.Keys.Attention.VALUE_LENGTH_MLA)]
    changes = {key(gguf.Keys.Attention.HEAD_COUNT_KV): n_head, key(gguf.Keys.Attention.KEY_LENGTH): k_mla,
               key(gguf.Keys.Attention.VALUE_LENGTH): v_mla}
    drop = {key(gguf.Keys.Attention.KEY_LENGTH_MLA), key(gguf.Keys.Attention.VALUE_LENGTH_MLA)}
    k_b, v_b, kv_b = (gguf.TENSOR_NAMES[t] for t in (gguf.MODEL_TENSOR.ATTN_K_B, gguf.MODEL_TENSOR.ATTN_V_B,
                                                     gguf.MODEL_TENSOR.ATTN_KV_B))
    by_name = {t.name: t for t in reader.tensors}
    out = path.with_suffix(".legacy.tmp")
    writer = gguf.GGUFWriter(out, arch)
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == gguf.Keys.General.ARCHITECTURE or field.name in drop:
            continue
        sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, changes.get(field.name, field.contents()), field.types[0], sub_type=sub)
    for t in reader.tensors:
        data, raw_dtype = np.array(t.data), t.tensor_type
        bid = t.name.split(".")[1] if t.name.startswith("blk.") else None
        if bid is not None and t.name == k_b.format(bid=bid) + ".weight":
            k = data  # (heads, kv_lora, qk_nope): per head W_k^T
            v = np.array(by_name[v_b.format(bid=bid) + ".weight"].data)  # (heads, v, kv_lora)
            assert t.tensor_type == gguf.GGMLQuantizationType.F32 and k.shape[0] == n_head
            data = np.concatenate([k.transpose(0, 2, 1), v], axis=1).reshape(-1, k.shape[1])
            writer.add_tensor(kv_b.format(bid=bid) + ".weight", np.ascontiguousarray(data))
            continue
        if bid is not None and t.name == v_b.format(bid=bid) + ".weight":
            continue
        writer.add_tensor(t.name, data, raw_shape=[int(x) for x in reversed(t.shape)], raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    out.replace(path)


arch("deepseek2-kvb", **{k: v for k, v in ARCHS["deepseek2"].items() if k != "notes"},
     seed=ARCH_SEED_DEEPSEEK2, gguf_rewrite=_deepseek2_legacy_kv_b,
     notes="the deepseek2 fixture's model (same checkpoint and seed) in the layout of GGUFs "
           "converted before llama.cpp's MLA support: one attn_kv_b per layer (HF kv_b_proj "
           "as is) instead of attn_k_b/attn_v_b, key_length 24 / value_length 16 / "
           "head_count_kv 4, no *_mla keys (_deepseek2_legacy_kv_b rewrites the converter's "
           "F32 file with gguf-py before quantizing). llama.cpp runs it without absorption "
           "(per-head K/V cache); mlxllm splits attn_kv_b into the absorbed form before its "
           "first forward pass (nn/mla.py), keeping the latent-only cache")


LITE_LAYERS = 26  # llama.cpp's deepseek2 "lite" check: q_lora_rank may be absent only at 26/27 layers
LITE_DIM = 32
arch("deepseek2-lite", arch="deepseek2", cfg="DeepseekV2Config", model="DeepseekV2ForCausalLM",
     moe="softmax",
     kw={k: v for k, v in _base(hidden_size=LITE_DIM, num_hidden_layers=LITE_LAYERS,
              num_key_value_heads=HEADS, intermediate_size=LITE_DIM, moe_intermediate_size=LITE_DIM,
              rms_norm_eps=1e-6, q_lora_rank=None, kv_lora_rank=32, qk_rope_head_dim=8,
              qk_nope_head_dim=16, v_head_dim=16, first_k_dense_replace=LITE_LAYERS - 2,
              n_routed_experts=N_EXPERTS, n_shared_experts=1, num_experts_per_tok=TOP_K,
              topk_method="greedy", routed_scaling_factor=1.0, norm_topk_prob=False,
              rope_parameters=_rope()).items() if k != "head_dim"},
     notes="DeepSeek-V2-Lite style (DeepseekV2ForCausalLM -> GGUF deepseek2): no query "
           "compression (q_lora_rank None -> attn_q, no attention.q_lora_rank key), which "
           "llama.cpp accepts only for its 'lite' layer counts (26/27, src/models/deepseek2.cpp), "
           "hence 26 layers; width 32 and 24 dense leading layers (FFN width 32) keep the file "
           "about 1 MB. MLA kv_lora 32, qk_rope 8 / qk_nope 16 / v 16; layers 24-25 MoE as V2: "
           "softmax over 4 experts (no expert_gating_func key: llama.cpp's default softmax), "
           "greedy top-2, not renormalised, scale 1, one shared expert")
arch("gpt-oss", cfg="GptOssConfig", model="GptOssForCausalLM", moe="softmax",
     sliding_window=SWA, experts_in_out=True, extra_quants=["mxfp4_moe"],
     kw=_base(rms_norm_eps=1e-5, num_local_experts=N_EXPERTS, num_experts_per_tok=TOP_K,
              sliding_window=SWA, layer_types=["sliding_attention", "full_attention"],
              attention_bias=True, rope_parameters=_rope(150000.0)),
     notes="gpt-oss: even layers sliding (window 16), odd full (layer_types), per-head "
           "attention sinks (attn_sinks), q/k/v/o biases, router with bias, top-2 then softmax "
           "over the 2 selected logits, expert biases, clamped SwiGLU (alpha 1.702, limit 7) "
           "with (up+1); HF gate_up_proj [E, in, 2*ff] interleaved gate/up, de-interleaved by "
           "the converter. Plain rope (theta 150000) instead of the real YaRN factor 32: "
           "llama.cpp ignores YaRN truncate=false (real gpt-oss config) so YaRN would differ. "
           "Extra file gpt-oss.mxfp4_moe.gguf: llama.cpp's quantizer with "
           "LLAMA_FTYPE_MOSTLY_MXFP4_MOE from the F32 file (expert tensors MXFP4, the rest as "
           "that ftype leaves them); extra_quants lists it, mxfp4_moe_* fields hold its stats")
arch("phimoe", cfg="PhimoeConfig", model="PhimoeForCausalLM", hf_arch="PhiMoEForCausalLM",
     tok="spm", moe="softmax",
     kw=_moe(rms_norm_eps=1e-5, num_local_experts=N_EXPERTS, num_experts_per_tok=TOP_K,
             attention_bias=True, lm_head_bias=True, sliding_window=None, pad_token_id=None,
             input_jitter_noise=0.0,
             rope_parameters=_rope(1e4, original_max_position_embeddings=MAX_POS)),
     notes="Phi-3.5-MoE style: config.json says PhiMoEForCausalLM (the converter does not "
           "register transformers' PhimoeForCausalLM spelling); q/k/v/o biases, lm_head bias, "
           "LayerNorm with bias, 4 experts top-2, SentencePiece vocab (Phi3MiniModel.set_vocab), "
           "plain rope (original_max_position_embeddings in rope_parameters because the Phi-3 "
           "converter reads it). NOT expected to match transformers: llama.cpp's phimoe.cpp "
           "computes the norms as RMSNorm + bias (HF: LayerNorm) and weights the top-2 experts "
           "by renormalised softmax (HF: sparsemixer); the measured difference is recorded in "
           "f32_vs_hf_* and is a known llama.cpp/HF discrepancy, not a converter bug. Measured "
           "at generation (seed 98432): f32 vs HF max|diff|/std 3.42, argmax agree 0.125; with "
           "the HF model patched to RMSNorm+bias norms and softmax-renormalised top-2 weights "
           "(llama.cpp's math) it is 3.7e-06 / 1.0, so those two account for all of it "
           "(either patch alone: 2.37 / 3.66). router_min_gap is measured on HF (LayerNorm) "
           "router inputs")



# --- DBRX, MiniMax-M2, Llama 4 -------------------------------------------------------------
DBRX_CLIP = 2.0  # clip_qkv (DBRX: 8); small so that the clamp bites

arch("dbrx", cfg="DbrxConfig", model="DbrxForCausalLM", moe="softmax",
     kw=dict(d_model=HIDDEN, n_heads=HEADS, n_layers=N_LAYERS, max_seq_len=MAX_POS, vocab_size=VOCAB,
             tie_word_embeddings=False, rope_parameters=_rope(500000.0),
             attn_config=dict(kv_n_heads=KV_HEADS, clip_qkv=DBRX_CLIP, rope_theta=500000.0),
             ffn_config=dict(ffn_hidden_size=MOE_INTER, moe_num_experts=N_EXPERTS, moe_top_k=TOP_K,
                             moe_normalize_expert_weights=1.0)),
     notes="DBRX: fused Wqkv clamped to +-clip_qkv (2; real DBRX 8) before the split, GQA 4q/2kv, "
           "NEOX rope, LayerNorms without bias (norm_1 -> attn_norm, norm_2 -> attn_output_norm "
           "as the FFN's pre-norm), 4 experts top-2 softmax renormalised "
           "(moe_normalize_expert_weights 1 = sum; llama.cpp hard-codes norm_w=true); HF keeps "
           "each projection's experts fused 2-D [E*ff, d] (w1, v1, w2), which the converter "
           "views as 3-D (w2 transposed per expert). rope_theta is set twice: transformers' rotary "
           "reads rope_parameters, the converter attn_config.rope_theta")
arch("minimax-m2", cfg="MiniMaxM2Config", model="MiniMaxM2ForCausalLM", moe="minimax", seed_tries=400,
     tweak=_deepseek_tweak, merge={"scoring_func": "sigmoid", "rotary_dim": HEAD_DIM // 2},
     kw=_moe(rms_norm_eps=1e-6, num_local_experts=N_EXPERTS, num_experts_per_tok=TOP_K,
             rope_parameters=_rope(5e6, partial_rotary_factor=0.5)),
     notes="MiniMax-M2: q/k RMSNorm over all heads' width (q_norm [64], k_norm [32]) before the "
           "head split, partial NEOX rotary (rotary_dim 8 of head_dim 16), 4 experts top-2 chosen "
           "on sigmoid(logit) + e_score_correction_bias (buffer, random N(0,0.1) -> "
           "exp_probs_b.bias, selection only), weights the unbiased sigmoids renormalised. "
           "transformers saves the original block_sparse_moe.experts.N.w1/w2/w3 layout the "
           "converter merges. config.json gets scoring_func sigmoid (the converter writes "
           "expert_gating_func from it; llama.cpp has no default) and rotary_dim (the converter "
           "reads it; transformers keeps partial_rotary_factor). router_min_gap in "
           "sigmoid(+bias) units")
LLAMA4_CHUNK = 8192  # llama.cpp fixes Llama 4's attention chunk and temperature floor at 8192


def _llama4_post(entry: dict, f32: Path) -> None:
    entry["n_experts_used"] = 1  # top-1, not the MoE fixtures' TOP_K


arch("llama4", cfg="Llama4TextConfig", model="Llama4ForCausalLM", moe="top1", experts_in_out=True,
     post=_llama4_post,
     kw=_moe(num_hidden_layers=4, rms_norm_eps=1e-5, intermediate_size_mlp=INTER,
             num_local_experts=N_EXPERTS, num_experts_per_tok=1, interleave_moe_layer_step=2,
             use_qk_norm=True, attention_chunk_size=LLAMA4_CHUNK, attn_temperature_tuning=True,
             floor_scale=LLAMA4_CHUNK, attn_scale=0.1, no_rope_layer_interval=4,
             rope_parameters=_rope(500000.0)),
     notes="Llama 4 text model (Llama4ForCausalLM -> GGUF llama4): 4 layers; layers 0-2 chunked "
           "attention with interleaved rope (no converter permutation: HF's complex rotary pairs "
           "adjacent entries) and a weightless L2 (RMS) norm of rotated q/k (use_qk_norm), layer 3 "
           "full attention without rope and with the attention temperature (1 + 0.1 ln(floor((p + "
           "1) / 8192) + 1)); dense SwiGLU layers 0 and 2 (intermediate_size_mlp 128), MoE layers "
           "1 and 3 (interleave_moe_layer_step 2): 4 experts of width 64, top-1 chosen on the router "
           "logits, sigmoid of the chosen logit multiplying the expert's INPUT, plus an always-on "
           "shared expert (width 64). Chunk 8192 and temperature floor 8192 because llama.cpp fixes "
           "both: neither bites in the 40-token comparison with HF (tests/test_llama4_long.py runs "
           "llama.cpp past position 8192 on this file). router_min_gap in logit units, top-1")
# --- end DBRX, MiniMax-M2, Llama 4 ---------------------------------------------------------


# --- more MoE fixtures (GLM-4.5, ERNIE 4.5 MoE, Hunyuan-A13B, dots.llm1, Ling v1) -------------

def _ernie_moe_tweak(model, seed: int) -> None:
    """ERNIE 4.5 MoE's mlp.moe_statics.e_score_correction_bias ([1, E] parameter, zero at
    init) redrawn N(0, 0.1) so that the selection-only bias (exp_probs_b) is exercised."""
    import torch

    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, b in model.named_parameters():
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)


def _gguf_kv(path: Path, key: str):
    import gguf

    r = gguf.GGUFReader(str(path))
    f = r.fields.get(key)
    if f is None:
        return None
    v = f.parts[f.data[0]]
    return v.tolist()[0] if hasattr(v, "tolist") else v


def _glm4moe_mtp_checkpoint(model, config: dict, d: Path) -> dict:
    """Append one GLM-4.5 style MTP (nextn) block to the saved checkpoint, as the released
    GLM-4.5 checkpoints have it: model.layers.{L}.* = a full MoE decoder block (random, same
    shapes as layer L-1) plus eh_proj [E, 2E], enorm, hnorm, shared_head.norm. transformers'
    Glm4MoeForCausalLM never builds it (num_nextn_predict_layers is ignored), so it does not
    affect the reference logits; llama.cpp loads it as blk.{L} and skips it in the main graph."""
    import torch
    from safetensors.torch import load_file, save_file

    files = sorted(d.glob("*.safetensors"))
    assert len(files) == 1, files
    sd = load_file(str(files[0]))
    L = config["num_hidden_layers"]
    E = config["hidden_size"]
    g = torch.Generator().manual_seed(4242)
    src = f"model.layers.{L - 1}."
    for k in [k for k in sd if k.startswith(src)]:
        v = sd[k]
        nk = f"model.layers.{L}." + k[len(src):]
        if k.endswith("e_score_correction_bias"):
            sd[nk] = torch.randn(v.shape, generator=g) * 0.1
        elif v.ndim >= 2:
            sd[nk] = torch.randn(v.shape, generator=g) / math.sqrt(v.shape[-1])
        else:
            sd[nk] = v + torch.randn(v.shape, generator=g) * 0.1
    p = f"model.layers.{L}."
    sd[p + "eh_proj.weight"] = torch.randn(E, 2 * E, generator=g) / math.sqrt(2 * E)
    for nm in ("enorm", "hnorm", "shared_head.norm"):
        sd[p + nm + ".weight"] = 1.0 + 0.1 * torch.randn(E, generator=g)
    sd = {k: v.contiguous() for k, v in sd.items()}
    files[0].unlink()
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    return config


def _glm4moe_post(entry: dict, f32: Path) -> None:
    L = entry["config"]["num_hidden_layers"]
    kept = f"blk.{L}.nextn.eh_proj.weight" in entry["tensors"]
    entry["mtp_block_kept"] = kept
    entry["gguf_block_count"] = _gguf_kv(f32, "glm4moe.block_count")
    entry["gguf_nextn_predict_layers"] = _gguf_kv(f32, "glm4moe.nextn_predict_layers")


arch("glm4moe", cfg="Glm4MoeConfig", model="Glm4MoeForCausalLM", moe="sigmoid",
     tweak=_deepseek_tweak, rewrite=_glm4moe_mtp_checkpoint, post=_glm4moe_post,
     kw=_moe(num_hidden_layers=3, rms_norm_eps=1e-5, intermediate_size=2 * MOE_INTER,
             moe_intermediate_size=MOE_INTER, attention_bias=True, use_qk_norm=True,
             n_routed_experts=N_EXPERTS, num_experts_per_tok=TOP_K, n_shared_experts=1,
             n_group=1, topk_group=1, first_k_dense_replace=1, norm_topk_prob=True,
             routed_scaling_factor=2.5, num_nextn_predict_layers=1, eos_token_id=EOS_ID,
             rope_parameters=_rope(1e6, partial_rotary_factor=0.5)),
     notes="GLM-4.5 (Glm4MoeForCausalLM -> GGUF glm4moe): q/k/v biases, per-head q/k RMSNorm "
           "(use_qk_norm) before rope, partial NEOX rotary 0.5 (n_rot 8 of head_dim 16); layer 0 "
           "dense (first_k_dense_replace 1, width 128), layers 1-2 MoE: sigmoid scores, "
           "e_score_correction_bias random N(0,0.1) (selection only -> exp_probs_b.bias), "
           "n_group 1 / topk_group 1 (no grouping), top-2, renormalised, x routed_scaling_factor "
           "2.5, one shared expert (width 64). num_nextn_predict_layers 1: the checkpoint gets a "
           "GLM-style MTP block model.layers.3.* (full MoE block + eh_proj/enorm/hnorm/"
           "shared_head.norm, random; transformers ignores it) and mtp_block_kept records "
           "whether the converter wrote it as blk.3 (block_count 4, nextn_predict_layers 1; "
           "llama.cpp's main graph runs only n_layer = 3). Converter vocab: _set_vocab_glm "
           "patched to skip GLM's own special tokens ([gMASK], <|observation|>) that our "
           "tokenizer lacks. router_min_gap in sigmoid(+bias) units")
arch("ernie4_5-moe", cfg="Ernie4_5_MoeConfig", model="Ernie4_5_MoeForCausalLM", tok="spm",
     moe="ernie", tweak=_ernie_moe_tweak, seed_tries=400,
     kw=_moe(num_hidden_layers=3, rms_norm_eps=1e-5, use_bias=False, tie_word_embeddings=True,
             intermediate_size=2 * MOE_INTER, moe_intermediate_size=MOE_INTER,
             moe_num_experts=N_EXPERTS, moe_k=TOP_K, moe_num_shared_experts=1,
             moe_layer_start_index=1, moe_layer_end_index=2, moe_layer_interval=1,
             rope_parameters=_rope(500000.0)),
     notes="ERNIE 4.5 MoE (21B-A3B style): tied embeddings, interleaved rotary on raw weights "
           "(llama.cpp NORM rope), layer 0 dense (moe_layer_start_index 1, width 128), layers "
           "1-2 MoE (moe_layer_interval 1): softmax probs, top-2 selected on probs + "
           "moe_statics.e_score_correction_bias (random N(0,0.1), selection only -> "
           "exp_probs_b.bias), weights = unbiased probs renormalised; one shared expert of width "
           "64. intermediate_size 128 with 2 kv heads because the converter writes "
           "expert_shared_feed_forward_length = intermediate_size // num_key_value_heads (= 64 = "
           "HF moe_intermediate_size * moe_num_shared_experts). router_min_gap in "
           "probability(+bias) units")
HY_HEAD_DIM = 128  # the converter's dynamic-alpha branch asserts head_dim 128
arch("hunyuan-moe", cfg="HunYuanMoEV1Config", model="HunYuanMoEV1ForCausalLM", moe="softmax",
     merge={"moe_intermediate_size": [MOE_INTER] * N_LAYERS, "moe_topk": [TOP_K] * N_LAYERS,
            "num_shared_expert": [1] * N_LAYERS},
     kw=_moe(hidden_size=HY_HEAD_DIM, num_attention_heads=1, num_key_value_heads=1,
             head_dim=HY_HEAD_DIM, rms_norm_eps=1e-5, tie_word_embeddings=True,
             num_experts=N_EXPERTS, moe_topk=TOP_K, use_qk_norm=True, eod_token_id=EOS_ID,
             max_position_embeddings=32768,
             rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "alpha": 1000.0,
                              "factor": 1.0}),
     notes="Hunyuan-A13B style (HunYuanMoEV1ForCausalLM -> GGUF hunyuan-moe): per-head q/k "
           "RMSNorm applied AFTER rope, 4 experts top-2 softmax renormalised, ungated shared MLP "
           "(mlp.shared_mlp, width = intermediate_size 64; experts also use intermediate_size, "
           "as in HF), router mlp.gate.wg, tied embeddings. Real NTK-alpha rope (rope_type "
           "dynamic, alpha 1000, theta 1e4): the converter folds it into a fixed freq_base "
           "theta*alpha^(hd/(hd-2)) and asserts alpha 1000, theta 1e4, hidden_size/heads == 128 "
           "and max_position_embeddings 32768|262144, so this fixture departs from hidden 64: "
           "hidden 128 with ONE 128-wide head (1 kv head); transformers computes the same "
           "'ntk_alpha' frequencies. config.json gets the per-layer lists moe_intermediate_size "
           "/ moe_topk / num_shared_expert the converter reads. Converter vocab: "
           "HunYuanMoEModel.set_vocab (tiktoken-only, forces bos 127959) replaced by the dense "
           "HunYuanModel.set_vocab tokenizer.json path")
arch("dots1", cfg="Dots1Config", model="Dots1ForCausalLM", moe="deepseek",
     tweak=_deepseek_tweak, seed_tries=400, merge={"scoring_func": "sigmoid"},
     kw=_moe(num_hidden_layers=3, num_key_value_heads=HEADS, rms_norm_eps=1e-6,
             intermediate_size=2 * MOE_INTER, moe_intermediate_size=MOE_INTER,
             n_routed_experts=N_EXPERTS, num_experts_per_tok=TOP_K, n_shared_experts=1,
             n_group=2, topk_group=1, first_k_dense_replace=1, norm_topk_prob=True,
             routed_scaling_factor=2.5, sliding_window=None, rope_parameters=_rope(1e6)),
     notes="dots.llm1 (Dots1ForCausalLM -> GGUF dots1): qwen3-style attention (per-head q/k "
           "RMSNorm before NEOX rope), MHA (llama.cpp's dots1 loader sizes K/V as n_head*hd); "
           "layer 0 dense (first_k_dense_replace 1, width 128), layers 1-2 MoE with DeepSeek-V3 "
           "routing: sigmoid scores, e_score_correction_bias random N(0,0.1) (selection only), "
           "2 groups of 2 with topk_group 1, top-2, renormalised, x routed_scaling_factor 2.5, "
           "one shared expert (width 64). scoring_func sigmoid written into config.json: "
           "llama.cpp's dots1 has no default gating func, the converter writes "
           "expert_gating_func from it")

def _bailingmoe_checkpoint(model, config: dict, d: Path) -> dict:
    """Rewrite the saved GraniteMoeShared checkpoint in d as a Ling v1 (BailingMoeForCausalLM,
    remote code) checkpoint. transformers has no BailingMoe class; with all Granite multipliers
    neutral (embedding/residual/logits 1, attention_multiplier 1/sqrt(head_dim)) GraniteMoeShared
    is the same math: RMSNorm pre-norm blocks, half-split rope, softmax router top-2
    renormalised, ungated SwiGLU shared expert added to the routed sum. Layout written:
    model.word_embeddings, attention.query_key_value (rows [q | k | v]), attention.dense,
    mlp.gate, mlp.experts.{e}.{gate,up,down}_proj, mlp.shared_experts.{gate,up,down}_proj,
    model.norm, lm_head."""
    from safetensors.torch import save_file

    c = model.config
    ff, ffs = c.intermediate_size, c.shared_intermediate_size
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    out = {"model.word_embeddings.weight": sd["model.embed_tokens.weight"],
           "model.norm.weight": sd["model.norm.weight"],
           "lm_head.weight": sd["lm_head.weight"]}
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = sd[p + "input_layernorm.weight"]
        out[p + "post_attention_layernorm.weight"] = sd[p + "post_attention_layernorm.weight"]
        out[p + "attention.query_key_value.weight"] = torch_cat(
            [sd[p + f"self_attn.{x}_proj.weight"] for x in "qkv"])
        out[p + "attention.dense.weight"] = sd[p + "self_attn.o_proj.weight"]
        out[p + "mlp.gate.weight"] = sd[p + "block_sparse_moe.router.weight"]
        gu, dn = sd[p + "block_sparse_moe.experts.gate_up_proj"], sd[p + "block_sparse_moe.experts.down_proj"]
        for e in range(c.num_local_experts):
            q = p + f"mlp.experts.{e}."
            out[q + "gate_proj.weight"] = gu[e, :ff].contiguous()
            out[q + "up_proj.weight"] = gu[e, ff:].contiguous()
            out[q + "down_proj.weight"] = dn[e].contiguous()
        sh = sd[p + "shared_mlp.input_linear.weight"]
        out[p + "mlp.shared_experts.gate_proj.weight"] = sh[:ffs].contiguous()
        out[p + "mlp.shared_experts.up_proj.weight"] = sh[ffs:].contiguous()
        out[p + "mlp.shared_experts.down_proj.weight"] = sd[p + "shared_mlp.output_linear.weight"]
    for f in d.glob("*.safetensors"):
        f.unlink()
    save_file(out, str(d / "model.safetensors"), metadata={"format": "pt"})
    rope = config.get("rope_parameters") or {}
    new = {
        "architectures": ["BailingMoeForCausalLM"], "model_type": "bailing_moe",
        "auto_map": {"AutoConfig": "configuration_bailing_moe.BailingMoeConfig",
                     "AutoModelForCausalLM": "modeling_bailing_moe.BailingMoeForCausalLM"},
        "hidden_act": "silu", "hidden_size": c.hidden_size, "intermediate_size": ff,
        "moe_intermediate_size": ff, "num_experts": c.num_local_experts,
        "num_experts_per_tok": c.num_experts_per_tok, "num_shared_experts": ffs // ff,
        "norm_topk_prob": True, "first_k_dense_replace": 0, "norm_head": False,
        "num_attention_heads": c.num_attention_heads, "num_key_value_heads": c.num_key_value_heads,
        "head_dim": c.hidden_size // c.num_attention_heads,
        "num_hidden_layers": c.num_hidden_layers, "max_position_embeddings": c.max_position_embeddings,
        "rms_norm_eps": c.rms_norm_eps, "rope_theta": rope.get("rope_theta", 10000.0),
        "rope_scaling": None, "use_qkv_bias": False, "use_bias": False,
        "tie_word_embeddings": False, "vocab_size": c.vocab_size,
        "bos_token_id": config.get("bos_token_id"), "eos_token_id": config.get("eos_token_id"),
        "pad_token_id": config.get("pad_token_id"), "torch_dtype": "float32", "use_cache": True,
    }
    (d / "config.json").write_text(json.dumps(new, indent=1))
    return new


def torch_cat(ts):
    import torch

    return torch.cat(ts, dim=0).contiguous()


arch("bailingmoe", cfg="GraniteMoeSharedConfig", model="GraniteMoeSharedForCausalLM",
     hf_arch="BailingMoeForCausalLM", moe="softmax", rewrite=_bailingmoe_checkpoint,
     kw=_moe(rms_norm_eps=1e-6, num_local_experts=N_EXPERTS, num_experts_per_tok=TOP_K,
             shared_intermediate_size=MOE_INTER, embedding_multiplier=1.0,
             residual_multiplier=1.0, attention_multiplier=1.0 / math.sqrt(HEAD_DIM),
             logits_scaling=1.0, rope_parameters=_rope(600000.0)),
     notes="Ling-lite v1 style (BailingMoeForCausalLM, remote code -> GGUF bailingmoe). "
           "transformers has no BailingMoe class, so the checkpoint is written in Ling's own "
           "layout (model.word_embeddings, fused attention.query_key_value [q|k|v], "
           "attention.dense, mlp.gate, per-expert mlp.experts.N.*, mlp.shared_experts.*) from a "
           "transformers GraniteMoeSharedForCausalLM with neutral multipliers (embedding, "
           "residual, logits 1; attention 1/sqrt(16)) which is the same math; the reference "
           "logits are that model's. converter splits qkv and permutes q/k for llama.cpp's NORM "
           "rope; 4 experts top-2 softmax renormalised (norm_topk_prob True), one ungated "
           "shared expert (width 64), every layer MoE (first_k_dense_replace 0), norm_head False")


# --- a MoE fixture wide enough for k-quants -------------------------------------------------
# K-quant blocks hold 256 values of a row, so in the 64-wide fixtures llama.cpp's Q4_K_M falls
# back to 32-block types. Here every matrix row is 256 wide (hidden 256, 4 heads of 64, expert
# width 256): llama.cpp's Q4_K_M writes its own mix (Q4_K experts, Q6_K ffn_down_exps in the
# layer use_more_bits picks, Q6_K output). Only that file is committed (keep): the F32 / Q8_0
# files would be 8.5 MB / 2.3 MB, and the 64-wide fixtures already cover those layouts.
WIDE = 256

arch("qwen3moe-wide", arch="qwen3moe", cfg="Qwen3MoeConfig", model="Qwen3MoeForCausalLM",
     moe="softmax", extra_quants=["q4_k_m"], keep=["q4_k_m"],
     kw=_base(hidden_size=WIDE, head_dim=WIDE // HEADS, intermediate_size=WIDE, rms_norm_eps=1e-6,
              num_experts=N_EXPERTS, num_experts_per_tok=TOP_K, moe_intermediate_size=WIDE,
              norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
              rope_parameters=_rope(1e6)),
     notes="qwen3moe at width 256 (hidden 256, 4 heads x 64 / 2 kv heads, 4 experts of width "
           "256, top-2 renormalised, 2 layers) so that llama.cpp's Q4_K_M keeps k-quants: "
           "q4_k_m_tensor_types lists what it wrote. Only qwen3moe-wide.q4_k_m.gguf is "
           "committed (files_kept); the F32 and Q8_0 files are made and checked against HF "
           "as for every fixture, then dropped")


# --- recurrent state: Mamba, Falcon-Mamba, Mamba-2, LFM2, LFM2-MoE ---------------------------
# Layers that carry a state instead of (or beside) a KV cache. d_inner = 2 * hidden (llama.cpp's
# Mamba loader accepts no other expansion); Mamba's A_log is a matrix, so `redraw` gives it
# N(0, 1/d_state) values: A = -exp(A_log) stays negative, the state decays.
SSM_STATE = 16


def _mamba_kw(**kw) -> dict:
    d = dict(hidden_size=HIDDEN, state_size=SSM_STATE, num_hidden_layers=N_LAYERS, expand=2, conv_kernel=4,
             time_step_rank=8, layer_norm_epsilon=1e-5, vocab_size=VOCAB, tie_word_embeddings=False,
             use_conv_bias=True, use_bias=False)
    d.update(kw)
    return d


arch("mamba", cfg="MambaConfig", model="MambaForCausalLM", kw=_mamba_kw(),
     notes="Mamba 1: conv1d (kernel 4) + selective scan with per-channel A (d_inner 128, d_state 16, "
           "dt_rank 8), untied output")
arch("falcon-mamba", arch="mamba", cfg="FalconMambaConfig", model="FalconMambaForCausalLM",
     kw=_mamba_kw(mixer_rms_eps=1e-5),
     notes="Falcon-Mamba: Mamba 1 with weightless RMS norms on dt, B and C (ssm.dt_b_c_rms); "
           "mixer_rms_eps = layer_norm_epsilon because llama.cpp uses the latter for them")
arch("mamba2", cfg="Mamba2Config", model="Mamba2ForCausalLM",
     kw=dict(hidden_size=HIDDEN, num_heads=8, head_dim=16, state_size=SSM_STATE, n_groups=2, expand=2,
             conv_kernel=4, num_hidden_layers=N_LAYERS, layer_norm_epsilon=1e-5, vocab_size=VOCAB,
             tie_word_embeddings=False, use_conv_bias=True, use_bias=False, chunk_size=16),
     notes="Mamba 2: 8 heads x 16, scalar decay per head, B/C in 2 groups, gated grouped RMSNorm")

LFM2_LAYERS = ["conv", "full_attention", "conv", "full_attention"]


def _lfm2_kw(**kw) -> dict:
    d = dict(hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=len(LFM2_LAYERS),
             num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=MAX_POS,
             vocab_size=VOCAB, norm_eps=1e-5, conv_L_cache=3, conv_bias=False, layer_types=LFM2_LAYERS,
             block_auto_adjust_ff_dim=False, tie_word_embeddings=True, rope_parameters=_rope(1e6))
    d.update(kw)
    return d


def _lfm2moe_tweak(model, seed: int) -> None:
    """The experts as `redraw(moe=True)` would draw them (fan_in = an expert's input width),
    the router scaled, and a random selection bias (HF keeps expert_bias as a zero buffer)."""
    import torch

    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".experts." in name and p.ndim == 3:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
            elif name.endswith(".feed_forward.gate.weight"):
                p.mul_(ROUTER_SCALE)
        for name, b in model.named_buffers():
            if name.endswith(".expert_bias"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)


arch("lfm2", cfg="Lfm2Config", model="Lfm2ForCausalLM", kw=_lfm2_kw(),
     notes="LFM2: short-conv layers (in_proj -> B*x -> causal conv, kernel 3 -> C*) and GQA attention "
           "layers with q/k RMSNorm (conv, attn, conv, attn); the final norm is stored as token_embd_norm")
arch("lfm2moe", cfg="Lfm2MoeConfig", model="Lfm2MoeForCausalLM", tweak=_lfm2moe_tweak,
     kw=_lfm2_kw(moe_intermediate_size=MOE_INTER, num_dense_layers=1, num_experts=N_EXPERTS,
                 num_experts_per_tok=TOP_K, use_expert_bias=True, norm_topk_prob=True,
                 routed_scaling_factor=1.0),
     notes="LFM2-MoE: LFM2 with a dense first layer, then 4 experts top-2 by sigmoid + selection "
           "bias, renormalized")


def _patch_granite_hybrid_layer_types() -> None:
    """GraniteHybridModel.get_attn_layers (conversion/granite.py) looks for "attention" in
    layer_types; transformers 5 names GraniteMoeHybrid's layers linear_attention (Mamba) and
    full_attention, so every layer would convert as Mamba. Same code, both names."""
    import conversion.granite as granite

    orig = granite.GraniteHybridModel.get_attn_layers

    def get_attn_layers(self):
        if layer_types := self.hparams.get("layer_types"):
            return [i for i, kind in enumerate(layer_types) if kind in ("attention", "full_attention")]
        return orig(self)

    granite.GraniteHybridModel.get_attn_layers = get_attn_layers


HYBRID_LAYERS = ["mamba", "attention", "mamba", "attention"]


def _granite_hybrid_kw(**kw) -> dict:
    d = _base(num_hidden_layers=len(HYBRID_LAYERS), rms_norm_eps=1e-5, layer_types=HYBRID_LAYERS,
              mamba_n_heads=8, mamba_d_head=16, mamba_d_state=SSM_STATE, mamba_n_groups=2, mamba_expand=2,
              mamba_d_conv=4, num_local_experts=0, num_experts_per_tok=0, shared_intermediate_size=INTER,
              embedding_multiplier=2.0, residual_multiplier=0.5, attention_multiplier=0.2, logits_scaling=2.0)
    d.update(kw)
    return d


arch("granitehybrid", cfg="GraniteMoeHybridConfig", model="GraniteMoeHybridForCausalLM", kw=_granite_hybrid_kw(),
     notes="Granite 4.0-H dense: Mamba-2 layers (8 heads x 16, 2 groups) and GQA attention without "
           "RoPE (mamba, attn, mamba, attn), Granite's multipliers (embedding 2, residual 0.5, "
           "attention 0.2, logits 1/2), shared_mlp as the FFN")
arch("falcon-h1", cfg="FalconH1Config", model="FalconH1ForCausalLM",
     kw=_base(rms_norm_eps=1e-5, rope_parameters=_rope(1e4), mamba_d_ssm=96, mamba_n_heads=6, mamba_d_head=16,
              mamba_n_groups=2, mamba_d_state=SSM_STATE, mamba_d_conv=4, mamba_rms_norm=True,
              mamba_norm_before_gate=False, embedding_multiplier=1.5, lm_head_multiplier=0.8,
              mlp_multipliers=[1.2, 0.7], key_multiplier=0.9, attention_in_multiplier=1.1,
              attention_out_multiplier=0.8, ssm_in_multiplier=1.3, ssm_out_multiplier=0.7,
              ssm_multipliers=[1.0, 0.9, 1.1, 1.2, 0.8]),
     notes="Falcon-H1: attention (NEOX RoPE) and a Mamba-2 mixer (6 heads x 16 = d_ssm 96, not 2 x hidden; "
           "2 groups; gated grouped RMSNorm after the gate) side by side on the same normed input in "
           "every layer, then a SwiGLU FFN; the converter bakes the muP multipliers into the weights")


NEMOTRON_H_MOE_KEYS = ("num_experts_per_tok", "n_routed_experts", "n_shared_experts", "moe_intermediate_size",
                       "moe_shared_expert_intermediate_size", "n_group", "topk_group")
NEMOTRON_H_PATTERN = {"linear_attention": "M", "mamba": "M", "full_attention": "*", "attention": "*", "mlp": "-"}


def _patch_nemotron_h_dense() -> None:
    """NemotronHModel (conversion/nemotron.py) takes a checkpoint for the MoE variant when its
    config has num_experts_per_tok, which transformers 5's NemotronHConfig always writes (with
    the other MoE keys), and counts only "moe" entries of layers_block_type as FFN layers. For
    a checkpoint without "moe" layers: no MoE keys, and the layer kinds as the pattern string
    NVIDIA's dense configs carry (M: Mamba-2, *: attention, -: FFN)."""
    import conversion.base as base
    import conversion.nemotron as nemotron

    orig = nemotron.NemotronHModel.__init__

    def __init__(self, *args, **kwargs):
        hparams = kwargs.pop("hparams", None) or base.ModelBase.load_hparams(args[0], False)
        kinds = hparams.get("layers_block_type") or []
        if kinds and "moe" not in kinds:
            hparams = {k: v for k, v in hparams.items() if k not in NEMOTRON_H_MOE_KEYS}
            hparams["hybrid_override_pattern"] = "".join(NEMOTRON_H_PATTERN[k] for k in kinds)
        orig(self, *args, hparams=hparams, **kwargs)

    nemotron.NemotronHModel.__init__ = __init__


arch("nemotron_h", cfg="NemotronHConfig", model="NemotronHForCausalLM",
     kw=_base(layers_block_type=["mamba", "attention", "mamba", "mlp"], layer_norm_epsilon=1e-5,
              mamba_num_heads=8, mamba_head_dim=16, ssm_state_size=SSM_STATE, n_groups=2, conv_kernel=4,
              expand=2, mlp_hidden_act="relu2"),
     notes="Nemotron-H (dense): one mixer per layer, no second branch: Mamba-2 (8 heads x 16, 2 "
           "groups, gated grouped RMSNorm), GQA attention without RoPE, or a plain ReLU^2 FFN "
           "(mamba, attn, mamba, mlp)")
arch("jamba", cfg="JambaConfig", model="JambaForCausalLM", moe="softmax", tok="spm",
     kw=_base(num_hidden_layers=4, rms_norm_eps=1e-6, num_experts=N_EXPERTS, num_experts_per_tok=TOP_K,
              expert_layer_period=2, expert_layer_offset=1, attn_layer_period=2, attn_layer_offset=1,
              mamba_d_state=SSM_STATE, mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=8, use_mamba_kernels=False),
     notes="Jamba: Mamba-1 layers (dt, B, C RMS-normed with weights) and attention without RoPE "
           "(mamba, attn, mamba, attn), experts (4, top-2 softmax, not renormalized) on odd layers")


def _nemotron_h_moe_tweak(model, seed: int) -> None:
    """Experts drawn as `redraw(moe=True)` would (fan_in = an expert's input width), the
    router scaled, a random selection bias (HF keeps e_score_correction_bias as a zero buffer)."""
    import torch

    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".experts." in name and p.ndim == 3:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
            elif name.endswith(".mixer.gate.weight"):
                p.mul_(ROUTER_SCALE)
        for name, b in model.named_buffers():
            if name.endswith(".e_score_correction_bias"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)


arch("nemotron_h_moe", cfg="NemotronHConfig", model="NemotronHForCausalLM", tweak=_nemotron_h_moe_tweak,
     kw=_base(layers_block_type=["mamba", "attention", "mamba", "moe"], layer_norm_epsilon=1e-5,
              mamba_num_heads=8, mamba_head_dim=16, ssm_state_size=SSM_STATE, n_groups=2, conv_kernel=4,
              expand=2, mlp_hidden_act="relu2", n_routed_experts=N_EXPERTS, num_experts_per_tok=TOP_K,
              moe_intermediate_size=96, moe_shared_expert_intermediate_size=MOE_INTER, n_shared_experts=1,
              norm_topk_prob=True, routed_scaling_factor=2.5, n_group=1, topk_group=1),
     notes="Nemotron-H MoE (Nemotron 3 style): Mamba-2, attention without RoPE, and a layer of 4 ReLU^2 "
           "experts (top-2 by sigmoid + selection bias, renormalized, scaled 2.5) plus an ungated "
           "shared expert (mamba, attn, mamba, moe)")
# --- end recurrent state ----------------------------------------------------------------------


# --- gated delta net: Qwen3-Next, Qwen3.5, Qwen3.5-MoE ------------------------------------------
# Linear-attention layers (a causal conv over q, k, v, then the gated delta rule, state 16 x 16
# per value head) beside gated full attention (the q projection also yields a sigmoid gate per
# head). 2 key heads serve 4 value heads, so the key-to-value head pairing (grouped in Qwen3-Next,
# tiled in Qwen3.5 after the converter's reorder) is exercised. Qwen3.5's M-RoPE sections
# (converter default 11, 11, 10) must fit in a head (ggml asserts), hence head_dim 32 there.
GDN_LAYERS = ["linear_attention", "full_attention", "linear_attention", "full_attention"]


def _gdn_kw(head_dim: int = HEAD_DIM, **kw) -> dict:
    d = _base(num_hidden_layers=len(GDN_LAYERS), layer_types=GDN_LAYERS, head_dim=head_dim, rms_norm_eps=1e-6,
              linear_conv_kernel_dim=4, linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2,
              linear_num_value_heads=4, rope_parameters=_rope(1e4, partial_rotary_factor=0.5))
    d.update(kw)
    return d


def _gdn_mtp_checkpoint(model, config: dict, d: Path) -> dict:
    """Add the multi-token-prediction block the released Qwen3-Next / Qwen3.5 checkpoints carry
    (mtp.layers.0.* a full-attention decoder block, mtp.fc, mtp.pre_fc_norm_{embedding,hidden},
    mtp.norm; random, shaped after the last layer). transformers never builds it, so the
    reference logits are unchanged; the converter writes it as blk.{L} with nextn_predict_layers
    (it refuses a Qwen3-Next checkpoint without one), and llama.cpp skips it in the main graph."""
    import torch
    from safetensors.torch import load_file, save_file

    files = sorted(d.glob("*.safetensors"))
    assert len(files) == 1, files
    sd = load_file(str(files[0]))
    L, E = config["num_hidden_layers"], config["hidden_size"]
    g = torch.Generator().manual_seed(4243)
    src = f"model.layers.{L - 1}."  # a full-attention layer (GDN_LAYERS)
    for k in [k for k in sd if k.startswith(src)]:
        v = sd[k]
        nk = "mtp.layers.0." + k[len(src):]
        sd[nk] = torch.randn(v.shape, generator=g) / math.sqrt(v.shape[-1]) if v.ndim >= 2 \
            else v + torch.randn(v.shape, generator=g) * 0.1
    sd["mtp.fc.weight"] = torch.randn(E, 2 * E, generator=g) / math.sqrt(2 * E)
    for nm in ("pre_fc_norm_embedding", "pre_fc_norm_hidden", "norm"):
        sd[f"mtp.{nm}.weight"] = 0.1 * torch.randn(E, generator=g)
    sd = {k: v.contiguous() for k, v in sd.items()}
    files[0].unlink()
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    if config.get("model_type", "").startswith("qwen3_5"):
        config["mtp_num_hidden_layers"] = 1
        (d / "config.json").write_text(json.dumps(config, indent=1))
    return config


def _gdn_tweak(model, seed: int) -> None:
    """Queries near the keys (q = k + 0.3 q in the projection, the same convolution taps). With
    independent random q and k, o = S q is often a near-cancellation (q . k ~ N(0, 1/16)) that
    the gated RMSNorm after it magnifies: Q8_0's rounding then moved llama.cpp's own logits by
    0.06-0.13 of their std (75-85% argmax) against its F32 run, more than it tests. A trained
    model reads back what it wrote."""
    import torch

    with torch.no_grad():
        for mod in model.modules():
            if not hasattr(mod, "conv1d") or not hasattr(mod, "head_k_dim"):
                continue
            hk, kd = mod.head_k_dim, mod.key_dim
            if hasattr(mod, "in_proj_qkvz"):  # per key head: q, k, its values' v, then z
                w = mod.in_proj_qkvz.weight.view(mod.num_k_heads, -1, mod.in_proj_qkvz.weight.shape[-1])
                w[:, :hk] = w[:, hk:2 * hk] + 0.3 * w[:, :hk]
            else:  # q, k, v of all heads
                w = mod.in_proj_qkv.weight
                w[:kd] = w[kd:2 * kd] + 0.3 * w[:kd]
            mod.conv1d.weight[:kd] = mod.conv1d.weight[kd:2 * kd]


_GDN_MOE = dict(num_experts=N_EXPERTS, num_experts_per_tok=TOP_K, moe_intermediate_size=MOE_INTER,
                shared_expert_intermediate_size=MOE_INTER)

arch("qwen3next", cfg="Qwen3NextConfig", model="Qwen3NextForCausalLM", moe="softmax",
     rewrite=_gdn_mtp_checkpoint, tweak=_gdn_tweak,
     kw=_gdn_kw(**_GDN_MOE, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[]),
     notes="Qwen3-Next: gated delta net layers (conv kernel 4, 2 key heads x 16, 4 value heads x 16, "
           "gated RMSNorm) and gated GQA attention (q/k RMSNorm, NEOX RoPE on half of each head), "
           "(linear, full, linear, full); 4 experts top-2 renormalized plus a sigmoid-gated shared expert")
arch("qwen35", cfg="Qwen3_5TextConfig", model="Qwen3_5ForCausalLM",
     rewrite=_gdn_mtp_checkpoint, tweak=_gdn_tweak,
     kw=_gdn_kw(head_dim=32),
     notes="Qwen3.5 dense: Qwen3-Next's mixers with separate beta / alpha projections, value heads "
           "reordered to tiled order by the converter, interleaved M-RoPE (for text: NEOX RoPE on "
           "half of each 32-wide head), SwiGLU FFN")
arch("qwen35moe", cfg="Qwen3_5MoeTextConfig", model="Qwen3_5MoeForCausalLM", moe="softmax",
     rewrite=_gdn_mtp_checkpoint, tweak=_gdn_tweak,
     kw=_gdn_kw(head_dim=32, **_GDN_MOE),
     notes="Qwen3.5 MoE: the qwen35 mixers, 4 experts top-2 renormalized plus a sigmoid-gated shared expert")


def _qwen3next_legacy_ssm_in(path: Path) -> None:
    """Rewrite a qwen3next GGUF from today's converter into the layout the first converters
    wrote (llama.cpp's "legacy GGUF" path), in place: one ssm_in per linear-attention layer,
    HF's in_proj_qkvz unchanged (per key head: its q, k, then its value heads' v and z),
    where today's converter splits it into attn_qkv (q, k, v of all heads in turn) and
    attn_gate (z). Everything else is copied as it is."""
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(path)
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    meta = {f.name: f.contents() for f in reader.fields.values()}
    n_k = meta[gguf.Keys.SSM.GROUP_COUNT.format(arch=arch)]
    hk = meta[gguf.Keys.SSM.STATE_SIZE.format(arch=arch)]
    qkv_t, gate_t, in_t = (gguf.TENSOR_NAMES[t] for t in (gguf.MODEL_TENSOR.ATTN_QKV, gguf.MODEL_TENSOR.ATTN_GATE,
                                                          gguf.MODEL_TENSOR.SSM_IN))
    by_name = {t.name: t for t in reader.tensors}
    out = path.with_suffix(".legacy.tmp")
    writer = gguf.GGUFWriter(out, arch)
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == gguf.Keys.General.ARCHITECTURE:
            continue
        sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), field.types[0], sub_type=sub)
    for t in reader.tensors:
        data = np.array(t.data)
        bid = t.name.split(".")[1] if t.name.startswith("blk.") else None
        if bid is not None and t.name == qkv_t.format(bid=bid) + ".weight":
            z = np.array(by_name[gate_t.format(bid=bid) + ".weight"].data)  # (value_dim, hidden)
            assert t.tensor_type == gguf.GGMLQuantizationType.F32
            q, k, v = np.split(data, [n_k * hk, 2 * n_k * hk])
            heads = [x.reshape(n_k, -1, data.shape[-1]) for x in (q, k, v, z)]  # value heads grouped by key head
            writer.add_tensor(in_t.format(bid=bid) + ".weight",
                              np.ascontiguousarray(np.concatenate(heads, axis=1).reshape(-1, data.shape[-1])))
            continue
        if bid is not None and t.name == gate_t.format(bid=bid) + ".weight":
            continue
        writer.add_tensor(t.name, data, raw_shape=[int(x) for x in reversed(t.shape)], raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    out.replace(path)


arch("qwen3next-ssm-in", **{k: v for k, v in ARCHS["qwen3next"].items() if k != "notes"},
     gguf_rewrite=_qwen3next_legacy_ssm_in,
     notes="qwen3next in the first converters' layout: ssm_in (HF's in_proj_qkvz, q, k, v, z per key head) "
           "where today's files have attn_qkv and attn_gate (llama.cpp's legacy path)")
# --- end gated delta net ----------------------------------------------------------------------


# --- RWKV-6 (Finch), RWKV-7 (Goose) -----------------------------------------------------------
# transformers has no RWKV-6 class: the checkpoint is written in the layout of the RWKV
# remote code (Rwkv6ForCausalLM, "rwkv.blocks.N.attention.time_maa_x", ...) with an RWKV
# "world" vocabulary file (the converter reads rwkv_vocab_v20230424.txt), and the reference
# logits come from a direct torch forward of RWKV-6's math (_rwkv6_reference). The tiny
# RwkvForCausalLM that build_hf makes is only a holder for the drawn tensors.
RWKV_HEAD = 16
RWKV_MIX_DIM, RWKV_DECAY_DIM = 32, 64  # the converter's time_mix / time_decay extra dims below hidden 4096
RWKV_RESCALE = 1  # halve the residual stream after every layer (the released models: every 6)


def _rwkv_world_vocab(d: Path) -> None:
    """rwkv_vocab_v20230424.txt for VOCAB ids: id 0 is the converter's <s>, then the 256 bytes
    and the longest of our BPE tokenizer's merged tokens (not its specials: "<s>" twice is a
    duplicate llama.cpp refuses), one per line as `id repr(bytes) length`."""
    tok = json.loads((TOKDIR / "tokenizer.json").read_text())["model"]["vocab"]
    byte_of = _bytes_to_unicode()
    pieces = [bytes([b]) for b in range(256)]
    merged = sorted({bytes(byte_of[c] for c in t) for t in tok
                     if len(t) > 1 and t not in BPE_SPECIALS and all(c in byte_of for c in t)},
                    key=lambda b: (-len(b), b))
    pieces += merged[:VOCAB - 1 - 256]
    lines = [f"{i + 1} {piece!r} {len(piece)}" for i, piece in enumerate(pieces)]
    (d / "rwkv_vocab_v20230424.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


def _bytes_to_unicode() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the character standing for each byte."""
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _rwkv6_checkpoint(model, config: dict, d: Path) -> dict:
    import torch

    D, F, H, E, W = HIDDEN, INTER, HIDDEN // RWKV_HEAD, RWKV_MIX_DIM, RWKV_DECAY_DIM
    shapes = {"rwkv.embeddings.weight": (VOCAB, D), "rwkv.blocks.0.pre_ln.weight": (D,),
              "rwkv.blocks.0.pre_ln.bias": (D,), "rwkv.ln_out.weight": (D,), "rwkv.ln_out.bias": (D,),
              "head.weight": (VOCAB, D)}
    for i in range(N_LAYERS):
        p = f"rwkv.blocks.{i}."
        for ln in ("ln1", "ln2", "attention.ln_x"):
            shapes |= {p + ln + ".weight": (D,), p + ln + ".bias": (D,)}
        shapes |= {p + f"attention.time_maa_{c}": (1, 1, D) for c in "xwkvrg"}
        shapes |= {p + "attention.time_maa_w1": (D, 5 * E), p + "attention.time_maa_w2": (5, E, D),
                   p + "attention.time_decay": (1, 1, D), p + "attention.time_decay_w1": (D, W),
                   p + "attention.time_decay_w2": (W, D), p + "attention.time_faaaa": (H, RWKV_HEAD)}
        shapes |= {p + f"attention.{m}.weight": (D, D) for m in ("key", "value", "receptance", "gate", "output")}
        shapes |= {p + "feed_forward.time_maa_k": (1, 1, D), p + "feed_forward.time_maa_r": (1, 1, D),
                   p + "feed_forward.key.weight": (F, D), p + "feed_forward.receptance.weight": (D, D),
                   p + "feed_forward.value.weight": (D, F)}
    cfg = {"architectures": ["Rwkv6ForCausalLM"], "model_type": "rwkv6", "hidden_size": D,
           "num_hidden_layers": N_LAYERS, "head_size": RWKV_HEAD, "head_size_divisor": 8, "intermediate_size": F,
           "attention_hidden_size": D, "layer_norm_epsilon": 1e-5, "rescale_every": RWKV_RESCALE,
           "vocab_size": VOCAB, "context_length": MAX_POS, "tie_word_embeddings": False,
           "bos_token_id": 0, "eos_token_id": 0}
    config = _save_custom(model, d, cfg, shapes, hash_name("rwkv6"))
    g = torch.Generator().manual_seed(hash_name("rwkv6") + 1)
    t = model.custom_tensors
    for name in t:  # token-shift mixes in [0, 1], decays spread over exp(-exp(-3..1)), a wider head
        if "time_maa_" in name and name[-2:] not in ("w1", "w2"):
            t[name] = torch.rand(t[name].shape, generator=g)
        elif name.endswith(("time_maa_w1", "time_decay_w1")):
            t[name] = torch.randn(t[name].shape, generator=g) * 0.1 / math.sqrt(D)
        elif name.endswith(("time_maa_w2", "time_decay_w2")):
            t[name] = torch.randn(t[name].shape, generator=g) * 0.1
        elif name.endswith("time_decay"):
            t[name] = torch.rand(t[name].shape, generator=g) * 4 - 3
        elif name.endswith("time_faaaa"):
            t[name] = torch.randn(t[name].shape, generator=g) * 0.5
        elif name == "head.weight":
            t[name] = torch.randn(t[name].shape, generator=g) * (2.0 / math.sqrt(D))
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in t.items()}, str(d / "model.safetensors"))
    _rwkv_world_vocab(d)
    return config


def _rwkv6_reference(model, ids: list[int]):
    """RWKV-6 as the remote code runs it in inference (the converter's rescaled weights: the
    output and FFN value of layer i divided by 2 ** (i // rescale_every), the stream halved
    after every rescale_every-th layer)."""
    import torch
    import torch.nn.functional as F

    t, L, D, S = model.custom_tensors, len(ids), HIDDEN, RWKV_HEAD
    H = D // S

    def ln(x, p, eps=1e-5):
        return F.layer_norm(x, (D,), t[p + ".weight"], t[p + ".bias"], eps)

    def shifted(x):
        return torch.cat([torch.zeros(1, D), x[:-1]]) - x

    with torch.no_grad():
        x = ln(t["rwkv.embeddings.weight"][ids], "rwkv.blocks.0.pre_ln")
        for i in range(N_LAYERS):
            p, scale = f"rwkv.blocks.{i}.", 2.0 ** (i // RWKV_RESCALE)
            a = ln(x, p + "ln1")
            sx = shifted(a)
            m = lambda c: t[p + f"attention.time_maa_{c}"].reshape(D)  # noqa: E731
            mix = torch.tanh((a + sx * m("x")) @ t[p + "attention.time_maa_w1"]).view(L, 5, -1).transpose(0, 1)
            mix = torch.bmm(mix, t[p + "attention.time_maa_w2"])  # (5, L, D): w, k, v, r, g
            xw, xk, xv, xr, xg = (a + sx * (m(c) + mix[j]) for j, c in enumerate("wkvrg"))
            lin = lambda n, v: v @ t[p + f"attention.{n}.weight"].T  # noqa: E731
            r, k, v, gate = lin("receptance", xr), lin("key", xk), lin("value", xv), F.silu(lin("gate", xg))
            ww = torch.tanh(xw @ t[p + "attention.time_decay_w1"]) @ t[p + "attention.time_decay_w2"]
            w = torch.exp(-torch.exp(t[p + "attention.time_decay"].reshape(D) + ww))
            u = t[p + "attention.time_faaaa"]  # (H, S)
            state, ys = torch.zeros(H, S, S), []
            for s in range(L):
                kv = k[s].view(H, S, 1) * v[s].view(H, 1, S)
                ys.append((r[s].view(H, S, 1) * (u.view(H, S, 1) * kv + state)).sum(1).reshape(D))
                state = state * w[s].view(H, S, 1) + kv
            y = F.group_norm(torch.stack(ys), H, t[p + "attention.ln_x.weight"], t[p + "attention.ln_x.bias"], 64e-5)
            x = x + (y * gate) @ (t[p + "attention.output.weight"] / scale).T
            f = ln(x, p + "ln2")
            sx = shifted(f)
            fk = f + sx * t[p + "feed_forward.time_maa_k"].reshape(D)
            fr = f + sx * t[p + "feed_forward.time_maa_r"].reshape(D)
            kk = torch.relu(fk @ t[p + "feed_forward.key.weight"].T) ** 2
            ffn = torch.sigmoid(fr @ t[p + "feed_forward.receptance.weight"].T) * \
                (kk @ (t[p + "feed_forward.value.weight"] / scale).T)
            x = x + ffn
            if (i + 1) % RWKV_RESCALE == 0:
                x = x / 2
        return (ln(x, "rwkv.ln_out") @ t["head.weight"].T).numpy()


arch("rwkv6", cfg="RwkvConfig", model="RwkvForCausalLM", hf_arch="Rwkv6ForCausalLM",
     kw={"hidden_size": HIDDEN, "num_hidden_layers": N_LAYERS, "vocab_size": VOCAB, "attention_hidden_size": HIDDEN,
         "intermediate_size": INTER, "context_length": MAX_POS},
     rewrite=_rwkv6_checkpoint, reference=_rwkv6_reference,
     notes="RWKV-6 (Finch) in the remote code's layout (no transformers class): token shift with "
           "data-dependent LoRA mixes, WKV-6 recurrence (4 heads x 16, per-channel data-dependent decay, "
           "bonus u), per-head GroupNorm, gated output; squared-ReLU channel mix; rescale_every 1; "
           "RWKV world vocabulary; reference logits from a torch forward (_rwkv6_reference)")


# RWKV-7 (Goose) the same way, in the layout of the "RWKV7ForCausalLM" checkpoints (LoRA
# matrices stored (in, out): the converter transposes them; lerps x_r ... x_g separate).
RWKV7_LORA = 32  # decay, in-context learning rate, value residual and gate LoRA ranks
# Heads of 64 (the released models' size), hence a wider model: ggml's SIMD rwkv_wkv7 walks a
# head in steps of GGML_F32_STEP floats (32 with AVX2, 64 with AVX-512) and reads past a
# smaller head (llama.cpp's logits of a position then change with the tokens after it)
RWKV7_HIDDEN, RWKV7_HEAD = 2 * HIDDEN, 64


def _rwkv7_checkpoint(model, config: dict, d: Path) -> dict:
    import torch
    from safetensors.torch import save_file

    D, F, H, R = RWKV7_HIDDEN, INTER, RWKV7_HIDDEN // RWKV7_HEAD, RWKV7_LORA
    shapes = {"model.embeddings.weight": (VOCAB, D), "model.pre_ln.weight": (D,), "model.pre_ln.bias": (D,),
              "model.ln_out.weight": (D,), "model.ln_out.bias": (D,), "head.weight": (VOCAB, D)}
    for i in range(N_LAYERS):
        p = f"model.layers.{i}."
        for ln in ("ln1", "ln2", "attention.ln_x"):
            shapes |= {p + ln + ".weight": (D,), p + ln + ".bias": (D,)}
        shapes |= {p + f"attention.x_{c}": (1, 1, D) for c in "rwkvag"}
        for lora in ("w", "a", "v", "g") if i else ("w", "a", "g"):  # layer 0 has no value residual
            shapes |= {p + f"attention.{lora}1": (D, R), p + f"attention.{lora}2": (R, D)}
            if lora != "g":
                shapes[p + f"attention.{lora}0"] = (1, 1, D)
        shapes |= {p + "attention.k_k": (1, 1, D), p + "attention.k_a": (1, 1, D), p + "attention.r_k": (H, RWKV7_HEAD)}
        shapes |= {p + f"attention.{m}.weight": (D, D) for m in ("key", "value", "receptance", "output")}
        shapes |= {p + "feed_forward.x_k": (1, 1, D), p + "feed_forward.key.weight": (F, D),
                   p + "feed_forward.value.weight": (D, F)}
    cfg = {"architectures": ["RWKV7ForCausalLM"], "model_type": "rwkv7", "hidden_size": D,
           "num_hidden_layers": N_LAYERS, "head_size": RWKV7_HEAD, "intermediate_size": F,
           "layer_norm_epsilon": 1e-5, "lora_rank_decay": R, "lora_rank_iclr": R,
           "lora_rank_value_residual_mix": R, "lora_rank_gate": R, "vocab_size": VOCAB,
           "tie_word_embeddings": False, "bos_token_id": 0, "eos_token_id": 0}
    config = _save_custom(model, d, cfg, shapes, hash_name("rwkv7"))
    g = torch.Generator().manual_seed(hash_name("rwkv7") + 1)
    t = model.custom_tensors
    for name, x in t.items():
        leaf = name.rsplit(".", 1)[-1]
        if leaf.startswith("x_"):  # token-shift interpolations in [0, 1]
            t[name] = torch.rand(x.shape, generator=g)
        elif leaf in ("w1", "a1", "v1", "g1"):
            t[name] = torch.randn(x.shape, generator=g) / math.sqrt(D)
        elif leaf in ("w2", "a2", "v2", "g2"):
            t[name] = torch.randn(x.shape, generator=g) * 0.3 / math.sqrt(R)
        elif leaf in ("w0", "a0", "v0", "r_k"):
            t[name] = torch.randn(x.shape, generator=g) * 0.5
        elif leaf in ("k_k", "k_a"):
            t[name] = 1 + torch.randn(x.shape, generator=g) * 0.1
        elif name == "head.weight":
            t[name] = torch.randn(x.shape, generator=g) * (2.0 / math.sqrt(D))
    save_file({k: v.contiguous() for k, v in t.items()}, str(d / "model.safetensors"))
    _rwkv_world_vocab(d)
    return config


def _rwkv7_reference(model, ids: list[int]):
    """RWKV-7 in torch: S <- S diag(w) + v k^T + (S a)(b)^T with a = -kk, b = kk * iclr."""
    import torch
    import torch.nn.functional as F

    t, L, D, S = model.custom_tensors, len(ids), RWKV7_HIDDEN, RWKV7_HEAD
    H = D // S

    def ln(x, p, eps=1e-5):
        return F.layer_norm(x, (D,), t[p + ".weight"], t[p + ".bias"], eps)

    def shifted(x):
        return torch.cat([torch.zeros(1, D), x[:-1]]) - x

    with torch.no_grad():
        x = ln(t["model.embeddings.weight"][ids], "model.pre_ln")
        v_first = None
        for i in range(N_LAYERS):
            p = f"model.layers.{i}.attention."
            vec = lambda n: t[p + n].reshape(D)  # noqa: E731
            a_in = ln(x, f"model.layers.{i}.ln1")
            sx = shifted(a_in)
            xr, xw, xk, xv, xa, xg = (a_in + sx * vec(f"x_{c}") for c in "rwkvag")
            r, k, v = (u @ t[p + f"{m}.weight"].T for u, m in ((xr, "receptance"), (xk, "key"), (xv, "value")))
            w = torch.exp(-0.606531 * torch.sigmoid(vec("w0") + torch.tanh(xw @ t[p + "w1"]) @ t[p + "w2"]))
            if v_first is None:
                v_first = v
            else:
                v = v + (v_first - v) * torch.sigmoid(vec("v0") + (xv @ t[p + "v1"]) @ t[p + "v2"])
            iclr = torch.sigmoid(vec("a0") + (xa @ t[p + "a1"]) @ t[p + "a2"])
            gate = torch.sigmoid(xg @ t[p + "g1"]) @ t[p + "g2"]
            kk = F.normalize((k * vec("k_k")).view(L, H, S), dim=-1, eps=1e-12)
            k = k * (1 + (iclr - 1) * vec("k_a"))
            rh, wh, kh, vh, bh = (u.view(L, H, S) for u in (r, w, k, v, kk * iclr.view(L, H, S)))
            state, ys = torch.zeros(H, S, S), []  # value x key
            for s in range(L):
                sa = state @ (-kk[s]).unsqueeze(-1)  # (H, S, 1)
                state = state * wh[s].unsqueeze(1) + vh[s].unsqueeze(-1) * kh[s].unsqueeze(1) + sa * bh[s].unsqueeze(1)
                ys.append((state @ rh[s].unsqueeze(-1)).reshape(D))
            y = F.group_norm(torch.stack(ys), H, t[p + "ln_x.weight"], t[p + "ln_x.bias"], 64e-5)
            y = y + ((rh * kh * t[p + "r_k"]).sum(-1, keepdim=True) * vh).reshape(L, D)
            x = x + (y * gate) @ t[p + "output.weight"].T
            f = ln(x, f"model.layers.{i}.ln2")
            fk = f + shifted(f) * t[f"model.layers.{i}.feed_forward.x_k"].reshape(D)
            x = x + torch.relu(fk @ t[f"model.layers.{i}.feed_forward.key.weight"].T) ** 2 @ \
                t[f"model.layers.{i}.feed_forward.value.weight"].T
        return (ln(x, "model.ln_out") @ t["head.weight"].T).numpy()


arch("rwkv7", cfg="RwkvConfig", model="RwkvForCausalLM", hf_arch="RWKV7ForCausalLM",
     kw={"hidden_size": RWKV7_HIDDEN, "num_hidden_layers": N_LAYERS, "vocab_size": VOCAB,
         "attention_hidden_size": RWKV7_HIDDEN, "intermediate_size": INTER, "context_length": MAX_POS},
     rewrite=_rwkv7_checkpoint, reference=_rwkv7_reference,
     notes="RWKV-7 (Goose) in the RWKV7ForCausalLM layout (no transformers class): token shift with fixed "
           "interpolations, the generalized delta rule (2 heads x 64 over hidden 128; decay, in-context learning rate, value "
           "residual and gate LoRAs of rank 32), per-head GroupNorm plus the r.k bonus, squared-ReLU channel mix; "
           "RWKV world vocabulary; reference logits from a torch forward (_rwkv7_reference)")
# --- end RWKV-6 / RWKV-7 ----------------------------------------------------------------------


# --------------------------------------------------------------------------------------
# encoders (BERT and its descendants): the converter writes them like the decoders above, but
# llama.cpp runs them with embeddings on, so each fixture records llama.cpp's per-token hidden
# states (pooling none) instead of logits, and its manifest entry says "kind": "encoder"
# (tests/test_archs.py leaves those to tests/test_encoders.py).

WPM_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WPM_PAD, WPM_CLS, WPM_SEP = 0, 2, 3
ENC_POS = 512  # learned position table of the BERT fixtures (BERT's own default)
ENC_N_EVAL = 40


def ensure_wordpiece() -> None:
    """A WordPiece tokenizer (lowercasing BERT normalizer) trained to VOCAB tokens, cached
    as tokenizer.json + vocab.txt: the BERT converters read the vocabulary through
    transformers' BertTokenizer."""
    wp = TOKDIR / "wordpiece.json"
    if wp.exists():
        return
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=VOCAB, special_tokens=WPM_SPECIALS, show_progress=False)
    tok.train_from_iterator(_training_text(), trainer)
    assert tok.get_vocab_size() == VOCAB, tok.get_vocab_size()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", WPM_CLS), ("[SEP]", WPM_SEP)])
    tok.save(str(wp))
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    (TOKDIR / "vocab.txt").write_text("".join(f"{t}\n" for t, _ in vocab))


def _write_wordpiece(d: Path) -> dict:
    ensure_wordpiece()
    shutil.copy(TOKDIR / "wordpiece.json", d / "tokenizer.json")
    shutil.copy(TOKDIR / "vocab.txt", d / "vocab.txt")
    cfg = {"tokenizer_class": "BertTokenizer", "do_lower_case": True, "unk_token": "[UNK]",
           "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]", "mask_token": "[MASK]",
           "model_max_length": ENC_POS}
    (d / "tokenizer_config.json").write_text(json.dumps(cfg, indent=1))
    return {"pad_token_id": WPM_PAD}


POOLING_MODES = {"mean": "pooling_mode_mean_tokens", "cls": "pooling_mode_cls_token",
                 "last": "pooling_mode_lasttoken"}


def _write_pooling(d: Path, pooling: str | None, dim: int) -> None:
    """sentence-transformers' modules.json + 1_Pooling/config.json: where the converter
    reads the pooling type it writes (`_try_set_pooling_type`)."""
    if pooling is None:
        return
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    (d / "modules.json").write_text(json.dumps(modules, indent=1))
    (d / "1_Pooling").mkdir()
    cfg = {"word_embedding_dimension": dim, **{mode: name == pooling for name, mode in POOLING_MODES.items()}}
    (d / "1_Pooling" / "config.json").write_text(json.dumps(cfg, indent=1))


def encoder(name: str, **spec) -> None:
    spec.setdefault("tok", "wpm")
    spec["encoder"] = True
    arch(name, **spec)


def _bert_kw(**kw) -> dict:
    d = dict(hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=N_LAYERS,
             num_attention_heads=HEADS, max_position_embeddings=ENC_POS, vocab_size=VOCAB,
             type_vocab_size=2, layer_norm_eps=1e-12)
    d.update(kw)
    return d


encoder("bert", cfg="BertConfig", model="BertModel", pooling="mean", kw=_bert_kw(),
        notes="BERT (all-MiniLM style): learned positions, token types (row 0 used), post-norm "
              "layers, GELU FFN with biases, WordPiece vocabulary; mean pooling from modules.json")
encoder("bert-cls", arch="bert", cfg="BertConfig", model="BertModel", pooling="cls", kw=_bert_kw(),
        notes="BERT with CLS pooling (bge style)")
encoder("distilbert", arch="bert", cfg="DistilBertConfig", model="DistilBertModel", pooling="cls",
        kw=dict(dim=HIDDEN, hidden_dim=INTER, n_layers=N_LAYERS, n_heads=HEADS,
                max_position_embeddings=ENC_POS, vocab_size=VOCAB),
        notes="DistilBERT -> GGUF bert: no token-type table, layer norm eps fixed at 1e-12 by the "
              "converter; CLS pooling")
encoder("roberta", arch="bert", cfg="RobertaConfig", model="RobertaModel", tok="bpe", pooling="mean",
        kw=_bert_kw(type_vocab_size=1, layer_norm_eps=1e-5),
        notes="RoBERTa -> GGUF bert: byte-level BPE vocabulary (gpt2 tokenizer model), the "
              "position table cut by pad_token_id + 1 rows (HF counts positions from there)")


def _base_model_hidden(model, ids: list[int]):
    """The encoder under a task head (…ForSequenceClassification): its last hidden states."""
    return _hf_hidden(model.base_model, ids)


encoder("roberta-rerank", arch="bert", cfg="RobertaConfig", model="RobertaForSequenceClassification", tok="bpe",
        pooling=None, kw=_bert_kw(type_vocab_size=1, layer_norm_eps=1e-5, num_labels=1),
        reference=_base_model_hidden,
        notes="a RoBERTa cross-encoder (bge-reranker style, RobertaForSequenceClassification with one "
              "label): classifier.dense -> cls, classifier.out_proj -> cls.output, "
              "classifier.output_labels written; the file names no pooling, llama.cpp ranks with "
              "pooling_type rank forced (tanh(cls(h[CLS])) then cls.output)")
encoder("bert-classifier", arch="bert", cfg="BertConfig", model="BertForSequenceClassification",
        pooling=None, reference=_base_model_hidden,
        kw=_bert_kw(num_labels=2, id2label={0: "negative", 1: "positive"}, label2id={"negative": 0, "positive": 1}),
        notes="BertForSequenceClassification with two named labels: classifier -> cls.output, a direct "
              "projection of h[CLS] (the converter drops BERT's pooler, so llama.cpp's scores are not "
              "HF's logits, by llama.cpp's design); no cls tensor; rank pooling forced")
MODERN_BERT_LAYERS = 4  # global, local, local, global: both kinds of layer
MODERN_BERT_WINDOW = 16  # local_attention: +-8 tokens, inside the 40 evaluated


def _modern_bert_kw(**kw) -> dict:
    return dict(hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=MODERN_BERT_LAYERS,
                num_attention_heads=HEADS, max_position_embeddings=ENC_POS, vocab_size=VOCAB,
                local_attention=MODERN_BERT_WINDOW, global_attn_every_n_layers=3,
                layer_types=["full_attention", "sliding_attention", "sliding_attention", "full_attention"],
                rope_parameters={"full_attention": _rope(160000.0), "sliding_attention": _rope(10000.0)},
                cls_token_id=BOS_ID, sep_token_id=EOS_ID, **kw)


MODERN_BERT_MERGE = {"global_attn_every_n_layers": 3, "layer_norm_eps": 1e-5}
encoder("modern-bert", cfg="ModernBertConfig", model="ModernBertModel", tok="bpe", pooling="mean",
        kw=_modern_bert_kw(), merge=MODERN_BERT_MERGE,
        notes="ModernBERT (layer_norm_eps merged into config.json: the converter does not read "
              "ModernBERT's norm_eps, and llama.cpp requires the key): pre-norm LayerNorms without bias (layer 0 has no attention norm), fused "
              "qkv, GeGLU, every third layer global (rope theta 160000) and the others in a "
              "symmetric 16-token window (rope theta 10000); byte-level BPE vocabulary; mean pooling")
encoder("modern-bert-silu", arch="modern-bert", cfg="ModernBertConfig", model="ModernBertModel", tok="bpe",
        pooling="cls", kw=_modern_bert_kw(hidden_activation="silu"), merge=MODERN_BERT_MERGE,
        notes="ModernBERT with hidden_activation silu (IBM granite-embedding r2 style): the converter "
              "writes modern-bert.hidden_activation, llama.cpp gates with SiLU; CLS pooling")
encoder("modern-bert-rerank", arch="modern-bert", cfg="ModernBertConfig", model="ModernBertForSequenceClassification",
        tok="bpe", pooling=None, reference=_base_model_hidden, merge=MODERN_BERT_MERGE,
        kw=_modern_bert_kw(num_labels=1, classifier_pooling="mean"),
        notes="ModernBertForSequenceClassification, one label, classifier_pooling mean (gte-reranker-"
              "modernbert style): head.dense -> cls, head.norm -> cls.norm, classifier -> cls.output; "
              "llama.cpp's rank pooling: mean, dense, GELU, LayerNorm, output")
encoder("eurobert", cfg="EuroBertConfig", model="EuroBertModel", tok="bpe", pooling="last",
        kw=_base(rms_norm_eps=1e-5, rope_parameters=_rope(), classifier_pooling="mean"),
        notes="EuroBERT: Llama-shaped pre-norm RMSNorm stack, GQA 4q/2kv, NEOX rope, SwiGLU, "
              "bidirectional attention; last-token pooling. classifier_pooling 'mean' (EuroBERT's "
              "default 'late' is one the converter refuses); it only concerns a classifier head")


# nomic-bert and jina-bert-v2 ship their modeling code with the checkpoint (remote code):
# transformers has no class for them. The checkpoint is written in their own layout with
# random weights drawn as `redraw` draws them, and the reference is a few lines of torch over
# the same tensors (post-norm BERT layers with rotary positions or symmetric ALiBi).
NOMIC_ROPE_BASE = 1000.0
JINA_ALIBI_MAX_BIAS = 8.0  # jina-bert-v2's ALiBi slopes: 2^(-8 (h + 1) / heads)


def _draw_tensors(shapes: dict[str, tuple[int, ...]], seed: int) -> dict:
    """`redraw`'s distribution by name: embeddings N(0, 4/hidden), matrices N(0, 1/fan_in),
    LayerNorm weights 1 + N(0, 0.01), biases N(0, 0.01)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in shapes.items():
        if "embeddings" in name:
            out[name] = torch.randn(shape, generator=g) * (2.0 / math.sqrt(HIDDEN))
        elif len(shape) == 2:
            out[name] = torch.randn(shape, generator=g) / math.sqrt(shape[1])
        elif name.endswith("weight"):
            out[name] = 1 + torch.randn(shape, generator=g) * 0.1
        else:
            out[name] = torch.randn(shape, generator=g) * 0.1
    return out


def _save_custom(model, d: Path, config: dict, shapes: dict, seed: int) -> dict:
    from safetensors.torch import save_file

    tensors = _draw_tensors(shapes, seed)
    for f in d.glob("*.safetensors"):
        f.unlink()
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps(config, indent=1))
    model.custom_tensors = tensors  # the reference reads them
    return config


def _nomic_checkpoint(model, config: dict, d: Path) -> dict:
    D, F = HIDDEN, INTER
    shapes = {"embeddings.word_embeddings.weight": (VOCAB, D), "embeddings.token_type_embeddings.weight": (2, D),
              "emb_ln.weight": (D,), "emb_ln.bias": (D,)}
    for i in range(N_LAYERS):
        p = f"encoder.layers.{i}."
        shapes.update({p + "attn.Wqkv.weight": (3 * D, D), p + "attn.out_proj.weight": (D, D),
                       p + "norm1.weight": (D,), p + "norm1.bias": (D,),
                       p + "mlp.fc11.weight": (F, D), p + "mlp.fc12.weight": (F, D), p + "mlp.fc2.weight": (D, F),
                       p + "norm2.weight": (D,), p + "norm2.bias": (D,)})
    cfg = {"architectures": ["NomicBertModel"], "model_type": "nomic_bert", "n_embd": D, "n_head": HEADS,
           "n_layer": N_LAYERS, "n_inner": F, "n_positions": 8192, "max_trained_positions": 2048,
           "activation_function": "swiglu", "causal": False, "qkv_proj_bias": False, "mlp_fc1_bias": False,
           "mlp_fc2_bias": False, "prenorm": False, "rotary_emb_fraction": 1.0, "rotary_emb_interleaved": False,
           "rotary_emb_scale_base": None, "rotary_emb_base": NOMIC_ROPE_BASE, "layer_norm_epsilon": 1e-12,
           "type_vocab_size": 2, "vocab_size": VOCAB, "pad_token_id": WPM_PAD,
           # transformers 5's AutoConfig answers an unknown model_type with its generic
           # defaults (hidden_size 768, 12 layers), which the converter reads before n_embd:
           # the standard names are written too, with the same values
           "hidden_size": D, "num_hidden_layers": N_LAYERS, "num_attention_heads": HEADS, "intermediate_size": F}
    return _save_custom(model, d, cfg, shapes, hash_name("nomic-bert"))


# jina-bert-v2's per-layer tensor names, and those of its v2-code layout
JINA_LAYOUT = {"base": {"up": "mlp.gated_layers", "down": "mlp.wo", "out_norm": "mlp.layernorm"},
               "code": {"up": "mlp.up_gated_layer", "down": "mlp.down_layer", "out_norm": "layer_norm_2",
                        "norm_2": "layer_norm_1", "q_norm": "attention.self.layer_norm_q",
                        "k_norm": "attention.self.layer_norm_k"}}


def _jina_checkpoint(model, config: dict, d: Path, variant: str = "base") -> dict:
    D, F, names = HIDDEN, INTER, JINA_LAYOUT[variant]
    shapes = {"embeddings.word_embeddings.weight": (VOCAB, D), "embeddings.token_type_embeddings.weight": (2, D),
              "embeddings.LayerNorm.weight": (D,), "embeddings.LayerNorm.bias": (D,)}
    for i in range(N_LAYERS):
        p = f"encoder.layer.{i}."
        for proj in ("query", "key", "value"):
            shapes.update({f"{p}attention.self.{proj}.weight": (D, D), f"{p}attention.self.{proj}.bias": (D,)})
        shapes.update({p + "attention.output.dense.weight": (D, D), p + "attention.output.dense.bias": (D,),
                       p + "attention.output.LayerNorm.weight": (D,), p + "attention.output.LayerNorm.bias": (D,),
                       p + names["up"] + ".weight": (2 * F, D), p + names["down"] + ".weight": (D, F),
                       p + names["down"] + ".bias": (D,)})
        for norm in ("out_norm", "norm_2", "q_norm", "k_norm"):
            if norm in names:
                shapes.update({p + names[norm] + ".weight": (D,), p + names[norm] + ".bias": (D,)})
    if variant == "code":  # a reranker's one-score classifier (jina-reranker-v1 style): no cls.output
        shapes.update({"classifier.weight": (1, D), "classifier.bias": (1,)})
    cfg = {"architectures": ["JinaBertModel"], "model_type": "bert", "hidden_size": D, "num_attention_heads": HEADS,
           "num_hidden_layers": N_LAYERS, "intermediate_size": F, "max_position_embeddings": ENC_POS,
           "position_embedding_type": "alibi", "hidden_act": "gelu", "feed_forward_type": "geglu",
           "layer_norm_eps": 1e-12, "type_vocab_size": 2, "vocab_size": VOCAB, "pad_token_id": WPM_PAD}
    return _save_custom(model, d, cfg, shapes, hash_name(f"jina-bert-v2-{variant}"))


def _attend(q, k, v, bias=None):
    """Bidirectional attention of (L, H, Dh) heads; bias (H, L, L) added to the scores."""
    import torch

    scores = torch.einsum("lhd,mhd->hlm", q, k) / math.sqrt(q.shape[-1])
    if bias is not None:
        scores = scores + bias
    return torch.einsum("hlm,mhd->lhd", scores.softmax(-1), v).reshape(q.shape[0], -1)


def _ln(x, t, name, eps=1e-12):
    import torch

    return torch.nn.functional.layer_norm(x, (x.shape[-1],), t[name + ".weight"], t[name + ".bias"], eps)


def _nomic_reference(model, ids: list[int]):
    """nomic-bert's forward pass: NEOX rotary positions, SwiGLU (silu(fc12) * fc11), post-norm."""
    import torch

    t, L, Dh = model.custom_tensors, len(ids), HIDDEN // HEADS
    half = Dh // 2
    inv = NOMIC_ROPE_BASE ** (-torch.arange(half, dtype=torch.float64) * 2 / Dh)
    angle = (torch.arange(L, dtype=torch.float64)[:, None] * inv[None]).float()[:, None, :]

    def rope(x):  # (L, H, Dh): halves rotate together
        a, b = x[..., :half], x[..., half:]
        return torch.cat([a * angle.cos() - b * angle.sin(), a * angle.sin() + b * angle.cos()], -1)

    with torch.no_grad():
        x = t["embeddings.word_embeddings.weight"][ids] + t["embeddings.token_type_embeddings.weight"][0]
        x = _ln(x, t, "emb_ln")
        for i in range(N_LAYERS):
            p = f"encoder.layers.{i}."
            q, k, v = (x @ t[p + "attn.Wqkv.weight"].T).reshape(L, 3, HEADS, Dh).unbind(1)
            h = _ln(x + _attend(rope(q), rope(k), v) @ t[p + "attn.out_proj.weight"].T, t, p + "norm1")
            f = (torch.nn.functional.silu(h @ t[p + "mlp.fc12.weight"].T) * (h @ t[p + "mlp.fc11.weight"].T))
            x = _ln(h + f @ t[p + "mlp.fc2.weight"].T, t, p + "norm2")
    return x.numpy()


def _jina_reference(model, ids: list[int]):
    """jina-bert-v2's forward pass: symmetric ALiBi, GeGLU (gelu(first half) * second half of
    gated_layers), post-norm. The code layout adds full-width q/k LayerNorms and a second norm
    after attention over the layer input added again (as llama.cpp's bert.cpp computes it)."""
    import torch

    t, L, Dh = model.custom_tensors, len(ids), HIDDEN // HEADS
    names = JINA_LAYOUT["code" if "classifier.weight" in t else "base"]
    slopes = torch.tensor([2.0 ** (-JINA_ALIBI_MAX_BIAS * (h + 1) / HEADS) for h in range(HEADS)])
    distance = (torch.arange(L)[None, :] - torch.arange(L)[:, None]).abs().float()
    bias = -slopes[:, None, None] * distance[None]

    def linear(x, name):
        return x @ t[name + ".weight"].T + t[name + ".bias"]

    with torch.no_grad():
        x = t["embeddings.word_embeddings.weight"][ids] + t["embeddings.token_type_embeddings.weight"][0]
        x = _ln(x, t, "embeddings.LayerNorm")
        for i in range(N_LAYERS):
            p = f"encoder.layer.{i}."
            q, k, v = (linear(x, f"{p}attention.self.{n}") for n in ("query", "key", "value"))
            if "q_norm" in names:
                q, k = _ln(q, t, p + names["q_norm"]), _ln(k, t, p + names["k_norm"])
            q, k, v = (y.reshape(L, HEADS, Dh) for y in (q, k, v))
            h = _ln(x + linear(_attend(q, k, v, bias), p + "attention.output.dense"), t, p + "attention.output.LayerNorm")
            if "norm_2" in names:
                h = _ln(h + x, t, p + names["norm_2"])
            gate, up = (h @ t[p + names["up"] + ".weight"].T).chunk(2, dim=-1)
            x = _ln(h + linear(torch.nn.functional.gelu(gate) * up, p + names["down"]), t, p + names["out_norm"])
    return x.numpy()


encoder("nomic-bert", cfg="BertConfig", model="BertModel", hf_arch="NomicBertModel", pooling="mean",
        kw=_bert_kw(), rewrite=_nomic_checkpoint, reference=_nomic_reference,
        notes="nomic-embed-text v1.5 layout (NomicBertModel, remote code -> GGUF nomic-bert): "
              "embeddings + token types + emb_ln, fused Wqkv without biases, NEOX rotary (base 1000), "
              "post-norm layers, SwiGLU (fc11 up, fc12 gate); checkpoint written in that layout with "
              "random weights, reference in torch (the BertModel built first is only a placeholder); "
              "n_positions 8192 / max_trained 2048 as the converter requires; mean pooling")
encoder("jina-bert-v2", cfg="BertConfig", model="BertModel", hf_arch="JinaBertModel", pooling="mean",
        kw=_bert_kw(), rewrite=_jina_checkpoint, reference=_jina_reference,
        notes="jina-embeddings-v2-base-en layout (JinaBertModel, remote code -> GGUF jina-bert-v2): "
              "no position table, symmetric ALiBi (slopes 2^(-8(h+1)/H)), q/k/v with biases, "
              "post-norm layers, GeGLU through the fused mlp.gated_layers (gate first); checkpoint "
              "written in that layout with random weights, reference in torch; mean pooling")
encoder("jina-bert-v2-code", arch="jina-bert-v2", cfg="BertConfig", model="BertModel", hf_arch="JinaBertModel",
        pooling="mean", kw=_bert_kw(), reference=_jina_reference,
        rewrite=lambda model, config, d: _jina_checkpoint(model, config, d, "code"),
        notes="jina-bert-v2 in the v2-code layout (layer_norm_1 -> attn_norm_2, up_gated_layer, "
              "down_layer, layer_norm_2) plus full-width q/k LayerNorms (layer_norm_q/k) and a "
              "one-score classifier (classifier -> cls, no cls.output: jina-reranker-v1 style, "
              "which llama.cpp's rank pooling follows with tanh); WordPiece vocabulary; the torch "
              "reference follows llama.cpp's graph for the second norm")


def _hf_hidden(model, ids: list[int]):
    import torch

    model.config._attn_implementation = "eager"
    with torch.no_grad():
        out = model(torch.tensor([ids]))
    return out.last_hidden_state[0].float().numpy()


def llama_hidden(path: Path, ids: list[int]):
    """llama.cpp's per-token hidden states (embeddings on, pooling none) for one sequence."""
    import llama_cpp
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), embedding=True, pooling_type=llama_cpp.LLAMA_POOLING_TYPE_NONE,
                n_ctx=ENC_POS, n_batch=ENC_POS, n_ubatch=ENC_POS, verbose=False, n_threads=4, seed=0)
    try:
        llm._batch.reset()
        llm._batch.add_sequence(ids, 0, True)
        llm._ctx.decode(llm._batch)
        n = llm.n_embd()
        ptr = llama_cpp.llama_get_embeddings(llm._ctx.ctx)
        return np.ctypeslib.as_array(ptr, shape=(len(ids) * n,)).reshape(len(ids), n).copy()
    finally:
        llm.close()


def make_encoder(name: str, manifest: dict) -> None:
    import numpy as np

    spec = ARCHS[name]
    seed = spec.get("seed", hash_name(name))
    f32, q8 = OUT / f"{name}.f32.gguf", OUT / f"{name}.q8_0.gguf"
    entry: dict = {"kind": "encoder", "arch": spec["arch"], "hf_class": spec.get("hf_arch", spec["model"]),
                   "notes": spec["notes"], "seed": seed, "pooling": spec.get("pooling")}
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix=f"fx-{name}-") as td:
        d = Path(td) / "hf"
        d.mkdir()
        model, config = build_hf(name, spec, d, seed)
        _write_pooling(d, spec.get("pooling"), model.config.get_text_config().hidden_size)
        entry["config"] = {k: v for k, v in config.items() if k not in (
            "transformers_version", "id2label", "label2id", "_name_or_path")}
        entry["source"] = f"convert_hf_to_gguf.py {entry['hf_class']}"
        convert(d, f32)
        quantize_q8(f32, q8)
        rng = __import__("random").Random(seed)
        ids = [rng.randrange(len(WPM_SPECIALS), VOCAB) for _ in range(ENC_N_EVAL)]
        hf = (spec.get("reference") or _hf_hidden)(model, ids)
    summ = gguf_summary(f32)
    if summ["architecture"] != spec["arch"]:
        raise RuntimeError(f"general.architecture={summ['architecture']} != {spec['arch']}")
    lf, lq = llama_hidden(f32, ids), llama_hidden(q8, ids)
    for tag, x in (("f32", lf), ("q8_0", lq)):
        if not np.isfinite(x).all() or x.std() < 0.1:
            raise RuntimeError(f"{tag} hidden states degenerate (std {x.std():.3g})")
    std = float(hf.std())
    entry.update({
        "gguf_arch": summ["architecture"], "tensors": summ["tensors"], "eval_ids": ids,
        "pooling_type_key": _gguf_kv(f32, f"{spec['arch']}.pooling_type"),
        "llama_f32_hidden_std": round(float(lf.std()), 4),
        "hf_hidden_std": round(std, 4),
        "f32_vs_hf_maxdiff_over_std": float(f"{np.abs(lf - hf).max() / std:.3g}"),
        "q8_0_vs_hf_maxdiff_over_std": float(f"{np.abs(lq - hf).max() / std:.3g}"),
        "files": {"f32": f32.name, "f32_bytes": f32.stat().st_size,
                  "q8_0": q8.name, "q8_0_bytes": q8.stat().st_size},
        "q8_0_tensor_types": gguf_summary(q8)["tensor_types"],
    })
    manifest[name] = entry
    print(f"[{name}] ok {time.time() - t0:.1f}s std={lf.std():.3f} f32/hf={entry['f32_vs_hf_maxdiff_over_std']} "
          f"q8/hf={entry['q8_0_vs_hf_maxdiff_over_std']} f32={f32.stat().st_size}B", flush=True)



# --------------------------------------------------------------------------------------
# weights


def redraw(model, seed: int, moe: bool = False, experts_in_out: bool = False) -> None:
    """moe: 3-D expert tensors get fan_in = one expert's input width (last axis, or
    axis 1 when experts_in_out, gpt-oss's [E, in, out]); router weights are
    additionally multiplied by ROUTER_SCALE. Dense models: unchanged draws."""
    import torch
    from torch import nn

    g = torch.Generator().manual_seed(seed)
    hidden = model.config.get_text_config().hidden_size
    emb = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    out = model.get_output_embeddings()
    if out is not None:
        emb.add(id(out.weight))
    fan_in_first = set()  # GPT-2 style Conv1D stores (in, out)
    try:
        from transformers.pytorch_utils import Conv1D
        fan_in_first = {id(m.weight) for m in model.modules() if isinstance(m, Conv1D)}
    except ImportError:
        pass
    with torch.no_grad():
        for _name, p in model.named_parameters():  # tied parameters appear once
            if id(p) in emb:
                p.copy_(torch.randn(p.shape, generator=g) * (2.0 / math.sqrt(hidden)))
            elif moe and p.ndim == 3 and ".experts." in _name:
                fan_in = p.shape[1] if experts_in_out else p.shape[2]
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
            elif p.ndim >= 2:
                fan_in = p.shape[0] if id(p) in fan_in_first else math.prod(p.shape[1:])
                w = torch.randn(p.shape, generator=g) / math.sqrt(fan_in)
                p.copy_(w * ROUTER_SCALE if moe and _is_router(_name) else w)
            else:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


ROUTER_SUFFIXES = (".mlp.gate.weight", ".block_sparse_moe.router.weight", ".mlp.router.weight",
                   ".ffn.router.layer.weight", ".feed_forward.router.weight",  # DBRX, Llama 4
                   ".mlp.gate.wg.weight")  # last: HunYuan MoE


def _is_router(name: str) -> bool:
    return name.endswith(ROUTER_SUFFIXES)


def install_router_probe(model, kind: str):
    """Forward pre-hooks on the router modules; returns (handles, gaps). gaps collects per
    MoE layer the smallest margin over tokens between the TOP_K-th and the next expert score
    (softmax gating: raw logits (+bias); deepseek: between the kept and the dropped group
    score, the group score being the sum of the group's top-2 sigmoid(logit)+bias)."""
    import torch

    mods = dict(model.named_modules())
    handles, gaps = [], []
    for pname, w in model.named_parameters():
        if not _is_router(pname):
            continue
        mod = mods[pname.rsplit(".", 1)[0]]

        def hook(m, args, w=w, mod=mod):
            x = args[0].reshape(-1, w.shape[-1]).float()
            logits = x @ w.float().T
            b = getattr(mod, "bias", None)
            if isinstance(b, torch.Tensor):
                logits = logits + b.float()
            if kind == "sigmoid":  # sigmoid + selection bias, no grouping (n_group 1)
                sc = logits.sigmoid() + mod.e_score_correction_bias.float()
                top = sc.sort(dim=-1, descending=True)[0]
                k = TOP_K
            elif kind == "ernie":  # softmax probs + moe_statics bias select; margin in prob units
                sc = logits.softmax(-1) + mod.moe_statics.e_score_correction_bias.float().reshape(-1)
                top = sc.sort(dim=-1, descending=True)[0]
                k = TOP_K
            elif kind == "minimax":  # the selection bias is the router call's second argument
                sc = logits.sigmoid() + args[1].float()
                top = sc.sort(dim=-1, descending=True)[0]
                k = TOP_K
            elif kind == "top1":  # Llama 4: the best logit alone is chosen
                top = logits.sort(dim=-1, descending=True)[0]
                k = 1
            elif kind == "deepseek":
                sc = logits.sigmoid() + mod.e_score_correction_bias.float()
                n_group = mod.num_group
                gs = sc.view(sc.shape[0], n_group, -1).topk(2, dim=-1)[0].sum(-1)
                top = gs.sort(dim=-1, descending=True)[0]
                k = mod.topk_group
            else:
                top = logits.sort(dim=-1, descending=True)[0]
                k = TOP_K
            gaps.append(float((top[:, k - 1] - top[:, k]).min()))

        handles.append(mod.register_forward_pre_hook(hook))
    return handles, gaps


def build_hf(name: str, spec: dict, d: Path, seed: int):
    import torch
    import transformers

    tok_ids = write_tokenizer(d, spec["tok"])
    kw = dict(spec["kw"])
    for k, v in tok_ids.items():
        kw.setdefault(k, v)
    cfg = getattr(transformers, spec["cfg"])(**kw)
    torch.manual_seed(seed)
    model_cls = getattr(transformers, spec["model"])
    model = model_cls(cfg).float().eval()
    redraw(model, seed, moe=bool(spec.get("moe")), experts_in_out=spec.get("experts_in_out", False))
    if spec.get("tweak"):
        spec["tweak"](model, seed)
    model.save_pretrained(d, safe_serialization=True)
    cfg_path = d / "config.json"
    config = json.loads(cfg_path.read_text())
    config.update(spec["merge"])
    config["architectures"] = [spec.get("hf_arch", spec["model"])]
    cfg_path.write_text(json.dumps(config, indent=1))
    if spec.get("rewrite"):
        config = spec["rewrite"](model, config, d)
    return model, config


def hf_logits(model, ids: list[int]):
    import torch

    model.config._attn_implementation = "eager"
    for m in model.modules():
        if hasattr(m, "config") and hasattr(m.config, "_attn_implementation"):
            m.config._attn_implementation = "eager"
    with torch.no_grad():
        out = model(torch.tensor([ids]), use_cache=False)
    return out.logits[0].float().numpy()


# --------------------------------------------------------------------------------------
# llama.cpp: converter, quantizer, evaluation


def convert(hf_dir: Path, out: Path) -> None:
    cmd = [sys.executable, __file__, "--_convert", str(hf_dir), str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0 or not out.exists():
        raise RuntimeError(f"convert_hf_to_gguf failed:\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}")


def _convert_main(hf_dir: str, out: str) -> None:
    """In a child process: llama.cpp's converter with the pre-tokenizer check patched."""
    sys.path.insert(0, str(LLAMACPP / "gguf-py"))
    sys.path.insert(0, str(LLAMACPP))
    import conversion.base as base

    base.TextModel.get_vocab_base_pre = lambda self, tokenizer: PRE

    # transformers 5's AutoConfig drops legacy keys some converters still read (e.g.
    # GPT-NeoX rotary_pct): put back whatever config.json has that the loaded dict lacks.
    orig_load = base.ModelBase.load_hparams

    def load_hparams(dir_model, is_mistral_format):
        config = orig_load(dir_model, is_mistral_format)
        raw_path = Path(dir_model) / "config.json"
        if not is_mistral_format and raw_path.is_file():
            for k, v in json.loads(raw_path.read_text()).items():
                config.setdefault(k, v)
        return config

    base.ModelBase.load_hparams = staticmethod(load_hparams)
    patch_converter_classes(base)
    import convert_hf_to_gguf

    sys.argv = ["convert_hf_to_gguf.py", hf_dir, "--outfile", out, "--outtype", "f32"]
    convert_hf_to_gguf.main()


def patch_converter_classes(base) -> None:
    """What llama.cpp's converter classes need to take our tiny checkpoints (each patch says
    why); scripts/make_convert_fixtures.py applies the same."""
    _patch_stablelm_qk_norm()
    _patch_glm_vocab(base)
    _patch_hunyuan_moe_vocab()
    _patch_granite_hybrid_layer_types()
    _patch_nemotron_h_dense()


def _patch_glm_vocab(base) -> None:
    """TextModel._set_vocab_glm (GLM-4.5 MoE) looks up GLM's own added tokens ([gMASK],
    <|user|>, <|endoftext|>, <|observation|>) as bos/eot/unk/eom; our tokenizer lacks some of
    them. Same code, tokens that are absent are simply not set."""
    import gguf

    def _set_vocab_glm(self):
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(self.dir_model)
        special_vocab = gguf.SpecialVocab(self.dir_model, load_merges=True)
        tokens, toktypes, tokpre = self.get_vocab_base()
        self.gguf_writer.add_tokenizer_model("gpt2")
        self.gguf_writer.add_tokenizer_pre(tokpre)
        self.gguf_writer.add_token_list(tokens)
        self.gguf_writer.add_token_types(toktypes)
        added = tokenizer.get_added_vocab()
        for typ, tok in (("bos", "[gMASK]"), ("eot", "<|user|>"), ("unk", "<|endoftext|>"),
                         ("eom", "<|observation|>")):
            if tok in added:
                special_vocab._set_special_token(typ, added[tok])
        special_vocab.add_to_gguf(self.gguf_writer)

    base.TextModel._set_vocab_glm = _set_vocab_glm


def _patch_hunyuan_moe_vocab() -> None:
    """HunYuanMoEModel.set_vocab (conversion/hunyuan.py) only handles Hunyuan-A13B's tiktoken
    tokenizer (tokenizer.mergeable_ranks) and then forces bos id 127959; our checkpoint has a
    tokenizer.json. Use the dense HunYuanModel.set_vocab instead, whose tokenizer.json branch
    is the generic gpt2-style BPE path (same as the hunyuan-dense fixture)."""
    import conversion.hunyuan as hy

    hy.HunYuanMoEModel.set_vocab = hy.HunYuanModel.set_vocab


def _patch_stablelm_qk_norm() -> None:
    """StableLMModel.modify_tensors (conversion/stablelm.py) is a generator but does
    ``return self._stack_qk_norm(...)`` for the per-head q/k LayerNorms (StableLM 2 12B,
    qk_layernorm=True): the returned generator is never run, so the stacked
    attn_q_norm / attn_k_norm tensors are never written and prepare_tensors raises
    "Unprocessed norms". Same logic with ``yield from``."""
    import conversion.stablelm as slm

    orig = slm.StableLMModel.modify_tensors

    def modify_tensors(self, data_torch, name, bid):
        for kind, n_key, attr in (("q_layernorm", "num_attention_heads", "_q_norms"),
                                  ("k_layernorm", "num_key_value_heads", "_k_norms")):
            if f"{kind}.norms" in name:
                assert bid is not None
                if getattr(self, attr) is None:
                    setattr(self, attr, [{} for _ in range(self.block_count)])
                norms = getattr(self, attr)[bid]
                norms[name] = data_torch
                n = self.hparams[n_key]
                if len(norms) >= n:
                    yield from self._stack_qk_norm(bid, n, norms, kind)
                return
        yield from orig(self, data_torch, name, bid)

    slm.StableLMModel.modify_tensors = modify_tensors


def quantize_q8(src: Path, dst: Path, ftype: str = "Q8_0") -> None:
    """llama_model_quantize with LLAMA_FTYPE_MOSTLY_<ftype> (default Q8_0)."""
    cmd = [sys.executable, __file__, "--_quantize", str(src), str(dst), ftype]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0 or not dst.exists():
        raise RuntimeError(f"llama_model_quantize failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")


def _quantize_main(src: str, dst: str, ftype: str = "Q8_0") -> None:
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    params.nthread = 4
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params))
    if rc != 0:
        raise SystemExit(f"llama_model_quantize rc={rc}")


def llama_logits(path: Path, ids: list[int]):
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=256, logits_all=True, type_k=0, type_v=0,
                verbose=False, n_threads=4, seed=0)
    try:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)], dtype=np.float32)
    finally:
        llm.close()


def gguf_summary(path: Path) -> dict:
    import gguf

    r = gguf.GGUFReader(str(path))
    arch = bytes(r.fields["general.architecture"].parts[-1]).decode()
    types = sorted({t.tensor_type.name for t in r.tensors})
    return {"architecture": arch, "n_tensors": len(r.tensors), "tensor_types": types,
            "tensors": [t.name for t in r.tensors]}


# --------------------------------------------------------------------------------------
# driver


def load_manifest() -> dict:
    if MANIFEST.exists():
        return json.loads(MANIFEST.read_text())
    return {}


def save_manifest(m: dict, name: str) -> None:
    """Writes `name`'s entry into the manifest on disk, re-read first: runs for different
    fixtures may overlap, and each keeps the others' entries."""
    on_disk = load_manifest()
    on_disk[name] = m[name]
    tmp = MANIFEST.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(dict(sorted(on_disk.items())), indent=1) + "\n")
    tmp.replace(MANIFEST)


def eval_ids(seed: int) -> list[int]:
    import random

    rng = random.Random(seed)
    return [rng.randrange(VOCAB) for _ in range(N_EVAL)]


def router_gap(name: str, spec: dict, seed: int) -> float:
    """HF-only: build the model for this seed (no save) and return its router_min_gap."""
    import torch
    import transformers

    kw = dict(spec["kw"])
    for k, v in {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID}.items():
        kw.setdefault(k, v)
    cfg = getattr(transformers, spec["cfg"])(**kw)
    torch.manual_seed(seed)
    model = getattr(transformers, spec["model"])(cfg).float().eval()
    redraw(model, seed, moe=True, experts_in_out=spec.get("experts_in_out", False))
    if spec.get("tweak"):
        spec["tweak"](model, seed)
    handles, gaps = install_router_probe(model, spec["moe"])
    hf_logits(model, eval_ids(seed))
    for h in handles:
        h.remove()
    return min(gaps)


def pick_moe_seed(name: str, spec: dict) -> tuple[int, int]:
    """(seed, tries): first seed from hash_name(name) on with a decisive routing."""
    base = hash_name(name)
    best = (-1.0, base)
    tries = spec.get("seed_tries", MOE_SEED_TRIES)
    for i in range(tries):
        g = router_gap(name, spec, base + i)
        if g >= MOE_MIN_GAP[spec["moe"]]:
            return base + i, i + 1
        best = max(best, (g, base + i))
    print(f"[{name}] no seed with router gap >= {MOE_MIN_GAP[spec['moe']]}; best {best}")
    return best[1], tries


def make(name: str, manifest: dict) -> None:
    import numpy as np

    spec = ARCHS[name]
    if spec.get("encoder"):
        return make_encoder(name, manifest)
    seed_tries = None
    if "seed" in spec:
        seed = spec["seed"]
    elif spec.get("moe"):
        seed, seed_tries = pick_moe_seed(name, spec)
    else:
        seed = hash_name(name)
    # keep: the file kinds committed; the others are made and checked in a scratch folder
    keep = spec.get("keep")
    scratch = Path(tempfile.mkdtemp(prefix=f"fx-{name}-dropped-")) if keep else OUT
    if keep:
        import atexit
        atexit.register(shutil.rmtree, scratch, True)

    def place(kind: str) -> Path:
        return (OUT if not keep or kind in keep else scratch) / f"{name}.{kind}.gguf"

    f32 = place("f32")
    q8 = place("q8_0")
    entry: dict = {"arch": spec["arch"], "hf_class": spec.get("hf_arch", spec["model"]),
                   "notes": spec["notes"], "seed": seed}
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix=f"fx-{name}-") as td:
        d = Path(td) / "hf"
        d.mkdir()
        model, config = build_hf(name, spec, d, seed)
        entry["config"] = {k: v for k, v in config.items() if k not in (
            "transformers_version", "id2label", "label2id", "output_hidden_states",
            "return_dict", "chunk_size_feed_forward", "is_encoder_decoder", "problem_type",
            "output_attentions", "_name_or_path")}
        entry["source"] = f"convert_hf_to_gguf.py {entry['hf_class']}"
        if spec.get("reference"):
            entry["reference"] = f"{spec['reference'].__name__} (torch, not transformers)"
        convert(d, f32)
        if spec.get("gguf_rewrite"):  # a layout older converters wrote, made from this one's file
            spec["gguf_rewrite"](f32)
        quantize_q8(f32, q8)
        extra = {q: place(q) for q in spec.get("extra_quants", [])}
        for q, path in extra.items():
            quantize_q8(f32, path, q.upper())
        ids = eval_ids(seed)
        probe = install_router_probe(model, spec["moe"]) if spec.get("moe") else ([], [])
        hf = (spec["reference"] if spec.get("reference") else hf_logits)(model, ids)
        for h in probe[0]:
            h.remove()
        if spec.get("moe"):
            if not probe[1]:
                raise RuntimeError("router probe saw no router call")
            entry["router_min_gap"] = float(f"{min(probe[1]):.3g}")
            entry["router_gap_threshold"] = MOE_MIN_GAP[spec["moe"]]
            entry["seed_tries"] = seed_tries
            entry["n_experts"] = N_EXPERTS
            entry["n_experts_used"] = TOP_K
    summ = gguf_summary(f32)
    if summ["architecture"] != spec["arch"]:
        raise RuntimeError(f"general.architecture={summ['architecture']} != {spec['arch']}")
    lf = llama_logits(f32, ids)
    lq = llama_logits(q8, ids)
    for tag, x in (("f32", lf), ("q8_0", lq)):
        if not np.isfinite(x).all():
            raise RuntimeError(f"{tag} logits not finite")
    std = float(hf.std())
    entry.update({
        "sliding_window": spec.get("sliding_window"),
        "gguf_arch": summ["architecture"],
        "tensors": summ["tensors"],
        "eval_ids": ids,
        "llama_f32_logits_std": round(float(lf.std()), 4),
        "llama_q8_0_logits_std": round(float(lq.std()), 4),
        "hf_logits_std": round(std, 4),
        "f32_vs_hf_maxdiff_over_std": float(f"{np.abs(lf - hf).max() / std:.3g}"),
        "q8_0_vs_hf_maxdiff_over_std": float(f"{np.abs(lq - hf).max() / std:.3g}"),
        "f32_vs_hf_argmax_agree": float(np.mean(lf.argmax(-1) == hf.argmax(-1))),
        "files": {"f32": f32.name, "f32_bytes": f32.stat().st_size,
                  "q8_0": q8.name, "q8_0_bytes": q8.stat().st_size},
        "q8_0_tensor_types": gguf_summary(q8)["tensor_types"],
    })
    if extra:
        entry["extra_quants"] = list(extra)
    for q, path in extra.items():
        lx = llama_logits(path, ids)
        if not np.isfinite(lx).all():
            raise RuntimeError(f"{q} logits not finite")
        entry[f"llama_{q}_logits_std"] = round(float(lx.std()), 4)
        entry[f"{q}_vs_hf_maxdiff_over_std"] = float(f"{np.abs(lx - hf).max() / std:.3g}")
        entry[f"{q}_vs_hf_argmax_agree"] = float(np.mean(lx.argmax(-1) == hf.argmax(-1)))
        entry["files"][q] = path.name
        entry["files"][f"{q}_bytes"] = path.stat().st_size
        entry[f"{q}_tensor_types"] = gguf_summary(path)["tensor_types"]
    if spec.get("post"):
        spec["post"](entry, f32)
    if keep:
        entry["files_kept"] = list(keep)
        entry["files"] = {k: v for k, v in entry["files"].items() if k.removesuffix("_bytes") in keep}
    if lf.std() <= 1.0:
        entry["warning"] = f"llama.cpp f32 logits std {lf.std():.3f} <= 1"
    manifest[name] = entry
    print(f"[{name}] ok {time.time() - t0:.1f}s std={lf.std():.3f} "
          f"f32/hf={entry['f32_vs_hf_maxdiff_over_std']} q8/hf={entry['q8_0_vs_hf_maxdiff_over_std']} "
          f"f32={f32.stat().st_size}B", flush=True)


def hash_name(name: str) -> int:
    import zlib

    return zlib.crc32(name.encode()) % 100000


def main(argv: list[str]) -> int:
    if argv[:1] == ["--_convert"]:
        _convert_main(argv[1], argv[2])
        return 0
    if argv[:1] == ["--_quantize"]:
        _quantize_main(*argv[1:4])
        return 0
    if argv[:1] == ["--list"]:
        print("\n".join(ARCHS))
        return 0
    names = argv or list(ARCHS)
    unknown = [n for n in names if n not in ARCHS]
    if unknown:
        print(f"unknown: {unknown}; known: {list(ARCHS)}")
        return 2
    OUT.mkdir(parents=True, exist_ok=True)
    ensure_tokenizers()
    manifest = load_manifest()
    failed = []
    for name in names:
        try:
            make(name, manifest)
        except Exception as e:  # record and move on
            traceback.print_exc()
            failed.append(name)
            manifest[name] = {"arch": ARCHS[name]["arch"], "hf_class": ARCHS[name].get("hf_arch", ARCHS[name]["model"]),
                              "source": None, "error": f"{type(e).__name__}: {str(e)[-1500:]}",
                              "notes": ARCHS[name]["notes"]}
            for suffix in (".f32.gguf", ".q8_0.gguf",
                           *(f".{q}.gguf" for q in ARCHS[name].get("extra_quants", []))):
                (OUT / f"{name}{suffix}").unlink(missing_ok=True)
        save_manifest(manifest, name)
    print(f"done; failed: {failed}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
