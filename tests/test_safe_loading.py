"""Safe loading: weights are written as safetensors; pickle checkpoints (pytorch_model.bin) load only through
transformers' own reader and its policy (torch.load with weights_only=True), so a pickle that would run code is
refused with a clear error and never runs; the files copied next to the weights for `trust_remote_code` import only
the standard library, torch, transformers and each other, and do no I/O and print or log nothing when imported."""

import ast
import builtins
import contextlib
import importlib
import inspect
import io
import logging
import os
import shutil
import socket
import sys
import uuid
import warnings
from importlib.metadata import requires
from pathlib import Path

import pytest
import torch
from helpers import TINY_OFFICIAL_V2, perturb_parameters, tiny_config
from safetensors.torch import load_file
from transformers import AutoModel
from transformers.dynamic_module_utils import get_relative_import_files

import modeling_deberta_custom
from modeling_deberta_custom import (
    DebertaCustomForMaskedLM,
    DebertaCustomForSequenceClassification,
    DebertaCustomModel,
)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module):
    state_a, state_b = a.state_dict(), b.state_dict()
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        torch.testing.assert_close(state_a[key], state_b[key], rtol=0, atol=0, msg=key)


# ----------------------------------------------------------------------------------------------------------------------
# safetensors out
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_class", [DebertaCustomForMaskedLM, DebertaCustomForSequenceClassification])
def test_save_pretrained_writes_safetensors_only(tmp_path, model_class):
    model = model_class(tiny_config()).eval()
    perturb_parameters(model)
    model.save_pretrained(tmp_path)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert "model.safetensors" in files
    assert not [f for f in files if f.endswith(PICKLE_SUFFIXES)], files
    saved = load_file(tmp_path / "model.safetensors")  # a plain tensor file: no code can be stored in it
    assert saved and all(isinstance(t, torch.Tensor) for t in saved.values())
    assert_same_weights(model, model_class.from_pretrained(tmp_path))


def test_transformers_layout_export_writes_safetensors_only(tmp_path):
    model = DebertaCustomForMaskedLM(tiny_config())
    modeling_deberta_custom.save_as_transformers(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]


# ----------------------------------------------------------------------------------------------------------------------
# pickles in: only what weights_only allows
# ----------------------------------------------------------------------------------------------------------------------


class CodeRunningPayload:
    """Unpickling this calls exec(...), which writes the marker file: what a malicious checkpoint does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('code ran while loading')",))


def official_folder(tmp_path, name="official") -> Path:
    """A transformers DebertaV2 checkpoint folder (official layout, model_type deberta-v2)."""
    from transformers import DebertaV2Config, DebertaV2Model

    folder = tmp_path / name
    fields = {k: v for k, v in TINY_OFFICIAL_V2.items() if k != "model_type"}
    DebertaV2Model(DebertaV2Config(**fields)).save_pretrained(folder)
    return folder


def to_pickle_checkpoint(folder: Path, extra: dict | None = None) -> dict:
    """Replace the folder's safetensors file with pytorch_model.bin (a pickle) holding the same weights plus `extra`."""
    state_dict = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save({**state_dict, **(extra or {})}, folder / "pytorch_model.bin")
    return state_dict


def assert_clear_refusal(error: BaseException, expect_file_named: bool):
    """torch's weights_only unpickler names the refused global; our loaders add the file's path."""
    message = str(error)
    assert "Weights only load failed" in message, message
    assert "Unsupported global: GLOBAL exec" in message, message
    if expect_file_named:
        assert "pytorch_model.bin" in message, message


def test_the_payload_really_runs_code_when_unpickled_without_the_policy(tmp_path):
    """Control: the crafted file is dangerous, so the refusals below mean something."""
    marker = tmp_path / "marker"
    torch.save({"x": CodeRunningPayload(marker)}, tmp_path / "evil.bin")
    torch.load(tmp_path / "evil.bin", weights_only=False)
    assert marker.read_text() == "code ran while loading"


def test_official_pickle_checkpoint_of_plain_tensors_loads(tmp_path):
    folder = official_folder(tmp_path)
    state_dict = to_pickle_checkpoint(folder)
    model = DebertaCustomModel.from_pretrained(folder)
    for key, value in state_dict.items():
        torch.testing.assert_close(model.state_dict()[key.removeprefix("deberta.")], value, rtol=0, atol=0)


@pytest.mark.parametrize("loader", ["ours", "auto"])
def test_official_pickle_checkpoint_that_runs_code_is_refused(tmp_path, loader):
    folder = official_folder(tmp_path)
    marker = tmp_path / "marker"
    to_pickle_checkpoint(folder, {"extra": CodeRunningPayload(marker)})
    # "auto": an official folder through the Auto classes goes to transformers' own DebertaV2 classes
    load = DebertaCustomModel.from_pretrained if loader == "ours" else AutoModel.from_pretrained
    with pytest.raises(Exception) as caught:
        load(folder)
    assert not marker.exists(), "the pickle ran code while loading"
    assert_clear_refusal(caught.value, expect_file_named=loader == "ours")


def test_own_format_pickle_checkpoint_that_runs_code_is_refused(tmp_path):
    """Our own folders (model_type deberta_custom) go through transformers' from_pretrained and its policy."""
    folder = tmp_path / "ours"
    model = DebertaCustomModel(tiny_config())
    model.save_pretrained(folder)
    to_pickle_checkpoint(folder)
    assert_same_weights(model, DebertaCustomModel.from_pretrained(folder))  # plain tensors in a pickle: allowed

    marker = tmp_path / "marker"
    torch.save({**model.state_dict(), "extra": CodeRunningPayload(marker)}, folder / "pytorch_model.bin")
    with pytest.raises(Exception) as caught:
        DebertaCustomModel.from_pretrained(folder)
    assert not marker.exists(), "the pickle ran code while loading"
    assert_clear_refusal(caught.value, expect_file_named=True)


# ----------------------------------------------------------------------------------------------------------------------
# Remote code: imports and import-time behaviour
# ----------------------------------------------------------------------------------------------------------------------

PACKAGE_DIR = Path(modeling_deberta_custom.__file__).parent


def remote_code_files() -> list[Path]:
    """Every file save_pretrained copies for some registered class: the file defining the class and, recursively,
    the files it imports with relative imports (transformers' own get_relative_import_files)."""
    files = set()
    for name in modeling_deberta_custom.__all__ + ["DebertaCustomForRTDPreTraining"]:
        obj = getattr(modeling_deberta_custom, name, None)
        if inspect.isclass(obj) and (getattr(obj, "_auto_class", None) or name == "DebertaCustomConfig"):
            source = Path(inspect.getfile(obj))
            files.add(source)
            files.update(Path(f) for f in get_relative_import_files(str(source)))
    return sorted(files)


def transformers_requirements() -> set[str]:
    """Import names of transformers' unconditional requirements (safetensors, huggingface_hub, ...)."""
    from importlib.metadata import packages_distributions

    names = set()
    for requirement in requires("transformers") or []:
        if "extra ==" in requirement:
            continue
        names.add(requirement.split(";")[0].split("<")[0].split(">")[0].split("=")[0].split("!")[0].strip().lower())
    dist_to_modules = {}
    for module, dists in packages_distributions().items():
        for dist in dists:
            dist_to_modules.setdefault(dist.lower().replace("_", "-"), set()).add(module)
    return {m for name in names for m in dist_to_modules.get(name.replace("_", "-"), ())}


def imports_of(path: Path):
    """(absolute top-level module names, relative module names) imported anywhere in the file, and the absolute
    imports made at module level (outside functions)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    absolute, relative, module_level = set(), set(), set()
    function_nodes = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                      for n in ast.walk(f)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                relative.add(node.module or "")
                continue
            names = {node.module.split(".")[0]}
        else:
            continue
        absolute |= names
        if id(node) not in function_nodes:
            module_level |= names
    return absolute, relative, module_level


def test_remote_code_files_import_only_torch_transformers_and_each_other():
    files = remote_code_files()
    names = {f.name for f in files}
    assert {"configuration_deberta_custom.py", "modeling_deberta_custom.py"} <= names
    # training and export code never travels with the weights
    assert not names & {"export.py", "sift.py", "pretraining.py", "glue.py", "__init__.py"}, names
    stdlib = set(sys.stdlib_module_names)
    through_transformers = transformers_requirements()
    for path in files:
        absolute, relative, module_level = imports_of(path)
        for module in relative:
            assert (path.parent / f"{module}.py") in files, f"{path.name} imports .{module}, which is not copied"
        assert module_level <= stdlib | {"torch", "transformers"}, (path.name, module_level - stdlib)
        # Imports inside functions (only run when called) may also use what transformers itself requires.
        extra = absolute - stdlib - {"torch", "transformers"}
        assert extra <= through_transformers, (path.name, extra)


def test_a_saved_folder_holds_exactly_those_files(tmp_path):
    model = DebertaCustomForMaskedLM(tiny_config())
    model.save_pretrained(tmp_path)
    copied = {p.name for p in tmp_path.glob("*.py")}
    assert copied and copied <= {f.name for f in remote_code_files()}


@contextlib.contextmanager
def no_io_allowed(attempts: list):
    """Every file open, directory listing and socket connection fails (and is recorded) inside the block."""

    def refuse(name):
        def refused(*args, **kwargs):
            attempts.append((name, args[:1]))
            raise PermissionError(f"I/O at import time: {name}{args[:1]}")
        return refused

    patches = [(builtins, "open"), (io, "open"), (os, "open"), (os, "listdir"), (os, "scandir"),
               (socket.socket, "connect"), (socket, "create_connection")]
    saved = [(owner, attr, getattr(owner, attr)) for owner, attr in patches]
    for owner, attr in patches:
        setattr(owner, attr, refuse(f"{getattr(owner, '__name__', owner)}.{attr}"))
    try:
        yield
    finally:
        for owner, attr, original in saved:
            setattr(owner, attr, original)


def test_remote_code_does_no_io_and_prints_nothing_at_import(tmp_path):
    """The copied files are imported as a fresh package (as transformers' dynamic modules are), with file and
    socket access refused, stdout/stderr captured and every log record and warning collected."""
    package = f"remote_code_{uuid.uuid4().hex[:8]}"
    (tmp_path / package).mkdir()
    (tmp_path / package / "__init__.py").write_text("")
    files = remote_code_files()
    for path in files:
        shutil.copy(path, tmp_path / package / path.name)

    records = []

    class Collect(logging.Handler):
        def emit(self, record):
            records.append(record)

    handler = Collect(level=logging.DEBUG)
    loggers = [logging.getLogger(), logging.getLogger("transformers"), logging.getLogger(package)]
    levels = [lg.level for lg in loggers]
    attempts, stdout, stderr = [], io.StringIO(), io.StringIO()
    sys.path.insert(0, str(tmp_path))
    dont_write_bytecode, sys.dont_write_bytecode = sys.dont_write_bytecode, True
    try:
        importlib.import_module(package)  # the empty __init__, before I/O is refused
        for lg in loggers:
            lg.addHandler(handler)
            lg.setLevel(logging.DEBUG)
        with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(stdout), \
                contextlib.redirect_stderr(stderr), no_io_allowed(attempts):
            warnings.simplefilter("always")
            modules = [importlib.import_module(f"{package}.{path.stem}") for path in files]
    finally:
        sys.dont_write_bytecode = dont_write_bytecode
        sys.path.remove(str(tmp_path))
        for lg, level in zip(loggers, levels, strict=True):
            lg.removeHandler(handler)
            lg.setLevel(level)
        for name in [m for m in sys.modules if m == package or m.startswith(package + ".")]:
            del sys.modules[name]
    assert attempts == []
    assert stdout.getvalue() == "" and stderr.getvalue() == ""
    assert [r.getMessage() for r in records] == []
    assert [str(w.message) for w in caught] == []
    # the fresh copies really ran (not the installed package from sys.modules)
    assert all(m.__file__.startswith(str(tmp_path)) for m in modules)
    config_module = next(m for m in modules if m.__name__.endswith("configuration_deberta_custom"))
    assert config_module.DebertaCustomConfig is not modeling_deberta_custom.DebertaCustomConfig
