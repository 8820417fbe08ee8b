"""Speed and memory of our DeBERTa against transformers' DebertaV2 and BERT (SDPA) at the same geometry.

Every model has the DeBERTa-v3-base geometry (hidden 768, 12 layers, 12 heads, intermediate 3072; DeBERTa with 256
position buckets and max_position 512), the same reduced vocabulary and each library's default dropout (0.1 for all
of them, except `ours-flex`: FlexAttention has no attention dropout, so that model has none; pass `--dropout 0` to
compare training steps like for like). Measured in one process, alternating between models inside every repeat (the
starting model rotates), so that machine noise hits all models alike; reported are medians over the repeats.

Two suites (--suite, default shapes):

shapes: full rectangles (every token real) at a few batch x length shapes.
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

real: batches with the length distributions of GLUE training data (lengths from the official DeBERTa-v3 tokenizer,
  benchmarks/data): SST-2 sentences at batch 32 and RTE pairs at batch 8. Each measured call runs --real-batches
  batches (training steps, or forward passes); reported are real tokens per second and examples per second, for
  - orders: `random` (a shuffled epoch, what a DataLoader gives), `grouped` (the Trainer's group_by_length: sorted
    by length within mega-batches of 50 batches), `fixed` (full rectangles holding the same number of tokens, every
    one real: ModernBERT's reference; variable over fixed is its "padding costs nothing" measure);
  - variants: ours padded, ours unpadded (config.unpad_inputs, issue 20), ours packed (batches as transformers'
    DataCollatorWithFlattening packs them: input_ids [1, T], position_ids restarting at 0), transformers' DebertaV2
    padded and BERT with SDPA padded (on CUDA also our flex_attention padded, and disentangled-flash padded and
    packed when given). Variants this checkout cannot run are recorded as skipped with the reason.

Writes benchmark.json (with the machine: CPU model or GPU, torch, transformers, triton) and benchmark.png into --out.

    python benchmarks/benchmark.py                       # CPU, 2 threads, 2 repeats (~15 min on 2 quiet cores)
    python benchmarks/benchmark.py --threads 1 --clock cpu   # CPU time: robust when other processes share the cores
    python benchmarks/benchmark.py --suite real --real-batches 4   # SST-2 b32 and RTE b8, v3-base (CPU: long)
    python benchmarks/benchmark.py --suite shapes,real --quick     # tiny sizes, seconds: checks that it runs
    python benchmarks/benchmark.py --device cuda --dtype bfloat16 --dropout 0

`ours-flex` compiles FlexAttention once per shape during the warm-up, and has no training step on CPU (torch has no
FlexAttention backward there): its train rows read "not supported".
"""

import argparse
import contextlib
import functools
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # harness

import harness  # noqa: E402

MMAP_THRESHOLD = "65536"
MODELS = {name: harness.MODELS[name] for name in ("ours", "ours-eager", "ours-flex", "hf-deberta", "bert")}

# Variants of the real-length suite: name -> (model, layout).
REAL_VARIANTS = {
    "ours-padded": ("ours", "padded"),
    "ours-unpadded": ("ours", "unpadded"),
    "ours-packed": ("ours", "packed"),
    "ours-flex-padded": ("ours-flex", "padded"),
    "hf-deberta-padded": ("hf-deberta", "padded"),
    "bert-padded": ("bert", "padded"),
    "disentangled-flash-padded": ("disentangled-flash", "padded"),
    "disentangled-flash-packed": ("disentangled-flash", "packed"),
}
ORDERS = ("random", "grouped", "fixed")


def parse_shapes(text):
    """'8x128,2x512' -> [(8, 128), (2, 512)]"""
    if not text:
        return []
    shapes = []
    for item in text.split(","):
        batch, length = item.lower().split("x")
        shapes.append((int(batch), int(length)))
    return shapes


def comma_list(text):
    return [item.strip() for item in text.split(",") if item.strip()] if text else []


def default_real_variants(device, flash_given):
    names = ["ours-padded", "ours-unpadded", "ours-packed", "hf-deberta-padded", "bert-padded"]
    if device == "cuda":
        names.insert(3, "ours-flex-padded")
    if flash_given:
        names += ["disentangled-flash-padded", "disentangled-flash-packed"]
    return names


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--suite", default="shapes", help="comma list of shapes, real")
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
    parser.add_argument("--quick", action="store_true",
                        help="tiny geometry and sizes, one repeat: checks that the suites run (seconds)")
    parser.add_argument("--forward-shapes", default=None, help="BxN list; default CPU 8x128,2x512,1x2048")
    parser.add_argument("--train-shapes", default=None, help="BxN list; default CPU 8x128,4x512,1x2048")
    parser.add_argument("--models", default=",".join(MODELS), help=f"shapes suite: comma list of {list(MODELS)}")
    parser.add_argument("--real-batches", type=int, default=None,
                        help="real suite: batches per measured call (default 8 on CUDA, 4 on CPU, 2 with --quick)")
    parser.add_argument("--datasets", default="sst2,rte", help=f"real suite: comma list of {list(harness.REAL_DATASETS)}")
    parser.add_argument("--orders", default=",".join(ORDERS), help=f"real suite: comma list of {list(ORDERS)}")
    parser.add_argument("--modes", default="train,forward", help="real suite: comma list of train, forward")
    parser.add_argument("--variants", default=None, help=f"real suite: comma list of {list(REAL_VARIANTS)}")
    parser.add_argument("--disentangled-flash", default=None, help="wheel or folder of disentangled-flash (real suite)")
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
    args.suite = comma_list(args.suite)
    if set(args.suite) - {"shapes", "real"}:
        parser.error(f"--suite takes shapes and/or real, got {args.suite}")
    if args.forward_shapes is None:
        args.forward_shapes = ("2x32,1x64" if args.quick else
                               "8x128,2x512,1x2048" + (",1x4096,1x8192,1x16384" if gpu else ""))
    if args.train_shapes is None:
        args.train_shapes = ("2x32,1x64" if args.quick else
                             "8x128,4x512,1x2048" + (",1x4096,1x8192,1x16384" if gpu else ""))
    if args.real_batches is None:
        args.real_batches = 2 if args.quick else (8 if gpu else 4)
    if args.quick:
        args.repeats = 1
        args.layers = harness.TINY["num_hidden_layers"]
    args.forward_shapes = parse_shapes(args.forward_shapes)
    args.train_shapes = parse_shapes(args.train_shapes)
    args.models = comma_list(args.models)
    unknown = [m for m in args.models if m not in MODELS]
    if unknown:
        parser.error(f"unknown models {unknown}; choose from {list(MODELS)}")
    if args.config is not None and args.models != ["ours"]:
        parser.error("--config measures one of our checkpoints' geometry: pass --models ours")
    args.datasets, args.orders, args.modes = map(comma_list, (args.datasets, args.orders, args.modes))
    if set(args.modes) - {"train", "forward"}:
        parser.error(f"--modes takes train and/or forward, got {args.modes}")
    args.variants = (comma_list(args.variants) if args.variants
                     else default_real_variants(args.device, args.disentangled_flash is not None))
    unknown = [v for v in args.variants if v not in REAL_VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {list(REAL_VARIANTS)}")
    return args


def geometry(args):
    base = harness.TINY if args.quick else harness.V3_BASE
    return dict(base, num_hidden_layers=args.layers)


# ----------------------------------------------------------------------------------------------------------------------
# Calls
# ----------------------------------------------------------------------------------------------------------------------


def autocast_context(device, dtype_name, pure):
    """Half precision on CUDA: autocast over fp32 parameters, unless the parameters are already in that dtype (pure)."""
    import torch

    if device == "cuda" and dtype_name != "float32" and not pure:
        return torch.autocast("cuda", dtype=getattr(torch, dtype_name))
    return contextlib.nullcontext()


def forward_call(model, inputs, args):
    import torch

    model.eval()
    with torch.inference_mode(), autocast_context(args.device, args.dtype, getattr(args, "pure_dtype", False)):
        model(**inputs)


def train_call(model, optimizer, inputs, args):
    model.train()
    with autocast_context(args.device, args.dtype, getattr(args, "pure_dtype", False)):
        hidden = model(**inputs).last_hidden_state
        loss = hidden.float().pow(2).mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def make_optimizer(model, args):
    import torch

    if args.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=1e-4)
    return torch.optim.SGD(model.parameters(), lr=1e-4)


# ----------------------------------------------------------------------------------------------------------------------
# Suite "shapes": full rectangles
# ----------------------------------------------------------------------------------------------------------------------


def make_inputs(batch, length, args, seed):
    import torch

    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, args.vocab_size, (batch, length), generator=generator)
    attention_mask = torch.ones(batch, length, dtype=torch.long)  # what a tokenizer returns
    return dict(input_ids=input_ids.to(args.device), attention_mask=attention_mask.to(args.device))


def run_mode(mode, shapes, models, optimizers, args, results):
    """Times (args.memory_json unset) or peak memory (set) of every model at every shape, appended to results."""
    measuring_memory = args.memory_json is not None
    for batch, length in shapes:
        inputs = make_inputs(batch, length, args, seed=length)

        def call_for(name, inputs=inputs):
            if mode == "forward":
                return lambda: forward_call(models[name], inputs, args)
            return lambda: train_call(models[name], optimizers[name], inputs, args)

        calls = {name: call_for(name) for name in models}
        if measuring_memory:  # one model per child process: one warm-up call, then the measured one
            samples = harness.alternate(calls, 0, args.device, warmup=args.warmup)
            for name, entry in samples.items():
                if entry["error"] is None:
                    with harness.PeakMemory(args.device) as memory:
                        calls[name]()
                    entry["peak_bytes"] = memory.peak
        else:
            samples = harness.alternate(calls, args.repeats, args.device, warmup=args.warmup, clock=args.clock,
                                        on_failure=lambda name: optimizers[name].zero_grad(set_to_none=True))
        for name, entry in samples.items():
            record = dict(mode=mode, model=name, batch=batch, length=length, error=entry["error"])
            if measuring_memory:
                record["peak_bytes"] = entry.get("peak_bytes")
                shown = entry["error"] or f"{record['peak_bytes'] / 2**20:9.1f} MiB"
            else:
                record.update(times_s=entry["times_s"], median_s=entry["median_s"])
                shown = entry["error"] or f"{record['median_s'] * 1000:9.1f} ms"
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
                command = [sys.executable, str(Path(__file__).resolve()), *(args.argv or []), "--suite", "shapes",
                           "--warmup", "1", "--models", name,
                           "--forward-shapes", shape if mode == "forward" else "",
                           "--train-shapes", shape if mode == "train" else "", "--memory-json", str(target)]
                result = subprocess.run(command, env=env)
                if result.returncode == 0:
                    records += json.loads(target.read_text())
                    continue
            reason = "killed (out of memory?)" if result.returncode < 0 else f"exit status {result.returncode}"
            print(f"  {mode:7s} {batch:2d}x{length:<6d} {name:11s} memory pass {reason}", flush=True)
            records.append(dict(mode=mode, model=name, batch=batch, length=length, peak_bytes=None, error=None))
    return records


def run_shapes(args):
    """The shapes suite: results (times, then peak memory from the child processes) and ratio rows."""
    import torch

    dtype = getattr(torch, args.dtype)
    if args.device == "cpu" and dtype != torch.float32:
        torch.set_default_dtype(dtype)  # CPU: parameters and activations in that dtype
    max_length = max(n for _, n in args.forward_shapes + args.train_shapes)
    models, optimizers = {}, {}
    for name in args.models:
        torch.manual_seed(0)
        models[name] = harness.build_model(name, geometry(args), args.vocab_size, args.dropout, max_length,
                                           config_path=args.config).to(args.device)
        optimizers[name] = make_optimizer(models[name], args)
    torch.set_default_dtype(torch.float32)
    results = []
    run_mode("forward", args.forward_shapes, models, optimizers, args, results)
    run_mode("train", args.train_shapes, models, optimizers, args, results)
    if args.memory_json is not None:
        Path(args.memory_json).write_text(json.dumps(results))
        return results, []
    del models, optimizers
    harness.free_memory(args.device)
    if not args.no_memory:
        merge_memory(results, memory_pass(args))
    rows = ratio_table(results, args.models)
    print_table(rows)
    return results, rows


# ----------------------------------------------------------------------------------------------------------------------
# Suite "real": GLUE length distributions, padded, unpadded and packed
# ----------------------------------------------------------------------------------------------------------------------


def real_batches(dataset, order, count, seed=0):
    lengths = harness.load_lengths(dataset)
    batch_size = harness.REAL_DATASETS[dataset][1]
    randomly = harness.random_batches(lengths, batch_size, count, seed)
    if order == "random":
        return randomly
    if order == "grouped":
        return harness.length_grouped_batches(lengths, batch_size, count, seed)
    if order == "fixed":
        return harness.fixed_batches(randomly)
    raise ValueError(f"unknown order {order!r}")


def skip_reason(variant, args, flash):
    """Why this checkout or machine cannot run a variant, or None."""
    model, layout = REAL_VARIANTS[variant]
    if model.startswith("ours") and layout in ("unpadded", "packed") and not harness.unpadding_supported():
        return "this checkout's DebertaCustomConfig has no unpad_inputs (issue 20 not merged)"
    if model == "ours-flex" and args.device == "cpu":
        return "no FlexAttention backward on CPU, and a compilation per shape"
    if model == "disentangled-flash" and flash is None:
        return "disentangled-flash not importable (pass --disentangled-flash WHEEL)"
    return None


class RealVariant:
    """One model and one layout of the real suite, with what a measured call needs: the model (on its device and
    dtype), its optimizer, and the inputs of each batch."""

    def __init__(self, variant, args, mode, flash, widths):
        import torch

        self.variant, self.mode, self.args = variant, mode, args
        self.model_name, self.layout = REAL_VARIANTS[variant]
        training = mode == "train"
        unpad = None  # packed: the config's default
        if self.model_name.startswith("ours") and self.layout != "packed" and harness.unpadding_supported():
            unpad = self.layout == "unpadded"  # padded: the switch off, whatever the default
        torch.manual_seed(0)
        with torch.device(args.device):  # parameters initialised where they live (seconds saved per model on CUDA)
            model = harness.build_model(self.model_name, geometry(args), args.vocab_size, args.dropout,
                                        unpad_inputs=unpad)
        dtype = getattr(torch, args.dtype)
        pure = getattr(args, "pure_dtype", False) or args.device == "cpu"
        self.model = model.to(args.device, dtype if pure else torch.float32)
        self.model.train(training)
        self.backend = None
        if self.model_name == "disentangled-flash":
            self.backend = harness.optimize_disentangled_flash(flash, self.model, training, widths)
        self.optimizer = make_optimizer(self.model, args) if training else None
        self.flash_kwargs = self.layout == "packed" and (
            self.model_name == "disentangled-flash" or harness.accepts(self.model.forward, "cu_seq_lens_q"))

    def inputs(self, lengths, generator):
        if self.layout == "packed":
            return harness.packed_inputs(lengths, self.args.vocab_size, self.args.device, generator,
                                         flash_kwargs=self.flash_kwargs)
        return harness.padded_inputs(lengths, self.args.vocab_size, self.args.device, generator)

    def hidden_states(self, inputs):
        if self.model_name != "disentangled-flash":
            return self.model(**inputs).last_hidden_state
        encoder = self.model.encoder
        if self.layout == "packed":  # its own entry for packed tokens: [T, C] and cumulative sequence lengths
            tokens = self.model.embeddings(input_ids=inputs["input_ids"])[0]
            return encoder.forward_packed(tokens, inputs["cu_seq_lens_q"], int(inputs["max_length_q"]),
                                          output_hidden_states=False).last_hidden_state
        if encoder.inference:
            encoder.activate_shape(inputs["input_ids"].shape[1])
        return self.model(**inputs).last_hidden_state

    def call(self, batches_inputs):
        """One measured call: a training step or a forward pass on every batch."""
        import torch

        args = self.args
        pure = getattr(args, "pure_dtype", False)
        for inputs in batches_inputs:
            if self.mode == "forward":
                with torch.inference_mode(), autocast_context(args.device, args.dtype, pure):
                    self.hidden_states(inputs)
                continue
            with autocast_context(args.device, args.dtype, pure):
                loss = self.hidden_states(inputs).float().pow(2).mean()
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)


def witnessed(call, record):
    """call, with FlexAttention's fallback to its unfused path recorded into record (see harness.flex_witness)."""

    def run():
        with harness.flex_witness() as seen:
            call()
        record["compiled_graphs"] = record.get("compiled_graphs", 0) + seen["compiled_graphs"]
        if seen["unfused"]:
            record["unfused_reasons"] = sorted(set(record.get("unfused_reasons", [])) | set(seen["reasons"]))

    return run


def run_real(args, add, deadline=None, flash=None):
    """The real suite; every result goes through add(entry) as it comes (gpu_check writes it at once). Past
    `deadline` (time.time()), what is left is recorded as skipped. Training first, then inference."""
    for mode, dataset in [(mode, dataset) for mode in args.modes for dataset in args.datasets]:
        orders = {order: real_batches(dataset, order, args.real_batches) for order in args.orders}
        case = dict(section="real", dataset=dataset, batch_size=harness.REAL_DATASETS[dataset][1], mode=mode)
        runners = build_runners(args, case, orders, add, deadline, flash)
        for order, batches in orders.items():
            measure_order(args, runners, dict(case, order=order), batches, add, deadline)
        del runners
        harness.free_memory(args.device)


def build_runners(args, case, orders, add, deadline, flash):
    """{variant: RealVariant} for what can run; the others recorded (skipped or error) for every order."""
    widths = sorted({max(batch) for batches in orders.values() for batch in batches})
    runners = {}
    for variant in args.variants:
        reason = skip_reason(variant, args, flash)
        if reason is None and deadline is not None and time.time() > deadline:
            reason = "time budget"
        try:
            if reason is None:
                runners[variant] = RealVariant(variant, args, case["mode"], flash, widths)
                continue
            status = "skipped"
        except Exception as error:  # noqa: BLE001 - a variant that cannot be built is a result
            status, reason = "error", f"{type(error).__name__}: {str(error)[:300]}"
        for order in orders:
            add(dict(case, order=order, model=variant, status=status, error=reason))
    return runners


def measure_order(args, runners, case, batches, add, deadline):
    """Every runner on the same batches (the same tokens), alternating; one entry per runner."""
    import torch

    stats = harness.batch_stats(batches)
    records, calls = {}, {}
    for variant, runner in runners.items():
        generator = torch.Generator().manual_seed(1)
        batches_inputs = [runner.inputs(lengths, generator) for lengths in batches]
        records[variant] = {}
        calls[variant] = witnessed(functools.partial(runner.call, batches_inputs), records[variant])
    samples = harness.alternate(
        calls, args.repeats, args.device, warmup=args.warmup, clock=args.clock, deadline=deadline,
        max_seconds=getattr(args, "case_seconds", None),
        on_failure=functools.partial(release_gradients, {n: r.model for n, r in runners.items()}))
    for variant, sample in samples.items():
        add(real_entry(dict(case, model=variant, **stats), sample, records[variant], runners[variant]))


def release_gradients(models, name):
    """After a failed call (out of memory mid-step): what the step left in .grad goes."""
    models[name].zero_grad(set_to_none=True)


def real_entry(case, sample, seen, runner):
    entry = dict(case, attention=getattr(runner.model.config, "_attn_implementation", None),
                 status=harness.sample_status(sample["error"]),
                 error=sample["error"], times_s=sample["times_s"], median_s=sample["median_s"],
                 warmup_s=sample.get("warmup_s"), **seen)
    if runner.backend is not None:
        entry["backend"] = runner.backend
        entry["fused"] = runner.backend == "triton"
    if runner.model_name == "ours-flex":
        entry["fused"] = not seen.get("unfused_reasons")
    if sample["median_s"]:
        entry["tokens_per_s"] = round(case["real_tokens"] / sample["median_s"], 1)
        entry["examples_per_s"] = round(case["examples"] / sample["median_s"], 2)
    if "traceback" in sample:
        entry["traceback"] = sample["traceback"]
    return entry


def print_real(entries):
    rows = [e for e in entries if e.get("section") == "real"]
    if not rows:
        return
    print("\nreal lengths: real tokens/s (examples/s); variable over fixed-length throughput in brackets")
    fixed = {(e["dataset"], e["mode"], e["model"]): e.get("tokens_per_s") for e in rows if e["order"] == "fixed"}
    for e in rows:
        if e["status"] != "ok":
            shown = f"{e['status']}: {e.get('error')}"
        else:
            reference = fixed.get((e["dataset"], e["mode"], e["model"]))
            ratio = f" [{e['tokens_per_s'] / reference:.2f}]" if reference and e["order"] != "fixed" else ""
            shown = f"{e['tokens_per_s']:10.1f} ({e['examples_per_s']:.1f}){ratio}"
        print(f"  {e['dataset']:5s} b{e['batch_size']:<3d} {e['mode']:8s} {e['order']:8s} {e['model']:26s} {shown}")


# ----------------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------------


def plot(results, models, path, title=""):
    """One row of panels per suite: shapes (time per mode, peak memory; log scale), real (real tokens/s per mode).
    Every shape, or data set and order, has its own place on the x axis (8x512 and 2x2048 hold as many tokens)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes_rows = [r for r in results if r.get("section", "shapes") == "shapes" and not r.get("error")]
    real_rows = [r for r in results if r.get("section") == "real" and r.get("tokens_per_s")]
    rows_of_panels = []
    if shapes_rows:
        panels = [(mode, "median_s", "time (s)") for mode in dict.fromkeys(r["mode"] for r in shapes_rows)]
        if any(r.get("peak_bytes") for r in shapes_rows):
            panels += [(mode, "peak_bytes", "peak memory (GiB)") for mode in ("forward", "train")
                       if any(r["mode"] == mode and r.get("peak_bytes") for r in shapes_rows)]
        rows_of_panels.append(("shapes", panels))
    if real_rows:
        rows_of_panels.append(("real", [(mode, "tokens_per_s", "real tokens / s")
                                        for mode in dict.fromkeys(r["mode"] for r in real_rows)]))
    if not rows_of_panels:
        return False
    columns = max(len(panels) for _, panels in rows_of_panels)
    figure, axes = plt.subplots(len(rows_of_panels), columns, figsize=(6.2 * columns, 4.6 * len(rows_of_panels)),
                                squeeze=False)
    for row, (suite, panels) in enumerate(rows_of_panels):
        for column in range(columns):
            axis = axes[row][column]
            if column >= len(panels):
                axis.set_visible(False)
                continue
            mode, key, unit = panels[column]
            if suite == "shapes":
                rows = [r for r in shapes_rows if r["mode"] == mode]
                names = [m for m in models if any(r["model"] == m for r in rows)]
                bar_panel(axis, rows, names, key, lambda r: f"{r['batch']}x{r['length']}",
                          scale=2**30 if key == "peak_bytes" else 1)
                axis.set_yscale("log")
            else:
                rows = [r for r in real_rows if r["mode"] == mode]
                bar_panel(axis, rows, list(dict.fromkeys(r["model"] for r in rows)), key,
                          lambda r: f"{r['dataset']} b{r['batch_size']}\n{r['order']}")
            axis.set_title(f"{suite}, {mode}: {unit}")
            axis.grid(axis="y", alpha=0.3)
            axis.legend(fontsize=7)
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def bar_panel(axis, rows, names, key, group_of, scale=1):
    """Bars of rows[key] per group (a shape, or a data set and order) and name: every group its own x position."""
    groups = list(dict.fromkeys(group_of(r) for r in rows))
    width = 0.8 / max(1, len(names))
    for k, name in enumerate(names):
        values = []
        for group in groups:
            match = [r for r in rows if r["model"] == name and group_of(r) == group and not r.get("error")]
            value = match[0].get(key) if match else None
            values.append(float("nan") if value is None else value / scale)
        axis.bar([i + k * width for i in range(len(groups))], values, width, label=name)
    axis.set_xticks([i + 0.4 - width / 2 for i in range(len(groups))], groups, fontsize=7)


def main(argv=None):
    args = parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if (args.memory_json and args.device == "cpu"
            and os.environ.get("MALLOC_MMAP_THRESHOLD_") != MMAP_THRESHOLD):
        raise SystemExit("the memory pass needs MALLOC_MMAP_THRESHOLD_=" + MMAP_THRESHOLD)

    import torch

    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    if args.memory_json is not None:
        run_shapes(args)
        return None

    info = harness.machine(args.device)
    print(f"{harness.describe(info)}; device {args.device}, clock {args.clock}, dtype {args.dtype}, repeats "
          f"{args.repeats}, warmup {args.warmup}", flush=True)
    results, rows = [], []
    if "shapes" in args.suite:
        results, rows = run_shapes(args)
    if "real" in args.suite:
        flash = harness.import_disentangled_flash(args.disentangled_flash) if args.disentangled_flash else None
        real = []
        run_real(args, real.append, flash=flash)
        print_real(real)
        results += real

    out = Path(args.out)
    meta = dict(
        command=" ".join(["python", "benchmarks/benchmark.py", *args.argv]), machine=info,
        device=args.device, device_name=info["gpu"] or info["cpu"], torch=info["torch"],
        transformers=info["transformers"], threads=torch.get_num_threads(), clock=args.clock, dtype=args.dtype,
        repeats=args.repeats, warmup=args.warmup, vocab_size=args.vocab_size, dropout=args.dropout,
        optimizer=args.optimizer, geometry=geometry(args), models={name: MODELS[name] for name in args.models},
        real=dict(batches_per_call=args.real_batches, datasets=args.datasets, orders=args.orders,
                  variants=args.variants, unpadding_supported=harness.unpadding_supported()),
        memory_method=("torch.cuda.max_memory_allocated above the allocation before the call" if args.device == "cuda"
                       else "peak RSS (VmHWM after /proc/self/clear_refs) above RSS before the call, in a child "
                            f"process with MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD}"),
    )
    harness.write_json(out / "benchmark.json", dict(meta=meta, results=results, ratios=rows))
    if not args.no_plot:
        plot(results, args.models, out / "benchmark.png", title=harness.describe(info))
    print(f"\nwrote {out / 'benchmark.json'}" + ("" if args.no_plot else f" and {out / 'benchmark.png'}"))
    return dict(meta=meta, results=results, ratios=rows)


if __name__ == "__main__":
    main()
