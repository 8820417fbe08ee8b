"""Auto-class registration and the Hub-ready folder that every `save_pretrained` writes.

`import modeling_deberta_custom` (done in conftest) registers model_type `deberta_custom` with AutoConfig and every
head with its AutoModel class. Every save writes the code files and the full `auto_map`, so one folder serves every
Auto class; tests/test_remote_code.py loads such folders where the package cannot be imported.
"""

import ast
import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import perturb_parameters, random_batch, tiny_config
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForMaskedLM,
    AutoModelForMultipleChoice,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)
from transformers.dynamic_module_utils import get_relative_import_files

import modeling_deberta_custom.modeling_deberta_custom
from modeling_deberta_custom import (
    DebertaCustomConfig,
    DebertaCustomForMaskedLM,
    DebertaCustomForMultipleChoice,
    DebertaCustomForQuestionAnswering,
    DebertaCustomForSequenceClassification,
    DebertaCustomForTokenClassification,
    DebertaCustomModel,
)

# Auto class -> our class. Written out here rather than imported so the test states the contract independently.
AUTO_CLASSES = {
    AutoModel: DebertaCustomModel,
    AutoModelForMaskedLM: DebertaCustomForMaskedLM,
    AutoModelForSequenceClassification: DebertaCustomForSequenceClassification,
    AutoModelForTokenClassification: DebertaCustomForTokenClassification,
    AutoModelForQuestionAnswering: DebertaCustomForQuestionAnswering,
    AutoModelForMultipleChoice: DebertaCustomForMultipleChoice,
}
EXPECTED_AUTO_MAP = {
    "AutoConfig": "configuration_deberta_custom.DebertaCustomConfig",
    **{auto.__name__: f"modeling_deberta_custom.{ours.__name__}" for auto, ours in AUTO_CLASSES.items()},
}
# modeling_deberta_custom.py and the siblings it imports (derived, so a new sibling file needs no edit here)
CODE_FILES = {"modeling_deberta_custom.py"} | {
    Path(file).name for file in get_relative_import_files(modeling_deberta_custom.modeling_deberta_custom.__file__)}
assert {"configuration_deberta_custom.py", "attention.py", "attention_cpu.py", "losses.py", "loading.py"} <= CODE_FILES, CODE_FILES
CODE_MODULES = {name[:-3] for name in CODE_FILES}

auto_pairs = pytest.mark.parametrize(
    "auto_class, our_class", list(AUTO_CLASSES.items()), ids=[auto.__name__ for auto in AUTO_CLASSES]
)


def _assert_same_state(loaded: torch.nn.Module, saved: torch.nn.Module):
    loaded_state, saved_state = loaded.state_dict(), saved.state_dict()
    assert loaded_state.keys() == saved_state.keys()
    for name, tensor in saved_state.items():
        assert torch.equal(loaded_state[name], tensor), f"{name} changed in the save/load round trip"


def test_config_registered():
    config = AutoConfig.for_model("deberta_custom", hidden_size=32, num_attention_heads=4)
    assert type(config) is DebertaCustomConfig
    assert config.hidden_size == 32


def test_auto_config_from_saved_folder(tmp_path):
    tiny_config(num_labels=3).save_pretrained(tmp_path)
    config = AutoConfig.from_pretrained(tmp_path)
    assert type(config) is DebertaCustomConfig
    assert config.num_labels == 3


@auto_pairs
def test_auto_class_from_config_and_from_pretrained(tmp_path, auto_class, our_class):
    model = auto_class.from_config(tiny_config())
    assert type(model) is our_class
    perturb_parameters(model)
    model.save_pretrained(tmp_path)
    loaded = auto_class.from_pretrained(tmp_path)
    assert type(loaded) is our_class
    _assert_same_state(loaded, model)


@auto_pairs
def test_save_pretrained_writes_hub_ready_folder(tmp_path, auto_class, our_class):
    our_class(tiny_config()).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "deberta_custom"
    assert config["architectures"] == [our_class.__name__]
    assert config["auto_map"] == EXPECTED_AUTO_MAP
    assert (tmp_path / "model.safetensors").is_file()
    assert {p.name for p in tmp_path.glob("*.py")} == CODE_FILES  # no package __init__, no training code
    for target in config["auto_map"].values():  # every "file.ClassName" names a class defined in that file
        module, class_name = target.split(".")
        tree = ast.parse((tmp_path / f"{module}.py").read_text())
        assert class_name in {node.name for node in tree.body if isinstance(node, ast.ClassDef)}, target


def test_code_files_import_only_torch_transformers_and_each_other(tmp_path):
    DebertaCustomModel(tiny_config()).save_pretrained(tmp_path)
    # safetensors is a hard dependency of transformers, so wherever transformers is installed it is too.
    allowed = {"torch", "transformers", "safetensors"} | set(sys.stdlib_module_names)
    for name in CODE_FILES:
        for node in ast.walk(ast.parse((tmp_path / name).read_text())):
            if isinstance(node, ast.Import):
                roots = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: must be a sibling code file, which transformers copies flat
                    assert node.level == 1 and node.module in CODE_MODULES, f"{name}: from {'.' * node.level}{node.module}"
                    continue
                roots = [node.module.split(".")[0]]
            else:
                continue
            for root in roots:
                assert root in allowed, f"{name} imports {root}, which a Hub folder cannot provide"


def test_one_folder_serves_every_auto_class(tmp_path):
    """A folder saved from the masked-LM model loads as the backbone and as any other head, with the backbone
    weights intact (only the new head is freshly initialised)."""
    mlm = DebertaCustomForMaskedLM(tiny_config())
    perturb_parameters(mlm)
    mlm.eval()
    mlm.save_pretrained(tmp_path)
    input_ids, attention_mask = random_batch(mlm.config.vocab_size)
    with torch.no_grad():
        expected = mlm.deberta(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    for auto_class, our_class in AUTO_CLASSES.items():
        model = auto_class.from_pretrained(tmp_path)
        assert type(model) is our_class, auto_class.__name__
        backbone = model if our_class is DebertaCustomModel else model.deberta
        _assert_same_state(backbone, mlm.deberta)

    backbone = AutoModel.from_pretrained(tmp_path)
    classifier = AutoModelForSequenceClassification.from_pretrained(tmp_path, num_labels=3)
    assert classifier.config.num_labels == 3
    with torch.no_grad():
        assert torch.equal(backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state, expected)
        hidden = classifier.deberta(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        assert torch.equal(hidden, expected)
        logits = classifier(input_ids=input_ids, attention_mask=attention_mask).logits
    assert logits.shape == (input_ids.shape[0], 3)
    assert torch.isfinite(logits).all()
