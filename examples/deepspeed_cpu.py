"""DeepSpeed ZeRO-2 / ZeRO-3 through the Trainer on CPU (DS_ACCELERATOR=cpu), 2 processes, a few steps, save, reload.

Run (stage 2 or 3):
    DS_ACCELERATOR=cpu PYTHONPATH=/tmp/deepspeed:. .venv/bin/torchrun --nproc_per_node 2 examples/deepspeed_cpu.py 2 OUT_DIR
with /tmp/deepspeed from `pip install --no-deps --target /tmp/deepspeed deepspeed==0.19.8 hjson msgpack ninja py-cpuinfo einops`.
"""

import sys
from pathlib import Path

import torch
import transformers
from datasets import Dataset
from transformers import Trainer, TrainingArguments
from transformers.integrations.deepspeed import unset_hf_deepspeed_config

from modeling_deberta_custom import DebertaCustomConfig, DebertaCustomForSequenceClassification

REPO = Path(__file__).resolve().parents[1]

stage, out = int(sys.argv[1]), sys.argv[2]
torch.manual_seed(0)
config = DebertaCustomConfig.from_json_file(REPO / "configuration" / "tiny.json")
config.num_labels = 2
model = DebertaCustomForSequenceClassification(config)
g = torch.Generator().manual_seed(0)
data = Dataset.from_dict({"input_ids": torch.randint(5, config.vocab_size, (32, 24), generator=g).tolist(),
                          "labels": torch.randint(0, 2, (32,), generator=g).tolist()})
# ZeRO-3 keeps each parameter sharded: save_model writes full weights only with stage3_gather_16bit_weights_on_model_save.
zero = {"stage": stage, **({"stage3_gather_16bit_weights_on_model_save": True} if stage == 3 else {})}
ds_config = {"zero_optimization": zero, "train_micro_batch_size_per_gpu": "auto",
             "gradient_accumulation_steps": "auto",
             "gradient_clipping": "auto"}  # no "train_batch_size": "auto"; no "optimizer": the Trainer's torch AdamW (DeepSpeed's CPU Adam is a C++ build)
args = TrainingArguments(output_dir=out, max_steps=4, per_device_train_batch_size=4, learning_rate=1e-3,
                         deepspeed=ds_config, use_cpu=True, report_to="none", logging_steps=1, save_strategy="no",
                         disable_tqdm=True, dataloader_num_workers=0)
trainer = Trainer(model=model, args=args, train_dataset=data)
result = trainer.train()
probe = data.select(range(4))
trained_logits = torch.as_tensor(trainer.predict(probe).predictions)  # through the DeepSpeed engine, every rank
trainer.save_model(out)
if trainer.is_world_process_zero():
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    engine = type(trainer.model_wrapped)
    print(f"ZeRO-{stage} world {trainer.args.world_size} deepspeed {trainer.is_deepspeed_enabled} "
          f"engine {engine.__module__}.{engine.__name__} losses {losses}")
    # In a ZeRO-3 process from_pretrained builds the model under deepspeed.zero.Init (collective, every rank): load the
    # saved folder as a fresh process would.
    unset_hf_deepspeed_config()
    back = DebertaCustomForSequenceClassification.from_pretrained(out).eval()
    with torch.no_grad():
        reloaded_logits = back(input_ids=torch.tensor(probe["input_ids"])).logits
    print(f"reloaded {type(back).__name__}: max |reloaded - trained engine| logits "
          f"{float((reloaded_logits - trained_logits).abs().max()):.1e}")
    print("transformers", transformers.__version__, "deepspeed", __import__("deepspeed").__version__)
