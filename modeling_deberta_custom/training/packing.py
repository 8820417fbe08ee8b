"""Packed batches for training: several sequences in one [1, T] row, each attending only to itself.

The model reads packed batches as transformers' DataCollatorWithFlattening writes them (input_ids [1, T],
position_ids restarting at every sequence, and with return_flash_attn_kwargs=True cu_seq_lens_q / cu_seq_lens_k /
max_length_q / max_length_k, which spare the model a host read). For fine-tuning on pre-tokenized examples with token
labels (or pre-masked masked-LM data) that collator is all a Trainer needs:

    Trainer(model, args, train_dataset=dataset, data_collator=DataCollatorWithFlattening(return_flash_attn_kwargs=True))

For pretraining with masking done per batch (DebertaMaskingCollator, transformers' DataCollatorForLanguageModeling),
`PackedCollator` wraps the masking collator: it masks the sequences as padded rows, exactly as it would without
packing, and then packs them. `pack_documents` groups documents into blocks of up to `block_size` tokens without
joining them into one sequence (as `pretraining.tokenize_and_group` does), so that a block never attends across a
document boundary.

Training wing: never imported by the model files.
"""

from collections.abc import Callable, Iterable

import torch


def packed_batch_from_padded(batch: dict) -> dict:
    """A padded batch (input_ids [B, N], attention_mask with each row's real tokens first) -> the packed batch
    DataCollatorWithFlattening(return_flash_attn_kwargs=True) would give: input_ids [1, T], position_ids restarting
    at 0, cu_seq_lens_q/k [B + 1] (int32), max_length_q/k (ints); every other [B, N] tensor (token labels,
    token_type_ids) packed alike. Other tensors with one entry per row (sequence labels [B]) stay as they are: one per
    packed sequence, as sequence classification reads them. Rows must be right-padded."""
    mask = batch["attention_mask"].bool()
    lengths = mask.sum(-1)
    if not torch.equal(mask, torch.arange(mask.shape[1]) < lengths[:, None]):
        raise ValueError("packed_batch_from_padded needs right-padded rows (real tokens first)")
    packed = {key: value[mask][None] if value.shape[:2] == mask.shape else value for key, value in batch.items()
              if key != "attention_mask" and isinstance(value, torch.Tensor)}
    packed["position_ids"] = torch.cat([torch.arange(int(n)) for n in lengths])[None]
    cu_seq_lens = torch.cat([torch.zeros(1, dtype=torch.int32), lengths.cumsum(0).to(torch.int32)])
    packed["cu_seq_lens_q"] = packed["cu_seq_lens_k"] = cu_seq_lens
    packed["max_length_q"] = packed["max_length_k"] = int(lengths.max())
    return packed


class PackedCollator:
    """Wraps a padding collator (one that returns input_ids and attention_mask right-padded, with token labels
    [B, N] or sequence labels [B]: pretraining.DebertaMaskingCollator, transformers' DataCollatorForLanguageModeling,
    or DataCollatorWithPadding for sequence classification) so that its batches come out packed (see
    packed_batch_from_padded). Examples holding several documents (`pack_documents`, with their
    `position_ids`) are split into their documents first, so that the wrapped collator masks each document as a row
    of its own and the model never lets one document attend to another.

    Attribute access falls through to the wrapped collator (MaskingSeedCallback drives its masking stream)."""

    def __init__(self, collator: Callable):
        self.collator = collator

    def __getattr__(self, name):
        return getattr(self.__dict__["collator"], name)

    def __call__(self, examples: list[dict]) -> dict:
        documents = [document for example in examples for document in split_documents(example)]
        return packed_batch_from_padded(self.collator(documents))


def split_documents(example: dict) -> list[dict]:
    """An example whose position_ids restart (a block from `pack_documents`) -> one {"input_ids": ...} per document;
    an example without position_ids is one document, kept as it is (labels, token types and all)."""
    positions = example.get("position_ids")
    if positions is None:
        return [example]
    ids = list(example["input_ids"])
    positions = list(positions)
    starts = [i for i, position in enumerate(positions) if i == 0 or position <= positions[i - 1]]
    return [{"input_ids": ids[start:stop]} for start, stop in zip(starts, starts[1:] + [len(ids)], strict=True)]


def pack_documents(documents: Iterable[list[int]], block_size: int) -> list[dict]:
    """Token-id lists (each a framed document, [CLS] ... [SEP]) -> blocks of at most block_size tokens, each
    {"input_ids": the documents back to back, "position_ids": restarting at 0 for each}. First fit in order: a
    document goes into the first block with room for it; a document longer than block_size is cut into pieces of
    block_size. Feed the blocks to PackedCollator (or DataCollatorWithFlattening, which then sees one sequence per
    block: split them with PackedCollator to keep documents apart)."""
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")
    blocks: list[list[list[int]]] = []
    room: list[int] = []
    for document in documents:
        document = list(document)
        for start in range(0, len(document), block_size):
            piece = document[start:start + block_size]
            target = next((i for i, free in enumerate(room) if free >= len(piece)), None)
            if target is None:
                blocks.append([])
                room.append(block_size)
                target = len(blocks) - 1
            blocks[target].append(piece)
            room[target] -= len(piece)
    return [{"input_ids": [token for piece in block for token in piece],
             "position_ids": [position for piece in block for position in range(len(piece))]} for block in blocks]


def frame_documents(token_lists: Iterable[list[int]], block_size: int, cls_token_id: int,
                    sep_token_id: int) -> list[list[int]]:
    """Tokenized documents (without special tokens) -> [CLS] + piece + [SEP] for each piece of at most block_size - 2
    tokens (a long document is cut); empty documents are dropped."""
    if block_size < 3:
        raise ValueError(f"block_size must be at least 3 ([CLS], one token, [SEP]), got {block_size}")
    body = block_size - 2
    return [[cls_token_id] + tokens[start:start + body] + [sep_token_id]
            for tokens in token_lists for start in range(0, len(tokens), body)]


def tokenize_and_pack(dataset, tokenizer, max_seq_length: int, num_proc: int | None = None,
                      text_column: str = "text", batch_size: int = 1000):
    """The document-keeping counterpart of pretraining.tokenize_and_group: a `datasets` Dataset (or DatasetDict) of
    text lines, one document each -> blocks of up to max_seq_length tokens holding whole framed documents
    ({"input_ids", "position_ids"}, see pack_documents), packed within each map batch of `batch_size` lines. Collate
    them with PackedCollator."""
    cls_id, sep_id = tokenizer.cls_token_id, tokenizer.sep_token_id
    if cls_id is None or sep_id is None:
        raise ValueError("The tokenizer needs [CLS] and [SEP] tokens to frame documents")

    def tokenize(batch):
        texts = [text for text in batch[text_column] if text and text.strip()]
        ids = tokenizer(texts, add_special_tokens=False, return_attention_mask=False,
                        return_token_type_ids=False)["input_ids"] if texts else []
        blocks = pack_documents(frame_documents(ids, max_seq_length, cls_id, sep_id), max_seq_length)
        return {"input_ids": [b["input_ids"] for b in blocks], "position_ids": [b["position_ids"] for b in blocks]}

    columns = next(iter(dataset.values())).column_names if hasattr(dataset, "values") else dataset.column_names
    return dataset.map(tokenize, batched=True, batch_size=batch_size, num_proc=num_proc, remove_columns=columns,
                       desc=f"Tokenizing and packing documents into blocks of {max_seq_length}")


__all__ = ["PackedCollator", "frame_documents", "pack_documents", "packed_batch_from_padded", "split_documents",
           "tokenize_and_pack"]
