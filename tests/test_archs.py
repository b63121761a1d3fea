"""Every architecture against llama.cpp on tiny files made by llama.cpp's own converter.

tests/fixtures/archs holds, per architecture, an F32 GGUF that convert_hf_to_gguf.py wrote
from a tiny random Hugging Face checkpoint, and its Q8_0 copy from llama.cpp's quantizer
(scripts/make_arch_fixtures.py regenerates them). Both programs read the same file and the
same token ids (48: past every fixture's 16-token sliding window); llama.cpp runs with an
F32 KV cache.
"""

from __future__ import annotations

from pathlib import Path

import mlxllm  # noqa: F401  (first: puts an optimized BLAS under mlx.core)
import mlx.core as mx
import numpy as np
import pytest
from gguf import MODEL_ARCH_NAMES, MODEL_TENSORS, TENSOR_NAMES
from mlx.utils import tree_flatten

from arch_reference import (FIXTURES, MANIFEST, llama_cpp, llama_cpp_greedy, llama_cpp_logits, mlxllm_greedy,
                            mlxllm_logits, token_ids)
from mlxllm import kernels
from mlxllm.cache import batch_cache, batch_window
from mlxllm.kernels import cpu
from mlxllm.loader import load_model
from mlxllm.registry import REGISTRY

# The fixtures with F32 and Q8_0 files (files_kept lists the kinds a fixture commits when not
# all: qwen3moe-wide keeps only its Q4_K_M file, see EXTRA)
# Encoders return hidden states, not logits: tests/test_encoders.py checks those.
NAMES = sorted(n for n in MANIFEST if "f32" in MANIFEST[n].get("files_kept", ("f32",))
               and MANIFEST[n].get("kind") != "encoder")
F32_TOLERANCE = 5e-3  # max |Δlogit| as a fraction of the logits' std
# Q8_0: llama.cpp rounds activations to 8 bits before each product with a Q8_0 weight (we
# multiply in float32): measured mean |Δlogit| 0.01-0.04 of the std, 92-100% argmax
# agreement. The largest differences (up to one std) come from a router whose top-k that
# rounding flips, in the MoE fixtures.
Q8_MEAN_TOLERANCE = 0.08
Q8_AGREEMENT = 0.85
MOE = [n for n in NAMES if any(".ffn_gate_inp." in t for t in MANIFEST[n]["tensors"])]


@pytest.fixture(scope="module")
def runs():
    """Per (fixture, type): llama.cpp and mlxllm on the same file, loaded once."""
    cache = {}

    def get(name: str, kind: str):
        if (name, kind) not in cache:
            path = FIXTURES / f"{name}.{kind}.gguf"
            cache.clear()  # one pair at a time keeps the peak small
            cache[(name, kind)] = (llama_cpp(path), load_model(str(path))[0])
        return cache[(name, kind)]
    return get


@pytest.mark.parametrize("name", NAMES)
def test_f32_logits_match_llama_cpp(name, runs, fidelity_report):
    llm, model = runs(name, "f32")
    ids = token_ids(name)
    ref = llama_cpp_logits(llm, ids)
    std = ref.std()
    for chunk in (0, 7):  # the whole prompt at once, and through the KV cache in pieces
        ours = mlxllm_logits(model, ids, chunk)
        diff = np.abs(ours - ref).max() / std
        assert (ours.argmax(-1) == ref.argmax(-1)).all(), f"{name}: argmax differs (chunk {chunk})"
        assert diff <= F32_TOLERANCE, f"{name}: max |Δlogit| = {diff:.2e} × std (chunk {chunk})"
    fidelity_report.append((f"{name} F32", len(ids), "100.00%", f"{diff:.1e}×std"))


@pytest.mark.parametrize("name", NAMES)
def test_f32_greedy_continuation_matches_llama_cpp(name, runs):
    llm, model = runs(name, "f32")
    ids = token_ids(name, 24)
    assert mlxllm_greedy(model, ids) == llama_cpp_greedy(llm, ids)


@pytest.mark.parametrize("name", NAMES)
def test_q8_0_logits_near_llama_cpp(name, runs, fidelity_report):
    llm, model = runs(name, "q8_0")
    ids = token_ids(name)
    ref = llama_cpp_logits(llm, ids)
    ours = mlxllm_logits(model, ids)
    diff = np.abs(ours - ref) / ref.std()
    agree = (ours.argmax(-1) == ref.argmax(-1)).mean()
    assert diff.mean() <= Q8_MEAN_TOLERANCE and agree >= Q8_AGREEMENT, \
        f"{name} Q8_0: mean {diff.mean():.3f} × std, argmax {agree:.1%}"
    fidelity_report.append((f"{name} Q8_0", len(ids), f"{agree:.2%}", f"{diff.max():.1e}×std"))


@pytest.mark.parametrize("blocks", ["1", "0"], ids=["gguf_blocks", "mlx_layouts"])
@pytest.mark.parametrize("name", MOE)
def test_quantized_experts_equal_their_float_image(name, blocks, monkeypatch):
    """Experts kept in Q8_0 compute what the same weights widened to float32 compute: as
    GGUF blocks (the default: gguf_gather_matvec reads the chosen experts' rows in place)
    and in MLX's affine layout (affine_gather_matvec, gather_qmm). The 2-D weights follow
    the same setting; their products take float activations (MLXLLM_CPU_ACTIVATIONS=float;
    the default 16-bit blocks are checked against float64 per product in
    test_block_kernels.py and end to end in test_other_quantizations_near_llama_cpp)."""
    monkeypatch.setenv("MLXLLM_CPU_BLOCKS", blocks)
    monkeypatch.setenv("MLXLLM_CPU_ACTIVATIONS", "float")
    path = str(FIXTURES / f"{name}.q8_0.gguf")
    ids = token_ids(name)
    quantized_model = load_model(path, dense=False)[0]
    dense = mlxllm_logits(load_model(path, dense=True)[0], ids)
    for chunk in (0, 7):  # a prompt's rows grouped by expert; a few rows' experts per row (decode)
        quantized = mlxllm_logits(quantized_model, ids, chunk)
        assert np.abs(quantized - dense).max() <= 1e-4 * dense.std(), f"chunk {chunk}"


def _leaf(template: str) -> str:
    return template.replace("blk.{bid}.", "blk.N.")


@pytest.mark.parametrize("name", NAMES)
def test_parameter_names_are_gguf_py_names(name):
    """Every parameter of the model is a tensor name gguf-py lists for its architecture."""
    path = FIXTURES / f"{name}.f32.gguf"
    model, gf, arch, _ = load_model(str(path))
    gguf_arch = next(a for a, n in MODEL_ARCH_NAMES.items() if n == gf.architecture)
    allowed = {_leaf(TENSOR_NAMES[t]) for t in MODEL_TENSORS[gguf_arch]}
    for param, _ in tree_flatten(model.parameters()):
        parts = param.split(".")
        if parts[0] == "blk":
            parts[1] = "N"
        # the name without its suffix (.weight, .bias), or whole: Mamba's blk.N.ssm_a has none
        base = ".".join(parts)
        assert base.rsplit(".", 1)[0] in allowed or base in allowed, \
            f"{name}: {param} is not in gguf-py's MODEL_TENSORS[{gguf_arch.name}]"


def test_every_fixture_architecture_is_registered():
    registered = {e.name for e in REGISTRY.all()}
    assert {MANIFEST[n]["gguf_arch"] for n in NAMES} <= registered
    assert len(registered) >= 33


@pytest.mark.skipif(cpu.KERNELS is None, reason=f"CPU kernels unavailable: {cpu.UNAVAILABLE}")
@pytest.mark.parametrize("bits", [None, 16])  # float32 storage; float16 (--kv-bits 16)
@pytest.mark.parametrize("name", ["llama", "qwen3", "cohere2"])  # plain; q/k norms; sliding and NoPE layers
def test_decode_attention_kernels_equal_the_separate_ops(name, bits, monkeypatch):
    """The generation loop's decode attention (kernels.cached_attention: the cache written in
    place, q/k norms and rotation inside) against the separate ops it replaces, bit for bit:
    two prompts of different lengths in one batch (left padding: a mask per row, each row at
    its own positions), then 24 single-token steps, past the fixtures' 16-token window. With
    a float16 cache the kernels round each entry as astype(float16) does and widen it exactly."""
    model = load_model(str(FIXTURES / f"{name}.f32.gguf"))[0]
    prompts = [token_ids(name, 20), token_ids(name, 13)]
    pads = [20 - len(p) for p in prompts]
    taken = []  # what each call of the kernels returned (None: not taken)
    fused = kernels.cached_attention

    def counted(*args, **kwargs):
        taken.append(fused(*args, **kwargs))
        return taken[-1]

    monkeypatch.setattr(kernels, "cached_attention", counted)

    def logits() -> mx.array:
        caches = [batch_cache(batch_window(kind), bits) for kind in model.make_cache()]
        for c in caches:
            c.start_padded(pads)
        out = [model(mx.array([[0] * p + ids for p, ids in zip(pads, prompts)]), caches)[:, -1]]
        for _ in range(24):
            out.append(model(mx.argmax(out[-1], axis=-1)[:, None], caches)[:, -1])
            mx.eval(out[-1])
        return mx.stack(out)

    one_op = logits()
    assert sum(t is not None for t in taken) >= 24, "decode did not take the cache-writing kernels"
    monkeypatch.setattr(kernels, "CACHED_ATTENTION", False)
    separate = logits()
    assert mx.array_equal(one_op, separate).item()
    if bits == 16:  # the halves did round: not the float32 cache's logits, but near them
        monkeypatch.setattr(kernels, "CACHED_ATTENTION", True)
        bits = None
        full = logits()
        assert not mx.array_equal(full, separate).item()
        assert mx.abs(full - separate).max().item() < 1e-2 * mx.std(full).item()


def test_latent_attention_caches_only_the_latent():
    """deepseek2's cache holds kv_lora_rank + rope dims per token and layer, not full keys
    and values per head (what makes MLA's long contexts cheap)."""
    import mlx.core as mx
    model, gf, *_ = load_model(str(FIXTURES / "deepseek2.f32.gguf"))
    cache = model.make_cache()
    model(mx.array([token_ids("deepseek2", 20)]), cache=cache)
    m = gf.metadata
    per_token = (m["attention.kv_lora_rank"] + m["rope.dimension_count"]) * 4  # float32
    held = sum(k.nbytes + v.nbytes for k, v in (c.state for c in cache))
    assert held == 20 * per_token * len(cache)


EXTRA = [(n, q) for n in sorted(MANIFEST) for q in MANIFEST[n].get("extra_quants", ())]


def _llama_quantize(src: Path, dst: Path, ftype: str) -> Path:
    """`src` written by llama.cpp's quantizer as file type `ftype` (LLAMA_FTYPE_<ftype>)."""
    import llama_cpp as lc

    params = lc.llama_model_quantize_default_params()
    params.ftype, params.allow_requantize, params.nthread = getattr(lc, f"LLAMA_FTYPE_{ftype}"), True, 2
    assert lc.llama_model_quantize(str(src).encode(), str(dst).encode(), params) == 0
    return dst


def _float32_copy(src: Path, dst: Path) -> Path:
    """llama.cpp's own dequantization of `src`."""
    return _llama_quantize(src, dst, "ALL_F32")


@pytest.mark.parametrize(("name", "quant"), EXTRA, ids=[f"{n}-{q}" for n, q in EXTRA])
def test_other_quantizations_near_llama_cpp(name, quant, tmp_path, monkeypatch):
    """Further types llama.cpp's quantizer wrote (gpt-oss's experts in MXFP4; qwen3moe-wide
    in Q4_K_M: Q4_K and Q6_K experts). Near llama.cpp on the file (measured on
    qwen3moe-wide: mean |Δlogit| 0.025 of the std, 90% argmax, exactly what llama.cpp's
    8-bit activation rounding moves llama.cpp itself against its float32 copy of the file);
    equal to llama.cpp on that float32 copy (measured 1e-5 of the std); the kept layout
    equal to its float32 image, for a whole prompt (rows grouped by expert) and through the
    cache (decode's expert matvecs); both with the default 16-bit activation blocks and with
    float activations (the float32 image: float only)."""
    path = FIXTURES / f"{name}.{quant}.gguf"
    ids = token_ids(name)
    ref = llama_cpp_logits(llama_cpp(path), ids)
    exact = llama_cpp_logits(llama_cpp(_float32_copy(path, tmp_path / "f32.gguf")), ids)
    default = mlxllm_logits(load_model(str(path), dense=False)[0], ids)
    monkeypatch.setenv("MLXLLM_CPU_ACTIVATIONS", "float")
    kept = mlxllm_logits(load_model(str(path), dense=False)[0], ids)
    for ours in (default, kept):  # against the float32 copy, max |Δ| 5e-4 of the std in the default, 1e-5 in float
        diff = np.abs(ours - ref) / ref.std()
        assert diff.mean() <= Q8_MEAN_TOLERANCE and (ours.argmax(-1) == ref.argmax(-1)).mean() >= Q8_AGREEMENT
        assert (ours.argmax(-1) == exact.argmax(-1)).all()
        assert np.abs(ours - exact).max() <= F32_TOLERANCE * exact.std()
    dense = mlxllm_logits(load_model(str(path), dense=True)[0], ids)
    for blocks in ("1", "0"):  # the experts as GGUF blocks (the default), then in MLX's layouts
        monkeypatch.setenv("MLXLLM_CPU_BLOCKS", blocks)
        kept_model = load_model(str(path), dense=False)[0]
        for chunk in (0, 7):
            kept = mlxllm_logits(kept_model, ids, chunk)
            assert np.abs(kept - dense).max() <= 1e-4 * dense.std(), f"blocks {blocks}, chunk {chunk}"


# Dense, learned positions, an SSM (its small matrices stay float), experts (3-D).
HALF_SAMPLE = ["llama", "gpt2", "mamba", "olmoe"]


def _cpu_reads_as_stored(ftype: str) -> bool:
    """Whether this build's CPU kernels read matrices of `ftype` as stored (AVX2)."""
    from gguf import GGMLQuantizationType

    from mlxllm.kernels import cpu

    return cpu.active() is not None and cpu.KERNELS.gguf_float_kernel(int(GGMLQuantizationType[ftype]))


@pytest.mark.parametrize("ftype", ["F16", "BF16"])
@pytest.mark.parametrize("name", HALF_SAMPLE)
def test_half_precision_files(name, ftype, tmp_path, monkeypatch, fidelity_report):
    """llama.cpp's quantizer writes the F32 fixture as F16 / BF16. Its matrices load as the
    file's halves where the CPU kernels read them (memory = file, not twice it), computing
    what their float32 image computes for a whole prompt and through the cache; and the
    logits are near llama.cpp's on the same file (which rounds the activations to the
    weights' half type before each product: measured below)."""
    from gguf import GGMLQuantizationType

    path = _llama_quantize(FIXTURES / f"{name}.f32.gguf", tmp_path / f"{name}.{ftype.lower()}.gguf", f"MOSTLY_{ftype}")
    ids = token_ids(name)
    model = load_model(str(path))[0]
    halves = [m for _, m in model.named_modules() if getattr(m, "qtype", None) == GGMLQuantizationType[ftype]]
    if _cpu_reads_as_stored(ftype):
        assert halves and all(m.mode == "packed" for m in halves)
    monkeypatch.setenv("MLXLLM_CPU_BLOCKS", "0")  # every tensor as float32
    image = mlxllm_logits(load_model(str(path))[0], ids)
    for chunk in (0, 7):
        ours = mlxllm_logits(model, ids, chunk)
        assert np.abs(ours - image).max() <= 1e-4 * image.std(), f"chunk {chunk}"
    ref = llama_cpp_logits(llama_cpp(path), ids)
    diff = np.abs(ours - ref) / ref.std()
    agree = (ours.argmax(-1) == ref.argmax(-1)).mean()
    assert diff.mean() <= Q8_MEAN_TOLERANCE and agree >= Q8_AGREEMENT, f"mean {diff.mean():.3f} × std, argmax {agree:.1%}"
    fidelity_report.append((f"{name} {ftype}", len(ids), f"{agree:.2%}", f"{diff.max():.1e}×std"))


def test_half_precision_tensors_a_model_reads_as_floats(tmp_path):
    """RWKV6's fixture rewritten with every tensor of 2+ dimensions whose rows hold whole
    groups of 32 as F16: its layers' weights stay halves, and its 3-D mixing weights, which
    are not a layer's weight, load as floats; the logits are the F32 file's to the weights'
    rounding."""
    import mlx.core as mx
    from gguf import GGMLQuantizationType

    src = FIXTURES / "rwkv6.f32.gguf"
    halves = []

    def as_f16(name: str, shape: list[int]) -> GGMLQuantizationType | None:
        if len(shape) >= 2 and shape[-1] % 32 == 0:
            halves.append(name)
            return GGMLQuantizationType.F16
        return None

    dst = _with_metadata(src, tmp_path / "rwkv6.f16.gguf", {}, as_f16)
    assert any("time_mix_decay_w1" in n for n in halves) and any("time_mix_w2" in n for n in halves)
    ids = token_ids("rwkv6")
    ref = mlxllm_logits(load_model(str(src))[0], ids)
    model = load_model(str(dst))[0]
    params = dict(tree_flatten(model.parameters()))
    assert params["blk.0.time_mix_w2.weight"].dtype == mx.float32  # 3-D, read as plain floats
    if _cpu_reads_as_stored("F16"):
        assert dict(model.named_modules())["blk.0.time_mix_decay_w1"].qtype.name == "F16"
    ours = mlxllm_logits(model, ids)
    assert (ours.argmax(-1) == ref.argmax(-1)).mean() >= 0.95
    assert np.abs(ours - ref).max() <= 0.05 * ref.std()  # the weights' half-precision rounding


def test_a_quantized_tensor_read_as_floats_is_a_clear_error(tmp_path):
    """A quantized type where the model needs plain floats (a norm's weight in Q8_0): one
    line naming the tensor, before anything runs. (F16 / BF16 there are widened instead.)"""
    from gguf import GGMLQuantizationType

    from mlxllm.loader import LoadError

    path = _with_metadata(FIXTURES / "llama.f32.gguf", tmp_path / "q8-norm.gguf", {},
                          lambda name, shape: GGMLQuantizationType.Q8_0 if name == "output_norm.weight" else None)
    with pytest.raises(LoadError, match=r"tensor 'output_norm.weight' is Q8_0, but llama needs it as floats"):
        load_model(str(path))


def test_fp4_file_stays_blocks_on_the_cpu(monkeypatch):
    """A file with MXFP4 experts is not widened to float32 by default where the CPU kernels
    read its blocks; with MLX's layouts instead (MLXLLM_CPU_BLOCKS=0, which MLX's CPU reads
    slowly) it is, as it fits in memory."""
    from mlxllm.gguf import GGUFFile
    from mlxllm.kernels import cpu
    from mlxllm.loader import dense_by_default

    if cpu.active() is None or not cpu.KERNELS.gguf_float_kernel(39):  # MXFP4
        pytest.skip("no CPU float kernels for MXFP4 blocks in this build")
    with GGUFFile(str(FIXTURES / "gpt-oss.mxfp4_moe.gguf")) as gf:
        assert not dense_by_default(gf)
        monkeypatch.setenv("MLXLLM_CPU_BLOCKS", "0")
        assert dense_by_default(gf)


def test_wide_moe_fixture_holds_k_quant_experts():
    """qwen3moe-wide's Q4_K_M file really holds k-quant experts (gguf-py reads the types)."""
    import gguf

    reader = gguf.GGUFReader(FIXTURES / "qwen3moe-wide.q4_k_m.gguf")
    experts = {t.name: t.tensor_type.name for t in reader.tensors if "_exps." in t.name}
    assert set(experts.values()) == {"Q4_K", "Q6_K"}, experts


def _with_metadata(src: Path, out: Path, changes: dict, retype=lambda name, shape: None) -> Path:
    """A copy of a fixture with some metadata values replaced and each float tensor for which
    `retype(name, numpy shape)` names a type written in that type (gguf-py reads, quantizes
    and writes it)."""
    import gguf

    reader = gguf.GGUFReader(src)
    writer = gguf.GGUFWriter(out, reader.fields["general.architecture"].contents())
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        value = changes.get(field.name, field.contents())
        sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, value, field.types[0], sub_type=sub)
    for t in reader.tensors:
        shape = [int(x) for x in reversed(t.shape)]
        qtype = retype(t.name, shape) if t.tensor_type == gguf.GGMLQuantizationType.F32 else None
        if qtype is not None:
            data = gguf.quants.quantize(np.array(t.data).reshape(shape), qtype)
            writer.add_tensor(t.name, data, raw_shape=list(data.shape), raw_dtype=qtype)  # in bytes per row
        else:
            writer.add_tensor(t.name, np.array(t.data), raw_shape=shape, raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


@pytest.mark.parametrize(("key", "value", "message"), [
    ("qwen3.attention.head_count", 0, "must be positive"),
    ("qwen3.block_count", 10 ** 9, "does not match the 2 blocks"),
    ("qwen3.attention.head_count_kv", 3, "must divide head_count"),
])
def test_absurd_metadata_is_a_clear_error(tmp_path, key, value, message):
    from mlxllm.loader import LoadError

    path = _with_metadata(FIXTURES / "qwen3.f32.gguf", tmp_path / "bad.gguf", {key: value})
    with pytest.raises(LoadError, match=message):
        load_model(str(path))
