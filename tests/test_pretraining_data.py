"""Pretraining data: masking rates (statistically), special tokens and padding never masked, whole-word masking,
grouping of text into [CLS] ... [SEP] blocks, and the evaluation metrics of the pretraining script."""

import math

import pytest
import torch
from helpers import tiny_config
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from modeling_deberta_custom import DebertaCustomForRTDPreTraining
from modeling_deberta_custom.training.metrics import PretrainingMetrics
from modeling_deberta_custom.training.pretraining import (
    DebertaMaskingCollator,
    MaskingSeedCallback,
    group_texts,
    tokenize_and_group,
    word_start_table,
)

SPECIALS = ["[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]"]
NUM_STARTS, NUM_CONTINUATIONS = 120, 75


def piece_tokenizer():
    """A tokenizer whose vocabulary looks like SentencePiece's: specials at 0-4, then word-initial pieces ("▁wN") and
    continuation pieces ("cN")."""
    pieces = SPECIALS + [f"\u2581w{i}" for i in range(NUM_STARTS)] + [f"c{i}" for i in range(NUM_CONTINUATIONS)]
    backend = Tokenizer(models.WordLevel({piece: i for i, piece in enumerate(pieces)}, unk_token="[UNK]"))
    backend.add_special_tokens(SPECIALS)
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
                                   unk_token="[UNK]", mask_token="[MASK]")


TOKENIZER = piece_tokenizer()
FIRST_START, FIRST_CONTINUATION = len(SPECIALS), len(SPECIALS) + NUM_STARTS


def word_batch(rows=48, words=60, seed=0, pad_rows=(1, 5)):
    """[CLS] + words of 1-3 pieces (a start piece, then continuation pieces) + [SEP], right-padded to one length.
    Returns the examples (lists of ids) and, per row, the list of words as (start, end) spans."""
    generator = torch.Generator().manual_seed(seed)
    examples, spans = [], []
    for row in range(rows):
        ids, row_spans = [TOKENIZER.cls_token_id], []
        count = words // 2 if row in pad_rows else words
        for _ in range(count):
            start = len(ids)
            ids.append(FIRST_START + int(torch.randint(NUM_STARTS, (1,), generator=generator)))
            for _ in range(int(torch.randint(3, (1,), generator=generator))):
                ids.append(FIRST_CONTINUATION + int(torch.randint(NUM_CONTINUATIONS, (1,), generator=generator)))
            row_spans.append((start, len(ids)))
        ids.append(TOKENIZER.sep_token_id)
        examples.append({"input_ids": ids})
        spans.append(row_spans)
    return examples, spans


def within(observed, trials, probability, sigmas=5.0):
    """|observed - n p| below `sigmas` binomial standard deviations."""
    mean, std = trials * probability, math.sqrt(trials * probability * (1 - probability))
    return abs(observed - mean) <= sigmas * std, (observed, mean, std)


def originals(examples, shape):
    original = torch.full(shape, TOKENIZER.pad_token_id)
    for i, example in enumerate(examples):
        original[i, :len(example["input_ids"])] = torch.tensor(example["input_ids"])
    return original


# ----------------------------------------------------------------------------------------------------------------------
# Token-level masking
# ----------------------------------------------------------------------------------------------------------------------


def test_mlm_masking_rates_are_15_percent_then_80_10_10():
    collator = DebertaMaskingCollator(TOKENIZER)  # 0.15, 0.8, 0.1: the masked-LM recipe
    examples, _ = word_batch(rows=96)
    batch = collator(examples)
    original = originals(examples, batch["input_ids"].shape)
    eligible = collator.eligible(original, batch["attention_mask"])
    selected = batch["labels"] != -100
    assert torch.equal(batch["labels"][selected], original[selected])
    ok, detail = within(int(selected.sum()), int(eligible.sum()), 0.15)
    assert ok, detail
    n = int(selected.sum())
    inputs = batch["input_ids"][selected]
    as_mask = int((inputs == TOKENIZER.mask_token_id).sum())
    kept = int((inputs == original[selected]).sum())
    randomised = n - as_mask - kept
    candidates = len(TOKENIZER) - len(SPECIALS)  # a random draw equals the original with probability 1 / candidates
    for observed, probability in ((as_mask, 0.8), (randomised, 0.1 * (1 - 1 / candidates)),
                                  (kept, 0.1 + 0.1 / candidates)):
        ok, detail = within(observed, n, probability)
        assert ok, detail


def test_special_tokens_and_padding_are_never_masked_or_drawn():
    collator = DebertaMaskingCollator(TOKENIZER, mask_probability=0.9, mask_replace_prob=0.0, random_replace_prob=1.0)
    examples, _ = word_batch(rows=32)
    batch = collator(examples)
    original = originals(examples, batch["input_ids"].shape)
    special = torch.isin(original, torch.arange(len(SPECIALS))) | ~batch["attention_mask"].bool()
    assert bool(special[:, 0].all()) and bool((~batch["attention_mask"].bool()).any())
    assert bool((batch["labels"][special] == -100).all())
    assert torch.equal(batch["input_ids"][special], original[special])
    selected = batch["labels"] != -100
    assert int(selected.sum()) > 1000
    # Random replacements come from the non-special vocabulary only.
    assert int(batch["input_ids"][selected].min()) >= len(SPECIALS)
    assert int(batch["input_ids"][selected].max()) < len(TOKENIZER)


def test_collator_pads_and_does_not_modify_its_input():
    examples = [{"input_ids": [1, 10, 11, 2]}, {"input_ids": torch.tensor([1, 12, 2])}]
    before = [list(examples[0]["input_ids"]), examples[1]["input_ids"].clone()]
    batch = DebertaMaskingCollator(TOKENIZER, pad_to_multiple_of=8)(examples)
    assert batch["input_ids"].shape == (2, 8)
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0, 0, 0]]
    assert batch["input_ids"][1, 3:].tolist() == [0] * 5
    assert examples[0]["input_ids"] == before[0] and torch.equal(examples[1]["input_ids"], before[1])


@pytest.mark.parametrize("probability", [0.15, 0.3])
def test_rtd_recipe_masks_every_selected_token_at_the_configured_rate(probability):
    """The RTD generator's input: rtd_mask_probability of the tokens, every one of them [MASK] (the original
    DeBERTa-v3 recipe)."""
    config = tiny_config(rtd_mask_probability=probability)
    collator = DebertaMaskingCollator.for_objective(TOKENIZER, "rtd", config.rtd_mask_probability)
    examples, _ = word_batch(rows=96, seed=3)
    batch = collator(examples)
    original = originals(examples, batch["input_ids"].shape)
    selected = batch["labels"] != -100
    ok, detail = within(int(selected.sum()), int(collator.eligible(original, batch["attention_mask"]).sum()),
                        probability)
    assert ok, detail
    assert bool((batch["input_ids"][selected] == TOKENIZER.mask_token_id).all())
    assert torch.equal(batch["input_ids"][~selected], original[~selected])


def test_invalid_settings_are_rejected():
    with pytest.raises(ValueError, match="mask_probability"):
        DebertaMaskingCollator(TOKENIZER, mask_probability=0.0)
    with pytest.raises(ValueError, match="sum to at most 1"):
        DebertaMaskingCollator(TOKENIZER, mask_replace_prob=0.8, random_replace_prob=0.3)
    with pytest.raises(ValueError, match="objective"):
        DebertaMaskingCollator.for_objective(TOKENIZER, "clm", 0.15)


def masks_at(collator, examples, epoch, batch):
    collator.start_epoch(epoch, batch)
    output = collator(examples)
    return torch.cat([output["input_ids"], output["labels"]])


@pytest.mark.parametrize("whole_word_mask", [False, True])
def test_masks_are_a_function_of_the_seed_and_the_batch_position(whole_word_mask):
    """Reproducible across an interruption: the masks of a batch depend on (seed, process, epoch, batch index) only,
    not on torch's global generator or on what was collated before; each of those changes them."""
    examples, _ = word_batch(rows=8, words=20)
    collator = DebertaMaskingCollator(TOKENIZER, whole_word_mask=whole_word_mask, seed=7)
    reference = masks_at(collator, examples, epoch=1, batch=5)
    torch.manual_seed(123)  # the global generator plays no part
    collator(examples)
    assert torch.equal(masks_at(collator, examples, 1, 5), reference)
    assert torch.equal(masks_at(DebertaMaskingCollator(TOKENIZER, whole_word_mask=whole_word_mask, seed=7),
                                examples, 1, 5), reference)
    collator.start_epoch(1, 4)
    collator(examples)
    assert torch.equal(collator(examples)["labels"], reference[len(examples):])  # the counter advances by one a call
    for other in (masks_at(collator, examples, 1, 6), masks_at(collator, examples, 2, 5),
                  masks_at(DebertaMaskingCollator(TOKENIZER, whole_word_mask=whole_word_mask, seed=8), examples, 1, 5),
                  masks_at(DebertaMaskingCollator(TOKENIZER, whole_word_mask=whole_word_mask, seed=7,
                                                  process_index=1), examples, 1, 5)):
        assert not torch.equal(other, reference)


def test_evaluation_masks_are_a_stream_of_their_own():
    """Evaluation batches neither use nor move the training position, and every evaluation masks alike."""
    examples, _ = word_batch(rows=8, words=20)
    collator = DebertaMaskingCollator(TOKENIZER, seed=7)
    train_5 = masks_at(collator, examples, 0, 5)
    train_6 = collator(examples)["labels"]
    collator.start_epoch(0, 5)
    collator(examples)
    collator.begin_evaluation()
    first_evaluation = [collator(examples)["labels"] for _ in range(2)]
    collator.end_evaluation()
    assert torch.equal(collator(examples)["labels"], train_6)
    collator.begin_evaluation()
    assert all(torch.equal(collator(examples)["labels"], labels) for labels in first_evaluation)
    assert not any(torch.equal(labels, train_5[len(examples):]) for labels in first_evaluation)


def test_masking_callback_follows_trainer_positions_and_evaluations():
    """The epoch and first batch Trainer trains on (after a resume it skips the batches of the steps done), and the
    evaluation stream between a step that asks for an evaluation and on_evaluate."""
    from types import SimpleNamespace

    from transformers import TrainerControl

    examples, _ = word_batch(rows=4, words=10)
    collator = DebertaMaskingCollator(TOKENIZER, seed=3)
    callback = MaskingSeedCallback(collator)
    args = SimpleNamespace(process_index=1, gradient_accumulation_steps=2, ignore_data_skip=False,
                           dataloader_persistent_workers=False, dataloader_num_workers=0)
    control = TrainerControl()
    five_batches = [None] * 5  # 5 batches per epoch, 2 per step: 3 optimizer steps per epoch
    callback.on_train_begin(args, SimpleNamespace(global_step=4), control)
    callback.on_epoch_begin(args, SimpleNamespace(global_step=4), control, train_dataloader=five_batches)
    expected = DebertaMaskingCollator(TOKENIZER, seed=3, process_index=1)
    assert torch.equal(collator(examples)["labels"], masks_at(expected, examples, epoch=1, batch=2)[len(examples):])
    control.should_evaluate = True
    callback.on_step_end(args, SimpleNamespace(global_step=5), control)
    expected.begin_evaluation()
    assert torch.equal(collator(examples)["labels"], expected(examples)["labels"])
    callback.on_evaluate(args, SimpleNamespace(global_step=5), control)
    assert torch.equal(collator(examples)["labels"], masks_at(expected, examples, epoch=1, batch=3)[len(examples):])


# ----------------------------------------------------------------------------------------------------------------------
# Whole-word masking
# ----------------------------------------------------------------------------------------------------------------------


def test_word_start_table_marks_sentencepiece_word_starts_and_specials():
    table = word_start_table(TOKENIZER)
    assert table[:FIRST_CONTINUATION].all() and not table[FIRST_CONTINUATION:].any()


def test_whole_word_masking_masks_whole_words_at_the_word_rate():
    collator = DebertaMaskingCollator(TOKENIZER, whole_word_mask=True)
    examples, spans = word_batch(rows=96, seed=1)
    batch = collator(examples)
    original = originals(examples, batch["input_ids"].shape)
    selected_words = total_words = 0
    treatments = {"mask": 0, "kept": 0, "random": 0}
    for row, row_spans in enumerate(spans):
        for start, end in row_spans:
            labelled = batch["labels"][row, start:end] != -100
            assert labelled.all() or not labelled.any(), "a word was masked in part"
            total_words += 1
            if not labelled.any():
                continue
            selected_words += 1
            inputs, truth = batch["input_ids"][row, start:end], original[row, start:end]
            if (inputs == TOKENIZER.mask_token_id).all():
                treatments["mask"] += 1
            elif torch.equal(inputs, truth):
                treatments["kept"] += 1
            else:  # every piece of the word drawn at random (one piece may coincide with its original)
                assert not (inputs == TOKENIZER.mask_token_id).any()
                treatments["random"] += 1
    ok, detail = within(selected_words, total_words, 0.15)
    assert ok, detail
    for name, probability in (("mask", 0.8), ("random", 0.1), ("kept", 0.1)):
        ok, detail = within(treatments[name], selected_words, probability, sigmas=5.5)
        assert ok, (name, detail)


def test_whole_word_masking_treats_a_block_starting_mid_word_as_a_word():
    collator = DebertaMaskingCollator(TOKENIZER, mask_probability=0.5, whole_word_mask=True)
    continuation = [FIRST_CONTINUATION, FIRST_CONTINUATION + 1]
    rows = [{"input_ids": [TOKENIZER.cls_token_id] + continuation + [FIRST_START, FIRST_CONTINUATION + 2,
                                                                      TOKENIZER.sep_token_id]}] * 400
    labels = collator(rows)["labels"] != -100
    assert torch.equal(labels[:, 1], labels[:, 2]) and torch.equal(labels[:, 3], labels[:, 4])
    assert not labels[:, 0].any() and not labels[:, 5].any()
    assert not torch.equal(labels[:, 1], labels[:, 3])  # two words, drawn independently


def test_word_starts_agree_with_a_trained_sentencepiece_style_tokenizer():
    """With a Unigram / Metaspace tokenizer trained by the tokenizers library, the words that whole-word masking
    sees (pieces starting with "▁") are the tokenizer's own word_ids."""
    backend = Tokenizer(models.Unigram())
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    text = ["the runners were running and jumping over the jumpers", "unbelievably jumpy runners ran"] * 50
    backend.train_from_iterator(text, trainers.UnigramTrainer(vocab_size=60, special_tokens=SPECIALS,
                                                              unk_token="[UNK]"))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", cls_token="[CLS]",
                                        sep_token="[SEP]", unk_token="[UNK]", mask_token="[MASK]")
    encoding = tokenizer("the unbelievably jumpy runners were jumping", add_special_tokens=False)
    starts = word_start_table(tokenizer)[encoding["input_ids"]].tolist()
    word_ids = encoding.word_ids()
    assert len(set(word_ids)) < len(word_ids)  # some word is split into pieces
    assert starts == [i == 0 or word_ids[i] != word_ids[i - 1] for i in range(len(word_ids))]


# ----------------------------------------------------------------------------------------------------------------------
# Grouping text into blocks
# ----------------------------------------------------------------------------------------------------------------------


def test_group_texts_makes_full_cls_sep_blocks():
    texts = [list(range(10, 10 + n)) for n in (7, 3, 12, 1, 9)]  # 32 tokens
    blocks = group_texts(texts, block_size=8, cls_token_id=1, sep_token_id=2)
    assert len(blocks) == 32 // 6
    assert all(len(block) == 8 and block[0] == 1 and block[-1] == 2 for block in blocks)
    flat = [token for text in texts for token in text]
    assert [token for block in blocks for token in block[1:-1]] == flat[:len(blocks) * 6]
    assert group_texts([[5, 6]], block_size=8, cls_token_id=1, sep_token_id=2) == [[1, 5, 6, 2]]
    assert group_texts([], block_size=8, cls_token_id=1, sep_token_id=2) == []
    with pytest.raises(ValueError, match="block_size"):
        group_texts(texts, block_size=2, cls_token_id=1, sep_token_id=2)


def test_tokenize_and_group_through_datasets():
    from datasets import Dataset

    words = [f"w{i}" for i in range(NUM_STARTS)]
    lines = [" ".join(words[(i * 7 + j) % NUM_STARTS] for j in range(5 + i % 4)) for i in range(40)] + ["", "   "]
    backend = Tokenizer(models.WordLevel({**{t: i for i, t in enumerate(SPECIALS)},
                                          **{w: len(SPECIALS) + i for i, w in enumerate(words)}}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", cls_token="[CLS]",
                                        sep_token="[SEP]", unk_token="[UNK]", mask_token="[MASK]")
    grouped = tokenize_and_group(Dataset.from_dict({"text": lines}), tokenizer, max_seq_length=16)
    assert grouped.column_names == ["input_ids"]
    total = sum(len(line.split()) for line in lines)
    assert len(grouped) == total // 14
    blocks = grouped["input_ids"]
    assert all(len(b) == 16 and b[0] == tokenizer.cls_token_id and b[-1] == tokenizer.sep_token_id for b in blocks)
    expected = tokenizer(" ".join(lines).split(), is_split_into_words=True, add_special_tokens=False)["input_ids"]
    assert [t for b in blocks for t in b[1:-1]] == expected[:len(blocks) * 14]


# ----------------------------------------------------------------------------------------------------------------------
# Evaluation metrics (what the pretraining script logs)
# ----------------------------------------------------------------------------------------------------------------------


def test_rtd_metrics_reproduce_the_model_terms():
    from transformers import EvalPrediction

    torch.manual_seed(0)
    config = tiny_config(vocab_size=len(TOKENIZER))
    model = DebertaCustomForRTDPreTraining(config).eval()
    batch = DebertaMaskingCollator.for_objective(TOKENIZER, "rtd", 0.3)(word_batch(rows=6, words=12)[0])
    with torch.no_grad():
        out = model(**batch)
    metrics = PretrainingMetrics("rtd")
    outputs = tuple(v for k, v in out.items() if k != "loss")  # what Trainer.prediction_step hands over
    reduced = metrics.preprocess_logits_for_metrics(outputs, batch["labels"])
    assert reduced.shape[0] == batch["input_ids"].shape[0]
    result = metrics.compute_metrics(EvalPrediction(predictions=reduced.numpy(), label_ids=batch["labels"].numpy()))
    for name in ("mlm_loss", "rtd_loss", "generator_accuracy", "discriminator_accuracy", "replaced_fraction"):
        assert result[name] == pytest.approx(getattr(out, name).item(), abs=1e-5), name
    counted = out.rtd_labels != -100
    replaced, predicted = out.rtd_labels == 1, (out.logits > 0) & counted
    assert result["discriminator_baseline_accuracy"] == pytest.approx(1 - (replaced.sum() / counted.sum()).item())
    assert result["discriminator_recall"] == pytest.approx(((predicted & replaced).sum() / replaced.sum()).item())
    assert result["discriminator_precision"] == pytest.approx(
        ((predicted & replaced).sum() / predicted.sum().clamp(min=1)).item())
