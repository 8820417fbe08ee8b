#!/usr/bin/env python
"""Train a SentencePiece-style Unigram tokenizer (the kind DeBERTa-v3 uses) with the `tokenizers` library.

    python scripts/train_tokenizer.py --files corpus.txt more.txt --vocab_size 8000 --output_dir my-tokenizer

The folder loads with `AutoTokenizer.from_pretrained(output_dir)` and behaves like DeBERTa's tokenizer:
- special tokens [PAD]=0, [CLS]=1, [SEP]=2, [UNK]=3, [MASK]=4 (DeBERTa-v3 has the first four at the same ids);
- templates "[CLS] A [SEP]" and "[CLS] A [SEP] B [SEP]", token_type_ids 0 for "[CLS] A [SEP]" and 1 for "B [SEP]";
- SentencePiece pre-processing: NMT + NFKC normalization, runs of spaces collapsed, words marked with "▁"
  (and lowercasing with --lowercase);
- [MASK] strips the space before it ("a [MASK] b" gives the same pieces around it as "a b").
Text files are read line by line; `--files` also takes .tsv files with `--tsv_column` (e.g. a GLUE column).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Iterator
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from modeling_deberta_custom.training.tokenization import save_tokenizer

SPECIAL_TOKENS = ["[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]"]


def special_token(token: str) -> AddedToken:
    """[MASK] swallows the space before it, as in DeBERTa's tokenizer; the others match exactly."""
    return AddedToken(token, lstrip=token == "[MASK]", rstrip=False, normalized=False, special=True)


def iter_lines(files: list[str], tsv_column: str | None = None) -> Iterator[str]:
    """Non-empty lines of text files, or one column of TSV files (by header name; quoting disabled, as GLUE needs)."""
    for file in files:
        with open(file, encoding="utf-8-sig", newline="") as handle:
            if tsv_column is not None and file.endswith(".tsv"):
                reader = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
                header = next(reader)
                if tsv_column not in header:
                    raise ValueError(f"{file}: no column {tsv_column!r} in the header {header}")
                column = header.index(tsv_column)
                lines = (row[column] for row in reader if len(row) > column)
            else:
                lines = (line.rstrip("\n") for line in handle)
            for line in lines:
                line = line.strip()
                if line:
                    yield line


def build_tokenizer(lowercase: bool = False) -> Tokenizer:
    """An untrained Unigram tokenizer with DeBERTa-v3's pre-processing (as transformers' converter builds it),
    plus lowercasing of every input when `lowercase`."""
    tokenizer = Tokenizer(models.Unigram())
    steps = [normalizers.Nmt(), normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")]
    tokenizer.normalizer = normalizers.Sequence(steps + ([normalizers.Lowercase()] if lowercase else []))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    return tokenizer


def train_tokenizer(lines, vocab_size: int = 8000, max_piece_length: int = 16, model_max_length: int = 512,
                    lowercase: bool = False):
    """Train on an iterable of strings; returns a `PreTrainedTokenizerFast` ready for `save_tokenizer`."""
    from transformers import PreTrainedTokenizerFast

    tokenizer = build_tokenizer(lowercase)
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size,
        special_tokens=[special_token(token) for token in SPECIAL_TOKENS],
        unk_token="[UNK]",
        max_piece_length=max_piece_length,
        show_progress=False,
    )
    tokenizer.train_from_iterator(lines, trainer=trainer)
    ids = {token: tokenizer.token_to_id(token) for token in SPECIAL_TOKENS}
    if [ids[token] for token in SPECIAL_TOKENS] != list(range(len(SPECIAL_TOKENS))):
        raise RuntimeError(f"Special tokens got ids {ids}, expected 0..{len(SPECIAL_TOKENS) - 1}")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS]:0 $A:0 [SEP]:0",
        pair="[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1",
        special_tokens=[("[CLS]", ids["[CLS]"]), ("[SEP]", ids["[SEP]"])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="[CLS]",
        eos_token="[SEP]",
        unk_token="[UNK]",
        sep_token="[SEP]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        mask_token=special_token("[MASK]"),
        model_max_length=model_max_length,
        padding_side="right",
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    )


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", nargs="+", required=True, help="text files (one text per line) or .tsv files")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--vocab_size", type=int, default=8000)
    parser.add_argument("--tsv_column", default=None, help="header name of the column to read from .tsv files")
    parser.add_argument("--lowercase", action="store_true", help="the tokenizer lowercases every input (for "
                        "lowercased corpora such as SST-2; DeBERTa-v3 itself is cased)")
    parser.add_argument("--max_piece_length", type=int, default=16)
    parser.add_argument("--model_max_length", type=int, default=512)
    return parser.parse_args(argv)


def main(argv=None) -> Path:
    args = parse_args(argv)
    for file in args.files:
        if not Path(file).is_file():
            sys.exit(f"No such file: {file}")
    tokenizer = train_tokenizer(iter_lines(args.files, args.tsv_column), args.vocab_size, args.max_piece_length,
                                args.model_max_length, args.lowercase)
    output_dir = Path(save_tokenizer(tokenizer, args.output_dir))
    summary = {"vocab_size": len(tokenizer), "special_tokens": {t: tokenizer.convert_tokens_to_ids(t)
                                                                for t in SPECIAL_TOKENS},
               "files": [str(f) for f in args.files]}
    print(json.dumps(summary, indent=1))
    return output_dir


if __name__ == "__main__":
    main()
