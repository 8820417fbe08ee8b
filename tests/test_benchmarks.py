"""The benchmarks run (at tiny sizes, so that they do not rot), and their batches are what they claim: GLUE length
distributions, group_by_length as the Trainer's LengthGroupedSampler, packing as DataCollatorWithFlattening."""

import importlib
import json
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO_ROOT / "benchmarks"
WHEEL = REPO_ROOT / ".whl" / "disentangled_flash-1.1.1-py3-none-any.whl"


def load(name):
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    return importlib.import_module(name)


def test_length_samples_and_batches():
    harness = load("harness")
    for name, (_, batch_size) in harness.REAL_DATASETS.items():
        record = json.loads((harness.DATA / harness.REAL_DATASETS[name][0]).read_text())
        lengths = record["lengths"]
        assert len(lengths) >= 256 and "official DeBERTa-v3" in record["origin"] and min(lengths) >= 3
        randomly = harness.random_batches(lengths, batch_size, 4)
        assert [len(b) for b in randomly] == [batch_size] * 4
        assert harness.batch_stats(randomly)["real_fraction"] < 0.8  # padding is real at these batch sizes
        grouped = harness.length_grouped_batches(lengths, batch_size, 4)
        assert all(b == sorted(b, reverse=True) for b in grouped)  # sorted within the mega-batch
        assert harness.batch_stats(grouped)["real_fraction"] > harness.batch_stats(randomly)["real_fraction"]
        fixed = harness.fixed_batches(randomly)
        assert harness.batch_stats(fixed)["real_fraction"] == 1.0
        assert abs(sum(map(sum, fixed)) - sum(map(sum, randomly))) <= len(lengths)  # same tokens, up to rounding


def test_padded_and_packed_inputs():
    harness = load("harness")
    generator = torch.Generator().manual_seed(0)
    padded = harness.padded_inputs([3, 5, 1], 100, "cpu", generator)
    assert padded["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    packed = harness.packed_inputs([3, 5, 1], 100, "cpu", generator, flash_kwargs=True)
    assert packed["input_ids"].shape == (1, 9) and "labels" not in packed
    assert packed["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3, 4, 0]]
    assert packed["cu_seq_lens_q"].tolist() == [0, 3, 8, 9] and packed["max_length_q"] == 5


def test_benchmark_quick_runs_both_suites(tmp_path):
    benchmark = load("benchmark")
    report = benchmark.main(["--suite", "shapes,real", "--quick", "--threads", "1", "--no-memory", "--out",
                             str(tmp_path), "--models", "ours,hf-deberta,bert", "--datasets", "sst2"])
    saved = json.loads((tmp_path / "benchmark.json").read_text())
    assert saved["meta"]["machine"]["cpu"] and saved["meta"]["machine"]["torch"] == torch.__version__
    assert (tmp_path / "benchmark.png").stat().st_size > 0
    shapes = [r for r in report["results"] if r.get("section") is None]
    assert {(r["model"], r["mode"]) for r in shapes if r["median_s"]} == {
        (m, mode) for m in ("ours", "hf-deberta", "bert") for mode in ("forward", "train")}
    assert report["ratios"] and all(row["time_vs_bert"] for row in report["ratios"])
    real = {(r["model"], r["order"], r["mode"]): r for r in report["results"] if r.get("section") == "real"}
    assert all(real[(m, o, mode)]["examples_per_s"] > 0 for m in ("ours-padded", "hf-deberta-padded", "bert-padded")
               for o in ("random", "grouped", "fixed") for mode in ("train", "forward"))
    harness = load("harness")
    if not harness.unpadding_supported():  # turns on by itself once the config has unpad_inputs
        assert "unpad_inputs" in real[("ours-packed", "random", "train")]["error"]


def test_real_suite_builds_unpadded_and_packed_cases(tmp_path, monkeypatch):
    """The unpadded and packed variants as they will run once the config has unpad_inputs: the config gets the
    switch, packed batches go to the model's forward as DataCollatorWithFlattening gives them."""
    benchmark = load("benchmark")
    harness = load("harness")
    monkeypatch.setattr(harness, "unpadding_supported", lambda: True)
    report = benchmark.main(["--suite", "real", "--quick", "--threads", "1", "--out", str(tmp_path), "--no-plot",
                             "--variants", "ours-padded,ours-unpadded,ours-packed", "--datasets", "rte",
                             "--orders", "random"])
    real = {(r["model"], r["mode"]): r for r in report["results"]}
    assert all(r["status"] == "ok" and r["tokens_per_s"] > 0 for r in real.values()), real
    assert real[("ours-packed", "train")]["real_tokens"] == real[("ours-padded", "train")]["real_tokens"]


def test_benchmark_memory_pass_runs_in_a_child(tmp_path):
    benchmark = load("benchmark")
    report = benchmark.main(["--quick", "--threads", "1", "--out", str(tmp_path), "--no-plot", "--models", "ours",
                             "--forward-shapes", "1x16", "--train-shapes", ""])
    (row,) = report["results"]
    # A peak was measured (on CPU the resident set's growth, which can be 0 when a tiny forward reuses resident pages).
    assert row["peak_bytes"] is not None and row["peak_bytes"] >= 0 and not row.get("memory_error"), row


@pytest.mark.skipif(not WHEEL.exists(), reason=f"disentangled-flash wheel not at {WHEEL} (see docs/gpu_check.md)")
def test_disentangled_flash_cases_run_through_its_public_api(tmp_path):
    """On CPU its PyTorch backend: the padded and packed calls, inference and training, as the GPU run makes them."""
    gpu_check = load("gpu_check")
    assert gpu_check.main(["--smoke", "--in-process", "--phases", "shapes,real", "--shapes", "2x32",
                           "--real-batches", "1", "--disentangled-flash", str(WHEEL), "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "gpu_check.json").read_text())["results"]
    flash = [r for r in results if r["model"].startswith("disentangled-flash")]
    assert {r["section"] for r in flash} == {"shapes", "real"}
    assert all(r["status"] == "ok" and r["backend"] == "torch" for r in flash), flash
