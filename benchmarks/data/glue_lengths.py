"""Writes the token-length samples the benchmarks read (sst2_train_lengths.json, rte_train_lengths.json).

Lengths are what the official DeBERTa-v3 tokenizer (its spm.model, converted by this package's `spm_tokenizer`) gives
for GLUE training examples, special tokens included ([CLS] a [SEP], or [CLS] a [SEP] b [SEP] for pairs), capped at 512
(no example of either sample reaches it). A fixed random sample (seed 0) of the training set is kept, in the order
drawn, so that the benchmark's batches are random batches. Needs the data, which the GPU machine does not have: run
it here once, commit the JSON.

    PYTHONPATH=. python benchmarks/data/glue_lengths.py --data /work/shared/data
"""

import argparse
import csv
import json
import random
import statistics
from pathlib import Path

SAMPLES = {  # file -> (GLUE folder, text columns, sample size)
    "sst2_train_lengths.json": ("SST-2", ("sentence",), 512),
    "rte_train_lengths.json": ("RTE", ("sentence1", "sentence2"), 256),
}
MAX_LENGTH = 512


def read_rows(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as handle:  # GLUE TSVs hold stray quote characters: no quoting
        return list(csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("/work/shared/data"))
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    args = parser.parse_args(argv)

    from modeling_deberta_custom.pretraining import spm_tokenizer

    spm = args.data / "tokenizers" / "deberta-v3" / "spm.model"
    tokenizer = spm_tokenizer(str(spm))
    for name, (task, columns, size) in SAMPLES.items():
        rows = read_rows(args.data / "glue" / task / "train.tsv")
        sample = random.Random(0).sample(rows, size)
        texts = [tuple(row[column] for column in columns) for row in sample]
        encoded = tokenizer(*zip(*texts, strict=True)) if len(columns) > 1 else tokenizer([t[0] for t in texts])
        lengths = [min(len(ids), MAX_LENGTH) for ids in encoded["input_ids"]]
        record = dict(
            lengths=lengths,
            origin=f"GLUE {task} train.tsv ({len(rows)} rows, {args.data / 'glue' / task}), random.Random(0).sample "
                   f"of {size}; official DeBERTa-v3 spm.model through modeling_deberta_custom.pretraining.spm_tokenizer; "
                   f"special tokens included; capped at {MAX_LENGTH}; written by benchmarks/data/glue_lengths.py",
            mean=round(statistics.mean(lengths), 2), max=max(lengths), min=min(lengths),
        )
        fields = [f' "{key}": {json.dumps(value)}' for key, value in record.items()]  # one line per field
        (args.out / name).write_text("{\n" + ",\n".join(fields) + "\n}\n")
        print(f"{name}: {size} lengths, mean {record['mean']}, max {record['max']}")


if __name__ == "__main__":
    main()
