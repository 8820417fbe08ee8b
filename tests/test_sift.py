"""SiFT (modeling_deberta_custom.training.sift): the maths as plain functions, and the Trainer callback.

The Trainer tests train a tiny model on a task it learns in a few steps (the label is the first token after
[CLS]); the DDP test runs the same training in two CPU processes under torchrun."""

import json
import math
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    CHILD_SCRIPTS,
    DROPOUT,
    FirstTokenTask,
    child_environment,
    perturb_parameters,
    random_batch,
    tiny_config,
)
from transformers import Trainer, TrainingArguments

import modeling_deberta_custom.training.sift as sift_module
from modeling_deberta_custom import (
    DebertaCustomForMaskedLM,
    DebertaCustomForMultipleChoice,
    DebertaCustomForQuestionAnswering,
    DebertaCustomForSequenceClassification,
    DebertaCustomForTokenClassification,
)
from modeling_deberta_custom.training.loss_terms import align_logits, place_before_integrations
from modeling_deberta_custom.training.sift import (
    SiFTCallback,
    SiFTPerturbation,
    ascent_step,
    find_perturbed_module,
    initial_perturbation,
    sift_loss,
    symmetric_kl,
)

NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, cls_dropout=0.0)


def classifier(**overrides):
    # Padded: the reference below draws its perturbations for [B, N, C] embeddings (tests/test_unpadding.py checks
    # SiFT on unpadded batches against this padded path).
    config = tiny_config(num_labels=3, unpad_inputs=False, **{**DROPOUT, **overrides})
    return DebertaCustomForSequenceClassification(config).train()


def batch_for(vocab_size=99, batch=4, length=10, num_labels=3, seed=0):
    input_ids, attention_mask = random_batch(vocab_size, batch=batch, length=length, seed=seed)
    labels = torch.arange(batch) % num_labels
    return dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels)


# ----------------------------------------------------------------------------------------------------------------------
# A reference implementation of the published algorithm (DESIGN.md §2 "SiFT", DeBERTa/sift/sift.py as used by
# DeBERTa/apps/run.py), written plainly and independently of modeling_deberta_custom.training.sift.
# ----------------------------------------------------------------------------------------------------------------------


class ReferencePerturbationLayer:
    """Pre-hook on embeddings.LayerNorm. Clean mode: x -> (x - mean) / sqrt(var + 1e-7), kept. Adversarial mode:
    the kept normalized input, detached, plus delta."""

    def __init__(self, raw=False):
        self.adversarial, self.kept, self.delta, self.raw = False, None, None, raw

    def __call__(self, module, args):
        x = args[0]
        if not self.adversarial:
            mean = x.mean(-1, keepdim=True)
            variance = ((x - mean) ** 2).mean(-1, keepdim=True)
            self.kept = x if self.raw else (x - mean) / torch.sqrt(variance + 1e-7)
            return (self.kept,)
        return ((self.kept.detach().to(self.delta.dtype) + self.delta).to(x.dtype),)


def reference_symmetric_kl(perturbed, clean):
    """sum(p_clean.detach() * -log p_pert) + sum(p_pert.detach() * -log p_clean) per row."""
    perturbed = perturbed.reshape(-1, perturbed.shape[-1]).double()
    clean = clean.reshape(-1, clean.shape[-1]).double()
    p_pert, p_clean = torch.softmax(perturbed, -1), torch.softmax(clean, -1)
    log_p_pert, log_p_clean = torch.log(p_pert), torch.log(p_clean)
    return -(p_clean.detach() * log_p_pert).sum(-1) - (p_pert.detach() * log_p_clean).sum(-1)


def reference_kl(perturbed, clean):
    perturbed = perturbed.reshape(-1, perturbed.shape[-1]).double()
    return -(torch.softmax(clean.reshape(perturbed.shape).double(), -1).detach() * torch.log_softmax(perturbed, -1)).sum(-1)


def reference_adversarial_term(model, batch, layer, clean_logits, delta0, step_size=1e-4, loss_fn=reference_symmetric_kl,
                               rows=None):
    """The term for one batch; `layer` was in clean mode during the clean pass that gave `clean_logits`. `rows`
    (bool, one per row of the logits) restricts the ascent's sum and the final mean (default: every row, the
    authors')."""
    rows = torch.ones(clean_logits[..., 0].numel(), dtype=torch.bool) if rows is None else rows.flatten()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    parameters = list(model.parameters())
    flags = [p.requires_grad for p in parameters]
    for p in parameters:
        p.requires_grad_(False)
    layer.adversarial = True
    layer.delta = delta0.clone().requires_grad_(True)
    perturbed = model(**inputs).logits
    loss_fn(perturbed, clean_logits.detach())[rows].sum().backward()
    g = layer.delta.grad
    if torch.isfinite(g.norm()):
        largest = g.abs().max(dim=-1, keepdim=True).values
        layer.delta = (layer.delta.detach() + step_size * g / (1e-6 + largest)).requires_grad_(True)
    for p, flag in zip(parameters, flags, strict=True):
        p.requires_grad_(flag)
    perturbed = model(**inputs).logits
    term = reference_symmetric_kl(perturbed, clean_logits)[rows].mean()
    layer.adversarial, layer.delta = False, None
    return term


def ours(model, batch, delta0, sift=sift_module, **settings):
    """Our term through the module `sift` (modeling_deberta_custom.training.sift, or a mutated copy of it)."""
    perturbation = sift.SiFTPerturbation.install(model)
    try:
        outputs = model(**batch)
        return sift.sift_loss(model, batch, outputs, perturbation, delta=delta0, **settings)
    finally:
        perturbation.remove()


def reference(model, batch, delta0, raw=False, **settings):
    layer = ReferencePerturbationLayer(raw=raw)
    handle = model.deberta.embeddings.LayerNorm.register_forward_pre_hook(layer)
    try:
        outputs = model(**batch)
        return reference_adversarial_term(model, batch, layer, outputs.logits, delta0, **settings)
    finally:
        handle.remove()


def value_and_gradients(term, model):
    parameters = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(term, parameters, allow_unused=True)
    return term.detach(), [torch.zeros_like(p) if g is None else g for p, g in zip(parameters, grads, strict=True)]


def parity_model(dropout=False, dtype=torch.float64):
    torch.manual_seed(0)
    model = classifier(**({} if dropout else NO_DROPOUT))
    perturb_parameters(model, scale=0.05)
    return model.to(dtype)


def initial_delta(batch, hidden_size=32, dtype=torch.float64, seed=5):
    shape = (*batch["input_ids"].shape, hidden_size)
    return initial_perturbation(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def assert_relative(ours_grads, reference_grads, rtol):
    """Each parameter's gradient to `rtol` of its norm (gradients that are zero but for rounding, like the
    classifier bias's, to 1e-9 of the whole gradient's norm)."""
    total = torch.cat([g.flatten() for g in reference_grads]).norm()
    for mine, theirs in zip(ours_grads, reference_grads, strict=True):
        assert (mine - theirs).norm() <= rtol * theirs.norm() + 1e-9 * total, ((mine - theirs).norm(), theirs.norm())


def check_dropout_off(sift=sift_module, step_size=1e-4, loss_fn="symmetric-kl"):
    """Same model, batch and initial delta, dropout off: value and gradient wrt every parameter to 1e-5 relative."""
    model, batch = parity_model(), batch_for()
    delta0 = initial_delta(batch, model.config.hidden_size)
    reference_loss = {"symmetric-kl": reference_symmetric_kl, "kl": reference_kl}[loss_fn]
    value, grads = value_and_gradients(ours(model, batch, delta0, sift, step_size=step_size, loss_fn=loss_fn), model)
    expected, expected_grads = value_and_gradients(
        reference(model, batch, delta0, step_size=step_size, loss_fn=reference_loss), model)
    torch.testing.assert_close(value, expected, rtol=1e-5, atol=0)
    assert_relative(grads, expected_grads, rtol=1e-5)
    # The term reaches the embedding table only through the clean side (the perturbed input is detached).
    word = model.deberta.embeddings.word_embeddings.weight
    assert grads[[p for p in model.parameters() if p.requires_grad].index(word)].norm() > 0


def check_dropout_on_seeded_alike(sift=sift_module):
    """Fresh dropout masks in each pass: with the same seed both draw the same masks in the same order."""
    model, batch = parity_model(dropout=True), batch_for()
    delta0 = initial_delta(batch, model.config.hidden_size)
    torch.manual_seed(11)
    value, grads = value_and_gradients(ours(model, batch, delta0, sift), model)
    torch.manual_seed(11)
    expected, expected_grads = value_and_gradients(reference(model, batch, delta0), model)
    torch.testing.assert_close(value, expected, rtol=1e-5, atol=0)
    assert_relative(grads, expected_grads, rtol=1e-5)


# The reference-equality checks. The large step makes the ascent's share of the term large, so that a skipped or
# reversed ascent shows clearly.
REFERENCE_CHECKS = {
    "default": check_dropout_off,
    "large-step": lambda sift=sift_module: check_dropout_off(sift, step_size=0.2),
    "kl-ascent": lambda sift=sift_module: check_dropout_off(sift, step_size=0.2, loss_fn="kl"),
    "dropout-seeded": check_dropout_on_seeded_alike,
}


@pytest.mark.parametrize("check", list(REFERENCE_CHECKS))
def test_term_and_every_gradient_equal_the_reference(check):
    REFERENCE_CHECKS[check]()


# Wrong lines of training/sift.py (text as it is there -> text of the mutant). Each must fail a reference check.
MUTATIONS = {
    "skip the ascent": ("perturbation.delta = ascent_step(delta, delta.grad, step_size).requires_grad_()",
                        "perturbation.delta = delta.detach().requires_grad_()"),
    "reverse the ascent": ("perturbation.delta = ascent_step(delta, delta.grad, step_size).requires_grad_()",
                           "perturbation.delta = ascent_step(delta, -delta.grad, step_size).requires_grad_()"),
    "perturb the raw embeddings": ("return ((normalized.detach().to(self.delta.dtype) + self.delta).to(x.dtype),)",
                                   "return ((x.detach().to(self.delta.dtype) + self.delta).to(x.dtype),)"),
    "perturbed input not detached": ("return ((normalized.detach().to(self.delta.dtype) + self.delta)",
                                     "return ((normalized.to(self.delta.dtype) + self.delta)"),
    "clean pass not normalized": ("            return (normalized,) + tuple(args[1:])",
                                  "            return (x,) + tuple(args[1:])"),
    "detach the final term's clean side": ("values = [symmetric_kl(p, c).view(", "values = [symmetric_kl(p, c.detach()).view("),
    "normalize with eps 1e-5": ("def __init__(self, eps: float = 1e-7,", "def __init__(self, eps: float = 1e-5,"),
    "sum over rows instead of the mean": ("    return term.loss(inputs.get(\"num_items_in_batch\"))",
                                          "    return term.total"),
}


def sift_copy(old: str = "", new: str = ""):
    """A fresh module from the text of training/sift.py with `old` replaced by `new` (it must occur once)."""
    path = Path(sift_module.__file__)
    text = path.read_text()
    if old:
        assert text.count(old) == 1, f"the mutation's line is not (once) in {path.name}: {old!r}"
        text = text.replace(old, new)
    module = types.ModuleType("modeling_deberta_custom.training.sift_mutant")
    module.__package__ = "modeling_deberta_custom.training"
    exec(compile(text, str(path), "exec"), module.__dict__)
    return module


def failing_checks(sift) -> list[str]:
    failed = []
    for name, check in REFERENCE_CHECKS.items():
        try:
            check(sift)
        except AssertionError:
            failed.append(name)
    return failed


def test_an_unmutated_copy_passes_every_reference_check():
    assert failing_checks(sift_copy()) == []


@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_every_mutation_of_the_algorithm_fails_a_reference_check(mutation):
    """The mutation check (formerly scripts/check_sift_mutations.py): each wrong line makes the reference-equality
    test fail; the checks each mutation fails are in the README's SiFT section."""
    assert failing_checks(sift_copy(*MUTATIONS[mutation])), f"no reference check sees the mutation {mutation!r}"


def test_the_ascent_changes_the_term():
    """A check that the parity tests can see the ascent: without it, or reversed, the term is not the reference's."""
    model, batch = parity_model(), batch_for()
    delta0 = initial_delta(batch, model.config.hidden_size)
    expected = reference(model, batch, delta0, step_size=0.2).item()
    skipped = ours(model, batch, delta0, step_size=0.2, ascent_steps=0).item()
    reversed_ = ours(model, batch, delta0, step_size=-0.2).item()
    raw = reference(model, batch, delta0, raw=True, step_size=0.2).item()  # raw embeddings: delta is huge for them
    for value in (skipped, reversed_, raw):
        assert abs(value - expected) > 1e-4 * expected


def test_gradient_with_dropout_on_matches_the_reference_statistically():
    """Independent draws (different seeds for us and the reference): the gradients have the same size and mean.
    At dropout 0.1 a draw's gradient is mostly dropout noise between the passes (the mean is about as large as
    the noise of a mean over 8 draws), as in the original."""
    model, batch = parity_model(dropout=True, dtype=torch.float32), batch_for(batch=8)
    delta0 = initial_delta(batch, model.config.hidden_size, dtype=torch.float32)

    def draws(function, seeds):
        vectors = []
        for seed in seeds:
            torch.manual_seed(seed)
            vectors.append(torch.cat([g.flatten() for g in value_and_gradients(function(model, batch, delta0), model)[1]]))
        return torch.stack(vectors)

    mine, theirs = draws(ours, range(8)), draws(reference, range(100, 108))
    # Each draw's gradient has the reference's size (a term with replayed dropout masks has ~1e-3 of it).
    assert 0.75 < mine.norm(dim=1).mean() / theirs.norm(dim=1).mean() < 1.33
    # Two-sample test of the means: |m_ours - m_ref|^2 against its expectation under equal distributions,
    # (trace of both covariances) / n; about 1 when they agree (measured 0.7 and 1.05 on two pairs of seed sets).
    n = len(mine)
    spread = (((mine - mine.mean(0)) ** 2).sum() + ((theirs - theirs.mean(0)) ** 2).sum()) / (n - 1)
    assert ((mine.mean(0) - theirs.mean(0)) ** 2).sum() / (spread / n) < 2.5


def test_saved_model_without_the_hook_predicts_as_with_it():
    """SiFT's clean pass normalizes the LayerNorm input (eps 1e-7) first; without the hook the LayerNorm's own eps
    applies again. LayerNorm is invariant to shift and scale, so the two agree up to eps / var(x)."""
    torch.manual_seed(0)
    model = classifier().eval()
    batch = batch_for()
    plain = model(**batch).logits
    perturbation = SiFTPerturbation.install(model)
    hooked = model(**batch).logits
    perturbation.remove()
    torch.testing.assert_close(hooked, plain, rtol=1e-3, atol=1e-5)
    assert not torch.equal(hooked, plain)


# ----------------------------------------------------------------------------------------------------------------------
# The pieces
# ----------------------------------------------------------------------------------------------------------------------


def test_symmetric_kl_is_the_sum_of_two_cross_entropies_in_fp32():
    p, q = torch.randn(5, 4, requires_grad=True), torch.randn(5, 4, requires_grad=True)
    value = symmetric_kl(p, q)
    expected = reference_symmetric_kl(p, q).float()
    torch.testing.assert_close(value, expected)
    # Not ~0 when both agree: the two entropies.
    entropy = -(F.softmax(p, -1) * F.log_softmax(p, -1)).sum(-1)
    torch.testing.assert_close(symmetric_kl(p, p), 2 * entropy)
    assert symmetric_kl(p.bfloat16(), q.bfloat16()).dtype == torch.float32
    # Its gradient: (softmax(p) - softmax(q)) to p, the opposite to q (probabilities detached).
    grad_p, grad_q = torch.autograd.grad(value.sum(), (p, q))
    torch.testing.assert_close(grad_p, F.softmax(p, -1) - F.softmax(q, -1))
    torch.testing.assert_close(grad_q, F.softmax(q, -1) - F.softmax(p, -1))
    # Rows of one logit give an identically zero term (our regression_mode="zero"); the authors' code reads a
    # one-logit head's [B] logits as one row of B classes instead (test_one_logit_heads_...).
    assert torch.equal(symmetric_kl(torch.randn(3, 1), torch.randn(3, 1)), torch.zeros(3))


def test_initial_perturbation_is_clamped_normal():
    generator = torch.Generator().manual_seed(0)
    delta = initial_perturbation((200, 64), std=1e-2, generator=generator)
    assert delta.dtype == torch.float32
    assert delta.abs().max().item() <= 2e-2
    assert 0.008 < delta.std().item() < 0.011
    assert torch.equal(initial_perturbation((3, 4), std=0.0), torch.zeros(3, 4))


def test_ascent_step_formula():
    delta = torch.zeros(2, 3)
    grad = torch.tensor([[1.0, -4.0, 2.0], [0.0, 0.5, -0.25]])
    stepped = ascent_step(delta, grad, step_size=1e-4)
    expected = torch.tensor([[1 / 4, -1.0, 1 / 2], [0.0, 1.0, -0.5]]) * 1e-4 / (1 + 1e-6 / torch.tensor([[4.0], [0.5]]))
    torch.testing.assert_close(stepped, expected)  # normalized per row by max|g|
    assert not stepped.requires_grad
    grad[1, 0] = float("nan")
    assert torch.equal(ascent_step(delta + 1, grad), delta + 1)  # a non-finite gradient: the step is skipped


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


def test_ascent_reaches_no_parameter_but_the_term_does():
    model, batch = classifier(), batch_for()
    requires_grad = [p.requires_grad for p in model.parameters()]
    perturbation = SiFTPerturbation.install(model)
    outputs = model(**batch)
    loss = sift_loss(model, batch, outputs, perturbation)
    perturbation.remove()
    assert all(p.grad is None for p in model.parameters()), "the ascent left gradients on parameters"
    assert [p.requires_grad for p in model.parameters()] == requires_grad
    assert perturbation.delta is None and not perturbation.adversarial
    assert loss.requires_grad and loss.item() > 0
    loss.backward()
    reached = {name for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    for name in ("classifier.weight", "pooler.dense.weight", "deberta.embeddings.word_embeddings.weight",
                 "deberta.embeddings.LayerNorm.weight", "deberta.encoder.layer.0.attention.self.query_proj.weight"):
        assert name in reached


@pytest.mark.parametrize("head", ["token", "qa", "choice", "regression", "regression-zero"])
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
    perturbation = SiFTPerturbation.install(model)
    outputs = model(**batch)
    loss = sift_loss(model, batch, outputs, perturbation,
                     regression_mode="zero" if head == "regression-zero" else "authors")
    perturbation.remove()
    assert torch.isfinite(loss)
    if head == "regression-zero":  # ours: no term for one logit
        assert loss.item() == 0.0 and not loss.requires_grad
    else:
        assert loss.item() > 0
        loss.backward(retain_graph=True)  # the term alone reaches the head's weights
        head_weight = model.qa_outputs.weight if head == "qa" else model.classifier.weight
        assert head_weight.grad.abs().sum() > 0
    (outputs.loss + loss).backward()


def test_one_logit_heads_in_the_authors_mode_compare_softmaxes_across_the_batch():
    """The authors' regression head flattens its logits to [B] and their symmetric KL reads them as one row of B
    classes: 2 ln B when all logits are equal (both entropies of the uniform distribution), whatever delta does."""
    torch.manual_seed(0)
    model = DebertaCustomForSequenceClassification(tiny_config(num_labels=1, **DROPOUT)).train()
    with torch.no_grad():  # every row predicts 0.7: equal logits in every pass
        model.classifier.weight.zero_()
        model.classifier.bias.fill_(0.7)
    batch = batch_for(batch=5, num_labels=1) | dict(labels=torch.rand(5))
    perturbation = SiFTPerturbation.install(model)
    outputs = model(**batch)
    authors = sift_loss(model, batch, outputs, perturbation)  # the default
    ours_ = sift_loss(model, batch, outputs, perturbation, regression_mode="zero")
    perturbation.remove()
    assert authors.item() == pytest.approx(2 * math.log(5), rel=1e-6)
    assert ours_.item() == 0.0
    values = torch.full((5, 1), 0.7)
    assert symmetric_kl(values.reshape(1, -1), values.reshape(1, -1)).item() == pytest.approx(2 * math.log(5))
    with pytest.raises(ValueError, match="regression_mode"):
        SiFTCallback(regression_mode="batch")


def masked_lm_pair(fraction=0.5):
    """A masked-LM head with sparse logits in training ([K, V] at the labelled positions first), the same weights with
    dense logits, and a batch with 3 and 2 labelled positions (K = 20 * fraction rows, 5 of them labelled)."""
    torch.manual_seed(0)
    # Padded models: the reference perturbation layer draws its delta per padded position ([B, N, C]).
    sparse = DebertaCustomForMaskedLM(tiny_config(sparse_mlm_max_fraction=fraction, unpad_inputs=False)).train()
    dense = DebertaCustomForMaskedLM(tiny_config(sparse_mlm_logits=False, unpad_inputs=False)).train()
    dense.load_state_dict(sparse.state_dict())
    input_ids, attention_mask = random_batch(sparse.config.vocab_size, batch=2, length=10)
    labels = torch.full_like(input_ids, -100)
    for row, column in [(0, 2), (0, 5), (0, 8), (1, 1), (1, 3)]:
        labels[row, column] = input_ids[row, column]
    return sparse, dense, dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels)


@pytest.mark.parametrize("fraction", [0.5, 1.0])
def test_sparse_masked_lm_logits_are_paired_position_by_position(fraction):
    """Sparse logits [K, V] in the clean pass: the perturbed passes get the same labels and select the same positions.
    Without the ascent the term is, by hand, the mean over the labelled positions of symmetric_kl(perturbed, clean)
    on dense logits; with it, the dense model gives the same term. (At fraction 1, K = B * N: dense perturbed logits
    would have the clean ones' shape but in another order.)"""
    sparse, dense, batch = masked_lm_pair(fraction)
    labelled = int((batch["labels"] != -100).sum())
    assert sparse(**batch).logits.shape == (labelled, sparse.config.vocab_size)  # eager: the labelled rows only
    delta0 = initial_delta(batch, sparse.config.hidden_size, dtype=torch.float32)
    # By hand on dense logits, the reference perturbation layer, no ascent.
    layer = ReferencePerturbationLayer()
    handle = dense.deberta.embeddings.LayerNorm.register_forward_pre_hook(layer)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    clean = dense(**inputs).logits  # [B, N, V]
    layer.adversarial, layer.delta = True, delta0
    perturbed = dense(**inputs).logits
    handle.remove()
    expected = reference_symmetric_kl(perturbed, clean)[batch["labels"].flatten() != -100].mean()
    torch.testing.assert_close(ours(sparse, batch, delta0, ascent_steps=0).double(), expected, rtol=1e-5, atol=0)
    # With the ascent (a large step, so that it matters): sparse logits, whose only rows are the labelled positions
    # (as the authors' head's), give the dense head's term over its items.
    term = ours(sparse, batch, delta0, step_size=0.2)
    torch.testing.assert_close(term, ours(dense, batch, delta0, step_size=0.2, average_over="items"), rtol=1e-5, atol=0)
    torch.testing.assert_close(term, ours(sparse, batch, delta0, step_size=0.2, average_over="items"), rtol=0, atol=0)


def padded_token_batch(vocab_size=99):
    """Token classification as NER labels it: rows of 10, 4 and 7 real tokens (right padding) with 3, 1 and 2 of them
    labelled."""
    input_ids, attention_mask = random_batch(vocab_size, batch=3, length=10, pad_row=None)
    attention_mask = (torch.arange(10) < torch.tensor([[10], [4], [7]])).long()
    labels = torch.full_like(input_ids, -100)
    for row, column in [(0, 1), (0, 4), (0, 9), (1, 2), (2, 1), (2, 5)]:
        labels[row, column] = input_ids[row, column] % 3
    return dict(input_ids=input_ids * attention_mask, attention_mask=attention_mask, labels=labels)


@pytest.mark.parametrize("average_over", ["positions", "items"])
def test_token_classification_averages_as_chosen(average_over):
    """Padded rows, partial labels, dropout off, a large ascent step: the default ("positions") is the authors' term,
    the ascent summed and the term averaged over every position, padding included (the reference above, unchanged);
    "items" restricts both to the labelled tokens. Value and every gradient to 1e-5 relative."""
    torch.manual_seed(0)
    model = DebertaCustomForTokenClassification(tiny_config(num_labels=3, unpad_inputs=False, **NO_DROPOUT))
    perturb_parameters(model, scale=0.05)
    model = model.double().train()
    batch = padded_token_batch(model.config.vocab_size)
    delta0 = initial_delta(batch, model.config.hidden_size)
    settings = {} if average_over == "positions" else dict(average_over="items")
    value, grads = value_and_gradients(ours(model, batch, delta0, step_size=0.2, **settings), model)
    rows = None if average_over == "positions" else batch["labels"] != -100
    expected, expected_grads = value_and_gradients(reference(model, batch, delta0, step_size=0.2, rows=rows), model)
    torch.testing.assert_close(value, expected, rtol=1e-5, atol=0)
    assert_relative(grads, expected_grads, rtol=1e-5)
    other = dict(average_over="items") if average_over == "positions" else {}
    assert not torch.allclose(ours(model, batch, delta0, step_size=0.2, **other), value, rtol=1e-3)


def test_positions_mean_weighs_micro_batches_by_their_share_of_labels():
    """The authors' average under accumulation: with the Trainer's num_items_in_batch, a micro-batch's mean over its
    positions weighs by its share of the step's labelled tokens (here 2 of 6)."""
    torch.manual_seed(0)
    model = DebertaCustomForTokenClassification(tiny_config(num_labels=3, unpad_inputs=False, **NO_DROPOUT)).double()
    batch = padded_token_batch(model.config.vocab_size)
    part = {k: v[2:] for k, v in batch.items()}  # the third row: 2 labelled tokens
    delta0 = initial_delta(part, model.config.hidden_size)
    alone = ours(model, part, delta0)
    weighted = ours(model, part | dict(num_items_in_batch=torch.tensor(6)), delta0)
    torch.testing.assert_close(weighted, alone * 2 / 6, rtol=1e-12, atol=0)


def test_average_over_is_checked():
    with pytest.raises(ValueError, match="average_over must be one of"):
        SiFTCallback(average_over="tokens")


def test_sparse_logits_that_cannot_be_paired_are_refused():
    """Perturbed passes whose sparse rows are other positions than the clean pass's (here: more rows, as a compiled
    pass with another prediction budget returns) raise, naming the cause."""
    sparse, _, batch = masked_lm_pair()
    clean = sparse(**batch).logits  # [M, V] at the M labelled positions
    other = torch.randn(clean.shape[0] + 3, clean.shape[1])
    with pytest.raises(ValueError, match="Sparse masked-LM logits .* select the same positions"):
        align_logits(other, clean, batch["labels"])


def test_adv_weight_defaults_to_the_authors_recipes():
    assert SiFTCallback().adv_weight == 5.0  # their recipes: 5 (3 for v3-xsmall); their command-line default 0 is off


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_gradient_checkpointing_gives_the_same_gradients(use_reentrant):
    batch = batch_for()
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = classifier()
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": use_reentrant})
        perturbation = SiFTPerturbation.install(model)
        torch.manual_seed(1)
        outputs = model(**batch)
        (outputs.loss + sift_loss(model, batch, outputs, perturbation)).backward()
        perturbation.remove()
        grads.append([p.grad.clone() if p.grad is not None else None for p in model.parameters()])
    for plain, checkpointed in zip(*grads, strict=True):
        if plain is None:
            assert checkpointed is None
        else:
            torch.testing.assert_close(plain, checkpointed)


# ----------------------------------------------------------------------------------------------------------------------
# The callback
# ----------------------------------------------------------------------------------------------------------------------


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
    return SiFTCallback(adv_weight=5.0)


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
        # Evaluation and no-gradient passes get no SiFT term; installed, the hook normalizes the LayerNorm's input
        # first (as the original), which changes the loss only by rounding.
        torch.testing.assert_close(loss(False, True, hooked=True), loss(False, True, hooked=False))
        torch.testing.assert_close(loss(True, False, hooked=True), loss(True, False, hooked=False))
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


def test_sift_loss_reaches_the_report_to_integrations(tmp_path):
    """TensorBoard (a report_to integration, called before the callbacks given to the Trainer) writes sift_loss:
    place_before_integrations moves the callback ahead of the integrations. Read back from the event file."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from transformers.integrations import TensorBoardCallback
    from transformers.trainer_callback import DefaultFlowCallback

    callback = sift_callback()
    torch.manual_seed(0)
    model = DebertaCustomForSequenceClassification(tiny_config(num_labels=2, vocab_size=30, **DROPOUT))
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=16, num_train_epochs=3,
                             logging_steps=5, report_to="tensorboard", save_strategy="no", use_cpu=True,
                             disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=FirstTokenTask(), callbacks=[callback])
    place_before_integrations(trainer)
    trainer.train()  # (an evaluate() after it would start a second event file)
    order = [type(c) for c in trainer.callback_handler.callbacks]
    assert order.index(DefaultFlowCallback) < order.index(SiFTCallback) < order.index(TensorBoardCallback)
    events = [EventAccumulator(str(path.parent)).Reload() for path in tmp_path.glob("runs/**/events.out.tfevents.*")]
    scalars = {tag: [e.value for e in run.Scalars(tag)] for run in events for tag in run.Tags()["scalars"]}
    logged = [entry["sift_loss"] for entry in trainer.state.log_history if "sift_loss" in entry]
    assert len(logged) == 2 and all(value > 0 for value in logged)
    assert scalars["train/sift_loss"] == pytest.approx(logged, rel=1e-6)
    assert scalars["train/train_sift_loss"] == pytest.approx([trainer.state.log_history[-1]["train_sift_loss"]])


def test_callback_refuses_label_smoothing(tmp_path):
    with pytest.raises(ValueError, match="label_smoothing_factor"):
        train(tmp_path, sift_callback(), label_smoothing_factor=0.1, num_train_epochs=1)


def test_callback_under_ddp_with_two_cpu_processes(tmp_path):
    """torchrun, 2 processes over gloo, with gradient accumulation and checkpointing, and find_unused_parameters=False
    (the classifier's frozen absolute-position table must not count as unused)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(CHILD_SCRIPTS / "ddp_sift.py"), str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                            env=child_environment(OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "ddp.json").read_text())
    assert report["world_size"] == 2
    assert report["max_difference"] == 0.0  # the replicas stayed in sync
    assert not report["installed"]
    logged = [entry["sift_loss"] for entry in report["log_history"] if "sift_loss" in entry]
    assert len(logged) == 2 and all(value > 0 for value in logged)
