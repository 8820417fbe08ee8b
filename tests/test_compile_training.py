"""A training step compiles whole: forward and loss under torch.compile(fullgraph=True, dynamic=True) (a graph break
is an error), backward through the compiled graph, with the eager loss and gradients; and batches with different
numbers of masked positions reuse one graph (no shape depends on the data).

backend="aot_eager" traces forward and backward as inductor would but skips code generation (about a minute per
graph on two cores). One-layer models keep tracing short; the Enhanced Mask Decoder then reads the embeddings as its
second-to-last layer, which exercises the same code."""

import pytest
import torch
from helpers import random_batch, tiny_config
from torch._dynamo.testing import CompileCounterWithBackend

from modeling_deberta_custom import DebertaCustomForMaskedLM, DebertaCustomForRTDPreTraining

LENGTH = 12


def batch_with_labels(head, vocab_size, seed):
    """Right-padded batch (padding differs with the seed); labels at seed + 2 positions."""
    input_ids, attention_mask = random_batch(vocab_size, batch=2, length=LENGTH, seed=seed, pad_row=None)
    attention_mask[1, LENGTH - seed - 3:] = 0
    input_ids = input_ids.masked_fill(attention_mask == 0, 0)
    labels = torch.full_like(input_ids, -100)
    labels[0, 1:seed + 3] = input_ids[0, 1:seed + 3]
    return dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels)


def loss_and_gradients(model, inputs):
    model.zero_grad()
    torch.manual_seed(0)  # RTD samples its replacements
    loss = model(**inputs).loss
    loss.backward()
    return loss.detach(), {name.removeprefix("_orig_mod."): p.grad.clone() for name, p in model.named_parameters()
                           if p.grad is not None}


# The two objectives whose steps broke the graph (sequence-level heads compile in tests/test_attention_paths.py; token
# classification's loss is the masked-LM one without the gather). Each takes about a minute on two busy cores.
@pytest.mark.parametrize("head", [DebertaCustomForMaskedLM, DebertaCustomForRTDPreTraining],
                         ids=lambda head: head.__name__)
def test_training_step_compiles_whole_and_matches_eager(head):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = head(tiny_config(num_hidden_layers=1)).train()  # dropout 0: eager and compiled agree
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, fullgraph=True, dynamic=True, backend=counter)
    counts, frames = [], []
    for seed in (0, 2):  # different numbers of labelled positions, same shape
        inputs = batch_with_labels(head, model.config.vocab_size, seed)
        counts.append(int((inputs["labels"] != -100).sum()))
        expected_loss, expected_gradients = loss_and_gradients(model, inputs)
        loss, gradients = loss_and_gradients(compiled, inputs)
        torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-6)
        assert gradients.keys() == expected_gradients.keys()
        for name, gradient in expected_gradients.items():
            torch.testing.assert_close(gradients[name], gradient, rtol=1e-4, atol=1e-6, msg=name)
        frames.append(counter.frame_count)
    assert counts[0] != counts[1]
    assert frames[0] > 0 and frames[1] == frames[0]  # the second batch reuses the graphs: no recompilation
