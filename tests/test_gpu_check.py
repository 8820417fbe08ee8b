"""benchmarks/gpu_check.py, the one run a GPU machine gets, rehearsed on CPU: its smoke mode passes and measures
what it names; it cannot compare a path with itself (nonzero fp32 errors at every length); a deliberately broken
attention path fails it, in fp32 and in half precision; FlexAttention's fallback to its unfused path is seen; the
phases run in their own processes and keep their results when the budget runs out."""

import importlib
import json
import logging
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load(name):
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    return importlib.import_module(name)


def sections(report):
    grouped = {}
    for entry in report["results"]:
        grouped.setdefault(entry["section"], []).append(entry)
    return grouped


def test_smoke_mode_passes_and_compares_real_differences(tmp_path):
    gpu_check = load("gpu_check")
    assert gpu_check.main(["--smoke", "--in-process", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert {"gpu", "cpu", "torch", "transformers", "triton"} <= report["machine"].keys()
    assert (tmp_path / "gpu_check.png").stat().st_size > 0
    found = sections(report)
    assert all(status["finished"] for status in report["phases"].values()), report["phases"]

    parity = found["parity"]
    assert {e["variant"] for e in parity} == set(gpu_check.VARIANTS)
    assert all(e["status"] == "ok" for e in parity + found["training"]), [e for e in parity if e["status"] != "ok"]
    # A path compared with itself gives exactly 0.0: every fp32 case must show a real (if tiny) difference.
    fp32 = [e for e in parity if e["dtype"] == "float32"]
    assert len(fp32) == len(gpu_check.VARIANTS) * 3 and all(0 < e["max_abs_error"] < 1e-5 for e in fp32), fp32
    # Each dtype is checked against eager in the same dtype, on the scale of eager's own error.
    assert all(0 < e["eager_mean_error"] <= e["eager_max_error"] for e in parity)

    training = {(e["path"], e["dtype"]): e for e in found["training"]}
    assert set(training) == {(p, d) for p in ("eager", "sdpa") for d in gpu_check.DTYPES}
    assert all(training[("sdpa", d)]["grad_cosine"] > 0.99 for d in gpu_check.DTYPES)

    measured = {(e["model"], e["mode"]) for e in found["shapes"] if e["status"] == "ok"}
    assert {(m, mode) for m in ("ours", "bert", "hf-deberta") for mode in ("forward", "train")} <= measured
    for mode in ("forward", "train"):  # longest first
        lengths = [e["length"] for e in found["shapes"] if e["mode"] == mode]
        assert lengths == sorted(lengths, reverse=True)
    assert all(e["peak_bytes"] is None or e["peak_bytes"] > 0 for e in found["shapes"] if "peak_bytes" in e)
    real = {(e["model"], e["dataset"], e["order"], e["mode"]): e for e in found["real"]}
    for key in [(m, d, o, mode) for m in ("ours-padded", "hf-deberta-padded", "bert-padded")
                for d in ("sst2", "rte") for o in ("random", "grouped", "fixed") for mode in ("train", "forward")]:
        assert real[key]["status"] == "ok" and real[key]["tokens_per_s"] > 0, real[key]
    assert real[("ours-padded", "sst2", "random", "train")]["real_fraction"] < 0.6  # padded batches, really
    assert real[("ours-padded", "sst2", "fixed", "train")]["real_fraction"] == 1.0


def key_mask_of(attn_mask):
    """The attend / not-attend part of the additive mask our sdpa path hands torch (position terms dropped)."""
    if attn_mask is None or attn_mask.dtype == torch.bool:
        return attn_mask
    return attn_mask > torch.finfo(attn_mask.dtype).min / 2


@pytest.mark.parametrize("breakage", ["uniform_attention", "no_position_terms"])
def test_a_broken_attention_path_fails_in_fp32_and_half_precision(tmp_path, monkeypatch, breakage):
    """The sdpa path hands its scores to F.scaled_dot_product_attention (eager does not call it): replacing that by
    a uniform average over the real keys, or dropping the position terms it carries, must fail every case."""
    gpu_check = load("gpu_check")
    original = F.scaled_dot_product_attention

    def broken(query, key, value, attn_mask=None, **kwargs):
        if breakage == "uniform_attention":
            query = torch.zeros_like(query)
        return original(query, key, value, attn_mask=key_mask_of(attn_mask), **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", broken)
    assert gpu_check.main(["--smoke", "--in-process", "--phases", "parity", "--variants", "v3",
                           "--out", str(tmp_path)]) == 1
    parity = sections(json.loads((tmp_path / "gpu_check.json").read_text()))["parity"]
    assert {e["dtype"] for e in parity} == set(gpu_check.DTYPES)
    assert all(e["status"] == "fail" for e in parity), [(e["dtype"], e["length"], e["status"]) for e in parity]


def test_flex_witness_sees_an_unfused_flex_attention_and_a_recompile_limit():
    harness = load("harness")
    from torch.nn.attention.flex_attention import flex_attention

    query = torch.randn(1, 2, 128, 16)
    with harness.flex_witness() as seen:
        flex_attention(query, query, query)  # not compiled: the unfused reference, [B, H, N, N] scores
    assert seen["unfused"] and any("without torch.compile" in r for r in seen["reasons"])
    with harness.flex_witness() as seen:  # torch shows its warning once per process: the witness resets that
        flex_attention(query, query, query)
    assert seen["unfused"]
    with harness.flex_witness() as seen:
        logging.getLogger("torch._dynamo.convert_frame").warning("torch._dynamo hit config.recompile_limit (8)")
    assert seen["unfused"] and "recompile_limit" in seen["reasons"][0]
    with harness.flex_witness() as seen:
        torch.softmax(query, -1)
    assert not seen["unfused"] and seen["compiled_graphs"] == 0


def test_recompile_limit_is_set():
    harness = load("harness")
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    before = getattr(config, name)
    try:
        harness.set_recompile_limit(48)
        assert getattr(config, name) == 48
    finally:
        setattr(config, name, before)


def test_phases_run_in_own_processes_and_a_spent_budget_skips_but_writes(tmp_path):
    """Each phase is a child process writing phase_<name>.json; with no time left every case is recorded as
    skipped (not silently dropped), and the report still comes out."""
    gpu_check = load("gpu_check")
    assert gpu_check.main(["--smoke", "--phases", "training", "--budget", "0", "--out", str(tmp_path)]) == 0
    phase = json.loads((tmp_path / "phase_training.json").read_text())
    assert phase["finished"] and phase["machine"]["torch"] == torch.__version__
    assert phase["results"] and all(e["status"] == "skipped" and e["error"] == "time budget" for e in phase["results"])
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["phases"]["training"]["returncode"] == 0
    assert report["summary"]["counts"]["training"] == {"skipped": len(phase["results"])}


def test_result_log_keeps_every_case_as_it_comes(tmp_path):
    harness = load("harness")
    log = harness.ResultLog(tmp_path / "phase.json", phase="x")
    log.add(dict(case=1))
    assert json.loads((tmp_path / "phase.json").read_text()) == dict(phase="x", finished=False, results=[dict(case=1)])
    entry = harness.run_case(lambda: (_ for _ in ()).throw(RuntimeError("CUDA out of memory. Tried")), "cpu")
    assert entry["status"] == "oom" and "traceback" not in entry
    entry = harness.run_case(lambda: {}["missing"], "cpu")
    assert entry["status"] == "error" and "KeyError" in entry["error"] and entry["traceback"]


def test_alternate_rotates_caps_and_records_failures():
    harness = load("harness")
    order, released = [], []

    def call(name):
        def run():
            order.append(name)
            if name == "broken":
                raise RuntimeError("CUDA out of memory. Tried to allocate")
        return run

    calls = {name: call(name) for name in ("a", "b", "broken")}
    samples = harness.alternate(calls, 2, "cpu", warmup=1, on_failure=released.append)
    assert order == ["a", "b", "broken", "a", "b", "b", "a"]  # warm-ups, then repeats starting one later each time
    assert samples["broken"]["error"] == "out of memory" and released == ["broken"]
    assert len(samples["a"]["times_s"]) == 2 and samples["a"]["median_s"] is not None
    capped = harness.alternate({"slow": call("slow")}, 5, "cpu", warmup=0, max_seconds=0)
    assert len(capped["slow"]["times_s"]) == 1  # one sample kept, the rest skipped
    capped = harness.alternate({"slow": call("slow")}, 5, "cpu", warmup=1, max_seconds=0)
    assert not capped["slow"]["times_s"] and capped["slow"]["error"].startswith("slow: the warm-up alone")
    assert capped["slow"]["warmup_s"] > 0 and harness.sample_status(capped["slow"]["error"]) == "skipped"
    late = harness.alternate({"late": call("late")}, 3, "cpu", deadline=0)
    assert late["late"]["error"] == "time budget" and harness.sample_status(late["late"]["error"]) == "skipped"
