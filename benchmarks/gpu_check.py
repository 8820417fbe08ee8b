"""One command for a machine with a GPU: are the attention paths right on CUDA, do they train, and how fast are they?

    PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --out $OUT \\
        --disentangled-flash .whl/disentangled_flash-1.1.1-py3-none-any.whl      # one H200: about 8 minutes
    PYTHONPATH=. python benchmarks/gpu_check.py --smoke --out /tmp/gpu_check     # CPU rehearsal, tiny sizes (tests)

Four phases, each in its own process (a CUDA error or an out-of-memory case cannot poison the next phase), each
writing phase_<name>.json after every case (a run cut off keeps what it measured), each with its share of --budget
seconds (time a phase leaves unused goes to the next ones; a phase past its share plus a grace period is killed):

(shapes) benchmark first, longest inputs first (1x16384, 1x8192, 2x2048, 8x512), DeBERTa-v3-base geometry, bf16,
    attention dropout 0 for every model: forward (inference_mode) and training step (forward, backward, SGD step),
    median time over alternating repeats and peak memory, for our sdpa and flex_attention paths, transformers'
    BertModel (SDPA) and DebertaV2Model and disentangled-flash (its optimize_deberta; Triton on CUDA).
(real) GLUE length distributions (benchmarks/data): SST-2 at batch 32 and RTE at batch 8, in random order, grouped
    by length as the Trainer's group_by_length does, and as full rectangles of the same token count: ours padded,
    unpadded and packed (issue 20's unpad_inputs and DataCollatorWithFlattening batches, when this checkout has
    them; skipped with the reason otherwise), our flex_attention padded, DebertaV2 and BERT padded,
    disentangled-flash padded and packed: real tokens/s and examples/s, training and inference.
(parity) every path (sdpa, flex_attention) against eager for each variant of the position terms, at lengths inside
    and past the bucket range and past max_position, on a batch with full, right-padded, left-padded and fully
    padded rows. Each model gets its own copy of the config and the reference is asserted to be eager before each
    run. fp32 to 1e-5 (TF32 off). bf16 and fp16 against eager in the same dtype: the path's error must stay within
    a small multiple of eager's own half-precision error against fp32 (a broken path fails: tests/test_gpu_check.py).
(training) one classifier training step per path and dtype (fp32; bf16 autocast; fp16 autocast + GradScaler),
    dropout 0: loss and gradients against eager's in the same dtype, parameters updated.

Every FlexAttention case says whether the fused kernel ran (`fused`): dynamo's recompile limit is raised to fit
the cases, dynamo is reset between sections, and a fallback to FlexAttention's unfused path (torch's own warning,
or dynamo's recompile-limit warning) makes the case `fused: false`; in parity and training that is a failure.

Writes gpu_check.json (machine, every result, ratios, a summary) and gpu_check.png into --out after every phase;
exits 1 if a parity or training case fails or a FlexAttention case ran unfused.
"""

import argparse
import contextlib
import copy
import functools
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # harness, benchmark

import benchmark  # noqa: E402
import harness  # noqa: E402

from modeling_deberta_custom import (  # noqa: E402
    DebertaCustomConfig,
    DebertaCustomForSequenceClassification,
    DebertaCustomModel,
)

PHASES = {"shapes": 0.28, "real": 0.30, "parity": 0.24, "training": 0.18}  # shares of --budget
GRACE_S = 45  # a case started just before a phase's deadline may finish (a compilation takes tens of seconds)

VARIANTS = {  # the variants of the position terms the parity tests cover
    "v3": {},
    "separate_position_projections": dict(share_att_key=False),
    "c2p_only": dict(pos_att_type=["c2p"]),
    "p2c_only": dict(pos_att_type=["p2c"]),
    "v1_fused_projection": dict(attention_variant="v1", position_buckets=-1, share_att_key=False,
                                norm_rel_ebd="none", max_relative_positions=64),
    "no_relative_attention": dict(relative_attention=False, position_biased_input=True, max_position_embeddings=1024),
}
DTYPES = ("float32", "bfloat16", "float16")

# Parity models are initialised 5x wider than DeBERTa's 0.02: with 0.02, attention logits at init are ~0.05, the
# attention nearly uniform, and a path that averages uniformly or drops the position terms moves the output by less
# than half-precision rounding. At 0.1 they matter (tests/test_gpu_check.py breaks a path and sees it fail).
PARITY_INIT = 0.1
# The path against eager in the same dtype, mean and max |error| over real tokens, may be at most ERROR_FACTOR times
# eager's own error in that dtype (against eager in fp64 for fp32, in fp32 for bf16 and fp16): "as close to eager as
# eager is to exact". fp32 also passes within FP32_TOLERANCE (allclose rtol = atol, TF32 off).
ERROR_FACTOR = 3.0
FP32_TOLERANCE = 1e-5
WIDER = {"float32": "float64", "bfloat16": "float32", "float16": "float32"}
GRAD_FP32_TOLERANCE = 1e-3  # max |g_path - g_eager| / max |g_eager|, per parameter, worst over parameters
GRAD_HALF_COSINE = 0.99  # cosine similarity of all gradients, path against eager in the same dtype


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="outputs/gpu_check")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on CPU (or GPU): checks the script runs")
    parser.add_argument("--budget", type=float, default=None, help="seconds for all phases (GPU 450, smoke 600)")
    parser.add_argument("--phases", default=",".join(PHASES), help=f"comma list of {list(PHASES)}, run in that order")
    parser.add_argument("--shapes", default=None, help="BxN list for (shapes); default 1x16384,1x8192,2x2048,8x512")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per case (GPU 3, smoke 1)")
    parser.add_argument("--real-batches", type=int, default=None, help="batches per measured call in (real)")
    parser.add_argument("--paths", default=None, help="paths checked against eager (GPU sdpa,flex_attention; CPU sdpa)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"parity: comma list of {list(VARIANTS)}")
    parser.add_argument("--case-seconds", type=float, default=30.0,
                        help="benchmarks: stop repeating a call once its timed calls would pass this (one sample kept)")
    parser.add_argument("--recompile-limit", type=int, default=64, help="dynamo's, per compiled function")
    parser.add_argument("--disentangled-flash", default=None, help="wheel or folder of disentangled-flash")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads on CPU (smoke: 1; threads that wait for each other on a shared machine "
                             "cost more than they give at tiny sizes)")
    parser.add_argument("--in-process", action="store_true", help="run the phases in this process (tests)")
    parser.add_argument("--phase", default=None, help=argparse.SUPPRESS)  # internal: run one phase
    parser.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)  # internal: time.time()
    args = parser.parse_args(argv)
    args.device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    args.phases = benchmark.comma_list(args.phases)
    unknown = set(args.phases) - set(PHASES)
    if unknown:
        parser.error(f"unknown phases {sorted(unknown)}; choose from {list(PHASES)}")
    if args.budget is None:
        args.budget = 600.0 if args.smoke else 450.0
    if args.shapes is None:
        args.shapes = "1x64,2x32" if args.smoke else "1x16384,1x8192,2x2048,8x512"
    args.shapes = sorted(benchmark.parse_shapes(args.shapes), key=lambda s: (s[1], s[0]), reverse=True)  # longest first
    if args.repeats is None:
        args.repeats = 1 if args.smoke else 3
    if args.real_batches is None:
        args.real_batches = 2 if args.smoke else 8
    if args.paths is None:  # CPU: no FlexAttention backward, and 20+ s of compilation per shape
        args.paths = "sdpa" if args.device == "cpu" else "sdpa,flex_attention"
    args.paths = benchmark.comma_list(args.paths)
    args.variants = benchmark.comma_list(args.variants)
    if set(args.variants) - set(VARIANTS):
        parser.error(f"unknown variants {sorted(set(args.variants) - set(VARIANTS))}; choose from {list(VARIANTS)}")
    return args


def past(deadline):
    return deadline is not None and time.time() > deadline


def assert_eager(model):
    """The reference must run eager: every module that holds a config (the layers read it at every call)."""
    for name, module in model.named_modules():
        config = getattr(module, "config", None)
        if config is not None:
            assert config._attn_implementation == "eager", (name, config._attn_implementation)


def model_with_path(config, path, state, device, dtype):
    """A model of its own (its own copy of the config) on `path`, with the reference's weights."""
    model = DebertaCustomModel._from_config(copy.deepcopy(config), attn_implementation=path)
    model.load_state_dict(state)
    return model.to(device, dtype).eval()


def summarize(errors):
    return dict(max=float(errors.max()) if errors.numel() else 0.0, mean=float(errors.mean()) if errors.numel() else 0.0)


# ----------------------------------------------------------------------------------------------------------------------
# (parity)
# ----------------------------------------------------------------------------------------------------------------------


def parity_config(args, **overrides):
    geometry = (dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                     position_buckets=8, max_position_embeddings=64) if args.smoke
                else dict(hidden_size=256, num_hidden_layers=2, num_attention_heads=4, intermediate_size=512,
                          position_buckets=256, max_position_embeddings=512))
    return DebertaCustomConfig(vocab_size=1000, initializer_range=PARITY_INIT, hidden_dropout_prob=0.0,
                               attention_probs_dropout_prob=0.0, **{**geometry, **overrides})


def parity_batch(vocab_size, length, device, generator):
    """Four rows: full, right-padded, left-padded, and fully padded."""
    input_ids = torch.randint(1, vocab_size, (4, length), generator=generator)
    attention_mask = torch.ones(4, length, dtype=torch.long)
    attention_mask[1, length - length // 3:] = 0
    attention_mask[2, :length // 3] = 0
    attention_mask[3] = 0
    return dict(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device))


def parity_lengths(args):
    return (12, 40, 100) if args.smoke else (100, 300, 600)  # inside / past the bucket range, past max_position


def parity_plan(args):
    """(variant, dtypes) in the order they run: v3 in every dtype, then the other variants in fp32 (the strict check
    of each kernel's indexing), then in half precision. A budget cut takes the end of this list."""
    first, others = args.variants[:1], args.variants[1:]
    return ([(v, DTYPES) for v in first] + [(v, DTYPES[:1]) for v in others]
            + [(v, DTYPES[1:]) for v in others])


def phase_parity(args, log):
    for variant, dtypes in parity_plan(args):
        torch._dynamo.reset()  # each section starts with no compiled FlexAttention
        config = parity_config(args, **VARIANTS[variant])
        torch.manual_seed(0)
        eager = DebertaCustomModel._from_config(copy.deepcopy(config), attn_implementation="eager").eval()
        references = {dtype: copy.deepcopy(eager).to(args.device, getattr(torch, dtype))
                      for dtype in dict.fromkeys((*dtypes, *(WIDER[d] for d in dtypes)))}
        state = eager.state_dict()
        for dtype in dtypes:
            for length in parity_lengths(args):
                inputs = parity_batch(config.vocab_size, length, args.device, torch.Generator().manual_seed(length))
                case = dict(section="parity", variant=variant, length=length, dtype=dtype)
                if past(args.deadline):
                    for path in args.paths:
                        log.add(dict(case, path=path, status="skipped", error="time budget"))
                    continue
                expected = reference_outputs(references, dtype, inputs)
                for path in args.paths:
                    log.add(dict(case, path=path, **harness.run_case(functools.partial(
                        parity_case, config, path, state, dtype, inputs, expected, references), args.device)))


def reference_outputs(references, dtype, inputs):
    """Eager's outputs in `dtype` and in the wider dtype that measures its own error, each model asserted eager."""
    outputs = {}
    for name in (dtype, WIDER[dtype]):
        assert_eager(references[name])
        with torch.no_grad():
            outputs[name] = references[name](**inputs).last_hidden_state.double()
    return outputs


def parity_case(config, path, state, dtype, inputs, expected, references):
    model = model_with_path(config, path, state, inputs["input_ids"].device, getattr(torch, dtype))
    assert all(model.config is not reference.config for reference in references.values())
    with harness.flex_witness() as seen, torch.no_grad():
        actual = model(**inputs).last_hidden_state.double()
    for reference in references.values():
        assert_eager(reference)  # still eager after the path ran
    real = inputs["attention_mask"].bool()
    error = summarize((actual - expected[dtype])[real].abs())
    own = summarize((expected[dtype] - expected[WIDER[dtype]])[real].abs())
    entry = dict(max_abs_error=error["max"], mean_abs_error=error["mean"],
                 eager_max_error=own["max"], eager_mean_error=own["mean"],
                 padding_max_abs_error=summarize((actual - expected[dtype])[~real].abs())["max"],
                 finite=bool(torch.isfinite(actual).all()), compiled_graphs=seen["compiled_graphs"],
                 tolerance=f"{ERROR_FACTOR}x eager's own error against {WIDER[dtype]} (mean and max)")
    ok = error["mean"] <= ERROR_FACTOR * own["mean"] and error["max"] <= ERROR_FACTOR * own["max"]
    if dtype == "float32":
        entry["tolerance"] += f", or allclose rtol=atol={FP32_TOLERANCE}"
        ok = ok or bool(torch.allclose(actual[real], expected[dtype][real], rtol=FP32_TOLERANCE, atol=FP32_TOLERANCE))
    return with_fusion(entry, ok and entry["finite"], path, seen)


def with_fusion(entry, ok, path, seen):
    """Status, and for FlexAttention whether its fused kernel ran: an unfused run fails the case."""
    if path == "flex_attention":
        entry["fused"] = not seen["unfused"]
        if seen["unfused"]:
            entry["unfused_reasons"] = seen["reasons"]
            ok = False
    return dict(entry, status="ok" if ok else "fail")


# ----------------------------------------------------------------------------------------------------------------------
# (training)
# ----------------------------------------------------------------------------------------------------------------------


def phase_training(args, log):
    generator = torch.Generator().manual_seed(1)
    config = parity_config(args, num_labels=3)
    # The parity batch without its fully padded row: under fp16 autocast that row's gradients overflow (its hidden
    # states are zero, and LayerNorm's backward at zero variance multiplies by 1/sqrt(eps)): eager and sdpa alike.
    inputs = {name: tensor[:3] for name, tensor in
              parity_batch(config.vocab_size, 100 if args.smoke else 600, args.device, generator).items()}
    inputs["labels"] = torch.tensor([0, 1, 2], device=args.device)
    torch.manual_seed(0)
    state = DebertaCustomForSequenceClassification(copy.deepcopy(config)).state_dict()
    for dtype in DTYPES:
        eager = {}  # eager's loss and gradients in this dtype, filled by its own case (the first)
        for path in ["eager", *args.paths]:
            torch._dynamo.reset()
            case = dict(section="training", path=path, dtype=dtype)
            if past(args.deadline):
                log.add(dict(case, status="skipped", error="time budget"))
                continue
            log.add(dict(case, **harness.run_case(functools.partial(
                training_step, args, config, state, path, dtype, inputs, eager), args.device)))


def training_step(args, config, state, path, dtype, inputs, eager):
    """One step; returns the loss, gradient agreement with eager (same dtype) and how many parameters moved."""
    model = DebertaCustomForSequenceClassification._from_config(copy.deepcopy(config), attn_implementation=path)
    model.load_state_dict(state)
    model = model.to(args.device).train()
    before = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    # 2**10, not the default 2**16: the first step of a fresh scaler is then not skipped for overflow (the check
    # wants every parameter to move in one step).
    scaler = torch.amp.GradScaler(args.device, init_scale=2.0**10, enabled=dtype == "float16")
    with harness.flex_witness() as seen:
        with torch.autocast(args.device, dtype=getattr(torch, dtype), enabled=dtype != "float32"):
            loss = model(**inputs).loss
        scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    grads = {name: p.grad.detach().float().clone() for name, p in model.named_parameters() if p.grad is not None}
    finite = math.isfinite(float(loss.detach())) and all(bool(torch.isfinite(g).all()) for g in grads.values())
    scaler.step(optimizer)
    scaler.update()
    updated = sum(not torch.equal(before[name], p) for name, p in model.named_parameters() if name in before)
    entry = dict(loss=float(loss.detach()), finite=finite, parameters_updated=f"{updated}/{len(before)}",
                 compiled_graphs=seen["compiled_graphs"])
    ok = finite and updated == len(before)
    if path == "eager":
        assert_eager(model)
        eager.update(loss=entry["loss"], grads=grads)
    elif eager:
        ok = compare_gradients(entry, grads, eager, dtype) and ok
    else:
        entry["note"] = "no eager reference in this dtype (its case failed)"
    return with_fusion(entry, ok, path, seen)


def compare_gradients(entry, grads, eager, dtype):
    worst = max(float((grads[n] - g).abs().max() / (g.abs().max() + 1e-12)) for n, g in eager["grads"].items())
    flat, flat_eager = (torch.cat([g.flatten() for _, g in sorted(gs.items())]) for gs in (grads, eager["grads"]))
    cosine = float(torch.nn.functional.cosine_similarity(flat, flat_eager, dim=0))
    entry.update(eager_loss=eager["loss"], grad_max_relative_error=worst, grad_cosine=cosine)
    if dtype == "float32":
        entry["tolerance"] = f"gradients within {GRAD_FP32_TOLERANCE} of eager's (relative to each max), loss 1e-5"
        return worst <= GRAD_FP32_TOLERANCE and abs(entry["loss"] - eager["loss"]) <= 1e-5 * max(1, abs(eager["loss"]))
    entry["tolerance"] = f"gradient cosine with eager's >= {GRAD_HALF_COSINE}, loss within 2%"
    return cosine >= GRAD_HALF_COSINE and abs(entry["loss"] - eager["loss"]) <= 0.02 * max(1, abs(eager["loss"]))


# ----------------------------------------------------------------------------------------------------------------------
# (shapes) benchmark: long full rectangles
# ----------------------------------------------------------------------------------------------------------------------


def shape_models(args, flash):
    names = ["ours", "ours-flex", "bert", "hf-deberta"]
    if args.device == "cpu":
        names.remove("ours-flex")  # no FlexAttention backward on CPU
    if flash is not None:
        names.append("disentangled-flash")
    return names


def build_for_shapes(name, args, training, flash, length):
    """A model of (shapes) on its device in bf16 (fp32 on CPU), attention dropout 0 (FlexAttention has none)."""
    geometry = harness.TINY if args.smoke else harness.V3_BASE
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    with torch.device(args.device):  # parameters initialised where they live
        model = harness.build_model(name, geometry, vocab_size=8192, max_length=max(s[1] for s in args.shapes),
                                    attention_dropout=0.0)
    model = model.to(args.device, dtype).train(training)
    backend = None
    if name == "disentangled-flash":
        backend = harness.optimize_disentangled_flash(flash, model, training, [length])
    return model, backend


def phase_shapes(args, log, flash):
    """Forward at every shape, then training steps at every shape, longest first: a case that stalls (a FlexAttention
    backward at 16k tokens, say) costs what follows it in its own mode only."""
    names = shape_models(args, flash)
    models = {}
    for mode in ("forward", "train"):
        for batch_size, length in args.shapes:
            case = dict(section="shapes", mode=mode, batch=batch_size, length=length)
            if past(args.deadline):
                for name in names:
                    log.add(dict(case, model=name, status="skipped", error="time budget"))
                continue
            log.save(running=f"{mode} {batch_size}x{length}")  # a phase killed mid-case says where
            generator = torch.Generator().manual_seed(2)
            inputs = dict(input_ids=torch.randint(1, 8192, (batch_size, length), generator=generator).to(args.device),
                          attention_mask=torch.ones(batch_size, length, dtype=torch.long, device=args.device))
            runnable, calls, records = {}, {}, {}
            for name in names:
                try:
                    if name not in models or name == "disentangled-flash":  # its inference mode is shape-bound
                        models[name] = build_for_shapes(name, args, mode == "train", flash, length)
                    runnable[name] = models[name]
                except Exception as error:  # noqa: BLE001 - a model that cannot be built here is a result
                    log.add(dict(case, model=name, status="error", error=f"{type(error).__name__}: {str(error)[:300]}"))
                    continue
                model = runnable[name][0]
                records[name] = {}
                call = (functools.partial(shape_train, model, torch.optim.SGD(model.parameters(), lr=1e-4), inputs)
                        if mode == "train" else functools.partial(shape_forward, model, inputs))
                calls[name] = benchmark.witnessed(call, records[name])
            samples = harness.alternate(
                calls, args.repeats, args.device, warmup=1, peak_memory=args.device == "cuda", deadline=args.deadline,
                max_seconds=args.case_seconds,
                on_failure=functools.partial(benchmark.release_gradients, {n: m for n, (m, _) in runnable.items()}))
            for name, sample in samples.items():
                log.add(shape_entry(case, name, sample, records[name], runnable[name][1]))
            del runnable, calls
            models.pop("disentangled-flash", None)
            harness.free_memory(args.device)
        models.clear()  # the next mode builds its own (disentangled-flash's inference and training differ)
    log.save(running=None)


def shape_forward(model, inputs):
    model.eval()
    with torch.inference_mode():
        model(**inputs)


def shape_train(model, optimizer, inputs):
    model.train()
    model(**inputs).last_hidden_state.float().pow(2).mean().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def shape_entry(case, name, sample, seen, backend):
    entry = dict(case, model=name, status=harness.sample_status(sample["error"]), error=sample["error"],
                 times_s=sample["times_s"], median_s=sample["median_s"], warmup_s=sample.get("warmup_s"), **seen)
    if sample["median_s"]:
        entry["ms"] = round(sample["median_s"] * 1e3, 3)
        entry["tokens_per_s"] = round(case["batch"] * case["length"] / sample["median_s"], 1)
    if sample.get("peak_bytes") is not None:  # of the warm-up call
        entry.update(peak_bytes=sample["peak_bytes"], peak_gib=round(sample["peak_bytes"] / 2**30, 3))
    if name == "ours-flex":
        entry["fused"] = not seen.get("unfused_reasons")
    if backend is not None:
        entry.update(backend=backend, fused=backend == "triton")
    if "traceback" in sample:
        entry["traceback"] = sample["traceback"]
    return entry


# ----------------------------------------------------------------------------------------------------------------------
# (real) benchmark: GLUE length distributions, padded, unpadded, packed
# ----------------------------------------------------------------------------------------------------------------------


def phase_real(args, log, flash):
    variants = benchmark.default_real_variants(args.device, flash is not None)
    settings = benchmark.parse_args([
        "--suite", "real", "--device", args.device, "--dtype", "bfloat16" if args.device == "cuda" else "float32",
        "--real-batches", str(args.real_batches), "--dropout", "0", "--variants", ",".join(variants),
        *(["--quick"] if args.smoke else [])])
    settings.repeats = args.repeats
    settings.pure_dtype = True  # parameters in bf16, as in (shapes)
    settings.case_seconds = args.case_seconds
    benchmark.run_real(settings, log.add, deadline=args.deadline, flash=flash)


# ----------------------------------------------------------------------------------------------------------------------
# Phases and the report
# ----------------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def phase_settings(args):
    """TF32 off (fp32 parity to 1e-5 needs full fp32 products), dynamo's recompile limit, CPU threads; restored
    afterwards (phases run in-process share the caller's torch)."""
    config = torch._dynamo.config
    limit_name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.get_num_threads(),
             getattr(config, limit_name))
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    if args.device == "cpu" and (args.threads or args.smoke):
        torch.set_num_threads(args.threads or 1)
    harness.set_recompile_limit(args.recompile_limit)
    torch._dynamo.reset()
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[:2]
        torch.set_num_threads(saved[2])
        setattr(config, limit_name, saved[3])


def run_phase(args, phase):
    """One phase in this process, its results written to phase_<name>.json as they come."""
    with phase_settings(args):
        return run_phase_body(args, phase)


def run_phase_body(args, phase):
    info = harness.machine(args.device)
    log = harness.ResultLog(Path(args.out) / f"phase_{phase}.json", phase=phase, machine=info,
                            command=args.command, deadline=args.deadline)
    flash = harness.import_disentangled_flash(args.disentangled_flash) if args.disentangled_flash else None
    print(f"phase {phase}: {harness.describe(info)}", flush=True)
    if phase in ("shapes", "real"):
        {"shapes": phase_shapes, "real": phase_real}[phase](args, log, flash)
    else:
        {"parity": phase_parity, "training": phase_training}[phase](args, log)
    log.save(finished=True)
    return log


def child_command(args, phase, deadline):
    return [sys.executable, str(Path(__file__).resolve()), *args.argv, "--phase", phase, "--deadline", str(deadline)]


def run_phases(args):
    started = time.time()
    status = {}
    for index, phase in enumerate(args.phases):
        remaining = args.budget - (time.time() - started)
        share = max(0.0, remaining) * PHASES[phase] / sum(PHASES[p] for p in args.phases[index:])
        deadline = time.time() + share
        begin = time.time()
        print(f"\n=== phase {phase}: {share:.0f} s (+{GRACE_S} s grace) ===", flush=True)
        if args.in_process:
            try:
                run_phase(argparse.Namespace(**{**vars(args), "deadline": deadline}), phase)
                status[phase] = dict(returncode=0)
            except Exception as error:  # noqa: BLE001 - the other phases still run
                status[phase] = dict(returncode=1, error=f"{type(error).__name__}: {error}")
        else:
            try:
                result = subprocess.run(child_command(args, phase, deadline), timeout=share + GRACE_S)
                status[phase] = dict(returncode=result.returncode)
            except subprocess.TimeoutExpired:
                status[phase] = dict(returncode=None, error=f"killed after {share + GRACE_S:.0f} s")
        status[phase]["seconds"] = round(time.time() - begin, 1)
        write_report(args, status, time.time() - started)
    return status


def load_phase(out, phase):
    path = Path(out) / f"phase_{phase}.json"
    return json.loads(path.read_text()) if path.exists() else None


def write_report(args, status, seconds):
    """gpu_check.json and gpu_check.png from the phases' files so far."""
    out = Path(args.out)
    results, info = [], None
    for phase in args.phases:
        data = load_phase(out, phase)
        if data is not None:
            info = info or data["machine"]
            status.setdefault(phase, {})["finished"] = data["finished"]
            results += data["results"]
    report = dict(machine=info, command=args.command,
                  budget_s=args.budget, seconds=round(seconds, 1), phases=status, summary=summary(results),
                  ratios=benchmark.ratio_table([r for r in results if r.get("section") == "shapes"],
                                               ["ours", "ours-flex", "disentangled-flash"]),
                  results=results)
    harness.write_json(out / "gpu_check.json", report)
    try:
        title = harness.describe(info) if info else ""
        benchmark.plot(results, ["ours", "ours-flex", "bert", "hf-deberta", "disentangled-flash"],
                       out / "gpu_check.png", title=title)
    except ImportError:  # no matplotlib: JSON only
        pass
    return report


def failures(results):
    """Parity and training cases that did not pass, and every case in which FlexAttention ran unfused."""
    return [r for r in results if (r["section"] in ("parity", "training") and r.get("status") not in ("ok", "skipped"))
            or r.get("unfused_reasons")]


def label(r):
    keys = ("section", "variant", "model", "path", "mode", "dtype", "dataset", "order", "batch", "length")
    return " ".join(str(r[k]) for k in keys if r.get(k) is not None)


def summary(results):
    counts = {}
    for r in results:
        section = counts.setdefault(r["section"], {})
        section[r.get("status", "?")] = section.get(r.get("status", "?"), 0) + 1
    return dict(counts=counts, failures=[label(r) for r in failures(results)],
                unfused_flex=[label(r) for r in results if r.get("unfused_reasons")],
                disentangled_flash_backends=sorted({r["backend"] for r in results if r.get("backend")}))


def print_parity(results):
    rows = [r for r in results if r["section"] == "parity"]
    if not rows:
        return
    print("\nparity: |path - eager in the same dtype| over real tokens, max and mean, beside eager's own error (fp32"
          " against fp64, half against fp32); the tolerance: 3x eager's own (fp32: or allclose 1e-5)")
    print(f"{'variant':30s}{'len':>5s}  {'path':15s}{'dtype':10s}{'status':8s}{'max err':>10s}{'mean err':>10s}"
          f"{'eager max':>10s}{'eager mean':>11s}  fused")
    for r in rows:
        fused = str(r.get("fused", ""))
        if r["status"] not in ("ok", "fail"):
            print(f"{r['variant']:30s}{r['length']:5d}  {r['path']:15s}{r['dtype']:10s}{r['status']:8s} {r.get('error')}")
            continue
        eager = f"{r['eager_max_error']:10.2e}{r['eager_mean_error']:11.2e}"
        print(f"{r['variant']:30s}{r['length']:5d}  {r['path']:15s}{r['dtype']:10s}{r['status']:8s}"
              f"{r['max_abs_error']:10.2e}{r['mean_abs_error']:10.2e}{eager}  {fused}")


def print_training(results):
    for r in (r for r in results if r["section"] == "training"):
        details = (f"loss {r['loss']:.5f} grad rel err {r.get('grad_max_relative_error', float('nan')):.2e} cosine "
                   f"{r.get('grad_cosine', float('nan')):.6f} updated {r['parameters_updated']}"
                   if "loss" in r else r.get("error"))
        print(f"training {r['path']:15s}{r['dtype']:10s}{r['status']:8s} {details}"
              + (f" fused {r['fused']}" if "fused" in r else ""))


def main(argv=None):
    args = parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.command = " ".join(["python3", "benchmarks/gpu_check.py", *args.argv])
    if args.phase is not None:  # a child: one phase
        run_phase(args, args.phase)
        return 0
    if args.disentangled_flash and not args.in_process and Path(args.disentangled_flash).suffix == ".whl":
        flash = harness.import_disentangled_flash(args.disentangled_flash)  # unpacked once, for every child
        if flash is not None:
            folder = str(Path(flash.__file__).resolve().parents[1])
            args.argv = [folder if a == args.disentangled_flash else a for a in args.argv]
    Path(args.out).mkdir(parents=True, exist_ok=True)
    for phase in args.phases:  # a phase that cannot start must not report an earlier run's results
        (Path(args.out) / f"phase_{phase}.json").unlink(missing_ok=True)
    status = run_phases(args)
    report = write_report(args, status, sum(s.get("seconds", 0) for s in status.values()))
    results = report["results"]
    benchmark.print_real(results)
    print_parity(results)
    print_training(results)
    bad = failures(results)
    counts = report["summary"]["counts"]
    print(f"\n{harness.describe(report['machine']) if report['machine'] else ''}\nphases: {json.dumps(status)}\n"
          f"cases: {json.dumps(counts)}\nwrote {Path(args.out) / 'gpu_check.json'} and gpu_check.png; "
          f"{len(bad)} failures (parity, training, or FlexAttention unfused); {report['seconds']} s")
    crashed = [p for p, s in status.items() if s.get("returncode") != 0]
    return 1 if bad or crashed else 0


if __name__ == "__main__":
    sys.exit(main())
