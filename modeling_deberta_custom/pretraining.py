"""Pretraining data and bookkeeping: tokenizers, text grouping, masking collators, metrics and logging of loss terms.

Training-only code: the modeling files never import it, and it is not copied next to saved weights.

  * `spm_tokenizer` / `write_spm_tokenizer_folder` / `load_pretraining_tokenizer`: a SentencePiece `spm.model`
    (the official DeBERTa-v3 one) as a transformers fast tokenizer that reproduces SentencePiece's ids exactly.
  * `save_tokenizer` / `make_tokenizer_portable` / `PortableTokenizerCallback`: tokenizer folders (ours, and those
    the Trainer writes) that AutoTokenizer loads under transformers 4.x as well as 5.x.
  * `group_texts` / `tokenize_and_group`: plain text -> blocks of exactly max_seq_length tokens, [CLS] ... [SEP].
  * `DebertaMaskingCollator`: masked-LM masking (80/10/10 by default), optionally of whole words, for the masked-LM
    objective and for the generator of replaced-token detection; `MaskingSeedCallback` keeps its masks reproducible
    across an interrupted and resumed training run.
  * `PretrainingMetrics` (evaluation) and `LossTermsCallback` (training logs): the loss terms and accuracies.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass, field, fields
from itertools import chain

import numpy as np
import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerBase, TrainerCallback
from transformers.utils import logging

from .losses import sparse_prediction_positions

logger = logging.get_logger(__name__)

SPM_SPECIAL_TOKENS = dict(pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]", unk_token="[UNK]",
                          mask_token="[MASK]", bos_token="[CLS]", eos_token="[SEP]")
WORD_START_MARKERS = ("\u2581", "\u0120")  # SentencePiece "▁" and byte-level BPE "Ġ"


# ----------------------------------------------------------------------------------------------------------------------
# Tokenizers
# ----------------------------------------------------------------------------------------------------------------------


def spm_tokenizer(spm_path, model_max_length: int = 512):
    """A transformers fast tokenizer equivalent to the SentencePiece model at `spm_path` (DeBERTa-v3 layout: [PAD],
    [CLS], [SEP], [UNK] at ids 0-3; [MASK] added after the pieces, id 128000 for the official model).

    Built here rather than by transformers' DeBERTa-v2 converter because that converter drops SentencePiece's byte
    fallback (4.57 warns so) and, in transformers 5.x, also its normaliser (the model's precompiled NFKC map): '…',
    emoji and other characters then become [UNK] or different ids. This conversion keeps both, and matches `sentencepiece` itself
    id for id (tests/test_tokenizer_official.py)."""
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import Unigram
    from transformers import PreTrainedTokenizerFast

    proto = sentencepiece_model_pb2.ModelProto()
    with open(spm_path, "rb") as handle:
        proto.ParseFromString(handle.read())
    if proto.trainer_spec.model_type != sentencepiece_model_pb2.TrainerSpec.UNIGRAM:
        raise ValueError(f"{spm_path} is not a Unigram SentencePiece model (DeBERTa-v3's is)")
    vocab = [(piece.piece, piece.score) for piece in proto.pieces]
    unknown = [i for i, piece in enumerate(proto.pieces) if piece.type == sentencepiece_model_pb2.ModelProto.SentencePiece.UNKNOWN]
    tokenizer = Tokenizer(Unigram(vocab, unk_id=unknown[0] if unknown else None,
                                  byte_fallback=proto.trainer_spec.byte_fallback))
    spec = proto.normalizer_spec
    steps = []
    if spec.remove_extra_whitespaces:
        steps.append(normalizers.Strip())
    if spec.precompiled_charsmap:
        steps.append(normalizers.Precompiled(spec.precompiled_charsmap))
    if spec.remove_extra_whitespaces:
        steps.append(normalizers.Replace(Regex(" {2,}"), " "))
    tokenizer.normalizer = normalizers.Sequence(steps)
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="\u2581", prepend_scheme="always" if spec.add_dummy_prefix else "never"
    )
    tokenizer.decoder = decoders.Sequence([
        decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0),
    ])
    specials = [SPM_SPECIAL_TOKENS[name] for name in ("pad_token", "cls_token", "sep_token", "unk_token", "mask_token")]
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in specials])
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS]:0 $A:0 [SEP]:0",
        pair="[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, model_max_length=model_max_length,
        model_input_names=["input_ids", "token_type_ids", "attention_mask"], **SPM_SPECIAL_TOKENS,
    )


def make_tokenizer_portable(folder) -> None:
    """Rewrite the tokenizer_config.json in `folder` so that transformers 4.x loads it too: transformers 5 writes its
    class name `TokenizersBackend`, which 4.x lacks; both load the old name `PreTrainedTokenizerFast`. Other classes
    (DebertaV2Tokenizer, ...) and folders without a tokenizer are left as they are."""
    config_file = os.path.join(folder, "tokenizer_config.json")
    if not os.path.isfile(config_file):
        return
    with open(config_file, encoding="utf-8") as handle:
        tokenizer_config = json.load(handle)
    if tokenizer_config.get("tokenizer_class") != "TokenizersBackend":
        return
    tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    with open(config_file, "w", encoding="utf-8") as handle:
        handle.write(json.dumps(tokenizer_config, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def save_tokenizer(tokenizer, folder) -> str:
    """`tokenizer.save_pretrained(folder)`, loadable by AutoTokenizer under transformers 4.x and 5.x."""
    tokenizer.save_pretrained(folder)
    make_tokenizer_portable(folder)
    return str(folder)


class PortableTokenizerCallback(TrainerCallback):
    """Makes the tokenizer in each Trainer checkpoint portable (`make_tokenizer_portable`); the Trainer saves it there
    through `processing_class.save_pretrained`. For `trainer.save_model()` call `make_tokenizer_portable` after it."""

    def on_save(self, args, state, control, **kwargs):
        if args.should_save:
            make_tokenizer_portable(os.path.join(args.output_dir, f"checkpoint-{state.global_step}"))


def write_spm_tokenizer_folder(spm_path, folder, model_max_length: int = 512) -> str:
    """Save `spm_tokenizer(spm_path)` to `folder` (tokenizer.json, tokenizer_config.json, plus a copy of spm.model) so
    that `AutoTokenizer.from_pretrained(folder)` loads it, in transformers 4.x and 5.x alike."""
    save_tokenizer(spm_tokenizer(spm_path, model_max_length=model_max_length), folder)
    if os.path.abspath(os.path.join(folder, "spm.model")) != os.path.abspath(spm_path):
        shutil.copyfile(spm_path, os.path.join(folder, "spm.model"))
    return str(folder)


def load_pretraining_tokenizer(path):
    """A tokenizer from `path`: an `spm.model` file, a folder holding one without a tokenizer.json (the official
    DeBERTa-v3 layout; converted with `spm_tokenizer`), or any folder AutoTokenizer loads (e.g. the output of
    scripts/train_tokenizer.py, or one written by `write_spm_tokenizer_folder`)."""
    from transformers import AutoTokenizer

    path = os.fspath(path)
    if os.path.isfile(path) and path.endswith(".model"):
        return spm_tokenizer(path)
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, "tokenizer.json")):
        spm_file = os.path.join(path, "spm.model")
        if os.path.exists(spm_file):
            return spm_tokenizer(spm_file)
    return AutoTokenizer.from_pretrained(path)


def special_token_ids(tokenizer) -> list[int]:
    return sorted({int(i) for i in tokenizer.all_special_ids if i is not None})


# ----------------------------------------------------------------------------------------------------------------------
# Text -> blocks
# ----------------------------------------------------------------------------------------------------------------------


def group_texts(token_lists, block_size: int, cls_token_id: int, sep_token_id: int) -> list[list[int]]:
    """Concatenate tokenized texts and cut them into blocks of exactly `block_size` tokens: [CLS] + block_size - 2
    tokens + [SEP]. The remainder shorter than a block is dropped (as transformers' run_mlm does), unless the texts
    hold less than one block, which then becomes one shorter block."""
    if block_size < 3:
        raise ValueError(f"block_size must be at least 3 ([CLS], one token, [SEP]), got {block_size}")
    body = block_size - 2
    tokens = list(chain.from_iterable(token_lists))
    count = len(tokens) // body
    chunks = [tokens[i * body:(i + 1) * body] for i in range(count)]
    if count == 0 and tokens:
        chunks = [tokens]
    return [[cls_token_id] + chunk + [sep_token_id] for chunk in chunks]


def tokenize_and_group(dataset, tokenizer, max_seq_length: int, num_proc: int | None = None,
                       text_column: str = "text", batch_size: int = 1000):
    """A `datasets` Dataset (or DatasetDict) of raw text lines -> one of `input_ids` blocks of max_seq_length tokens.
    Empty lines are skipped; texts are concatenated across lines within each map batch of `batch_size` lines."""
    cls_id, sep_id = tokenizer.cls_token_id, tokenizer.sep_token_id
    if cls_id is None or sep_id is None:
        raise ValueError("The tokenizer needs [CLS] and [SEP] tokens to frame blocks")

    def tokenize(batch):
        texts = [text for text in batch[text_column] if text and text.strip()]
        ids = tokenizer(texts, add_special_tokens=False, return_attention_mask=False,
                        return_token_type_ids=False)["input_ids"] if texts else []
        return {"input_ids": group_texts(ids, max_seq_length, cls_id, sep_id)}

    columns = next(iter(dataset.values())).column_names if hasattr(dataset, "values") else dataset.column_names
    return dataset.map(tokenize, batched=True, batch_size=batch_size, num_proc=num_proc, remove_columns=columns,
                       desc=f"Tokenizing and grouping into blocks of {max_seq_length}")


# ----------------------------------------------------------------------------------------------------------------------
# Masking
# ----------------------------------------------------------------------------------------------------------------------


def word_start_table(tokenizer) -> torch.Tensor:
    """[len(tokenizer)] bool: whether each id begins a word. SentencePiece / byte-level BPE pieces begin a word when
    they carry the word-boundary marker ("▁" / "Ġ"); WordPiece vocabularies (with "##" continuations) begin one unless
    the piece starts with "##". Special tokens are words of their own."""
    size = len(tokenizer)
    pieces = tokenizer.convert_ids_to_tokens(list(range(size)))
    pieces = ["" if piece is None else piece for piece in pieces]
    if not any(piece.startswith(WORD_START_MARKERS) for piece in pieces) and any(p.startswith("##") for p in pieces):
        starts = [not piece.startswith("##") for piece in pieces]
    else:
        starts = [piece.startswith(WORD_START_MARKERS) for piece in pieces]
    table = torch.tensor(starts, dtype=torch.bool)
    table[special_token_ids(tokenizer)] = True
    return table


@dataclass
class DebertaMaskingCollator:
    """Pads examples (dicts with `input_ids`) into a batch and masks it for masked-LM training.

    Each eligible token (not special, not padding) is selected with probability `mask_probability` (or each whole
    word, with `whole_word_mask`). Selected positions get `labels` = the original id (-100 elsewhere); their input
    becomes [MASK] with probability `mask_replace_prob`, a random non-special token with `random_replace_prob`, and
    stays as it is otherwise. BERT's and DeBERTa's masked-LM recipe is 0.15 / 0.8 / 0.1; the original DeBERTa-v3 RTD
    recipe masks every selected token (1.0 / 0.0), see `for_objective`.

    Whole-word masking: a word is a token that begins a word (see `word_start_table`) plus the continuation pieces
    after it; words are selected with probability `mask_probability` and all their pieces share one decision
    ([MASK], random or kept), so no word is left half visible. A block that starts in the middle of a word treats the
    leading pieces as a word.

    Randomness: every batch is masked with a fresh torch.Generator seeded from (`seed`, `process_index`, stream,
    epoch, batch index), never from torch's global generator. The masks of a batch therefore depend only on where it
    stands in training, not on when it is collated: Trainer (through accelerate) collates one batch ahead and restores
    the global generator of a checkpoint only after that, and evaluation collates its own batches in between.
    The position advances by one per call (by the number of workers inside a DataLoader worker, since DataLoader
    hands batches to its workers in turn). Training and evaluation are separate streams: `start_epoch` sets the
    training position (epoch, first batch), `begin_evaluation` switches to an evaluation stream started afresh (so
    every evaluation masks its data alike), `end_evaluation` switches back with the training position untouched.
    `MaskingSeedCallback` drives all three from Trainer's state. Used on its own, a collator masks successive calls
    as successive training batches of epoch 0."""

    STREAMS = ("train", "eval")  # not a field: the streams' ids in the seed key

    tokenizer: PreTrainedTokenizerBase
    mask_probability: float = 0.15
    mask_replace_prob: float = 0.8
    random_replace_prob: float = 0.1
    whole_word_mask: bool = False
    pad_to_multiple_of: int | None = None
    seed: int = 0
    process_index: int = 0
    _stream: str = field(init=False, repr=False, default="train")
    _positions: dict = field(init=False, repr=False)  # stream -> [epoch, index of the next batch]
    _special_ids: torch.Tensor = field(init=False, repr=False)
    _random_candidates: torch.Tensor = field(init=False, repr=False)
    _word_starts: torch.Tensor | None = field(init=False, repr=False, default=None)

    def __post_init__(self):
        if not 0.0 < self.mask_probability < 1.0:
            raise ValueError(f"mask_probability must be in (0, 1), got {self.mask_probability}")
        if min(self.mask_replace_prob, self.random_replace_prob) < 0 or self.mask_replace_prob + self.random_replace_prob > 1:
            raise ValueError("mask_replace_prob and random_replace_prob must be non-negative and sum to at most 1, got "
                             f"{self.mask_replace_prob} and {self.random_replace_prob}")
        if self.tokenizer.mask_token_id is None and self.mask_replace_prob > 0:
            raise ValueError("The tokenizer has no mask token")
        if self.tokenizer.pad_token_id is None:
            raise ValueError("The tokenizer has no padding token")
        if self.seed < 0:
            raise ValueError(f"seed must be non-negative, got {self.seed}")
        self._positions = {"train": [0, 0], "eval": [0, 0]}
        self._special_ids = torch.tensor(special_token_ids(self.tokenizer), dtype=torch.long)
        vocabulary = torch.arange(len(self.tokenizer))
        self._random_candidates = vocabulary[~torch.isin(vocabulary, self._special_ids)]
        if self.whole_word_mask:
            self._word_starts = word_start_table(self.tokenizer)

    @classmethod
    def for_objective(cls, tokenizer, objective: str, mask_probability: float, whole_word_mask: bool = False,
                      mask_replace_prob: float | None = None, random_replace_prob: float | None = None, **kwargs):
        """The masking recipe of each objective, unless overridden: mlm 80/10/10 (BERT, DeBERTa MLM), rtd 100/0/0
        (every selected token becomes [MASK] for the generator, as the original DeBERTa-v3 RTD task and ELECTRA)."""
        defaults = {"mlm": (0.8, 0.1), "rtd": (1.0, 0.0)}
        if objective not in defaults:
            raise ValueError(f"objective must be one of {sorted(defaults)}, got {objective!r}")
        default_mask, default_random = defaults[objective]
        return cls(tokenizer, mask_probability=mask_probability, whole_word_mask=whole_word_mask,
                   mask_replace_prob=default_mask if mask_replace_prob is None else mask_replace_prob,
                   random_replace_prob=default_random if random_replace_prob is None else random_replace_prob, **kwargs)

    def __call__(self, examples) -> dict:
        rows = [example["input_ids"] for example in examples]
        rows = [row.tolist() if isinstance(row, torch.Tensor) else list(row) for row in rows]
        length = max(len(row) for row in rows)
        if self.pad_to_multiple_of:
            length = math.ceil(length / self.pad_to_multiple_of) * self.pad_to_multiple_of
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((len(rows), length), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
            attention_mask[i, :len(row)] = 1
        input_ids, labels = self.mask_tokens(input_ids, attention_mask, generator=self._next_batch_generator())
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    def start_epoch(self, epoch: int, first_batch: int = 0):
        """Mask the coming batches as training batches `first_batch`, `first_batch` + 1, ... of epoch `epoch`."""
        self._positions["train"] = [epoch, first_batch]
        self._stream = "train"

    def begin_evaluation(self):
        """Mask the coming batches from the start of the evaluation stream; the training position is kept."""
        self._positions["eval"] = [0, 0]
        self._stream = "eval"

    def end_evaluation(self):
        """Back to the training stream, at the training batch that follows the last one masked."""
        self._stream = "train"

    def _next_batch_generator(self) -> torch.Generator:
        position = self._positions[self._stream]
        epoch, batch = position
        worker = torch.utils.data.get_worker_info()
        if worker is None:
            position[1] += 1
        else:  # this worker's copy of the collator gets batches worker.id, worker.id + num_workers, ...
            batch += worker.id
            position[1] += worker.num_workers
        key = [self.seed, self.process_index, self.STREAMS.index(self._stream), epoch, batch]
        seed = np.random.SeedSequence(key).generate_state(1, dtype=np.uint64)[0]  # mixes the key into 64 bits
        return torch.Generator().manual_seed(int(seed))

    def eligible(self, input_ids, attention_mask) -> torch.Tensor:
        """[B, N] bool: tokens that may be masked (not special, not padding)."""
        return attention_mask.bool() & ~torch.isin(input_ids, self._special_ids)

    def mask_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    generator: torch.Generator | None = None):
        """Returns (masked input_ids, labels), drawn from `generator` (torch's global one if None); the input tensor
        is not modified."""
        eligible = self.eligible(input_ids, attention_mask)
        if self.whole_word_mask:
            # Word index of every token: a new word at each word-start piece, at each ineligible token and at the
            # start of each row; one draw per word, broadcast to its pieces.
            starts = self._word_starts.to(input_ids.device)[input_ids.clamp(0, len(self._word_starts) - 1)]
            starts = starts | ~eligible
            starts[:, 0] = True
            word_index = starts.flatten().long().cumsum(0).view_as(input_ids) - 1  # [B, N]
            num_words = int(word_index.max()) + 1
            selected = (torch.rand(num_words, generator=generator) < self.mask_probability)[word_index] & eligible
            decision = torch.rand(num_words, generator=generator)[word_index]
        else:
            selected = (torch.rand(input_ids.shape, generator=generator) < self.mask_probability) & eligible
            decision = torch.rand(input_ids.shape, generator=generator)
        labels = torch.where(selected, input_ids, torch.full_like(input_ids, -100))
        to_mask = selected & (decision < self.mask_replace_prob)
        to_random = selected & (decision >= self.mask_replace_prob) & (
            decision < self.mask_replace_prob + self.random_replace_prob)
        masked = input_ids.clone()
        if self.mask_replace_prob > 0:
            masked[to_mask] = self.tokenizer.mask_token_id
        if to_random.any():
            picks = torch.randint(len(self._random_candidates), (int(to_random.sum()),), generator=generator)
            masked[to_random] = self._random_candidates[picks]
        return masked, labels


class MaskingSeedCallback(TrainerCallback):
    """Keeps the masks of a `DebertaMaskingCollator` in step with Trainer's state, so that a run resumed from a
    checkpoint masks every later batch exactly as the uninterrupted run does, and evaluations leave training masks
    alone. Install it with `trainer.add_callback(MaskingSeedCallback(collator))`, after Trainer's own callbacks.

      * on_epoch_begin: the training position. Trainer is at step global_step; with S optimizer steps per epoch
        (ceil(batches / gradient_accumulation_steps)) this is epoch global_step // S, whose first
        (global_step % S) * gradient_accumulation_steps batches Trainer skips after a resume. It skips them in the
        batch sampler (map-style datasets), so the collator never sees them: its first batch is the next one.
        The process index goes into the seed, so that the processes of a distributed run mask differently.
      * Evaluation: Trainer evaluates right after an on_step_end or on_epoch_end that leaves control.should_evaluate
        set, and reports on_evaluate when done; the batches in between are evaluation batches (the training batch
        collated ahead was collated before on_step_end). Before the first epoch (eval_on_start) and after training
        the collator is in its evaluation stream too, started afresh for each evaluation.

    Not exact with dataloader_persistent_workers (workers then keep the collator they copied in the first epoch) nor
    with dataloader_in_order=False (batches then go to workers out of turn); masks still differ from batch to batch."""

    def __init__(self, collator: DebertaMaskingCollator):
        self.collator = collator
        self._evaluating_mid_training = False

    def on_train_begin(self, args, state, control, **kwargs):
        self.collator.process_index = args.process_index
        self.collator.begin_evaluation()
        if args.dataloader_persistent_workers and args.dataloader_num_workers > 0:
            logger.warning("With dataloader_persistent_workers, masks after a resume differ from an uninterrupted run")

    def on_epoch_begin(self, args, state, control, train_dataloader=None, **kwargs):
        accumulation = args.gradient_accumulation_steps
        try:
            steps_per_epoch = max(math.ceil(len(train_dataloader) / accumulation), 1)
        except TypeError:  # no length (an iterable dataset): one endless epoch, skipped batches are collated too
            self.collator.start_epoch(0, 0)
            return
        epoch, step = divmod(state.global_step, steps_per_epoch)
        self.collator.start_epoch(epoch, 0 if args.ignore_data_skip else step * accumulation)

    def _begin_evaluation_if_due(self, control):
        if control.should_evaluate:
            self.collator.begin_evaluation()
            self._evaluating_mid_training = True

    def on_step_end(self, args, state, control, **kwargs):
        self._begin_evaluation_if_due(control)

    def on_epoch_end(self, args, state, control, **kwargs):
        self._begin_evaluation_if_due(control)

    def on_evaluate(self, args, state, control, **kwargs):
        if self._evaluating_mid_training:
            self.collator.end_evaluation()
            self._evaluating_mid_training = False
        else:  # an evaluation outside training: the next one starts the evaluation stream afresh as well
            self.collator.begin_evaluation()

    def on_train_end(self, args, state, control, **kwargs):
        self.collator.begin_evaluation()


# ----------------------------------------------------------------------------------------------------------------------
# Evaluation metrics and training logs
# ----------------------------------------------------------------------------------------------------------------------


def _per_sample_sum(values: torch.Tensor, rows: torch.Tensor, batch: int) -> torch.Tensor:
    return torch.zeros(batch, dtype=torch.float64, device=values.device).index_add_(0, rows, values.double())


class PretrainingMetrics:
    """`preprocess_logits_for_metrics` and `compute_metrics` for transformers.Trainer, for objective "mlm"
    (DebertaCustomForMaskedLM) or "rtd" (DebertaCustomForRTDPreTraining).

    Each evaluation batch is reduced, per sample, to sums and counts (so that nothing vocabulary-sized is kept and
    the distributed gather drops duplicated samples exactly); compute_metrics turns the totals into
    mlm_loss / generator_accuracy (mlm_accuracy for "mlm") and, for rtd, rtd_loss / discriminator_accuracy (with
    the all-"original" baseline it has to beat, and precision / recall on replaced tokens) / replaced_fraction,
    weighted by token counts."""

    MLM_COLUMNS = ("mlm_loss_sum", "masked_tokens", "generator_correct")
    RTD_COLUMNS = MLM_COLUMNS + ("rtd_loss_sum", "rtd_tokens", "discriminator_correct", "replaced_tokens",
                                 "detected_replaced", "predicted_replaced")

    def __init__(self, objective: str):
        if objective not in ("mlm", "rtd"):
            raise ValueError(f"objective must be 'mlm' or 'rtd', got {objective!r}")
        self.objective = objective

    def preprocess_logits_for_metrics(self, outputs, labels):
        """Per-sample sums and counts [B, columns], computed without a host sync: dense masked-LM logits [B, N, V]
        are scored at every position (ignored ones add 0), sparse ones [K, V] at their rows' positions."""
        batch, length = labels.shape
        masked = labels != -100
        if self.objective == "mlm":
            logits = outputs[0] if isinstance(outputs, (tuple, list)) else outputs
            positions = None
            if logits.dim() == 2:  # sparse [K, V] (a model in training mode): the rows' places, as the model chose them
                positions = sparse_prediction_positions(labels, 1.0)[:logits.shape[0]]
        else:
            named = dict(zip(_rtd_output_names(), outputs, strict=False))
            logits, positions = named["generator_logits"], named["generator_positions"]
        if positions is None:  # dense: one row per position
            logits, positions = logits.flatten(0, 1), torch.arange(batch * length, device=labels.device)
        targets = labels.flatten().index_select(0, positions)  # [rows], -100 where nothing is predicted
        predicted = targets != -100
        token_loss = F.cross_entropy(logits.float(), targets, reduction="none")  # 0 where ignored
        correct = ((logits.argmax(-1) == targets) & predicted).double()
        rows = torch.div(positions, length, rounding_mode="floor")  # the sample each row belongs to
        columns = [_per_sample_sum(token_loss, rows, batch), masked.sum(-1).double(),
                   _per_sample_sum(correct, rows, batch)]
        if self.objective == "rtd":
            rtd_logits, rtd_labels = named["logits"], named["rtd_labels"]
            counted = rtd_labels != -100
            bce = F.binary_cross_entropy_with_logits(rtd_logits.float(), rtd_labels.clamp(min=0).float(),
                                                     reduction="none")
            predicted = (rtd_logits > 0) & counted
            right = (predicted.long() == rtd_labels) & counted
            replaced = rtd_labels == 1
            columns += [(bce * counted).double().sum(-1), counted.sum(-1).double(), right.sum(-1).double(),
                        replaced.sum(-1).double(), (predicted & replaced).sum(-1).double(),
                        predicted.sum(-1).double()]
        return torch.stack(columns, dim=-1)  # [B, number of columns]

    def compute_metrics(self, eval_prediction) -> dict:
        totals = torch.as_tensor(eval_prediction.predictions, dtype=torch.float64).reshape(
            -1, len(self.RTD_COLUMNS if self.objective == "rtd" else self.MLM_COLUMNS)).sum(0)
        total = dict(zip(self.RTD_COLUMNS, totals.tolist(), strict=False))
        masked = max(total["masked_tokens"], 1.0)
        metrics = {"mlm_loss": total["mlm_loss_sum"] / masked}
        if self.objective == "mlm":
            metrics["mlm_accuracy"] = total["generator_correct"] / masked
            return metrics
        tokens = max(total["rtd_tokens"], 1.0)
        metrics.update(generator_accuracy=total["generator_correct"] / masked, rtd_loss=total["rtd_loss_sum"] / tokens,
                       discriminator_accuracy=total["discriminator_correct"] / tokens,
                       # Predicting "original" everywhere scores 1 - replaced / tokens: the accuracy to beat.
                       discriminator_baseline_accuracy=1.0 - total["replaced_tokens"] / tokens,
                       discriminator_recall=total["detected_replaced"] / max(total["replaced_tokens"], 1.0),
                       discriminator_precision=total["detected_replaced"] / max(total["predicted_replaced"], 1.0),
                       replaced_fraction=total["replaced_tokens"] / masked)
        return metrics


def _rtd_output_names() -> list[str]:
    """Field order of RTDPreTrainingOutput without `loss`: the order in which Trainer hands its outputs over."""
    from .modeling_rtd import RTDPreTrainingOutput

    return [f.name for f in fields(RTDPreTrainingOutput) if f.name != "loss"]


def _masked_lm_accuracy(logits, labels):
    """Share of labelled positions whose argmax is the label, for dense [B, N, V] or sparse [K, V] logits (rows at
    sparse_prediction_positions: the labelled positions first), without a host sync."""
    if logits.dim() == 2:
        labels = labels.flatten().index_select(0, sparse_prediction_positions(labels, 1.0)[:logits.shape[0]])
    labelled = labels != -100
    return ((logits.argmax(-1) == labels) & labelled).sum() / labelled.sum().clamp(min=1)


class LossTermsCallback(TrainerCallback):
    """Adds the mean of each loss term and accuracy since the previous log to the training logs (train_mlm_loss,
    train_rtd_loss, train_generator_accuracy, ...), for an unchanged Trainer that only logs the summed loss.

    A forward hook on the model records the terms of every training forward pass (micro-batches included); `on_log`
    writes their means into the log entry. Insert it first in the callback list (`trainer.callback_handler.callbacks
    .insert(0, ...)`) so the reporting integrations and the progress bar see the terms. Values are those of this
    process (rank 0 in distributed runs)."""

    RTD_TERMS = ("mlm_loss", "rtd_loss", "generator_accuracy", "discriminator_accuracy", "replaced_fraction")

    def __init__(self):
        self._handle = None
        self._sums: dict[str, torch.Tensor] = {}  # running sums on the model's device: read only in on_log
        self._count = 0

    @torch.no_grad()
    def _record(self, module, args, kwargs, output):
        if not module.training:
            return
        values = {}
        if getattr(output, "rtd_loss", None) is not None:
            values = {name: getattr(output, name) for name in self.RTD_TERMS}
        elif getattr(output, "loss", None) is not None:  # masked-LM: the loss is the MLM loss
            values["mlm_loss"] = output.loss
            labels = kwargs.get("labels")
            num_items = kwargs.get("num_items_in_batch")
            if num_items is not None and labels is not None:  # summed over the step's tokens: this batch's mean
                values["mlm_loss"] = output.loss * num_items / (labels != -100).sum().clamp(min=1)
            if labels is not None and output.logits is not None:
                values["mlm_accuracy"] = _masked_lm_accuracy(output.logits, labels)
        # Detached device tensors, summed on the device: no host read (a device sync) in the training step.
        for name, value in values.items():
            value = value.detach().float()
            self._sums[name] = self._sums[name] + value if name in self._sums else value
        self._count += 1 if values else 0

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None and self._handle is None:
            self._handle = model.register_forward_hook(self._record, with_kwargs=True)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "loss" not in logs or not self._count:
            return
        terms = {f"train_{name}": round(float(total) / self._count, 4) for name, total in self._sums.items()}
        logs.update(terms)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(terms)
        self._sums, self._count = {}, 0

    def on_train_end(self, args, state, control, **kwargs):
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


__all__ = [
    "DebertaMaskingCollator",
    "LossTermsCallback",
    "MaskingSeedCallback",
    "PortableTokenizerCallback",
    "PretrainingMetrics",
    "group_texts",
    "load_pretraining_tokenizer",
    "make_tokenizer_portable",
    "save_tokenizer",
    "spm_tokenizer",
    "tokenize_and_group",
    "word_start_table",
    "write_spm_tokenizer_folder",
]
