"""Knowledge distillation (modeling_deberta_custom.training.distillation): the losses against hand computations, the Trainer
callback (frozen teacher, logged terms, training options, a plain saved student), the MiniLMv2 relation transfer
across widths and heads, and scripts/run_glue.py --teacher.

The toy task is SiFT's (helpers.FirstTokenTask: the label is the token after [CLS]); the good teacher there is an
oracle that reads the rule."""

import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    CHILD_SCRIPTS,
    DROPOUT,
    REPO_ROOT,
    RESUME_ARGS,
    RUN_GLUE,
    STUDENT,
    TEACHER,
    FirstTokenTask,
    assert_resumed_exactly,
    child_environment,
    load_script,
    random_batch,
    run_three_ways,
    tiny_config,
)
from helpers import first_token_classifier as classifier
from transformers import AutoTokenizer, Trainer, TrainingArguments
from transformers.modeling_outputs import MaskedLMOutput, SequenceClassifierOutput

from modeling_deberta_custom import (
    DebertaCustomForMaskedLM,
    DebertaCustomForMultipleChoice,
    DebertaCustomForQuestionAnswering,
    DebertaCustomForSequenceClassification,
    DebertaCustomForTokenClassification,
)
from modeling_deberta_custom.training.distillation import (
    DistillationCallback,
    ProjectionRecorder,
    bernoulli_soft_target_kl,
    check_compatible,
    distillation_loss,
    relation_kl,
    relation_loss,
    soft_target_kl,
)
from modeling_deberta_custom.training.loss_terms import place_before_integrations
from modeling_deberta_custom.training.sift import SiFTCallback

# ----------------------------------------------------------------------------------------------------------------------
# The losses, by hand
# ----------------------------------------------------------------------------------------------------------------------


def softmax(values, temperature):
    exps = [math.exp(v / temperature) for v in values]
    return [e / sum(exps) for e in exps]


def test_soft_target_kl_is_hintons_term_on_fixed_logits():
    student, teacher, temperature = [1.0, 2.0, 0.5], [3.0, -1.0, 0.0], 2.0
    p_teacher, p_student = softmax(teacher, temperature), softmax(student, temperature)
    kl = sum(t * math.log(t / s) for t, s in zip(p_teacher, p_student, strict=True))
    value = soft_target_kl(torch.tensor([student]), torch.tensor([teacher]), temperature)
    assert value.item() == pytest.approx(temperature**2 * kl, rel=1e-6)
    # The T^2 scaling keeps the gradient T * (softmax(s / T) - softmax(t / T)) / T^2 * T^2 = (p_s - p_t) * T.
    logits = torch.tensor([student], requires_grad=True)
    soft_target_kl(logits, torch.tensor([teacher]), temperature).sum().backward()
    expected = [temperature * (s - t) for s, t in zip(p_student, p_teacher, strict=True)]
    torch.testing.assert_close(logits.grad[0], torch.tensor(expected))
    assert torch.equal(soft_target_kl(torch.tensor([teacher]), torch.tensor([teacher]), 3.0), torch.zeros(1))


def test_distillation_loss_averages_examples_and_uses_squared_error_for_regression():
    student = SequenceClassifierOutput(logits=torch.tensor([[1.0, 2.0], [0.0, 0.0]]))
    teacher = SequenceClassifierOutput(logits=torch.tensor([[2.0, 1.0], [4.0, 0.0]]))
    rows = [soft_target_kl(student.logits[i:i + 1], teacher.logits[i:i + 1], 4.0).item() for i in range(2)]
    assert distillation_loss(student, teacher, temperature=4.0).item() == pytest.approx(sum(rows) / 2, rel=1e-6)
    regression_student = SequenceClassifierOutput(logits=torch.tensor([[0.5], [2.0]]))
    regression_teacher = SequenceClassifierOutput(logits=torch.tensor([[1.0], [1.0]]))
    # One logit: (0.5^2 + 1^2) / 2, whatever the temperature.
    for temperature in (1.0, 5.0):
        value = distillation_loss(regression_student, regression_teacher, temperature=temperature)
        assert value.item() == pytest.approx(0.625)
    with pytest.raises(ValueError, match="label space"):
        distillation_loss(student, regression_teacher)


def test_multi_label_uses_bernoulli_kl_and_token_heads_skip_padding():
    student, teacher, temperature = 0.3, -1.2, 2.0
    p, q = 1 / (1 + math.exp(-teacher / temperature)), 1 / (1 + math.exp(-student / temperature))
    expected = temperature**2 * (p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q)))
    value = bernoulli_soft_target_kl(torch.tensor([[student, 1.0]]), torch.tensor([[teacher, 1.0]]), temperature)
    assert value.item() == pytest.approx(expected, rel=1e-6)
    outputs = lambda logits: SequenceClassifierOutput(logits=logits)  # noqa: E731
    multi = distillation_loss(outputs(torch.tensor([[student, 1.0]])), outputs(torch.tensor([[teacher, 1.0]])),
                              temperature=temperature, problem_type="multi_label_classification")
    assert multi.item() == pytest.approx(expected, rel=1e-6)
    # Token classification: padding tokens (mask 0) do not count, however far apart the predictions there.
    student_tokens, teacher_tokens = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    far = teacher_tokens.clone()
    far[mask == 0] = 100.0
    first = distillation_loss(outputs(student_tokens), outputs(teacher_tokens), token_mask=mask)
    second = distillation_loss(outputs(student_tokens), outputs(far), token_mask=mask)
    real = soft_target_kl(student_tokens, teacher_tokens)[mask == 1]
    torch.testing.assert_close(first, real.mean())
    torch.testing.assert_close(first, second)


def reference_relation_kl(student_states, teacher_states, heads, lengths):
    """Per example, per head, on the real tokens only (no masking trick): softmax(A A^T / sqrt(d)), KL(t || s)."""
    def relation(states, b, n, r):
        d = states.shape[-1] // heads
        a = states[b, :n, r * d:(r + 1) * d]  # [n, d]
        return F.log_softmax(a @ a.T / math.sqrt(d), -1)

    total, rows = 0.0, 0
    for b, n in enumerate(lengths):
        for r in range(heads):
            log_s, log_t = relation(student_states, b, n, r), relation(teacher_states, b, n, r)
            total += F.kl_div(log_s, log_t, log_target=True, reduction="sum").item()
            rows += n
    return total / rows


def test_relation_kl_matches_a_reference_across_widths():
    student, teacher = torch.randn(2, 5, 32), torch.randn(2, 5, 64)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    garbage = student.clone()
    garbage[1, 3:] = 50.0  # padding positions do not count
    value = relation_kl(garbage, teacher, 2, mask)
    assert value.item() == pytest.approx(reference_relation_kl(student, teacher, 2, [5, 3]), rel=1e-5)
    # Relations see only inner products: rotating the teacher's heads changes nothing, and a student equal to the
    # teacher (up to that) gives zero.
    rotation = torch.linalg.qr(torch.randn(32, 32))[0]
    rotated = torch.cat([teacher[..., :32] @ rotation, teacher[..., 32:] @ rotation], -1)
    assert relation_kl(rotated, teacher, 2, mask).abs().item() < 1e-5
    with pytest.raises(ValueError, match="relation heads"):
        relation_kl(torch.randn(2, 5, 30), teacher, 4)


# ----------------------------------------------------------------------------------------------------------------------
# The callback
# ----------------------------------------------------------------------------------------------------------------------


class OracleTeacher(torch.nn.Module):
    """A good teacher for FirstTokenTask: confident logits from the rule (label = token after [CLS] - 5)."""

    def forward(self, input_ids, attention_mask=None, **kwargs):
        label = (input_ids[:, 1] - 5).clamp(0, 1)
        return {"logits": 3.0 * F.one_hot(label, 2).float() - 1.5}


def noisy_task(size, seed, noise):
    """FirstTokenTask with a fraction `noise` of its training labels flipped."""
    task = FirstTokenTask(size, seed=seed)
    flip = torch.rand(size, generator=torch.Generator().manual_seed(seed + 100)) < noise
    task.labels = torch.where(flip, 1 - task.labels, task.labels)
    return task


def accuracy(model, task):
    model.eval()
    with torch.no_grad():
        predicted = model(input_ids=task.input_ids).logits.argmax(-1)
    return (predicted == task.labels).float().mean().item()


def train_toy(seed, teacher=None, steps=15, noise=0.4):
    """A custom loop with the callback's hooks (what the Trainer does, without its start-up cost)."""
    model = classifier(seed, **STUDENT, **DROPOUT).train()
    task = noisy_task(48, seed, noise)
    callback = DistillationCallback(teacher, temperature=2.0, alpha_task=0.2, alpha_kd=0.8) if teacher else None
    if callback:
        callback.install(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        rows = torch.randint(len(task), (16,), generator=generator)
        model(input_ids=task.input_ids[rows], labels=task.labels[rows]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    if callback:
        callback.remove()
    return accuracy(model, FirstTokenTask(200, seed=1000 + seed))


def test_a_good_teacher_beats_noisy_labels_over_seeds():
    """40% of the training labels are flipped; the teacher knows the rule. Over 4 seeds the distilled student is
    more accurate in every seed and on average by a wide margin (seen: 0.50 alone, 0.97 distilled)."""
    alone = [train_toy(seed) for seed in range(4)]
    distilled = [train_toy(seed, OracleTeacher()) for seed in range(4)]
    assert all(d > a for d, a in zip(distilled, alone, strict=True)), (alone, distilled)
    assert sum(distilled) / 4 > sum(alone) / 4 + 0.2, (alone, distilled)


def test_hooks_act_only_in_training_with_gradients():
    student, teacher = classifier(**STUDENT), classifier(1, **TEACHER)
    input_ids, attention_mask = random_batch(30, batch=4, length=9)
    batch = dict(input_ids=input_ids, attention_mask=attention_mask, labels=torch.tensor([0, 1, 1, 0]))
    plain = {mode: None for mode in ("eval", "no_grad", "train")}
    callback = DistillationCallback(teacher, temperature=3.0, alpha_task=0.3, alpha_kd=0.7)
    for hooked in (False, True):
        if hooked:
            callback.install(student)
        student.eval()
        eval_loss = student(**batch).loss
        student.train()
        with torch.no_grad():
            no_grad_loss = student(**batch).loss
        train_loss = student(**batch).loss
        if not hooked:
            plain = dict(eval=eval_loss, no_grad=no_grad_loss, train=train_loss)
    callback.remove()
    assert torch.equal(eval_loss, plain["eval"]) and torch.equal(no_grad_loss, plain["no_grad"])
    with torch.no_grad():
        teacher_logits = teacher(input_ids=input_ids, attention_mask=attention_mask).logits
        student_logits = student(input_ids=input_ids, attention_mask=attention_mask).logits
    kd = soft_target_kl(student_logits, teacher_logits, 3.0).mean()
    torch.testing.assert_close(train_loss, 0.3 * plain["train"] + 0.7 * kd)
    assert not student._forward_hooks and not student._forward_pre_hooks and not callback.installed


@pytest.mark.parametrize("head", [DebertaCustomForTokenClassification, DebertaCustomForQuestionAnswering,
                                  DebertaCustomForMultipleChoice], ids=["token", "qa", "choice"])
def test_every_head_distills_with_relations(head):
    torch.manual_seed(0)
    student, teacher = head(tiny_config(num_labels=2, **STUDENT)).train(), head(tiny_config(num_labels=2, **TEACHER))
    input_ids, attention_mask = random_batch(99, batch=4, length=9)
    batch = dict(input_ids=input_ids, attention_mask=attention_mask)
    if head is DebertaCustomForTokenClassification:
        batch["labels"] = input_ids % 2
    elif head is DebertaCustomForQuestionAnswering:
        batch.update(start_positions=torch.tensor([1, 2, 3, 0]), end_positions=torch.tensor([2, 3, 4, 1]))
    else:  # [B, N] -> [B / 2, 2 choices, N]
        batch = {k: v.view(2, 2, -1) for k, v in batch.items()} | dict(labels=torch.tensor([0, 1]))
    plain = student(**batch).loss
    callback = DistillationCallback(teacher, relation_weight=1.0)
    callback.install(student)
    loss = student(**batch).loss
    callback.remove()
    terms = callback._means(callback._window)
    assert set(terms) == {"kd_loss", "task_loss", "relation_query_loss", "relation_key_loss", "relation_value_loss"}
    assert all(value > 0 for value in terms.values())
    assert terms["task_loss"] == pytest.approx(plain.item(), rel=1e-5)
    expected = 0.5 * terms["task_loss"] + 0.5 * terms["kd_loss"] + sum(
        v for k, v in terms.items() if k.startswith("relation"))
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())


def trainer_run(tmp_path, callback=None, student=None, **arguments):
    student = student if student is not None else classifier(**STUDENT, **DROPOUT)
    settings = dict(output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=6, learning_rate=1e-2,
                    logging_steps=3, report_to="none", save_strategy="no", use_cpu=True, seed=0, disable_tqdm=True)
    settings.update(arguments)
    trainer = Trainer(model=student, args=TrainingArguments(**settings), train_dataset=FirstTokenTask(),
                      callbacks=[callback] if callback else None)
    trainer.train()
    return student, trainer


def test_teacher_is_frozen_and_every_term_is_logged(tmp_path):
    teacher = classifier(1, **TEACHER, **DROPOUT).train()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    callback = DistillationCallback(teacher, relation_weight=1.0)
    student, trainer = trainer_run(tmp_path, callback)
    assert not teacher.training and all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    names = ["distill_kd_loss", "distill_task_loss"] + [f"distill_relation_{r}_loss" for r in ("query", "key", "value")]
    assert len(logs) == 2 and all(entry[name] > 0 for entry in logs for name in names)
    # The logged loss is the weighted sum of the logged terms (one value per step, so means of sums agree).
    for entry in logs:
        combined = 0.5 * entry["distill_task_loss"] + 0.5 * entry["distill_kd_loss"] + sum(
            entry[f"distill_relation_{r}_loss"] for r in ("query", "key", "value"))
        assert entry["loss"] == pytest.approx(combined, rel=1e-3)
    final = trainer.state.log_history[-1]
    assert all(f"train_{name}" in final for name in names)
    assert not callback.installed and not student._forward_hooks and not teacher._forward_hooks


def test_terms_reach_callbacks_listed_before_it_like_report_to_integrations(tmp_path):
    """The Trainer lists the report_to integrations before the callbacks passed to it; place_before_integrations moves
    the distillation callback ahead of them, so a callback listed before it (standing in for TensorBoard) sees its
    terms in `logs`."""
    from transformers import TrainerCallback

    class Recorder(TrainerCallback):
        seen = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.seen.append(dict(logs))

    recorder = Recorder()
    settings = dict(output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=2, logging_steps=1,
                    report_to="none", save_strategy="no", use_cpu=True, seed=0, disable_tqdm=True)
    trainer = Trainer(model=classifier(**STUDENT), args=TrainingArguments(**settings), train_dataset=FirstTokenTask(),
                      callbacks=[recorder, DistillationCallback(classifier(1, **TEACHER))])
    place_before_integrations(trainer).train()
    assert [entry for entry in recorder.seen if "loss" in entry] and all(
        "distill_kd_loss" in entry for entry in recorder.seen if "loss" in entry)


def sparse_masked_lm_student_and_teacher():
    """A masked-LM student with sparse logits in training ([K, V], labelled positions first), its copy with dense
    logits, a wider masked-LM teacher, and a batch with 3 + 2 labelled positions (K = 10 rows)."""
    torch.manual_seed(0)
    student = DebertaCustomForMaskedLM(tiny_config(sparse_mlm_max_fraction=0.5)).train()
    dense = DebertaCustomForMaskedLM(tiny_config(sparse_mlm_logits=False)).train()
    dense.load_state_dict(student.state_dict())
    teacher = DebertaCustomForMaskedLM(tiny_config(**TEACHER)).eval()
    input_ids, attention_mask = random_batch(student.config.vocab_size, batch=2, length=10)
    labels = torch.full_like(input_ids, -100)
    for row, column in [(0, 2), (0, 5), (0, 8), (1, 1), (1, 3)]:
        labels[row, column] = input_ids[row, column]
    return student, dense, teacher, dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels)


def test_sparse_masked_lm_student_is_distilled_at_its_labelled_positions():
    """The student's sparse logits [K, V] are compared with the (eval-mode, dense) teacher's logits at the same
    positions: the term is, by hand, the mean over the labelled positions of T^2 KL on dense logits."""
    student, dense, teacher, batch = sparse_masked_lm_student_and_teacher()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        teacher_logits, student_logits = teacher(**inputs).logits, dense(**inputs).logits  # [B, N, V]
    labelled = batch["labels"] != -100
    expected = soft_target_kl(student_logits[labelled], teacher_logits[labelled], 2.0).mean()
    callback = DistillationCallback(teacher, temperature=2.0)
    callback.install(student)
    outputs = student(**batch)
    callback.remove()
    assert outputs.logits.shape == (int(labelled.sum()), student.config.vocab_size)  # eager: the labelled rows only
    terms = callback._means(callback._window)
    assert terms["kd_loss"] == pytest.approx(expected.item(), rel=1e-5)
    assert outputs.loss.item() == pytest.approx(0.5 * terms["task_loss"] + 0.5 * terms["kd_loss"], rel=1e-5)


def test_sparse_logits_that_cannot_be_paired_are_refused():
    """Two sparse outputs of different row counts cover different positions (as a compiled pass with another
    prediction budget gives): a clear error, not a label-space one."""
    student, _, teacher, batch = sparse_masked_lm_student_and_teacher()
    outputs = student(**batch)  # [M, V]: the M labelled positions
    other = MaskedLMOutput(logits=torch.randn(outputs.logits.shape[0] + 3, outputs.logits.shape[1]))
    with pytest.raises(ValueError, match="Sparse masked-LM logits .* select the same positions"):
        distillation_loss(outputs, other, labels=batch["labels"])
    with pytest.raises(ValueError, match="Sparse masked-LM logits"):  # without labels, no positions to gather at
        distillation_loss(outputs, teacher(**{k: v for k, v in batch.items() if k != "labels"}))


def test_relation_transfer_across_widths_and_heads_teaches_the_student():
    """Student 32 wide / 2 heads / 2 layers, teacher 64 / 4 / 3: with the relation loss alone the student's last-layer
    relations move towards the teacher's, and the gradient reaches the student's projections."""
    student, teacher = classifier(**STUDENT).train(), classifier(1, **TEACHER)
    input_ids, attention_mask = random_batch(30, batch=4, length=9)
    callback = DistillationCallback(teacher, alpha_task=0.0, alpha_kd=0.0, relation_weight=1.0)
    callback.install(student)
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-2)
    losses = []
    for _ in range(25):
        loss = student(input_ids=input_ids, attention_mask=attention_mask).loss
        losses.append(loss.item())
        loss.backward()
        if not losses[1:]:
            last = student.deberta.encoder.layer[-1].attention.self
            assert all(getattr(last, f"{r}_proj").weight.grad.abs().sum() > 0 for r in ("query", "key", "value"))
            assert student.classifier.weight.grad is None or student.classifier.weight.grad.abs().sum() == 0
        optimizer.step()
        optimizer.zero_grad()
    callback.remove()
    assert losses[-1] < 0.5 * losses[0], losses
    # The recorders in custom loops give the same value.
    recorders = ProjectionRecorder(student), ProjectionRecorder(teacher)
    student.eval()
    student(input_ids=input_ids, attention_mask=attention_mask), teacher(input_ids=input_ids,
                                                                          attention_mask=attention_mask)
    value = sum(relation_loss(*recorders, num_heads=2, attention_mask=attention_mask).values())
    assert value.item() == pytest.approx(losses[-1], rel=0.3)
    for recorder in recorders:
        recorder.remove()


def test_gradient_accumulation_and_checkpointing_give_the_same_weights(tmp_path):
    """Dropout off: batch 8 in one step, in two accumulated halves, and with gradient checkpointing, all with the
    output and relation terms, end with the same weights."""
    teacher = classifier(1, **TEACHER)
    runs = [dict(), dict(per_device_train_batch_size=4, gradient_accumulation_steps=2),
            dict(activation_checkpointing=True)]
    weights = []
    for i, arguments in enumerate(runs):
        student, _ = trainer_run(tmp_path / str(i), DistillationCallback(teacher, relation_weight=1.0),
                                 classifier(**STUDENT), max_steps=3, **arguments)
        weights.append(torch.cat([p.detach().flatten() for p in student.parameters()]))
    torch.testing.assert_close(weights[1], weights[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(weights[2], weights[0], rtol=1e-5, atol=1e-6)


def test_reentrant_checkpointing_is_refused_for_relations_and_fine_without(tmp_path):
    teacher = classifier(1, **TEACHER)
    arguments = dict(activation_checkpointing=True, max_steps=1,
                     activation_checkpointing_kwargs={"use_reentrant": True})
    with pytest.raises(RuntimeError, match="reentrant"):
        trainer_run(tmp_path, DistillationCallback(teacher, relation_weight=1.0), **arguments)
    trainer_run(tmp_path, DistillationCallback(teacher), **arguments)


def test_teacher_runs_under_the_students_bf16_autocast(tmp_path):
    teacher = classifier(1, **TEACHER)
    seen = []
    teacher.classifier.register_forward_hook(lambda module, args, output: seen.append(output.dtype))
    _, trainer = trainer_run(tmp_path, DistillationCallback(teacher), bf16=True, max_steps=2)
    assert seen == [torch.bfloat16] * 2
    assert all(math.isfinite(entry["distill_kd_loss"]) for entry in trainer.state.log_history if "loss" in entry)


def test_sift_passes_are_not_distilled_whatever_the_callback_order(tmp_path):
    teacher = classifier(1, **TEACHER)
    calls = []
    teacher.register_forward_hook(lambda *args: calls.append(1))
    sift = SiFTCallback(adv_weight=1.0, init_perturbation=0.5, step_size=0.1)
    student = classifier(**STUDENT, **DROPOUT)
    trainer = Trainer(model=student, train_dataset=FirstTokenTask(), callbacks=[DistillationCallback(teacher), sift],
                      args=TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=3,
                                             report_to="none", save_strategy="no", use_cpu=True, disable_tqdm=True,
                                             logging_steps=3))
    trainer.train()
    assert len(calls) == 3  # one teacher pass per step; SiFT's two perturbed passes per step are left alone
    logged = trainer.state.log_history[0]
    assert logged["sift_loss"] > 0 and logged["distill_kd_loss"] > 0


def test_saved_student_is_a_plain_checkpoint(tmp_path):
    plain_student, plain = trainer_run(tmp_path / "plain", max_steps=1)
    plain.save_model(str(tmp_path / "plain-saved"))
    callback = DistillationCallback(classifier(1, **TEACHER), relation_weight=1.0)
    student, trainer = trainer_run(tmp_path / "distilled", callback, max_steps=2)
    trainer.save_model(str(tmp_path / "saved"))
    assert sorted(p.name for p in (tmp_path / "saved").iterdir()) == sorted(
        p.name for p in (tmp_path / "plain-saved").iterdir())
    reloaded = DebertaCustomForSequenceClassification.from_pretrained(str(tmp_path / "saved"))
    assert set(reloaded.state_dict()) == set(plain_student.state_dict()) == set(student.state_dict())
    batch = FirstTokenTask(4, seed=2)[:4]
    student.eval()
    torch.testing.assert_close(reloaded(**batch).logits, student(**batch).logits)


def test_mismatched_teachers_are_refused():
    student = classifier(**STUDENT)
    with pytest.raises(ValueError, match="num_labels"):
        check_compatible(student, DebertaCustomForSequenceClassification(tiny_config(num_labels=3, vocab_size=30)))
    with pytest.raises(ValueError, match="vocab_size"):
        check_compatible(student, DebertaCustomForSequenceClassification(tiny_config(num_labels=2, vocab_size=31)))
    renamed = classifier(**TEACHER)
    renamed.config.id2label = {0: "no", 1: "yes"}
    with pytest.raises(ValueError, match="id2label"):
        DistillationCallback(renamed).install(student)
    with pytest.raises(ValueError, match="relation heads"):
        DistillationCallback(classifier(**TEACHER), relation_weight=1.0, relation_heads=3).install(student)


@pytest.mark.slow  # two interpreter start-ups: ~15 s on an idle 2-core machine
def test_callback_under_ddp_with_two_cpu_processes(tmp_path):
    """torchrun, 2 processes over gloo, with accumulation, checkpointing and the relation terms."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(CHILD_SCRIPTS / "ddp_distill.py"), str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                            env=child_environment(OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "ddp.json").read_text())
    assert report["world_size"] == 2 and report["max_difference"] == 0.0
    logged = [entry for entry in report["log_history"] if "loss" in entry]
    assert len(logged) == 2 and all(entry["distill_kd_loss"] > 0 and entry["distill_relation_value_loss"] > 0
                                    for entry in logged)


# ----------------------------------------------------------------------------------------------------------------------
# scripts/run_glue.py --teacher
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def demo_teacher(tmp_path):
    """A teacher folder for the bundled SST-2 demo: the demo's tokenizer and label space, twice the tiny width."""
    tokenizer = AutoTokenizer.from_pretrained(REPO_ROOT / "data" / "tokenizer")
    config = tiny_config(vocab_size=len(tokenizer), hidden_size=64, num_attention_heads=4, num_labels=2,
                         problem_type="single_label_classification", id2label={0: "negative", 1: "positive"},
                         label2id={"negative": 0, "positive": 1})
    DebertaCustomForSequenceClassification(config).save_pretrained(tmp_path / "teacher")
    tokenizer.save_pretrained(tmp_path / "teacher")
    return tmp_path / "teacher"


def test_run_glue_distills_and_resumes_exactly(tmp_path, monkeypatch, demo_teacher):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets-cache")
    script = load_script(RUN_GLUE)
    argv = ["--demo", "--max_train_samples", "64", "--per_device_train_batch_size", "8", "--eval_strategy", "no",
            "--do_eval", "false", "--teacher", str(demo_teacher), "--distill_relation_weight", "1.0", *RESUME_ARGS]
    try:
        assert_resumed_exactly(*run_three_ways(script, argv, tmp_path / "glue", monkeypatch))
        history = (tmp_path / "glue" / "straight" / "trainer_state.json").read_text()
        assert "distill_kd_loss" in history and "distill_relation_key_loss" in history
    finally:
        sys.modules.pop(script.__name__, None)


def test_run_glue_refuses_a_mismatched_teacher_before_training(tmp_path, monkeypatch, demo_teacher):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets-cache")
    script = load_script(RUN_GLUE)
    monkeypatch.setattr(script.Trainer, "train", lambda *a, **k: pytest.fail("training started"))
    argv = ["--demo", "--max_train_samples", "16", "--use_cpu", "--report_to", "none", "--output_dir",
            str(tmp_path / "out")]
    try:
        three_labels = DebertaCustomForSequenceClassification.from_pretrained(demo_teacher, num_labels=3,
                                                                              ignore_mismatched_sizes=True)
        three_labels.save_pretrained(tmp_path / "three")
        with pytest.raises(SystemExit, match="num_labels 2 vs 3"):
            script.main(argv + ["--teacher", str(tmp_path / "three")])
        other = tmp_path / "other-tokenizer"
        DebertaCustomForSequenceClassification.from_pretrained(demo_teacher).save_pretrained(other)
        tokenizer = AutoTokenizer.from_pretrained(demo_teacher)
        tokenizer.add_tokens(["distillation"])
        tokenizer.save_pretrained(other)
        with pytest.raises(SystemExit, match="different tokenizer"):
            script.main(argv + ["--teacher", str(other)])
    finally:
        sys.modules.pop(script.__name__, None)
