"""Time and peak memory of loading an official checkpoint: ours against transformers' own class on the same folder.

The checkpoint is what transformers' `DebertaV2ForMaskedLM.save_pretrained` writes (random weights, safetensors) at
the DeBERTa-v3-large geometry (`--size v3-large`: vocabulary 128,100, hidden 1024, 24 layers, 16 heads, 256 position
buckets; about 1.7 GB in fp32), or a tiny one (`--size tiny`, seconds; what the test suite runs). It is written once
into --workdir (keep it out of the repository) and reused.

Each load runs in a fresh child process, so that no allocation of one load is seen by the next:
    ours:          DebertaCustomForMaskedLM.from_pretrained(folder, dtype=...)
    transformers:  transformers.DebertaV2ForMaskedLM.from_pretrained(folder, dtype=...)
The child reports the wall time of the from_pretrained call alone (imports excluded) and its peak resident set size
(getrusage(RUSAGE_SELF).ru_maxrss; the interpreter, torch and transformers count for both loaders alike) twice: right
after from_pretrained (`load_peak_rss_mb`: weights left in the memory-mapped file are not resident yet) and after
every parameter has been read once, as a first forward pass reads them (`peak_rss_mb`, what the targets use). It checks that a few of the loaded tensors are the file's, cast to the requested dtype. The loaders alternate within
every repeat; reported are the median over the repeats and the ratios ours / transformers (targets: at most 1.1x the
peak memory and 1.5x the time).

    python benchmarks/benchmark_loading.py --size v3-large --repeats 3 --workdir /tmp/deberta-loading --out outputs/loading.json
    python benchmarks/benchmark_loading.py --size tiny --repeats 1 --workdir /tmp/tiny-loading

`--in-process` loads in the measuring process itself: the test suite runs the tiny size that way (child processes
cost seconds of imports each), which checks the loaders and the report but not the memory figures.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # harness

import harness  # noqa: E402

# transformers' DebertaV2Config fields (the microsoft/deberta-v3-* config.json layout).
SIZES = {
    "v3-large": dict(vocab_size=128100, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                     intermediate_size=4096, max_position_embeddings=512, position_buckets=256),
    "tiny": dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                 max_position_embeddings=64, position_buckets=8),
}
V3_FIELDS = dict(relative_attention=True, norm_rel_ebd="layer_norm", share_att_key=True, pos_att_type="p2c|c2p",
                 position_biased_input=False, type_vocab_size=0, layer_norm_eps=1e-7, legacy=False)
LOADERS = ("ours", "transformers")
CHECKED_KEYS = ("deberta.embeddings.word_embeddings.weight", "deberta.encoder.layer.0.attention.self.query_proj.weight",
                "lm_predictions.lm_head.dense.weight")


def write_checkpoint(folder: Path, size: str) -> None:
    """transformers' DebertaV2ForMaskedLM with random weights, saved as safetensors (run in a child process, so that
    the measuring process stays small)."""
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.DebertaV2Config(**SIZES[size], **V3_FIELDS)
    transformers.DebertaV2ForMaskedLM(config).save_pretrained(folder)


def load_once(loader: str, folder: Path, dtype_name: str) -> dict:
    """One load, in this (fresh) process: seconds of from_pretrained, peak RSS, and whether the weights are the
    file's."""
    import torch
    from safetensors import safe_open

    if loader == "ours":
        sys.path.insert(0, str(REPO_ROOT))  # this checkout's package, installed or not
        from modeling_deberta_custom import DebertaCustomForMaskedLM as model_class
    else:
        from transformers import DebertaV2ForMaskedLM as model_class
    dtype = getattr(torch, dtype_name)
    start = time.perf_counter()
    model = model_class.from_pretrained(folder, dtype=dtype)
    seconds = time.perf_counter() - start
    load_peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    # Weights that stay in the memory-mapped file become resident when first read (the first forward pass): read
    # every parameter once, so that the peak counts the whole model as it is used.
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.sum()
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    state = model.state_dict()
    checked = True
    files = sorted(p for p in folder.iterdir() if p.suffix == ".safetensors")
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            for key in set(CHECKED_KEYS) & set(handle.keys()):
                checked &= bool(state[key].dtype == dtype and torch.equal(state[key], handle.get_tensor(key).to(dtype)))
    return dict(loader=loader, dtype=dtype_name, seconds=seconds, peak_rss_mb=peak_kib / 1024,
                load_peak_rss_mb=load_peak_kib / 1024, checked=checked, module=model_class.__module__)


def run_child(*arguments, in_process=False) -> dict:
    if in_process:  # testing the script's logic only: one process, so the memory figures mean nothing
        return main(list(arguments)) or {}
    command = [sys.executable, str(Path(__file__).resolve()), *arguments]
    completed = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    if completed.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{completed.stderr[-4000:]}")
    lines = completed.stdout.strip().splitlines()
    return json.loads(lines[-1]) if lines else {}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="v3-large")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/deberta-loading-benchmark"),
                        help="where the checkpoint is written (once); not the repository")
    parser.add_argument("--out", type=Path, default=None, help="JSON report (default: print only)")
    parser.add_argument("--in-process", action="store_true",
                        help="load in this process instead of children (for the test suite: no memory isolation)")
    parser.add_argument("--child", nargs=3, metavar=("LOADER", "FOLDER", "DTYPE"), help=argparse.SUPPRESS)
    parser.add_argument("--write", nargs=2, metavar=("FOLDER", "SIZE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.write:
        write_checkpoint(Path(args.write[0]), args.write[1])
        return
    if args.child:
        loader, folder, dtype_name = args.child
        result = load_once(loader, Path(folder), dtype_name)
        print(json.dumps(result))
        return result

    folder = args.workdir / f"deberta-v2-formaskedlm-{args.size}"
    if not (folder / "config.json").is_file():
        print(f"writing the {args.size} checkpoint to {folder} ...", flush=True)
        run_child("--write", str(folder), args.size, in_process=args.in_process)
    size_mb = sum(p.stat().st_size for p in folder.iterdir() if p.suffix == ".safetensors") / 2**20

    runs = []
    for repeat in range(args.repeats):
        for dtype_name in args.dtypes.split(","):
            # The first loader alternates between repeats, so that page-cache warmth favours neither.
            for loader in LOADERS if repeat % 2 == 0 else LOADERS[::-1]:
                result = run_child("--child", loader, str(folder), dtype_name, in_process=args.in_process)
                runs.append(result)
                print(f"repeat {repeat} {dtype_name:8s} {loader:12s} {result['seconds']:7.2f} s "
                      f"{result['peak_rss_mb']:8.0f} MB peak RSS ({result['load_peak_rss_mb']:.0f} MB after the load "
                      f"call)  weights checked: {result['checked']}", flush=True)

    results = []
    for dtype_name in args.dtypes.split(","):
        for loader in LOADERS:
            mine = [r for r in runs if r["loader"] == loader and r["dtype"] == dtype_name]
            results.append(dict(loader=loader, dtype=dtype_name, seconds=statistics.median(r["seconds"] for r in mine),
                                peak_rss_mb=statistics.median(r["peak_rss_mb"] for r in mine),
                                load_peak_rss_mb=statistics.median(r["load_peak_rss_mb"] for r in mine),
                                checked=all(r["checked"] for r in mine), runs=mine))
    ratios = {}
    info = harness.machine("cpu")
    print(f"\n{args.size} checkpoint, {size_mb:.0f} MB of safetensors; median of {args.repeats}; "
          f"{harness.describe(info)}")
    for dtype_name in args.dtypes.split(","):
        ours, theirs = (next(r for r in results if r["loader"] == name and r["dtype"] == dtype_name)
                        for name in LOADERS)
        ratios[dtype_name] = dict(time=ours["seconds"] / theirs["seconds"],
                                  peak_rss=ours["peak_rss_mb"] / theirs["peak_rss_mb"],
                                  load_peak_rss=ours["load_peak_rss_mb"] / theirs["load_peak_rss_mb"])
        print(f"{dtype_name:8s} ours {ours['seconds']:6.2f} s {ours['peak_rss_mb']:7.0f} MB | transformers "
              f"{theirs['seconds']:6.2f} s {theirs['peak_rss_mb']:7.0f} MB | ratio time "
              f"{ratios[dtype_name]['time']:.2f}x (target <= 1.5x), peak RSS {ratios[dtype_name]['peak_rss']:.2f}x "
              f"(target <= 1.1x; after the load call alone {ratios[dtype_name]['load_peak_rss']:.2f}x)")
    report = dict(size=args.size, checkpoint=str(folder), checkpoint_mb=size_mb, repeats=args.repeats,
                  machine=info, results=results, ratios=ratios)
    if args.out:
        harness.write_json(args.out, report)
    return report


if __name__ == "__main__":
    main()
