"""The remote-code wing as a boundary: the files `save_pretrained` copies next to the weights import only torch,
transformers (safetensors, its hard dependency), the standard library and each other; nothing in them imports the
training wing; each head's saved folder holds exactly the wing files that head needs.

The import rules are read from the source with ast (no import runs), so a `from .sift import x` added to the modeling
file fails here, in a second, before any remote-code subprocess would.
"""

import ast
import sys
from pathlib import Path

import pytest

import modeling_deberta_custom
from modeling_deberta_custom import (
    DebertaCustomConfig,
    DebertaCustomForMaskedLM,
    DebertaCustomForMultipleChoice,
    DebertaCustomForQuestionAnswering,
    DebertaCustomForReplacedTokenDetection,
    DebertaCustomForRTDPreTraining,
    DebertaCustomForSequenceClassification,
    DebertaCustomForTokenClassification,
    DebertaCustomModel,
)

PACKAGE = Path(modeling_deberta_custom.__file__).parent
# Written out, not derived: adding a file to the wing is a decision this list records.
WING = {"configuration_deberta_custom", "attention", "attention_cpu", "losses", "modeling_deberta_custom",
        "modeling_rtd", "loading", "padding"}
TRAINING_WING = {"sift", "distillation", "pretraining", "glue", "training", "export", "convert"}
ALLOWED_ROOTS = {"torch", "transformers", "safetensors"} | set(sys.stdlib_module_names)
HEAD_FILES = {"configuration_deberta_custom", "modeling_deberta_custom", "attention", "attention_cpu", "losses",
              "loading", "padding"}

TINY = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
            max_position_embeddings=64, position_buckets=8)


def boundary_violations(source: str, filename: str) -> list[str]:
    """Every import of `source` (module level or nested) that leaves the wing: a relative import of a file outside
    WING (the training wing included), any import of the package by its name (remote code runs without it), or a
    third-party package other than torch / transformers / safetensors."""
    problems = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            roots = [alias.name.split(".")[0] for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level:
            # `from .x import y` and `from . import x`: every named sibling must be a wing file, flat (level 1)
            siblings = [node.module.split(".")[0]] if node.module else [alias.name for alias in node.names]
            problems += [f"{filename}: from {'.' * node.level}{node.module or ''} import ... ({s})"
                         for s in siblings if node.level != 1 or s not in WING]
            continue
        elif isinstance(node, ast.ImportFrom):
            roots = [node.module.split(".")[0]]
        else:
            continue
        problems += [f"{filename}: import of {root}" for root in roots if root not in ALLOWED_ROOTS]
    return problems


def wing_source(module: str) -> str:
    return (PACKAGE / f"{module}.py").read_text(encoding="utf-8")


@pytest.mark.parametrize("module", sorted(WING))
def test_wing_files_import_only_torch_transformers_stdlib_and_each_other(module):
    assert boundary_violations(wing_source(module), f"{module}.py") == []


@pytest.mark.parametrize("line", [
    "from .sift import SiFTCallback",
    "from .training.sift import SiFTCallback",
    "from . import distillation",
    "from .export import export_onnx",
    "from .convert import save_as_transformers",  # the old path's shim is for users, not for the wing
    "from modeling_deberta_custom.pretraining import DebertaMaskingCollator",
    "import datasets",
    "    from .glue import TASKS",  # nested imports count too
])
def test_an_import_of_the_training_wing_is_caught(line):
    source = wing_source("modeling_deberta_custom")
    if line.startswith(" "):
        source += f"\n\ndef later():\n{line}\n"
    else:
        source += f"\n{line}\n"
    assert boundary_violations(source, "modeling_deberta_custom.py"), line


def test_the_wing_list_matches_the_package():
    """Every top-level module is in one wing or the other, so a new file has to be placed (and this test read)."""
    modules = {path.stem for path in PACKAGE.glob("*.py")} | {path.name for path in PACKAGE.iterdir()
                                                               if (path / "__init__.py").is_file()}
    assert WING <= modules
    assert modules - WING - {"__init__"} <= TRAINING_WING, modules - WING - TRAINING_WING


def test_old_convert_path_still_works_and_is_not_the_wing():
    from modeling_deberta_custom.convert import (
        CHECKPOINT_KEY_MAPPING,
        convert_official_state_dict,
        save_as_transformers,
    )
    from modeling_deberta_custom.loading import CHECKPOINT_KEY_MAPPING as mapping
    from modeling_deberta_custom.loading import convert_official_state_dict as convert
    from modeling_deberta_custom.loading import save_as_transformers as save

    assert (convert_official_state_dict, save_as_transformers, CHECKPOINT_KEY_MAPPING) == (convert, save, mapping)


HEADS = {
    "backbone": (DebertaCustomModel, {}),
    "masked_lm": (DebertaCustomForMaskedLM, {}),
    "sequence_classification": (DebertaCustomForSequenceClassification, {}),
    "token_classification": (DebertaCustomForTokenClassification, {}),
    "question_answering": (DebertaCustomForQuestionAnswering, {}),
    "multiple_choice": (DebertaCustomForMultipleChoice, {}),
    "replaced_token_detection": (DebertaCustomForReplacedTokenDetection, {}),
    "rtd_pretraining": (DebertaCustomForRTDPreTraining, HEAD_FILES | {"modeling_rtd"}),
}


@pytest.mark.parametrize("name", list(HEADS))
def test_save_pretrained_copies_exactly_the_wing_files_a_head_needs(tmp_path, name):
    model_class, expected = HEADS[name]
    model_class(DebertaCustomConfig(**TINY)).save_pretrained(tmp_path)
    assert {path.stem for path in tmp_path.glob("*.py")} == (expected or HEAD_FILES)


def test_exported_discriminator_copies_the_head_files_once(tmp_path):
    """export_discriminator writes a DebertaCustomForReplacedTokenDetection folder: the head's files, not the RTD
    model's (the discriminator's auto_map names only modeling_deberta_custom.py)."""
    DebertaCustomForRTDPreTraining(DebertaCustomConfig(**TINY)).export_discriminator(tmp_path)
    assert {path.stem for path in tmp_path.glob("*.py")} == HEAD_FILES
