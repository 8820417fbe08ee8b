"""Load saved folders with `trust_remote_code=True` in a process that cannot import modeling_deberta_custom.

    python load_remote_code.py SPEC_JSON REPORT_JSON

SPEC_JSON lists the cases (folder, Auto class, saved inputs and expected outputs); the report says, per case, which
class and module loaded and how far its outputs are from the expected ones. Run by helpers.run_without_package.
"""

import json
import sys
import traceback


class BlockPackage:  # the package is pip-installed (editable) in the venv: make it unimportable
    def find_spec(self, fullname, path=None, target=None):
        if fullname == "modeling_deberta_custom" or fullname.startswith("modeling_deberta_custom."):
            raise ImportError(f"{fullname} is blocked in this process")
        return None


def flatten(output):
    tensors = {}
    for key, value in output.items():
        if isinstance(value, torch.Tensor):
            tensors[key] = value
        elif isinstance(value, (tuple, list)):
            tensors.update({f"{key}.{i}": v for i, v in enumerate(value)})
    return tensors


def run_case(case, result):
    auto_class = getattr(transformers, case["auto_class"])
    model = auto_class.from_pretrained(case["folder"], trust_remote_code=True)
    result["class"] = type(model).__name__
    result["module"] = type(model).__module__
    result["config_module"] = type(model.config).__module__
    data = torch.load(case["data"])
    module = model.base_model if case["compare_backbone"] else model
    torch.manual_seed(case["seed"])  # the RTD generator samples its replacements
    with torch.no_grad():
        got = flatten(module(**data["inputs"], **case["call"], return_dict=True))
    result["keys"] = sorted(got)
    result["mismatch"] = {
        key: (float((got[key] - value).abs().max()) if got[key].shape == value.shape else str(tuple(got[key].shape)))
        for key, value in data["expected"].items() if key in got and not torch.equal(got[key], value)
    }


sys.meta_path.insert(0, BlockPackage())
spec = json.load(open(sys.argv[1]))
report = {"cases": {}}
try:
    import modeling_deberta_custom  # noqa: F401
    report["package_importable"] = True
except ImportError:
    report["package_importable"] = False

import torch  # noqa: E402
import transformers  # noqa: E402

torch.set_num_threads(spec["num_threads"])
report["transformers_version"] = transformers.__version__
report["transformers_file"] = transformers.__file__
for case in spec["cases"]:
    result = report["cases"][case["name"]] = {}
    try:
        run_case(case, result)
    except Exception:
        result["error"] = traceback.format_exc()
report["package_loaded_after"] = any(m.split(".")[0] == "modeling_deberta_custom" for m in sys.modules)
json.dump(report, open(sys.argv[2], "w"), indent=1)
