"""Gradient accumulation gives the loss and gradients of the equivalent large batch for token-level losses.

transformers' Trainer passes `num_items_in_batch` (the labelled items of all micro-batches of one optimizer step) to
models that declare `accepts_loss_kwargs`, and then does not divide their loss by the accumulation steps. The heads
divide their summed loss by it, so micro-batches with different numbers of labelled tokens weigh in by their tokens,
as in one large batch (a per-micro-batch mean would weigh a micro-batch with 1 label like one with 8)."""

import pytest
import torch
import transformers
from conftest import random_batch, tiny_config

from modeling_deberta_custom import (
    DebertaCustomForMaskedLM,
    DebertaCustomForRTDPreTraining,
    DebertaCustomForTokenClassification,
)

LABELLED = [1, 6, 2, 3]  # labelled tokens per sample: the micro-batches of two differ in count


def dataset_for(head, vocab_size):
    datasets = pytest.importorskip("datasets")
    input_ids, attention_mask = random_batch(vocab_size, batch=4, length=12, pad_row=None)
    labels = torch.full_like(input_ids, -100)
    for row, count in enumerate(LABELLED):
        if head is DebertaCustomForTokenClassification:
            labels[row, 1:count + 1] = input_ids[row, 1:count + 1] % 3
        else:
            labels[row, 1:count + 1] = input_ids[row, 1:count + 1]
    return datasets.Dataset.from_dict(dict(input_ids=input_ids.tolist(), attention_mask=attention_mask.tolist(),
                                           labels=labels.tolist()))


def weights_after_one_step(tmp_path, head, batch_size, accumulation):
    torch.manual_seed(0)
    model = head(tiny_config(num_labels=3, sparse_mlm_max_fraction=0.5))
    arguments = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation, optim="sgd", learning_rate=1.0, lr_scheduler_type="constant",
        save_strategy="no", report_to=[], use_cpu=True, seed=0, disable_tqdm=True, logging_steps=1,
    )
    trainer = transformers.Trainer(model=model, args=arguments, train_dataset=dataset_for(head, model.config.vocab_size))
    assert trainer.model_accepts_loss_kwargs
    trainer.train()
    loss = next(entry["loss"] for entry in trainer.state.log_history if "loss" in entry)
    return loss, {name: p.detach().clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("head", [DebertaCustomForMaskedLM, DebertaCustomForTokenClassification],
                         ids=lambda head: head.__name__)
def test_accumulated_micro_batches_equal_one_large_batch(tmp_path, head):
    """SGD at learning rate 1: the weights after one step show the gradients themselves."""
    large_loss, large = weights_after_one_step(tmp_path / "large", head, batch_size=4, accumulation=1)
    loss, accumulated = weights_after_one_step(tmp_path / "accumulated", head, batch_size=2, accumulation=2)
    assert loss == pytest.approx(large_loss, abs=1e-4)
    torch.manual_seed(0)
    initial = dict(head(tiny_config(num_labels=3)).named_parameters())
    assert any(not torch.equal(large[name], initial[name]) for name in large)  # the step did move the weights
    for name, weight in large.items():
        torch.testing.assert_close(accumulated[name], weight, rtol=0, atol=1e-5, msg=name)


def test_rtd_mlm_term_sums_over_the_whole_step():
    """RTD pretraining: the MLM term is divided by num_items_in_batch (exact); the RTD term, whose items (non-padding
    tokens) the Trainer does not count, is each micro-batch's mean weighted by its share of the masked tokens."""
    torch.manual_seed(0)
    model = DebertaCustomForRTDPreTraining(tiny_config(sparse_mlm_max_fraction=0.5)).train()
    data = dataset_for(DebertaCustomForRTDPreTraining, model.config.vocab_size)[:]
    batch = {k: torch.tensor(v) for k, v in data.items()}
    total = int((batch["labels"] != -100).sum())
    halves = [{k: v[i:i + 2] for k, v in batch.items()} for i in (0, 2)]
    whole = model(**batch)
    shares = [int((half["labels"] != -100).sum()) / total for half in halves]
    for half, share in zip(halves, shares, strict=True):
        torch.manual_seed(1)  # the same replacements in both calls
        part = model(**half, num_items_in_batch=torch.tensor(total))
        torch.manual_seed(1)
        own = model(**half)  # this micro-batch alone
        torch.testing.assert_close(part.mlm_loss, own.mlm_loss)  # the logged terms stay this batch's means
        torch.testing.assert_close(part.loss, own.mlm_loss * share + model.config.rtd_loss_weight * own.rtd_loss * share)
    # the MLM terms of the two halves, weighted so, add up to the large batch's
    torch.testing.assert_close(sum(model(**half).mlm_loss * share for half, share in zip(halves, shares, strict=True)),
                               whole.mlm_loss)


def test_distillation_under_accumulation_equals_one_large_batch(tmp_path):
    """The distillation term (a mean over this micro-batch's real tokens) is weighted by the micro-batch's share of
    num_items_in_batch, as the head's own loss: micro-batches of 3 and 12 real tokens give the large batch's
    gradients. Added unweighted, it would count twice (the Trainer does not divide by the accumulation steps)."""
    datasets = pytest.importorskip("datasets")
    from modeling_deberta_custom.training.distillation import DistillationCallback

    lengths = [2, 1, 12, 8]  # real tokens per row, every one labelled (the term's items are the labelled items)
    input_ids, _ = random_batch(tiny_config().vocab_size, batch=4, length=12, pad_row=None)
    attention_mask = torch.tensor([[1] * n + [0] * (12 - n) for n in lengths])
    labels = torch.where(attention_mask.bool(), input_ids % 3, -100)
    data = datasets.Dataset.from_dict(dict(input_ids=input_ids.tolist(), attention_mask=attention_mask.tolist(),
                                           labels=labels.tolist()))
    torch.manual_seed(1)
    teacher = DebertaCustomForTokenClassification(tiny_config(num_labels=3))

    def weights(folder, batch_size, accumulation):
        torch.manual_seed(0)
        model = DebertaCustomForTokenClassification(tiny_config(num_labels=3))
        arguments = transformers.TrainingArguments(
            output_dir=str(folder), max_steps=1, per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=accumulation, optim="sgd", learning_rate=1.0, lr_scheduler_type="constant",
            save_strategy="no", report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
        )
        callback = DistillationCallback(teacher, temperature=2.0, alpha_task=0.0, alpha_kd=1.0)
        transformers.Trainer(model=model, args=arguments, train_dataset=data, callbacks=[callback]).train()
        return {name: p.detach().clone() for name, p in model.named_parameters()}

    large = weights(tmp_path / "large", batch_size=4, accumulation=1)
    accumulated = weights(tmp_path / "accumulated", batch_size=2, accumulation=2)
    for name, weight in large.items():
        torch.testing.assert_close(accumulated[name], weight, rtol=0, atol=1e-5, msg=name)
