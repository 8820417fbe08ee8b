"""One command for a machine with a GPU: are the attention paths right on CUDA, do they train, and how fast are they?

    PYTHONPATH=. python3 scripts/gpu_check.py                                 # one GPU: under 8 minutes
    PYTHONPATH=. python3 scripts/gpu_check.py --disentangled-flash disentangled_flash-1.1.1-py3-none-any.whl
    PYTHONPATH=. python3 scripts/gpu_check.py --smoke                         # CPU, tiny sizes, seconds (tests run it)

(a) parity: every attention path (sdpa, flex_attention) against eager on padded batches, for each variant of the
    position terms, lengths inside and past the bucket range and past max_position: fp32 to 1e-5 (TF32 off), bf16
    and fp16 finite and close to fp32 eager.
(b) a training step of a classifier on every path: fp32, bf16 (autocast), fp16 (autocast + GradScaler); flex with
    attention dropout 0 (FlexAttention has none): loss and gradients finite, parameters updated.
(c) benchmark, DeBERTa-v3-base geometry, bf16, attention dropout 0 for every model: forward (inference_mode) and
    training step (forward, backward, SGD step) time and peak memory at 512, 2048, 8192 and 16384 tokens per
    sequence, for our sdpa and flex_attention paths, transformers' BertModel (SDPA: flash where it applies),
    transformers' DebertaV2Model and, when importable, disentangled-flash through its public API
    (`optimize_deberta`; a wheel or folder passed with --disentangled-flash is put on sys.path, no pip needed).
    Out-of-memory and unsupported cases are caught and recorded; cases past --budget seconds are skipped.

Writes gpu_check.json (with the GPU name, torch, transformers and triton versions) and gpu_check.png (matplotlib,
when installed) into --out. Uses only torch, transformers and, optionally, triton and matplotlib.
"""

import argparse
import functools
import json
import math
import platform
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).resolve().parents[1]))  # the checkout, if the package is not installed

from modeling_deberta_custom import (  # noqa: E402
    DebertaCustomConfig,
    DebertaCustomForSequenceClassification,
    DebertaCustomModel,
)

VARIANTS = {  # the variants of the position terms the parity tests cover
    "v3": {},
    "separate_position_projections": dict(share_att_key=False),
    "c2p_only": dict(pos_att_type=["c2p"]),
    "p2c_only": dict(pos_att_type=["p2c"]),
    "v1_fused_projection": dict(attention_variant="v1", position_buckets=-1, share_att_key=False,
                                norm_rel_ebd="none", max_relative_positions=64),
    "no_relative_attention": dict(relative_attention=False, position_biased_input=True, max_position_embeddings=1024),
}
BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="outputs/gpu_check")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on CPU (or GPU): checks the script runs")
    parser.add_argument("--shapes", default=None, help="BxN list for (c); default 8x512,2x2048,1x8192,1x16384")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budget", type=float, default=420.0, help="seconds after which (c) skips what is left")
    parser.add_argument("--disentangled-flash", default=None, help="wheel or folder of disentangled-flash")
    args = parser.parse_args(argv)
    args.device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    if args.shapes is None:
        args.shapes = "2x32,1x64" if args.smoke else "8x512,2x2048,1x8192,1x16384"
    args.shapes = [tuple(int(x) for x in item.lower().split("x")) for item in args.shapes.split(",")]
    return args


def tiny_or_base(args, **overrides):
    geometry = (dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                     position_buckets=8, max_position_embeddings=64) if args.smoke
                else dict(num_hidden_layers=2, hidden_size=256, num_attention_heads=4, intermediate_size=512,
                          position_buckets=256, max_position_embeddings=512))
    return DebertaCustomConfig(vocab_size=1000, **{**geometry, **overrides})


def batch(vocab_size, batch_size, length, device, generator):
    input_ids = torch.randint(1, vocab_size, (batch_size, length), generator=generator).to(device)
    attention_mask = torch.ones(batch_size, length, dtype=torch.long)
    for row in range(1, batch_size):  # right padding of different lengths; one row fully padded at the end
        attention_mask[row, length - row * length // (2 * batch_size):] = 0
    return input_ids, attention_mask.to(device)


def record(results, section, case, function):
    """Runs function() -> dict; exceptions (OOM included) are recorded, not raised."""
    start = time.perf_counter()
    try:
        entry = function()
    except Exception as error:  # noqa: BLE001 - every failure is a result here
        oom = isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()
        entry = dict(status="oom" if oom else "error", error=f"{type(error).__name__}: {str(error)[:500]}")
        if not oom:
            entry["traceback"] = traceback.format_exc(limit=4)[-1500:]
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    entry = dict(section=section, **case, **entry, seconds=round(time.perf_counter() - start, 2))
    results.append(entry)
    print(json.dumps({k: v for k, v in entry.items() if k != "traceback"}), flush=True)
    return entry


def paths(args):
    # No FlexAttention backward on CPU, and each shape compiles anew there: the CPU smoke run leaves flex out.
    return ["sdpa"] if args.device == "cpu" else ["sdpa", "flex_attention"]


# ----------------------------------------------------------------------------------------------------------------------
# (a) parity
# ----------------------------------------------------------------------------------------------------------------------


def check_parity(args, results):
    lengths = (12, 40, 100) if args.smoke else (100, 300, 600)  # inside / past the bucket range, past max_position
    generator = torch.Generator().manual_seed(0)
    for variant, overrides in VARIANTS.items():
        config = tiny_or_base(args, **overrides)
        torch.manual_seed(0)
        eager = DebertaCustomModel._from_config(config, attn_implementation="eager").to(args.device).eval()
        for length in lengths:
            inputs = batch(config.vocab_size, 3, length, args.device, generator)
            with torch.no_grad():
                expected = eager(*inputs).last_hidden_state
            for path in paths(args):
                for dtype in (torch.float32, torch.bfloat16, torch.float16):
                    case = dict(variant=variant, length=length, path=path, dtype=str(dtype).split(".")[1])
                    record(results, "parity", case, functools.partial(compare, eager, path, dtype, inputs, expected))


def compare(eager, path, dtype, inputs, expected):
    model = DebertaCustomModel._from_config(eager.config, attn_implementation=path).to(inputs[0].device).eval()
    model.load_state_dict(eager.state_dict())
    with torch.no_grad():
        actual = model.to(dtype)(*inputs).last_hidden_state.float()
    error = (actual - expected).abs()
    finite = bool(torch.isfinite(actual).all())
    if dtype == torch.float32:
        ok = finite and bool(torch.allclose(actual, expected, rtol=1e-5, atol=1e-5))
    else:
        ok = finite and float(error.mean()) < 0.05  # half precision keeps 8 to 11 bits of mantissa
    return dict(status="ok" if ok else "fail", max_abs_error=float(error.max()), mean_abs_error=float(error.mean()))


# ----------------------------------------------------------------------------------------------------------------------
# (b) a training step on every path
# ----------------------------------------------------------------------------------------------------------------------


def check_training(args, results):
    generator = torch.Generator().manual_seed(1)
    for path in ["eager", *paths(args)]:
        for dtype in ("float32", "bfloat16", "float16"):
            case = dict(path=path, dtype=dtype)
            record(results, "training", case, functools.partial(training_step, args, path, dtype, generator))


def training_step(args, path, dtype, generator):
    dropout = 0.0 if path == "flex_attention" else 0.1
    config = tiny_or_base(args, num_labels=3, attention_probs_dropout_prob=dropout)
    torch.manual_seed(0)
    model = DebertaCustomForSequenceClassification._from_config(config, attn_implementation=path)
    model = model.to(args.device).train()
    before = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    half = getattr(torch, dtype)
    scaler = torch.amp.GradScaler(args.device, enabled=dtype == "float16")
    input_ids, attention_mask = batch(config.vocab_size, 4, 100 if args.smoke else 600, args.device, generator)
    labels = torch.tensor([0, 1, 2, 0], device=args.device)
    with torch.autocast(args.device, dtype=half, enabled=dtype != "float32"):
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    gradients_finite = all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    scaler.step(optimizer)
    scaler.update()
    updated = sum(not torch.equal(before[name], p) for name, p in model.named_parameters() if name in before)
    ok = math.isfinite(float(loss.detach())) and gradients_finite and updated == len(before)
    return dict(status="ok" if ok else "fail", loss=float(loss.detach()), parameters_updated=f"{updated}/{len(before)}")


# ----------------------------------------------------------------------------------------------------------------------
# (c) benchmark
# ----------------------------------------------------------------------------------------------------------------------


@functools.cache
def import_disentangled_flash(path):
    """The disentangled_flash module, or None. A wheel is unpacked next to it first (the package reads its own
    source files, so it does not import from the zip); a folder is put on sys.path as it is."""
    if path:
        path = Path(path).resolve()
        if path.suffix == ".whl":
            import zipfile

            folder = path.with_suffix("")
            zipfile.ZipFile(path).extractall(folder)
            path = folder
        sys.path.insert(0, str(path))
    try:
        import disentangled_flash

        return disentangled_flash
    except Exception as error:  # noqa: BLE001 - absent or unusable here (no Triton): the benchmark leaves it out
        print(f"disentangled-flash not used: {type(error).__name__}: {error}", flush=True)
        return None


def build(name, args, max_length, training):
    import transformers

    geometry = dict(BASE, num_hidden_layers=2) if args.smoke else BASE
    geometry = dict(geometry, hidden_size=64, num_attention_heads=4, intermediate_size=128) if args.smoke else geometry
    common = dict(vocab_size=8192, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.0, **geometry)
    deberta = dict(common, position_buckets=256, max_relative_positions=-1, relative_attention=True,
                   pos_att_type=["c2p", "p2c"], share_att_key=True, norm_rel_ebd="layer_norm",
                   position_biased_input=False, type_vocab_size=0, max_position_embeddings=512)
    if name in ("ours-sdpa", "ours-flex"):
        config = DebertaCustomConfig(**deberta)
        return DebertaCustomModel._from_config(config, attn_implementation=name.split("-")[1].replace(
            "flex", "flex_attention"))
    if name == "bert":
        config = transformers.BertConfig(**common, max_position_embeddings=max_length)
        return transformers.BertModel._from_config(config, attn_implementation="sdpa")
    config = transformers.DebertaV2Config(**{**deberta, "pos_att_type": "p2c|c2p"})
    model = transformers.DebertaV2Model(config)
    if name == "disentangled-flash":
        flash = import_disentangled_flash(args.disentangled_flash)
        model = model.to(args.device, torch.bfloat16 if args.device == "cuda" else torch.float32)
        if not training:
            model.eval()
        flash.optimize_deberta(model, inference=not training)
    return model


def timed(call, device, repeats):
    call()  # warm-up (and compilation)
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        call()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def benchmark(args, results, started):
    models = ["ours-sdpa", "ours-flex", "bert", "hf-deberta"]
    if args.device == "cpu":
        models.remove("ours-flex")  # no FlexAttention backward on CPU
    if import_disentangled_flash(args.disentangled_flash) is not None:
        models.append("disentangled-flash")
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    max_length = max(length for _, length in args.shapes)
    generator = torch.Generator().manual_seed(2)
    for batch_size, length in args.shapes:
        input_ids = torch.randint(1, 8192, (batch_size, length), generator=generator).to(args.device)
        attention_mask = torch.ones_like(input_ids)
        for mode in ("forward", "train"):
            for name in models:
                case = dict(model=name, mode=mode, batch=batch_size, length=length)
                if time.perf_counter() - started > args.budget:
                    results.append(dict(section="benchmark", **case, status="skipped", error="time budget"))
                    continue
                record(results, "benchmark", case, functools.partial(measure, name, mode, args, max_length, dtype,
                                                                     input_ids, attention_mask))


def measure(name, mode, args, max_length, dtype, input_ids, attention_mask):
    training = mode == "train"
    model = build(name, args, max_length, training).to(args.device, dtype)
    model.train(training)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)

    def forward():
        with torch.inference_mode():
            model(input_ids=input_ids, attention_mask=attention_mask)

    def train():
        output = model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        output.float().pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    call = train if training else forward
    if args.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    seconds = timed(call, args.device, args.repeats)
    entry = dict(status="ok", ms=round(seconds * 1e3, 3))
    if args.device == "cuda":
        entry["peak_gib"] = round((torch.cuda.max_memory_allocated() - base) / 2**30, 3)
    return entry


def ratios(results):
    table = {}
    for entry in results:
        if entry["section"] == "benchmark" and entry.get("status") == "ok":
            table[(entry["mode"], entry["batch"], entry["length"], entry["model"])] = entry["ms"]
    out = []
    for (mode, batch_size, length, name), ms in sorted(table.items()):
        row = dict(mode=mode, batch=batch_size, length=length, model=name, ms=ms)
        for reference in ("bert", "hf-deberta"):
            if (mode, batch_size, length, reference) in table:
                row[f"vs_{reference}"] = round(ms / table[(mode, batch_size, length, reference)], 3)
        out.append(row)
    return out


def plot(results, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for axis, mode in zip(axes, ("forward", "train"), strict=True):
        series = {}
        for entry in results:
            if entry["section"] == "benchmark" and entry["mode"] == mode and entry.get("status") == "ok":
                series.setdefault(entry["model"], []).append((entry["batch"] * entry["length"], entry["ms"]))
        for name, points in series.items():
            axis.plot(*zip(*sorted(points), strict=True), marker="o", label=name)
        axis.set(xscale="log", yscale="log", xlabel="tokens per batch", ylabel="ms", title=mode)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path)
    return True


def environment(args):
    import transformers

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    flash = import_disentangled_flash(args.disentangled_flash)
    return dict(
        device=torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or platform.machine(),
        torch=torch.__version__, cuda=torch.version.cuda, transformers=transformers.__version__,
        triton=triton_version, disentangled_flash=getattr(flash, "__version__", None), python=platform.python_version(),
        command=" ".join(["python3", *sys.argv]), smoke=args.smoke, shapes=args.shapes, repeats=args.repeats,
    )


def main(argv=None):
    args = parse_args(argv)
    started = time.perf_counter()
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 parity to 1e-5 needs full fp32 products
    torch.backends.cudnn.allow_tf32 = False
    results = []
    check_parity(args, results)
    check_training(args, results)
    benchmark(args, results, started)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = dict(environment=environment(args), seconds=round(time.perf_counter() - started, 1),
                  ratios=ratios(results), results=results)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2))
    plotted = plot(results, out / "gpu_check.png")
    failures = [e for e in results if e["section"] != "benchmark" and e.get("status") != "ok"]
    print(f"wrote {out / 'gpu_check.json'}" + (f" and {out / 'gpu_check.png'}" if plotted else "")
          + f"; {len(failures)} parity/training failures; {report['seconds']} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
