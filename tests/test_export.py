"""Export: ONNX (TorchScript exporter, dynamic batch and sequence axes) checked in onnxruntime, torch.export, and the
scripts/export_onnx.py command, on tiny models with position_buckets 8 so that 40 and 100 tokens lie past the bucket
range (100 also past max_position_embeddings=64, which relative-only models accept)."""

import importlib.util
import warnings

import pytest
import torch
from helpers import REPO_ROOT, TINY_OFFICIAL_V2, perturb_parameters, tiny_config

from modeling_deberta_custom import DebertaCustomForSequenceClassification, DebertaCustomModel
from modeling_deberta_custom.export import (
    check_onnx,
    export_onnx,
    export_program,
    onnx_max_abs_diff,
    program_max_abs_diff,
    sample_inputs,
)

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

LENGTHS = (5, 17, 40, 100)
BATCH_SIZES = (1, 3)  # the export sample has batch 2 and length 16
TOLERANCE = 1e-4


def _model(model_class, implementation="sdpa", **overrides):
    config = tiny_config(**overrides)
    config._attn_implementation = implementation
    model = model_class(config).eval()
    perturb_parameters(model)
    return model


@pytest.mark.parametrize(
    ("model_class", "implementation", "sample_length"),
    [
        (DebertaCustomModel, "eager", 16),
        # A sample of 4 tokens lies where the fast path takes its short-sequence shortcut (every distance its own
        # table row): the trace must not keep it, or longer inputs would read the wrong rows.
        (DebertaCustomModel, "sdpa", 4),
        (DebertaCustomForSequenceClassification, "sdpa", 16),
    ],
)
def test_onnx_matches_pytorch_at_every_length_and_batch(tmp_path, model_class, implementation, sample_length):
    import onnx

    model = _model(model_class, implementation, num_labels=3)
    path = export_onnx(model, tmp_path / "model.onnx", sample_length=sample_length)
    check_onnx(path)
    graph = onnx.load(path, load_external_data=False).graph
    for graph_input in graph.input:  # batch and sequence are symbolic, not the sample's 2 x 16
        dims = graph_input.type.tensor_type.shape.dim
        assert [d.dim_param for d in dims] == ["batch", "sequence"], graph_input

    diffs = onnx_max_abs_diff(model, path, lengths=LENGTHS, batch_sizes=BATCH_SIZES)
    assert sorted(diffs) == sorted((b, n) for b in BATCH_SIZES for n in LENGTHS)
    assert max(diffs.values()) < TOLERANCE, diffs


def test_onnx_v1_with_token_types_and_absolute_positions(tmp_path):
    """DeBERTa v1 layout (fused in_proj, unbucketed relative positions, absolute positions at the input) with token
    types as a third graph input. Lengths stop at max_position_embeddings."""
    model = _model(DebertaCustomForSequenceClassification, "sdpa", attention_variant="v1", position_buckets=-1,
                   share_att_key=False, norm_rel_ebd="none", position_biased_input=True, type_vocab_size=2)
    path = export_onnx(model, tmp_path / "v1.onnx")
    diffs = onnx_max_abs_diff(model, path, lengths=(5, 40, 64, 100), batch_sizes=(3,))
    assert sorted(diffs) == [(3, 5), (3, 40), (3, 64)]  # 100 > max_position_embeddings is left out
    assert max(diffs.values()) < TOLERANCE, diffs


def test_onnx_through_the_dynamo_exporter(tmp_path):
    """The torch.export-based ONNX exporter (torch's default; needs onnxscript, not a dependency of this project)."""
    pytest.importorskip("onnxscript")
    model = _model(DebertaCustomForSequenceClassification, "sdpa", num_labels=2)
    path = export_onnx(model, tmp_path / "dynamo.onnx", exporter="dynamo", sample_length=4)
    assert model.config._attn_implementation == "sdpa"  # traced with eager attention, then put back
    diffs = onnx_max_abs_diff(model, path, lengths=LENGTHS, batch_sizes=BATCH_SIZES)
    assert max(diffs.values()) < TOLERANCE, diffs


def test_onnx_trace_has_no_value_dependent_checks(tmp_path):
    """Input validation that reads tensor values (id ranges) is skipped under tracing, so the trace holds no Python
    number taken from the sample's values."""
    model = _model(DebertaCustomModel)
    sample = sample_inputs(model.config, "base", 2, 16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.onnx.export(model, (sample["input_ids"], sample["attention_mask"]), str(tmp_path / "m.onnx"),
                          dynamo=False, input_names=["input_ids", "attention_mask"],
                          dynamic_axes={"input_ids": {0: "b", 1: "n"}, "attention_mask": {0: "b", 1: "n"}})
    messages = [str(w.message) for w in caught if issubclass(w.category, torch.jit.TracerWarning)]
    assert not [m for m in messages if "Python integer" in m or "Python float" in m], messages


@pytest.mark.parametrize(("model_class", "implementation"),
                         [(DebertaCustomModel, "sdpa"), (DebertaCustomForSequenceClassification, "eager")])
def test_torch_export_matches_with_dynamic_dims(model_class, implementation):
    """Dynamic batch and sequence dims from 1 up: the length-dependent shortcuts of the fast path must not become
    guards that pin the sequence range."""
    model = _model(model_class, implementation, num_labels=2)
    program = export_program(model)
    diffs = program_max_abs_diff(model, program, lengths=LENGTHS, batch_sizes=BATCH_SIZES)
    assert max(diffs.values()) < TOLERANCE, diffs


def _load_script():
    spec = importlib.util.spec_from_file_location("export_onnx_script", REPO_ROOT / "scripts" / "export_onnx.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_export_script_on_official_and_own_checkpoints(tmp_path, capsys):
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification

    script = _load_script()
    official = tmp_path / "official"
    fields = {k: v for k, v in TINY_OFFICIAL_V2.items() if k != "model_type"}
    DebertaV2ForSequenceClassification(DebertaV2Config(num_labels=2, **fields)).save_pretrained(official)
    assert script.main(["--model", str(official), "--task", "sequence-classification",
                        "--output", str(tmp_path / "onnx_official"), "--lengths", "5,40,100"]) == 0
    printed = capsys.readouterr().out
    assert "max difference (ONNX)" in printed and "length   100" in printed
    assert (tmp_path / "onnx_official" / "model.onnx").is_file()
    assert (tmp_path / "onnx_official" / "config.json").is_file()

    ours = tmp_path / "ours"
    _model(DebertaCustomModel).save_pretrained(ours)
    assert script.main(["--model", str(ours), "--task", "base", "--output", str(tmp_path / "onnx_ours"),
                        "--batch-sizes", "4", "--torch-export"]) == 0
    printed = capsys.readouterr().out
    assert "max difference (torch.export)" in printed
    assert (tmp_path / "onnx_ours" / "model.pt2").is_file()
