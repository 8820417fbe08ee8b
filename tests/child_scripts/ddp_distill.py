"""Distillation under DDP: run by test_distillation with `torchrun --nproc_per_node 2 ddp_distill.py OUT_DIR`
(tests/ on PYTHONPATH). Accumulation, checkpointing and the relation terms; writes OUT_DIR/ddp.json."""

import json
import os
import sys

import torch
from helpers import STUDENT, TEACHER, FirstTokenTask, first_token_classifier
from transformers import Trainer, TrainingArguments

from modeling_deberta_custom.training.distillation import DistillationCallback

model = first_token_classifier(**STUDENT)
args = TrainingArguments(output_dir=sys.argv[1], per_device_train_batch_size=8, max_steps=4, learning_rate=1e-2,
                         logging_steps=2, report_to="none", save_strategy="no", use_cpu=True, disable_tqdm=True,
                         gradient_accumulation_steps=2, activation_checkpointing=True)
callback = DistillationCallback(first_token_classifier(1, **TEACHER), relation_weight=1.0)
trainer = Trainer(model=model, args=args, train_dataset=FirstTokenTask(), callbacks=[callback])
trainer.train()
flat = torch.cat([p.detach().flatten() for p in model.parameters()])
gathered = [torch.zeros_like(flat) for _ in range(args.world_size)]
torch.distributed.all_gather(gathered, flat)
if args.process_index == 0:
    with open(sys.argv[1] + "/ddp.json", "w") as handle:
        json.dump(dict(world_size=args.world_size, max_difference=float((gathered[0] - gathered[1]).abs().max()),
                       log_history=trainer.state.log_history), handle)
# Leave the process group, then exit without the interpreter's teardown: a native thread still alive at static
# destruction aborts a finished process now and then ("terminate called without an active exception"; 2 of 4
# distillation runs on 2026-12-04, even after destroy_process_group). Everything this script writes is closed above.
torch.distributed.barrier()
torch.distributed.destroy_process_group()
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
