"""ONNX through optimum's main_export with a custom ONNX config (optimum-onnx 0.1.0, transformers 4.57.6).

Run (optimum-onnx needs transformers < 4.58; here both sit in side folders, as PYTHONPATH):
    PYTHONPATH=/tmp/optimum:.venv/transformers-4.57:. .venv/bin/python examples/onnx_optimum.py OUT_MODEL OUT_ONNX
with /tmp/optimum from `pip install --no-deps --target /tmp/optimum optimum==2.1.0 optimum-onnx==0.1.0`.
"""

import sys
from pathlib import Path

import numpy as np
import onnxruntime
import torch
import transformers
from optimum.exporters.onnx import main_export
from optimum.exporters.onnx.config import TextEncoderOnnxConfig
from optimum.utils import NormalizedTextConfig

from modeling_deberta_custom import DebertaCustomConfig, DebertaCustomForSequenceClassification

REPO = Path(__file__).resolve().parents[1]


class DebertaCustomOnnxConfig(TextEncoderOnnxConfig):
    NORMALIZED_CONFIG_CLASS = NormalizedTextConfig
    DEFAULT_ONNX_OPSET = 17

    @property
    def inputs(self):
        axes = {0: "batch_size", 1: "sequence_length"}
        names = ["input_ids", "attention_mask"] + (["token_type_ids"] if self._config.type_vocab_size else [])
        return {name: axes for name in names}

folder, out = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
config = DebertaCustomConfig.from_json_file(REPO / "configuration" / "tiny.json")
config.num_labels = 3
model = DebertaCustomForSequenceClassification(config).eval()
model.save_pretrained(folder)
onnx_config = DebertaCustomOnnxConfig(model.config, task="text-classification")
main_export(folder, output=out, task="text-classification", custom_onnx_configs={"model": onnx_config},
            no_post_process=True, do_validation=True, library_name="transformers", trust_remote_code=True)
session = onnxruntime.InferenceSession(f"{out}/model.onnx")
worst = 0.0
for batch, length in [(1, 5), (3, 17), (2, 100)]:
    ids = torch.randint(5, config.vocab_size, (batch, length))
    mask = torch.ones_like(ids)
    mask[0, length // 2:] = 0
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits.numpy()
    got = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
    worst = max(worst, float(np.abs(got - ref).max()))
print("transformers", transformers.__version__, "torch", torch.__version__, "onnxruntime", onnxruntime.__version__)
print("max |onnxruntime - torch| over (1,5) (3,17) (2,100):", worst)
