"""Head behaviour: losses against hand-computed references, problem_type, tuple outputs, hidden states and attentions,
gradient checkpointing, resize_token_embeddings, the tied masked-LM decoder, sparse masked-LM logits, and a short
transformers.Trainer run."""

import warnings

import pytest
import torch
import torch.nn.functional as F
import transformers
from helpers import TINY_OFFICIAL_V2, perturb_parameters, random_batch, tiny_config

from modeling_deberta_custom import (
    DebertaCustomForMaskedLM,
    DebertaCustomForMultipleChoice,
    DebertaCustomForQuestionAnswering,
    DebertaCustomForSequenceClassification,
    DebertaCustomForTokenClassification,
    DebertaCustomModel,
)
from modeling_deberta_custom.losses import sparse_prediction_positions

VOCAB = TINY_OFFICIAL_V2["vocab_size"]
LAYERS = TINY_OFFICIAL_V2["num_hidden_layers"]
HEADS = TINY_OFFICIAL_V2["num_attention_heads"]


def make(model_class, seed=0, **overrides):
    """A tiny model (dropout 0) with every parameter moved off its initial value, in eval mode."""
    torch.manual_seed(seed)
    model = model_class(tiny_config(**overrides))
    perturb_parameters(model, seed=seed)
    return model.eval()


@pytest.fixture(scope="module")
def batch():
    return random_batch(VOCAB, batch=3, length=12)  # row 1 padded from position 6


# ----------------------------------------------------------------------------------------------------------------------
# Losses equal hand-computed references
# ----------------------------------------------------------------------------------------------------------------------


def test_regression_loss(batch):
    input_ids, mask = batch
    model = make(DebertaCustomForSequenceClassification, num_labels=1, problem_type="regression")
    labels = torch.tensor([0.5, -1.0, 2.0])
    output = model(input_ids, mask, labels=labels)
    assert output.logits.shape == (3, 1)
    torch.testing.assert_close(output.loss, F.mse_loss(output.logits.view(-1), labels))


def test_single_label_classification_loss(batch):
    input_ids, mask = batch
    model = make(DebertaCustomForSequenceClassification, num_labels=3, problem_type="single_label_classification")
    labels = torch.tensor([2, 0, 1])
    output = model(input_ids, mask, labels=labels)
    assert output.logits.shape == (3, 3)
    torch.testing.assert_close(output.loss, F.cross_entropy(output.logits, labels))


def test_multi_label_classification_loss(batch):
    input_ids, mask = batch
    model = make(DebertaCustomForSequenceClassification, num_labels=4, problem_type="multi_label_classification")
    labels = torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]])  # multi-hot
    output = model(input_ids, mask, labels=labels)
    assert output.logits.shape == (3, 4)
    torch.testing.assert_close(output.loss, F.binary_cross_entropy_with_logits(output.logits, labels))


def test_problem_type_is_inferred_when_unset(batch):
    """As in transformers: num_labels 1 -> regression; integer labels -> single-label; float labels -> multi-label."""
    input_ids, mask = batch
    regression = make(DebertaCustomForSequenceClassification, num_labels=1)
    assert regression.config.problem_type is None
    labels = torch.tensor([0.1, 0.2, 0.3])
    output = regression(input_ids, mask, labels=labels)
    torch.testing.assert_close(output.loss, F.mse_loss(output.logits.view(-1), labels))

    classifier = make(DebertaCustomForSequenceClassification, num_labels=3)
    assert classifier.config.problem_type is None
    integer_labels = torch.tensor([1, 2, 0])
    output = classifier(input_ids, mask, labels=integer_labels)
    torch.testing.assert_close(output.loss, F.cross_entropy(output.logits, integer_labels))
    multi_hot = torch.tensor([[0.0, 1.0, 1.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    output = classifier(input_ids, mask, labels=multi_hot)
    torch.testing.assert_close(output.loss, F.binary_cross_entropy_with_logits(output.logits, multi_hot))

    assert classifier(input_ids, mask).loss is None  # no labels, no loss


def test_token_classification_loss_ignores_minus_100(batch):
    input_ids, mask = batch
    model = make(DebertaCustomForTokenClassification, num_labels=5)
    labels = torch.randint(0, 5, input_ids.shape, generator=torch.Generator().manual_seed(3))
    labels[mask == 0] = -100
    output = model(input_ids, mask, labels=labels)
    assert output.logits.shape == (3, 12, 5)
    kept = labels != -100
    torch.testing.assert_close(output.loss, F.cross_entropy(output.logits[kept], labels[kept]))


def test_question_answering_loss(batch):
    input_ids, mask = batch
    model = make(DebertaCustomForQuestionAnswering)
    start, end = torch.tensor([1, 2, 3]), torch.tensor([4, 5, 40])  # 40 is beyond the window: ignored
    output = model(input_ids, mask, start_positions=start, end_positions=end)
    assert output.start_logits.shape == output.end_logits.shape == (3, 12)
    # The span softmax runs over each row's real tokens (row 1 is padded from position 6).
    start_logits, end_logits = (logits.masked_fill(mask == 0, float("-inf")) for logits in output.to_tuple()[1:3])
    expected_end = F.cross_entropy(end_logits[:2], end[:2])
    expected = (F.cross_entropy(start_logits, start) + expected_end) / 2
    torch.testing.assert_close(output.loss, expected)


def test_multiple_choice_loss(batch):
    input_ids, mask = batch
    model = make(DebertaCustomForMultipleChoice)
    choices = torch.stack([input_ids, input_ids.flip(0)])  # [2 questions, 3 choices, 12]
    choice_mask = torch.stack([mask, mask.flip(0)])
    labels = torch.tensor([2, 0])
    output = model(choices, choice_mask, labels=labels)
    assert output.logits.shape == (2, 3)
    torch.testing.assert_close(output.loss, F.cross_entropy(output.logits, labels))
    # each choice is scored on its own: the same (ids, mask) gets the same logit wherever it stands
    torch.testing.assert_close(output.logits[0], output.logits[1].flip(0))


def test_masked_lm_loss(batch):
    input_ids, mask = batch
    model = make(DebertaCustomForMaskedLM)
    labels = torch.full_like(input_ids, -100)
    labels[0, [1, 4]] = input_ids[0, [1, 4]]
    labels[2, 7] = 5
    output = model(input_ids, mask, labels=labels)
    assert output.logits.shape == (3, 12, VOCAB)  # eval mode: dense logits
    torch.testing.assert_close(output.loss, F.cross_entropy(output.logits.view(-1, VOCAB), labels.view(-1)))


# ----------------------------------------------------------------------------------------------------------------------
# Tuple outputs, hidden states, attentions
# ----------------------------------------------------------------------------------------------------------------------

HEAD_CASES = {
    "sequence": (DebertaCustomForSequenceClassification, dict(num_labels=3), lambda ids: torch.tensor([0, 1, 2])),
    "token": (DebertaCustomForTokenClassification, dict(num_labels=3), lambda ids: torch.zeros_like(ids)),
    "mlm": (DebertaCustomForMaskedLM, {}, lambda ids: ids.clone()),
}


@pytest.mark.parametrize("name", sorted(HEAD_CASES))
def test_return_dict_false_gives_the_same_tuple(batch, name):
    model_class, overrides, make_labels = HEAD_CASES[name]
    model = make(model_class, **overrides)
    input_ids, mask = batch
    labels = make_labels(input_ids)
    as_dict = model(input_ids, mask, labels=labels, output_hidden_states=True, output_attentions=True)
    as_tuple = model(input_ids, mask, labels=labels, output_hidden_states=True, output_attentions=True,
                     return_dict=False)
    assert isinstance(as_tuple, tuple)
    assert len(as_tuple) == 4  # loss, logits, hidden states, attentions
    torch.testing.assert_close(as_tuple[0], as_dict.loss)
    torch.testing.assert_close(as_tuple[1], as_dict.logits)
    assert len(as_tuple[2]) == LAYERS + 1 and len(as_tuple[3]) == LAYERS
    for got, expected in zip(as_tuple[2] + as_tuple[3], as_dict.hidden_states + as_dict.attentions, strict=True):
        torch.testing.assert_close(got, expected)
    # without labels and extras: just the logits (unpadded, where attentions took the padded path: real tokens)
    plain = model(input_ids, mask, return_dict=False)
    assert len(plain) == 1
    real = mask.bool() if plain[0].dim() == 3 else slice(None)
    torch.testing.assert_close(plain[0][real], as_dict.logits[real])


def test_backbone_return_dict_false(batch):
    model = make(DebertaCustomModel)
    input_ids, mask = batch
    as_dict = model(input_ids, mask, output_hidden_states=True)
    as_tuple = model(input_ids, mask, output_hidden_states=True, return_dict=False)
    assert len(as_tuple) == 2
    torch.testing.assert_close(as_tuple[0], as_dict.last_hidden_state)
    assert len(as_tuple[1]) == LAYERS + 1


def test_question_answering_return_dict_false(batch):
    model = make(DebertaCustomForQuestionAnswering)
    input_ids, mask = batch
    output = model(input_ids, mask, start_positions=torch.tensor([0, 1, 2]), end_positions=torch.tensor([3, 4, 5]))
    loss, start_logits, end_logits = model(input_ids, mask, start_positions=torch.tensor([0, 1, 2]),
                                           end_positions=torch.tensor([3, 4, 5]), return_dict=False)
    torch.testing.assert_close(loss, output.loss)
    torch.testing.assert_close(start_logits, output.start_logits)
    torch.testing.assert_close(end_logits, output.end_logits)


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_hidden_states_and_attentions(batch, implementation):
    config = tiny_config()
    config._attn_implementation = implementation
    torch.manual_seed(0)
    model = DebertaCustomModel(config)
    perturb_parameters(model)
    model.eval()
    input_ids, mask = batch
    output = model(input_ids, mask, output_hidden_states=True, output_attentions=True)
    assert len(output.hidden_states) == LAYERS + 1
    assert all(h.shape == (3, 12, config.hidden_size) for h in output.hidden_states)
    torch.testing.assert_close(output.hidden_states[-1], output.last_hidden_state)
    assert len(output.attentions) == LAYERS
    for probs in output.attentions:
        assert probs.shape == (3, HEADS, 12, 12)
        torch.testing.assert_close(probs.sum(-1), torch.ones(3, HEADS, 12))
        assert (probs >= 0).all()
        assert probs[1, :, :, 6:].abs().max() < 1e-6  # padded keys get no attention
    # asking for attentions does not change the result at real tokens (sdpa falls back to the eager path for them,
    # and unpadding to the padded path)
    real = mask.bool()
    torch.testing.assert_close(model(input_ids, mask).last_hidden_state[real], output.last_hidden_state[real],
                               atol=1e-5, rtol=1e-5)
    assert model(input_ids, mask).hidden_states is None and model(input_ids, mask).attentions is None


def test_masked_lm_with_emd_returns_hidden_states_only_when_asked(batch):
    model = make(DebertaCustomForMaskedLM)
    assert model.config.uses_enhanced_mask_decoder
    input_ids, mask = batch
    assert model(input_ids, mask).hidden_states is None
    output = model(input_ids, mask, output_hidden_states=True, output_attentions=True)
    assert len(output.hidden_states) == LAYERS + 1 and len(output.attentions) == LAYERS


# ----------------------------------------------------------------------------------------------------------------------
# Gradient checkpointing
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non_reentrant"])
@pytest.mark.parametrize("model_class,overrides,label_kind", [
    (DebertaCustomForSequenceClassification, dict(num_labels=3), "sequence"),
    # the Enhanced Mask Decoder re-applies the checkpointed last layer; every token labelled: logits everywhere
    (DebertaCustomForMaskedLM, dict(sparse_mlm_max_fraction=1.0), "mlm"),
])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(batch, model_class, overrides, label_kind,
                                                                  reentrant):
    """Both torch checkpoint flavours: transformers 4.57 defaults to use_reentrant=True, 5.x to False."""
    input_ids, mask = batch
    labels = torch.tensor([0, 2, 1]) if label_kind == "sequence" else torch.where(mask.bool(), input_ids, -100)

    def loss_and_gradients(checkpointing):
        model = make(model_class, **overrides)
        model.train()  # dropout is 0 in the tiny config, so train mode is deterministic
        if checkpointing:
            with warnings.catch_warnings():  # transformers 5.x: FutureWarning, renamed activation_checkpointing_enable
                warnings.simplefilter("ignore", FutureWarning)
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
            assert all(layer.gradient_checkpointing for layer in model.deberta.encoder.layer)
        calls = []
        # a hook on a sub-module of the layer (transformers checkpoints the layer's forward, not its __call__)
        hook = model.deberta.encoder.layer[0].intermediate.register_forward_hook(lambda *args: calls.append(1))
        loss = model(input_ids, mask, labels=labels).loss
        loss.backward()
        hook.remove()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}, len(calls)

    loss, gradients, calls = loss_and_gradients(False)
    loss_ckpt, gradients_ckpt, calls_ckpt = loss_and_gradients(True)
    assert calls == 1 and calls_ckpt == 2  # the checkpointed layer really is recomputed in the backward pass
    torch.testing.assert_close(loss_ckpt, loss)
    assert gradients.keys() == gradients_ckpt.keys()
    assert "deberta.encoder.layer.0.attention.self.query_proj.weight" in gradients
    for name, gradient in gradients.items():
        torch.testing.assert_close(gradients_ckpt[name], gradient, atol=1e-6, rtol=1e-5, msg=name)


# ----------------------------------------------------------------------------------------------------------------------
# Masked-LM: resizing, the tied decoder, sparse logits
# ----------------------------------------------------------------------------------------------------------------------


def test_resize_token_embeddings_grows_embeddings_bias_and_logits(batch):
    model = make(DebertaCustomForMaskedLM)
    input_ids, mask = batch
    with torch.no_grad():
        before = model(input_ids, mask).logits
    old_bias = model.lm_predictions.lm_head.bias.detach().clone()

    new_size = VOCAB + 13
    embeddings = model.resize_token_embeddings(new_size)
    assert embeddings.num_embeddings == new_size
    assert model.get_input_embeddings().weight.shape == (new_size, model.config.hidden_size)
    assert model.lm_predictions.lm_head.bias.shape == (new_size,)
    torch.testing.assert_close(model.lm_predictions.lm_head.bias[:VOCAB], old_bias)
    assert model.config.vocab_size == new_size

    with torch.no_grad():
        after = model(input_ids, mask).logits
    assert after.shape == (3, 12, new_size)
    torch.testing.assert_close(after[..., :VOCAB], before)  # what existed is unchanged
    assert torch.isfinite(after).all()
    # the new tokens are usable as inputs and as labels
    grown_ids = input_ids.clone()
    grown_ids[0, 2] = new_size - 1
    labels = torch.full_like(grown_ids, -100)
    labels[0, 3] = new_size - 1
    assert torch.isfinite(model(grown_ids, mask, labels=labels).loss)


def test_resize_token_embeddings_pads_to_a_multiple():
    model = make(DebertaCustomForMaskedLM)
    model.resize_token_embeddings(VOCAB + 1, pad_to_multiple_of=8)
    assert model.get_input_embeddings().num_embeddings == 104
    assert model.lm_predictions.lm_head.bias.shape == (104,)


def test_masked_lm_decoder_is_the_word_embedding_matrix(batch):
    model = make(DebertaCustomForMaskedLM)
    state = model.state_dict()
    vocabulary_sized = [k for k, v in state.items() if v.dim() == 2 and v.shape[0] == VOCAB]
    assert vocabulary_sized == ["deberta.embeddings.word_embeddings.weight"]  # no separate decoder matrix
    assert not any("decoder" in k for k in state)
    assert sorted(k for k in state if k.startswith("lm_predictions.")) == [
        "lm_predictions.lm_head.LayerNorm.bias", "lm_predictions.lm_head.LayerNorm.weight",
        "lm_predictions.lm_head.bias", "lm_predictions.lm_head.dense.bias", "lm_predictions.lm_head.dense.weight",
    ]

    input_ids, mask = batch
    token = 7
    input_ids = torch.where(input_ids == token, 8, input_ids)  # keep the edited token out of the input
    with torch.no_grad():
        before = model(input_ids, mask).logits
        model.deberta.embeddings.word_embeddings.weight[token] += 0.5
        after = model(input_ids, mask).logits
    others = [i for i in range(VOCAB) if i != token]
    torch.testing.assert_close(after[..., others], before[..., others])  # only that token's logit moves
    real = mask.bool()  # (padding positions hold zeros)
    assert (after[..., token] - before[..., token])[real].abs().min() > 1e-4


def test_sparse_masked_lm_logits_in_training(batch):
    input_ids, mask = batch
    model = make(DebertaCustomForMaskedLM)
    assert model.config.sparse_mlm_logits and model.config.hidden_dropout_prob == 0.0
    labels = torch.full_like(input_ids, -100)
    labels[0, [0, 5, 11]] = torch.tensor([3, 4, 5])
    labels[2, [2, 9]] = torch.tensor([6, 98])
    with torch.no_grad():
        dense = model(input_ids, mask, labels=labels)
    model.train()
    sparse = model(input_ids, mask, labels=labels)
    assert sparse.logits.shape == (5, VOCAB)  # [M, V]: eager predicts exactly at the labelled positions
    torch.testing.assert_close(sparse.loss, dense.loss)
    # The labelled positions in row-major order (compiled graphs add unlabelled rows up to a fixed budget after them).
    labelled = labels != -100
    torch.testing.assert_close(sparse.logits, dense.logits[labelled])
    assert torch.equal(sparse_prediction_positions(labels, 0.25), torch.tensor([0, 5, 11, 26, 33, 1, 2, 3, 4]))
    sparse.loss.backward()
    assert model.deberta.embeddings.word_embeddings.weight.grad is not None

    model.config.sparse_mlm_logits = False  # the switch: dense logits in training too
    assert model(input_ids, mask, labels=labels).logits.shape == (3, 12, VOCAB)


# ----------------------------------------------------------------------------------------------------------------------
# transformers.Trainer
# ----------------------------------------------------------------------------------------------------------------------


def test_trainer_loss_falls(tmp_path):
    """A toy separable task: class 0 sequences use tokens 1..49, class 1 tokens 50..98."""
    datasets = pytest.importorskip("datasets")
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 2, (64,), generator=generator)
    low = torch.randint(1, 50, (64, 8), generator=generator)
    input_ids = torch.where(labels[:, None] == 1, low + 49, low)
    dataset = datasets.Dataset.from_dict({
        "input_ids": input_ids.tolist(),
        "attention_mask": torch.ones_like(input_ids).tolist(),
        "labels": labels.tolist(),
    })
    torch.manual_seed(0)
    model = DebertaCustomForSequenceClassification(tiny_config(num_labels=2))
    arguments = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=30, per_device_train_batch_size=8, learning_rate=5e-3,
        lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0,
        disable_tqdm=True,
    )
    trainer = transformers.Trainer(model=model, args=arguments, train_dataset=dataset)
    result = trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 30
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.5 * first, losses
    assert result.global_step == 30
    model.eval()
    with torch.no_grad():
        accuracy = (model(input_ids).logits.argmax(-1) == labels).float().mean()
    assert accuracy > 0.9


@pytest.mark.parametrize("head", [DebertaCustomForSequenceClassification, DebertaCustomForTokenClassification,
                                  DebertaCustomForQuestionAnswering, DebertaCustomForMaskedLM])
@pytest.mark.parametrize("position_biased_input", [False, True])
def test_every_trainable_parameter_gets_a_gradient_after_loading(tmp_path, head, position_biased_input):
    """DistributedDataParallel without find_unused_parameters (the Trainer's choice under gradient checkpointing)
    fails on a trainable parameter that gets no gradient. The absolute table of a relative-only model is read only by
    the Enhanced Mask Decoder, so it must be frozen in the other heads, also after a save/load round trip (loading
    installs fresh parameters), and trainable where it is read."""
    head(tiny_config(position_biased_input=position_biased_input)).save_pretrained(tmp_path)
    model = head.from_pretrained(tmp_path)
    model.train()
    input_ids, attention_mask = random_batch(model.config.vocab_size, length=10)
    model(input_ids=input_ids, attention_mask=attention_mask)[0].float().sum().backward()
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert [name for name, p in trainable.items() if p.grad is None] == []
    table = model.base_model.embeddings.position_embeddings.weight
    reads_table = position_biased_input or head is DebertaCustomForMaskedLM
    assert table.requires_grad == reads_table


@pytest.mark.parametrize("name", sorted(HEAD_CASES))
@pytest.mark.parametrize("position_biased_input", [False, True], ids=["emd", "no_emd"])
def test_config_output_hidden_states_and_return_dict_are_honoured(batch, name, position_biased_input):
    """config.output_hidden_states and config.return_dict, as transformers' heads read them, when the call does not
    say; an explicit argument wins. (transformers refuses config.output_attentions with sdpa attention.)"""
    model_class, overrides, _ = HEAD_CASES[name]
    model = make(model_class, position_biased_input=position_biased_input, **overrides)
    input_ids, mask = batch
    model.config.output_hidden_states = True
    output = model(input_ids, mask)
    assert len(output.hidden_states) == LAYERS + 1 and output.attentions is None
    assert model(input_ids, mask, output_hidden_states=False).hidden_states is None
    model.config.return_dict = False
    as_tuple = model(input_ids, mask)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 2  # logits, hidden states
    torch.testing.assert_close(as_tuple[0], output.logits)
    model.config.output_hidden_states = False
    assert len(model(input_ids, mask)) == 1
    assert isinstance(model(input_ids, mask, return_dict=True), transformers.utils.ModelOutput)
