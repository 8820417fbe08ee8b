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

How the original treats the heads, mirrored here: the ascent's `loss_fn` is --vat_loss_fn ("symmetric-kl" by
default, "kl", "mse"); the final term is always `symmetric_kl` over the last dimension of the logits, rows being
every other position (token classification: every token, padding included). Multi-label heads are treated as one
softmax over the labels. A one-logit regression head (STS-B) gets an identically zero term: the softmax of one logit
is 1, so both the ascent gradient and the final term vanish (SiFT then only costs time; the clean forward still
goes through the normalization of step 1). Question answering (start and end logits; not in the original's apps):
the ascent sums both, the final term averages the two.

Consequence of step 1 for the trained model: while SiFT is installed, `embeddings.LayerNorm` sees inputs already
normalized with eps 1e-7, which is the same as a LayerNorm whose epsilon is ~eps * var(x) instead of eps. Without
the hook (after training, or when the saved model is loaded) the LayerNorm uses its own eps again: the relative
change of its output is about eps / (2 var(x)), 1e-7 / (2 * 4e-4) ~ 1e-4 for embeddings initialized with std 0.02,
less once they grow; tests/test_sift.py checks that logits with and without the hook agree to 1e-3.

Use it with an unchanged `Trainer`: `Trainer(..., callbacks=[SiFTCallback(adv_weight=5.0)])`, or in a custom
training loop through `SiFTPerturbation` and `sift_loss` (see its docstring).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import sys
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn
from transformers import TrainerCallback
from transformers.trainer_callback import CallbackHandler, DefaultFlowCallback

logger = logging.getLogger(__name__)

# Keyword arguments of our heads (and transformers') that only feed the task loss: the perturbed passes drop them.
LABEL_ARGUMENTS = ("labels", "start_positions", "end_positions")


def share_of_optimizer_step(inputs: Mapping) -> torch.Tensor | float:
    """Weight that turns a term averaged over this micro-batch into its share of the Trainer's loss.

    For heads that accept `num_items_in_batch` (masked-LM, token classification, RTD) the Trainer passes the labelled
    items of every micro-batch of the optimizer step (and of every process, when it averages tokens across devices)
    and then neither divides the loss by the accumulation steps nor lets DDP's averaging shrink it: the head's loss is
    already a sum over items divided by that count. A per-micro-batch mean added to it would count accumulation-steps
    (x processes) times over; weighted by this micro-batch's labelled items over the step's count it enters as the
    same weighted mean (exact when the term averages over the labelled items). 1 when no count is passed."""
    num_items = inputs.get("num_items_in_batch")
    labels = inputs.get("labels")
    if num_items is None or labels is None:
        return 1.0
    return labels.ne(-100).sum() / num_items

__all__ = [
    "symmetric_kl",
    "kl",
    "mse",
    "ASCENT_LOSSES",
    "initial_perturbation",
    "ascent_step",
    "SiFTPerturbation",
    "find_perturbed_module",
    "sift_loss",
    "SiFTCallback",
    "share_of_optimizer_step",
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


def check_loss_hook_arguments(args, owner: str) -> None:
    """A callback that adds to the loss the model returns needs the loss computed inside the model, in one process
    per device: refuse the Trainer settings under which it would silently do nothing."""
    if args.n_gpu > 1:
        raise ValueError(f"{owner} does not support nn.DataParallel (several GPUs in one process, which the Trainer "
                         "uses without a distributed launch): launch with torchrun or accelerate (DDP)")
    if args.label_smoothing_factor > 0:
        raise ValueError(f"{owner} adds to the loss the model computes; with label_smoothing_factor > 0 the Trainer "
                         "computes the loss outside the model and the added term would do nothing")


def move_ahead_of_integrations(callback: TrainerCallback) -> bool:
    """Place `callback` right after DefaultFlowCallback in the CallbackHandler whose event is running; False when no
    handler is calling.

    The Trainer calls callbacks in list order: DefaultFlowCallback, the report_to integrations, then the callbacks
    given to it, so the integrations would see `logs` before the callback adds its terms. A callback gets no reference
    to its handler; the handler is up the call stack (CallbackHandler.call_event). Moving an entry from after the
    current position to before it leaves the remaining iteration unchanged."""
    frame = sys._getframe(1)
    while frame is not None and not isinstance(frame.f_locals.get("self"), CallbackHandler):
        frame = frame.f_back
    if frame is None:
        return False
    callbacks = frame.f_locals["self"].callbacks
    callbacks.remove(callback)
    position = next((i + 1 for i, c in enumerate(callbacks) if isinstance(c, DefaultFlowCallback)), 0)
    callbacks.insert(position, callback)
    return True


# The ascent step's loss, by the original's --vat_loss_fn names.
ASCENT_LOSSES = {"symmetric-kl": symmetric_kl, "kl": kl, "mse": mse}


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

    def __call__(self, module, args):
        x = args[0]
        compute = torch.promote_types(x.dtype, torch.float32)  # fp32 (float64 stays float64)
        normalized = F.layer_norm(x.to(compute), x.shape[-1:], eps=self.eps).to(x.dtype)
        if not self.adversarial:
            return (normalized,) + tuple(args[1:])
        if self.delta is None:
            self.delta = initial_perturbation(x.shape, self.init_perturbation, self.clamp, x.device).requires_grad_()
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
) -> torch.Tensor:
    """SiFT's adversarial loss for one batch (a scalar with gradient to the model), as the original computes it:

        perturbation = SiFTPerturbation.install(model)  # before the clean pass: it normalizes its input too
        outputs = model(**batch)
        loss = outputs.loss + 5.0 * sift_loss(model, batch, outputs, perturbation)
        loss.backward()

    `model` is the module that produced `clean_outputs` from `inputs` through `perturbation` (for
    DistributedDataParallel, the wrapped `.module`: the perturbed passes run inside the step DDP synchronizes). Label
    arguments are dropped from the perturbed passes. `loss_fn`: the ascent's loss (the original's --vat_loss_fn:
    "symmetric-kl", "kl" or "mse"); the returned term is always the original's `symmetric_kl`. `ascent_steps`:
    1 as the original (0 skips the ascent; more repeat it). `delta`: the initial perturbation (default: drawn, see
    `SiFTPerturbation`). The perturbed passes run in the model's mode: in training mode they draw fresh dropout masks.
    """
    if loss_fn not in ASCENT_LOSSES:
        raise ValueError(f"loss_fn must be one of {list(ASCENT_LOSSES)} (the original's --vat_loss_fn), got {loss_fn!r}")
    if not perturbation.installed:
        raise RuntimeError("sift_loss needs the SiFTPerturbation hook installed (before the clean forward)")
    ascent_loss = ASCENT_LOSSES[loss_fn]
    perturbed_inputs = {k: v for k, v in inputs.items() if k not in LABEL_ARGUMENTS}
    clean = output_logits(clean_outputs)
    perturbation.adversarial = True
    perturbation.delta = None if delta is None else delta.detach().clone().requires_grad_()
    try:
        with _parameters_frozen(model):
            for _ in range(ascent_steps):
                perturbed = output_logits(model(**perturbed_inputs))
                divergence = sum(ascent_loss(p, c.detach()).sum() for p, c in zip(perturbed, clean, strict=True))
                delta = perturbation.delta
                if delta is None or not divergence.requires_grad:
                    raise RuntimeError(f"SiFT: the perturbed module {type(perturbation.module).__name__} is not on the "
                                       "path from the inputs to the predictions")
                # backward rather than autograd.grad: reentrant gradient checkpointing supports only the former.
                divergence.backward()
                perturbation.delta = ascent_step(delta, delta.grad, step_size).requires_grad_()
        perturbed = output_logits(model(**perturbed_inputs))
        return sum(symmetric_kl(p, c).mean() for p, c in zip(perturbed, clean, strict=True)) / len(clean)
    finally:
        perturbation.adversarial = False
        perturbation.delta = None


# ----------------------------------------------------------------------------------------------------------------------
# The Trainer callback
# ----------------------------------------------------------------------------------------------------------------------


class SiFTCallback(TrainerCallback):
    """Adds SiFT to an unchanged `transformers.Trainer`: `Trainer(..., callbacks=[SiFTCallback(adv_weight=5.0)])`.

    At `on_train_begin` it installs the `SiFTPerturbation` pre-hook on the model's `embeddings.LayerNorm` (from then
    on every forward normalizes the LayerNorm's input, evaluation during training included, as in the original) and
    a forward hook on the model that adds `adv_weight * sift_loss(...)` to `outputs.loss` whenever the model runs in
    training mode with gradients and a loss. The perturbed passes re-enter the model; a flag keeps the hook from
    acting on them. `on_train_end` removes both hooks (call `remove()` yourself if training stops on an exception).
    No module, parameter or buffer is added: `state_dict` and saving are unchanged. Because the loss changes inside
    the model's forward, gradient accumulation, autocast (bf16/fp16), gradient checkpointing and
    DistributedDataParallel (the hooks sit on the wrapped module) need nothing else. Random draws (delta, dropout)
    come from the global random stream, which the Trainer saves in checkpoints: a resumed run draws as an
    uninterrupted one.

    The mean adversarial loss since the last log is added to the Trainer's logs as `sift_loss`, and its mean over
    training as `train_sift_loss` in the final training log. The values are summed on the device and read once per
    log. So that the report_to integrations (TensorBoard, W&B, ...) receive them, the callback moves itself ahead of
    them in the Trainer's callback list at `on_train_begin`.

    Settings (the original's names in brackets): `adv_weight` (vat_lambda), `init_perturbation`
    (vat_init_perturbation), `step_size` (vat_learning_rate), `loss_fn` (vat_loss_fn), `perturbation_clamp`
    (default 2 * init_perturbation, fixed in the original), `ascent_steps` (1 in the original), `eps` (1e-7 in the
    original), `perturbed_module` (see `find_perturbed_module`).
    """

    def __init__(self, adv_weight: float = 1.0, init_perturbation: float = 1e-2, step_size: float = 1e-4,
                 loss_fn: str = "symmetric-kl", perturbation_clamp: float | None = None, ascent_steps: int = 1,
                 eps: float = 1e-7, perturbed_module: str | nn.Module | None = None):
        if ascent_steps < 0:
            raise ValueError(f"ascent_steps must be >= 0, got {ascent_steps}")
        if loss_fn not in ASCENT_LOSSES:
            raise ValueError(f"loss_fn must be one of {list(ASCENT_LOSSES)}, got {loss_fn!r}")
        self.adv_weight = adv_weight
        self.perturbation_settings = dict(eps=eps, init_perturbation=init_perturbation, clamp=perturbation_clamp)
        self.loss_settings = dict(loss_fn=loss_fn, step_size=step_size, ascent_steps=ascent_steps)
        self.perturbed_module = perturbed_module
        self.perturbation: SiFTPerturbation | None = None
        self._handle = None
        self._inside = False  # within the perturbed passes
        self._warned: set[str] = set()
        self._window = [0.0, 0]  # adversarial loss summed since the last log (a device tensor), number of passes
        self._total = [0.0, 0]  # the same over the whole training run

    # -- hooks ---------------------------------------------------------------------------------------------------

    def install(self, model: nn.Module) -> None:
        """Hook `model` (the unwrapped module). Idempotent: an earlier installation is removed first."""
        self.remove()
        self.perturbation = SiFTPerturbation.install(model, self.perturbed_module, **self.perturbation_settings)
        self._handle = model.register_forward_hook(self._after_forward, with_kwargs=True)

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        if self.perturbation is not None:
            self.perturbation.remove()
            self.perturbation = None

    @property
    def installed(self) -> bool:
        return self._handle is not None

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            logger.warning(message)
            self._warned.add(key)

    def _after_forward(self, module, args, kwargs, outputs):
        if self._inside or not module.training or not torch.is_grad_enabled():
            return None
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else None
        if loss is None:
            self._warn_once("loss", "SiFT: the model returned no loss in training mode (no labels, a tuple output, or "
                                    "a loss computed outside the model); the adversarial term is skipped")
            return None
        if any(p.shape[-1] == 1 for p in output_logits(outputs)):
            self._warn_once("one-logit", "SiFT: a one-logit (regression) head; the original's symmetric KL of a "
                                         "one-logit softmax is identically zero, so the adversarial term is zero")
        inputs = dict(kwargs)
        if args:  # name positional arguments as the forward signature does
            inputs = dict(inspect.signature(module.forward).bind_partial(*args, **kwargs).arguments)
        self._inside = True
        try:
            adversarial = sift_loss(module, inputs, outputs, self.perturbation, **self.loss_settings)
        finally:
            self._inside = False
        outputs["loss"] = loss + self.adv_weight * share_of_optimizer_step(inputs) * adversarial.to(loss.dtype)
        for accumulator in (self._window, self._total):
            accumulator[0] = accumulator[0] + adversarial.detach().float()
            accumulator[1] += 1
        return outputs

    # -- Trainer events --------------------------------------------------------------------------------------------

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        check_loss_hook_arguments(args, "SiFTCallback")
        if not move_ahead_of_integrations(self):
            self._warn_once("order", "SiFT: not called by a transformers CallbackHandler; `sift_loss` reaches the logs "
                                     "only after the report_to integrations have run")
        self.install(model)
        self._window, self._total = [0.0, 0], [0.0, 0]

    def on_train_end(self, args, state, control, **kwargs):
        self.remove()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None:
            return
        if "loss" in logs and self._window[1] > 0:
            self._add_to_logs(state, logs, "sift_loss", self._mean_over_processes(*self._window))
            self._window = [0.0, 0]
        elif "train_loss" in logs and self._total[1] > 0:
            self._add_to_logs(state, logs, "train_sift_loss", self._mean_over_processes(*self._total))

    @staticmethod
    def _mean_over_processes(total: torch.Tensor, count: int) -> float:
        """Mean per forward pass over every process (all processes log at the same steps)."""
        value = total / count
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(value)
            value = value / torch.distributed.get_world_size()
        return value.item()

    @staticmethod
    def _add_to_logs(state, logs, key, value):
        logs[key] = value
        # Trainer.log appended a copy of `logs` to the history before calling the callbacks: complete it too.
        if state.log_history and all(state.log_history[-1].get(k) == v for k, v in logs.items() if k != key):
            state.log_history[-1][key] = value
