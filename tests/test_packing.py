"""Packed batches (transformers' DataCollatorWithFlattening: input_ids [1, T], position_ids restarting at each
sequence, optionally cu_seq_lens / max_length / seq_idx): each sequence runs as it would alone (relative positions
within it, no attention across sequences), values and gradients within 1e-5 of one-by-one runs, for every head that
has a per-sequence meaning; a few Trainer steps of a masked-LM, an RTD model and a token classifier."""

import pytest
import torch
from helpers import perturb_parameters, tiny_config
from transformers import DataCollatorWithFlattening, Trainer, TrainingArguments

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
from modeling_deberta_custom.training.packing import PackedCollator, pack_documents, packed_batch_from_padded

TOLERANCE = dict(rtol=1e-5, atol=1e-5)
LENGTHS = [5, 12, 1, 9]  # 12 > position_buckets / 2: bucketed relative positions; 1: a sequence of one token
COLLATORS = {
    "position_ids": dict(),
    "flash_attn_kwargs": dict(return_flash_attn_kwargs=True),
    "seq_idx": dict(return_seq_idx=True, return_position_ids=False),
}


def make(head, seed=0, **overrides):
    torch.manual_seed(seed)
    model = head(tiny_config(**overrides))
    perturb_parameters(model, seed=seed)
    return model.eval()


def sequences(vocab_size, lengths=LENGTHS, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(5, vocab_size, (n,), generator=generator).tolist() for n in lengths]


def packed(features, collator="flash_attn_kwargs"):
    batch = DataCollatorWithFlattening(**COLLATORS[collator])(features)
    batch.pop("labels")  # the collator always writes labels (shifted inputs without any)
    return batch


def one_by_one(model, ids_list, weights, **extra):
    """Each sequence alone ([1, n], no mask): outputs and the gradient of sum(output * weights)."""
    outputs = []
    for ids, weight in zip(ids_list, weights, strict=True):
        output = model(input_ids=torch.tensor([ids]), **extra)
        outputs.append(output)
        (output[0] * weight).sum().backward()
    return outputs


def gradients(model):
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return grads


@pytest.fixture(params=["one_group", "groups"])
def grouping(request, monkeypatch):
    """Attention on CPU runs by groups of sequences of similar length: with no cost per group, one group per length."""
    if request.param == "groups":
        for name in ("TRAINING_GROUP_COSTS", "INFERENCE_GROUP_COSTS"):
            monkeypatch.setattr(padding, name, (0, getattr(padding, name)[1]))
    return request.param


@pytest.mark.parametrize("collator", sorted(COLLATORS))
@pytest.mark.parametrize("variant", ["v3", "v1_conv"])
def test_packed_sequences_equal_one_by_one_runs(variant, collator, grouping):
    """Hidden states and their gradients (through sum(h * w) with fixed random w) of every token."""
    overrides = {} if variant == "v3" else dict(
        attention_variant="v1", position_buckets=-1, share_att_key=False, norm_rel_ebd="none",
        max_relative_positions=6, position_biased_input=True, conv_kernel_size=3, conv_act="gelu")
    model = make(DebertaCustomModel, **overrides)
    ids_list = sequences(model.config.vocab_size)
    weights = [torch.randn(1, n, model.config.hidden_size) for n in LENGTHS]
    expected = one_by_one(model, ids_list, weights)
    expected_grads = gradients(model)

    batch = packed([{"input_ids": ids} for ids in ids_list], collator)
    output = model(**batch)
    assert output.last_hidden_state.shape == (1, sum(LENGTHS), model.config.hidden_size)
    (output.last_hidden_state * torch.cat(weights, dim=1)).sum().backward()
    pieces = output.last_hidden_state[0].split(LENGTHS)
    for piece, alone in zip(pieces, expected, strict=True):
        torch.testing.assert_close(piece, alone.last_hidden_state[0], **TOLERANCE)
    grads = gradients(model)
    assert grads.keys() == expected_grads.keys()
    for name, gradient in expected_grads.items():
        torch.testing.assert_close(grads[name], gradient, **TOLERANCE, msg=name)


def test_no_attention_across_sequences():
    """Changing one sequence changes no other (a wrong grid index would let them mix)."""
    model = make(DebertaCustomModel)
    ids_list = sequences(model.config.vocab_size)
    before = model(**packed([{"input_ids": ids} for ids in ids_list])).last_hidden_state[0].split(LENGTHS)
    ids_list[1] = sequences(model.config.vocab_size, [12], seed=5)[0]
    after = model(**packed([{"input_ids": ids} for ids in ids_list])).last_hidden_state[0].split(LENGTHS)
    for i in (0, 2, 3):
        torch.testing.assert_close(after[i], before[i], rtol=0, atol=0)
    assert not torch.allclose(after[1], before[1])


TOKEN_HEADS = [
    (DebertaCustomForTokenClassification, dict(num_labels=3)),
    (DebertaCustomForMaskedLM, {}),  # the Enhanced Mask Decoder: absolute positions restart with each sequence
    (DebertaCustomForReplacedTokenDetection, {}),  # LayerNorm(h + h[CLS]): each sequence's own first token
]


@pytest.mark.parametrize("head,overrides", TOKEN_HEADS, ids=[head.__name__ for head, _ in TOKEN_HEADS])
def test_token_heads_answer_per_token(head, overrides, grouping):
    model = make(head, **overrides)
    ids_list = sequences(model.config.vocab_size)
    with torch.no_grad():
        expected = torch.cat([model(input_ids=torch.tensor([ids])).logits for ids in ids_list], dim=1)
        for collator in COLLATORS:
            logits = model(**packed([{"input_ids": ids} for ids in ids_list], collator)).logits
            torch.testing.assert_close(logits, expected, **TOLERANCE)


def test_token_losses_equal_the_padded_batch():
    """Masked-LM (EMD, sparse logits in training) and token classification: the loss of the packed batch is the loss
    of the same sequences right-padded, gradients too."""
    for head in (DebertaCustomForMaskedLM, DebertaCustomForTokenClassification):
        model = make(head, num_labels=3).train()
        ids_list = sequences(model.config.vocab_size)
        generator = torch.Generator().manual_seed(1)
        labels = [[ids[i] if head is DebertaCustomForMaskedLM else i % 3 if torch.rand(1, generator=generator) < 0.5
                   else -100 for i in range(len(ids))] for ids in ids_list]
        padded = torch.nn.utils.rnn.pad_sequence
        batch = {"input_ids": padded([torch.tensor(x) for x in ids_list], batch_first=True),
                 "labels": padded([torch.tensor(x) for x in labels], batch_first=True, padding_value=-100),
                 "attention_mask": padded([torch.ones(len(x), dtype=torch.long) for x in ids_list], batch_first=True)}
        model.config.sparse_mlm_max_fraction = 1.0
        expected = model(**batch).loss
        expected.backward()
        expected_grads = gradients(model)
        loss = model(**packed_batch_from_padded(batch)).loss
        loss.backward()
        torch.testing.assert_close(loss, expected, **TOLERANCE)
        for name, gradient in gradients(model).items():
            torch.testing.assert_close(gradient, expected_grads[name], **TOLERANCE, msg=name)


def test_sequence_classification_answers_per_sequence(grouping):
    """Logits [S, num_labels], one row per packed sequence (its first token pooled); labels [S]."""
    model = make(DebertaCustomForSequenceClassification, num_labels=3).train()
    ids_list = sequences(model.config.vocab_size)
    labels = torch.tensor([0, 2, 1, 2])
    expected = torch.cat([model(input_ids=torch.tensor([ids])).logits for ids in ids_list])
    expected_loss = torch.nn.functional.cross_entropy(expected, labels)
    expected_loss.backward()
    expected_grads = gradients(model)
    for collator in COLLATORS:
        output = model(**packed([{"input_ids": ids} for ids in ids_list], collator), labels=labels)
        torch.testing.assert_close(output.logits, expected, **TOLERANCE)
        torch.testing.assert_close(output.loss, expected_loss, **TOLERANCE)
        output.loss.backward()
        for name, gradient in gradients(model).items():
            torch.testing.assert_close(gradient, expected_grads[name], **TOLERANCE, msg=name)
    with pytest.raises(ValueError, match="one label per packed sequence"):
        model(**packed([{"input_ids": ids} for ids in ids_list]), labels=labels[:3])
    # A padded classification batch packed as it is: its labels stay one per sequence.
    padded = torch.nn.utils.rnn.pad_sequence
    batch = {"input_ids": padded([torch.tensor(x) for x in ids_list], batch_first=True), "labels": labels,
             "attention_mask": padded([torch.ones(len(x), dtype=torch.long) for x in ids_list], batch_first=True)}
    output = model(**packed_batch_from_padded(batch))
    torch.testing.assert_close(output.logits, expected, **TOLERANCE)
    torch.testing.assert_close(output.loss, expected_loss, **TOLERANCE)


def test_question_answering_answers_per_sequence(grouping):
    """Start/end logits per token ([1, T]); the span loss runs over each sequence's own tokens, with positions
    counted from the sequence's first token."""
    model = make(DebertaCustomForQuestionAnswering, num_labels=2)
    ids_list = sequences(model.config.vocab_size)
    starts, ends = torch.tensor([1, 3, 0, 8]), torch.tensor([4, 11, 0, 8])
    expected_loss = 0
    expected_start = []
    for ids, start, end in zip(ids_list, starts, ends, strict=True):
        output = model(input_ids=torch.tensor([ids]), start_positions=start[None], end_positions=end[None])
        expected_loss = expected_loss + output.loss / len(ids_list)
        expected_start.append(output.start_logits)
    output = model(**packed([{"input_ids": ids} for ids in ids_list]), start_positions=starts, end_positions=ends)
    torch.testing.assert_close(output.start_logits, torch.cat(expected_start, dim=1), **TOLERANCE)
    torch.testing.assert_close(output.loss, expected_loss, **TOLERANCE)


def test_multiple_choice_refuses_packed_batches():
    model = make(DebertaCustomForMultipleChoice)
    batch = packed([{"input_ids": ids} for ids in sequences(model.config.vocab_size)])
    with pytest.raises(ValueError, match="packed"):
        model(**batch)


def test_rtd_pretraining_packed_equals_padded(grouping):
    """Generator (EMD) and discriminator on a packed batch: the losses of the same sequences right-padded."""
    model = make(DebertaCustomForRTDPreTraining).train()
    ids_list = sequences(model.config.vocab_size)
    padded = torch.nn.utils.rnn.pad_sequence
    input_ids = padded([torch.tensor(x) for x in ids_list], batch_first=True)
    mask = padded([torch.ones(len(x), dtype=torch.long) for x in ids_list], batch_first=True)
    labels = torch.where((torch.arange(input_ids.shape[1]) % 3 == 1) & mask.bool(), input_ids, -100)
    batch = dict(input_ids=input_ids.masked_fill(labels != -100, 4), attention_mask=mask, labels=labels)
    model.config.sparse_mlm_max_fraction = 1.0
    torch.manual_seed(0)
    expected = model(**batch)
    torch.manual_seed(0)
    output = model(**packed_batch_from_padded(batch))
    for name in ("mlm_loss", "rtd_loss", "loss"):
        torch.testing.assert_close(output[name], expected[name], **TOLERANCE, msg=name)
    torch.testing.assert_close(output.logits[0], expected.logits[mask.bool()], **TOLERANCE)


def test_pack_documents_keeps_documents_apart():
    """Blocks of several documents; PackedCollator splits them again, so each document attends only to itself."""
    documents = [[5] * 5, [6, 7] * 4 + [8], [9, 10] * 2, [11] * 13]
    blocks = pack_documents(documents, block_size=10)
    assert [len(b["input_ids"]) for b in blocks] == [9, 9, 10, 3]  # first fit; the 13-token document is cut
    assert blocks[0]["position_ids"] == [0, 1, 2, 3, 4, 0, 1, 2, 3]  # documents 1 and 3 share the first block
    model = make(DebertaCustomModel)
    batch = PackedCollator(_right_padded)(blocks[:2])
    assert batch["cu_seq_lens_q"].tolist() == [0, 5, 9, 18] and batch["max_length_q"] == 9
    batch.pop("labels")
    output = model(**batch).last_hidden_state[0]
    expected = torch.cat([model(input_ids=torch.tensor([ids])).last_hidden_state[0]
                          for ids in (documents[0], documents[2], documents[1])])
    torch.testing.assert_close(output, expected, **TOLERANCE)


def _right_padded(rows):
    ids = [torch.tensor(r["input_ids"]) for r in rows]
    input_ids = torch.nn.utils.rnn.pad_sequence(ids, batch_first=True)
    mask = torch.nn.utils.rnn.pad_sequence([torch.ones(len(x), dtype=torch.long) for x in ids], batch_first=True)
    return {"input_ids": input_ids, "attention_mask": mask, "labels": input_ids.masked_fill(mask == 0, -100)}


def _trainer_run(model, dataset, collator, tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-3,
                             report_to=[], use_cpu=True, logging_steps=1, save_strategy="no", disable_tqdm=True)
    before = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator).train()
    changed = [name for name, p in model.named_parameters() if name in before and not torch.equal(p, before[name])]
    assert changed, "training changed no weight"
    return model


@pytest.mark.parametrize("head", [DebertaCustomForMaskedLM, DebertaCustomForRTDPreTraining,
                                  DebertaCustomForTokenClassification], ids=lambda head: head.__name__)
def test_trainer_trains_on_flattened_batches(head, tmp_path):
    """The unchanged Trainer with DataCollatorWithFlattening over pre-masked examples (masked-LM, RTD) or token
    labels; the model must see packed batches (checked with a forward pre-hook)."""
    model = make(head, num_labels=3, sparse_mlm_max_fraction=0.5).train()  # 30% masked below
    generator = torch.Generator().manual_seed(0)
    examples = []
    for ids in sequences(model.config.vocab_size, [7, 12, 3, 9, 11, 5, 8, 10], seed=1):
        if head is DebertaCustomForTokenClassification:
            labels = torch.randint(0, 3, (len(ids),), generator=generator).tolist()
        else:
            chosen = (torch.rand(len(ids), generator=generator) < 0.3).tolist()
            chosen[1] = True
            labels = [token if pick else -100 for token, pick in zip(ids, chosen, strict=True)]
            ids = [4 if pick else token for token, pick in zip(ids, chosen, strict=True)]
        examples.append({"input_ids": ids, "labels": labels})
    shapes = []
    model.register_forward_pre_hook(lambda m, args, kwargs: shapes.append(kwargs["input_ids"].shape), with_kwargs=True)
    _trainer_run(model, examples, DataCollatorWithFlattening(return_flash_attn_kwargs=True), tmp_path)
    assert shapes and all(shape[0] == 1 for shape in shapes)


def test_pretrain_script_packs_documents(tmp_path):
    """scripts/pretrain.py --pack_documents: blocks of whole documents, packed batches, RTD training and evaluation."""
    import json
    import os
    import subprocess
    import sys

    from helpers import REPO_ROOT
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    words = "the king and queen walked through the garden where roses were growing in the morning light".split()
    generator = torch.Generator().manual_seed(0)
    lines = [" ".join(words[int(i)] for i in torch.randint(len(words), (int(n),), generator=generator))
             for n in torch.randint(3, 40, (60,), generator=generator)]
    (tmp_path / "train.txt").write_text("\n".join(lines) + "\n")
    backend = Tokenizer(models.Unigram())
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    specials = ["[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]"]
    backend.train_from_iterator(lines, trainers.UnigramTrainer(vocab_size=60, special_tokens=specials,
                                                               unk_token="[UNK]"))
    backend.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 1),
                                                                                                    ("[SEP]", 2)])
    PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
                            unk_token="[UNK]", mask_token="[MASK]").save_pretrained(tmp_path / "tokenizer")
    command = [sys.executable, str(REPO_ROOT / "scripts" / "pretrain.py"), "--model_preset", "tiny", "--objective",
               "rtd", "--pack_documents", "--tokenizer", str(tmp_path / "tokenizer"), "--train_files",
               str(tmp_path / "train.txt"), "--validation_split_percentage", "10", "--max_seq_length", "64",
               "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "4", "--max_steps", "2",
               "--eval_strategy", "steps", "--eval_steps", "2", "--logging_steps", "1", "--use_cpu", "--report_to", "none",
               "--disable_tqdm", "true", "--dataloader_num_workers", "0", "--output_dir", str(tmp_path / "out")]
    env = dict(os.environ, HF_DATASETS_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false")
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    terms = json.loads((tmp_path / "out" / "pretraining_summary.json").read_text())["terms"]
    assert {"train_mlm_loss", "train_rtd_loss", "eval_mlm_loss", "eval_rtd_loss"} <= set(terms)
