"""Folders written by `save_pretrained` load with `trust_remote_code=True` where this package cannot be imported.

Folders saved here (one per head, covering the v1 and v2 attention variants, EMD, the convolution layer and token
types, and the RTD pretraining model of modeling_rtd.py) are loaded in a fresh Python process that blocks `import modeling_deberta_custom` and runs outside the
repository, under the installed transformers and under transformers 4.57.x. Each model must come from the folder's
code (a `transformers_modules` module) and give outputs identical to the model that was saved. One subprocess per
transformers version checks every head.

transformers 4.57 lives beside the main environment, in .venv/transformers-4.57 (see the README set-up command; that
folder goes first on PYTHONPATH and brings its own huggingface_hub < 1.0 and tokenizers, torch comes from the venv).
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import transformers
from conftest import SETUP_457, TRANSFORMERS_457, perturb_parameters, random_batch, tiny_config

from modeling_deberta_custom import (
    DebertaCustomForMaskedLM,
    DebertaCustomForMultipleChoice,
    DebertaCustomForQuestionAnswering,
    DebertaCustomForRTDPreTraining,
    DebertaCustomForSequenceClassification,
    DebertaCustomForTokenClassification,
    DebertaCustomModel,
)

# name -> (class saved, Auto class that loads it, config overrides, multiple-choice inputs)
HEADS = {
    "masked_lm": (DebertaCustomForMaskedLM, "AutoModelForMaskedLM", {}, False),  # EMD
    "backbone": (DebertaCustomModel, "AutoModel",
                 dict(share_att_key=False, pos_att_type="c2p", conv_kernel_size=3, type_vocab_size=2), False),
    "sequence_classification": (DebertaCustomForSequenceClassification, "AutoModelForSequenceClassification",
                                dict(num_labels=3), False),
    "token_classification": (DebertaCustomForTokenClassification, "AutoModelForTokenClassification",
                             dict(attention_variant="v1", position_buckets=-1, share_att_key=False, norm_rel_ebd="none",
                                  position_biased_input=True, type_vocab_size=2, num_labels=5), False),
    "question_answering": (DebertaCustomForQuestionAnswering, "AutoModelForQuestionAnswering", {}, False),
    "multiple_choice": (DebertaCustomForMultipleChoice, "AutoModelForMultipleChoice", {}, True),
    # modeling_rtd.py needs attention.py and attention_cpu.py only through modeling_deberta_custom.py: transformers
    # 4.57 copies just a file's direct `from .x import y` siblings out of a local folder (issue 12, point 4).
    "rtd_pretraining": (DebertaCustomForRTDPreTraining, "AutoModelForPreTraining", {}, False),
}
# Extra loads of the masked-LM folder through other Auto classes: one Hub folder serves every head. The new heads
# are freshly initialised, so these compare the backbone (`base_model`) only.
FROM_MASKED_LM = {
    "masked_lm_as_backbone": ("AutoModel", "DebertaCustomModel"),
    "masked_lm_as_sequence_classification": ("AutoModelForSequenceClassification",
                                             "DebertaCustomForSequenceClassification"),
}
CASES = list(HEADS) + list(FROM_MASKED_LM)

# Runs in the subprocess: argv[1] is the spec file; writes a JSON report to argv[2].
CHILD = textwrap.dedent('''
    import json, sys, traceback

    class BlockPackage:  # the package is pip-installed (editable) in the venv: make it unimportable
        def find_spec(self, fullname, path=None, target=None):
            if fullname == "modeling_deberta_custom" or fullname.startswith("modeling_deberta_custom."):
                raise ImportError(f"{fullname} is blocked in this process")
            return None

    sys.meta_path.insert(0, BlockPackage())
    spec = json.load(open(sys.argv[1]))
    report = {"cases": {}}
    try:
        import modeling_deberta_custom  # noqa: F401
        report["package_importable"] = True
    except ImportError:
        report["package_importable"] = False

    import torch
    import transformers

    torch.set_num_threads(spec["num_threads"])
    report["transformers_version"] = transformers.__version__
    report["transformers_file"] = transformers.__file__

    def flatten(output):
        tensors = {}
        for key, value in output.items():
            if isinstance(value, torch.Tensor):
                tensors[key] = value
            elif isinstance(value, (tuple, list)):
                tensors.update({f"{key}.{i}": v for i, v in enumerate(value)})
        return tensors

    for case in spec["cases"]:
        result = report["cases"][case["name"]] = {}
        try:
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
            expected = data["expected"]
            result["keys"] = sorted(got)
            result["mismatch"] = {
                key: (float((got[key] - value).abs().max()) if got[key].shape == value.shape else str(tuple(got[key].shape)))
                for key, value in expected.items() if key in got and not torch.equal(got[key], value)
            }
        except Exception:
            result["error"] = traceback.format_exc()
    report["package_loaded_after"] = any(m.split(".")[0] == "modeling_deberta_custom" for m in sys.modules)
    json.dump(report, open(sys.argv[2], "w"), indent=1)
''')


def _flatten(output) -> dict:
    tensors = {}
    for key, value in output.items():
        if isinstance(value, torch.Tensor):
            tensors[key] = value
        elif isinstance(value, (tuple, list)):
            tensors.update({f"{key}.{i}": v for i, v in enumerate(value)})
    return tensors


@pytest.fixture(scope="module")
def saved_folders(tmp_path_factory):
    """Save one folder per head and, beside it, its inputs and the saved model's outputs. Returns the case list."""
    root = tmp_path_factory.mktemp("remote_code")
    cases = []
    for seed, (name, (model_class, auto_class, overrides, multiple_choice)) in enumerate(HEADS.items()):
        config = tiny_config(**overrides)
        torch.manual_seed(seed)
        model = model_class(config)
        perturb_parameters(model, seed=seed)
        model.eval()
        folder = root / name
        model.save_pretrained(folder)

        input_ids, attention_mask = random_batch(config.vocab_size, batch=4 if multiple_choice else 3, length=10,
                                                 seed=seed)
        inputs = dict(input_ids=input_ids, attention_mask=attention_mask)
        if config.type_vocab_size:
            inputs["token_type_ids"] = (torch.arange(input_ids.shape[1]) >= input_ids.shape[1] // 2).long().expand_as(
                input_ids).contiguous()
        if multiple_choice:  # [B=2, K=2, N]
            inputs = {key: value.view(2, 2, -1) for key, value in inputs.items()}
        call = dict(output_hidden_states=True)
        if model_class is DebertaCustomForRTDPreTraining:  # labels at a third of the tokens: the generator runs too
            picked = torch.rand(input_ids.shape, generator=torch.Generator().manual_seed(seed)) < 0.3
            inputs["labels"] = input_ids.masked_fill(~picked | (attention_mask == 0), -100)
            call = {}
        # Exact, except after the generator's pass: the discriminator's logits then come out 1.5e-8 apart between
        # two processes (same inputs, same sampled tokens; exact within one process).
        atol = 1e-6 if model_class is DebertaCustomForRTDPreTraining else 0.0
        torch.manual_seed(seed)
        with torch.no_grad():
            expected = _flatten(model(**inputs, **call, return_dict=True))
        torch.save(dict(inputs=inputs, expected=expected), root / f"{name}.pt")
        cases.append(dict(name=name, folder=str(folder), auto_class=auto_class, expected_class=model_class.__name__,
                          code_file=model_class.__module__.split(".")[-1], call=call, seed=seed, atol=atol,
                          data=str(root / f"{name}.pt"), compare_backbone=False))

        if name == "masked_lm":
            with torch.no_grad():
                backbone_expected = _flatten(model.deberta(**inputs, output_hidden_states=True, return_dict=True))
            torch.save(dict(inputs=inputs, expected=backbone_expected), root / "masked_lm_backbone.pt")
            for extra, (extra_auto, extra_class) in FROM_MASKED_LM.items():
                cases.append(dict(name=extra, folder=str(folder), auto_class=extra_auto, expected_class=extra_class,
                                  code_file="modeling_deberta_custom", call=call, seed=seed, atol=0.0,
                                  data=str(root / "masked_lm_backbone.pt"), compare_backbone=True))
    return root, cases


def _run_isolated(root: Path, cases: list, pythonpath: Path | None) -> dict:
    """One fresh interpreter, outside the repository, that cannot import the package and has no network."""
    work = root / ("child-" + (pythonpath.name if pythonpath else "installed"))
    work.mkdir()
    spec_file, report_file = work / "spec.json", work / "report.json"
    spec_file.write_text(json.dumps(dict(cases=cases, num_threads=torch.get_num_threads())))
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("HF_", "TRANSFORMERS_", "PYTHON"))}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME=str(work / "hf_home"),
               HF_MODULES_CACHE=str(work / "hf_modules"), PYTHONNOUSERSITE="1")
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    completed = subprocess.run(
        [sys.executable, "-c", CHILD, str(spec_file), str(report_file)],
        cwd=work, env=env, capture_output=True, text=True, timeout=300,
    )
    assert completed.returncode == 0 and report_file.is_file(), (
        f"subprocess failed (exit {completed.returncode}):\n{completed.stdout[-3000:]}\n{completed.stderr[-6000:]}"
    )
    return json.loads(report_file.read_text())


@pytest.fixture(scope="module", params=["installed", "4.57"])
def remote_report(request, saved_folders):
    root, cases = saved_folders
    if request.param == "installed":
        report = _run_isolated(root, cases, None)
        assert report["transformers_version"] == transformers.__version__
    else:
        if not (TRANSFORMERS_457 / "transformers").is_dir():
            pytest.skip(f"transformers 4.57 not found at {TRANSFORMERS_457}; set it up with: {SETUP_457}")
        report = _run_isolated(root, cases, TRANSFORMERS_457.resolve())
        assert report["transformers_version"].startswith("4.57."), report["transformers_version"]
        assert Path(report["transformers_file"]).resolve().is_relative_to(TRANSFORMERS_457.resolve()), report["transformers_file"]
    assert report["package_importable"] is False, "the subprocess could import modeling_deberta_custom"
    assert report["package_loaded_after"] is False, "loading the folders imported modeling_deberta_custom"
    return report, {case["name"]: case for case in cases}


@pytest.mark.parametrize("name", CASES)
def test_trust_remote_code_load_matches(remote_report, name):
    report, cases = remote_report
    result = report["cases"][name]
    assert "error" not in result, f"transformers {report['transformers_version']}:\n{result['error']}"
    assert result["class"] == cases[name]["expected_class"]
    # The class really came from the folder's code files, not from an installed package.
    assert result["module"].startswith("transformers_modules.")
    assert result["module"].endswith("." + cases[name]["code_file"])
    assert result["config_module"].startswith("transformers_modules.")
    assert result["config_module"].endswith(".configuration_deberta_custom")
    expected = torch.load(cases[name]["data"])["expected"]
    assert set(expected) <= set(result["keys"]), f"outputs missing: {set(expected) - set(result['keys'])}"
    mismatch = {key: diff for key, diff in result["mismatch"].items()
                if isinstance(diff, str) or diff > cases[name]["atol"]}
    assert not mismatch, (
        f"transformers {report['transformers_version']}: outputs differ from the saved model (max abs diff): "
        f"{mismatch}"
    )


def test_every_code_file_imports_each_sibling_it_reaches(tmp_path):
    """transformers 4.57 copies out of a local folder the file an auto_map entry names plus the siblings that file
    imports itself, not theirs. So each such file must import, directly, every sibling its imports reach (a new
    sibling of modeling_deberta_custom.py must also be imported by modeling_rtd.py). Needs no 4.57 to fail."""
    from transformers.dynamic_module_utils import get_relative_import_files, get_relative_imports

    DebertaCustomForRTDPreTraining(tiny_config()).save_pretrained(tmp_path)
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    for module in sorted({target.split(".")[0] for target in auto_map.values()}):
        path = tmp_path / f"{module}.py"
        direct = set(get_relative_imports(path))
        reached = {Path(file).stem for file in get_relative_import_files(path)}
        assert reached <= direct, (f"{module}.py reaches {sorted(reached - direct)} only through other files: give it "
                                   "`from .<file> import <name>` lines for them (transformers 4.57 copies only these)")
