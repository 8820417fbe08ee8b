"""Unpadded batches (config.unpad_inputs): the token-wise layers run on the real tokens only, attention on a grid of the
sequences. Outputs and gradients equal the padded path's at every real token (fp32, 1e-5), for every head, the v1
and v2/v3 layouts, the convolution layer, EMD and RTD, left and right padding, a batch of one and a fully padded row;
padding positions of the outputs hold zeros; one layout (one host read) per forward."""

import pytest
import torch
from helpers import perturb_parameters, tiny_config

import modeling_deberta_custom.modeling_deberta_custom as modeling
import modeling_deberta_custom.padding as padding
from modeling_deberta_custom import (
    DebertaCustomForMaskedLM,
    DebertaCustomForMultipleChoice,
    DebertaCustomForQuestionAnswering,
    DebertaCustomForReplacedTokenDetection,
    DebertaCustomForRTDPreTraining,
    DebertaCustomForSequenceClassification,
    DebertaCustomForTokenClassification,
    DebertaCustomModel,
)
from modeling_deberta_custom.padding import attention_groups, layout_from_attention_mask

TOLERANCE = dict(rtol=1e-5, atol=1e-5)
LENGTH = 12  # > position_buckets / 2 = 4: the bucketed relative positions
V1 = dict(attention_variant="v1", position_buckets=-1, share_att_key=False, norm_rel_ebd="none",
          max_relative_positions=6, pos_att_type="c2p|p2c", position_biased_input=True)


def mask_of(lengths, left=False, length=LENGTH):
    """[B, N] attention mask with the given real lengths, padded on the right (or the left)."""
    mask = torch.zeros(len(lengths), length, dtype=torch.long)
    for row, real in enumerate(lengths):
        if left:
            mask[row, length - real:] = 1
        else:
            mask[row, :real] = 1
    return mask


MASKS = {
    "right": mask_of([12, 5, 9]),
    "left": mask_of([12, 5, 9], left=True),
    "batch_of_one": mask_of([7]),
    "holes": torch.tensor([[1] * 12, [1, 1, 0, 1, 1, 1, 0, 0, 1, 1, 0, 0], [0, 0, 1, 1, 0, 1, 1, 1, 1, 0, 0, 0]]),
}


def inputs_for(model, mask, seed=0, train=False, choices=2):
    """Ids (0 at padding), the mask and, in training, labels that ignore padding."""
    generator = torch.Generator().manual_seed(seed)
    batch = mask.shape[0]
    input_ids = torch.randint(5, model.config.vocab_size, mask.shape, generator=generator).masked_fill(mask == 0, 0)
    inputs = dict(input_ids=input_ids, attention_mask=mask)
    if model.config.type_vocab_size > 0:
        inputs["token_type_ids"] = (torch.arange(mask.shape[1]) >= mask.shape[1] // 2).long().expand_as(mask) * mask
    if isinstance(model, DebertaCustomForMultipleChoice):
        inputs = {k: torch.stack([v] + [v.roll(i, 0) for i in range(1, choices)], dim=1) for k, v in inputs.items()}
    if not train:
        return inputs
    real = mask.bool()
    if isinstance(model, (DebertaCustomForSequenceClassification, DebertaCustomForMultipleChoice)):
        inputs["labels"] = torch.randint(0, 2, (batch,), generator=generator)
    elif isinstance(model, DebertaCustomForQuestionAnswering):
        inputs["start_positions"] = torch.randint(0, LENGTH, (batch,), generator=generator)
        inputs["end_positions"] = torch.randint(0, LENGTH, (batch,), generator=generator)
    elif isinstance(model, DebertaCustomForTokenClassification):
        inputs["labels"] = torch.randint(0, 2, mask.shape, generator=generator).masked_fill(~real, -100)
    elif isinstance(model, DebertaCustomForReplacedTokenDetection):
        inputs["labels"] = torch.randint(0, 2, mask.shape, generator=generator)
    else:  # masked-LM and RTD pretraining: about a fifth of the real tokens masked
        chosen = (torch.rand(mask.shape, generator=generator) < 0.2) & real
        chosen[0, 1] = True
        inputs["labels"] = torch.where(chosen, input_ids, -100)
    return inputs


def make(head, seed=0, **overrides):
    torch.manual_seed(seed)
    model = head(tiny_config(**overrides))
    perturb_parameters(model, seed=seed)
    return model


def run(model, inputs, unpad, train, attn="sdpa"):
    """Outputs (and parameter gradients in training) of one forward with unpad_inputs on or off."""
    model.config.unpad_inputs = unpad
    model.config._attn_implementation = attn
    model.train(train)
    model.zero_grad()
    torch.manual_seed(0)  # RTD samples its replacements
    if not train:
        with torch.no_grad():
            return model(**inputs), {}
    output = model(**inputs)
    output.loss.backward()
    return output, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def token_mask_of(inputs):
    mask = inputs["attention_mask"].bool()
    return mask.flatten(0, 1) if mask.dim() == 3 else mask  # multiple choice: [B * K, N]


def assert_same_at_real_tokens(padded, unpadded, mask, name):
    """Tensors [B, N, ...] are compared at real tokens (and must hold zeros at padding where unpadded); others whole."""
    if padded.dim() >= 2 and padded.shape[:2] == mask.shape:
        torch.testing.assert_close(unpadded[mask], padded[mask], **TOLERANCE, msg=name)
        if padded.is_floating_point():
            assert (unpadded[~mask] == 0).all(), f"{name}: padding positions must hold zeros"
    else:
        torch.testing.assert_close(unpadded, padded, **TOLERANCE, msg=name)


def assert_outputs_match(padded, unpadded, inputs):
    mask = token_mask_of(inputs)
    for name, value in padded.items():
        if isinstance(value, tuple):
            for i, (p, u) in enumerate(zip(value, unpadded[name], strict=True)):
                assert_same_at_real_tokens(p, u, mask, f"{name}[{i}]")
        elif isinstance(value, torch.Tensor):
            if name in ("discriminator_input_ids", "rtd_labels", "generator_positions"):
                torch.testing.assert_close(unpadded[name], value, msg=name)
            else:
                assert_same_at_real_tokens(value, unpadded[name], mask, name)


def assert_same_gradients(padded, unpadded):
    assert padded.keys() == unpadded.keys()
    for name, gradient in padded.items():
        torch.testing.assert_close(unpadded[name], gradient, **TOLERANCE, msg=name)


HEADS = [
    (DebertaCustomModel, {}),
    (DebertaCustomForSequenceClassification, dict(num_labels=2)),
    (DebertaCustomForTokenClassification, dict(num_labels=2)),
    (DebertaCustomForQuestionAnswering, dict(num_labels=2)),
    (DebertaCustomForMultipleChoice, {}),
    (DebertaCustomForMaskedLM, {}),  # the Enhanced Mask Decoder
    (DebertaCustomForReplacedTokenDetection, {}),
    (DebertaCustomForRTDPreTraining, {}),
]


@pytest.fixture(params=["one_group", "groups"])
def grouping(request, monkeypatch):
    """On CPU attention runs by groups of rows of similar length; at the tiny sizes here the planner keeps one group
    unless a group costs nothing extra (then every length is a group of its own)."""
    if request.param == "groups":
        for name in ("TRAINING_GROUP_COSTS", "INFERENCE_GROUP_COSTS"):
            monkeypatch.setattr(padding, name, (0, getattr(padding, name)[1]))
    return request.param


def test_attention_groups():
    assert attention_groups([12, 9, 5, 0]) == ((0, 3, 12),)  # one call beats three at these sizes
    assert attention_groups([300, 40, 30, 20]) == ((0, 1, 300), (1, 4, 40))
    assert attention_groups([64, 60, 20, 16], training=False) == ((0, 2, 64), (2, 4, 20))  # calls cost less
    assert attention_groups([64, 60, 20, 16], training=True) == ((0, 4, 64),)
    assert attention_groups([]) == ()


@pytest.mark.parametrize("mask_name", ["right", "left", "batch_of_one"])
@pytest.mark.parametrize("head,overrides", HEADS, ids=[head.__name__ for head, _ in HEADS])
def test_every_head_equals_the_padded_path(head, overrides, mask_name, grouping):
    model = make(head, **overrides)
    mask = MASKS[mask_name]
    for train in (False, True):
        if train and head is DebertaCustomModel:
            continue
        inputs = inputs_for(model, mask, train=train)
        padded, padded_grads = run(model, inputs, unpad=False, train=train)
        unpadded, unpadded_grads = run(model, inputs, unpad=True, train=train)
        assert_outputs_match(padded, unpadded, inputs)
        assert_same_gradients(padded_grads, unpadded_grads)


VARIANTS = {
    "v1": V1,
    "conv": dict(conv_kernel_size=3, conv_act="gelu"),
    "conv_groups_v1_absolute": dict(V1, conv_kernel_size=5, conv_groups=4, conv_act="tanh"),
    "token_types_absolute": dict(type_vocab_size=2, position_biased_input=True),
    "no_buckets": dict(position_buckets=-1, max_relative_positions=6),
    "c2p_only": dict(pos_att_type="c2p", share_att_key=False),
    "no_relative": dict(relative_attention=False, position_biased_input=True, pos_att_type="None"),
    "embedding_size": dict(embedding_size=24, use_enhanced_mask_decoder=False),
}


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_layouts_and_attention_paths(variant, attn, grouping):
    """The masked-LM (EMD where the layout has one) in training, and the base model's hidden states in inference,
    with left and right padding and holes in the mask."""
    model = make(DebertaCustomForMaskedLM, **VARIANTS[variant])
    for mask_name in ("right", "left", "holes"):
        inputs = inputs_for(model, MASKS[mask_name], train=True)
        padded, padded_grads = run(model, inputs, unpad=False, train=True, attn=attn)
        unpadded, unpadded_grads = run(model, inputs, unpad=True, train=True, attn=attn)
        assert_outputs_match(padded, unpadded, inputs)
        assert_same_gradients(padded_grads, unpadded_grads)
        inputs.pop("labels")
        padded, _ = run(model.deberta, inputs, unpad=False, train=False, attn=attn)
        unpadded, _ = run(model.deberta, inputs, unpad=True, train=False, attn=attn)
        padded = {"hidden_states": model.deberta(**inputs, output_hidden_states=True).hidden_states, **padded}
        model.config.unpad_inputs = True
        unpadded = {"hidden_states": model.deberta(**inputs, output_hidden_states=True).hidden_states, **unpadded}
        assert_outputs_match(padded, unpadded, inputs)


def test_conv_layer_stops_at_sequence_boundaries(grouping):
    """Left padding puts a real token next to padding: the convolution must see zeros there, as the padded path does.
    A kernel of 5 over rows of 3 and 12 tokens reaches two places past each end."""
    model = make(DebertaCustomModel, conv_kernel_size=5, conv_act="gelu")
    inputs = inputs_for(model, mask_of([3, 12, 1], left=True))
    padded, _ = run(model, inputs, unpad=False, train=False)
    unpadded, _ = run(model, inputs, unpad=True, train=False)
    assert_outputs_match(padded, unpadded, inputs)


def test_fully_padded_row_holds_zeros_and_leaves_the_others_unchanged(grouping):
    """A row without any real token (documented choice): its hidden states are zeros like every padding position,
    sequence-level heads read zeros for it (the classifier's bias), and the other rows equal the padded path."""
    mask = mask_of([12, 0, 5])
    for head in (DebertaCustomModel, DebertaCustomForSequenceClassification):
        model = make(head, num_labels=3)
        inputs = inputs_for(model, mask)
        padded, _ = run(model, inputs, unpad=False, train=False)
        unpadded, _ = run(model, inputs, unpad=True, train=False)
        if head is DebertaCustomModel:
            assert_outputs_match(padded, unpadded, inputs)
            assert (unpadded.last_hidden_state[1] == 0).all()
        else:
            torch.testing.assert_close(unpadded.logits[[0, 2]], padded.logits[[0, 2]], **TOLERANCE)
            zeros = torch.zeros(1, model.config.hidden_size)
            torch.testing.assert_close(unpadded.logits[1:2], model.classifier(model.pooler(zeros[:, None])))


def test_left_padding_pools_the_first_real_token():
    """Sequence-level heads read each row's first real token ([CLS]) on both paths, so that a left-padded batch gives
    the logits each sequence gets alone."""
    model = make(DebertaCustomForSequenceClassification, num_labels=2).eval()
    inputs = inputs_for(model, mask_of([12, 5, 9], left=True))
    for unpad in (False, True):
        model.config.unpad_inputs = unpad
        with torch.no_grad():
            logits = model(**inputs).logits
            for row in range(3):
                real = inputs["attention_mask"][row].bool()
                alone = model(input_ids=inputs["input_ids"][row, real][None]).logits
                torch.testing.assert_close(logits[row], alone[0], **TOLERANCE)


def test_hidden_states_equal_the_padded_path_under_gradient_checkpointing():
    model = make(DebertaCustomForTokenClassification, num_labels=2)
    model.gradient_checkpointing_enable()
    inputs = inputs_for(model, MASKS["left"], train=True)
    padded, padded_grads = run(model, inputs, unpad=False, train=True)
    unpadded, unpadded_grads = run(model, inputs, unpad=True, train=True)
    assert_outputs_match(padded, unpadded, inputs)
    assert_same_gradients(padded_grads, unpadded_grads)


def test_one_layout_per_forward(monkeypatch):
    """The layout (the one host read) is built once per forward: by the base model, or by a head that needs it
    itself and hands it down (EMD, RTD pretraining: generator and discriminator share one)."""
    calls = []

    def counting(mask, **kwargs):
        calls.append(1)
        return layout_from_attention_mask(mask, **kwargs)

    monkeypatch.setattr(modeling, "layout_from_attention_mask", counting)
    for head, overrides in HEADS:
        model = make(head, **overrides)
        inputs = inputs_for(model, MASKS["right"], train=head is not DebertaCustomModel)
        calls.clear()
        run(model, inputs, unpad=True, train=head is not DebertaCustomModel)
        assert len(calls) == 1, head.__name__


def test_padding_free_batches_take_the_padded_path():
    """No padding (or no mask): nothing to remove, so no layout and no host read."""
    assert layout_from_attention_mask(torch.ones(2, 5, dtype=torch.long)) is None
    layout = layout_from_attention_mask(MASKS["left"])
    assert layout.num_tokens == 26 and layout.grid_shape == (3, 12)


def test_attention_probabilities_come_from_the_padded_path():
    """output_attentions needs [B, H, N, N] probabilities: that forward runs padded (documented)."""
    model = make(DebertaCustomModel)
    inputs = inputs_for(model, MASKS["right"])
    model.config.unpad_inputs = True
    with torch.no_grad():
        output = model(**inputs, output_attentions=True)
    assert output.attentions[0].shape == (3, model.config.num_attention_heads, LENGTH, LENGTH)


@pytest.mark.parametrize("head", [DebertaCustomModel, DebertaCustomForMaskedLM, DebertaCustomForSequenceClassification,
                                  DebertaCustomForTokenClassification, DebertaCustomForQuestionAnswering,
                                  DebertaCustomForMultipleChoice, DebertaCustomForReplacedTokenDetection],
                         ids=lambda head: head.__name__)
def test_output_attentions_set_in_the_config_gives_the_probabilities(head):
    """config.output_attentions=True and no argument (transformers' own model tests do this): every head returns
    the layers' probabilities, as with output_attentions=True (the heads used to build an unpadded layout, which
    has none, and return attentions=None)."""
    model = make(head)
    model.set_attn_implementation("eager")  # transformers refuses config.output_attentions with sdpa
    inputs = inputs_for(model, MASKS["right"])
    with torch.no_grad():
        expected = model(**inputs, output_attentions=True).attentions
        model.config.output_attentions = True
        actual = model(**inputs).attentions
    assert actual is not None and len(actual) == model.config.num_hidden_layers
    for mine, theirs in zip(actual, expected, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0)


def test_sift_on_unpadded_batches_equals_the_padded_path():
    """SiFT perturbs the normalized embeddings: [T, C] when unpadded. With the padded run's perturbation at the real
    tokens, the adversarial term and its gradients are the padded path's (padding positions are masked there)."""
    from modeling_deberta_custom.sift import SiFTPerturbation, sift_loss

    model = make(DebertaCustomForSequenceClassification, num_labels=3).train()
    mask = MASKS["left"]
    inputs = inputs_for(model, mask, train=True)
    delta = torch.randn(*mask.shape, model.config.hidden_size, generator=torch.Generator().manual_seed(2)) * 1e-2
    parameters = [p for p in model.parameters() if p.requires_grad]
    results = []
    for unpad in (False, True):
        model.config.unpad_inputs = unpad
        perturbation = SiFTPerturbation.install(model)
        try:
            term = sift_loss(model, inputs, model(**inputs), perturbation,
                             delta=delta[mask.bool()] if unpad else delta)
        finally:
            perturbation.remove()
        results.append((term, torch.autograd.grad(term, parameters, allow_unused=True)))
    (padded, padded_grads), (unpadded, unpadded_grads) = results
    torch.testing.assert_close(unpadded, padded, **TOLERANCE)
    for expected, actual in zip(padded_grads, unpadded_grads, strict=True):
        if expected is None:
            assert actual is None
        else:
            torch.testing.assert_close(actual, expected, **TOLERANCE)
