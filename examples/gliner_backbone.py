"""GLiNER 0.2.29 over our backbone (transformers 4.57.6: gliner requires transformers < 5.17).

Run (gliner 0.2.29 needs transformers < 5.17):
    PYTHONPATH=/tmp/gliner:.venv/transformers-4.57:. .venv/bin/python examples/gliner_backbone.py OUT_DIR
with /tmp/gliner from `pip install --no-deps --target /tmp/gliner gliner==0.2.29`.
"""

import sys
from pathlib import Path

import gliner
import torch
import transformers
from gliner import GLiNER, GLiNERConfig
from transformers import AutoTokenizer

from modeling_deberta_custom import DebertaCustomConfig, DebertaCustomModel, save_as_transformers

REPO = Path(__file__).resolve().parents[1]

root = sys.argv[1]
torch.manual_seed(0)
config = DebertaCustomConfig.from_json_file(REPO / "configuration" / "tiny.json")
tokenizer = AutoTokenizer.from_pretrained(REPO / "data" / "tokenizer")
config.vocab_size = len(tokenizer)
backbone = DebertaCustomModel(config).eval()
backbone.save_pretrained(f"{root}/ours")
tokenizer.save_pretrained(f"{root}/ours")
save_as_transformers(backbone, f"{root}/as_transformers")
tokenizer.save_pretrained(f"{root}/as_transformers")
text = "Alice met Bob in Paris on Monday to discuss the Acme merger."
labels = ["person", "city", "organization"]
for name in ("ours", "as_transformers"):
    torch.manual_seed(0)
    model = GLiNER.from_config(GLiNERConfig(model_name=f"{root}/{name}", max_len=64), backbone_from_pretrained=True)
    model.eval()
    encoder = model.model.token_rep_layer.bert_layer.model if hasattr(model.model, "token_rep_layer") else None
    print(name, "gliner", gliner.__version__, "backbone class:", type(encoder).__module__, type(encoder).__name__)
    entities = model.predict_entities(text, labels, threshold=0.0)
    print(name, "entities (untrained, threshold 0):", len(entities), entities[:2])
    model.save_pretrained(f"{root}/gliner_{name}")
    reloaded = GLiNER.from_pretrained(f"{root}/gliner_{name}", load_tokenizer=True).eval()
    again = reloaded.predict_entities(text, labels, threshold=0.0)
    print(name, "reloaded gives the same entities and scores:",
          [(e["text"], e["label"], round(e["score"], 6)) for e in again] == [(e["text"], e["label"], round(e["score"], 6)) for e in entities])
print("transformers", transformers.__version__, "torch", torch.__version__)
