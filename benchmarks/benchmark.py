"""Speed and memory of our DeBERTa against transformers' DebertaV2 and BERT (SDPA) at the same geometry.

Every model has the DeBERTa-v3-base geometry (hidden 768, 12 layers, 12 heads, intermediate 3072; DeBERTa with 256
position buckets and max_position 512), the same reduced vocabulary and each library's default dropout (0.1 for all
of them, except `ours-flex`: FlexAttention has no attention dropout, so that model has none; pass `--dropout 0` to
compare training steps like for like). Measured in one process, alternating between models inside every repeat (the starting model rotates),
so that machine noise hits all models alike:

- forward: latency of one forward pass in `torch.inference_mode()` (model.eval()).
- train: one training step in model.train(): forward, loss = mean(last_hidden_state ** 2), backward, optimizer
  step (plain SGD by default so that the optimizer, identical for all models, does not dilute the ratios;
  `--optimizer adamw` for AdamW), zero_grad(set_to_none=True).
- peak memory of one call per model and shape (after one warm-up call), measured in a child process so that the
  timed process keeps the default allocator. CUDA: torch.cuda.max_memory_allocated() minus the memory allocated
  before the call. CPU: the peak resident set size (VmHWM, reset before the call through /proc/self/clear_refs)
  minus the resident set size before the call. glibc only returns freed memory to the system for allocations
  above its mmap threshold, which it raises dynamically; the child runs with MALLOC_MMAP_THRESHOLD_=65536 so that
  every tensor above 64 KiB is mapped and unmapped on its own and the resident set follows the live tensors. The
  delta counts activations, gradients and kernel workspaces; parameters and optimizer state that exist before
  the call are not part of it.

Reported: the median over the repeats of each time, the peak memory, and ratios ours / BERT and
ours / transformers-DeBERTa. Writes benchmark.json and benchmark.png into --out.

    python scripts/benchmark.py                       # CPU, 2 threads, 2 repeats (~15 min on 2 quiet cores)
    python scripts/benchmark.py --threads 1 --clock cpu   # CPU time: robust when other processes share the cores
    python scripts/benchmark.py --device cuda --dtype bfloat16 --dropout 0

`ours-flex` compiles FlexAttention once per shape during the warm-up, and has no training step on CPU (torch has no
FlexAttention backward there): its train rows read "not supported".
"""

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

MMAP_THRESHOLD = "65536"

MODELS = {
    "ours": "our DebertaCustomModel, default attention (sdpa)",
    "ours-eager": "our DebertaCustomModel, attn_implementation='eager'",
    "ours-flex": "our DebertaCustomModel, attn_implementation='flex_attention', attention dropout 0 (FlexAttention "
                 "has none; it trains on CUDA only)",
    "hf-deberta": "transformers.DebertaV2Model",
    "bert": "transformers.BertModel, attn_implementation='sdpa'",
}


def parse_shapes(text):
    """'8x128,2x512' -> [(8, 128), (2, 512)]"""
    if not text:
        return []
    shapes = []
    for item in text.split(","):
        batch, length = item.lower().split("x")
        shapes.append((int(batch), int(length)))
    return shapes


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="parameters and activations (CUDA half precision: parameters stay fp32 under autocast)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads on CPU")
    parser.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                        help="wall: elapsed time; cpu: CPU time of this process (all threads), less sensitive to "
                             "other processes on a shared machine (use with --threads 1: with more threads it also "
                             "counts the time threads spin while waiting for each other)")
    parser.add_argument("--repeats", type=int, default=2, help="timed calls per model and shape")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls per model and shape")
    parser.add_argument("--forward-shapes", default=None, help="BxN list; default CPU 8x128,2x512,1x2048")
    parser.add_argument("--train-shapes", default=None, help="BxN list; default CPU 8x128,4x512,1x2048")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma list of {list(MODELS)}")
    parser.add_argument("--vocab-size", type=int, default=8192, help="same for every model (memory)")
    parser.add_argument("--layers", type=int, default=12, help="encoder depth (12 for the v3-base geometry)")
    parser.add_argument("--config", default=None, help="measure `ours` with the geometry of this checkpoint folder or "
                        "config.json instead (e.g. a distilled student, then its teacher); --models ours only")
    parser.add_argument("--dropout", type=float, default=None, help="override every dropout (default: 0.1, all)")
    parser.add_argument("--optimizer", default="sgd", choices=["sgd", "adamw"])
    parser.add_argument("--out", default="outputs/benchmark", help="folder for benchmark.json and benchmark.png")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass")
    parser.add_argument("--memory-json", default=None, help=argparse.SUPPRESS)  # internal: the memory pass
    args = parser.parse_args(argv)
    gpu = args.device == "cuda"
    if args.forward_shapes is None:
        args.forward_shapes = "8x128,2x512,1x2048" + (",1x4096,1x8192,1x16384" if gpu else "")
    if args.train_shapes is None:
        args.train_shapes = "8x128,4x512,1x2048" + (",1x4096,1x8192,1x16384" if gpu else "")
    args.forward_shapes = parse_shapes(args.forward_shapes)
    args.train_shapes = parse_shapes(args.train_shapes)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in args.models if m not in MODELS]
    if unknown:
        parser.error(f"unknown models {unknown}; choose from {list(MODELS)}")
    if args.config is not None and args.models != ["ours"]:
        parser.error("--config measures one of our checkpoints' geometry: pass --models ours")
    return args


# ----------------------------------------------------------------------------------------------------------------------
# Memory
# ----------------------------------------------------------------------------------------------------------------------


def _proc_status_kib(field):
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


class PeakMemory:
    """Peak memory of a block above the memory in use when it starts, in bytes."""

    def __init__(self, device):
        self.device = device
        self.peak = None

    def __enter__(self):
        import torch

        gc.collect()
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            with open("/proc/self/clear_refs", "w") as clear:
                clear.write("5")  # resets VmHWM to the current VmRSS
            self.start = _proc_status_kib("VmRSS") * 1024
        return self

    def __exit__(self, *exc):
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.start
        else:
            self.peak = _proc_status_kib("VmHWM") * 1024 - self.start
        return False


# ----------------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------------

GEOMETRY = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)


def build_model(name, args, max_length):
    import transformers

    import modeling_deberta_custom  # noqa: F401
    from modeling_deberta_custom import DebertaCustomConfig, DebertaCustomModel

    dropout = {} if args.dropout is None else dict(hidden_dropout_prob=args.dropout,
                                                  attention_probs_dropout_prob=args.dropout)
    geometry = dict(GEOMETRY, num_hidden_layers=args.layers)
    deberta_fields = dict(geometry, vocab_size=args.vocab_size, max_position_embeddings=512, position_buckets=256,
                          relative_attention=True, pos_att_type=["p2c", "c2p"], share_att_key=True,
                          norm_rel_ebd="layer_norm", position_biased_input=False, type_vocab_size=0, **dropout)
    if name == "ours" and args.config is not None:
        model = DebertaCustomModel(DebertaCustomConfig.from_pretrained(args.config, vocab_size=args.vocab_size, **dropout))
    elif name == "ours":
        model = DebertaCustomModel(DebertaCustomConfig(**deberta_fields))
    elif name == "ours-eager":
        model = DebertaCustomModel._from_config(DebertaCustomConfig(**deberta_fields), attn_implementation="eager")
    elif name == "ours-flex":
        config = DebertaCustomConfig(**dict(deberta_fields, attention_probs_dropout_prob=0.0))
        model = DebertaCustomModel._from_config(config, attn_implementation="flex_attention")
    elif name == "hf-deberta":
        model = transformers.DebertaV2Model(transformers.DebertaV2Config(**deberta_fields))
    elif name == "bert":
        config = transformers.BertConfig(**geometry, vocab_size=args.vocab_size,
                                         max_position_embeddings=max(512, max_length), **dropout)
        model = transformers.BertModel._from_config(config, attn_implementation="sdpa", add_pooling_layer=False)
    else:
        raise ValueError(name)
    return model


# ----------------------------------------------------------------------------------------------------------------------
# Measurement
# ----------------------------------------------------------------------------------------------------------------------


def synchronize(device):
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def make_inputs(batch, length, args, seed):
    import torch

    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, args.vocab_size, (batch, length), generator=generator)
    attention_mask = torch.ones(batch, length, dtype=torch.long)  # what a tokenizer returns
    return input_ids.to(args.device), attention_mask.to(args.device)


def autocast_context(args):
    import contextlib

    import torch

    if args.device == "cuda" and args.dtype != "float32":
        return torch.autocast("cuda", dtype=getattr(torch, args.dtype))
    return contextlib.nullcontext()


def forward_call(model, inputs, args):
    import torch

    model.eval()
    with torch.inference_mode(), autocast_context(args):
        model(input_ids=inputs[0], attention_mask=inputs[1])


def train_call(model, optimizer, inputs, args):
    model.train()
    with autocast_context(args):
        hidden = model(input_ids=inputs[0], attention_mask=inputs[1]).last_hidden_state
        loss = hidden.float().pow(2).mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def measure(call, device, with_memory, clock="wall"):
    """(seconds, peak bytes or None) of one call."""
    if with_memory:
        with PeakMemory(device) as memory:
            call()
        return None, memory.peak
    now = time.process_time if clock == "cpu" and device == "cpu" else time.perf_counter
    synchronize(device)
    start = now()
    call()
    synchronize(device)
    return now() - start, None


def is_oom(error):
    return isinstance(error, MemoryError) or "out of memory" in str(error).lower()


def run_mode(mode, shapes, models, optimizers, args, results):
    """Times (args.memory_json unset) or peak memory (set) of every model at every shape, appended to results."""
    names = list(models)
    measuring_memory = args.memory_json is not None
    repeats = 1 if measuring_memory else args.repeats
    for batch, length in shapes:
        inputs = make_inputs(batch, length, args, seed=length)
        samples = {name: {"values": [], "error": None} for name in names}

        def call_for(name, inputs=inputs):
            if mode == "forward":
                return lambda: forward_call(models[name], inputs, args)
            return lambda: train_call(models[name], optimizers[name], inputs, args)

        for name in names:  # warm-up: allocator, oneDNN primitives, lazy initialisation
            try:
                for _ in range(args.warmup):
                    call_for(name)()
            except NotImplementedError as error:  # flex_attention training on CPU
                samples[name]["error"] = "not supported"
                print(f"  {mode:7s} {batch:2d}x{length:<6d} {name:11s} not supported: {error}", flush=True)
                continue
            except (RuntimeError, MemoryError) as error:
                if not is_oom(error):
                    raise
                samples[name]["error"] = "out of memory"
                optimizers[name].zero_grad(set_to_none=True)
                if args.device == "cuda":
                    import torch

                    torch.cuda.empty_cache()
        for repeat in range(repeats):
            order = names[repeat % len(names):] + names[:repeat % len(names)]
            for name in order:
                if samples[name]["error"]:
                    continue
                seconds, peak = measure(call_for(name), args.device, measuring_memory, args.clock)
                samples[name]["values"].append(peak if measuring_memory else seconds)
        for name in names:
            entry = samples[name]
            record = dict(mode=mode, model=name, batch=batch, length=length, error=entry["error"])
            if measuring_memory:
                record["peak_bytes"] = max(entry["values"]) if entry["values"] else None
                shown = entry["error"] if entry["error"] else f"{record['peak_bytes'] / 2**20:9.1f} MiB"
            else:
                record["times_s"] = entry["values"]
                record["median_s"] = statistics.median(entry["values"]) if entry["values"] else None
                shown = entry["error"] if entry["error"] else f"{record['median_s'] * 1000:9.1f} ms"
            results.append(record)
            print(f"  {mode:7s} {batch:2d}x{length:<6d} {name:11s} {shown}", flush=True)


def merge_memory(results, memory_results):
    peaks = {(r["mode"], r["model"], r["batch"], r["length"]): r for r in memory_results}
    for record in results:
        other = peaks.get((record["mode"], record["model"], record["batch"], record["length"]), {})
        record["peak_bytes"] = other.get("peak_bytes")
        record["error"] = record["error"] or other.get("error")
        if record["peak_bytes"] is None and not record["error"]:
            record["memory_error"] = "memory pass failed"


def ratio_table(results, models):
    """Rows of ratios ours* / bert and ours* / hf-deberta per mode and shape."""
    by_key = {(r["mode"], r["batch"], r["length"], r["model"]): r for r in results}
    rows = []
    for mode, batch, length in dict.fromkeys((r["mode"], r["batch"], r["length"]) for r in results):
        for ours in [m for m in models if m.startswith("ours")]:
            mine = by_key.get((mode, batch, length, ours))
            if mine is None or mine.get("error"):
                continue
            row = dict(mode=mode, batch=batch, length=length, model=ours)
            for reference in ("bert", "hf-deberta"):
                other = by_key.get((mode, batch, length, reference))
                row[f"time_vs_{reference}"] = row[f"memory_vs_{reference}"] = None
                if other is None or other.get("error"):
                    continue
                if mine.get("median_s") and other.get("median_s"):
                    row[f"time_vs_{reference}"] = mine["median_s"] / other["median_s"]
                if mine.get("peak_bytes") is not None and other.get("peak_bytes"):
                    row[f"memory_vs_{reference}"] = mine["peak_bytes"] / other["peak_bytes"]
            rows.append(row)
    return rows


def print_table(rows):
    def fmt(value):
        return "   n/a" if value is None else f"{value:6.2f}"

    print("\nratios (time: median; memory: peak above the resting model)")
    print(f"{'mode':8s}{'shape':>10s}  {'model':11s}{'t/BERT':>8s}{'t/HF':>8s}{'mem/BERT':>10s}{'mem/HF':>8s}")
    for row in rows:
        print(f"{row['mode']:8s}{str(row['batch']) + 'x' + str(row['length']):>10s}  {row['model']:11s}"
              f"{fmt(row['time_vs_bert']):>8s}{fmt(row['time_vs_hf-deberta']):>8s}"
              f"{fmt(row['memory_vs_bert']):>10s}{fmt(row['memory_vs_hf-deberta']):>8s}")


def plot(results, models, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(dict.fromkeys(r["mode"] for r in results))
    panels = [(mode, "median_s", "time (s)") for mode in modes] + [("train", "peak_bytes", "peak memory (GiB)")]
    panels = [p for p in panels if any(r["mode"] == p[0] for r in results)]
    figure, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for axis, (mode, key, label) in zip(axes[0], panels, strict=True):
        shapes = list(dict.fromkeys((r["batch"], r["length"]) for r in results if r["mode"] == mode))
        width = 0.8 / len(models)
        for k, name in enumerate(models):
            values = []
            for shape in shapes:
                match = [r for r in results if r["mode"] == mode and r["model"] == name
                         and (r["batch"], r["length"]) == shape and not r.get("error")]
                value = match[0].get(key) if match else None
                value = float("nan") if value is None else value
                values.append(value / 2**30 if key == "peak_bytes" else value)
            axis.bar([i + k * width for i in range(len(shapes))], values, width, label=name)
        axis.set_xticks([i + 0.4 - width / 2 for i in range(len(shapes))], [f"{b}x{n}" for b, n in shapes])
        axis.set_yscale("log")
        axis.set_title(f"{mode}: {label}")
        axis.grid(axis="y", alpha=0.3)
    axes[0][0].legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def memory_pass(args):
    """Runs this script again as a child per mode, shape and model, with a fixed mmap threshold and --memory-json;
    returns their records. Each child holds one model, and one the system kills (out of memory) costs only its own
    measurement, recorded as an error."""
    import subprocess
    import tempfile

    print("\npeak memory (a child process per model and shape, one call after one warm-up call)", flush=True)
    records = []
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=MMAP_THRESHOLD)
    shapes = [("forward", shape) for shape in args.forward_shapes] + [("train", shape) for shape in args.train_shapes]
    for mode, (batch, length) in shapes:
        shape = f"{batch}x{length}"
        for name in args.models:
            with tempfile.TemporaryDirectory() as folder:
                target = Path(folder) / "memory.json"
                command = [sys.executable, str(Path(__file__).resolve()), *sys.argv[1:], "--warmup", "1",
                           "--models", name, "--forward-shapes", shape if mode == "forward" else "",
                           "--train-shapes", shape if mode == "train" else "", "--memory-json", str(target)]
                result = subprocess.run(command, env=env)
                if result.returncode == 0:
                    records += json.loads(target.read_text())
                    continue
            reason = "killed (out of memory?)" if result.returncode < 0 else f"exit status {result.returncode}"
            print(f"  {mode:7s} {batch:2d}x{length:<6d} {name:11s} memory pass {reason}", flush=True)
            records.append(dict(mode=mode, model=name, batch=batch, length=length, peak_bytes=None, error=None))
    return records


def main(argv=None):
    args = parse_args(argv)
    if (args.memory_json and args.device == "cpu"
            and os.environ.get("MALLOC_MMAP_THRESHOLD_") != MMAP_THRESHOLD):
        raise SystemExit("the memory pass needs MALLOC_MMAP_THRESHOLD_=" + MMAP_THRESHOLD)

    import torch

    sys.path.append(str(Path(__file__).resolve().parents[1]))  # only if the package is not installed
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    if args.device == "cpu" and dtype != torch.float32:
        torch.set_default_dtype(dtype)  # CPU: parameters and activations in that dtype

    max_length = max(n for _, n in args.forward_shapes + args.train_shapes)
    models, optimizers = {}, {}
    for name in args.models:
        torch.manual_seed(0)
        models[name] = build_model(name, args, max_length).to(args.device)
        parameters = models[name].parameters()
        optimizers[name] = (torch.optim.SGD(parameters, lr=1e-4) if args.optimizer == "sgd"
                            else torch.optim.AdamW(parameters, lr=1e-4))
    torch.set_default_dtype(torch.float32)

    if args.memory_json is None:
        import transformers

        device_name = torch.cuda.get_device_name() if args.device == "cuda" else _cpu_name()
        print(f"{device_name} ({os.cpu_count()} cores visible), torch {torch.__version__}, transformers "
              f"{transformers.__version__}, device {args.device}, threads {torch.get_num_threads()}, "
              f"clock {args.clock}, dtype {args.dtype}, repeats {args.repeats}, warmup {args.warmup}", flush=True)
    results = []
    run_mode("forward", args.forward_shapes, models, optimizers, args, results)
    run_mode("train", args.train_shapes, models, optimizers, args, results)
    if args.memory_json is not None:
        Path(args.memory_json).write_text(json.dumps(results))
        return
    del models, optimizers
    gc.collect()
    if not args.no_memory:
        merge_memory(results, memory_pass(args))
    rows = ratio_table(results, args.models)
    print_table(rows)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import transformers

    meta = dict(
        command=" ".join(["python", *sys.argv]),
        torch=torch.__version__, transformers=transformers.__version__, python=platform.python_version(),
        device=args.device, device_name=(torch.cuda.get_device_name() if args.device == "cuda"
                                         else _cpu_name()),
        threads=torch.get_num_threads(), clock=args.clock, dtype=args.dtype, repeats=args.repeats, warmup=args.warmup,
        vocab_size=args.vocab_size, dropout=args.dropout, optimizer=args.optimizer,
        geometry=dict(GEOMETRY, num_hidden_layers=args.layers),
        models={name: MODELS[name] for name in args.models},
        memory_method=("torch.cuda.max_memory_allocated above the allocation before the call" if args.device == "cuda"
                       else "peak RSS (VmHWM after /proc/self/clear_refs) above RSS before the call, in a child "
                            f"process with MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD}"),
    )
    (out / "benchmark.json").write_text(json.dumps(dict(meta=meta, results=results, ratios=rows), indent=2))
    if not args.no_plot:
        plot(results, args.models, out / "benchmark.png")
    print(f"\nwrote {out / 'benchmark.json'}" + ("" if args.no_plot else f" and {out / 'benchmark.png'}"))


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


if __name__ == "__main__":
    main()
