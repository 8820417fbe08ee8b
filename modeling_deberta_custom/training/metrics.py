"""Pretraining metrics: `PretrainingMetrics` for evaluation and `LossTermsCallback` for the training logs (the loss
terms and accuracies of masked-LM and replaced-token detection, which the Trainer alone logs only as their sum).

Training-only code (the training wing): the modeling files never import it.
"""

from __future__ import annotations

from dataclasses import fields

import torch
import torch.nn.functional as F

from .loss_terms import LossTermCallback, sparse_positions, task_loss_term


def _per_sample_sum(values: torch.Tensor, rows: torch.Tensor, batch: int) -> torch.Tensor:
    return torch.zeros(batch, dtype=torch.float64, device=values.device).index_add_(0, rows, values.double())


class PretrainingMetrics:
    """`preprocess_logits_for_metrics` and `compute_metrics` for transformers.Trainer, for objective "mlm"
    (DebertaCustomForMaskedLM) or "rtd" (DebertaCustomForRTDPreTraining).

    Each evaluation batch is reduced, per sample, to sums and counts (so that nothing vocabulary-sized is kept and
    the distributed gather drops duplicated samples exactly); compute_metrics turns the totals into
    mlm_loss / generator_accuracy (mlm_accuracy for "mlm") and, for rtd, rtd_loss / discriminator_accuracy (with
    the all-"original" baseline it has to beat, and precision / recall on replaced tokens) / replaced_fraction,
    weighted by token counts."""

    MLM_COLUMNS = ("mlm_loss_sum", "masked_tokens", "generator_correct")
    RTD_COLUMNS = MLM_COLUMNS + ("rtd_loss_sum", "rtd_tokens", "discriminator_correct", "replaced_tokens",
                                 "detected_replaced", "predicted_replaced")

    def __init__(self, objective: str):
        if objective not in ("mlm", "rtd"):
            raise ValueError(f"objective must be 'mlm' or 'rtd', got {objective!r}")
        self.objective = objective

    def preprocess_logits_for_metrics(self, outputs, labels):
        """Per-sample sums and counts [B, columns], computed without a host sync: dense masked-LM logits [B, N, V]
        are scored at every position (ignored ones add 0), sparse ones [K, V] at their rows' positions."""
        batch, length = labels.shape
        masked = labels != -100
        if self.objective == "mlm":
            logits = outputs[0] if isinstance(outputs, (tuple, list)) else outputs
            positions = None
            if logits.dim() == 2:  # sparse [K, V] (a model in training mode): the rows' places, as the model chose them
                positions = sparse_positions(labels, logits.shape[0])
        else:
            named = dict(zip(_rtd_output_names(), outputs, strict=False))
            logits, positions = named["generator_logits"], named["generator_positions"]
        if positions is None:  # dense: one row per position
            logits, positions = logits.flatten(0, 1), torch.arange(batch * length, device=labels.device)
        targets = labels.flatten().index_select(0, positions)  # [rows], -100 where nothing is predicted
        predicted = targets != -100
        token_loss = F.cross_entropy(logits.float(), targets, reduction="none")  # 0 where ignored
        correct = ((logits.argmax(-1) == targets) & predicted).double()
        rows = torch.div(positions, length, rounding_mode="floor")  # the sample each row belongs to
        columns = [_per_sample_sum(token_loss, rows, batch), masked.sum(-1).double(),
                   _per_sample_sum(correct, rows, batch)]
        if self.objective == "rtd":
            rtd_logits, rtd_labels = named["logits"], named["rtd_labels"]
            counted = rtd_labels != -100
            bce = F.binary_cross_entropy_with_logits(rtd_logits.float(), rtd_labels.clamp(min=0).float(),
                                                     reduction="none")
            predicted = (rtd_logits > 0) & counted
            right = (predicted.long() == rtd_labels) & counted
            replaced = rtd_labels == 1
            columns += [(bce * counted).double().sum(-1), counted.sum(-1).double(), right.sum(-1).double(),
                        replaced.sum(-1).double(), (predicted & replaced).sum(-1).double(),
                        predicted.sum(-1).double()]
        return torch.stack(columns, dim=-1)  # [B, number of columns]

    def compute_metrics(self, eval_prediction) -> dict:
        totals = torch.as_tensor(eval_prediction.predictions, dtype=torch.float64).reshape(
            -1, len(self.RTD_COLUMNS if self.objective == "rtd" else self.MLM_COLUMNS)).sum(0)
        total = dict(zip(self.RTD_COLUMNS, totals.tolist(), strict=False))
        masked = max(total["masked_tokens"], 1.0)
        metrics = {"mlm_loss": total["mlm_loss_sum"] / masked}
        if self.objective == "mlm":
            metrics["mlm_accuracy"] = total["generator_correct"] / masked
            return metrics
        tokens = max(total["rtd_tokens"], 1.0)
        metrics.update(generator_accuracy=total["generator_correct"] / masked, rtd_loss=total["rtd_loss_sum"] / tokens,
                       discriminator_accuracy=total["discriminator_correct"] / tokens,
                       # Predicting "original" everywhere scores 1 - replaced / tokens: the accuracy to beat.
                       discriminator_baseline_accuracy=1.0 - total["replaced_tokens"] / tokens,
                       discriminator_recall=total["detected_replaced"] / max(total["replaced_tokens"], 1.0),
                       discriminator_precision=total["detected_replaced"] / max(total["predicted_replaced"], 1.0),
                       replaced_fraction=total["replaced_tokens"] / masked)
        return metrics


def _rtd_output_names() -> list[str]:
    """Field order of RTDPreTrainingOutput without `loss`: the order in which Trainer hands its outputs over."""
    from ..modeling_rtd import RTDPreTrainingOutput

    return [f.name for f in fields(RTDPreTrainingOutput) if f.name != "loss"]


def _masked_lm_accuracy(logits, labels):
    """Share of labelled positions whose argmax is the label, for dense [B, N, V] or sparse [K, V] logits (rows at
    `sparse_positions`: the labelled positions first), without a host sync."""
    if logits.dim() == 2:
        labels = labels.flatten().index_select(0, sparse_positions(labels, logits.shape[0]))
    labelled = labels != -100
    return ((logits.argmax(-1) == labels) & labelled).sum() / labelled.sum().clamp(min=1)


class LossTermsCallback(LossTermCallback):
    """Adds the mean of each loss term and accuracy since the previous log to the training logs (train_mlm_loss,
    train_rtd_loss, train_generator_accuracy, ...), for an unchanged Trainer that only logs the summed loss.

    A forward hook on the model records the terms of every training forward pass (micro-batches included); `on_log`
    writes their means, over every process, into the log entry. It changes no loss. Add it and place it ahead of the
    report_to integrations so that they receive the terms:

        trainer.add_callback(LossTermsCallback())
        place_before_integrations(trainer)
    """

    RTD_TERMS = ("mlm_loss", "rtd_loss", "generator_accuracy", "discriminator_accuracy", "replaced_fraction")
    log_prefix = "train_"
    summary_prefix = None
    changes_loss = False

    @torch.no_grad()
    def add_terms(self, module, inputs, output):
        if getattr(output, "rtd_loss", None) is not None:  # this batch's means, whatever num_items_in_batch
            for name in self.RTD_TERMS:
                self.record(name, getattr(output, name).float())
        elif getattr(output, "loss", None) is not None:  # masked-LM: the loss is the MLM loss
            self.record("mlm_loss", task_loss_term(output.loss, inputs))
            labels = inputs.get("labels")
            if labels is not None and output.logits is not None:
                self.record("mlm_accuracy", _masked_lm_accuracy(output.logits, labels))
        return None


__all__ = ["LossTermsCallback", "PretrainingMetrics"]
