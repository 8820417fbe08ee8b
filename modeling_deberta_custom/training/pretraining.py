"""Pretraining data: plain text into blocks, and the masking collator for masked-LM and replaced-token detection.

  * `group_texts` / `tokenize_and_group`: plain text -> blocks of exactly max_seq_length tokens, [CLS] ... [SEP].
  * `DebertaMaskingCollator`: masked-LM masking (80/10/10 by default), optionally of whole words, for the masked-LM
    objective and for the generator of replaced-token detection; `MaskingSeedCallback` keeps its masks reproducible
    across an interrupted and resumed training run.

Tokenizers are in `tokenization.py`, the evaluation metrics and the training-log callback in `metrics.py`. Training-only
code (the training wing): the modeling files never import it, and it is not copied next to saved weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from itertools import chain

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase, TrainerCallback
from transformers.utils import logging

from .tokenization import special_token_ids

logger = logging.get_logger(__name__)

WORD_START_MARKERS = ("\u2581", "\u0120")  # SentencePiece "▁" and byte-level BPE "Ġ"


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


__all__ = [
    "DebertaMaskingCollator",
    "MaskingSeedCallback",
    "group_texts",
    "tokenize_and_group",
    "word_start_table",
]
