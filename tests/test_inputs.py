"""Bad input gets a ValueError / TypeError that names the problem; bad checkpoints name their weight file; legal edge
cases (one token, a fully padded row, sequences longer than the position table) give finite outputs in fp32 and bf16
with both attention implementations."""

import json

import pytest
import torch
import transformers
from helpers import TINY_OFFICIAL_V2, perturb_parameters, random_batch, tiny_config
from safetensors.torch import load_file, save_file

from modeling_deberta_custom import (
    DebertaCustomForMaskedLM,
    DebertaCustomForMultipleChoice,
    DebertaCustomForSequenceClassification,
    DebertaCustomForTokenClassification,
    DebertaCustomModel,
)

VOCAB = TINY_OFFICIAL_V2["vocab_size"]  # 99
HIDDEN = TINY_OFFICIAL_V2["hidden_size"]  # 32
MAX_POSITIONS = TINY_OFFICIAL_V2["max_position_embeddings"]  # 64


@pytest.fixture(scope="module")
def model():
    return DebertaCustomModel(tiny_config()).eval()


@pytest.fixture(scope="module")
def batch():
    return random_batch(VOCAB, batch=3, length=12)


# ----------------------------------------------------------------------------------------------------------------------
# Input ids, masks, embeddings, token types, positions
# ----------------------------------------------------------------------------------------------------------------------


def test_negative_ids_are_rejected(model, batch):
    input_ids, _ = batch
    bad = input_ids.clone()
    bad[0, 3] = -1
    with pytest.raises(ValueError, match=r"input_ids.*outside \[0, 98\].*vocab_size=99"):
        model(bad)


@pytest.mark.parametrize("bad_id", [VOCAB, VOCAB + 1000])
def test_ids_beyond_the_vocabulary_are_rejected(model, batch, bad_id):
    input_ids, _ = batch
    bad = input_ids.clone()
    bad[2, -1] = bad_id
    with pytest.raises(ValueError, match=rf"input_ids holds values in \[\d+, {bad_id}\].*vocab_size=99"):
        model(bad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bool])
def test_non_integer_ids_are_rejected(model, batch, dtype):
    input_ids, _ = batch
    with pytest.raises(TypeError, match=r"input_ids must hold integer ids.*dtype"):
        model(input_ids.to(dtype))


def test_ids_that_are_not_a_tensor_are_rejected(model):
    with pytest.raises(TypeError, match="input_ids must be a torch.Tensor"):
        model([[1, 2, 3]])


def test_ids_of_the_wrong_rank_are_rejected(model, batch):
    input_ids, _ = batch
    with pytest.raises(ValueError, match=r"input_ids must be \[batch, length\]"):
        model(input_ids[0])


def test_empty_sequence_is_rejected(model):
    with pytest.raises(ValueError, match="empty"):
        model(torch.zeros(2, 0, dtype=torch.long))


@pytest.mark.parametrize("shape", [(3, 11), (2, 12), (3, 12, 1), (12,)])
def test_attention_mask_of_another_shape_is_rejected(model, batch, shape):
    input_ids, _ = batch
    with pytest.raises(ValueError, match=r"attention_mask has shape .* but the input ids are \(3, 12\)"):
        model(input_ids, attention_mask=torch.ones(shape, dtype=torch.long))


def test_attention_mask_with_values_other_than_0_and_1_is_rejected(model, batch):
    input_ids, mask = batch
    with pytest.raises(ValueError, match="attention_mask must hold only 0 and 1"):
        model(input_ids, attention_mask=mask.float() * 0.5)


@pytest.mark.parametrize("shape", [(3, 12, HIDDEN - 1), (3, 12, HIDDEN + 16), (3, 12), (1, 3, 12, HIDDEN)])
def test_inputs_embeds_of_the_wrong_width_or_rank_are_rejected(model, shape):
    with pytest.raises(ValueError, match=rf"inputs_embeds must be \[batch, length, {HIDDEN}\]"):
        model(inputs_embeds=torch.randn(shape))


def test_inputs_embeds_of_the_right_width_work(model):
    output = model(inputs_embeds=torch.randn(2, 5, HIDDEN)).last_hidden_state
    assert output.shape == (2, 5, HIDDEN)


def test_both_or_neither_of_ids_and_embeds_is_rejected(model, batch):
    input_ids, _ = batch
    with pytest.raises(ValueError, match="exactly one of input_ids and inputs_embeds"):
        model(input_ids, inputs_embeds=torch.randn(3, 12, HIDDEN))
    with pytest.raises(ValueError, match="exactly one of input_ids and inputs_embeds"):
        model()
    with pytest.raises(ValueError, match="exactly one of input_ids and inputs_embeds"):
        model(attention_mask=torch.ones(3, 12, dtype=torch.long))


@pytest.mark.parametrize("bad_type", [2, 7, -1])
def test_token_types_out_of_range_are_rejected(batch, bad_type):
    input_ids, _ = batch
    typed = DebertaCustomModel(tiny_config(type_vocab_size=2)).eval()
    token_type_ids = torch.zeros_like(input_ids)
    token_type_ids[1, 4] = bad_type
    with pytest.raises(ValueError, match=r"token_type_ids holds values in .*type_vocab_size=2"):
        typed(input_ids, token_type_ids=token_type_ids)
    with pytest.raises(TypeError, match="token_type_ids must hold integer ids"):
        typed(input_ids, token_type_ids=token_type_ids.float())
    token_type_ids[1, 4] = 1
    assert torch.isfinite(typed(input_ids, token_type_ids=token_type_ids).last_hidden_state).all()


def test_token_type_shape_is_checked(batch):
    input_ids, _ = batch
    typed = DebertaCustomModel(tiny_config(type_vocab_size=2)).eval()
    with pytest.raises(ValueError, match="token_type_ids has shape"):
        typed(input_ids, token_type_ids=torch.zeros(3, 5, dtype=torch.long))


def test_sequence_longer_than_the_absolute_table_is_rejected():
    absolute = DebertaCustomModel(tiny_config(position_biased_input=True)).eval()
    assert torch.isfinite(absolute(torch.randint(1, VOCAB, (1, MAX_POSITIONS))).last_hidden_state).all()
    with pytest.raises(ValueError, match=rf"Sequence length {MAX_POSITIONS + 1} exceeds max_position_embeddings="
                                         rf"{MAX_POSITIONS}"):
        absolute(torch.randint(1, VOCAB, (1, MAX_POSITIONS + 1)))
    with pytest.raises(ValueError, match=r"position_ids holds values .*max_position_embeddings=64"):
        absolute(torch.randint(1, VOCAB, (1, 4)), position_ids=torch.tensor([[0, 1, 2, MAX_POSITIONS]]))


# ----------------------------------------------------------------------------------------------------------------------
# Labels of every head
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def heads():
    return {
        "sequence": DebertaCustomForSequenceClassification(tiny_config(num_labels=3)).eval(),
        "token": DebertaCustomForTokenClassification(tiny_config(num_labels=3)).eval(),
        "mlm": DebertaCustomForMaskedLM(tiny_config()).eval(),
        "choice": DebertaCustomForMultipleChoice(tiny_config()).eval(),
    }


def test_sequence_classification_labels(heads, batch):
    head = heads["sequence"]
    input_ids, mask = batch
    with pytest.raises(ValueError, match=r"labels holds 3, outside \[0, 2\]"):
        head(input_ids, mask, labels=torch.tensor([0, 1, 3]))
    with pytest.raises(ValueError, match=r"labels holds -1, outside \[0, 2\]"):
        head(input_ids, mask, labels=torch.tensor([0, -1, 2]))
    with pytest.raises(ValueError, match=r"labels has shape \(2,\), expected \(3,\)"):
        head(input_ids, mask, labels=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"labels has shape \(3, 2\), expected \(3,\)"):
        head(input_ids, mask, labels=torch.zeros(3, 2, dtype=torch.long))
    assert head(input_ids, mask, labels=torch.tensor([[0], [1], [2]])).loss.isfinite()  # [B, 1] is accepted


def test_sequence_classification_labels_per_problem_type(batch):
    input_ids, mask = batch
    regression = DebertaCustomForSequenceClassification(tiny_config(num_labels=1)).eval()
    with pytest.raises(ValueError, match=r"Regression labels have shape \(2,\)"):
        regression(input_ids, mask, labels=torch.tensor([0.5, 1.0]))
    multi = DebertaCustomForSequenceClassification(
        tiny_config(num_labels=3, problem_type="multi_label_classification")).eval()
    with pytest.raises(ValueError, match=r"Multi-label labels have shape \(3,\), expected \(3, 3\)"):
        multi(input_ids, mask, labels=torch.tensor([1.0, 0.0, 1.0]))
    single = DebertaCustomForSequenceClassification(
        tiny_config(num_labels=3, problem_type="single_label_classification")).eval()
    with pytest.raises(TypeError, match="labels must be integer class ids"):
        single(input_ids, mask, labels=torch.tensor([0.0, 1.0, 2.0]))


def test_token_classification_labels(heads, batch):
    head = heads["token"]
    input_ids, mask = batch
    labels = torch.zeros_like(input_ids)
    labels[1, 6:] = -100
    assert head(input_ids, mask, labels=labels).loss.isfinite()
    labels[0, 2] = 3
    with pytest.raises(ValueError, match=r"labels holds 3, outside \[0, 2\].*-100"):
        head(input_ids, mask, labels=labels)
    with pytest.raises(ValueError, match=r"labels has shape \(3, 11\), expected \(3, 12\)"):
        head(input_ids, mask, labels=torch.zeros(3, 11, dtype=torch.long))
    with pytest.raises(ValueError, match=r"labels has shape \(36,\), expected \(3, 12\)"):
        head(input_ids, mask, labels=torch.zeros(36, dtype=torch.long))
    with pytest.raises(TypeError, match="labels must be integer class ids"):
        head(input_ids, mask, labels=torch.zeros(3, 12))


def test_masked_lm_labels(heads, batch):
    head = heads["mlm"]
    input_ids, mask = batch
    labels = torch.full_like(input_ids, -100)
    labels[0, 3] = VOCAB
    with pytest.raises(ValueError, match=rf"labels holds {VOCAB}, outside \[0, {VOCAB - 1}\]"):
        head(input_ids, mask, labels=labels)
    labels[0, 3] = -5
    with pytest.raises(ValueError, match=r"labels holds -5"):
        head(input_ids, mask, labels=labels)
    with pytest.raises(ValueError, match=r"labels has shape \(3, 5\), expected \(3, 12\)"):
        head(input_ids, mask, labels=input_ids[:, :5])
    with pytest.raises(TypeError, match="labels must be integer class ids"):
        head(input_ids, mask, labels=input_ids.float())


def test_multiple_choice_labels_and_rank(heads, batch):
    head = heads["choice"]
    input_ids, mask = batch
    choices, choice_mask = input_ids.view(1, 3, 12), mask.view(1, 3, 12)  # one question, three choices
    assert head(choices, choice_mask, labels=torch.tensor([2])).loss.isfinite()
    with pytest.raises(ValueError, match=r"labels holds 3, outside \[0, 2\]"):
        head(choices, choice_mask, labels=torch.tensor([3]))
    with pytest.raises(ValueError, match=r"labels has shape \(2,\), expected \(1,\)"):
        head(choices, choice_mask, labels=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"input_ids of rank 3 .*got shape \(3, 12\)"):
        head(input_ids, mask)
    with pytest.raises(ValueError, match=r"input_ids of rank 3 .*got shape \(1, 1, 3, 12\)"):
        head(choices[None], choice_mask[None])
    with pytest.raises(ValueError, match=r"inputs_embeds of rank 4 .*got shape \(3, 12, 32\)"):
        head(inputs_embeds=torch.randn(3, 12, HIDDEN))
    with pytest.raises(ValueError, match=r"attention_mask has shape \(3, 12\), expected \(1, 3, 12\)"):
        head(choices, mask)
    with pytest.raises(ValueError, match="exactly one of input_ids and inputs_embeds"):
        head()


# ----------------------------------------------------------------------------------------------------------------------
# Truncated and mismatched checkpoints: the error names the weight file
# ----------------------------------------------------------------------------------------------------------------------

# 'official': written by transformers' DebertaV2Model.save_pretrained (model_type deberta-v2);
# 'ours': written by DebertaCustomModel.save_pretrained (model_type deberta_custom).
FORMATS = ("official", "ours")


def write_checkpoint(folder, layout, hidden_size=HIDDEN):
    if layout == "official":
        fields = {k: v for k, v in TINY_OFFICIAL_V2.items() if k != "model_type"}
        fields["hidden_size"] = hidden_size
        transformers.DebertaV2Model(transformers.DebertaV2Config(**fields)).save_pretrained(folder)
    else:
        DebertaCustomModel(tiny_config(hidden_size=hidden_size)).save_pretrained(folder)
    assert (folder / "model.safetensors").is_file()
    return folder


def load_quietly(model_class, folder):
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # transformers prints a load report before raising; keep logs short
    try:
        return model_class.from_pretrained(folder)
    finally:
        transformers.logging.set_verbosity(verbosity)


def assert_loaded(model, folder, saved):
    """Every tensor of the weight file is in the model under its own name, and the model computes what the saved
    one did. Parameters are perturbed before saving, so a fresh initialisation (unit LayerNorms, zero biases) cannot
    pass by chance."""
    weights = load_file(folder / "model.safetensors")
    state = model.state_dict()
    assert set(weights) <= set(state), f"not in the model: {sorted(set(weights) - set(state))}"
    differing = [name for name, tensor in weights.items() if not torch.equal(state[name], tensor)]
    assert not differing, f"{len(differing)} of {len(weights)} tensors differ from the file, e.g. {differing[:3]}"
    input_ids, attention_mask = random_batch(VOCAB, batch=2, length=9)
    with torch.no_grad():
        expected = saved.eval()(input_ids, attention_mask=attention_mask).last_hidden_state
        got = model.eval()(input_ids, attention_mask=attention_mask).last_hidden_state
    real = attention_mask.bool()  # outputs at padding positions are meaningless (and differ from transformers')
    torch.testing.assert_close(got[real], expected[real], rtol=0, atol=1e-5)


@pytest.mark.parametrize("layout", FORMATS)
def test_intact_checkpoint_loads(tmp_path, layout):
    """An intact checkpoint loads every weight it holds: the same tensors, and the saved model's outputs (transformers'
    DebertaV2Model for the official layout)."""
    torch.manual_seed(0)
    if layout == "official":
        fields = {k: v for k, v in TINY_OFFICIAL_V2.items() if k != "model_type"}
        saved = transformers.DebertaV2Model(transformers.DebertaV2Config(**fields))
    else:
        saved = DebertaCustomModel(tiny_config())
    perturb_parameters(saved)
    saved.save_pretrained(tmp_path)
    model = load_quietly(DebertaCustomModel, tmp_path)
    assert_loaded(model, tmp_path, saved)
    # The check can fail: the same architecture without the file's weights does not pass it.
    torch.manual_seed(0)
    with pytest.raises(AssertionError):
        assert_loaded(DebertaCustomModel(model.config), tmp_path, saved)


@pytest.mark.parametrize("model_class", [DebertaCustomModel, DebertaCustomForSequenceClassification])
@pytest.mark.parametrize("layout", FORMATS)
def test_truncated_checkpoint_names_the_file(tmp_path, layout, model_class):
    folder = write_checkpoint(tmp_path, layout)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"model\.safetensors") as error:
        load_quietly(model_class, folder)
    assert str(folder) in str(error.value)


@pytest.mark.parametrize("layout", FORMATS)
def test_mismatched_checkpoint_raises_transformers_error(tmp_path, layout):
    """The config says hidden 32, the weights are hidden 48: transformers' own size check raises (its load report
    lists the tensors) and is not reworded as an unreadable file."""
    folder = write_checkpoint(tmp_path, layout, hidden_size=48)
    config = json.loads((folder / "config.json").read_text())
    config["hidden_size"] = HIDDEN
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes|size mismatch"):
        load_quietly(DebertaCustomModel, folder)


@pytest.mark.parametrize("model_class", [DebertaCustomModel, DebertaCustomForSequenceClassification])
@pytest.mark.parametrize("layout", FORMATS)
def test_checkpoint_missing_a_backbone_tensor_names_the_file_and_tensor(tmp_path, layout, model_class):
    folder = write_checkpoint(tmp_path, layout)
    state = load_file(folder / "model.safetensors")
    dropped = next(k for k in state if k.endswith("layer.1.attention.self.query_proj.weight"))
    del state[dropped]
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model\.safetensors.*layer\.1\.attention\.self\.query_proj\.weight"):
        load_quietly(model_class, folder)


# ----------------------------------------------------------------------------------------------------------------------
# Legal edge cases: finite in fp32 and bf16, eager and sdpa
# ----------------------------------------------------------------------------------------------------------------------

DTYPES = [torch.float32, torch.bfloat16]
IMPLEMENTATIONS = ["eager", "sdpa"]


def build(model_class, implementation, dtype, **overrides):
    config = tiny_config(**overrides)
    config._attn_implementation = implementation
    torch.manual_seed(0)
    model = model_class(config)
    perturb_parameters(model)
    model = model.to(dtype).eval()
    assert model.config._attn_implementation == implementation
    return model


def edge_inputs(case):
    """(input_ids, attention_mask) for each legal edge case."""
    generator = torch.Generator().manual_seed(1)
    if case == "one_token":
        return torch.randint(1, VOCAB, (2, 1), generator=generator), None
    if case == "padded_row":  # row 1 is nothing but padding
        input_ids, mask = random_batch(VOCAB, batch=3, length=10, pad_row=2)
        input_ids[1], mask[1] = 0, 0
        return input_ids, mask
    if case == "long":  # 600 tokens, far beyond max_position_embeddings=64 and the 8 buckets: relative positions only
        input_ids = torch.randint(1, VOCAB, (2, 600), generator=generator)
        mask = torch.ones_like(input_ids)
        mask[1, 450:] = 0
        return input_ids, mask
    if case == "table_length":  # exactly max_position_embeddings tokens (the longest the EMD's absolute table allows)
        return torch.randint(1, VOCAB, (2, MAX_POSITIONS), generator=generator), None
    raise ValueError(case)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", ["one_token", "padded_row", "long"])
def test_backbone_edge_cases_are_finite_with_eager_and_sdpa(case, dtype):
    input_ids, mask = edge_inputs(case)
    outputs = {}
    for implementation in IMPLEMENTATIONS:
        model = build(DebertaCustomModel, implementation, dtype)
        with torch.no_grad():
            output = model(input_ids, attention_mask=mask).last_hidden_state
        assert output.shape == (*input_ids.shape, HIDDEN) and output.dtype == dtype
        assert torch.isfinite(output).all(), implementation
        outputs[implementation] = output.float()
        if case == "padded_row" and dtype == torch.float32:  # the real rows do not see the empty one
            with torch.no_grad():
                alone = model(input_ids[:1], attention_mask=mask[:1]).last_hidden_state
            torch.testing.assert_close(output[:1], alone, atol=1e-5, rtol=1e-5)
    # the two attention paths agree (same seed, same weights)
    tolerance = 1e-4 if dtype == torch.float32 else 0.1
    torch.testing.assert_close(outputs["eager"], outputs["sdpa"], atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_classification_heads_are_finite_on_a_padded_row(implementation, dtype):
    input_ids, mask = edge_inputs("padded_row")
    sequence = build(DebertaCustomForSequenceClassification, implementation, dtype, num_labels=3)
    token = build(DebertaCustomForTokenClassification, implementation, dtype, num_labels=3)
    with torch.no_grad():
        loss = sequence(input_ids, mask, labels=torch.tensor([0, 1, 2])).loss
        assert torch.isfinite(loss)
        labels = torch.where(mask.bool(), 1, -100)
        assert torch.isfinite(token(input_ids, mask, labels=labels).loss)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("case", ["one_token", "padded_row", "table_length"])
def test_masked_lm_with_emd_edge_cases_are_finite(case, implementation, dtype):
    model = build(DebertaCustomForMaskedLM, implementation, dtype)
    assert model.config.uses_enhanced_mask_decoder
    input_ids, mask = edge_inputs(case)
    labels = torch.full_like(input_ids, -100)
    labels[0, 0] = 5
    with torch.no_grad():
        output = model(input_ids, attention_mask=mask, labels=labels)
    assert output.logits.shape == (*input_ids.shape, VOCAB)
    assert torch.isfinite(output.logits).all() and torch.isfinite(output.loss)


def test_masked_lm_with_emd_rejects_sequences_beyond_the_absolute_table():
    model = build(DebertaCustomForMaskedLM, "eager", torch.float32)
    with pytest.raises(ValueError, match=r"exceeds max_position_embeddings=64.*Enhanced Mask Decoder"):
        model(torch.randint(1, VOCAB, (1, MAX_POSITIONS + 1)))
