"""torch.compile(dynamic=True): graphs compiled as the length grows, graph breaks, parity with eager.

Run:
    PYTHONPATH=. .venv/bin/python examples/compile_dynamic.py
"""

import time
from pathlib import Path

import torch
import transformers
from torch._dynamo.utils import counters

from modeling_deberta_custom import DebertaCustomConfig, DebertaCustomForSequenceClassification

REPO = Path(__file__).resolve().parents[1]

torch.manual_seed(0)
config = DebertaCustomConfig.from_json_file(REPO / "configuration" / "tiny.json")
config.num_labels = 2
model = DebertaCustomForSequenceClassification(config).eval()
compiled = torch.compile(model, dynamic=True)
print("torch", torch.__version__, "transformers", transformers.__version__, "attn", model.config._attn_implementation,
      "buckets", config.position_buckets, "max_position_embeddings", config.max_position_embeddings)
for length in [8, 16, 40, 64, 128, 200, 256, 300, 512, 600]:
    ids = torch.randint(5, config.vocab_size, (2, length))
    mask = torch.ones_like(ids)
    mask[1, length // 2:] = 0
    start = time.time()
    with torch.no_grad():
        got = compiled(input_ids=ids, attention_mask=mask).logits
        ref = model(input_ids=ids, attention_mask=mask).logits
    print(f"length {length:4d}: graphs so far {counters['stats']['unique_graphs']}, graph breaks "
          f"{sum(counters['graph_break'].values())}, max|compiled - eager| {float((got - ref).abs().max()):.1e}, "
          f"{time.time() - start:.1f} s")
print("graph breaks:", dict(counters["graph_break"]))
