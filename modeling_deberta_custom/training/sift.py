"""SiFT, scale-invariant fine-tuning (DeBERTa paper §4), computed as the authors' code computes it
(DeBERTa/sift/sift.py: `hook_sift_layer` + `AdversarialLearner.loss`, used by DeBERTa/apps/run.py with --vat_lambda).

SiFT perturbs the *normalized* word embeddings, so one perturbation size fits every model. Step by step:

1. A forward pre-hook on `embeddings.LayerNorm` (`SiFTPerturbation`) replaces the LayerNorm's input x by
   LayerNorm_noaffine(x) (eps 1e-7) on every forward while SiFT is installed, the clean training pass included.
2. In adversarial mode the hook feeds normalized(x).detach() + delta instead: the perturbed passes reach every
   parameter from `embeddings.LayerNorm` on, but not the embedding tables. delta ~ N(0, 1e-2^2), clamped to
   +-2e-2, fp32, drawn from the global random stream at the first perturbed pass.
3. Ascent: with every parameter frozen, one perturbed forward (training mode, so fresh dropout masks),
   loss_fn(perturbed logits, clean logits detached).sum(), backward to delta;
   delta += 1e-4 * g / (1e-6 + max|g| over the hidden dimension), skipped when the norm of g is not finite.
4. Parameters unfrozen, a second perturbed forward (fresh dropout again). The adversarial loss is
   `symmetric_kl(perturbed logits, clean logits)` with the clean logits NOT detached, averaged over rows; the
   training loss is task loss + lambda * that (the recipes use lambda 3 for v3-xsmall, 5 otherwise).
5. `symmetric_kl` is the original's: sum(p_clean.detach() * -log p_pert) + sum(p_pert.detach() * -log p_clean),
   in fp32. Its value includes both entropies (it is not ~0 when the two predictions agree); its gradient pulls each
   side towards the other. Because the two passes draw different dropout masks, most of the term's gradient comes
   from dropout noise between them (a consistency regularizer), plus, through the clean side, a pull on the
   embedding table; the perturbation itself is a small part at these settings.

The perturbed passes get the clean pass's arguments, labels included (as run.py passes them). The ascent's `loss_fn`
is --vat_loss_fn ("symmetric-kl" by default, "kl", "mse"); the final term is always `symmetric_kl` over the last
dimension of the logits, rows being every other dimension. Multi-label heads are treated as one softmax over the
labels. Question answering (start and end logits; not in the original's apps): the ascent sums both, the final term
averages the two.

Where we depart from the authors' code, on purpose:

* Which rows are averaged, `average_over`. "positions" (the authors', the default): every row the head predicts,
  so token classification averages over every position, padding included, and the ascent sums over them all (a
  masked-LM head predicts only at the labelled positions, in the authors' code as in our sparse head). Under
  gradient accumulation with the Trainer's num_items_in_batch, each micro-batch's mean weighs by its share of the
  labelled items; no weighting makes a mean over positions that of the large batch, since padding differs between
  a large batch and its micro-batches. With unpad_inputs (the default) a padding position's logits are the head's
  bias in every pass: it counts in the mean, adds a constant and no gradient (the authors' padded model computes
  values there). "items" (ours): the items of the task loss (loss_terms.py), labelled tokens for token
  classification and masked-LM, the rows of sequence classification, in the ascent too; the sum over them is
  divided by num_items_in_batch when the Trainer passes it, so gradient accumulation gives the large batch's
  gradient for any labelling. Sequence-level heads, where every row is labelled, get the same term either way.
* Masked-LM heads with sparse logits ([K, V] at the labelled positions): the perturbed passes, which get the same
  labels, select the same positions; logits that cannot be paired raise (`align_logits`).
* One-logit (regression) heads, `regression_mode`. "authors" (the default): what the authors' code computes:
  their regression head flattens its logits to [B] when given labels, and their symmetric KL then reads them as one
  row of B classes, a softmax across the batch: a term of 2 ln B when all logits are equal, with a nonzero gradient
  when they differ. That looks accidental (their STS-B recipes do not use SiFT), and it depends on how a batch is
  split, so gradient accumulation cannot make it equal to the large batch. "zero" (ours): no term (the softmax of
  one logit is 1, so a row-wise symmetric KL is identically zero); the perturbed passes are skipped.
* `SiFTCallback(adv_weight=...)` defaults to 5, the authors' recipes' value (3 for v3-xsmall); their command-line
  default, 0, turns SiFT off.

Consequence of step 1 for the trained model: while SiFT is installed, `embeddings.LayerNorm` sees inputs already
normalized with eps 1e-7, which is the same as a LayerNorm whose epsilon is ~eps * var(x) instead of eps. Without
the hook (after training, or when the saved model is loaded) the LayerNorm uses its own eps again: the relative
change of its output is about eps / (2 var(x)), 1e-7 / (2 * 4e-4) ~ 1e-4 for embeddings initialized with std 0.02,
less once they grow; tests/test_sift.py checks that logits with and without the hook agree to 1e-3.

Use it with an unchanged `Trainer` (`place_before_integrations` lets report_to integrations log `sift_loss`):

    trainer = Trainer(..., callbacks=[SiFTCallback(adv_weight=5.0)])
    place_before_integrations(trainer)

or in a custom training loop through `SiFTPerturbation` and `sift_loss` (see its docstring).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .loss_terms import (
    ItemMean,
    LossTermCallback,
    align_logits,
    extra_passes,
    item_mask,
    item_mean,
    output_logits,
    place_before_integrations,
)

__all__ = [
    "symmetric_kl",
    "kl",
    "mse",
    "ASCENT_LOSSES",
    "REGRESSION_MODES",
    "AVERAGE_OVER",
    "initial_perturbation",
    "ascent_step",
    "SiFTPerturbation",
    "find_perturbed_module",
    "sift_loss",
    "sift_term",
    "SiFTCallback",
    "place_before_integrations",
]


# ----------------------------------------------------------------------------------------------------------------------
# The original's divergences: logits [..., K] are read as rows of K classes, in fp32
# ----------------------------------------------------------------------------------------------------------------------


def _rows(logits: torch.Tensor) -> torch.Tensor:
    """[..., K] -> [rows, K] in fp32 (float64 stays float64)."""
    return logits.reshape(-1, logits.shape[-1]).to(torch.promote_types(logits.dtype, torch.float32))


def symmetric_kl(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The original's symmetric KL, one value per row: CE(p_target, p_logits) + CE(p_logits, p_target) with both
    probabilities detached, [..., K] -> [rows]. Gradient: to `logits` from the first term, to `target` from the
    second (unless it is detached)."""
    log_p = F.log_softmax(_rows(logits), dim=-1)  # [rows, K]
    log_q = F.log_softmax(_rows(target), dim=-1)
    return (log_q.exp().detach() * -log_p).sum(-1) + (log_p.exp().detach() * -log_q).sum(-1)


def kl(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The original's `kl`: CE(p_target detached, p_logits) per row, [..., K] -> [rows]."""
    log_p = F.log_softmax(_rows(logits), dim=-1)
    q = F.softmax(_rows(target.detach()), dim=-1)
    return (q * -log_p).sum(-1)


def mse(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The original's `mse`: mean squared error over every element, a scalar."""
    return F.mse_loss(_rows(logits).reshape(-1), _rows(target).reshape(-1))


# The ascent step's loss, by the original's --vat_loss_fn names.
ASCENT_LOSSES = {"symmetric-kl": symmetric_kl, "kl": kl, "mse": mse}
# One-logit heads: "authors" (their code: a softmax across the batch) or "zero" (ours); see the module docstring.
REGRESSION_MODES = ("authors", "zero")
# Which rows the term averages: "positions" (the authors': every position the head predicts, padding included) or
# "items" (ours: the task loss's items, exact under gradient accumulation); see the module docstring.
AVERAGE_OVER = ("positions", "items")


# ----------------------------------------------------------------------------------------------------------------------
# The perturbation
# ----------------------------------------------------------------------------------------------------------------------


def initial_perturbation(shape, std: float = 1e-2, clamp: float | None = None, device=None,
                         generator: torch.Generator | None = None) -> torch.Tensor:
    """delta ~ N(0, std^2) clamped to +-clamp (default 2 * std), fp32; from the global random stream by default."""
    clamp = 2 * std if clamp is None else clamp
    delta = torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
    return (delta * std).clamp_(-clamp, clamp)


def ascent_step(delta: torch.Tensor, grad: torch.Tensor, step_size: float = 1e-4) -> torch.Tensor:
    """delta + step_size * g / (1e-6 + max|g| over the last (hidden) dimension), fp32, detached; delta unchanged when
    the norm of g is not finite (as the original). Decided on the device: no host read."""
    stepped = delta.detach() + step_size * grad / (1e-6 + grad.abs().amax(-1, keepdim=True))
    return torch.where(torch.isfinite(grad.norm()), stepped, delta.detach())


class SiFTPerturbation:
    """The original's perturbation layer as a forward pre-hook on a LayerNorm (normally `embeddings.LayerNorm`).

    Outside adversarial mode it replaces the LayerNorm's input x by LayerNorm_noaffine(x) (epsilon `eps`, 1e-7 as
    the original). In adversarial mode it feeds LayerNorm_noaffine(x).detach() + delta, in x's dtype; delta is drawn
    by `initial_perturbation` at the first adversarial call unless set, and requires grad (the ascent reads it).
    The embeddings before the LayerNorm are deterministic (no dropout), so normalizing x again in each perturbed pass
    gives the very tensor the original keeps from the clean pass.

        perturbation = SiFTPerturbation.install(model)   # hooks model's *embeddings.LayerNorm
        ...
        perturbation.remove()
    """

    def __init__(self, eps: float = 1e-7, init_perturbation: float = 1e-2, clamp: float | None = None):
        self.eps, self.init_perturbation, self.clamp = eps, init_perturbation, clamp
        self.adversarial = False
        self.delta: torch.Tensor | None = None
        self.module: nn.LayerNorm | None = None
        self._handle = None

    @classmethod
    def install(cls, model: nn.Module, perturbed_module: str | nn.Module | None = None, **settings):
        perturbation = cls(**settings)
        perturbation.module = find_perturbed_module(model, perturbed_module)
        perturbation._handle = perturbation.module.register_forward_pre_hook(perturbation)
        return perturbation

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    @property
    def installed(self) -> bool:
        return self._handle is not None

    def draw(self, x: torch.Tensor) -> torch.Tensor:
        """The initial perturbation for the LayerNorm input x [B, N, C] (`initial_perturbation`, from the global
        random stream); a subclass may draw otherwise."""
        return initial_perturbation(x.shape, self.init_perturbation, self.clamp, x.device)

    def __call__(self, module, args):
        x = args[0]
        compute = torch.promote_types(x.dtype, torch.float32)  # fp32 (float64 stays float64)
        normalized = F.layer_norm(x.to(compute), x.shape[-1:], eps=self.eps).to(x.dtype)
        if not self.adversarial:
            return (normalized,) + tuple(args[1:])
        if self.delta is None:
            self.delta = self.draw(x).requires_grad_()
        if tuple(self.delta.shape) != tuple(x.shape):
            raise ValueError(f"The perturbation has shape {tuple(self.delta.shape)}, the input {tuple(x.shape)}")
        return ((normalized.detach().to(self.delta.dtype) + self.delta).to(x.dtype),) + tuple(args[1:])


def find_perturbed_module(model: nn.Module, target: str | nn.Module | None = None) -> nn.LayerNorm:
    """The LayerNorm whose input SiFT perturbs. `target`: a module, a submodule name ("deberta.embeddings.LayerNorm"),
    a suffix of one ("embeddings.LayerNorm"), or None for the model's only `*embeddings.LayerNorm`."""
    if isinstance(target, nn.Module):
        module = target
    else:
        suffix = "embeddings.LayerNorm" if target is None else target
        names = dict(model.named_modules())
        if suffix in names:
            module = names[suffix]
        else:
            matches = [name for name in names if name.endswith("." + suffix)]
            if len(matches) != 1:
                raise ValueError(f"SiFT looks for one module named *{suffix} to perturb, found {matches or 'none'}; "
                                 "pass perturbed_module=<name or module>")
            module = names[matches[0]]
    if not isinstance(module, nn.LayerNorm):
        raise TypeError(f"SiFT perturbs the input of a LayerNorm (the normalized embeddings); got {type(module).__name__}")
    return module


# ----------------------------------------------------------------------------------------------------------------------
# The adversarial loss
# ----------------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _parameters_frozen(model: nn.Module):
    """Every parameter has requires_grad False inside (the ascent must not reach them), restored after."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _prediction_rows(logits: torch.Tensor, regression_mode: str) -> torch.Tensor:
    """The logits SiFT compares, [..., K]; a one-logit head under "authors": [B, 1] -> [1, B], one row of B classes
    (the authors' flattened regression logits read by their symmetric KL)."""
    if logits.shape[-1] == 1 and regression_mode == "authors":
        return logits.reshape(1, -1)
    return logits


def _only_items(logits: torch.Tensor, target: torch.Tensor, items: torch.Tensor | None) -> torch.Tensor:
    """`logits` at the items, `target` (detached: no gradient, no divergence to speak of) elsewhere."""
    return logits if items is None else torch.where(items[..., None], logits, target)


def _averaged_rows(labels, shape, average_over: str) -> torch.Tensor | None:
    """[shape] bool, the rows the term averages; None for every row. "positions": every row the head predicts, but
    of sparse masked-LM logits only the labelled ones (the rows past them fill a fixed budget; the authors' head
    has none). "items": the task loss's items."""
    items = item_mask(labels, shape)
    sparse = items is not None and len(tuple(shape)) == 1 and labels.dim() == 2
    return items if average_over == "items" or sparse else None


def _positions_mean(values: torch.Tensor, rows: torch.Tensor | None, labels) -> ItemMean:
    """The authors' average: the mean of per-row `values` over `rows` (every row when None), counted as this
    micro-batch's labelled items, so that with num_items_in_batch each micro-batch weighs by its share of them."""
    if rows is None:
        total, count = values.sum(), values.new_full((), values.numel())  # a fill, not a host-to-device copy
    else:
        total, count = torch.where(rows, values, 0).sum(), rows.sum()
    if not isinstance(labels, torch.Tensor):
        return ItemMean(total, count)
    labelled = (labels != -100).sum()
    return ItemMean(total / count.clamp(min=1) * labelled, labelled)


def sift_term(
    model: nn.Module,
    inputs: Mapping,
    clean_outputs,
    perturbation: SiFTPerturbation,
    *,
    loss_fn: str = "symmetric-kl",
    step_size: float = 1e-4,
    ascent_steps: int = 1,
    delta: torch.Tensor | None = None,
    regression_mode: str = "authors",
    average_over: str = "positions",
) -> ItemMean:
    """SiFT's adversarial term for one batch as (sum over the task's items, their number); `sift_loss` normalises it.
    Arguments as `sift_loss`."""
    if loss_fn not in ASCENT_LOSSES:
        raise ValueError(f"loss_fn must be one of {list(ASCENT_LOSSES)} (the original's --vat_loss_fn), got {loss_fn!r}")
    if regression_mode not in REGRESSION_MODES:
        raise ValueError(f"regression_mode must be one of {REGRESSION_MODES}, got {regression_mode!r}")
    if average_over not in AVERAGE_OVER:
        raise ValueError(f"average_over must be one of {AVERAGE_OVER}, got {average_over!r}")
    if not perturbation.installed:
        raise RuntimeError("sift_loss needs the SiFTPerturbation hook installed (before the clean forward)")
    labels = inputs.get("labels")
    clean = [_prediction_rows(c, regression_mode) for c in output_logits(clean_outputs)]
    if regression_mode == "zero" and any(c.shape[-1] == 1 for c in clean):
        zero = clean[0].new_zeros((), dtype=torch.promote_types(clean[0].dtype, torch.float32))
        return ItemMean(zero, torch.ones((), dtype=torch.long, device=zero.device))
    rows = [_averaged_rows(labels, c.shape[:-1], average_over) for c in clean]
    ascent_loss = ASCENT_LOSSES[loss_fn]

    def perturbed_logits() -> list[torch.Tensor]:
        outputs = output_logits(model(**inputs))
        return [align_logits(_prediction_rows(p, regression_mode), c, labels, ("perturbed pass", "clean pass"))
                for p, c in zip(outputs, clean, strict=True)]

    perturbation.adversarial = True
    perturbation.delta = None if delta is None else delta.detach().clone().requires_grad_()
    try:
        with extra_passes(model):
            with _parameters_frozen(model):
                for _ in range(ascent_steps):
                    divergence = sum(ascent_loss(_only_items(p, c.detach(), m), c.detach()).sum()
                                     for p, c, m in zip(perturbed_logits(), clean, rows, strict=True))
                    delta = perturbation.delta
                    if delta is None or not divergence.requires_grad:
                        raise RuntimeError(f"SiFT: the perturbed module {type(perturbation.module).__name__} is not on "
                                           "the path from the inputs to the predictions")
                    # backward rather than autograd.grad: reentrant gradient checkpointing supports only the former.
                    divergence.backward()
                    perturbation.delta = ascent_step(delta, delta.grad, step_size).requires_grad_()
            perturbed = perturbed_logits()
        values = [symmetric_kl(p, c).view(c.shape[:-1]) for p, c in zip(perturbed, clean, strict=True)]
        if average_over == "items":
            return ItemMean.average([item_mean(v, labels) for v in values])
        return ItemMean.average([_positions_mean(v, m, labels) for v, m in zip(values, rows, strict=True)])
    finally:
        perturbation.adversarial = False
        perturbation.delta = None


def sift_loss(
    model: nn.Module,
    inputs: Mapping,
    clean_outputs,
    perturbation: SiFTPerturbation,
    *,
    loss_fn: str = "symmetric-kl",
    step_size: float = 1e-4,
    ascent_steps: int = 1,
    delta: torch.Tensor | None = None,
    regression_mode: str = "authors",
    average_over: str = "positions",
) -> torch.Tensor:
    """SiFT's adversarial loss for one batch (a scalar with gradient to the model), as the original computes it:

        perturbation = SiFTPerturbation.install(model)  # before the clean pass: it normalizes its input too
        outputs = model(**batch)
        loss = outputs.loss + 5.0 * sift_loss(model, batch, outputs, perturbation)
        loss.backward()

    `model` is the module that produced `clean_outputs` from `inputs` through `perturbation` (for
    DistributedDataParallel, the wrapped `.module`: the perturbed passes run inside the step DDP synchronizes); the
    perturbed passes get the same `inputs`. The value is a mean over every position the head predicts (the authors',
    `average_over="positions"`) or over the task loss's items (`"items"`), then normalised for gradient accumulation
    with `inputs["num_items_in_batch"]` when present (module docstring). `loss_fn`: the ascent's
    loss (the original's --vat_loss_fn: "symmetric-kl", "kl" or "mse"); the returned term is always the original's
    `symmetric_kl`. `ascent_steps`: 1 as the original (0 skips the ascent; more repeat it). `delta`: the initial
    perturbation (default: drawn, see `SiFTPerturbation`). `regression_mode`: one-logit heads, "authors" or "zero"
    (module docstring). The perturbed passes run in the model's mode: in training mode they draw fresh dropout masks.
    """
    term = sift_term(model, inputs, clean_outputs, perturbation, loss_fn=loss_fn, step_size=step_size,
                     ascent_steps=ascent_steps, delta=delta, regression_mode=regression_mode,
                     average_over=average_over)
    return term.loss(inputs.get("num_items_in_batch"))


# ----------------------------------------------------------------------------------------------------------------------
# The Trainer callback
# ----------------------------------------------------------------------------------------------------------------------


class SiFTCallback(LossTermCallback):
    """Adds SiFT to an unchanged `transformers.Trainer`: `Trainer(..., callbacks=[SiFTCallback(adv_weight=5.0)])`.

    At `on_train_begin` it installs the `SiFTPerturbation` pre-hook on the model's `embeddings.LayerNorm` (from then
    on every forward normalizes the LayerNorm's input, evaluation during training included, as in the original) and
    a forward hook on the model that adds `adv_weight * sift_loss(...)` to `outputs.loss` whenever the model runs in
    training mode with gradients and a loss (the perturbed passes are extra passes: no hook acts on them).
    `on_train_end` removes both hooks (call `remove()` yourself if training stops on an exception). No module,
    parameter or buffer is added: `state_dict` and saving are unchanged. Gradient accumulation is exact with
    `average_over="items"` (the term is normalised as the task loss, see loss_terms.py); autocast (bf16/fp16), gradient checkpointing and
    DistributedDataParallel (the hooks sit on the wrapped module) need nothing else. Random draws (delta, dropout)
    come from the global random stream, which the Trainer saves in checkpoints: a resumed run draws as an
    uninterrupted one.

    Logged: `sift_loss`, the mean adversarial term per item since the last log, and `train_sift_loss` over the whole
    run in the final training log; summed on the device, read once per log. For report_to integrations to receive
    them, call `place_before_integrations(trainer)`.

    Settings (the original's names in brackets): `adv_weight` (vat_lambda; default 5, the recipes' value, module
    docstring), `init_perturbation` (vat_init_perturbation), `step_size` (vat_learning_rate), `loss_fn`
    (vat_loss_fn), `perturbation_clamp` (default 2 * init_perturbation, fixed in the original), `ascent_steps` (1 in
    the original), `eps` (1e-7 in the original), `perturbed_module` (see `find_perturbed_module`),
    `regression_mode` ("authors" or "zero", for one-logit heads), `average_over` ("positions", the authors', or
    "items"; module docstring).
    """

    log_prefix = "sift_"

    def __init__(self, adv_weight: float = 5.0, init_perturbation: float = 1e-2, step_size: float = 1e-4,
                 loss_fn: str = "symmetric-kl", perturbation_clamp: float | None = None, ascent_steps: int = 1,
                 eps: float = 1e-7, perturbed_module: str | nn.Module | None = None, regression_mode: str = "authors",
                 average_over: str = "positions"):
        super().__init__()
        if ascent_steps < 0:
            raise ValueError(f"ascent_steps must be >= 0, got {ascent_steps}")
        if loss_fn not in ASCENT_LOSSES:
            raise ValueError(f"loss_fn must be one of {list(ASCENT_LOSSES)}, got {loss_fn!r}")
        if regression_mode not in REGRESSION_MODES:
            raise ValueError(f"regression_mode must be one of {REGRESSION_MODES}, got {regression_mode!r}")
        if average_over not in AVERAGE_OVER:
            raise ValueError(f"average_over must be one of {AVERAGE_OVER}, got {average_over!r}")
        self.adv_weight = adv_weight
        self.perturbation_settings = dict(eps=eps, init_perturbation=init_perturbation, clamp=perturbation_clamp)
        self.loss_settings = dict(loss_fn=loss_fn, step_size=step_size, ascent_steps=ascent_steps,
                                  regression_mode=regression_mode, average_over=average_over)
        self.perturbed_module = perturbed_module
        self.perturbation: SiFTPerturbation | None = None

    def setup(self, model: nn.Module) -> None:
        self.perturbation = SiFTPerturbation.install(model, self.perturbed_module, **self.perturbation_settings)

    def teardown(self) -> None:
        if self.perturbation is not None:
            self.perturbation.remove()
            self.perturbation = None

    def add_terms(self, module, inputs, outputs):
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else None
        if loss is None:
            self.warn_once("loss", "SiFT: the model returned no loss in training mode (no labels, a tuple output, or "
                                   "a loss computed outside the model); the adversarial term is skipped")
            return None
        if any(p.shape[-1] == 1 for p in output_logits(outputs)):
            mode = self.loss_settings["regression_mode"]
            self.warn_once("one-logit", "SiFT on a one-logit (regression) head: " + (
                "no adversarial term (regression_mode='zero', our choice; 'authors' gives the authors' softmax "
                "across the batch)" if mode == "zero" else "the authors' term, a softmax of the logits across the "
                "batch (regression_mode='authors', the default; 'zero' for no term)"))
        term = sift_term(module, inputs, outputs, self.perturbation, **self.loss_settings)
        outputs["loss"] = loss + self.adv_weight * term.loss(inputs.get("num_items_in_batch")).to(loss.dtype)
        self.record("loss", term)
        return outputs
