"""DeepSpeed ZeRO-2 / ZeRO-3 through the Trainer on CPU (DS_ACCELERATOR=cpu), 2 processes, a few steps, save, reload.

Run (stage 2 or 3):
    DS_ACCELERATOR=cpu PYTHONPATH=/tmp/deepspeed:. .venv/bin/torchrun --nproc_per_node 2 scripts/integrations/deepspeed_cpu.py 2 OUT_DIR
with /tmp/deepspeed from `pip install --no-deps --target /tmp/deepspeed deepspeed==0.19.8 hjson msgpack ninja py-cpuinfo einops`.
"""

import sys
from pathlib import Path

import torch
import transformers
from datasets import Dataset
from transformers import Trainer, TrainingArguments

from modeling_deberta_custom import DebertaCustomConfig, DebertaCustomForSequenceClassification

REPO = Path(__file__).resolve().parents[2]

stage, out = int(sys.argv[1]), sys.argv[2]
torch.manual_seed(0)
config = DebertaCustomConfig.from_json_file(REPO / "configuration" / "tiny.json")
config.num_labels = 2
model = DebertaCustomForSequenceClassification(config)
g = torch.Generator().manual_seed(0)
data = Dataset.from_dict({"input_ids": torch.randint(5, config.vocab_size, (32, 24), generator=g).tolist(),
                          "labels": torch.randint(0, 2, (32,), generator=g).tolist()})
ds_config = {"zero_optimization": {"stage": stage}, "train_micro_batch_size_per_gpu": "auto",
             "gradient_accumulation_steps": "auto",
             "gradient_clipping": "auto"}  # no "train_batch_size": "auto"; no "optimizer": the Trainer's torch AdamW (DeepSpeed's CPU Adam is a C++ build)
args = TrainingArguments(output_dir=out, max_steps=4, per_device_train_batch_size=4, learning_rate=1e-3,
                         deepspeed=ds_config, report_to="none", logging_steps=1, save_strategy="no",
                         disable_tqdm=True, dataloader_num_workers=0)
trainer = Trainer(model=model, args=args, train_dataset=data)
result = trainer.train()
trainer.save_model(out)
if trainer.is_world_process_zero():
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    print(f"ZeRO-{stage} world {trainer.args.world_size} losses {losses}")
    back = DebertaCustomForSequenceClassification.from_pretrained(out).eval()
    print("reloaded", type(back).__name__, "finite logits:", bool(torch.isfinite(back(input_ids=torch.tensor(data['input_ids'][:2])).logits).all()))
    print("transformers", transformers.__version__, "deepspeed", __import__("deepspeed").__version__)
