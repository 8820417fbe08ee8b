"""Gradient accumulation gives the loss and gradients of the equivalent large batch for token-level losses.

transformers' Trainer passes `num_items_in_batch` (the labelled items of all micro-batches of one optimizer step) to
models that declare `accepts_loss_kwargs`, and then does not divide their loss by the accumulation steps. The heads
divide their summed loss by it, so micro-batches with different numbers of labelled tokens weigh in by their tokens,
as in one large batch (a per-micro-batch mean would weigh a micro-batch with 1 label like one with 8)."""

import pytest
import torch
import torch.nn.functional as F
import transformers
from helpers import random_batch, tiny_config

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


# Token classification as NER labels it: only some real tokens labelled (first sub-words), rows of different real
# lengths, so that the micro-batches of two differ in labelled tokens, in real tokens and in padding.
REAL_LENGTHS = [5, 12, 4, 9]
LABELLED_POSITIONS = [[1], [1, 2, 4, 6, 8, 10], [1, 2], [1, 4, 7]]  # 1, 6, 2 and 3 labelled tokens


def partially_labelled_rows(vocab_size):
    generator = torch.Generator().manual_seed(3)
    rows = []
    for length, positions in zip(REAL_LENGTHS, LABELLED_POSITIONS, strict=True):
        input_ids = torch.randint(1, vocab_size, (length,), generator=generator)
        labels = torch.full((length,), -100)
        labels[positions] = input_ids[positions] % 3
        rows.append(dict(input_ids=input_ids, labels=labels))
    return rows


def pad(rows):
    """Pads a micro-batch to its longest row: input id 0, attention mask 0, label -100."""
    length = max(len(row["input_ids"]) for row in rows)

    def padded(tensors, value):
        return torch.stack([F.pad(t, (0, length - len(t)), value=value) for t in tensors])

    return dict(input_ids=padded([row["input_ids"] for row in rows], 0),
                attention_mask=padded([torch.ones_like(row["input_ids"]) for row in rows], 0),
                labels=padded([row["labels"] for row in rows], -100))


def per_token_perturbation(self, x):
    """SiFT's initial perturbation as a fixed function of each token's embedding: the same for a token in the large
    batch and in its micro-batch (drawn from the random stream, it would differ with the batch's shape)."""
    return 1e-2 * torch.sin(1e3 * x.detach().float())


def token_classifier_after_one_step(folder, batch_size, accumulation, callback=None):
    torch.manual_seed(0)
    model = DebertaCustomForTokenClassification(tiny_config(num_labels=3))
    arguments = transformers.TrainingArguments(
        output_dir=str(folder), max_steps=1, per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation, optim="sgd", learning_rate=1.0, lr_scheduler_type="constant",
        save_strategy="no", report_to=[], use_cpu=True, seed=0, disable_tqdm=True, logging_steps=1,
    )
    trainer = transformers.Trainer(model=model, args=arguments, data_collator=pad,
                                   train_dataset=partially_labelled_rows(model.config.vocab_size),
                                   callbacks=[callback] if callback is not None else None)
    trainer.train()
    return {name: p.detach().clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("term", ["head", "sift", "distillation"])
def test_added_terms_under_accumulation_equal_one_large_batch_with_partial_labels(tmp_path, monkeypatch, term):
    """Batch 4 against 2 x accumulation 2 through the Trainer (SGD, learning rate 1, one step: the weights show the
    gradients), token classification with 1, 6, 2 and 3 labelled tokens per row: the head alone, with SiFT and with
    distillation alone (output and relation terms) agree to 1e-4 (measured: 3e-8). Each added term is a sum over the
    labelled tokens divided by the Trainer's num_items_in_batch, as the head's loss (SiFT with average_over="items";
    its default, the authors' mean over every position, cannot be exact: padding differs between the batches). The rule before, a mean over each
    micro-batch's positions (SiFT) or real tokens (distillation) weighted by its share of the labels, gave weights
    1e-2 (SiFT) and 8e-4 (distillation) away from the large batch's (5% and 3% of the gradient's norm)."""
    from modeling_deberta_custom.training.distillation import DistillationCallback
    from modeling_deberta_custom.training.sift import SiFTCallback, SiFTPerturbation

    monkeypatch.setattr(SiFTPerturbation, "draw", per_token_perturbation)
    torch.manual_seed(1)
    teacher = DebertaCustomForTokenClassification(tiny_config(num_labels=3, hidden_size=64, intermediate_size=64))

    def callback():
        if term == "sift":
            # a large ascent step: the ascent counts too; "items": the term over the labelled tokens (our option)
            return SiFTCallback(adv_weight=5.0, step_size=0.1, average_over="items")
        if term == "distillation":
            return DistillationCallback(teacher, temperature=2.0, alpha_task=0.0, alpha_kd=1.0, relation_weight=1.0)
        return None

    large = token_classifier_after_one_step(tmp_path / "large", 4, 1, callback())
    accumulated = token_classifier_after_one_step(tmp_path / "accumulated", 2, 2, callback())
    torch.manual_seed(0)
    initial = dict(DebertaCustomForTokenClassification(tiny_config(num_labels=3)).named_parameters())
    moved = max((large[name] - initial[name]).abs().max().item() for name in large)
    assert moved > 1e-2  # the step did move the weights
    for name, weight in large.items():
        torch.testing.assert_close(accumulated[name], weight, rtol=0, atol=1e-4, msg=name)
