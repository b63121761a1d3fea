"""The converter (mlxllm/convert.py) against llama.cpp's own convert_hf_to_gguf.py.

tests/fixtures/hf/<name>/ holds a tiny Hugging Face checkpoint and, in reference.json, what
llama.cpp's converter made of it at each outtype: every tensor's name, shape, type and
sha256, and every metadata value (scripts/make_convert_fixtures.py). Our file must hold the
same tensors byte for byte and the same metadata, except the keys listed with their reason
in METADATA_DIFFERENCES. logits.npy: llama.cpp's logits on its own F32 file, which mlxllm
must reproduce on ours. hf_logits.npy: transformers' own outputs of the checkpoint
(`make_convert_fixtures.py --hf-outputs`), which mlxllm's run of our F32 file must
reproduce too, except where llama.cpp's run departs from them (HF_DIFFERENCES).
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
from pathlib import Path

import gguf
import mlx.core as mx
import numpy as np
import pytest

import mlxllm
from mlxllm.convert import ConvertError, convert, identify_pre_tokenizer
from mlxllm.gguf import GGUFFile
from mlxllm.loader import load_model

FIXTURES = Path(__file__).parent / "fixtures" / "hf"
NAMES = sorted(p.parent.name for p in FIXTURES.glob("*/reference.json"))
OUTTYPES = ("f32", "f16", "bf16", "q8_0")
F32_TOLERANCE = 5e-3  # max |Δlogit| / std, as tests/test_archs.py

# (fixture, metadata key) whose values legitimately differ, with the reason.
METADATA_DIFFERENCES = {
    **{(fixture, "tokenizer.ggml.pre"):
       "llama.cpp's converter refuses a WordPiece tokenizer whose check-text hash it does not know (the "
       "fixture script patches that refusal to 'gpt-2'); ours writes 'default', and llama.cpp's WordPiece "
       "tokenizer does not read the key"
       for fixture in ("bert", "bert-mlm", "bert-classifier", "distilbert", "distilbert-mlm", "distilbert-classifier",
                       "nomic-bert", "jina-bert-v2")},
    **{(fixture, key):
       "llama.cpp's converter reads the config through transformers' AutoConfig, whose generic config for a "
       "remote-code model_type adds head_dim = n_embd / n_head, written as key and value length: the value "
       "llama.cpp computes when the keys are absent; ours reads config.json as the checkpoint states it"
       for fixture in ("nomic-bert", "jina-bert-v2")  # (fixture name = architecture name)
       for key in (f"{fixture}.attention.key_length", f"{fixture}.attention.value_length")},
    **{(fixture, "tokenizer.chat_template"):
       "a checkpoint without a chat template: llama.cpp's converter copies its repository's RWKV world "
       "template file, ours writes its own template of that format (test_rwkv_world_template_renders_as_"
       "llama_cpps renders both)" for fixture in ("rwkv6", "rwkv7")},
    **{(fixture, "general.file_type"):
       "llama.cpp's converter for this architecture omits it (its hyperparameters skip add_file_type); "
       "ours writes it, as llama.cpp's other converters do" for fixture in ("gptneox", "mpt")},
}


# Fixtures transformers cannot run: remote-code architectures with no transformers class
# (make_convert_fixtures.py --hf-outputs skips them; no hf_logits.npy). Their checkpoints are
# written in the remote code's layout from a transformers model of the same math
# (scripts/make_arch_fixtures.py, which checks llama.cpp against it or a torch forward).
NO_TRANSFORMERS_CLASS = {
    "bailingmoe": "BailingMoeForCausalLM (Ling) is remote code",
    "internlm2": "InternLM2ForCausalLM is remote code",
    "jina-bert-v2": "JinaBertModel is remote code",
    "rwkv6": "Rwkv6ForCausalLM is remote code (transformers' RwkvForCausalLM is RWKV-4)",
    "rwkv7": "RWKV7ForCausalLM is remote code (transformers' RwkvForCausalLM is RWKV-4)",
}

# Fixtures where llama.cpp's own run of its own F32 file departs from transformers' run of
# the checkpoint beyond the bound, and ours (same tensors and metadata as llama.cpp's file)
# departs by the same: (max |Δ| / std measured for both, argmax positions agreeing of 16, why).
HF_DIFFERENCES = {
    "gemma3": (0.373, 16,
               "llama.cpp's converter writes no sliding-window pattern for gemma3, so the file means "
               "llama.cpp's default (every 6th layer global); the fixture's layer_types [sliding, full] "
               "makes its layer 1 global (rope base 1e6) in transformers, sliding (rope base 1e4) in the "
               "file. With transformers' layer_types both sliding: 7.1e-4. Real Gemma 3 checkpoints "
               "follow the 5:1 pattern"),
    "phimoe": (2.94, 4,
               "llama.cpp's phimoe graph computes the norms as RMSNorm + bias (transformers: LayerNorm) "
               "and weights the top-2 experts by renormalised softmax (transformers: sparsemixer); "
               "make_arch_fixtures.py's notes: with both patched into transformers, 3.7e-6"),
    "nemotron_h": (0.0107, 16,
                   "transformers' NemotronH clamps the Mamba-2 dt at config time_step_min (0.001); "
                   "llama.cpp's ssm_scan does not (GGUF has no key for it). With the clamp removed "
                   "from transformers: 3.0e-6"),
    "nemotron_h_moe": (0.00504, 16, "as nemotron_h (dt clamped at time_step_min): unclamped 4.3e-6"),
}


def reference(name: str) -> dict:
    return json.loads((FIXTURES / name / "reference.json").read_text())


def _jsonable(v):
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, bytes):
        return v.decode("utf-8", errors="surrogateescape")
    if isinstance(v, np.generic):
        return v.item()
    return v


def digest(path: Path) -> dict:
    """As scripts/make_convert_fixtures.py records llama.cpp's files."""
    r = gguf.GGUFReader(str(path))
    tensors = {t.name: {"shape": [int(n) for n in t.shape], "type": t.tensor_type.name,
                        "sha256": hashlib.sha256(bytes(t.data.tobytes())).hexdigest(),
                        "bytes": bytes(t.data.tobytes())} for t in r.tensors}
    with GGUFFile(path) as gf:
        meta = {k: _jsonable(v) for k, v in gf.metadata.items()}
    return {"tensors": tensors, "metadata": meta}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Our conversion of a fixture at an outtype, made once."""
    out = tmp_path_factory.mktemp("converted")
    cache: dict[tuple[str, str], Path] = {}

    def get(name: str, outtype: str) -> Path:
        if (name, outtype) not in cache:
            cache[(name, outtype)] = convert(FIXTURES / name, out / f"{name}.{outtype}.gguf", outtype=outtype,
                                             progress=False)
        return cache[(name, outtype)]
    return get


def test_every_registered_converter_is_checked_here():
    """Each architecture with a converter hook has a fixture converted by llama.cpp too."""
    from mlxllm.registry import REGISTRY

    with_hook = {e.name for e in REGISTRY.all() if e.arch is not None and e.arch.convert is not None}
    covered = {reference(n)["outtypes"]["f32"]["metadata"]["general.architecture"] for n in NAMES}
    assert with_hook - covered == set()
    assert {"llama", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "qwen2moe", "qwen3moe", "bert"} <= with_hook


def test_every_per_class_hook_is_checked_here():
    """And each per-class hook of an architecture (bert's DistilBERT, RoBERTa and XLM-R
    variants) has a fixture of a class it converts, dispatched to it."""
    from mlxllm.convert import find_converter
    from mlxllm.registry import REGISTRY

    by_class = {reference(n)["hf_class"]: n for n in NAMES}
    variants = [v for e in REGISTRY.all() if e.arch is not None and e.arch.convert is not None
                for v in e.arch.convert.variants]
    assert {v.__name__ for v in variants} >= {"DistilBert", "Roberta", "XLMRoberta"}
    for hook in variants:
        fixtures = [by_class[c] for c in hook.hf_classes if c in by_class]
        assert fixtures, f"no fixture for {hook.__name__} ({', '.join(hook.hf_classes)})"
        for name in fixtures:
            config = json.loads((FIXTURES / name / "config.json").read_text())
            assert find_converter(config)[1] is hook, name


@pytest.mark.parametrize("outtype", OUTTYPES)
@pytest.mark.parametrize("name", NAMES)
def test_same_tensors_as_llama_cpp(name, outtype, converted):
    ref = reference(name)["outtypes"][outtype]["tensors"]
    ours = digest(converted(name, outtype))["tensors"]
    assert sorted(ours) == sorted(ref), f"missing {sorted(set(ref) - set(ours))}, extra {sorted(set(ours) - set(ref))}"
    for tname, want in ref.items():
        if "base64" in want and ours[tname]["sha256"] != want["sha256"]:
            # Mamba's A = -exp(A_log): torch's float32 exp (llama.cpp's converter) and numpy's may
            # differ in the last bit; the file keeps the values, equal here to one unit in the last place
            assert {k: ours[tname][k] for k in ("shape", "type")} == {k: want[k] for k in ("shape", "type")}
            ulps = np.abs(np.frombuffer(base64.b64decode(want["base64"]), np.int32).astype(np.int64)
                          - np.frombuffer(ours[tname]["bytes"], np.int32).astype(np.int64))
            assert ulps.max() <= 1, f"{tname}: {ulps.max()} units in the last place from llama.cpp's"
            continue
        ours[tname].pop("bytes", None)
        want = {k: v for k, v in want.items() if k != "base64"}
        assert ours[tname] == want, f"{tname}: ours {ours[tname]} vs llama.cpp {want}"


@pytest.mark.parametrize("outtype", OUTTYPES)
@pytest.mark.parametrize("name", NAMES)
def test_same_metadata_as_llama_cpp(name, outtype, converted):
    ref = reference(name)["outtypes"][outtype]["metadata"]
    ours = digest(converted(name, outtype))["metadata"]
    keys = (set(ref) | set(ours)) - {key for fixture, key in METADATA_DIFFERENCES if fixture == name}
    differ = {k: (ref.get(k, "<absent>"), ours.get(k, "<absent>")) for k in sorted(keys) if ref.get(k, "<absent>") != ours.get(k, "<absent>")}
    assert not differ, "metadata differs (llama.cpp, ours): " + "; ".join(f"{k}: {a!r:.80} vs {b!r:.80}" for k, (a, b) in differ.items())


@pytest.mark.parametrize("name", NAMES)
def test_converted_file_runs_as_llama_cpp_runs_its_own(name, converted):
    ids = reference(name)["eval_ids"]
    ref = np.load(FIXTURES / name / "logits.npy")
    model = load_model(str(converted(name, "f32")))[0]
    ours = np.array(model(mx.array([ids]))[0])  # a decoder's logits, an encoder's hidden states
    if reference(name).get("kind") != "encoder":
        assert (ours.argmax(-1) == ref.argmax(-1)).all()
    assert np.abs(ours - ref).max() <= F32_TOLERANCE * ref.std()


def test_every_transformers_fixture_has_its_outputs():
    """hf_logits.npy exists exactly for the fixtures transformers can run."""
    have = {n for n in NAMES if (FIXTURES / n / "hf_logits.npy").is_file()}
    assert set(NAMES) - have == set(NO_TRANSFORMERS_CLASS)
    assert set(HF_DIFFERENCES) <= have


@pytest.mark.parametrize("name", [n for n in NAMES if n not in NO_TRANSFORMERS_CLASS])
def test_converted_file_reproduces_transformers(name, converted):
    """mlxllm's run of our F32 file against transformers' run of the checkpoint itself
    (float32, eager attention): argmax equal, max |Δ| ≤ 5e-3 × std. hf_logits.npy is stored
    in float16 where that rounding moves no value by more than 1e-3 × std (of that budget)."""
    ids = reference(name)["eval_ids"]
    hf = np.load(FIXTURES / name / "hf_logits.npy").astype(np.float32)
    model = load_model(str(converted(name, "f32")))[0]
    ours = np.array(model(mx.array([ids]))[0])
    assert ours.shape == hf.shape
    err = float(np.abs(ours - hf).max() / hf.std())
    decoder = reference(name).get("kind") != "encoder"
    agree = int((ours.argmax(-1) == hf.argmax(-1)).sum()) if decoder else None
    if name in HF_DIFFERENCES:
        # llama.cpp's own run departs as ours does (its graph or the fixture, not the converter):
        # both stay at the measured departure; an entry no longer needed fails here
        measured, measured_agree, _why = HF_DIFFERENCES[name]
        llama = np.load(FIXTURES / name / "logits.npy")
        theirs = float(np.abs(llama - hf).max() / hf.std())
        assert F32_TOLERANCE < theirs <= 1.05 * measured, f"llama.cpp {theirs:.3g} vs recorded {measured}"
        assert err <= 1.05 * measured, f"ours {err:.3g} vs recorded {measured}"
        assert agree is None or agree >= measured_agree
        return
    if decoder:
        assert agree == len(ids), f"argmax differs at {len(ids) - agree} of {len(ids)} positions"
    assert err <= F32_TOLERANCE, f"max |Δ| = {err:.3g} × std"


def test_python_api_default_name_beside_the_folder(tmp_path):
    d = _copy("qwen2", tmp_path)
    out = mlxllm.convert(d, outtype="q8_0", progress=False)
    assert out == tmp_path / "qwen2-q8_0.gguf" and out.is_file()
    with GGUFFile(out) as gf:
        assert gf.metadata["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0


# ---- errors and file handling


def _copy(name: str, tmp_path: Path) -> Path:
    d = tmp_path / name
    shutil.copytree(FIXTURES / name, d)
    return d


def test_sharded_checkpoint_missing_shard_is_one_line(tmp_path):
    d = _copy("qwen3", tmp_path)
    shards = sorted(d.glob("model-*.safetensors"))
    assert len(shards) > 1, "the qwen3 fixture is the sharded one"
    shards[-1].unlink()
    with pytest.raises(ConvertError, match=rf"missing shard {shards[-1].name}") as e:
        convert(d, tmp_path / "out.gguf", progress=False)
    assert "\n" not in str(e.value)
    assert not list(tmp_path.glob("*.gguf*")) and not list(tmp_path.glob(".out.gguf*"))


def test_truncated_shard_is_one_line(tmp_path):
    d = _copy("llama", tmp_path)
    st = d / "model.safetensors"
    st.write_bytes(st.read_bytes()[:-100])
    with pytest.raises(ConvertError, match="truncated or corrupt shard") as e:
        convert(d, tmp_path / "out.gguf", progress=False)
    assert "\n" not in str(e.value)


def test_garbage_shard_is_one_line(tmp_path):
    d = _copy("llama", tmp_path)
    (d / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(ConvertError, match="not a readable safetensors file"):
        convert(d, tmp_path / "out.gguf", progress=False)


def test_unsupported_architecture_is_one_line(tmp_path):
    d = _copy("llama", tmp_path)
    config = json.loads((d / "config.json").read_text())
    config["architectures"] = ["FrobnicatorForCausalLM"]
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConvertError, match="unsupported architecture FrobnicatorForCausalLM"):
        convert(d, tmp_path / "out.gguf", progress=False)


@pytest.mark.parametrize(("fixture", "key"), [("gemma", "rms_norm_eps"), ("rwkv6", "rescale_every")])
def test_config_without_a_key_its_converter_needs_is_one_line(tmp_path, fixture, key):
    d = _copy(fixture, tmp_path)
    config = json.loads((d / "config.json").read_text())
    del config[key]
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConvertError, match=f"no '{key}', which the") as e:
        convert(d, tmp_path / "out.gguf", progress=False)
    assert "\n" not in str(e.value)
    assert not list(tmp_path.glob("*.gguf*")) and not list(tmp_path.glob(".out.gguf*"))


def test_xlm_roberta_without_its_sentencepiece_model_is_one_line(tmp_path):
    d = _copy("xlm-roberta", tmp_path)
    (d / "sentencepiece.bpe.model").unlink()
    with pytest.raises(ConvertError, match="no sentencepiece.bpe.model") as e:
        convert(d, tmp_path / "out.gguf", progress=False)
    assert "\n" not in str(e.value)
    assert not list(tmp_path.glob("*.gguf*")) and not list(tmp_path.glob(".out.gguf*"))


def test_xlm_roberta_with_lora_adapters_is_one_line(tmp_path):
    """jina-embeddings-v3 (XLM-R with task LoRAs, llama.cpp's jina-bert-v3): refused by name."""
    d = _copy("xlm-roberta", tmp_path)
    config = json.loads((d / "config.json").read_text())
    config["lora_adaptations"] = ["retrieval.query", "retrieval.passage"]
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConvertError, match="jina-embeddings-v3"):
        convert(d, tmp_path / "out.gguf", progress=False)


def test_failure_while_writing_leaves_no_file(tmp_path, monkeypatch):
    """A tensor that fails to load half-way: no file under the output name, no temporary left."""
    from mlxllm import convert_hooks

    out = tmp_path / "out" / "model.gguf"
    out.parent.mkdir()
    out.write_bytes(b"previous file")  # an older file under that name survives intact

    original = convert_hooks.Llama.tensors

    def failing(self, name, t, bid):
        if name.endswith("layers.1.mlp.down_proj.weight"):
            t = t.map(lambda a: (_ for _ in ()).throw(OSError("disk read failed")))
        return original(self, name, t, bid)

    monkeypatch.setattr(convert_hooks.Llama, "tensors", failing)
    with pytest.raises(OSError, match="disk read failed"):
        convert(FIXTURES / "llama", out, progress=False)
    assert out.read_bytes() == b"previous file"
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.gguf"]


def _write_safetensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    header, offset = {}, 0
    for name, a in tensors.items():
        header[name] = {"dtype": {"float32": "F32", "float16": "F16"}[a.dtype.name], "shape": list(a.shape),
                        "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little") + blob)
        for a in tensors.values():
            f.write(a.tobytes())


def _multi_shard_checkpoint(d: Path, hidden: int = 512, inter: int = 2048, layers: int = 2) -> tuple[int, int]:
    """A two-shard float32 llama checkpoint in d (the llama fixture's tokenizer, random
    weights): (its largest tensor's bytes, all its bytes). The defaults make 40 MB whose
    largest tensor is 4 MB."""
    d.mkdir()
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(FIXTURES / "llama" / f, d / f)
    config = json.loads((FIXTURES / "llama" / "config.json").read_text())
    config.update(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=8,
                  num_key_value_heads=8, head_dim=hidden // 8, dtype="float32")
    (d / "config.json").write_text(json.dumps(config))
    rng = np.random.default_rng(0)
    shapes = {"model.embed_tokens.weight": (384, hidden), "lm_head.weight": (384, hidden), "model.norm.weight": (hidden,)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,),
                       **{p + f"self_attn.{x}_proj.weight": (hidden, hidden) for x in "qkvo"},
                       p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
                       p + "mlp.down_proj.weight": (hidden, inter)})
    names = sorted(shapes)
    weight_map = {}
    for shard, part in enumerate((names[: len(names) // 2], names[len(names) // 2:])):
        fname = f"model-{shard + 1:05d}-of-00002.safetensors"
        _write_safetensors(d / fname, {n: rng.standard_normal(shapes[n], dtype=np.float32) for n in part})
        weight_map.update(dict.fromkeys(part, fname))
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return int(max(np.prod(s) for s in shapes.values()) * 4), int(sum(np.prod(s) for s in shapes.values()) * 4)


def test_peak_memory_is_about_the_largest_tensor(tmp_path):
    """A two-shard checkpoint of 40 MB whose largest tensor is 4 MB: numpy's peak while
    converting stays near that tensor, never near the model (tensors are read one at a time)."""
    import tracemalloc

    d = tmp_path / "big"
    largest, total = _multi_shard_checkpoint(d)
    assert total > 8 * largest

    tracemalloc.start()
    try:
        out = convert(d, tmp_path / "big.gguf", outtype="f16", progress=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert out.stat().st_size > total // 2
    print(f"peak {peak / 1e6:.2f} MB, largest {largest / 1e6:.2f} MB, total {total / 1e6:.1f} MB")
    assert peak <= 1.5 * largest + 4e6, f"peak {peak / 1e6:.1f} MB for a {largest / 1e6:.1f} MB largest tensor"


# In a child process: its resident set after the imports, then its peak (VmHWM) after the
# conversion, in bytes, from /proc/self/status (file-backed pages of the memory-mapped shards
# count there too)
_RSS_CHILD = """
import sys
from pathlib import Path
from mlxllm.convert import convert

def status(key):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

base = status("VmRSS")
convert(Path(sys.argv[1]), Path(sys.argv[2]), outtype=sys.argv[3], progress=False)
print(base, status("VmHWM"))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc/self/status")
@pytest.mark.parametrize("outtype", ["f16", "q8_0"])
def test_peak_rss_is_about_the_largest_tensor(tmp_path, outtype):
    """The process's whole resident set, not only what Python allocates: converting a
    two-shard checkpoint of 90 MB whose largest tensor is 8 MB raises the child's peak RSS
    over its resident set after the imports by at most largest × 1.5 + 200 MB (issue 15),
    and by well under the checkpoint's size."""
    import subprocess
    import sys

    d = tmp_path / "big"
    largest, total = _multi_shard_checkpoint(d, hidden=512, inter=4096, layers=3)
    out = tmp_path / "big.gguf"
    r = subprocess.run([sys.executable, "-c", _RSS_CHILD, str(d), str(out), outtype],
                       capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    base, peak = map(int, r.stdout.split()[-2:])
    assert out.stat().st_size > total // 4
    grew = peak - base
    print(f"{outtype}: RSS after imports {base / 1e6:.0f} MB, peak {peak / 1e6:.0f} MB (+{grew / 1e6:.1f} MB); "
          f"largest tensor {largest / 1e6:.1f} MB, checkpoint {total / 1e6:.0f} MB")
    assert grew <= 1.5 * largest + 200e6, f"peak RSS +{grew / 1e6:.0f} MB for a {largest / 1e6:.0f} MB largest tensor"
    assert grew <= total / 2, f"peak RSS +{grew / 1e6:.0f} MB for a {total / 1e6:.0f} MB checkpoint"


@pytest.mark.parametrize("outtype", ["f32", "q8_0"])
def test_fused_expert_layout_converts_to_the_same_file(tmp_path, outtype):
    """Newer Qwen MoE checkpoints store each layer's experts fused (gate_up_proj
    [E, 2 * n_ff, n_embd], down_proj [E, n_embd, n_ff]): split and renamed, they give the
    same tensors as the per-expert layout llama.cpp converted."""
    from mlxllm.convert import checkpoint_tensors

    d = _copy("qwen3moe", tmp_path)
    tensors = {n: t.load() for n, t in checkpoint_tensors(d).items()}
    n_experts = json.loads((d / "config.json").read_text())["num_local_experts"]
    fused = {}
    for name, a in tensors.items():
        if ".mlp.experts." not in name:
            fused[name] = a
        elif name.endswith(".experts.0.down_proj.weight"):
            stem = name.removesuffix(".0.down_proj.weight")
            get = [[tensors[f"{stem}.{x}.{w}.weight"] for x in range(n_experts)] for w in ("gate_proj", "up_proj", "down_proj")]
            fused[f"{stem}.gate_up_proj"] = np.concatenate([np.stack(get[0]), np.stack(get[1])], axis=1)
            fused[f"{stem}.down_proj"] = np.stack(get[2])
    for f in d.glob("model*.safetensors"):
        f.unlink()
    _write_safetensors(d / "model.safetensors", fused)
    ours = digest(convert(d, tmp_path / "fused.gguf", outtype=outtype, progress=False))["tensors"]
    assert {n: {k: v for k, v in t.items() if k != "bytes"} for n, t in ours.items()} == \
        reference("qwen3moe")["outtypes"][outtype]["tensors"]


def test_gpt_oss_unquantized_experts_convert_to_the_mxfp4_values(tmp_path):
    """gpt-oss checkpoints with float experts (HF's [E, in, out] layout, gate and up
    interleaved by output): the MXFP4 fixture's experts dequantized as transformers reads
    them (low nibble first) and saved so convert to F32 experts equal, value for value, to
    gguf-py's dequantization of the MXFP4 tensors converted from the blocks (which equal
    llama.cpp's); every other tensor unchanged."""
    from mlxllm.convert import checkpoint_tensors

    lut = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], np.float32)

    def dequantized(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:  # -> [E, in, out]
        codes = np.stack([blocks & 0x0F, blocks >> 4], axis=-1).reshape(*blocks.shape[:-2], -1)
        exps = np.repeat(scales.astype(np.int32) - 127, 32, axis=-1)
        return np.ascontiguousarray(np.ldexp(lut[codes], exps).astype(np.float32).swapaxes(1, 2))

    d = _copy("gpt-oss", tmp_path)
    tensors = {n: t.load() for n, t in checkpoint_tensors(d).items()}
    plain = {}
    for name, a in tensors.items():
        if name.endswith("_scales"):
            continue
        if name.endswith("_blocks"):
            stem = name.removesuffix("_blocks")
            plain[stem] = dequantized(a, tensors[stem + "_scales"])
        else:
            plain[name] = a
    for f in d.glob("model*.safetensors"):
        f.unlink()
    _write_safetensors(d / "model.safetensors", plain)
    config = json.loads((d / "config.json").read_text())
    del config["quantization_config"]
    (d / "config.json").write_text(json.dumps(config))

    mxfp4 = gguf.GGUFReader(str(convert(FIXTURES / "gpt-oss", tmp_path / "mxfp4.gguf", outtype="f32", progress=False)))
    ours = gguf.GGUFReader(str(convert(d, tmp_path / "plain.gguf", outtype="f32", progress=False)))
    want = {t.name: t for t in mxfp4.tensors}
    assert sorted(want) == sorted(t.name for t in ours.tensors)
    experts = 0
    for t in ours.tensors:
        ref = want[t.name]
        assert t.tensor_type == gguf.GGMLQuantizationType.F32
        if ref.tensor_type == gguf.GGMLQuantizationType.MXFP4:
            experts += 1
            expected = gguf.quants.dequantize(ref.data, ref.tensor_type)
        else:
            expected = np.asarray(ref.data)
        assert np.array_equal(np.asarray(t.data), expected), t.name
    assert experts == 3 * reference("gpt-oss")["outtypes"]["f32"]["metadata"]["gpt-oss.block_count"]


def test_gpt_oss_blocks_without_scales_is_one_line(tmp_path):
    from mlxllm.convert import checkpoint_tensors

    d = _copy("gpt-oss", tmp_path)
    tensors = {n: t.load() for n, t in checkpoint_tensors(d).items() if not n.endswith("layers.1.mlp.experts.down_proj_scales")}
    (d / "model.safetensors").unlink()
    header, offset, blobs = {}, 0, []
    for name, a in tensors.items():  # (U8 too: _write_safetensors writes floats only)
        kind = {"float32": "F32", "uint8": "U8"}[a.dtype.name]
        header[name] = {"dtype": kind, "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
        blobs.append(a.tobytes())
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    (d / "model.safetensors").write_bytes(len(blob).to_bytes(8, "little") + blob + b"".join(blobs))
    with pytest.raises(ConvertError, match=r"model\.layers\.1\.mlp\.experts\.down_proj_blocks has no _scales tensor") as e:
        convert(d, tmp_path / "out.gguf", progress=False)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("name", ["rwkv6", "rwkv7"])
def test_rwkv_world_template_renders_as_llama_cpps(name, converted):
    """The RWKV world chat template our converter writes renders every conversation as the
    template llama.cpp's converter wrote (reference.json) renders it."""
    import jinja2.sandbox

    from mlxllm.chat_template import render_chat_template

    theirs = reference(name)["outtypes"]["f32"]["metadata"]["tokenizer.chat_template"]
    with GGUFFile(converted(name, "f32")) as gf:
        ours = gf.metadata["tokenizer.chat_template"]
    conversations = [
        [{"role": "user", "content": "  Hello there \n"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "<think>hmm</think>\n Hello! "}, {"role": "user", "content": "More?"}],
        [{"role": "system", "content": "first"}, {"role": "system", "content": "last"},
         {"role": "assistant", "content": None}, {"role": "user", "content": "x</think>y"}],
        [{"role": "system", "content": ""}, {"role": "tool", "content": "ignored"}],
    ]
    for messages in conversations:
        for generation in (True, False):
            for thinking in ({}, {"enable_thinking": True}, {"enable_thinking": False}):
                kw = dict(add_generation_prompt=generation, bos_token="<s>", **thinking)
                assert render_chat_template(ours, messages, **kw) == render_chat_template(theirs, messages, **kw), \
                    (messages, kw)
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        # add_generation_prompt undefined: both add the prompt
        assert env.from_string(ours).render(messages=messages, bos_token="<s>") == \
            env.from_string(theirs).render(messages=messages, bos_token="<s>")


# ---- tokenizers


def test_pre_tokenizer_plain_gpt2_from_its_description():
    path = FIXTURES / "llama" / "tokenizer.json"
    assert identify_pre_tokenizer(path, json.loads(path.read_text())) == "gpt-2"


def test_pre_tokenizer_hash_wins_over_the_description(monkeypatch):
    """A tokenizer whose ids of the check text are known gets the recorded name, as in
    llama.cpp, before any guess from its description."""
    pytest.importorskip("tokenizers")
    from mlxllm import _bpe_pre
    from mlxllm.convert import pre_tokenizer_hash

    path = FIXTURES / "llama" / "tokenizer.json"
    monkeypatch.setitem(_bpe_pre.BPE_PRE_HASHES, pre_tokenizer_hash(path), "qwen2")
    assert identify_pre_tokenizer(path, json.loads(path.read_text())) == "qwen2"


def test_unknown_pre_tokenizer_is_named(tmp_path):
    spec = json.loads((FIXTURES / "llama" / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "always"}
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(spec))
    with pytest.raises(ConvertError, match='unknown BPE pre-tokenizer .*"Metaspace"'):
        identify_pre_tokenizer(path, spec)


def test_converted_bpe_tokenizer_equals_tokenizers_library(converted):
    """The converted file's tokenizer (mlxllm's, from the GGUF) gives the ids the `tokenizers`
    library gives from tokenizer.json, on the committed tokenizer corpus."""
    tokenizers = pytest.importorskip("tokenizers")
    from mlxllm.tokenizer import Tokenizer

    corpus = json.loads((Path(__file__).parent / "fixtures" / "tokenizer" / "corpus.json").read_text())["strings"]
    hf = tokenizers.Tokenizer.from_file(str(FIXTURES / "llama" / "tokenizer.json"))
    with GGUFFile(converted("llama", "f32")) as gf:
        ours = Tokenizer.from_metadata(gf.metadata)
    bad = [s for s in corpus if ours.encode(s, add_special=False, parse_special=True)
           != hf.encode(s, add_special_tokens=False).ids]
    assert not bad, f"{len(bad)} of {len(corpus)} strings differ, e.g. {bad[:3]!r}"


def test_converted_wordpiece_tokenizer_equals_tokenizers_library(converted):
    """And for a WordPiece (BERT) vocabulary, written in llama.cpp's phantom-space form."""
    tokenizers = pytest.importorskip("tokenizers")
    from mlxllm.tokenizer import Tokenizer

    corpus = json.loads((Path(__file__).parent / "fixtures" / "tokenizer" / "corpus.json").read_text())["strings"]
    hf = tokenizers.Tokenizer.from_file(str(FIXTURES / "bert" / "tokenizer.json"))
    path = converted("bert", "f32")
    with GGUFFile(path) as gf:
        ours = Tokenizer.from_metadata(gf.metadata)
    bad = [s for s in corpus if ours.encode(s, add_special=False) != hf.encode(s, add_special_tokens=False).ids]
    # Where the library differs, llama.cpp's WordPiece differs the same way on this file (a word
    # over 100 characters is [UNK] there, special tokens written in the text are matched, U+0085
    # splits words): measured 5 of 491 strings.
    llm = pytest.importorskip("llama_cpp").Llama(str(path), vocab_only=True, verbose=False)
    for s in bad:
        assert ours.encode(s, add_special=False) == llm.tokenize(s.encode(), add_bos=False, special=False), s
    assert len(bad) <= 5, f"{len(bad)} of {len(corpus)} strings differ, e.g. {bad[:3]!r}"


def test_converted_spm_tokenizer_equals_sentencepiece(tmp_path):
    """The same for a SentencePiece vocabulary, against the sentencepiece library. The
    fixture's model is re-saved as Gemma's own are made (no dummy prefix, whitespace kept),
    which is what the Gemma converter declares (add_space_prefix false)."""
    from sentencepiece import SentencePieceProcessor
    from sentencepiece import sentencepiece_model_pb2 as spm_proto

    from mlxllm.tokenizer import Tokenizer

    d = _copy("gemma", tmp_path)
    proto = spm_proto.ModelProto()
    proto.ParseFromString((d / "tokenizer.model").read_bytes())
    proto.normalizer_spec.add_dummy_prefix = False
    proto.normalizer_spec.remove_extra_whitespaces = False
    (d / "tokenizer.model").write_bytes(proto.SerializeToString())
    sp = SentencePieceProcessor()
    sp.LoadFromFile(str(d / "tokenizer.model"))
    corpus = json.loads((Path(__file__).parent / "fixtures" / "tokenizer" / "corpus.json").read_text())["strings"]
    with GGUFFile(convert(d, tmp_path / "gemma.gguf", outtype="f16", progress=False)) as gf:
        ours = Tokenizer.from_metadata(gf.metadata)
    bad = [s for s in corpus if ours.encode(s, add_special=False) != sp.encode(s)]
    assert not bad, f"{len(bad)} of {len(corpus)} strings differ, e.g. {bad[:3]!r}"


# ---- command line


def test_cli_convert(tmp_path):
    from click.testing import CliRunner

    from mlxllm.cli import main

    out = tmp_path / "m.gguf"
    r = CliRunner().invoke(main, ["convert", str(FIXTURES / "qwen3"), "-o", str(out), "--outtype", "q8_0"])
    assert r.exit_code == 0, r.output
    assert out.is_file() and "wrote" in r.output
    bad = _copy("llama", tmp_path)
    (bad / "model.safetensors").unlink()
    r = CliRunner().invoke(main, ["convert", str(bad), "-o", str(tmp_path / "x.gguf")])
    assert r.exit_code == 1
    assert r.output.strip().startswith("error:") and r.output.strip().count("\n") == 0
