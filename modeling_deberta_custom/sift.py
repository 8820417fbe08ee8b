"""SiFT, scale-invariant fine-tuning (DeBERTa paper §4; the original code is DeBERTa/sift/sift.py).

SiFT perturbs the *normalized* word embeddings instead of the raw ones, so one perturbation size fits every model:
the input x of `embeddings.LayerNorm`, normalized without affine, gets a small delta. From delta ~ N(0, 1e-2)
(clamped to +-2e-2) one normalized ascent step

    delta += step_size * g / (1e-6 + max|g| over the hidden dimension),  g = d divergence / d delta,

moves it towards the largest change of the predictions; the model parameters get no gradient from that step. The
adversarial loss is then the divergence between the predictions with the stepped delta and the clean predictions,
added to the task loss with weight lambda (the recipes use 3 to 5).

Choices made here, and why:
- Perturbing normalize(x) + delta is implemented as replacing x by x + sigma(x) * delta, with sigma(x) the
  standard deviation LayerNorm divides by. LayerNorm is invariant to shift and positive scale, so both give the
  same LayerNorm output (up to the LayerNorm epsilon), and with delta = 0 the perturbed pass is *exactly* the clean
  pass, so a zero perturbation gives an adversarial loss of exactly zero. The embeddings are recomputed in the
  perturbed passes, so the adversarial loss also reaches the embedding table (the original code detaches it).
- The perturbed passes replay the random state of the clean pass: they use the same dropout masks. The divergence
  then measures the effect of delta alone; with fresh masks it would also measure dropout noise (a consistency
  regularizer on top of SiFT), and delta = 0 would not give zero. Pass `same_dropout=False` for fresh masks.
- Divergences are computed in fp32: symmetric KL for classification (sequences, tokens, choices; start and end
  distributions for question answering, averaged), squared error for a one-logit regression head (the KL of a
  one-logit softmax is identically zero), and the symmetric Bernoulli KL for multi-label heads.
- The ascent step uses the divergence summed over the batch (as the original code): the step is normalized by
  max|g|, so the sum only keeps gradients of small batches clear of the 1e-6 floor. The adversarial loss added to
  the task loss is the mean over examples (over real tokens for token classification).

Use it with an unchanged `Trainer`: `Trainer(..., callbacks=[SiFTCallback(adv_weight=3.0)])`, or in a custom
training loop through `sift_loss` (see its docstring).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn
from transformers import TrainerCallback

logger = logging.getLogger(__name__)

# Keyword arguments of our heads (and transformers') that only feed the task loss: the perturbed passes drop them.
LABEL_ARGUMENTS = ("labels", "start_positions", "end_positions")

__all__ = [
    "symmetric_kl",
    "symmetric_bernoulli_kl",
    "squared_error",
    "output_divergence",
    "initial_perturbation",
    "ascent_step",
    "NormalizedPerturbation",
    "find_perturbed_module",
    "capture_rng_state",
    "restore_rng_state",
    "sift_loss",
    "SiFTCallback",
]


# ----------------------------------------------------------------------------------------------------------------------
# Divergences (fp32, one value per row of the last dimension)
# ----------------------------------------------------------------------------------------------------------------------


def symmetric_kl(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """KL(p || q) + KL(q || p) of the softmax distributions over the last dimension, in fp32: [..., K] -> [...].
    Equals sum_k (p_k - q_k)(log p_k - log q_k); exactly zero when both logits are equal."""
    log_p = F.log_softmax(logits.float(), dim=-1)
    log_q = F.log_softmax(target.float(), dim=-1)
    return ((log_p.exp() - log_q.exp()) * (log_p - log_q)).sum(-1)


def symmetric_bernoulli_kl(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Symmetric KL of independent Bernoulli labels (multi-label heads), summed over the last dimension, in fp32.
    For Bernoulli distributions KL(p || q) + KL(q || p) = (p - q)(logit p - logit q)."""
    logits, target = logits.float(), target.float()
    return ((torch.sigmoid(logits) - torch.sigmoid(target)) * (logits - target)).sum(-1)


def squared_error(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared error summed over the last dimension, in fp32: the divergence for a one-logit regression head."""
    return (prediction.float() - target.float()).pow(2).sum(-1)


def _divergence_function(logits: torch.Tensor, problem_type: str | None):
    if logits.shape[-1] == 1:
        return squared_error
    if problem_type == "multi_label_classification":
        return symmetric_bernoulli_kl
    return symmetric_kl


def _predictions(outputs) -> list[torch.Tensor]:
    """The prediction tensors of a head's output: [start_logits, end_logits] for question answering, else [logits]."""
    if not isinstance(outputs, Mapping):
        raise TypeError(f"SiFT reads model outputs as a ModelOutput or dict, got {type(outputs).__name__} "
                        "(call the model with return_dict=True)")
    if outputs.get("start_logits") is not None:
        return [outputs["start_logits"], outputs["end_logits"]]
    if outputs.get("logits") is not None:
        return [outputs["logits"]]
    raise ValueError(f"SiFT needs `logits` (or `start_logits`/`end_logits`) in the model output, got {list(outputs)}")


def output_divergence(perturbed, clean, *, problem_type: str | None = None, token_mask: torch.Tensor | None = None,
                      reduction: str = "mean") -> torch.Tensor:
    """Divergence between two outputs of the same head, in fp32 (see the module docstring for the choice per head).

    Per-token predictions ([B, N, K], token classification) are averaged over the positions where `token_mask` is
    1 when it is given with shape [B, N]. Question answering averages the start and end divergences.
    `reduction`: "mean" over examples (or tokens), or "sum".
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    pairs = list(zip(_predictions(perturbed), _predictions(clean), strict=True))
    total = 0.0
    for perturbed_logits, clean_logits in pairs:
        values = _divergence_function(clean_logits, problem_type)(perturbed_logits, clean_logits)  # [B] or [B, N]
        if token_mask is not None and values.dim() == 2 and tuple(token_mask.shape) == tuple(values.shape):
            weights = token_mask.to(values.dtype)
            summed, count = (values * weights).sum(), weights.sum().clamp_min(1.0)
        else:
            summed, count = values.sum(), max(values.numel(), 1)
        total = total + (summed / count if reduction == "mean" else summed)
    return total / len(pairs)


# ----------------------------------------------------------------------------------------------------------------------
# The perturbation
# ----------------------------------------------------------------------------------------------------------------------


def initial_perturbation(shape, std: float = 1e-2, clamp: float | None = None, generator: torch.Generator | None = None,
                         device=None) -> torch.Tensor:
    """delta ~ N(0, std^2) clamped to +-clamp (default 2 * std), fp32."""
    clamp = 2 * std if clamp is None else clamp
    device = generator.device if generator is not None else device
    delta = torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
    return (delta * std).clamp_(-clamp, clamp)


def ascent_step(delta: torch.Tensor, grad: torch.Tensor, step_size: float = 1e-4) -> torch.Tensor:
    """delta + step_size * g / (1e-6 + max|g| over the last (hidden) dimension), detached, fp32. Non-finite
    gradient entries count as zero (the original code skips a step whose gradient norm is not finite)."""
    grad = torch.nan_to_num(grad.float(), nan=0.0, posinf=0.0, neginf=0.0)
    return (delta.detach().float() + step_size * grad / (1e-6 + grad.abs().amax(-1, keepdim=True))).detach()


class NormalizedPerturbation:
    """Forward pre-hook for a LayerNorm: replaces its input x by x + sigma(x) * delta, sigma(x) being the standard
    deviation the LayerNorm divides by, so that its output is LayerNorm(normalize(x) + delta) (up to epsilon).

    delta is drawn from `initial_perturbation` (with `generator`) at the first call, with the shape of x, unless it
    was set; `requires_grad` makes a freshly drawn delta a leaf that collects the ascent gradient."""

    def __init__(self, eps: float, std: float = 1e-2, clamp: float | None = None,
                 generator: torch.Generator | None = None, requires_grad: bool = False):
        self.eps, self.std, self.clamp, self.generator = eps, std, clamp, generator
        self.requires_grad = requires_grad
        self.delta: torch.Tensor | None = None

    def __call__(self, module, args):
        x = args[0]
        if self.delta is None:
            self.delta = initial_perturbation(x.shape, self.std, self.clamp, self.generator, x.device)
            self.delta = self.delta.to(x.device).requires_grad_(self.requires_grad)
        if tuple(self.delta.shape) != tuple(x.shape):
            raise ValueError(f"The perturbation has shape {tuple(self.delta.shape)}, the input {tuple(x.shape)}")
        x32 = x.float()
        sigma = torch.sqrt(x32.var(-1, unbiased=False, keepdim=True) + self.eps)  # [..., 1]
        return ((x32 + sigma * self.delta).to(x.dtype),) + tuple(args[1:])


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
# Random state: the perturbed passes replay the dropout masks of the clean pass
# ----------------------------------------------------------------------------------------------------------------------


def capture_rng_state(device: torch.device | str) -> dict:
    """The CPU random state, plus the accelerator's for a model on one (what dropout draws from)."""
    device = torch.device(device)
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = (device, torch.cuda.get_rng_state(device))
    elif device.type != "cpu" and hasattr(torch, device.type):
        state[device.type] = (device, getattr(torch, device.type).get_rng_state())
    return state


def restore_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    for kind, (device, value) in ((k, v) for k, v in state.items() if k != "cpu"):
        if kind == "cuda":
            torch.cuda.set_rng_state(value, device)
        else:
            getattr(torch, kind).set_rng_state(value)


# ----------------------------------------------------------------------------------------------------------------------
# The adversarial loss
# ----------------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _parameters_frozen(model: nn.Module):
    """Every parameter has requires_grad False inside (the ascent step must not reach them), restored after."""
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
    *,
    perturbed_module: str | nn.Module | None = None,
    init_perturbation: float = 1e-2,
    perturbation_clamp: float | None = None,
    step_size: float = 1e-4,
    ascent_steps: int = 1,
    rng_state: dict | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """SiFT's adversarial loss for one batch (a scalar with gradient to the model), for custom training loops:

        rng = capture_rng_state(device)            # optional: replay the clean pass's dropout masks
        outputs = model(**batch)
        loss = outputs.loss + 3.0 * sift_loss(model, batch, outputs, rng_state=rng)
        loss.backward()

    `model` is the module that produced `clean_outputs` from `inputs` (for DistributedDataParallel, the wrapped
    `.module`: the perturbed passes run inside the step that DDP synchronizes). Label arguments are dropped from the
    perturbed passes. `ascent_steps` ascent steps (each one forward and backward with every parameter frozen), then
    one perturbed forward whose divergence from `clean_outputs` (not detached, as in the original code) is returned.
    `rng_state`: the random state captured just before the clean forward; the perturbed passes then use the same
    dropout masks, and the random state after this call is the one after the clean pass. Without it they draw fresh
    masks. `generator` draws the initial perturbation; without one, a generator is seeded with a number drawn from
    the global random state (which that draw advances).
    """
    module = find_perturbed_module(model, perturbed_module)
    perturbed_inputs = {k: v for k, v in inputs.items() if k not in LABEL_ARGUMENTS}
    config = getattr(model, "config", None)  # a plain nn.Module has none
    problem_type = config.problem_type if config is not None else None
    token_mask = inputs.get("attention_mask")
    clean_detached = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in clean_outputs.items()}
    device = next(model.parameters()).device
    if generator is None:
        generator = torch.Generator(device=device).manual_seed(int(torch.randint(2**62, (1,)).item()))
    state_after = capture_rng_state(device) if rng_state is not None else None

    perturbation = NormalizedPerturbation(module.eps, init_perturbation, perturbation_clamp, generator,
                                          requires_grad=ascent_steps > 0)
    handle = module.register_forward_pre_hook(perturbation)
    try:
        for _ in range(ascent_steps):
            if rng_state is not None:
                restore_rng_state(rng_state)
            with _parameters_frozen(model):
                divergence = output_divergence(model(**perturbed_inputs), clean_detached, problem_type=problem_type,
                                               token_mask=token_mask, reduction="sum")
                delta = perturbation.delta
                if delta is None or not divergence.requires_grad:
                    raise RuntimeError(f"SiFT: the perturbed module {type(module).__name__} is not on the path from "
                                       "the inputs to the predictions")
                # backward rather than autograd.grad: reentrant gradient checkpointing supports only the former.
                divergence.backward()
            perturbation.delta = ascent_step(delta, delta.grad, step_size)
        if rng_state is not None:
            restore_rng_state(rng_state)
        if perturbation.delta is not None:
            perturbation.delta = perturbation.delta.detach()
        perturbation.requires_grad = False
        return output_divergence(model(**perturbed_inputs), clean_outputs, problem_type=problem_type,
                                 token_mask=token_mask, reduction="mean")
    finally:
        handle.remove()
        if state_after is not None:
            restore_rng_state(state_after)


# ----------------------------------------------------------------------------------------------------------------------
# The Trainer callback
# ----------------------------------------------------------------------------------------------------------------------


class SiFTCallback(TrainerCallback):
    """Adds SiFT to an unchanged `transformers.Trainer`: `Trainer(..., callbacks=[SiFTCallback(adv_weight=3.0)])`.

    At `on_train_begin` it hooks the model: a forward pre-hook keeps the random state before each training forward,
    and a forward hook adds `adv_weight * sift_loss(...)` to `outputs.loss` whenever the model runs in training
    mode with gradients and a loss (so evaluation and prediction are untouched). The perturbed passes re-enter the
    model; a flag keeps the hooks from acting on them. `on_train_end` removes both hooks (call `remove()` yourself
    if training stops on an exception). No module, parameter or buffer is added: `state_dict` and saving are
    unchanged. Because the loss changes inside the model's forward, gradient accumulation, autocast (bf16/fp16),
    gradient checkpointing and DistributedDataParallel (the hooks sit on the wrapped module) need nothing else.

    The mean adversarial loss since the last log is written into the Trainer's logs as `sift_loss` (and into
    `state.log_history`; the progress bar prints it, report_to integrations run before callbacks and miss it), and
    the mean over training as `train_sift_loss` in the final training log.

    Settings: `adv_weight` (lambda), `init_perturbation` (std of delta), `perturbation_clamp` (default 2 * std),
    `step_size`, `ascent_steps`, `perturbed_module` (see `find_perturbed_module`), `same_dropout` (replay the
    clean pass's dropout masks in the perturbed passes; see the module docstring).
    """

    def __init__(self, adv_weight: float = 1.0, init_perturbation: float = 1e-2, perturbation_clamp: float | None = None,
                 step_size: float = 1e-4, ascent_steps: int = 1, perturbed_module: str | nn.Module | None = None,
                 same_dropout: bool = True):
        if ascent_steps < 0:
            raise ValueError(f"ascent_steps must be >= 0, got {ascent_steps}")
        self.adv_weight = adv_weight
        self.settings = dict(perturbed_module=perturbed_module, init_perturbation=init_perturbation,
                             perturbation_clamp=perturbation_clamp, step_size=step_size, ascent_steps=ascent_steps)
        self.same_dropout = same_dropout
        self._handles: list = []
        self._inside = False  # within the perturbed passes
        self._rng_state = None  # the random state before the current clean forward
        self._generators: dict = {}
        self._seed = 0
        self._warned = False
        self._window = [0.0, 0]  # adversarial loss summed since the last log, and the number of steps in it
        self._total = [0.0, 0]  # the same over the whole training run

    # -- hooks ---------------------------------------------------------------------------------------------------

    def install(self, model: nn.Module, seed: int = 0) -> None:
        """Hook `model` (the unwrapped module). Idempotent: an earlier installation is removed first."""
        self.remove()
        find_perturbed_module(model, self.settings["perturbed_module"])  # fail now, not at the first step
        self._seed = seed
        self._handles = [
            model.register_forward_pre_hook(self._before_forward),
            model.register_forward_hook(self._after_forward, with_kwargs=True),
        ]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @property
    def installed(self) -> bool:
        return bool(self._handles)

    def _active(self, module) -> bool:
        return not self._inside and module.training and torch.is_grad_enabled()

    def _before_forward(self, module, args):
        if self._active(module):
            self._rng_state = capture_rng_state(next(module.parameters()).device) if self.same_dropout else None

    def _generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        if key not in self._generators:  # its own stream: drawing delta leaves the global random state alone
            self._generators[key] = torch.Generator(device=device).manual_seed(self._seed)
        return self._generators[key]

    def reseed(self, seed: int, step: int) -> None:
        """Restart the perturbation stream at (seed, optimizer step): a run resumed from a checkpoint then draws the
        same perturbations as an uninterrupted one, without the stream's state being saved."""
        self._seed = seed * 2**32 + step
        for generator in self._generators.values():
            generator.manual_seed(self._seed)

    def _after_forward(self, module, args, kwargs, outputs):
        if not self._active(module):
            return None
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else None
        if loss is None:
            if not self._warned:
                logger.warning("SiFT: the model returned no loss in training mode (no labels, a tuple output, or a "
                               "loss computed outside the model); the adversarial term is skipped")
                self._warned = True
            return None
        inputs = dict(kwargs)
        if args:  # name positional arguments as the forward signature does
            inputs = dict(inspect.signature(module.forward).bind_partial(*args, **kwargs).arguments)
        self._inside = True
        try:
            adversarial = sift_loss(module, inputs, outputs, rng_state=self._rng_state,
                                    generator=self._generator(next(module.parameters()).device), **self.settings)
        finally:
            self._inside = False
            self._rng_state = None
        outputs["loss"] = loss + self.adv_weight * adversarial.to(loss.dtype)
        for accumulator in (self._window, self._total):
            accumulator[0] = accumulator[0] + adversarial.detach().float()
            accumulator[1] += 1
        return outputs

    # -- Trainer events --------------------------------------------------------------------------------------------

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if args.n_gpu > 1:
            raise ValueError("SiFTCallback does not support nn.DataParallel (several GPUs in one process, which the "
                             "Trainer uses without a distributed launch): launch with torchrun or accelerate (DDP)")
        if args.label_smoothing_factor > 0:
            raise ValueError("SiFTCallback adds to the loss the model computes; with label_smoothing_factor > 0 the "
                             "Trainer computes the loss outside the model and SiFT would do nothing")
        self.install(model, seed=args.seed + args.process_index)
        self._window, self._total = [0.0, 0], [0.0, 0]

    def on_step_begin(self, args, state, control, **kwargs):
        self.reseed(args.seed + args.process_index, state.global_step)

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
