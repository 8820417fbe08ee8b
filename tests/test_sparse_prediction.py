"""Sparse masked-LM prediction (vocabulary logits only where there are labels) never fails a legal batch: whatever the
masking rate (up to every token), batch size and mode, the masked-LM loss equals the dense computation
(config.sparse_mlm_logits=False). Batches come from transformers' own DataCollatorForLanguageModeling, whose masking
is binomial: any fixed number of predicted positions is exceeded by some batches (DESIGN.md section 6).

Compiled training steps (the fixed-budget path with its exact overflow) are in tests/test_compile_training.py."""

import pytest
import torch
import transformers
from helpers import perturb_parameters, tiny_config
from tokenizers import Tokenizer, models

from modeling_deberta_custom import DebertaCustomForMaskedLM, DebertaCustomForRTDPreTraining
from modeling_deberta_custom.losses import prediction_positions, sparse_prediction_positions

SPECIALS = ["[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]"]
VOCAB = 99  # the tiny config's


def word_tokenizer():
    """A word-level tokenizer over the tiny vocabulary: specials at 0-4, then words w5 ... w98."""
    pieces = SPECIALS + [f"w{i}" for i in range(len(SPECIALS), VOCAB)]
    backend = Tokenizer(models.WordLevel({piece: i for i, piece in enumerate(pieces)}, unk_token="[UNK]"))
    backend.add_special_tokens(SPECIALS)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", cls_token="[CLS]",
                                                sep_token="[SEP]", unk_token="[UNK]", mask_token="[MASK]")


TOKENIZER = word_tokenizer()


def collated_batches(probability, batch, length, steps, seed=0):
    """`steps` batches from DataCollatorForLanguageModeling: [CLS] words [SEP], lengths drawn in [3/4 length - 2,
    length] so that padding varies."""
    collator = transformers.DataCollatorForLanguageModeling(TOKENIZER, mlm_probability=probability,
                                                            return_tensors="pt")
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # the collator draws its masks from torch's global generator
    for _ in range(steps):
        examples = []
        for _ in range(batch):
            size = int(torch.randint(length - 2 - length // 4, length - 1, (1,), generator=generator))
            words = torch.randint(len(SPECIALS), VOCAB, (size,), generator=generator).tolist()
            examples.append({"input_ids": [TOKENIZER.cls_token_id, *words, TOKENIZER.sep_token_id]})
        yield collator(examples)


def make(head, **overrides):
    torch.manual_seed(0)
    model = head(tiny_config(**overrides))
    perturb_parameters(model)
    return model


def mlm_loss(model, batch, sparse):
    """The masked-LM loss of `batch` with sparse or dense vocabulary logits (the generator's, for RTD)."""
    model.config.sparse_mlm_logits = sparse
    output = model(**batch)
    return output.mlm_loss if isinstance(model, DebertaCustomForRTDPreTraining) else output.loss


def old_budget(batch):
    """The fixed budget main used: ceil(0.25 * B * N) positions (a batch beyond it raised)."""
    return -(-batch["labels"].numel() // 4)


HEADS = [DebertaCustomForMaskedLM, DebertaCustomForRTDPreTraining]


@pytest.mark.parametrize("head", HEADS, ids=lambda head: head.__name__)
@pytest.mark.parametrize("probability,batch,length,steps", [(0.15, 2, 8, 200), (0.3, 8, 64, 4), (0.4, 8, 64, 4)],
                         ids=["p0.15-2x8", "p0.3-8x64", "p0.4-8x64"])
def test_collator_batches_never_fail_and_give_the_dense_loss(head, probability, batch, length, steps):
    model = make(head)
    beyond_old_budget = 0
    for step, inputs in enumerate(collated_batches(probability, batch, length, steps)):
        beyond_old_budget += int((inputs["labels"] != -100).sum()) > old_budget(inputs)
        model.train(step % 2 == 0)  # training and evaluation alike
        torch.manual_seed(step)  # RTD samples replacements after its masked-LM loss: seeds keep runs comparable
        sparse = mlm_loss(model, inputs, sparse=True)
        torch.manual_seed(step)
        dense = mlm_loss(model, inputs, sparse=False)
        torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-5, msg=f"step {step}")
    assert beyond_old_budget > 0  # batches that the fixed budget refused were among them


@pytest.mark.parametrize("head", HEADS, ids=lambda head: head.__name__)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_labels_on_every_token(head, train):
    """Labels on every position, padding included (transformers' model tests label every token)."""
    model = make(head).train(train)
    input_ids = torch.randint(len(SPECIALS), VOCAB, (3, 10), generator=torch.Generator().manual_seed(1))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 6:] = 0
    inputs = dict(input_ids=input_ids, attention_mask=attention_mask, labels=input_ids.clone())
    torch.manual_seed(0)
    sparse = mlm_loss(model, inputs, sparse=True)
    torch.manual_seed(0)
    dense = mlm_loss(model, inputs, sparse=False)
    torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-6)
    sparse.backward()  # and it trains


def test_sparse_logits_cover_exactly_the_labelled_positions():
    """Eager: the vocabulary projection runs on the labelled positions only, in row-major order; the loss and its
    gradients are the dense ones."""
    model = make(DebertaCustomForMaskedLM).train()
    input_ids = torch.randint(len(SPECIALS), VOCAB, (3, 12), generator=torch.Generator().manual_seed(2))
    labels = torch.full_like(input_ids, -100)
    labels[0, [0, 5, 11]] = torch.tensor([3, 4, 5])
    labels[2, [2, 9]] = torch.tensor([6, 98])
    sparse = model(input_ids, labels=labels)
    assert sparse.logits.shape == (5, VOCAB)
    assert prediction_positions(labels, model.config.sparse_mlm_max_fraction).tolist() == [0, 5, 11, 26, 33]
    # the fixed-budget order that compiled graphs use (K = ceil(0.25 * 36)): the labelled ones, then unlabelled ones
    assert sparse_prediction_positions(labels, 0.25).tolist() == [0, 5, 11, 26, 33, 1, 2, 3, 4]
    assert sparse_prediction_positions(labels, 0.1).tolist() == [0, 5, 11, 26]  # fewer rows than labels: the first
    sparse.loss.backward()
    sparse_gradients = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.config.sparse_mlm_logits = False
    dense = model(input_ids, labels=labels)
    assert dense.logits.shape == (3, 12, VOCAB)
    torch.testing.assert_close(sparse.logits, dense.logits[labels != -100])
    torch.testing.assert_close(sparse.loss, dense.loss)
    dense.loss.backward()
    for name, gradient in sparse_gradients.items():
        torch.testing.assert_close(gradient, model.get_parameter(name).grad, msg=name)


def test_no_labelled_position_gives_zero_loss_and_zero_gradients():
    model = make(DebertaCustomForMaskedLM).train()
    input_ids = torch.randint(len(SPECIALS), VOCAB, (2, 8))
    output = model(input_ids, labels=torch.full_like(input_ids, -100))
    assert output.logits.shape == (0, VOCAB) and output.loss.item() == 0.0
    output.loss.backward()
    assert model.lm_predictions.lm_head.dense.weight.grad.abs().sum() == 0


def test_rtd_generator_logits_follow_the_sparse_switch():
    """sparse_mlm_logits=False gives the generator's logits at every position, as for the masked-LM head, and
    the same samples' distribution: the discriminator's input differs only where labels are."""
    model = make(DebertaCustomForRTDPreTraining).train()
    input_ids = torch.randint(len(SPECIALS), VOCAB, (2, 8), generator=torch.Generator().manual_seed(3))
    labels = torch.full_like(input_ids, -100)
    labels[0, 2], labels[1, 5] = 7, 9
    sparse = model(input_ids=input_ids, labels=labels)
    assert sparse.generator_positions.tolist() == [2, 13] and sparse.generator_logits.shape == (2, VOCAB)
    model.config.sparse_mlm_logits = False
    dense = model(input_ids=input_ids, labels=labels)
    assert dense.generator_positions.tolist() == list(range(16)) and dense.generator_logits.shape == (16, VOCAB)
    torch.testing.assert_close(dense.generator_logits[[2, 13]], sparse.generator_logits)
    unlabelled = labels == -100
    assert torch.equal(dense.discriminator_input_ids[unlabelled], input_ids[unlabelled])
