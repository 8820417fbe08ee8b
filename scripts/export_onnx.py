#!/usr/bin/env python
"""Export a checkpoint folder (ours, or an official microsoft/deberta-* / transformers DebertaV2 folder) to ONNX for a
chosen head, then check the file with onnx.checker and onnxruntime (CPU) against PyTorch at several batch sizes and
lengths, including lengths past the relative-position bucket range, on right-padded batches with one fully padded row.

    python scripts/export_onnx.py --model path/to/checkpoint --task sequence-classification --output onnx/sst2
    python scripts/export_onnx.py --model path/to/checkpoint --task base --output onnx/base --torch-export

Writes OUTPUT/model.onnx, OUTPUT/config.json and the tokenizer when the checkpoint folder has one (and, with
--torch-export, OUTPUT/model.pt2 from torch.export). Prints the max |onnxruntime - PyTorch| per (batch, length) and
exits with status 1 when any exceeds --atol.
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from modeling_deberta_custom.export import (  # noqa: E402
    DEFAULT_OPSET,
    TASKS,
    check_onnx,
    export_onnx,
    export_program,
    max_length,
    onnx_max_abs_diff,
    program_max_abs_diff,
)


def default_lengths(config, task) -> list[int]:
    """Short, medium, just past the relative-position bucket range, and past max_position_embeddings (for models
    where that is allowed)."""
    lengths = {5, 17, config.relative_span + 9, config.max_position_embeddings + 37}
    limit = max_length(config, task)
    if limit is not None:
        lengths = {min(n, limit) for n in lengths}
    return sorted(lengths)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="checkpoint folder or Hub id (ours or official)")
    parser.add_argument("--task", default="base", choices=sorted(TASKS), help="which head to export (default: base)")
    parser.add_argument("--output", required=True, help="output folder")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET)
    parser.add_argument("--exporter", default="torchscript", choices=["torchscript", "dynamo"],
                        help="torch's TorchScript-based ONNX exporter (default), or the torch.export-based one (needs "
                             "the onnxscript package; traces the eager attention path)")
    parser.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",")], default=None,
                        help="comma-separated lengths to check (default: 5, 17, bucket span + 9, max positions + 37)")
    parser.add_argument("--batch-sizes", type=lambda s: [int(x) for x in s.split(",")], default=[1, 3],
                        help="comma-separated batch sizes to check (the export sample has batch 2)")
    parser.add_argument("--atol", type=float, default=1e-4, help="largest allowed |onnxruntime - PyTorch|")
    parser.add_argument("--attn-implementation", default=None, choices=["eager", "sdpa"],
                        help="attention path traced into the graph (default: the model's; both give the same maths)")
    parser.add_argument("--torch-export", action="store_true",
                        help="also write model.pt2 with torch.export (dynamic dims) and check it")
    parser.add_argument("--no-check", action="store_true", help="export only, skip the onnxruntime comparison")
    return parser.parse_args(argv)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "spm.model", "vocab.json", "vocab.txt")


def save_tokenizer(model_path, output) -> str:
    """Copy the checkpoint's tokenizer next to the ONNX file. Only when the checkpoint has tokenizer files: with none,
    transformers may still build a DeBERTa tokenizer with a near-empty vocabulary, which must not be shipped."""
    from transformers import AutoTokenizer
    from transformers.utils import cached_file

    present = [name for name in TOKENIZER_FILES
               if cached_file(model_path, name, _raise_exceptions_for_missing_entries=False) is not None]
    if not present:
        return "no tokenizer saved (the checkpoint has no tokenizer files)"
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path)
    except Exception as error:  # no tokenizer files, or none transformers can build
        return f"no tokenizer saved ({type(error).__name__}: {str(error).splitlines()[0][:120]})"
    tokenizer.save_pretrained(output)
    return f"tokenizer saved ({type(tokenizer).__name__})"


def main(argv=None) -> int:
    args = parse_args(argv)
    model_class = TASKS[args.task][0]
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)

    load_kwargs = {"attn_implementation": args.attn_implementation} if args.attn_implementation else {}
    model = model_class.from_pretrained(args.model, **load_kwargs)
    model = model.float().eval()
    config = model.config
    print(f"Loaded {model_class.__name__} from {args.model} ({sum(p.numel() for p in model.parameters()):,} "
          f"parameters, {config.num_hidden_layers} layers, position_buckets={config.position_buckets})")

    start = time.perf_counter()
    onnx_path = export_onnx(model, output / "model.onnx", task=args.task, opset=args.opset, exporter=args.exporter)
    check_onnx(onnx_path)
    print(f"Exported {onnx_path} ({args.exporter} exporter, dynamic batch and sequence axes) "
          f"in {time.perf_counter() - start:.1f} s")
    config.to_json_file(output / "config.json")  # id2label etc. for the serving side
    print(save_tokenizer(args.model, output))

    lengths = args.lengths or default_lengths(config, args.task)
    limit = max_length(config, args.task)
    skipped = [n for n in lengths if limit is not None and n > limit]
    if skipped:
        print(f"Lengths {skipped} exceed max_position_embeddings={limit} (absolute positions): not checked")
    worst = 0.0
    if not args.no_check:
        diffs = onnx_max_abs_diff(model, onnx_path, task=args.task, lengths=lengths, batch_sizes=args.batch_sizes)
        for (batch, length), diff in diffs.items():
            print(f"onnxruntime vs PyTorch: batch {batch:3d} length {length:5d}  max |diff| {diff:.3e}")
        worst = max(diffs.values())
        print(f"max difference (ONNX): {worst:.3e} (atol {args.atol:g})")

    if args.torch_export:
        start = time.perf_counter()
        program = export_program(model, task=args.task)
        torch.export.save(program, output / "model.pt2")
        print(f"Exported {output / 'model.pt2'} with torch.export in {time.perf_counter() - start:.1f} s")
        if not args.no_check:
            diffs = program_max_abs_diff(model, program, task=args.task, lengths=lengths,
                                         batch_sizes=args.batch_sizes)
            program_worst = max(diffs.values())
            print(f"max difference (torch.export): {program_worst:.3e}")
            worst = max(worst, program_worst)

    if worst > args.atol:
        print(f"FAILED: difference {worst:.3e} exceeds {args.atol:g}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
