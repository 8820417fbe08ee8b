"""What every benchmark here shares: the machine a figure belongs to, timing (medians over alternating runs, device
sync), peak memory, out-of-memory handling, JSON written as results come in, the models compared at one geometry,
batches with the length distributions of real data (padded, packed, grouped by length), and a witness that tells
whether FlexAttention ran fused.

Imports only torch and transformers (and, where asked, matplotlib, triton and disentangled-flash); the benchmarks
import this module as `harness` (benchmarks/ is put on sys.path by each script).
"""

import contextlib
import gc
import inspect
import json
import logging
import os
import platform
import random
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / "data"
if str(REPO_ROOT) not in sys.path:
    sys.path.append(str(REPO_ROOT))  # the checkout's package, when it is not installed

# DeBERTa-v3-base: hidden 768, 12 layers, 12 heads, feed-forward 3072, 256 log position buckets over 512 positions.
V3_BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
DEBERTA_V3_FIELDS = dict(max_position_embeddings=512, position_buckets=256, relative_attention=True,
                         pos_att_type=["p2c", "c2p"], share_att_key=True, norm_rel_ebd="layer_norm",
                         position_biased_input=False, type_vocab_size=0)


# ----------------------------------------------------------------------------------------------------------------------
# The machine
# ----------------------------------------------------------------------------------------------------------------------


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: str = "cpu") -> dict:
    """Everything a figure needs beside it: processor or GPU, core count, torch (and its CUDA), transformers, Triton,
    Python."""
    import transformers

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    gpu = torch.cuda.get_device_name() if device == "cuda" else None
    return dict(
        device=device, gpu=gpu, cpu=cpu_name(), cores=os.cpu_count(), threads=torch.get_num_threads(),
        torch=torch.__version__, cuda=torch.version.cuda, transformers=transformers.__version__,
        triton=triton_version, python=platform.python_version(),
    )


def describe(info: dict) -> str:
    """One line: 'NVIDIA H200, torch 2.11.0+cu130 (CUDA 13.0), transformers 5.17.0, triton 3.6.0'."""
    where = info["gpu"] or f"{info['cpu']} ({info['cores']} cores visible, {info['threads']} threads)"
    cuda = f" (CUDA {info['cuda']})" if info["gpu"] else ""
    return (f"{where}, torch {info['torch']}{cuda}, transformers {info['transformers']}, "
            f"triton {info['triton']}, Python {info['python']}")


# ----------------------------------------------------------------------------------------------------------------------
# Timing and memory
# ----------------------------------------------------------------------------------------------------------------------


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def free_memory(device: str, full: bool | None = None) -> None:
    """Between cases: what one case left (an out-of-memory case especially) must not shorten the next. A full
    collection walks every Python object (about half a second with transformers loaded): by default it runs on CUDA,
    where a case's memory is the scarce thing; on CPU only the young generations are collected."""
    full = device == "cuda" if full is None else full
    gc.collect() if full else gc.collect(1)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def is_oom(error: BaseException) -> bool:
    return (isinstance(error, MemoryError) or isinstance(error, getattr(torch, "OutOfMemoryError", ()))
            or "out of memory" in str(error).lower())


def time_call(call, device: str, clock: str = "wall") -> float:
    """Seconds of one call, the device synchronised before and after. clock="cpu": CPU time of this process (all its
    threads), for CPU runs on a machine other processes share."""
    now = time.process_time if clock == "cpu" and device == "cpu" else time.perf_counter
    synchronize(device)
    start = now()
    call()
    synchronize(device)
    return now() - start


def _failure(error: BaseException) -> str:
    if isinstance(error, NotImplementedError):
        return f"not supported: {str(error)[:300]}"
    return "out of memory" if is_oom(error) else f"{type(error).__name__}: {str(error)[:300]}"


def alternate(calls: dict, repeats: int, device: str, warmup: int = 1, clock: str = "wall", on_failure=None,
              max_seconds=None, peak_memory: bool = False, deadline=None) -> dict:
    """Times every call `repeats` times, alternating between them inside each repeat (the first one rotates), so that
    machine noise hits all alike. Each is warmed up first (allocator, kernels, compilation). A call that fails
    (out of memory, not supported, any error) is recorded and left out from then on; on_failure(name) lets the
    caller release what it holds (gradients) before the next call.
    max_seconds: a call stops being repeated once its timed calls would pass this many seconds (one sample kept),
    and is not timed at all when its warm-up alone took longer (its error then says so; warmup_s is always
    recorded, compilation included). peak_memory (CUDA): the peak memory of the last warm-up call, in bytes. deadline
    (time.time()): no call starts after it; what has no sample then says "time budget".

    Returns {name: {"times_s": [...], "median_s": float or None, "error": str or None[, "peak_bytes": int]}}."""
    names = list(calls)
    samples = {name: dict(times_s=[], median_s=None, error=None) for name in names}

    def attempt(name, timed):
        try:
            with PeakMemory(device) if peak_memory and not timed else contextlib.nullcontext() as memory:
                seconds = time_call(calls[name], device, clock)
        except Exception as error:  # noqa: BLE001 - every failure is a result here
            samples[name]["error"] = _failure(error)
            if not isinstance(error, NotImplementedError) and not is_oom(error):
                samples[name]["traceback"] = traceback.format_exc(limit=6)[-2000:]
            del error
            if on_failure is not None:
                on_failure(name)
            free_memory(device, full=True)
            return
        if timed:
            samples[name]["times_s"].append(seconds)
            return
        samples[name]["warmup_s"] = samples[name].get("warmup_s", 0.0) + seconds
        if memory is not None:
            samples[name]["peak_bytes"] = memory.peak

    def wanted(name, timed):
        entry = samples[name]
        if entry["error"] is not None or (deadline is not None and time.time() > deadline):
            return False
        times = entry["times_s"]
        if not timed or max_seconds is None:
            return True
        if not times and entry.get("warmup_s", 0.0) > max_seconds:
            entry["error"] = f"slow: the warm-up alone took {entry['warmup_s']:.0f} s (over {max_seconds:.0f} s)"
            return False
        return not (times and sum(times) + sum(times) / len(times) > max_seconds)

    for name in names:
        for _ in range(warmup):
            if wanted(name, timed=False):
                attempt(name, timed=False)
    for repeat in range(repeats):
        for name in names[repeat % len(names):] + names[:repeat % len(names)]:
            if wanted(name, timed=True):
                attempt(name, timed=True)
    for entry in samples.values():
        if entry["times_s"]:
            entry["median_s"] = statistics.median(entry["times_s"])
        elif entry["error"] is None and repeats > 0:
            entry["error"] = "time budget"
    return samples


def sample_status(error) -> str:
    """The status word of an alternate() sample's error."""
    if error is None:
        return "ok"
    if error == "time budget" or error.startswith("slow:"):
        return "skipped"
    return {"out of memory": "oom"}.get(error, "not supported" if error.startswith("not supported") else "error")


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


class PeakMemory:
    """Peak memory of a block above the memory in use when it starts, in bytes. CUDA: the caching allocator's peak
    (torch.cuda.max_memory_allocated). CPU: the peak resident set size (VmHWM, reset through /proc/self/clear_refs);
    run it in a process with MALLOC_MMAP_THRESHOLD_ fixed (benchmark.py's memory pass does) so that freed tensors
    leave the resident set."""

    def __init__(self, device: str):
        self.device = device
        self.peak = None

    def __enter__(self):
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
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.start
        else:
            self.peak = _proc_status_kib("VmHWM") * 1024 - self.start
        return False


# ----------------------------------------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------------------------------------


def write_json(path, data) -> None:
    """Written whole or not at all (a run cut off mid-write leaves the previous version)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(data, indent=1, default=str))
    os.replace(temporary, path)


class ResultLog:
    """Results of one run, rewritten to `path` after every case: a run cut off by its time limit keeps what it
    measured. `header` (machine, command, settings) leads the file."""

    def __init__(self, path, **header):
        self.path = Path(path)
        self.header = dict(header, finished=False)
        self.results = []
        self.save()

    def add(self, entry: dict) -> dict:
        self.results.append(entry)
        self.save()
        return entry

    def save(self, **updates) -> None:
        self.header.update(updates)
        write_json(self.path, dict(self.header, results=self.results))


def run_case(function, device: str) -> dict:
    """function() -> dict; an exception (out of memory included) becomes the result instead of ending the run, and
    the memory it held is released before the next case."""
    start = time.perf_counter()
    try:
        entry = function()
    except Exception as error:  # noqa: BLE001 - every failure is a result here
        entry = dict(status="oom" if is_oom(error) else "error", error=_failure(error))
        if not is_oom(error):
            entry["traceback"] = traceback.format_exc(limit=6)[-2000:]
        del error
        free_memory(device, full=True)
    free_memory(device)
    return dict(entry, seconds=round(time.perf_counter() - start, 2))


# ----------------------------------------------------------------------------------------------------------------------
# Did FlexAttention run fused?
# ----------------------------------------------------------------------------------------------------------------------

UNFUSED_FLEX_WARNING = "flex_attention called without torch.compile"


def set_recompile_limit(limit: int) -> None:
    """dynamo's recompile limit per compiled function (8 by default; `cache_size_limit` before torch 2.6). Past it,
    torch runs every new combination of guards uncompiled, which for FlexAttention means its unfused reference."""
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, limit)
    for accumulated in ("accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(config, accumulated):
            setattr(config, accumulated, max(getattr(config, accumulated), 4 * limit))
            break


def compiled_graphs() -> int:
    """Graphs dynamo has compiled in this process so far."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


class _RecordRecompileLimit(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        message = record.getMessage()
        if "recompile_limit" in message or "cache_size_limit" in message:
            self.messages.append(message.splitlines()[0])


@contextlib.contextmanager
def flex_witness():
    """Records whether FlexAttention ran unfused inside the block. Two signs, either is enough:
    - torch's own warning that flex_attention ran without torch.compile (its Python body runs only outside a compiled
      graph: after a recompile limit, a graph break, or with no compilation at all); torch shows it once per process,
      so its once-registry is cleared first;
    - dynamo's warning that a function hit its recompile limit.
    Yields a dict that holds, after the block, unfused (bool), reasons (list) and compiled_graphs (new graphs)."""
    from torch.nn.attention import flex_attention as flex_module

    shown = getattr(flex_module, "_WARNINGS_SHOWN", None)
    if isinstance(shown, set):
        shown.discard("flex_attention_performance")
    elif hasattr(getattr(flex_module, "_warn_once", None), "cache_clear"):  # older torch: an lru_cache
        flex_module._warn_once.cache_clear()
    handler = _RecordRecompileLimit()
    dynamo_logger = logging.getLogger("torch._dynamo")
    dynamo_logger.addHandler(handler)
    result = dict(unfused=False, reasons=[], compiled_graphs=0)
    graphs = compiled_graphs()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield result
    finally:
        dynamo_logger.removeHandler(handler)
        result["compiled_graphs"] = compiled_graphs() - graphs
        unfused = [str(w.message).split(" - ")[0] for w in caught if UNFUSED_FLEX_WARNING in str(w.message)]
        result["reasons"] = sorted(set(unfused)) + handler.messages
        result["unfused"] = bool(result["reasons"])


# ----------------------------------------------------------------------------------------------------------------------
# Models at one geometry
# ----------------------------------------------------------------------------------------------------------------------

MODELS = {
    "ours": "our DebertaCustomModel, default attention (sdpa)",
    "ours-eager": "our DebertaCustomModel, attn_implementation='eager'",
    "ours-flex": "our DebertaCustomModel, attn_implementation='flex_attention', attention dropout 0 (FlexAttention "
                 "has none; it trains on CUDA only)",
    "hf-deberta": "transformers.DebertaV2Model",
    "bert": "transformers.BertModel, attn_implementation='sdpa'",
    "disentangled-flash": "transformers.DebertaV2Model with disentangled-flash's optimize_deberta (Triton on CUDA, "
                          "its PyTorch backend on CPU)",
}


def unpadding_supported() -> bool:
    """Whether this checkout's config has `unpad_inputs` (token-wise layers on real tokens only; issue 20)."""
    from modeling_deberta_custom import DebertaCustomConfig

    return hasattr(DebertaCustomConfig(), "unpad_inputs")


def build_model(name: str, geometry: dict, vocab_size: int = 8192, dropout=None, max_length: int = 512,
                unpad_inputs=None, config_path=None, attention_dropout=None):
    """One of MODELS (disentangled-flash: the plain DebertaV2Model, see optimize_disentangled_flash), with the same
    geometry, vocabulary and dropout (None: each library's default, 0.1 for all; attention_dropout overrides the
    attention probabilities' alone). unpad_inputs: our config's switch, set when given."""
    import transformers

    from modeling_deberta_custom import DebertaCustomConfig, DebertaCustomModel

    dropouts = {} if dropout is None else dict(hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    if attention_dropout is not None:
        dropouts["attention_probs_dropout_prob"] = attention_dropout
    deberta = dict(geometry, vocab_size=vocab_size, **DEBERTA_V3_FIELDS, **dropouts)
    if name.startswith("ours"):
        extra = {} if unpad_inputs is None else dict(unpad_inputs=unpad_inputs)
        if name == "ours-flex":
            extra["attention_probs_dropout_prob"] = 0.0
        if config_path is not None:
            config = DebertaCustomConfig.from_pretrained(config_path, vocab_size=vocab_size, **dropouts, **extra)
        else:
            config = DebertaCustomConfig(**{**deberta, **extra})
        attention = {"ours": None, "ours-eager": "eager", "ours-flex": "flex_attention"}[name]
        if attention is None:
            return DebertaCustomModel(config)
        return DebertaCustomModel._from_config(config, attn_implementation=attention)
    if name in ("hf-deberta", "disentangled-flash"):
        return transformers.DebertaV2Model(transformers.DebertaV2Config(**{**deberta, "pos_att_type": "p2c|c2p"}))
    if name == "bert":
        config = transformers.BertConfig(**geometry, vocab_size=vocab_size, max_position_embeddings=max(512, max_length),
                                         **dropouts)
        return transformers.BertModel._from_config(config, attn_implementation="sdpa", add_pooling_layer=False)
    raise ValueError(f"unknown model {name!r}; choose from {list(MODELS)}")


def import_disentangled_flash(path=None):
    """The disentangled_flash module, or None when it cannot be imported here. `path`: a wheel (unpacked into a
    temporary folder: the package reads its own source files) or a folder, put first on sys.path."""
    if path:
        path = Path(path).resolve()
        if path.suffix == ".whl":
            import tempfile
            import zipfile

            folder = Path(tempfile.mkdtemp(prefix="disentangled-flash-"))
            zipfile.ZipFile(path).extractall(folder)
            path = folder
        if str(path) not in sys.path:
            sys.path.insert(0, str(path))
    try:
        import disentangled_flash

        return disentangled_flash
    except Exception as error:  # noqa: BLE001 - absent, or unusable here
        print(f"disentangled-flash not used: {type(error).__name__}: {error}", flush=True)
        return None


def optimize_disentangled_flash(flash, model, training: bool, sequence_lengths=None):
    """disentangled-flash's public API on a DebertaV2Model already on its device and dtype: Triton on CUDA, its
    PyTorch backend elsewhere. Inference prepares the given padded lengths (activate one with
    model.encoder.activate_shape before each call). Returns the backend that runs ("triton" or "torch"); raises when
    the library kept transformers' own encoder (it does so silently when Triton cannot run)."""
    backend = "triton" if next(model.parameters()).device.type == "cuda" else "torch"
    model.train(training)
    if training:
        flash.optimize_deberta(model, backend=backend, inference=False)
    else:
        flash.optimize_deberta(model, backend=backend, inference=True,
                               sequence_lengths=sorted(set(sequence_lengths)) if sequence_lengths else None)
    if not isinstance(model.encoder, flash.DebertaV2OptimizedEncoder):
        raise RuntimeError("disentangled-flash left transformers' encoder in place (Triton unavailable?)")
    return model.encoder.backend


# ----------------------------------------------------------------------------------------------------------------------
# Batches with real length distributions
# ----------------------------------------------------------------------------------------------------------------------

# name -> (file in benchmarks/data, batch size): SST-2 sentences at batch 32, RTE pairs at batch 8.
REAL_DATASETS = {"sst2": ("sst2_train_lengths.json", 32), "rte": ("rte_train_lengths.json", 8)}


def load_lengths(name: str) -> list[int]:
    return json.loads((DATA / REAL_DATASETS[name][0]).read_text())["lengths"]


def random_batches(lengths, batch_size: int, count: int, seed: int = 0) -> list[list[int]]:
    """`count` batches of a random order (what a shuffling DataLoader gives)."""
    order = list(lengths)
    random.Random(seed).shuffle(order)
    return [order[i * batch_size:(i + 1) * batch_size] for i in range(min(count, len(order) // batch_size))]


def length_grouped_batches(lengths, batch_size: int, count: int, seed: int = 0, mega_batch_mult: int = 50):
    """`count` batches as the Trainer's group_by_length gives them (transformers' LengthGroupedSampler): a random
    order cut into mega-batches of mega_batch_mult * batch_size examples, each sorted by length, longest first, then
    cut into batches. Drawn at random from one such epoch, so that they represent all of it."""
    order = list(lengths)
    random.Random(seed).shuffle(order)
    mega = min(mega_batch_mult * batch_size, len(order))
    epoch = []
    for start in range(0, len(order) - mega + 1, mega):
        grouped = sorted(order[start:start + mega], reverse=True)
        epoch += [grouped[i:i + batch_size] for i in range(0, mega - batch_size + 1, batch_size)]
    return random.Random(seed + 1).sample(epoch, min(count, len(epoch)))


def fixed_batches(batches) -> list[list[int]]:
    """Full rectangles holding as many tokens as `batches` (same batch size, every sequence of the mean length):
    the fixed-length reference of ModernBERT's measure (real-token throughput, variable over fixed)."""
    mean = round(sum(map(sum, batches)) / sum(map(len, batches)))
    return [[mean] * len(batch) for batch in batches]


def batch_stats(batches) -> dict:
    real = sum(map(sum, batches))
    padded = sum(len(batch) * max(batch) for batch in batches)
    return dict(batches=len(batches), examples=sum(map(len, batches)), real_tokens=real, padded_tokens=padded,
                real_fraction=round(real / padded, 4))


def padded_inputs(lengths, vocab_size: int, device, generator) -> dict:
    """Right-padded input_ids [B, N] (N the longest) and attention_mask, as a tokenizer's padding gives them."""
    width = max(lengths)
    input_ids = torch.randint(1, vocab_size, (len(lengths), width), generator=generator)
    attention_mask = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).long()
    return dict(input_ids=(input_ids * attention_mask).to(device), attention_mask=attention_mask.to(device))


def packed_inputs(lengths, vocab_size: int, device, generator, flash_kwargs: bool = False) -> dict:
    """The batch as transformers' DataCollatorWithFlattening packs it: input_ids [1, T] and position_ids restarting at
    0 for each sequence; with flash_kwargs also cu_seq_lens_q/k and max_length_q/k. Labels are dropped."""
    from transformers import DataCollatorWithFlattening

    features = [dict(input_ids=torch.randint(1, vocab_size, (n,), generator=generator).tolist()) for n in lengths]
    collator = DataCollatorWithFlattening(return_tensors="pt", return_flash_attn_kwargs=flash_kwargs)
    batch = collator(features)
    batch.pop("labels", None)
    return {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in batch.items()}


def accepts(function, name: str) -> bool:
    """Whether function takes a keyword argument `name` (by name or through **kwargs)."""
    parameters = inspect.signature(function).parameters
    return name in parameters or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
