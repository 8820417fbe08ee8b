"""Knowledge distillation: a fine-tuned teacher trains a smaller student, with an unchanged `transformers.Trainer`.

Output distillation (Hinton et al. 2015, "Distilling the knowledge in a neural network"): the student matches the
teacher's predictions softened by a temperature T,

    KD = T^2 * KL(softmax(z_teacher / T) || softmax(z_student / T)),

averaged over examples. The T^2 keeps the size of the gradients independent of T (the paper's advice when the soft
and hard targets are mixed). Hinton et al. write the soft term as a cross-entropy with the soft targets; the KL
differs from it by the teacher's entropy, a constant, so both give the same gradients, and the KL is zero when the
student agrees with the teacher. A one-logit regression head (STS-B) uses the squared error to the teacher's
prediction (a one-logit softmax carries nothing); a multi-label head the KL of independent Bernoulli labels with
sigmoid(z / T), times T^2. The training loss is

    loss = alpha_task * task_loss + alpha_kd * KD [+ relation_weight * relation KL].

Intermediate transfer, optional (MiniLMv2, Wang et al. 2021, "MiniLMv2: multi-head self-attention relation
distillation"): the query, key and value projections of one teacher layer and one student layer (the last by
default) are each split into the same number of *relation heads* R; per head, the relation
softmax(A_r A_r^T / sqrt(d_r)) over the keys; KL(teacher relation || student relation), averaged over real query
positions and heads, summed over the chosen relations (query-query, key-key, value-value, as in MiniLMv2). Because
relations are N x N, teacher and student may differ in width, depth and number of attention heads, and no
projection weight is learned: the student's saved folder stays a plain checkpoint. MiniLM (v1)'s attention
distributions are not offered: they need equal head counts, and DeBERTa's attention probabilities (with the
relative-position terms) are only available from the slow eager path (`output_attentions`).

Use it with an unchanged `Trainer`: `Trainer(model=student, ..., callbacks=[DistillationCallback(teacher)])`, or in a
custom training loop through `distillation_loss` and `relation_loss` (see their docstrings). Training-only code:
it is not part of the remote-code files.
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import TrainerCallback

from .sift import (
    LABEL_ARGUMENTS,
    check_loss_hook_arguments,
    move_ahead_of_integrations,
    output_logits,
    share_of_optimizer_step,
)

logger = logging.getLogger(__name__)

RELATIONS = ("query", "key", "value")

__all__ = [
    "soft_target_kl",
    "bernoulli_soft_target_kl",
    "regression_squared_error",
    "distillation_loss",
    "attention_relation",
    "relation_kl",
    "ProjectionRecorder",
    "relation_loss",
    "check_compatible",
    "DistillationCallback",
]


# ----------------------------------------------------------------------------------------------------------------------
# Output distillation: one value per row of the last dimension, in fp32
# ----------------------------------------------------------------------------------------------------------------------


def soft_target_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
                   ) -> torch.Tensor:
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)) over the last dimension, fp32: [..., K] -> [...]."""
    log_student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return temperature**2 * (log_teacher.exp() * (log_teacher - log_student)).sum(-1)


def bernoulli_soft_target_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
                             ) -> torch.Tensor:
    """Multi-label heads: T^2 * sum over labels of KL(Bernoulli(sigmoid(teacher / T)) || Bernoulli(sigmoid(
    student / T))), fp32: [..., K] -> [...]. Per label, KL = p (log p - log q) + (1 - p)(log(1 - p) - log(1 - q))."""
    student, teacher = student_logits.float() / temperature, teacher_logits.float() / temperature
    p = torch.sigmoid(teacher)
    # log sigmoid(z) and log(1 - sigmoid(z)) = log sigmoid(-z), stable for large |z|
    kl = p * (F.logsigmoid(teacher) - F.logsigmoid(student)) + (1 - p) * (F.logsigmoid(-teacher)
                                                                          - F.logsigmoid(-student))
    return temperature**2 * kl.sum(-1)


def regression_squared_error(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
                             ) -> torch.Tensor:
    """One-logit regression heads: squared error to the teacher's prediction, fp32: [..., 1] -> [...]. The
    temperature has no meaning here and is ignored."""
    return (student_logits.float() - teacher_logits.float()).pow(2).sum(-1)


def _divergence_function(logits: torch.Tensor, problem_type: str | None):
    if logits.shape[-1] == 1:
        return regression_squared_error
    if problem_type == "multi_label_classification":
        return bernoulli_soft_target_kl
    return soft_target_kl


def _logits_of(outputs) -> list[torch.Tensor]:
    return output_logits(outputs, reader="Distillation")


def distillation_loss(student_outputs, teacher_outputs, *, temperature: float = 1.0, problem_type: str | None = None,
                      token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The output-distillation term for one batch, a fp32 scalar with gradient to the student. For custom loops:

        with torch.no_grad():
            teacher_outputs = teacher(**{k: v for k, v in batch.items() if k not in LABEL_ARGUMENTS})
        outputs = student(**batch)
        kd = distillation_loss(outputs, teacher_outputs, temperature=2.0, problem_type=student.config.problem_type)
        (0.5 * outputs.loss + 0.5 * kd).backward()

    Mean over examples; per-token logits ([B, N, K], token classification) are averaged over the positions where
    `token_mask` ([B, N]) is 1; question answering averages the start and end terms. The divergence follows the head
    (module docstring): soft-target KL, Bernoulli KL for `problem_type="multi_label_classification"`, squared error
    for one logit.
    """
    if temperature <= 0:
        raise ValueError(f"The distillation temperature must be positive, got {temperature}")
    pairs = list(zip(_logits_of(student_outputs), _logits_of(teacher_outputs), strict=True))
    total = 0.0
    for student_logits, teacher_logits in pairs:
        if student_logits.shape != teacher_logits.shape:
            raise ValueError(f"Student logits {tuple(student_logits.shape)} and teacher logits "
                             f"{tuple(teacher_logits.shape)} differ: teacher and student must share the label space")
        values = _divergence_function(student_logits, problem_type)(student_logits, teacher_logits.detach(),
                                                                    temperature)  # [B] or [B, N]
        if token_mask is not None and values.dim() == 2 and tuple(token_mask.shape) == tuple(values.shape):
            weights = token_mask.to(values.dtype)
            total = total + (values * weights).sum() / weights.sum().clamp_min(1.0)
        else:
            total = total + values.mean()
    return total / len(pairs)


# ----------------------------------------------------------------------------------------------------------------------
# Intermediate transfer: MiniLMv2 self-attention relations
# ----------------------------------------------------------------------------------------------------------------------


def attention_relation(states: torch.Tensor, num_heads: int, key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """log softmax(A_r A_r^T / sqrt(d_r)) over the keys for the R = num_heads relation heads of `states` [B, N, C]
    (a query, key or value projection), fp32: -> [B, R, N, N]. Padding keys (key_mask 0, [B, N]) are excluded."""
    batch, length, width = states.shape
    if width % num_heads:
        raise ValueError(f"A projection of width {width} cannot be split into {num_heads} relation heads")
    head_size = width // num_heads
    heads = states.float().view(batch, length, num_heads, head_size).transpose(1, 2)  # [B, N, C] -> [B, R, N, d]
    scores = heads @ heads.transpose(-1, -2) / math.sqrt(head_size)  # [B, R, N, N]
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask.bool()[:, None, None, :], torch.finfo(scores.dtype).min)
    return F.log_softmax(scores, dim=-1)


def relation_kl(student_states: torch.Tensor, teacher_states: torch.Tensor, num_heads: int,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """KL(teacher relation || student relation) of one projection (see `attention_relation`), summed over the keys
    and averaged over relation heads and real query positions: a fp32 scalar. Widths may differ; lengths may not."""
    if student_states.shape[:2] != teacher_states.shape[:2]:
        raise ValueError(f"Student states {tuple(student_states.shape)} and teacher states "
                         f"{tuple(teacher_states.shape)} cover different tokens")
    log_student = attention_relation(student_states, num_heads, attention_mask)
    log_teacher = attention_relation(teacher_states.detach(), num_heads, attention_mask)
    terms = log_teacher.exp() * (log_teacher - log_student)  # [B, R, N, N]
    if attention_mask is None:
        return terms.sum(-1).mean()
    mask = attention_mask.to(terms.dtype)
    terms = terms * mask[:, None, None, :]  # padding keys: exactly zero
    rows = terms.sum(-1) * mask[:, None, :]  # [B, R, N], padding queries dropped
    return rows.sum() / (mask.sum() * num_heads).clamp_min(1.0)


def _self_attention_modules(model: nn.Module) -> list[nn.Module]:
    """The self-attention modules of the encoder in order (each holding query_proj, key_proj, value_proj)."""
    modules = [m for name, m in model.named_modules()
               if name.endswith("attention.self") and all(hasattr(m, f"{r}_proj") for r in RELATIONS)]
    if not modules:
        raise ValueError(f"{type(model).__name__} has no self-attention with separate query/key/value projections "
                         "(DeBERTa v1's fused in_proj is not supported by the relation transfer)")
    return modules


class ProjectionRecorder:
    """Forward hooks on the query/key/value projections of one layer (`layer`, an index into the encoder layers,
    negative from the end) that keep their latest outputs [B, N, H * D] in `states` while `recording` is True.
    For custom loops: `recorder = ProjectionRecorder(model); model(**batch); recorder.states["value"]`; call
    `remove()` when done."""

    def __init__(self, model: nn.Module, layer: int = -1, relations: Sequence[str] = RELATIONS):
        unknown = set(relations) - set(RELATIONS)
        if unknown or not relations:
            raise ValueError(f"Relations are chosen among {RELATIONS}, got {list(relations)}")
        modules = _self_attention_modules(model)
        if not -len(modules) <= layer < len(modules):
            raise ValueError(f"Layer {layer} does not exist: the model has {len(modules)} layers")
        self.attention = modules[layer]
        self.relations = tuple(relations)
        self.width = self.attention.num_heads * self.attention.head_size
        self.states: dict[str, torch.Tensor] = {}
        self.recording = True
        # The relations compare [B, N, N] attention of padded rows, so the model runs padded while recorded (an
        # unpadded model would project its real tokens only, [T, C]).
        self._config = self.attention.config
        self._unpad_inputs, self._config.unpad_inputs = self._config.unpad_inputs, False
        self._handles = [getattr(self.attention, f"{name}_proj").register_forward_hook(self._keeper(name))
                         for name in self.relations]

    def _keeper(self, name):
        def keep(module, args, output):
            # With share_att_key the query/key projections also project the relative embeddings ([2S, C]): skip them.
            if self.recording and output.dim() == 3:
                self.states[name] = output
        return keep

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        if self._handles:
            self._config.unpad_inputs = self._unpad_inputs
        self._handles = []
        self.states = {}


def relation_loss(student: ProjectionRecorder, teacher: ProjectionRecorder, num_heads: int,
                  attention_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Relation KL per recorded projection ({"query": ..., "key": ..., "value": ...}), from the states the two
    recorders kept in the last forward of each model. MiniLMv2's loss is their sum."""
    missing = [r for r in student.relations if r not in student.states or r not in teacher.states]
    if missing:
        raise RuntimeError(f"No recorded {missing} projection: run the student and the teacher on the batch first")
    return {r: relation_kl(student.states[r], teacher.states[r], num_heads, attention_mask) for r in student.relations}


# ----------------------------------------------------------------------------------------------------------------------
# Teacher and student must agree
# ----------------------------------------------------------------------------------------------------------------------


def check_compatible(student: nn.Module, teacher: nn.Module) -> None:
    """A clear error when the teacher's predictions cannot be targets for the student: a different number of labels,
    problem type or label names, or a different vocabulary size (a sign of a different tokenizer)."""
    student_config, teacher_config = getattr(student, "config", None), getattr(teacher, "config", None)
    if student_config is None or teacher_config is None:
        return
    problems = []
    if student_config.num_labels != teacher_config.num_labels:
        problems.append(f"num_labels {student_config.num_labels} vs {teacher_config.num_labels}")
    elif student_config.id2label != teacher_config.id2label:
        problems.append(f"id2label {student_config.id2label} vs {teacher_config.id2label}")
    if (student_config.problem_type and teacher_config.problem_type
            and student_config.problem_type != teacher_config.problem_type):
        problems.append(f"problem_type {student_config.problem_type!r} vs {teacher_config.problem_type!r}")
    if student_config.vocab_size != teacher_config.vocab_size:
        problems.append(f"vocab_size {student_config.vocab_size} vs {teacher_config.vocab_size} (teacher and student "
                        "must use the same tokenizer)")
    if problems:
        raise ValueError("The teacher cannot teach this student: " + "; ".join(problems) + " (student vs teacher)")


# ----------------------------------------------------------------------------------------------------------------------
# The Trainer callback
# ----------------------------------------------------------------------------------------------------------------------


class DistillationCallback(TrainerCallback):
    """Distillation with an unchanged `transformers.Trainer`:

        Trainer(model=student, args=args, train_dataset=..., callbacks=[DistillationCallback(teacher)])

    At `on_train_begin` the teacher is frozen (eval mode, requires_grad False) and moved to the student's device, and
    the student is hooked: a forward hook that, whenever the student runs in training mode with gradients, runs the
    teacher on the same inputs (label arguments dropped) without gradients, under the autocast the student ran in,
    and replaces `outputs.loss` by `alpha_task * loss + alpha_kd * KD + relation_weight * relation KL`. Evaluation and
    prediction are untouched. Without labels (the model returns no loss) the loss is the distillation terms alone, so
    unlabelled transfer data works too. Calls of the student from inside its own forward hooks (SiFT's perturbed
    passes) are left alone. `on_train_end` removes the hooks (call `remove()` if training stops on an exception). No
    module, parameter or buffer is added to the student: its `state_dict` and saved folder are a plain checkpoint.
    Gradient accumulation, autocast, gradient checkpointing (relations need the non-reentrant kind, which transformers
    uses by default) and DistributedDataParallel (the hooks sit on the wrapped module; every process holds a teacher)
    need nothing else; nothing needs saving for resume.

    Settings: `temperature` (T), `alpha_task`, `alpha_kd`; relation transfer with `relation_weight` > 0:
    `relations` (among "query", "key", "value"), `relation_heads` (default: the student's attention heads),
    `teacher_layer` and `student_layer` (default: the last of each). Defaults (T = 2, alpha 0.5 / 0.5) are common
    fine-tuning choices, not from one paper; Hinton et al. put most of the weight on the soft targets.

    Logged at every Trainer log (mean since the previous log, over all processes): `distill_kd_loss`,
    `distill_task_loss`, and `distill_relation_<name>_loss` per relation; `train_distill_*` over the whole run in the
    final training log. The values are summed on the device and read only when the Trainer logs.
    """

    def __init__(self, teacher: nn.Module, temperature: float = 2.0, alpha_task: float = 0.5, alpha_kd: float = 0.5,
                 relation_weight: float = 0.0, relations: Sequence[str] = RELATIONS, relation_heads: int | None = None,
                 teacher_layer: int = -1, student_layer: int = -1):
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if min(alpha_task, alpha_kd, relation_weight) < 0:
            raise ValueError("Loss weights must be >= 0, got "
                             f"alpha_task={alpha_task}, alpha_kd={alpha_kd}, relation_weight={relation_weight}")
        self.teacher = teacher
        self.temperature, self.alpha_task, self.alpha_kd = temperature, alpha_task, alpha_kd
        self.relation_weight, self.relations, self.relation_heads = relation_weight, tuple(relations), relation_heads
        self.teacher_layer, self.student_layer = teacher_layer, student_layer
        self._handles: list = []
        self._recorders: tuple[ProjectionRecorder, ProjectionRecorder] | None = None
        self._depth = 0  # nesting of student forwards: only the outermost one (depth 1) is distilled
        self._autocast: tuple[bool, torch.dtype] | None = None
        self._window: dict[str, list] = {}  # term -> [sum on the device, count] since the last log
        self._total: dict[str, list] = {}  # the same over the training run
        self._reinstall = False

    # -- hooks ---------------------------------------------------------------------------------------------------

    def install(self, model: nn.Module) -> None:
        """Freeze the teacher, move it to `model`'s device, hook `model` (the unwrapped student). Idempotent."""
        self.remove()
        check_compatible(model, self.teacher)
        device = next(model.parameters()).device
        self.teacher.to(device).eval().requires_grad_(False)
        if self.relation_weight > 0:
            student = ProjectionRecorder(model, self.student_layer, self.relations)
            teacher = ProjectionRecorder(self.teacher, self.teacher_layer, self.relations)
            heads = self.relation_heads or student.attention.num_heads
            for recorder, who in ((student, "student"), (teacher, "teacher")):
                if recorder.width % heads:
                    student.remove(), teacher.remove()
                    raise ValueError(f"The {who}'s projections ({recorder.width} wide) cannot be split into {heads} "
                                     "relation heads: choose relation_heads dividing both widths")
            self.relation_heads = heads
            self._recorders = (student, teacher)
        # The autocast state is read inside the student's forward (accelerate wraps `forward` itself in autocast;
        # hooks on the outer module run outside it), from a pre-hook on the base model, where there is one.
        inner = getattr(model, "base_model", model)
        self._handles = [
            model.register_forward_pre_hook(self._enter),
            model.register_forward_hook(self._after_forward, with_kwargs=True, always_call=True),
        ]
        if inner is not model:
            self._handles.append(inner.register_forward_pre_hook(self._read_autocast))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self._recorders is not None:
            for recorder in self._recorders:
                recorder.remove()
            self._recorders = None
        self._depth = 0

    @property
    def installed(self) -> bool:
        return bool(self._handles)

    def _enter(self, module, args):
        self._depth += 1
        self._read_autocast(module, args)
        if self._recorders is not None:
            self._recorders[0].recording = self._depth == 1 and module.training and torch.is_grad_enabled()

    def _read_autocast(self, module, args):
        if self._depth == 1:
            device_type = next(module.parameters()).device.type
            self._autocast = (torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))

    def _after_forward(self, module, args, kwargs, outputs):
        self._depth -= 1
        if self._depth != 0 or outputs is None or not (module.training and torch.is_grad_enabled()):
            return None  # outputs is None when the forward raised (the hook is always called, to keep the depth)
        inputs = dict(kwargs)
        if args:  # name positional arguments as the forward signature does
            inputs = dict(inspect.signature(module.forward).bind_partial(*args, **kwargs).arguments)
        terms = self._terms(module, inputs, outputs)
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else None
        total = self.alpha_kd * terms["kd"]
        for name in self.relations if self._recorders is not None else ():
            total = total + self.relation_weight * terms[f"relation_{name}"]
        total = total * share_of_optimizer_step(inputs)  # under the Trainer's num_items_in_batch (see there)
        if loss is not None:
            terms["task"] = loss.detach()
            total = total + self.alpha_task * loss.float()
        outputs["loss"] = total if loss is None else total.to(loss.dtype)
        self._accumulate(terms)
        return outputs

    def _terms(self, student: nn.Module, inputs: dict, outputs) -> dict[str, torch.Tensor]:
        teacher_inputs = {k: v for k, v in inputs.items() if k not in LABEL_ARGUMENTS}
        device_type = next(student.parameters()).device.type
        enabled, dtype = self._autocast or (False, torch.get_autocast_dtype(device_type))
        if self._recorders is not None:
            self._recorders[1].recording = True
        with torch.no_grad(), torch.autocast(device_type, dtype=dtype, enabled=enabled):
            teacher_outputs = self.teacher(**teacher_inputs)
        config = getattr(student, "config", None)
        attention_mask = inputs.get("attention_mask")
        if attention_mask is not None and attention_mask.dim() > 2:  # multiple choice: [B, C, N] -> [B * C, N]
            attention_mask = attention_mask.reshape(-1, attention_mask.shape[-1])
        terms = {"kd": distillation_loss(outputs, teacher_outputs, temperature=self.temperature,
                                         problem_type=config.problem_type if config is not None else None,
                                         token_mask=attention_mask)}
        if self._recorders is not None:
            student_recorder, teacher_recorder = self._recorders
            states = student_recorder.states
            if any(not states[r].requires_grad for r in self.relations if r in states):
                raise RuntimeError("The student's attention projections carry no gradient: relation distillation "
                                   "does not work with reentrant gradient checkpointing (use "
                                   "gradient_checkpointing_kwargs={'use_reentrant': False})")
            for name, value in relation_loss(student_recorder, teacher_recorder, self.relation_heads,
                                             attention_mask).items():
                terms[f"relation_{name}"] = value
            student_recorder.states, teacher_recorder.states = {}, {}
            student_recorder.recording = teacher_recorder.recording = False  # not in checkpointed recomputation
        return terms

    # -- logging ---------------------------------------------------------------------------------------------------

    def _accumulate(self, terms: dict[str, torch.Tensor]) -> None:
        for accumulator in (self._window, self._total):
            for name, value in terms.items():
                entry = accumulator.setdefault(name, [0.0, 0])
                entry[0] = entry[0] + value.detach().float()
                entry[1] += 1

    @staticmethod
    def _means(accumulator: dict[str, list]) -> dict[str, float]:
        """Mean of each term per forward, over all processes (they log at the same steps): one host read."""
        names = sorted(accumulator)
        means = torch.stack([accumulator[n][0] / accumulator[n][1] for n in names])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(means)
            means = means / torch.distributed.get_world_size()
        return dict(zip(names, means.tolist(), strict=True))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None:
            return
        if "loss" in logs and self._window:
            values, self._window = self._means(self._window), {}
            prefix = "distill_"
        elif "train_loss" in logs and self._total:
            values, prefix = self._means(self._total), "train_distill_"
        else:
            return
        added = {f"{prefix}{name}_loss": value for name, value in values.items()}
        # Trainer.log appended a copy of `logs` to the history before calling the callbacks: complete it too.
        if state.log_history and all(state.log_history[-1].get(k) == v for k, v in logs.items()):
            state.log_history[-1].update(added)
        logs.update(added)

    # -- Trainer events --------------------------------------------------------------------------------------------

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        check_loss_hook_arguments(args, "DistillationCallback")
        if not move_ahead_of_integrations(self):  # so that report_to integrations receive the distill_* terms
            logger.warning("DistillationCallback: not called by a transformers CallbackHandler; its terms reach the "
                           "logs only after the report_to integrations have run")
        self.install(model)
        self._window, self._total = {}, {}
        self._reinstall = True

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        # Once more at the first step, after every callback's on_train_begin: our forward hook then runs after the
        # hooks other callbacks installed (SiFT's), so their extra passes of the student are nested inside the
        # distilled forward and are not distilled themselves.
        if self._reinstall and model is not None:
            self.install(model)
            self._reinstall = False

    def on_train_end(self, args, state, control, **kwargs):
        self.remove()
