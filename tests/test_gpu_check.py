"""scripts/gpu_check.py (the check a GPU machine runs) works end to end in its reduced CPU mode: every parity and
training case passes, the benchmark measures every model it names, and the JSON names the machine."""

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"


def test_gpu_check_smoke_mode(tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    assert gpu_check.main(["--smoke", "--out", str(tmp_path), "--repeats", "1"]) == 0
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert {"device", "torch", "transformers", "triton"} <= report["environment"].keys()
    sections = {}
    for entry in report["results"]:
        sections.setdefault(entry["section"], []).append(entry)
    assert {e["variant"] for e in sections["parity"]} == set(gpu_check.VARIANTS)
    assert all(e["status"] == "ok" for e in sections["parity"] + sections["training"]), sections
    assert {e["dtype"] for e in sections["training"]} == {"float32", "bfloat16", "float16"}
    measured = {(e["model"], e["mode"]) for e in sections["benchmark"] if e["status"] == "ok"}
    assert {(m, mode) for m in ("ours-sdpa", "bert", "hf-deberta") for mode in ("forward", "train")} <= measured
    assert any(row.get("vs_bert") for row in report["ratios"])
