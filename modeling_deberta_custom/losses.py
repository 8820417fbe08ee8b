"""The loss helpers every head shares: sums in float32 divided by a count that may come from the Trainer
(gradient accumulation), label checks that cost no device sync, and the positions where masked-LM heads predict.

Part of the remote-code wing (copied next to the weights by `save_pretrained`): imports only torch.
"""

import math

import torch
import torch.nn.functional as F


def can_check_values(tensor: torch.Tensor) -> bool:
    """Whether checking the values of `tensor` is free: it lives on the CPU and nothing is being compiled, exported
    or traced. Reading an accelerator tensor on the host stalls its stream (a device sync), so value checks of
    inputs (id ranges, labels, mask values) run only on CPU tensors; the collators, scripts and tokenizers check the
    data while it is still on the host."""
    return tensor.device.type == "cpu" and not (torch.compiler.is_compiling() or torch.jit.is_tracing())


def mean_over_items(total, count, num_items_in_batch=None):
    """A loss summed over `count` items -> its mean, as a sum divided by max(count, 1): a batch with nothing to predict
    (every label -100, or an empty batch) gives 0 with zero gradients instead of NaN. With `num_items_in_batch` (what
    transformers' Trainer passes: the labelled items of every micro-batch of one optimizer step) the sum is divided by
    that instead, so that gradient accumulation gives the loss and gradients of one large batch."""
    if num_items_in_batch is None:
        return total / count.clamp(min=1)
    if isinstance(num_items_in_batch, torch.Tensor):
        return total / num_items_in_batch.to(total.device).clamp(min=1)
    return total / max(num_items_in_batch, 1)


def cross_entropy_sum(logits, labels):
    """Summed cross-entropy [..., K] logits against [...] labels, -100 ignored; computed in float32."""
    return F.cross_entropy(logits.flatten(0, -2).float(), labels.flatten(), reduction="sum")


def binary_cross_entropy_sum(logits, labels, counted):
    """Summed binary cross-entropy of logits against 0/1 labels where `counted` (same shapes); float32."""
    losses = F.binary_cross_entropy_with_logits(logits.float(), labels.clamp(min=0).float(), reduction="none")
    return torch.where(counted, losses, 0.0).sum()


def prediction_positions(labels: torch.Tensor, max_fraction: float) -> torch.Tensor:
    """[R] positions of a [B, N] batch, as indices into its flattened B * N positions, at which a masked-LM head
    computes vocabulary logits (the vocabulary projection, the largest cost of masked-LM pretraining with a 128k
    vocabulary, runs on these rows only). The labelled positions (labels != -100) come first, in row-major order.

    Eager: exactly the labelled positions (R = their number), so no batch is ever beyond a budget. Their number is
    read on the host: free on CPU, one device sync per step on accelerators (as ModernBERT's sparse prediction).
    Compiled or exported (torch.compile, torch.export): a shape cannot depend on the data there, so R is a budget
    fixed by the shapes, K = ceil(max_fraction * B * N) (see `sparse_prediction_positions`); labelled positions
    beyond it are left to `left_out_labels`, which the heads score in a dense pass under torch.cond."""
    if torch.compiler.is_compiling():
        return sparse_prediction_positions(labels, max_fraction)
    return (labels != -100).flatten().nonzero().squeeze(1)  # [M]


def sparse_prediction_positions(labels: torch.Tensor, max_fraction: float) -> torch.Tensor:
    """[K] positions of a [B, N] batch, as indices into its flattened B * N positions: every labelled position
    (labels != -100) in row-major order, then the first unlabelled ones, K = ceil(max_fraction * B * N) in all (at
    most B * N). K depends on the shapes only (no host sync, one compiled graph); when more than K positions are
    labelled, the first K of them are returned (the rest: `left_out_labels`). With max_fraction=1.0 this is the row
    order of any prediction_positions output: its R rows are the first R of these."""
    labelled = (labels != -100).flatten()  # [B * N]
    total = labelled.shape[0]
    budget = min(total, math.ceil(max_fraction * total))
    # A stable sort keeps row-major order within the labelled and within the unlabelled positions.
    order = torch.sort(labelled.to(torch.int8), descending=True, stable=True).indices  # [B * N]
    return order[:budget]


def left_out_labels(labels: torch.Tensor, positions: torch.Tensor) -> torch.Tensor | None:
    """The labels [B * N] of the labelled positions that `positions` leaves out (-100 elsewhere), for a dense pass
    that scores them; None where `positions` holds every labelled position (eager: see prediction_positions).

    Under torch.compile a head runs that pass as `torch.cond(left_out.ne(-100).any(), dense pass, zeros)`: exact for
    every batch, at the cost of a dense vocabulary projection on the (rare, with a budget above the masking rate)
    batches beyond the budget, and of the one device read that the branch needs."""
    if not torch.compiler.is_compiling():
        return None
    return labels.flatten().index_fill(0, positions, -100)  # [B * N]


def check_labels(labels, expected_shape, num_classes, name):
    """Class labels: integers in [0, num_classes) or -100 (ignored), of the expected shape (values checked where
    that is free: see can_check_values)."""
    if labels.is_floating_point():
        raise TypeError(f"{name} must be integer class ids for this head, got dtype {labels.dtype}")
    if tuple(labels.shape) != tuple(expected_shape):
        raise ValueError(f"{name} has shape {tuple(labels.shape)}, expected {tuple(expected_shape)}")
    if not can_check_values(labels):
        return
    valid = (labels == -100) | ((labels >= 0) & (labels < num_classes))
    if not bool(valid.all()):
        bad = labels[~valid][0].item()
        raise ValueError(f"{name} holds {bad}, outside [0, {num_classes - 1}] (use -100 to ignore a position)")
