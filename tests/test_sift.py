"""SiFT (modeling_deberta_custom.sift): the maths as plain functions, and the Trainer callback.

The Trainer tests train a tiny model on a task it learns in a few steps (the label is the first token after
[CLS]); the DDP test runs the same training in two CPU processes under torchrun."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO_ROOT, random_batch, tiny_config
from transformers import Trainer, TrainingArguments
from transformers.modeling_outputs import QuestionAnsweringModelOutput, SequenceClassifierOutput

from modeling_deberta_custom import (
    DebertaCustomForMultipleChoice,
    DebertaCustomForQuestionAnswering,
    DebertaCustomForSequenceClassification,
    DebertaCustomForTokenClassification,
)
from modeling_deberta_custom.sift import (
    NormalizedPerturbation,
    SiFTCallback,
    ascent_step,
    capture_rng_state,
    find_perturbed_module,
    initial_perturbation,
    output_divergence,
    sift_loss,
    squared_error,
    symmetric_kl,
)

DROPOUT = dict(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)


def classifier(**overrides):
    return DebertaCustomForSequenceClassification(tiny_config(num_labels=3, **DROPOUT, **overrides)).train()


def batch_for(vocab_size=99, batch=4, length=10, num_labels=3, seed=0):
    input_ids, attention_mask = random_batch(vocab_size, batch=batch, length=length, seed=seed)
    labels = torch.arange(batch) % num_labels
    return dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels)


# ----------------------------------------------------------------------------------------------------------------------
# The maths
# ----------------------------------------------------------------------------------------------------------------------


def test_symmetric_kl_is_both_kl_directions_in_fp32():
    p, q = torch.randn(5, 4), torch.randn(5, 4)
    log_p, log_q = F.log_softmax(p, -1), F.log_softmax(q, -1)
    expected = (F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)
                + F.kl_div(log_p, log_q, log_target=True, reduction="none").sum(-1))
    torch.testing.assert_close(symmetric_kl(p, q), expected)
    assert symmetric_kl(p.bfloat16(), q.bfloat16()).dtype == torch.float32
    assert torch.equal(symmetric_kl(p, p), torch.zeros(5))


def test_regression_uses_squared_error():
    clean = SequenceClassifierOutput(logits=torch.tensor([[0.5], [1.0], [-2.0]]))
    perturbed = SequenceClassifierOutput(logits=torch.tensor([[0.7], [1.0], [-1.0]]))
    # The KL of a one-logit softmax is identically zero; squared error is what is used.
    assert torch.equal(symmetric_kl(perturbed.logits, clean.logits), torch.zeros(3))
    expected = ((0.2**2) + 0 + 1.0) / 3
    assert output_divergence(perturbed, clean).item() == pytest.approx(expected, rel=1e-6)
    assert squared_error(perturbed.logits, clean.logits).shape == (3,)


def test_question_answering_averages_start_and_end():
    start, end = torch.randn(2, 6), torch.randn(2, 6)
    clean = QuestionAnsweringModelOutput(start_logits=start, end_logits=end)
    perturbed = QuestionAnsweringModelOutput(start_logits=start + 1.0 * torch.randn(2, 6), end_logits=end)
    expected = symmetric_kl(perturbed.start_logits, start).mean() / 2
    torch.testing.assert_close(output_divergence(perturbed, clean), expected)


def test_token_divergence_ignores_padding():
    clean = torch.randn(2, 3, 4)
    perturbed = clean.clone()
    perturbed[1, 2] += 5.0  # a change at a padded position only
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    value = output_divergence({"logits": perturbed}, {"logits": clean}, token_mask=mask)
    assert value.item() == 0.0
    assert output_divergence({"logits": perturbed}, {"logits": clean}).item() > 0


def test_initial_perturbation_is_clamped_normal():
    generator = torch.Generator().manual_seed(0)
    delta = initial_perturbation((200, 64), std=1e-2, generator=generator)
    assert delta.dtype == torch.float32
    assert delta.abs().max().item() <= 2e-2
    assert 0.008 < delta.std().item() < 0.011
    assert torch.equal(initial_perturbation((3, 4), std=0.0), torch.zeros(3, 4))


def test_ascent_step_formula():
    delta = torch.zeros(2, 3)
    grad = torch.tensor([[1.0, -4.0, 2.0], [float("nan"), 0.5, -0.25]])
    stepped = ascent_step(delta, grad, step_size=1e-4)
    expected = torch.tensor([[1 / 4, -1.0, 1 / 2], [0.0, 1.0, -0.5]]) * 1e-4 / (1 + 1e-6 / torch.tensor([[4.0], [0.5]]))
    torch.testing.assert_close(stepped, expected)  # normalized per row by max|g|; a NaN counts as 0
    assert not stepped.requires_grad


def test_perturbation_equals_perturbing_the_normalized_input():
    layer_norm = torch.nn.LayerNorm(16, eps=1e-7)
    with torch.no_grad():
        layer_norm.weight.normal_()
        layer_norm.bias.normal_()
    x = torch.randn(3, 5, 16) * 4 + 2
    delta = torch.randn(3, 5, 16) * 1e-2
    hook = NormalizedPerturbation(eps=layer_norm.eps)
    hook.delta = delta
    handle = layer_norm.register_forward_pre_hook(hook)
    perturbed = layer_norm(x)
    handle.remove()
    normalized = F.layer_norm(x, (16,), eps=1e-7)  # normalized without affine
    torch.testing.assert_close(perturbed, layer_norm(normalized + delta), atol=1e-5, rtol=1e-5)


def test_find_perturbed_module():
    model = classifier()
    assert find_perturbed_module(model) is model.deberta.embeddings.LayerNorm
    assert find_perturbed_module(model, "deberta.embeddings.LayerNorm") is model.deberta.embeddings.LayerNorm
    assert find_perturbed_module(model, model.deberta.encoder.LayerNorm) is model.deberta.encoder.LayerNorm
    with pytest.raises(ValueError, match="found none"):
        find_perturbed_module(model, "no.such.LayerNorm")
    with pytest.raises(TypeError, match="LayerNorm"):
        find_perturbed_module(model, model.classifier)


# ----------------------------------------------------------------------------------------------------------------------
# The adversarial loss on our heads
# ----------------------------------------------------------------------------------------------------------------------


def test_zero_perturbation_gives_zero_loss_with_dropout_on():
    model, batch = classifier(), batch_for()
    rng = capture_rng_state("cpu")
    outputs = model(**batch)
    loss = sift_loss(model, batch, outputs, rng_state=rng, init_perturbation=0.0, step_size=0.0)
    assert loss.item() == 0.0  # the perturbed pass replays the clean pass's dropout masks exactly
    # With fresh dropout masks the divergence also measures dropout noise.
    outputs = model(**batch)
    assert sift_loss(model, batch, outputs, init_perturbation=0.0, step_size=0.0).item() > 0


def test_rng_replay_leaves_the_random_stream_as_after_the_clean_pass():
    model, batch = classifier(), batch_for()
    torch.manual_seed(3)
    model(**batch)
    expected = torch.rand(4)
    torch.manual_seed(3)
    rng = capture_rng_state("cpu")
    outputs = model(**batch)
    sift_loss(model, batch, outputs, rng_state=rng, generator=torch.Generator().manual_seed(0))
    assert torch.equal(torch.rand(4), expected)


def test_ascent_step_reaches_no_parameter_but_the_loss_does():
    model, batch = classifier(), batch_for()
    rng = capture_rng_state("cpu")
    outputs = model(**batch)
    requires_grad = [p.requires_grad for p in model.parameters()]
    loss = sift_loss(model, batch, outputs, rng_state=rng, init_perturbation=0.1, step_size=1e-2)
    assert all(p.grad is None for p in model.parameters()), "the ascent step left gradients on parameters"
    assert [p.requires_grad for p in model.parameters()] == requires_grad
    assert loss.requires_grad and loss.item() > 0
    loss.backward()
    reached = {name for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    for name in ("classifier.weight", "pooler.dense.weight", "deberta.embeddings.word_embeddings.weight",
                 "deberta.embeddings.LayerNorm.weight", "deberta.encoder.layer.0.attention.self.query_proj.weight"):
        assert name in reached


def test_ascent_step_increases_the_divergence():
    model, batch = classifier(), batch_for()
    model.eval()  # deterministic passes, so that the divergence is a function of delta alone
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    clean = model(**inputs)
    hook = NormalizedPerturbation(eps=model.deberta.embeddings.LayerNorm.eps, std=1e-2,
                                  generator=torch.Generator().manual_seed(0), requires_grad=True)
    handle = model.deberta.embeddings.LayerNorm.register_forward_pre_hook(hook)
    try:
        before = output_divergence(model(**inputs), clean, reduction="sum")
        before.backward()
        hook.delta = ascent_step(hook.delta, hook.delta.grad, step_size=5e-3)
        with torch.no_grad():
            after = output_divergence(model(**inputs), clean, reduction="sum")
    finally:
        handle.remove()
    assert after.item() > before.item()


@pytest.mark.parametrize("head", ["token", "qa", "choice", "regression"])
def test_every_head(head):
    input_ids, attention_mask = random_batch(99, batch=4, length=10)
    if head == "token":
        model = DebertaCustomForTokenClassification(tiny_config(num_labels=3, **DROPOUT))
        batch = dict(input_ids=input_ids, attention_mask=attention_mask, labels=torch.randint(0, 3, (4, 10)))
    elif head == "qa":
        model = DebertaCustomForQuestionAnswering(tiny_config(num_labels=2, **DROPOUT))
        batch = dict(input_ids=input_ids, attention_mask=attention_mask, start_positions=torch.tensor([1, 2, 3, 4]),
                     end_positions=torch.tensor([2, 3, 4, 5]))
    elif head == "choice":
        model = DebertaCustomForMultipleChoice(tiny_config(**DROPOUT))
        batch = dict(input_ids=input_ids.view(2, 2, 10), attention_mask=attention_mask.view(2, 2, 10),
                     labels=torch.tensor([0, 1]))
    else:
        model = DebertaCustomForSequenceClassification(tiny_config(num_labels=1, **DROPOUT))
        batch = dict(input_ids=input_ids, attention_mask=attention_mask, labels=torch.rand(4))
    model.train()
    rng = capture_rng_state("cpu")
    outputs = model(**batch)
    assert sift_loss(model, batch, outputs, rng_state=rng, init_perturbation=0.0, step_size=0.0).item() == 0.0
    rng = capture_rng_state("cpu")
    outputs = model(**batch)
    loss = sift_loss(model, batch, outputs, rng_state=rng, init_perturbation=0.5, step_size=0.1)
    assert torch.isfinite(loss) and loss.item() > 0
    (outputs.loss + loss).backward()


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_gradient_checkpointing_gives_the_same_gradients(use_reentrant):
    batch = batch_for()
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = classifier()
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": use_reentrant})
        torch.manual_seed(1)
        rng = capture_rng_state("cpu")
        outputs = model(**batch)
        (outputs.loss + sift_loss(model, batch, outputs, rng_state=rng, init_perturbation=0.5)).backward()
        grads.append([p.grad.clone() if p.grad is not None else None for p in model.parameters()])
    for plain, checkpointed in zip(*grads, strict=True):
        if plain is None:
            assert checkpointed is None
        else:
            torch.testing.assert_close(plain, checkpointed)


# ----------------------------------------------------------------------------------------------------------------------
# The callback
# ----------------------------------------------------------------------------------------------------------------------


class FirstTokenTask(torch.utils.data.Dataset):
    """Label = whether the token after [CLS] is 5 (else 6); the rest is noise."""

    def __init__(self, size=64, length=8, seed=0):
        generator = torch.Generator().manual_seed(seed)
        self.input_ids = torch.randint(7, 30, (size, length), generator=generator)
        self.labels = torch.randint(0, 2, (size,), generator=generator)
        self.input_ids[:, 0] = 1
        self.input_ids[:, 1] = 5 + self.labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return dict(input_ids=self.input_ids[i], attention_mask=torch.ones_like(self.input_ids[i]),
                    labels=self.labels[i])


def train(tmp_path, callback=None, **arguments):
    torch.manual_seed(0)
    model = DebertaCustomForSequenceClassification(tiny_config(num_labels=2, vocab_size=30, **DROPOUT))
    settings = dict(output_dir=str(tmp_path), per_device_train_batch_size=16, num_train_epochs=5, learning_rate=1e-2,
                    logging_steps=5, report_to="none", save_strategy="no", use_cpu=True, seed=0, disable_tqdm=True)
    settings.update(arguments)
    trainer = Trainer(model=model, args=TrainingArguments(**settings), train_dataset=FirstTokenTask(),
                      eval_dataset=FirstTokenTask(32, seed=1), callbacks=[callback] if callback else None)
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    return model, trainer, before, trainer.evaluate()["eval_loss"]


def sift_callback():
    return SiFTCallback(adv_weight=5.0, init_perturbation=0.5, step_size=0.1)


def test_callback_changes_the_loss_and_the_model_learns(tmp_path):
    plain_model, plain, _, _ = train(tmp_path / "plain")
    reference_keys = set(plain_model.state_dict())
    callback = sift_callback()
    model, trainer, before, after = train(tmp_path / "sift", callback)
    assert after < before * 0.7, f"eval loss {before} -> {after}: the model did not learn with SiFT"
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    plain_losses = [entry["loss"] for entry in plain.state.log_history if "loss" in entry]
    assert losses != plain_losses
    logged = [entry["sift_loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == len(losses) and all(value > 0 for value in logged)
    assert trainer.state.log_history[-2]["train_sift_loss"] > 0  # the final training summary, before evaluate
    # Nothing left behind: no hook, no new weight, unchanged evaluation and saving.
    assert not callback.installed
    assert not model._forward_hooks and not model._forward_pre_hooks
    assert not model.deberta.embeddings.LayerNorm._forward_pre_hooks
    assert set(model.state_dict()) == reference_keys
    trainer.save_model(str(tmp_path / "saved"))
    reloaded = DebertaCustomForSequenceClassification.from_pretrained(str(tmp_path / "saved"))
    batch = FirstTokenTask(4, seed=2)[:4]
    model.eval()
    torch.testing.assert_close(reloaded(**batch).logits, model(**batch).logits)


def test_installed_hooks_act_only_in_training_with_gradients():
    model, batch = classifier(), batch_for()
    callback = sift_callback()

    def loss(training, grad, hooked):
        model.train(training)
        callback.install(model) if hooked else callback.remove()
        torch.manual_seed(0)
        with torch.set_grad_enabled(grad):
            return model(**batch).loss.detach()

    try:
        assert torch.equal(loss(False, True, hooked=True), loss(False, True, hooked=False))  # evaluation
        assert torch.equal(loss(True, False, hooked=True), loss(True, False, hooked=False))  # no gradients
        assert loss(True, True, hooked=True) > loss(True, True, hooked=False)  # training: the SiFT term is added
    finally:
        callback.remove()
    assert not model._forward_hooks and not model._forward_pre_hooks


@pytest.mark.parametrize("arguments", [dict(gradient_accumulation_steps=2), dict(activation_checkpointing=True),
                                       dict(bf16=True)], ids=["accumulation", "checkpointing", "bf16"])
def test_callback_with_training_options(tmp_path, arguments):
    callback = sift_callback()
    model, trainer, before, after = train(tmp_path, callback, **arguments)
    logged = [entry["sift_loss"] for entry in trainer.state.log_history if "sift_loss" in entry]
    assert logged and all(torch.isfinite(torch.tensor(value)) and value > 0 for value in logged)
    assert after < before
    assert not callback.installed and not model._forward_hooks


def test_callback_refuses_label_smoothing(tmp_path):
    with pytest.raises(ValueError, match="label_smoothing_factor"):
        train(tmp_path, sift_callback(), label_smoothing_factor=0.1, num_train_epochs=1)


DDP_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    sys.path.insert(0, {tests!r})
    from test_sift import DROPOUT, FirstTokenTask, sift_callback
    from conftest import tiny_config
    from transformers import Trainer, TrainingArguments
    from modeling_deberta_custom import DebertaCustomForSequenceClassification

    torch.manual_seed(0)
    model = DebertaCustomForSequenceClassification(tiny_config(num_labels=2, vocab_size=30, **DROPOUT))
    args = TrainingArguments(output_dir=sys.argv[1], per_device_train_batch_size=8, max_steps=4, learning_rate=1e-2,
                             logging_steps=2, report_to="none", save_strategy="no", use_cpu=True, disable_tqdm=True,
                             gradient_accumulation_steps=2, activation_checkpointing=True,
                             ddp_find_unused_parameters=False)
    callback = sift_callback()
    trainer = Trainer(model=model, args=args, train_dataset=FirstTokenTask(), callbacks=[callback])
    trainer.train()
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    gathered = [torch.zeros_like(flat) for _ in range(args.world_size)]
    torch.distributed.all_gather(gathered, flat)
    if args.process_index == 0:
        json.dump(dict(world_size=args.world_size, max_difference=float((gathered[0] - gathered[1]).abs().max()),
                       log_history=trainer.state.log_history, installed=callback.installed),
                  open(sys.argv[1] + "/ddp.json", "w"))
    # Leave the process group before exit: a gloo thread still running at interpreter shutdown aborts the process
    # ("terminate called without an active exception") now and then.
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
""")


def test_callback_under_ddp_with_two_cpu_processes(tmp_path):
    """torchrun, 2 processes over gloo, with gradient accumulation and checkpointing, and find_unused_parameters=False
    (the classifier's frozen absolute-position table must not count as unused)."""
    script = tmp_path / "ddp_sift.py"
    script.write_text(DDP_SCRIPT.format(tests=str(Path(__file__).parent)))
    environment = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
               str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=environment, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "ddp.json").read_text())
    assert report["world_size"] == 2
    assert report["max_difference"] == 0.0  # the replicas stayed in sync
    assert not report["installed"]
    logged = [entry["sift_loss"] for entry in report["log_history"] if "sift_loss" in entry]
    assert len(logged) == 2 and all(value > 0 for value in logged)
