"""The one base of the training add-ons that add terms to the loss a model computes (SiFT, distillation) or log the
terms it returns (`LossTermsCallback`), with an unchanged `transformers.Trainer`.

A `TrainerCallback` sees neither the batch nor the loss. What works with an unchanged Trainer: at `on_train_begin` the
callback hooks the (unwrapped) model; in training mode with gradients its forward hook reads the call's arguments and
outputs and may change `outputs["loss"]`; at `on_train_end` the hook goes. Because the loss changes inside the model's
forward, gradient accumulation, autocast, gradient checkpointing and DistributedDataParallel need nothing else.
`LossTermCallback` holds what every such callback shares:

* Installation: `install(model)` / `remove()`, every handle in one list; `setup` / `teardown` for a subclass's own.
* The re-entry guard: a callback that runs extra passes of the model (SiFT's perturbed passes) runs them inside
  `extra_passes(model)`, and no loss-term hook on that model acts on them, whatever the order of the callbacks.
  Distillation's hook runs first (`runs_first`): its alpha_task scales the task loss alone, not SiFT's term.
* Normalisation of added terms, so that gradient accumulation equals the large batch (`ItemMean`, below).
* Accumulators on the device, read (and summed over processes) only when the Trainer logs, and one rule for writing
  them into `logs` and into the entry the Trainer has just appended to its log history.
* Ordering: the Trainer calls DefaultFlowCallback, then the report_to integrations (TensorBoard, W&B, ...), then the
  callbacks it was given, all with one `logs` dict; integrations would write it before the terms are in. Call
  `place_before_integrations(trainer)` after building the Trainer; it moves every loss-term callback right after
  DefaultFlowCallback. (A callback gets no reference to the Trainer or its callback list, so it cannot do this itself.)

Gradient accumulation, exactly. The Trainer passes `num_items_in_batch`, the labelled items (labels != -100) of every
micro-batch of the optimizer step (of every process, with average_tokens_across_devices), to heads that accept it (the
masked-LM, token-classification and RTD heads here); their loss is a sum over this micro-batch's items divided by it,
and the Trainer no longer divides by the accumulation steps. Other heads (sequence classification, multiple choice,
question answering) get nothing, return a mean, and the Trainer divides it by the accumulation steps. An added term is
exact when it is normalised as the task loss is: a sum of per-item values over this micro-batch's items, divided by
num_items_in_batch when given and by this micro-batch's item count otherwise. Items are what the task loss counts:

* labels of the term's shape (token classification or a dense masked-LM head: [B, N]; sequence classification and
  multiple choice: [B]): the labelled entries;
* sparse masked-LM logits ([K, V], rows at the labelled positions first, see `sparse_positions`) with [B, N] labels:
  the first (number of labelled) rows;
* anything else (multi-label [B, K] labels, question answering, no labels): every row, or every real token for
  [B, N] values with an attention mask, averaged per micro-batch, as those heads' own loss. With num_items_in_batch
  and values that do not line up with the labels, the mean is weighted by this micro-batch's share of the labelled
  items (exact only when the labelled items are spread evenly).

Training-only code (the training wing): the modeling files never import it.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import weakref
from collections.abc import Mapping
from typing import NamedTuple

import torch
from torch import nn
from transformers import TrainerCallback
from transformers.trainer_callback import DefaultFlowCallback

logger = logging.getLogger(__name__)

# Keyword arguments of our heads (and transformers') that only feed the task loss.
LABEL_ARGUMENTS = ("labels", "start_positions", "end_positions")

__all__ = [
    "LABEL_ARGUMENTS",
    "ItemMean",
    "LossTermCallback",
    "align_logits",
    "check_loss_hook_arguments",
    "extra_passes",
    "in_extra_passes",
    "item_mask",
    "item_mean",
    "output_logits",
    "place_before_integrations",
    "sparse_positions",
    "task_loss_term",
]


# ----------------------------------------------------------------------------------------------------------------------
# Items: which rows of a term the task loss counts
# ----------------------------------------------------------------------------------------------------------------------


def _is_sparse(shape, labels: torch.Tensor) -> bool:
    """Per-row values [K] of sparse masked-LM logits [K, V] against integer [B, N] labels."""
    return len(shape) == 1 and labels.dim() == 2 and not labels.is_floating_point()


def sparse_positions(labels: torch.Tensor, rows: int) -> torch.Tensor:
    """[rows] flat positions (into B * N) of the rows of sparse masked-LM logits: the labelled positions in row-major
    order, then the first unlabelled ones (the order of our masked-LM head's sparse prediction)."""
    labelled = (labels != -100).flatten()  # [B * N]
    return torch.sort(labelled.to(torch.int8), descending=True, stable=True).indices[:rows]


def item_mask(labels: torch.Tensor | None, shape) -> torch.Tensor | None:
    """[shape] bool: which values of a per-row term (shape: the logits' shape without the last dimension) are items of
    the task loss; None when they do not line up with `labels`."""
    if not isinstance(labels, torch.Tensor):
        return None
    shape = tuple(shape)
    if tuple(labels.shape) == shape:
        return labels != -100
    if _is_sparse(shape, labels):
        return torch.arange(shape[0], device=labels.device) < (labels != -100).sum()
    return None


class ItemMean(NamedTuple):
    """A term as the sum of its per-item values and the number of items, both on the device (no host read)."""

    total: torch.Tensor
    count: torch.Tensor

    def mean(self) -> torch.Tensor:
        """The micro-batch's own mean (for logs, and the loss without num_items_in_batch)."""
        return self.total / self.count.clamp(min=1)

    def loss(self, num_items_in_batch=None) -> torch.Tensor:
        """The term as it enters the loss: total / num_items_in_batch when the Trainer passes it, else the mean."""
        if num_items_in_batch is None:
            return self.mean()
        if isinstance(num_items_in_batch, torch.Tensor):
            return self.total / num_items_in_batch.to(self.total.device).clamp(min=1)
        return self.total / max(num_items_in_batch, 1)

    @staticmethod
    def average(terms: list[ItemMean]) -> ItemMean:
        """Several terms over the same items (question answering's start and end) -> their average."""
        return ItemMean(sum(t.total for t in terms) / len(terms), terms[0].count)


def item_mean(values: torch.Tensor, labels: torch.Tensor | None = None,
              real_mask: torch.Tensor | None = None) -> ItemMean:
    """Per-row values of a term -> (sum over the task's items, their number), by the rules of the module docstring.
    `real_mask` ([B, N], 1 at real tokens) weighs [B, N] values that have no labels to line up with."""
    items = item_mask(labels, values.shape)
    if items is not None:
        return ItemMean(torch.where(items, values, 0).sum(), items.sum())
    if real_mask is not None and tuple(real_mask.shape) == tuple(values.shape):
        weights = real_mask.to(values.dtype)
        total, count = (values * weights).sum(), weights.sum()
    else:
        total, count = values.sum(), values.new_full((), values.numel())  # a fill, not a host-to-device copy
    if isinstance(labels, torch.Tensor):  # rows that do not line up: the mean, counted as this batch's labelled items
        labelled = (labels != -100).sum()
        return ItemMean(total / count.clamp(min=1) * labelled, labelled)
    return ItemMean(total, count)


def task_loss_term(loss: torch.Tensor, inputs: Mapping) -> ItemMean:
    """The loss a head returned, as (sum over its items, their number): with num_items_in_batch the head divided a sum
    over this batch's labelled items by it; without, it is already this batch's mean (counted once)."""
    num_items, labels = inputs.get("num_items_in_batch"), inputs.get("labels")
    loss = loss.detach().float()
    if num_items is None or not isinstance(labels, torch.Tensor):
        return ItemMean(loss, torch.ones((), device=loss.device))
    if isinstance(num_items, torch.Tensor):
        num_items = num_items.to(loss.device)
    return ItemMean(loss * num_items, (labels != -100).sum())


# ----------------------------------------------------------------------------------------------------------------------
# Model outputs
# ----------------------------------------------------------------------------------------------------------------------


def output_logits(outputs, reader: str = "SiFT") -> list[torch.Tensor]:
    """The prediction tensors of a head's output: [start_logits, end_logits] for question answering, else [logits].
    `reader` names the caller in the errors."""
    if not isinstance(outputs, Mapping):
        raise TypeError(f"{reader} reads model outputs as a ModelOutput or dict, got {type(outputs).__name__} "
                        "(call the model with return_dict=True)")
    if outputs.get("start_logits") is not None:
        return [outputs["start_logits"], outputs["end_logits"]]
    if outputs.get("logits") is not None:
        return [outputs["logits"]]
    raise ValueError(f"{reader} needs `logits` (or `start_logits`/`end_logits`) in the model output, got {list(outputs)}")


def align_logits(logits: torch.Tensor, reference: torch.Tensor, labels: torch.Tensor | None = None,
                 names: tuple[str, str] = ("extra pass", "clean pass")) -> torch.Tensor:
    """`logits` of another pass over the same batch, row for row with `reference`. Equal shapes pass; dense [B, N, V]
    logits against sparse masked-LM logits [K, V] are gathered at the sparse rows' positions, which the integer
    [B, N] `labels` give (`sparse_positions`). Anything else raises, naming the cause. `names`: (logits', reference's)
    owners, for the errors."""
    if logits.shape == reference.shape:
        return logits
    shapes = f"the {names[0]}'s logits {tuple(logits.shape)}, the {names[1]}'s {tuple(reference.shape)}"
    if logits.shape[-1] != reference.shape[-1]:
        raise ValueError(f"Different label spaces ({shapes}): both must predict the same classes or vocabulary")
    labelled_rows = isinstance(labels, torch.Tensor) and _is_sparse(reference.shape[:1], labels)
    if reference.dim() == 2 and logits.dim() == 3 and labelled_rows and tuple(logits.shape[:2]) == tuple(labels.shape):
        return logits.flatten(0, 1).index_select(0, sparse_positions(labels, reference.shape[0]))  # [K, V]
    if {logits.dim(), reference.dim()} == {2, 3} or (logits.dim() == reference.dim() == 2 and labelled_rows):
        raise ValueError(f"Sparse masked-LM logits (rows at the labelled positions only) cannot be paired with these "
                         f"({shapes}): both passes must select the same positions (the same labels and "
                         "sparse_mlm_max_fraction), or the other pass must return dense [B, N, V] logits and the "
                         "labels be given")
    raise ValueError(f"The two passes cover different positions ({shapes})")


# ----------------------------------------------------------------------------------------------------------------------
# The re-entry guard
# ----------------------------------------------------------------------------------------------------------------------

_EXTRA_PASSES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> nesting of extra passes


@contextlib.contextmanager
def extra_passes(model: nn.Module):
    """Forward passes of `model` run inside are extra passes of a loss term (SiFT's perturbed passes): no
    `LossTermCallback` hook on `model` acts on them."""
    _EXTRA_PASSES[model] = _EXTRA_PASSES.get(model, 0) + 1
    try:
        yield
    finally:
        _EXTRA_PASSES[model] -= 1


def in_extra_passes(model: nn.Module) -> bool:
    return _EXTRA_PASSES.get(model, 0) > 0


def call_arguments(module: nn.Module, args: tuple, kwargs: dict) -> dict:
    """The arguments of a forward call by name (positional ones named as the forward signature does)."""
    if not args:
        return dict(kwargs)
    return dict(inspect.signature(module.forward).bind_partial(*args, **kwargs).arguments)


# ----------------------------------------------------------------------------------------------------------------------
# The callback base
# ----------------------------------------------------------------------------------------------------------------------


def check_loss_hook_arguments(args, owner: str) -> None:
    """A callback that adds to the loss the model returns needs the loss computed inside the model, in one process
    per device: refuse the Trainer settings under which it would silently do nothing."""
    if args.n_gpu > 1:
        raise ValueError(f"{owner} does not support nn.DataParallel (several GPUs in one process, which the Trainer "
                         "uses without a distributed launch): launch with torchrun or accelerate (DDP)")
    if args.label_smoothing_factor > 0:
        raise ValueError(f"{owner} adds to the loss the model computes; with label_smoothing_factor > 0 the Trainer "
                         "computes the loss outside the model and the added term would do nothing")


def place_before_integrations(trainer):
    """Move every `LossTermCallback` of `trainer` right after DefaultFlowCallback, ahead of the report_to
    integrations, so that they receive the logged terms. Call it once the Trainer is built and its callbacks added:

        trainer = Trainer(..., callbacks=[SiFTCallback(adv_weight=5.0)])
        place_before_integrations(trainer)
        trainer.train()

    Returns the trainer."""
    callbacks = trainer.callback_handler.callbacks
    ours = [c for c in callbacks if isinstance(c, LossTermCallback)]
    for callback in ours:
        callbacks.remove(callback)
        callback.placed = True
    position = next((i + 1 for i, c in enumerate(callbacks) if isinstance(c, DefaultFlowCallback)), 0)
    callbacks[position:position] = ours
    return trainer


class LossTermCallback(TrainerCallback):
    """Base of the callbacks that hook a model's forward to add or log loss terms (module docstring).

    Subclasses implement `add_terms(module, inputs, outputs)` (called after every forward of the hooked model in
    training mode with gradients, extra passes excepted; it records terms with `record` and returns the changed
    outputs, or None), and optionally `setup(model)` / `teardown()` and `before_forward(module, acting)`.
    Logged: `{log_prefix}{name}` for each recorded name at every training log (the item-weighted mean since the
    previous log, over all processes), and `{summary_prefix}{log_prefix}{name}` over the whole run in the final
    training log (none when summary_prefix is None)."""

    log_prefix = ""
    summary_prefix: str | None = "train_"
    runs_first = False  # hook ahead of the other loss-term hooks on the model
    changes_loss = True  # refuse Trainer settings under which a changed model loss does nothing

    def __init__(self):
        self._handles: list = []
        self._window: dict[str, list] = {}  # name -> [sum of totals, sum of counts] on the device, since the last log
        self._total: dict[str, list] = {}  # the same over the training run
        self._warned: set[str] = set()
        self.placed = False  # set by place_before_integrations

    # -- installation ----------------------------------------------------------------------------------------------

    def install(self, model: nn.Module) -> None:
        """Hook `model` (the unwrapped module). Idempotent: an earlier installation is removed first."""
        self.remove()
        self.setup(model)
        self._handles += [
            model.register_forward_pre_hook(self._before_forward),
            model.register_forward_hook(self._after_forward, with_kwargs=True, prepend=self.runs_first),
        ]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.teardown()

    @property
    def installed(self) -> bool:
        return bool(self._handles)

    def setup(self, model: nn.Module) -> None:
        """Checks and hooks of a subclass, before the forward hooks (append extra handles to self._handles)."""

    def teardown(self) -> None:
        """Undo `setup` (handles in self._handles are removed already)."""

    # -- hooks -----------------------------------------------------------------------------------------------------

    @staticmethod
    def acting(module: nn.Module) -> bool:
        """Whether a pass of `module` gets loss terms: training mode, gradients on, not an extra pass."""
        return module.training and torch.is_grad_enabled() and not in_extra_passes(module)

    def _before_forward(self, module, args):
        self.before_forward(module, self.acting(module))

    def before_forward(self, module: nn.Module, acting: bool) -> None:
        """Called before every forward of the hooked model."""

    def _after_forward(self, module, args, kwargs, outputs):
        if not self.acting(module):
            return None
        return self.add_terms(module, call_arguments(module, args, kwargs), outputs)

    def add_terms(self, module: nn.Module, inputs: dict, outputs):
        raise NotImplementedError

    def warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            logger.warning(message)
            self._warned.add(key)

    # -- accumulators ----------------------------------------------------------------------------------------------

    def record(self, name: str, term: ItemMean | torch.Tensor) -> None:
        """Add a term (an ItemMean, or a tensor counted once) to the sums logged under `name`; no host read."""
        if not isinstance(term, ItemMean):
            term = ItemMean(term, torch.ones((), device=term.device))
        for accumulator in (self._window, self._total):
            entry = accumulator.setdefault(name, [0.0, 0.0])
            entry[0] = entry[0] + term.total.detach().float()
            entry[1] = entry[1] + term.count.detach().float()

    @staticmethod
    def _means(accumulator: dict[str, list]) -> dict[str, float]:
        """Sum over items / number of items of each term, over every process (they log at the same steps): one
        all-reduce and one host read."""
        names = sorted(accumulator)
        sums = torch.stack([torch.stack([accumulator[n][0], accumulator[n][1]]) for n in names])  # [terms, 2]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(sums)
        means = sums[:, 0] / sums[:, 1].clamp(min=1)
        return dict(zip(names, means.tolist(), strict=True))

    # -- Trainer events --------------------------------------------------------------------------------------------

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.changes_loss:
            check_loss_hook_arguments(args, type(self).__name__)
        integrations = [name for name in getattr(args, "report_to", None) or () if name and name != "none"]
        if integrations and not self.placed:
            self.warn_once("order", f"{type(self).__name__}: the report_to integrations ({', '.join(integrations)}) "
                                    "are called before it and will not receive its terms; call "
                                    "place_before_integrations(trainer) before trainer.train()")
        self.install(model)
        self._window, self._total = {}, {}

    def on_train_end(self, args, state, control, **kwargs):
        self.remove()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None:
            return
        if "loss" in logs and self._window:
            added = {self.log_prefix + name: value for name, value in self._means(self._window).items()}
            self._window = {}
        elif "train_loss" in logs and self._total and self.summary_prefix is not None:
            prefix = self.summary_prefix + self.log_prefix
            added = {prefix + name: value for name, value in self._means(self._total).items()}
        else:
            return
        add_to_logs(state, logs, added)


def add_to_logs(state, logs: dict, added: dict) -> None:
    """Add `added` to `logs` and to the copy of it that Trainer.log appended to the log history (with "step") before
    it called the callbacks."""
    entry = state.log_history[-1] if state.log_history else None
    if entry is not None and entry.get("step") == state.global_step and all(
            entry.get(key) == value for key, value in logs.items()):
        entry.update(added)
    logs.update(added)
