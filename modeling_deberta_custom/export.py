"""Deployment helpers: ONNX export (checked against onnxruntime) and torch.export, for every head.

Export-only code: the modeling files never import this module, so it is not copied for `trust_remote_code`.
`onnx` / `onnxruntime` are imported lazily, only by the functions that need them.

ONNX goes through torch's TorchScript-based exporter by default (`torch.onnx.export(..., dynamo=False)`): with
torch 2.13 the default torch.export-based ONNX exporter needs the `onnxscript` package, which this project does not
depend on. `exporter="dynamo"` uses that one where onnxscript is installed; it traces the eager attention path (its
decomposition of scaled_dot_product_attention fails on our layout with torch 2.13 / onnxscript 0.7). Both keep batch
and sequence length symbolic (relative positions and their log buckets are computed from the input's shape inside
the graph; the modeling code skips its length-dependent shortcuts while exporting), so one file serves every batch
size and length. Input validation that needs the tensor values (id ranges, 0/1 masks) is skipped while tracing or
exporting; the shape checks still run on the sample but leave nothing in the graph.

    from modeling_deberta_custom.export import export_onnx, onnx_max_abs_diff
    export_onnx(model, "model.onnx")                      # task inferred from the model class
    onnx_max_abs_diff(model, "model.onnx", lengths=(5, 17, 40, 100), batch_sizes=(1, 3))
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from .configuration_deberta_custom import DebertaCustomConfig
from .modeling_deberta_custom import (
    DebertaCustomForMaskedLM,
    DebertaCustomForMultipleChoice,
    DebertaCustomForQuestionAnswering,
    DebertaCustomForReplacedTokenDetection,
    DebertaCustomForSequenceClassification,
    DebertaCustomForTokenClassification,
    DebertaCustomModel,
)

# task name -> (model class, names of the output tensors the exported graph returns)
TASKS: dict[str, tuple[type, tuple[str, ...]]] = {
    "base": (DebertaCustomModel, ("last_hidden_state",)),
    "masked-lm": (DebertaCustomForMaskedLM, ("logits",)),
    "sequence-classification": (DebertaCustomForSequenceClassification, ("logits",)),
    "token-classification": (DebertaCustomForTokenClassification, ("logits",)),
    "question-answering": (DebertaCustomForQuestionAnswering, ("start_logits", "end_logits")),
    "multiple-choice": (DebertaCustomForMultipleChoice, ("logits",)),
    "replaced-token-detection": (DebertaCustomForReplacedTokenDetection, ("logits",)),
}
DEFAULT_OPSET = 17  # LayerNormalization is a native op from 17 on


def task_for_model(model: nn.Module) -> str:
    for task, (model_class, _) in TASKS.items():
        if type(model) is model_class:
            return task
    raise ValueError(f"No export task for {type(model).__name__}; known: {sorted(TASKS)}")


def input_names(config: DebertaCustomConfig) -> list[str]:
    """The graph inputs: token type ids only when the model has token types (DeBERTa v2/v3 have none)."""
    names = ["input_ids", "attention_mask"]
    if config.type_vocab_size > 0:
        names.append("token_type_ids")
    return names


def max_length(config: DebertaCustomConfig, task: str) -> int | None:
    """The longest input the model accepts, or None when relative positions alone make any length valid. Absolute
    positions (at the input, or in the Enhanced Mask Decoder) bound it by max_position_embeddings."""
    if config.position_biased_input or (task == "masked-lm" and config.uses_enhanced_mask_decoder):
        return config.max_position_embeddings
    return None


class ExportWrapper(nn.Module):
    """Tensors in, a tuple of tensors out (what exporters and onnxruntime want): `model(**inputs)` with
    return_dict=True, returning `output_names` in order."""

    def __init__(self, model: nn.Module, names: Sequence[str], output_names: Sequence[str]):
        super().__init__()
        self.model = model
        self.names = list(names)
        self.output_names = tuple(output_names)

    def forward(self, *inputs):
        outputs = self.model(**dict(zip(self.names, inputs, strict=True)), return_dict=True)
        return tuple(outputs[name] for name in self.output_names)


def sample_inputs(config: DebertaCustomConfig, task: str, batch: int, length: int, seed: int = 0,
                  num_choices: int = 2, empty_row: bool = False) -> dict[str, torch.Tensor]:
    """Random ids in [1, vocab) and right padding of different amounts per row (the first row is unpadded). With
    empty_row, the last row (batch >= 2) is entirely padding. Multiple choice gets [batch, num_choices, length]."""
    generator = torch.Generator().manual_seed(seed)
    rows = batch * num_choices if task == "multiple-choice" else batch
    input_ids = torch.randint(1, config.vocab_size, (rows, length), generator=generator)
    lengths = torch.randint(1, length + 1, (rows,), generator=generator)
    lengths[0] = length
    if empty_row and rows >= 2:
        lengths[-1] = 0
    attention_mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    input_ids = input_ids.masked_fill(attention_mask == 0, config.pad_token_id)
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    if config.type_vocab_size > 0:
        # second half of each row is segment 1, as for a sentence pair
        token_type_ids = (torch.arange(length)[None, :] >= (lengths[:, None] // 2)).long() * attention_mask
        inputs["token_type_ids"] = token_type_ids.clamp(max=config.type_vocab_size - 1)
    if task == "multiple-choice":
        inputs = {k: v.view(batch, num_choices, length) for k, v in inputs.items()}
    return {k: inputs[k] for k in input_names(config)}


def _dynamic_axes(task: str, names: Sequence[str], output_names: Sequence[str]) -> dict[str, dict[int, str]]:
    if task == "multiple-choice":
        axes = {name: {0: "batch", 1: "choices", 2: "sequence"} for name in names}
        axes.update({name: {0: "batch", 1: "choices"} for name in output_names})
        return axes
    axes = {name: {0: "batch", 1: "sequence"} for name in names}
    for name in output_names:
        axes[name] = {0: "batch"} if task == "sequence-classification" else {0: "batch", 1: "sequence"}
    return axes


def _dims(task: str, limit: int | None, max_sequence: int = 16384) -> dict:
    from torch.export import Dim

    batch = Dim("batch", min=1, max=1 << 16)
    sequence = Dim("sequence", min=1, max=limit or max_sequence)
    if task == "multiple-choice":
        return {0: batch, 1: Dim("choices", min=1, max=64), 2: sequence}
    return {0: batch, 1: sequence}


def export_onnx(model: nn.Module, path: str | os.PathLike, task: str | None = None, opset: int = DEFAULT_OPSET,
                sample_batch: int = 2, sample_length: int = 16, exporter: str = "torchscript") -> str:
    """Export `model` (eval mode, float32 recommended) to an ONNX file with dynamic batch and sequence axes (and
    choices for multiple choice). Inputs: input_ids, attention_mask (int64) [, token_type_ids]; outputs: the
    head's tensors (see TASKS). exporter: "torchscript" (default) or "dynamo" (needs onnxscript). Returns the path."""
    if exporter not in ("torchscript", "dynamo"):
        raise ValueError(f"exporter must be 'torchscript' or 'dynamo', got {exporter!r}")
    task = task or task_for_model(model)
    output_names = TASKS[task][1]
    names = input_names(model.config)
    limit = max_length(model.config, task)
    sample_length = min(sample_length, limit) if limit else sample_length
    sample = sample_inputs(model.config, task, sample_batch, sample_length)
    wrapper = ExportWrapper(model, names, output_names).eval()
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if exporter == "dynamo":
        implementation = model.config._attn_implementation
        model.config._attn_implementation = "eager"
        try:
            with torch.no_grad():
                program = torch.onnx.export(
                    wrapper, tuple(sample[name] for name in names), dynamo=True, opset_version=max(opset, 18),
                    input_names=names, output_names=list(output_names),
                    dynamic_shapes={"inputs": (_dims(task, limit),) * len(names)},
                )
        finally:
            model.config._attn_implementation = implementation
        program.save(path)
        return path
    with warnings.catch_warnings(), torch.no_grad():
        # The legacy exporter announces its own deprecation, and tracing flags every Python-level shape check; the
        # result is checked numerically instead (onnx_max_abs_diff).
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        warnings.filterwarnings("ignore", message=".*feature will be removed.*")
        torch.onnx.export(
            wrapper, tuple(sample[name] for name in names), path, dynamo=False, opset_version=opset,
            input_names=names, output_names=list(output_names), dynamic_axes=_dynamic_axes(task, names, output_names),
            do_constant_folding=True,
        )
    return path


def check_onnx(path: str | os.PathLike) -> None:
    """onnx.checker on the file (by path, so that files with external data above 2 GB work too)."""
    import onnx

    onnx.checker.check_model(os.fspath(path))


def onnx_session(path: str | os.PathLike):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # errors only
    return onnxruntime.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"])


def _shape_grid(config, task, lengths, batch_sizes):
    limit = max_length(config, task)
    checked, skipped = [], []
    for length in lengths:
        (skipped if limit is not None and length > limit else checked).append(length)
    return [(b, n) for n in checked for b in batch_sizes], skipped


@contextlib.contextmanager
def _padded_path(model: nn.Module):
    """Exported graphs hold the padded path (tracing and export cannot read sizes, so unpadding is off there): the
    eager reference runs it too, so that the outputs compare at padding positions and fully padded rows as well."""
    config = model.config
    unpad = config.unpad_inputs
    config.unpad_inputs = False
    try:
        yield
    finally:
        config.unpad_inputs = unpad


@torch.no_grad()
def onnx_max_abs_diff(model: nn.Module, path_or_session, task: str | None = None,
                      lengths: Iterable[int] = (5, 17, 40, 100), batch_sizes: Iterable[int] = (1, 3),
                      seed: int = 0) -> dict[tuple[int, int], float]:
    """Max |onnxruntime - PyTorch| over every output, for each (batch, length) pair, on right-padded random batches
    (one row fully padded when the batch has two or more). Lengths past max_length(config, task) are left out."""
    task = task or task_for_model(model)
    session = onnx_session(path_or_session) if isinstance(path_or_session, (str, os.PathLike)) else path_or_session
    names, output_names = input_names(model.config), TASKS[task][1]
    grid, _ = _shape_grid(model.config, task, list(lengths), list(batch_sizes))
    model.eval()
    diffs = {}
    for i, (batch, length) in enumerate(grid):
        inputs = sample_inputs(model.config, task, batch, length, seed=seed + i, empty_row=True)
        with _padded_path(model):
            expected = model(**inputs, return_dict=True)
        got = session.run(list(output_names), {name: inputs[name].numpy() for name in names})
        diffs[(batch, length)] = max(
            float((torch.from_numpy(g) - expected[name].float()).abs().max()) for name, g in zip(output_names, got, strict=True)
        )
    return diffs


def export_program(model: nn.Module, task: str | None = None, sample_batch: int = 2, sample_length: int = 16,
                   max_sequence: int = 16384):
    """torch.export.export with dynamic batch and sequence dims (and choices for multiple choice). Returns the
    ExportedProgram; call `.module()(input_ids=..., attention_mask=...)` or save it with torch.export.save."""
    task = task or task_for_model(model)
    names = input_names(model.config)
    limit = max_length(model.config, task)
    sample = sample_inputs(model.config, task, sample_batch, min(sample_length, limit or sample_length))
    dims = _dims(task, limit, max_sequence)
    model.eval()
    with torch.no_grad():
        return torch.export.export(model, (), kwargs=sample, dynamic_shapes={name: dims for name in names})


@torch.no_grad()
def program_max_abs_diff(model: nn.Module, program, task: str | None = None,
                         lengths: Iterable[int] = (5, 17, 40, 100), batch_sizes: Iterable[int] = (1, 3),
                         seed: int = 0) -> dict[tuple[int, int], float]:
    """As onnx_max_abs_diff, for an ExportedProgram from export_program."""
    task = task or task_for_model(model)
    output_names = TASKS[task][1]
    grid, _ = _shape_grid(model.config, task, list(lengths), list(batch_sizes))
    module = program.module()
    model.eval()
    diffs = {}
    for i, (batch, length) in enumerate(grid):
        inputs = sample_inputs(model.config, task, batch, length, seed=seed + i, empty_row=True)
        with _padded_path(model):
            expected = model(**inputs, return_dict=True)
        got = module(**inputs)
        diffs[(batch, length)] = max(float((got[name] - expected[name]).abs().max()) for name in output_names)
    return diffs
