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

Normalisation (ours; loss_terms.py): each term is a mean over the items the task loss counts (labelled tokens for
token classification and masked-LM, rows for sequence-level heads; relations: per labelled query position, or per
row as the mean over its real query positions), or their sum divided by the Trainer's num_items_in_batch, so that
gradient accumulation gives the large batch's gradients for any labelling. Without labels (transfer data), token
terms average over the real tokens. A masked-LM student with sparse logits ([K, V] at the labelled positions) is
compared with the teacher's dense logits at those positions.

Use it with an unchanged `Trainer`:

    trainer = Trainer(model=student, ..., callbacks=[DistillationCallback(teacher)])
    place_before_integrations(trainer)  # so that report_to integrations log the distill_* terms

or in a custom training loop through `distillation_loss` and `relation_loss` (see their docstrings). Training-only
code: it is not part of the remote-code files.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .loss_terms import (
    LABEL_ARGUMENTS,
    ItemMean,
    LossTermCallback,
    align_logits,
    item_mean,
    output_logits,
    place_before_integrations,
    task_loss_term,
)

logger = logging.getLogger(__name__)

RELATIONS = ("query", "key", "value")

__all__ = [
    "soft_target_kl",
    "bernoulli_soft_target_kl",
    "regression_squared_error",
    "distillation_loss",
    "distillation_term",
    "attention_relation",
    "relation_kl",
    "relation_kl_per_query",
    "ProjectionRecorder",
    "relation_loss",
    "check_compatible",
    "DistillationCallback",
    "place_before_integrations",
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


def distillation_term(student_outputs, teacher_outputs, *, temperature: float = 1.0, problem_type: str | None = None,
                      labels: torch.Tensor | None = None, token_mask: torch.Tensor | None = None) -> ItemMean:
    """The output-distillation term for one batch as (sum over the task's items, their number); see
    `distillation_loss`."""
    if temperature <= 0:
        raise ValueError(f"The distillation temperature must be positive, got {temperature}")
    terms = []
    for student_logits, teacher_logits in zip(_logits_of(student_outputs), _logits_of(teacher_outputs), strict=True):
        teacher_logits = align_logits(teacher_logits, student_logits, labels, ("teacher", "student"))
        divergence = _divergence_function(student_logits, problem_type)
        values = divergence(student_logits, teacher_logits.detach(), temperature)  # [B], [B, N] or sparse [K]
        terms.append(item_mean(values, labels, token_mask))
    return ItemMean.average(terms)


def distillation_loss(student_outputs, teacher_outputs, *, temperature: float = 1.0, problem_type: str | None = None,
                      labels: torch.Tensor | None = None, token_mask: torch.Tensor | None = None,
                      num_items_in_batch=None) -> torch.Tensor:
    """The output-distillation term for one batch, a fp32 scalar with gradient to the student. For custom loops:

        with torch.no_grad():
            teacher_outputs = teacher(**{k: v for k, v in batch.items() if k not in LABEL_ARGUMENTS})
        outputs = student(**batch)
        kd = distillation_loss(outputs, teacher_outputs, temperature=2.0, problem_type=student.config.problem_type,
                               labels=batch["labels"])
        (0.5 * outputs.loss + 0.5 * kd).backward()

    A mean over the items of the task loss (`labels`: labelled tokens for per-token logits [B, N, K], rows for
    sequence-level heads), or their sum divided by `num_items_in_batch` when given, as the head's own loss; without
    labels, per-token logits are averaged over the positions where `token_mask` ([B, N]) is 1. Sparse masked-LM
    student logits ([K, V] at the labelled positions) are compared with the teacher's dense [B, N, V] logits at those
    positions. Question answering averages the start and end terms. The divergence follows the head (module
    docstring): soft-target KL, Bernoulli KL for `problem_type="multi_label_classification"`, squared error for one
    logit.
    """
    term = distillation_term(student_outputs, teacher_outputs, temperature=temperature, problem_type=problem_type,
                             labels=labels, token_mask=token_mask)
    return term.loss(num_items_in_batch)


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


def relation_kl_per_query(student_states: torch.Tensor, teacher_states: torch.Tensor, num_heads: int,
                          attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """KL(teacher relation || student relation) of one projection (see `attention_relation`), summed over the keys and
    averaged over relation heads, per query position: [B, N] fp32, 0 at padding queries. Widths may differ; lengths
    may not."""
    if student_states.shape[:2] != teacher_states.shape[:2]:
        raise ValueError(f"Student states {tuple(student_states.shape)} and teacher states "
                         f"{tuple(teacher_states.shape)} cover different tokens")
    log_student = attention_relation(student_states, num_heads, attention_mask)
    log_teacher = attention_relation(teacher_states.detach(), num_heads, attention_mask)
    terms = log_teacher.exp() * (log_teacher - log_student)  # [B, R, N, N]
    if attention_mask is None:
        return terms.sum(-1).mean(1)
    mask = attention_mask.to(terms.dtype)
    terms = terms * mask[:, None, None, :]  # padding keys: exactly zero
    return terms.sum(-1).mean(1) * mask  # [B, N], padding queries dropped


def relation_kl(student_states: torch.Tensor, teacher_states: torch.Tensor, num_heads: int,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """`relation_kl_per_query` averaged over the real query positions: a fp32 scalar."""
    values = relation_kl_per_query(student_states, teacher_states, num_heads, attention_mask)
    if attention_mask is None:
        return values.mean()
    return values.sum() / attention_mask.to(values.dtype).sum().clamp_min(1.0)


def relation_term(values: torch.Tensor, labels: torch.Tensor | None, attention_mask: torch.Tensor | None) -> ItemMean:
    """Per-query relation values [B, N] -> (sum over the task's items, their number): labelled query positions for
    token-level labels, rows (each the mean over its real query positions) for sequence-level labels, real query
    positions without labels."""
    if labels is None or tuple(labels.shape) == tuple(values.shape):
        return item_mean(values, labels, attention_mask)
    real = torch.ones_like(values) if attention_mask is None else attention_mask.to(values.dtype)
    return item_mean(values.sum(-1) / real.sum(-1).clamp_min(1.0), labels)  # [B] means per row


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


class DistillationCallback(LossTermCallback):
    """Distillation with an unchanged `transformers.Trainer`:

        trainer = Trainer(model=student, args=args, train_dataset=..., callbacks=[DistillationCallback(teacher)])
        place_before_integrations(trainer)

    At `on_train_begin` the teacher is frozen (eval mode, requires_grad False) and moved to the student's device, and
    the student is hooked: a forward hook that, whenever the student runs in training mode with gradients, runs the
    teacher on the same inputs (label arguments dropped) without gradients, under the autocast the student ran in,
    and replaces `outputs.loss` by `alpha_task * loss + alpha_kd * KD + relation_weight * relation KL`. Evaluation and
    prediction are untouched. Without labels (the model returns no loss) the loss is the distillation terms alone, so
    unlabelled transfer data works too. Extra passes of the student (SiFT's perturbed passes) are not distilled, and
    the hook runs ahead of the other loss-term hooks, so alpha_task scales the task loss alone. `on_train_end` removes
    the hooks (call `remove()` if training stops on an exception). No module, parameter or buffer is added to the
    student: its `state_dict` and saved folder are a plain checkpoint. Gradient accumulation is exact (module
    docstring); autocast, gradient checkpointing (relations need the non-reentrant kind, which transformers uses by
    default) and DistributedDataParallel (the hooks sit on the wrapped module; every process holds a teacher) need
    nothing else; nothing needs saving for resume.

    Settings: `temperature` (T), `alpha_task`, `alpha_kd`; relation transfer with `relation_weight` > 0:
    `relations` (among "query", "key", "value"), `relation_heads` (default: the student's attention heads),
    `teacher_layer` and `student_layer` (default: the last of each). Defaults (T = 2, alpha 0.5 / 0.5) are common
    fine-tuning choices, not from one paper; Hinton et al. put most of the weight on the soft targets.

    Logged at every Trainer log (the mean per item since the previous log, over all processes): `distill_kd_loss`,
    `distill_task_loss`, and `distill_relation_<name>_loss` per relation; `train_distill_*` over the whole run in the
    final training log. The values are summed on the device and read only when the Trainer logs.
    """

    log_prefix = "distill_"
    runs_first = True

    def __init__(self, teacher: nn.Module, temperature: float = 2.0, alpha_task: float = 0.5, alpha_kd: float = 0.5,
                 relation_weight: float = 0.0, relations: Sequence[str] = RELATIONS, relation_heads: int | None = None,
                 teacher_layer: int = -1, student_layer: int = -1):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if min(alpha_task, alpha_kd, relation_weight) < 0:
            raise ValueError("Loss weights must be >= 0, got "
                             f"alpha_task={alpha_task}, alpha_kd={alpha_kd}, relation_weight={relation_weight}")
        self.teacher = teacher
        self.temperature, self.alpha_task, self.alpha_kd = temperature, alpha_task, alpha_kd
        self.relation_weight, self.relations, self.relation_heads = relation_weight, tuple(relations), relation_heads
        self.teacher_layer, self.student_layer = teacher_layer, student_layer
        self._recorders: tuple[ProjectionRecorder, ProjectionRecorder] | None = None
        self._autocast: tuple[bool, torch.dtype] | None = None

    # -- hooks ---------------------------------------------------------------------------------------------------

    def setup(self, model: nn.Module) -> None:
        """Freeze the teacher, move it to `model`'s device, record the projections of both when relations are on."""
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
        if inner is not model:
            self._handles.append(inner.register_forward_pre_hook(
                lambda module, args: self._read_autocast(module) if self.acting(model) else None))

    def teardown(self) -> None:
        if self._recorders is not None:
            for recorder in self._recorders:
                recorder.remove()
            self._recorders = None

    def before_forward(self, module, acting):
        if acting:
            self._read_autocast(module)
        if self._recorders is not None:
            self._recorders[0].recording = acting

    def _read_autocast(self, module):
        device_type = next(module.parameters()).device.type
        self._autocast = (torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))

    def add_terms(self, module, inputs, outputs):
        num_items = inputs.get("num_items_in_batch")
        terms = self._terms(module, inputs, outputs)
        total = self.alpha_kd * terms["kd_loss"].loss(num_items)
        for name in self.relations if self._recorders is not None else ():
            total = total + self.relation_weight * terms[f"relation_{name}_loss"].loss(num_items)
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else None
        if loss is not None:
            terms["task_loss"] = task_loss_term(loss, inputs)
            total = total + self.alpha_task * loss.float()
        outputs["loss"] = total if loss is None else total.to(loss.dtype)
        for name, term in terms.items():
            self.record(name, term)
        return outputs

    def _terms(self, student: nn.Module, inputs: dict, outputs) -> dict[str, ItemMean]:
        teacher_inputs = {k: v for k, v in inputs.items() if k not in LABEL_ARGUMENTS + ("num_items_in_batch",)}
        device_type = next(student.parameters()).device.type
        enabled, dtype = self._autocast or (False, torch.get_autocast_dtype(device_type))
        if self._recorders is not None:
            self._recorders[1].recording = True
        with torch.no_grad(), torch.autocast(device_type, dtype=dtype, enabled=enabled):
            teacher_outputs = self.teacher(**teacher_inputs)
        config = getattr(student, "config", None)
        labels = inputs.get("labels")
        attention_mask = inputs.get("attention_mask")
        if attention_mask is not None and attention_mask.dim() > 2:  # multiple choice: [B, C, N] -> [B * C, N]
            attention_mask = attention_mask.reshape(-1, attention_mask.shape[-1])
        terms = {"kd_loss": distillation_term(outputs, teacher_outputs, temperature=self.temperature,
                                             problem_type=config.problem_type if config is not None else None,
                                             labels=labels, token_mask=attention_mask)}
        if self._recorders is not None:
            student_recorder, teacher_recorder = self._recorders
            states = student_recorder.states
            missing = [r for r in self.relations if r not in states or r not in teacher_recorder.states]
            if missing:
                raise RuntimeError(f"No recorded {missing} projection: run the student and the teacher first")
            if any(not states[r].requires_grad for r in self.relations):
                raise RuntimeError("The student's attention projections carry no gradient: relation distillation "
                                   "does not work with reentrant gradient checkpointing (use "
                                   "gradient_checkpointing_kwargs={'use_reentrant': False})")
            for name in self.relations:
                values = relation_kl_per_query(states[name], teacher_recorder.states[name], self.relation_heads,
                                               attention_mask)
                terms[f"relation_{name}_loss"] = relation_term(values, labels, attention_mask)
            student_recorder.states, teacher_recorder.states = {}, {}
            student_recorder.recording = teacher_recorder.recording = False  # not in checkpointed recomputation
        return terms
