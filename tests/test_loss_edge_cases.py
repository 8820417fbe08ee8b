"""Batches with nothing to predict and empty batches.

A batch whose labels are all -100 happens with truncation and small masking rates; a mean over no items is NaN, and
one NaN step poisons every weight. Losses are sums over items divided by max(count, 1): such a batch gives loss 0
and zero gradients. An empty batch (batch size 0) gives empty outputs and loss 0."""

import pytest
import torch
from helpers import random_batch, tiny_config

from modeling_deberta_custom import (
    DebertaCustomForMaskedLM,
    DebertaCustomForMultipleChoice,
    DebertaCustomForQuestionAnswering,
    DebertaCustomForReplacedTokenDetection,
    DebertaCustomForRTDPreTraining,
    DebertaCustomForSequenceClassification,
    DebertaCustomForTokenClassification,
)

LENGTH = 10


def nothing_to_predict(head, batch):
    """Labels (or answer positions) of `batch` rows that ask for no prediction at all."""
    if head is DebertaCustomForQuestionAnswering:  # answers outside the window are ignored
        return dict(start_positions=torch.full((batch,), LENGTH), end_positions=torch.full((batch,), LENGTH + 3))
    if head in (DebertaCustomForSequenceClassification, DebertaCustomForMultipleChoice):
        return dict(labels=torch.full((batch,), -100))
    return dict(labels=torch.full((batch, LENGTH), -100))


def inputs_for(head, batch):
    input_ids, attention_mask = random_batch(99, batch=max(batch, 1), length=LENGTH)
    input_ids, attention_mask = input_ids[:batch], attention_mask[:batch]
    if head is DebertaCustomForMultipleChoice:
        input_ids, attention_mask = input_ids[:, None].expand(-1, 2, -1), attention_mask[:, None].expand(-1, 2, -1)
    return dict(input_ids=input_ids, attention_mask=attention_mask, **nothing_to_predict(head, batch))


HEADS = [DebertaCustomForSequenceClassification, DebertaCustomForTokenClassification, DebertaCustomForQuestionAnswering,
         DebertaCustomForMultipleChoice, DebertaCustomForMaskedLM, DebertaCustomForReplacedTokenDetection,
         DebertaCustomForRTDPreTraining]


def model_for(head, attn="sdpa", **overrides):
    config = tiny_config(num_labels=2, **overrides)
    config._attn_implementation = attn
    torch.manual_seed(0)
    return head(config).train()


@pytest.mark.parametrize("head", HEADS[:-1], ids=lambda head: head.__name__)
def test_labels_all_ignored_give_zero_loss_and_zero_gradients(head):
    model = model_for(head)
    output = model(**inputs_for(head, 3))
    assert output.loss.item() == 0.0  # not NaN
    output.loss.backward()
    gradients = [p.grad for p in model.parameters() if p.grad is not None]
    assert gradients and all(torch.count_nonzero(g) == 0 for g in gradients)


def test_rtd_with_nothing_masked_still_trains_the_discriminator():
    """Labels all -100 in RTD pretraining mean "nothing masked", not "nothing to learn": the discriminator sees an
    unchanged input and learns that every token is original."""
    model = model_for(DebertaCustomForRTDPreTraining, rtd_loss_weight=1.0)
    inputs = inputs_for(DebertaCustomForRTDPreTraining, 3)
    output = model(**inputs)
    assert torch.equal(output.discriminator_input_ids, inputs["input_ids"])
    assert output.mlm_loss.item() == 0.0 and output.rtd_loss.item() > 0
    assert output.generator_accuracy.item() == 0.0 and output.replaced_fraction.item() == 0.0  # not NaN
    torch.testing.assert_close(output.loss, output.rtd_loss)
    output.loss.backward()
    generator = [p.grad for p in model.generator.parameters() if p.grad is not None]
    assert all(torch.count_nonzero(g) == 0 for g in generator)  # nothing reaches the generator
    assert torch.count_nonzero(model.mask_predictions.classifier.weight.grad) > 0


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("head", HEADS, ids=lambda head: head.__name__)
def test_empty_batch_gives_empty_outputs_and_zero_loss(head, attn):
    model = model_for(head, attn)
    output = model(**inputs_for(head, 0))
    assert output.loss.item() == 0.0
    output.loss.backward()
    tensors = {name: value for name, value in output.items() if isinstance(value, torch.Tensor) and value.dim() > 0}
    assert tensors and all(value.numel() == 0 for value in tensors.values()), {k: v.shape for k, v in tensors.items()}
    model.eval()
    with torch.no_grad():
        inputs = {k: v for k, v in inputs_for(head, 0).items() if k == "input_ids" or k == "attention_mask"}
        logits = model(**inputs)[0]
    assert logits.shape[0] == 0
