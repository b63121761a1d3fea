"""The architecture registry: built-ins through entry points, a real third-party plugin
installed with pip, conflicting and broken plugins, unknown architectures."""

import json
import subprocess
import sys
import textwrap

import mlx.core as mx
import numpy as np
import pytest
from gguf import GGUFWriter

from mlxllm.loader import load_model
from mlxllm.registry import GROUP, REGISTRY, ArchError, Registry

PLUGIN_DIR = __import__("pathlib").Path(__file__).parent / "plugins" / "tinylm"


def cli(*args):
    return subprocess.run([sys.executable, "-m", "mlxllm", *args], capture_output=True, text=True)


def pip(*args):
    subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *args], check=True)


def test_builtin_llama_is_registered_through_entry_points():
    reg = Registry()
    assert reg.entries["llama"].distributions == ["mlxllm"]
    assert reg.get("llama").name == "llama"


def test_modules_load_lazily():
    reg = Registry()
    _ = reg.entries  # discovery reads entry points only
    assert all(e.arch is None for e in reg.entries.values())
    reg.get("llama")
    assert reg.entries["llama"].arch is not None


def test_unknown_architecture_lists_known_and_says_how_to_add():
    with pytest.raises(ArchError) as e:
        Registry().get("no-such-arch")
    msg = str(e.value)
    assert "unknown architecture 'no-such-arch'" in msg and "llama" in msg and GROUP in msg


def fake_distribution(root, dist, version, entry_points: dict, modules: dict):
    """A real installed-distribution layout (dist-info + modules) in a sys.path folder."""
    info = root / f"{dist.replace('-', '_')}-{version}.dist-info"  # normalized, as pip writes it
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    lines = "\n".join(f"{k} = {v}" for k, v in entry_points.items())
    (info / "entry_points.txt").write_text(f"[{GROUP}]\n{lines}\n")
    for name, source in modules.items():
        (root / f"{name}.py").write_text(textwrap.dedent(source))


PLUGIN_SOURCE = """
    from mlxllm import Arch
    class A:
        @classmethod
        def from_gguf(cls, gf): return cls()
    ARCH = Arch(name={name!r}, args=A, model=object, aliases={aliases!r})
"""


def test_two_distributions_claiming_one_name_is_an_error_naming_both(tmp_path, monkeypatch):
    fake_distribution(tmp_path, "pkg-one", "1.0", {"dup": "dup_one"}, {"dup_one": PLUGIN_SOURCE.format(name="dup", aliases=())})
    fake_distribution(tmp_path, "pkg-two", "1.0", {"dup": "dup_two"}, {"dup_two": PLUGIN_SOURCE.format(name="dup", aliases=())})
    monkeypatch.syspath_prepend(str(tmp_path))
    reg = Registry()
    with pytest.raises(ArchError) as e:
        reg.get("dup")
    assert "pkg-one" in str(e.value) and "pkg-two" in str(e.value)
    assert reg.get("llama").name == "llama"  # the rest keep working


def test_broken_plugin_is_reported_and_others_keep_working(tmp_path, monkeypatch, caplog):
    fake_distribution(tmp_path, "broken-plugin", "0.1", {"broken": "broken_mod", "good": "good_mod"},
                      {"broken_mod": "raise ImportError('needs libfoo')",
                       "good_mod": PLUGIN_SOURCE.format(name="good", aliases=("good-alias",))})
    monkeypatch.syspath_prepend(str(tmp_path))
    reg = Registry()
    entries = {e.name: e for e in reg.all()}
    assert "needs libfoo" in entries["broken"].error and "broken-plugin" in entries["broken"].error
    assert entries["good"].error is None and reg.get("good-alias").name == "good"
    assert reg.get("llama").name == "llama"
    with pytest.raises(ArchError, match="needs libfoo"):
        reg.get("broken")


def test_cli_archs_lists_builtins():
    r = cli("archs", "--json")
    assert r.returncode == 0
    rows = {row["name"]: row for row in json.loads(r.stdout)}
    assert rows["llama"]["distribution"] == "mlxllm" and rows["llama"]["error"] is None


def write_tinylm(path, vocab=50, dim=32, hidden=64, layers=2, quantized=True):
    """A tinylm GGUF written by gguf-py, with one Q8_0 matrix when `quantized`."""
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import quantize
    rng = np.random.default_rng(0)
    w = GGUFWriter(str(path), "tinylm")
    w.add_embedding_length(dim); w.add_feed_forward_length(hidden); w.add_block_count(layers)
    weights = {"token_embd.weight": rng.standard_normal((vocab, dim)).astype(np.float32),
               "output_norm.weight": np.ones(dim, np.float32),
               "output.weight": rng.standard_normal((vocab, dim)).astype(np.float32) * 0.1}
    for i in range(layers):
        weights[f"blk.{i}.ffn_norm.weight"] = np.ones(dim, np.float32)
        weights[f"blk.{i}.ffn_up.weight"] = rng.standard_normal((hidden, dim)).astype(np.float32) * 0.1
        weights[f"blk.{i}.ffn_down.weight"] = rng.standard_normal((dim, hidden)).astype(np.float32) * 0.1
    for name, value in weights.items():
        if quantized and name == "blk.0.ffn_up.weight":
            w.add_tensor(name, quantize(value, Q.Q8_0), raw_dtype=Q.Q8_0)
        else:
            w.add_tensor(name, value)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    return weights


def reference_tinylm(weights, tokens, layers, eps=1e-5):
    """The plugin's forward pass in numpy, on the weights as written (before Q8_0)."""
    def rms(x, g):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * g
    h = weights["token_embd.weight"][tokens]
    for i in range(layers):
        y = rms(h, weights[f"blk.{i}.ffn_norm.weight"]) @ weights[f"blk.{i}.ffn_up.weight"].T
        h = h + np.maximum(y, 0) @ weights[f"blk.{i}.ffn_down.weight"].T
    return rms(h, weights["output_norm.weight"]) @ weights["output.weight"].T


@pytest.fixture(scope="module")
def installed_plugin():
    pip("install", "--no-deps", "--no-build-isolation", str(PLUGIN_DIR))
    REGISTRY.refresh()  # this process discovered plugins before the install
    yield
    pip("uninstall", "-y", "mlxllm-tinylm")
    REGISTRY.refresh()


def test_third_party_plugin_is_discovered_listed_instantiated_and_removed(installed_plugin, tmp_path):
    # Discovered and listed, by a fresh process as a user would see it.
    r = cli("archs", "--json")
    rows = {row["name"]: row for row in json.loads(r.stdout)}
    assert rows["tinylm"]["distribution"] == "mlxllm-tinylm"
    assert rows["tinylm"]["aliases"] == ["tiny-lm"] and rows["tinylm"]["error"] is None

    # Instantiated from a GGUF file and run; its output matches the same model in numpy.
    path = tmp_path / "tiny.gguf"
    weights = write_tinylm(path)
    model, gf, arch, _ = load_model(str(path))
    assert arch.name == "tinylm" and type(model).__module__ == "mlxllm_tinylm"
    tokens = np.array([[3, 1, 4, 1, 5]])
    logits = np.array(model(mx.array(tokens)))
    assert logits.shape == (1, 5, 50)
    np.testing.assert_allclose(logits, reference_tinylm(weights, tokens, 2), rtol=0.05, atol=0.05)
    r = cli("show", str(path))
    assert r.returncode == 0 and "tinylm" in r.stdout

    # Uninstalled: gone.
    pip("uninstall", "-y", "mlxllm-tinylm")
    REGISTRY.refresh()
    r = cli("archs", "--json")
    assert "tinylm" not in {row["name"] for row in json.loads(r.stdout)}
    reg = Registry()
    with pytest.raises(ArchError, match="unknown architecture 'tinylm'"):
        reg.get("tinylm")


MULTI_SOURCE = """
    from mlxllm import Arch
    def hparams(gf): return None
    ARCHS = (Arch(name="fam-a", args=hparams, model=object), Arch(name="fam-b", args=hparams, model=object))
"""


def test_one_module_serves_several_names_and_a_missing_one_is_reported(tmp_path, monkeypatch):
    fake_distribution(tmp_path, "pkg-fam", "1.0", {"fam-a": "fam", "fam-b": "fam", "fam-c": "fam"},
                      {"fam": MULTI_SOURCE})
    monkeypatch.syspath_prepend(str(tmp_path))
    reg = Registry()
    assert reg.get("fam-a").name == "fam-a" and reg.get("fam-b").name == "fam-b"
    with pytest.raises(ArchError) as e:
        reg.get("fam-c")
    assert "declares 'fam-a', 'fam-b' but is registered as 'fam-c'" in str(e.value)


def test_builtin_families_share_modules():
    reg = Registry()
    assert reg.entries["qwen2"].targets == reg.entries["qwen3"].targets == ["mlxllm.archs.qwen"]
    assert reg.get("olmo2").hf_architectures == ("Olmo2ForCausalLM", "Olmo3ForCausalLM")
