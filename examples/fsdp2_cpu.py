"""torch FSDP2 (fully_shard) on CPU over gloo: each DebertaCustomLayer its own unit, then the root. 2 processes, 3 steps;
the sharded training must end with the parameters of plain single-process training on the whole batch.

Run:
    PYTHONPATH=. .venv/bin/torchrun --nproc_per_node 2 examples/fsdp2_cpu.py OUT_DIR
"""

import copy
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard

from modeling_deberta_custom import DebertaCustomConfig, DebertaCustomForSequenceClassification
from modeling_deberta_custom.modeling_deberta_custom import DebertaCustomLayer

REPO = Path(__file__).resolve().parents[1]

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)
config = DebertaCustomConfig.from_json_file(REPO / "configuration" / "tiny.json")
config.num_labels, config.hidden_dropout_prob, config.attention_probs_dropout_prob = 2, 0.0, 0.0
model = DebertaCustomForSequenceClassification(config)
reference = copy.deepcopy(model)
ids = torch.randint(5, config.vocab_size, (8, 24))
mask = torch.ones_like(ids)
labels = torch.randint(0, 2, (8,))
for module in model.modules():
    if isinstance(module, DebertaCustomLayer):
        fully_shard(module)
fully_shard(model)
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
shard = slice(rank * 8 // world, (rank + 1) * 8 // world)
for step in range(3):
    loss = model(input_ids=ids[shard], attention_mask=mask[shard], labels=labels[shard]).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    print(f"rank {rank} step {step} loss {loss.item():.6f}", flush=True)
state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
if rank == 0:
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-3)
    for _ in range(3):
        loss = reference(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        ref_opt.step()
        ref_opt.zero_grad()
    ref_state = reference.state_dict()
    worst = max(float((state[k] - ref_state[k]).abs().max()) for k in state)
    print(f"world {world}: {len(state)} tensors gathered; max |FSDP2 - single-process| parameter after 3 steps: {worst:.1e}")
    plain = DebertaCustomForSequenceClassification(config)
    plain.load_state_dict(state)
    plain.save_pretrained(sys.argv[1])
    back = DebertaCustomForSequenceClassification.from_pretrained(sys.argv[1]).eval()
    reference.eval()
    with torch.no_grad():
        print("saved folder vs reference logits:", float((back(input_ids=ids).logits - reference(input_ids=ids).logits).abs().max()))
dist.destroy_process_group()
