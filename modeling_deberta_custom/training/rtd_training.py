"""Decoupled RTD training: the generator and the discriminator each with their own learning rate, gradient clip and
optimizer step, under an unchanged `transformers.Trainer`.

DeBERTaV3's authors train replaced-token detection this way by default (`--decoupled_training True` in every rtd.sh
recipe of microsoft/DeBERTa): one trainer per model, the generator stepped on its MLM loss, the discriminator on
rtd_lambda * RTD loss, each optimizer clipping its own model's gradient norm (max_grad_norm 1) and each with its own
learning rate (`--discriminator_learning_rate`, the generator's being `--learning_rate`), on one warmup/decay shape.

Joint training (one optimizer, one global clip on MLM + lambda * RTD: what the Trainer does with this model and no
optimizer given) is a different algorithm: at initialisation the discriminator's gradient, scaled by lambda = 50, is
many times the generator's, so a global clip at 1 shrinks the generator's step by about that factor more than a
per-model clip does (measured at initialisation: 8.5x on the README's tiny demo, 19-24x on the xsmall geometry with
the 128k vocabulary), and by less later in training. Pick joint to reproduce earlier runs of this package, or where
decoupling cannot apply (DeepSpeed, FSDP: see `check_decoupled_training_supported`).

How decoupling fits the unchanged Trainer. One forward pass gives loss = MLM + lambda * RTD. Under gdes and none
the two terms' gradients are already separate: the RTD loss never reaches a generator parameter (the discriminator
reads stop_gradient(E_G) + E_delta, and the sampled tokens carry no gradient) and the MLM loss never reaches a
discriminator parameter. So the generator's gradient is exactly that of its MLM loss and the discriminator's that of
lambda * RTD, the losses the authors' two trainers differentiate. What decoupling changes is the step:
`decoupled_rtd_optimizer` builds the optimizer the Trainer would build (--optim, betas, eps, the Trainer's
weight-decay groups) with one set of parameter groups per model, tagged `rtd_model` and carrying that model's
learning rate and max_grad_norm, and a step pre-hook that clips each model's gradients by its own norm just before
the update (after the Trainer's gradient accumulation and after mixed-precision unscaling). The Trainer's global
clip is switched off (max_grad_norm 0 in the TrainingArguments). The Trainer's lr scheduler scales every group's
own learning rate by one schedule, as the authors' two schedulers with equal warmup and length do. The model
groups' state is per parameter (AdamW, SGD, Adafactor, ...), so one optimizer with per-model groups and per-model
clipping takes the same steps as two optimizers; it saves, loads and resumes as any torch optimizer does.

Where this differs from the authors' loop, with the size of the difference:
- Order within a step. Both sample the discriminator's input from the generator before the generator's update.
  The authors then run the discriminator's forward after the generator's update, so under gdes / es it reads the
  updated E_G; here it reads E_G from before that update (one optimizer step of the shared table, O(lr)).
- es (plain sharing): the shared table is the generator's and here receives both losses' gradients (es's
  definition) and the generator's clip. In the authors' decoupled loop the RTD gradient into the shared table is
  cleared by the generator optimizer's zero_grad before its next step, so there only the MLM loss trains it.
- fp16: one loss scaler for both models, so an overflow in either skips both updates; the authors' two fp16
  optimizers skip independently. bf16 and fp32 never skip.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict

import torch
from transformers import Trainer, TrainerCallback

logger = logging.getLogger(__name__)

GENERATOR, DISCRIMINATOR = "generator", "discriminator"
RTD_TRAINING_MODES = ("decoupled", "joint")


def check_decoupled_training_supported(args) -> None:
    """Raise where the Trainer cannot take per-model optimizer groups and clipping: DeepSpeed (its engine wraps the
    optimizer, flattens the groups into shards and clips by one global norm) and FSDP (the Trainer refuses an
    optimizer built outside it; FSDP1 shards gradients so that a per-model norm needs FSDP's own clip)."""
    limitation = None
    if getattr(args, "deepspeed", None) or os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        limitation = "DeepSpeed wraps the optimizer, shards its groups and clips all gradients by one global norm"
    elif getattr(args, "fsdp", None) or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        limitation = ("the Trainer refuses an optimizer built outside it under FSDP, and FSDP's sharded gradients "
                      "need its own clip_grad_norm_ for a per-model norm")
    if limitation:
        raise ValueError(f"Decoupled RTD training (per-model optimizer groups and gradient clipping) is not "
                         f"available here: {limitation}. Use joint training (--rtd_training joint: one optimizer, "
                         f"one global clip on MLM + lambda * RTD) under DeepSpeed or FSDP.")


def rtd_parameter_groups(model) -> dict[str, list[tuple[str, torch.nn.Parameter]]]:
    """The trainable parameters of an RTD pretraining model by owner: {"generator": [(name, p)], "discriminator":
    [...]}. The generator owns everything under `model.generator`, the shared embedding tables included (es / gdes
    reference them from the discriminator without registering them); the discriminator owns the rest (its backbone,
    its head and, under gdes, the E_delta tables)."""
    if not isinstance(getattr(model, "generator", None), torch.nn.Module):
        raise TypeError(f"Decoupled RTD training needs a model with a `generator` submodule (DebertaCustomForRTD"
                        f"PreTraining), got {type(model).__name__}")
    generator_ids = {id(p) for p in model.generator.parameters()}
    groups = {GENERATOR: [], DISCRIMINATOR: []}
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            groups[GENERATOR if id(parameter) in generator_ids else DISCRIMINATOR].append((name, parameter))
    return groups


class PerModelGradientClipping:
    """Optimizer step pre-hook: clips the gradients of each model (`rtd_model` of the param groups) to that model's
    `max_grad_norm` by that model's own total norm, as torch.nn.utils.clip_grad_norm_ does for one model. Keeps the
    last pre-clip norms (tensors, read only when logged) in `grad_norms`."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.parameter_ids = {id(p) for group in optimizer.param_groups for p in group["params"]}
        self.grad_norms: dict[str, torch.Tensor] = {}

    def __call__(self, optimizer, args, kwargs):
        parameters, max_norms = defaultdict(list), {}
        for group in optimizer.param_groups:
            if any(id(p) not in self.parameter_ids for p in group["params"]):
                raise RuntimeError("The optimizer's parameters were replaced after decoupled_rtd_optimizer built it "
                                   "(a wrapper such as DeepSpeed's ZeRO flattens them), so gradients can no longer "
                                   "be clipped per model: use --rtd_training joint with that wrapper")
            parameters[group["rtd_model"]].extend(p for p in group["params"] if p.grad is not None)
            max_norms[group["rtd_model"]] = group["max_grad_norm"]
        for model_name, model_parameters in parameters.items():
            if model_parameters and max_norms[model_name] > 0:
                self.grad_norms[model_name] = torch.nn.utils.clip_grad_norm_(model_parameters, max_norms[model_name])


def decoupled_rtd_optimizer(model, args, generator_lr: float | None = None, discriminator_lr: float | None = None,
                            max_grad_norm: float | None = None) -> torch.optim.Optimizer:
    """The optimizer for decoupled RTD training under an unchanged Trainer:

        optimizer = decoupled_rtd_optimizer(model, training_args, discriminator_lr=2e-4)
        trainer = Trainer(model=model, args=training_args, optimizers=(optimizer, None), ...)
        trainer.add_callback(DecoupledRTDCallback())  # per-model gradient norms and learning rates in the logs

    The optimizer is the class the Trainer builds from `args` (--optim, betas, eps) with the Trainer's weight-decay
    split, one pair of groups (decay / no decay) per model, tagged `rtd_model`. Each model's groups carry its peak
    learning rate (generator_lr, discriminator_lr; default args.learning_rate, as the authors' recipes) and the
    per-model clip max_grad_norm (default args.max_grad_norm). The Trainer's own global clip would run first, so
    `args.max_grad_norm` is set to 0 here: pass the Trainer these same args (DecoupledRTDCallback checks it). The
    Trainer's lr scheduler, given `optimizers=(optimizer, None)`, drives every group from its own peak."""
    check_decoupled_training_supported(args)
    optimizer_cls, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    builds_own_groups = {"params", "model", "optimizer_dict"} & set(optimizer_kwargs)
    if builds_own_groups or not isinstance(optimizer_cls, type) or not issubclass(optimizer_cls, torch.optim.Optimizer):
        raise ValueError(f"--optim {args.optim} builds its own parameter groups or optimizers, so the generator and "
                         "the discriminator cannot get their own groups: use an elementwise optimizer (adamw_torch, "
                         "sgd, adafactor, ...) or --rtd_training joint")
    max_grad_norm = args.max_grad_norm if max_grad_norm is None else max_grad_norm
    learning_rates = {GENERATOR: args.learning_rate if generator_lr is None else generator_lr,
                      DISCRIMINATOR: args.learning_rate if discriminator_lr is None else discriminator_lr}
    decay_names = set(Trainer.get_decay_parameter_names(None, model))  # the rule does not read the Trainer
    groups = []
    for model_name, named in rtd_parameter_groups(model).items():
        for decays in (True, False):
            params = [p for name, p in named if (name in decay_names) == decays]
            groups.append({"params": params, "weight_decay": args.weight_decay if decays else 0.0,
                           "lr": learning_rates[model_name], "max_grad_norm": max_grad_norm, "rtd_model": model_name})
    optimizer = optimizer_cls(groups, **optimizer_kwargs)
    optimizer.per_model_clipping = PerModelGradientClipping(optimizer)
    optimizer.register_step_pre_hook(optimizer.per_model_clipping)
    if args.max_grad_norm:
        logger.info(f"Decoupled RTD training: max_grad_norm {max_grad_norm} now clips each model by its own norm; "
                    f"the Trainer's global clip is off (args.max_grad_norm {args.max_grad_norm} -> 0)")
        args.max_grad_norm = 0.0
    return optimizer


def _unwrap_optimizer(optimizer):
    """The torch optimizer inside accelerate's AcceleratedOptimizer (or the optimizer itself)."""
    while optimizer is not None and not isinstance(getattr(optimizer, "per_model_clipping", None),
                                                   PerModelGradientClipping):
        optimizer = getattr(optimizer, "optimizer", None)
    return optimizer


class DecoupledRTDCallback(TrainerCallback):
    """With `decoupled_rtd_optimizer`: refuses a Trainer that would also clip globally (args.max_grad_norm > 0), and
    adds each model's pre-clip gradient norm and current learning rate to the training logs (generator_grad_norm,
    discriminator_grad_norm, generator_learning_rate, discriminator_learning_rate). The Trainer's own `grad_norm` is
    the norm over both models, before the per-model clip; its `learning_rate` the generator's."""

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        if _unwrap_optimizer(optimizer) is None:
            raise ValueError("DecoupledRTDCallback needs the optimizer of decoupled_rtd_optimizer "
                             "(Trainer(..., optimizers=(optimizer, None)))")
        if args.max_grad_norm and args.max_grad_norm > 0:
            raise ValueError(f"The Trainer would clip the generator and the discriminator by one global norm "
                             f"(max_grad_norm {args.max_grad_norm}) before the optimizer clips each by its own: pass the "
                             f"Trainer the TrainingArguments given to decoupled_rtd_optimizer (it sets max_grad_norm 0)")

    def on_log(self, args, state, control, logs=None, optimizer=None, **kwargs):
        optimizer = _unwrap_optimizer(optimizer)
        if logs is None or "loss" not in logs or optimizer is None:
            return
        terms = {f"{name}_grad_norm": round(float(norm), 4)
                 for name, norm in optimizer.per_model_clipping.grad_norms.items()}
        terms.update({f"{group['rtd_model']}_learning_rate": group["lr"] for group in optimizer.param_groups})
        logs.update(terms)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(terms)


def gradient_norms_by_model(model) -> dict[str, float]:
    """Total gradient norm of each model's parameters and of both together (after a backward), and the factor by
    which a global clip at 1 scales the generator's gradient beyond a per-model clip at 1 ("throttle")."""
    norms = {name: float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for _, p in named
                                                               if p.grad is not None])))
             for name, named in rtd_parameter_groups(model).items()}
    norms["both"] = (norms[GENERATOR] ** 2 + norms[DISCRIMINATOR] ** 2) ** 0.5
    norms["generator_throttle"] = min(1.0, 1.0 / norms[GENERATOR]) / min(1.0, 1.0 / norms["both"])
    return norms


__all__ = [
    "DecoupledRTDCallback",
    "PerModelGradientClipping",
    "RTD_TRAINING_MODES",
    "check_decoupled_training_supported",
    "decoupled_rtd_optimizer",
    "gradient_norms_by_model",
    "rtd_parameter_groups",
]
