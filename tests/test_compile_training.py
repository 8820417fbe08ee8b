"""A training step compiles whole: forward and loss under torch.compile(fullgraph=True, dynamic=True) (a graph break
is an error), backward through the compiled graph, with the eager loss and gradients; batches of five lengths with
random 15% labels reuse one graph (at most 2 compilations), and so does a batch labelled on every token, which
exceeds the fixed budget of predicted positions (config.sparse_mlm_max_fraction) and takes the exact overflow path.

backend="aot_eager" traces forward and backward as inductor would but skips code generation (about a minute per
graph on two cores). One-layer models keep tracing short; the Enhanced Mask Decoder then reads the embeddings as its
second-to-last layer, which exercises the same code."""

import pytest
import torch
from helpers import random_batch, tiny_config
from torch._dynamo.testing import CompileCounterWithBackend

from modeling_deberta_custom import (
    DebertaCustomForMaskedLM,
    DebertaCustomForRTDPreTraining,
    DebertaCustomForSequenceClassification,
)

LENGTHS = (8, 11, 16, 23, 32)
MASK_ID = 4


def batch_with_labels(head, vocab_size, length, seed, rate=0.15):
    """Right-padded batch of 2 (row 1 padded by a seed-dependent amount); token labels on ~rate of the real tokens
    (at least one), or class labels for the classifier. rate=1 labels every position, padding included."""
    input_ids, attention_mask = random_batch(vocab_size, batch=2, length=length, seed=seed, pad_row=None)
    attention_mask[1, length - seed % 3 - 2:] = 0
    input_ids = input_ids.masked_fill(attention_mask == 0, 0)
    if head is DebertaCustomForSequenceClassification:
        return dict(input_ids=input_ids, attention_mask=attention_mask, labels=torch.tensor([seed % 2, 1]))
    if rate == 1:
        return dict(input_ids=input_ids.clone(), attention_mask=attention_mask, labels=input_ids)
    generator = torch.Generator().manual_seed(seed)
    masked = (torch.rand(input_ids.shape, generator=generator) < rate) & attention_mask.bool()
    masked[0, 1] = True
    labels = torch.where(masked, input_ids, -100)
    return dict(input_ids=input_ids.masked_fill(masked, MASK_ID), attention_mask=attention_mask, labels=labels)


def step(model, inputs):
    """Loss, its masked-LM part where there is one, and the gradients of one training step."""
    model.zero_grad()
    torch.manual_seed(0)  # RTD samples its replacements
    output = model(**inputs)
    output.loss.backward()
    gradients = {name.removeprefix("_orig_mod."): p.grad.clone() for name, p in model.named_parameters()
                 if p.grad is not None}
    return output, gradients


def assert_same_step(model, compiled, inputs, compare_gradients=True):
    expected, expected_gradients = step(model, inputs)
    output, gradients = step(compiled, inputs)
    for name in ("loss", "mlm_loss", "generator_accuracy"):
        if compare_gradients or name != "loss":
            if getattr(expected, name, None) is not None:
                torch.testing.assert_close(getattr(output, name), getattr(expected, name), rtol=1e-5, atol=1e-6,
                                           msg=name)
    if compare_gradients:
        assert gradients.keys() == expected_gradients.keys()
        for name, gradient in expected_gradients.items():
            torch.testing.assert_close(gradients[name], gradient, rtol=1e-4, atol=1e-6, msg=name)
    return output


# Each takes about a minute on two busy cores.
@pytest.mark.parametrize("head", [DebertaCustomForSequenceClassification, DebertaCustomForMaskedLM,
                                  DebertaCustomForRTDPreTraining], ids=lambda head: head.__name__)
def test_training_step_compiles_whole_and_matches_eager(head):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = head(tiny_config(num_hidden_layers=1, num_labels=2)).train()  # dropout 0: eager and compiled agree
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, fullgraph=True, dynamic=True, backend=counter)
    budget_exceeded = []
    for seed, length in enumerate(LENGTHS):
        inputs = batch_with_labels(head, model.config.vocab_size, length, seed)
        budget = -(-inputs["input_ids"].numel() * model.config.sparse_mlm_max_fraction // 1)
        budget_exceeded.append(int((inputs["labels"] != -100).sum()) > budget)
        # RTD beyond the budget samples the overflow rows in another order than eager: compare the masked-LM terms.
        exact_samples = head is not DebertaCustomForRTDPreTraining or not budget_exceeded[-1]
        assert_same_step(model, compiled, inputs, compare_gradients=exact_samples)
    assert 0 < counter.frame_count <= 2, counter.frame_count
    if head is DebertaCustomForSequenceClassification:
        return
    # Every token labelled: more than the budget of predicted rows; exact through the overflow path, same graph.
    inputs = batch_with_labels(head, model.config.vocab_size, 20, seed=7, rate=1)
    inputs["input_ids"] = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 1, MASK_ID)
    output = assert_same_step(model, compiled, inputs, compare_gradients=head is DebertaCustomForMaskedLM)
    assert counter.frame_count <= 2, counter.frame_count
    if head is DebertaCustomForRTDPreTraining:
        # every masked position received a sample from the generator (a sample equal to [MASK] is rare)
        replaced = output.discriminator_input_ids != MASK_ID
        assert replaced[inputs["attention_mask"] == 1].float().mean() > 0.9
