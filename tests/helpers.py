"""What the tests share: paths, tiny configs and batches, the toy task, script loading and resuming, runs in child
processes (transformers 4.57, no package), and the code blocks of the docs. Tests import from here, never from
conftest.py or from each other."""

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import Trainer, TrainerCallback

import modeling_deberta_custom  # noqa: F401  (registers the Auto classes)
from modeling_deberta_custom import DebertaCustomConfig, DebertaCustomForSequenceClassification

TESTS = Path(__file__).resolve().parent
REPO_ROOT = TESTS.parent
CHILD_SCRIPTS = TESTS / "child_scripts"
SHARED_DATA = Path(os.environ.get("DEBERTA_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))

requires_shared_data = pytest.mark.skipif(
    not SHARED_DATA.is_dir(), reason=f"../shared/data not found at {SHARED_DATA} (set DEBERTA_SHARED_DATA)"
)

# ----------------------------------------------------------------------------------------------------------------------
# Tiny models and batches
# ----------------------------------------------------------------------------------------------------------------------

# A DeBERTa-v3-shaped model small enough for a unit test: buckets 8 so that 40 tokens already exceed the
# bucket range and 100 tokens exceed max_position_embeddings.
TINY_OFFICIAL_V2 = dict(
    model_type="deberta-v2",
    vocab_size=99,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=37,
    max_position_embeddings=64,
    relative_attention=True,
    position_buckets=8,
    norm_rel_ebd="layer_norm",
    share_att_key=True,
    pos_att_type="p2c|c2p",
    position_biased_input=False,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
    legacy=False,
)
DROPOUT = dict(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)


def tiny_config(**overrides) -> DebertaCustomConfig:
    """Our config with the tiny geometry (dropout off so outputs are deterministic)."""
    fields = {k: v for k, v in TINY_OFFICIAL_V2.items() if k not in ("model_type", "legacy")}
    fields.update(overrides)
    return DebertaCustomConfig(**fields)


def perturb_parameters(model: torch.nn.Module, scale: float = 0.05, seed: int = 0) -> None:
    """Move every parameter away from its initial value (zero biases, unit LayerNorms) so that tests see them."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator).to(parameter.dtype) * scale)


def random_batch(vocab_size: int, batch: int = 3, length: int = 12, seed: int = 0, pad_row: int | None = 1):
    """Token ids in [1, vocab) with one row right-padded (id 0, mask 0) from half its length."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, vocab_size, (batch, length), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    if pad_row is not None and batch > pad_row:
        input_ids[pad_row, length // 2:] = 0
        attention_mask[pad_row, length // 2:] = 0
    return input_ids, attention_mask


def flatten_outputs(output) -> dict:
    """A model output as {name: tensor}; tuples (hidden states, attentions) become name.0, name.1, ..."""
    tensors = {}
    for key, value in output.items():
        if isinstance(value, torch.Tensor):
            tensors[key] = value
        elif isinstance(value, (tuple, list)):
            tensors.update({f"{key}.{i}": v for i, v in enumerate(value)})
    return tensors


# ----------------------------------------------------------------------------------------------------------------------
# The toy task of the Trainer tests (SiFT, distillation): a tiny model learns it in a few steps
# ----------------------------------------------------------------------------------------------------------------------

# Distillation's student and teacher geometries (the teacher wider and deeper, with other head counts).
STUDENT = dict(hidden_size=32, num_attention_heads=2, intermediate_size=37)
TEACHER = dict(hidden_size=64, num_attention_heads=4, intermediate_size=64, num_hidden_layers=3)


class FirstTokenTask(torch.utils.data.Dataset):
    """Label = whether the token after [CLS] is 5 (else 6); the rest is noise."""

    def __init__(self, size=64, length=8, seed=0):
        generator = torch.Generator().manual_seed(seed)
        self.input_ids = torch.randint(7, 30, (size, length), generator=generator)
        self.labels = torch.randint(0, 2, (size,), generator=generator)
        self.input_ids[:, 0] = 1
        self.input_ids[:, 1] = 5 + self.labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return dict(input_ids=self.input_ids[i], attention_mask=torch.ones_like(self.input_ids[i]),
                    labels=self.labels[i])


def first_token_classifier(seed=0, **overrides) -> DebertaCustomForSequenceClassification:
    """A two-label classifier over FirstTokenTask's 30-token vocabulary, seeded."""
    torch.manual_seed(seed)
    return DebertaCustomForSequenceClassification(tiny_config(num_labels=2, vocab_size=30, **overrides))


# ----------------------------------------------------------------------------------------------------------------------
# The user scripts, loaded in-process, and resuming them
# ----------------------------------------------------------------------------------------------------------------------

PRETRAIN = REPO_ROOT / "scripts" / "pretrain.py"
RUN_GLUE = REPO_ROOT / "scripts" / "run_glue.py"
TOTAL_STEPS, STOP_AT = 4, 2
# Arguments of the resume tests: a 4-step run that saves a checkpoint at step 2.
RESUME_ARGS = ["--max_steps", str(TOTAL_STEPS), "--save_strategy", "steps", "--save_steps", str(STOP_AT), "--seed",
               "0", "--use_cpu", "--report_to", "none", "--disable_tqdm", "true", "--dataloader_num_workers", "0",
               "--logging_steps", "1"]


def load_script(path: Path):
    """A script of scripts/ (or any file) as a module; remove it from sys.modules when done."""
    name = f"script_under_test_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and HfArgumentParser resolve annotations through sys.modules
    try:
        spec.loader.exec_module(module)
    except Exception:
        sys.modules.pop(name, None)
        raise
    return module


class StopAfterStep(TrainerCallback):
    """Ends training after `step` (the checkpoint of that step is written first): an interrupted run."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True
        return control


def interrupted_trainer(step):
    class InterruptedTrainer(Trainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.add_callback(StopAfterStep(step))

    return InterruptedTrainer


def run_three_ways(script, argv, output_root, monkeypatch):
    """Uninterrupted; interrupted after STOP_AT; resumed from that checkpoint. Returns the three final weight files'
    contents (uninterrupted, interrupted, resumed)."""
    straight, stopped = output_root / "straight", output_root / "stopped"
    script.main(argv + ["--output_dir", str(straight)])
    with monkeypatch.context() as patch:
        patch.setattr(script, "Trainer", interrupted_trainer(STOP_AT))
        script.main(argv + ["--output_dir", str(stopped)])
    interrupted = load_file(stopped / "model.safetensors")
    checkpoint = stopped / f"checkpoint-{STOP_AT}"
    assert checkpoint.is_dir() and not (stopped / f"checkpoint-{TOTAL_STEPS}").exists()
    script.main(argv + ["--output_dir", str(stopped), "--resume_from_checkpoint", str(checkpoint)])
    return load_file(straight / "model.safetensors"), interrupted, load_file(stopped / "model.safetensors")


def assert_resumed_exactly(straight, interrupted, resumed):
    assert straight.keys() == resumed.keys()
    differing = [k for k in straight if not torch.equal(straight[k], resumed[k])]
    assert not differing, f"{len(differing)} tensors differ after resuming, e.g. {differing[:3]}: " + ", ".join(
        f"{k} max |diff| {float((straight[k] - resumed[k]).abs().max()):.2e}" for k in differing[:3])
    # and the interruption mattered: the stopped run had not reached the final weights
    assert any(not torch.equal(straight[k], interrupted[k]) for k in straight)


# ----------------------------------------------------------------------------------------------------------------------
# Child processes: transformers 4.57, and a process that cannot import the package (trust_remote_code)
# ----------------------------------------------------------------------------------------------------------------------

# transformers 4.57 beside the main environment (the README set-up command installs it): the oldest version we support.
TRANSFORMERS_457 = Path(os.environ.get("DEBERTA_TRANSFORMERS_457", REPO_ROOT / ".venv" / "transformers-4.57"))
SETUP_457 = '.venv/bin/pip install --no-warn-conflicts --target .venv/transformers-4.57 "transformers==4.57.6"'


def skip_without_transformers_457():
    if not (TRANSFORMERS_457 / "transformers").is_dir():
        pytest.skip(f"transformers 4.57 not found at {TRANSFORMERS_457}; set it up with: {SETUP_457}")


def tokenize_under_transformers_457(folders, text: str) -> dict:
    """{folder: input ids of `text`} from `AutoTokenizer.from_pretrained(folder)` under transformers 4.57, in a
    subprocess (skips the test when 4.57 is not installed)."""
    skip_without_transformers_457()
    env = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "TRANSFORMERS_", "PYTHON"))}
    env.update(PYTHONPATH=str(TRANSFORMERS_457.resolve()), HF_HUB_OFFLINE="1", PYTHONNOUSERSITE="1")
    result = subprocess.run([sys.executable, str(CHILD_SCRIPTS / "tokenize_457.py"), text, *map(str, folders)],
                            env=env, capture_output=True, text=True, timeout=300, cwd=REPO_ROOT.parent)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def run_without_package(root: Path, cases: list, pythonpath: Path | None) -> dict:
    """child_scripts/load_remote_code.py in one fresh interpreter, outside the repository, that cannot import the
    package and has no network; `pythonpath` (the 4.57 side folder) goes first on its path. Returns its report."""
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
        [sys.executable, str(CHILD_SCRIPTS / "load_remote_code.py"), str(spec_file), str(report_file)],
        cwd=work, env=env, capture_output=True, text=True, timeout=300,
    )
    assert completed.returncode == 0 and report_file.is_file(), (
        f"subprocess failed (exit {completed.returncode}):\n{completed.stdout[-3000:]}\n{completed.stderr[-6000:]}"
    )
    return json.loads(report_file.read_text())


def child_environment(**extra) -> dict:
    """The environment of a child process that imports this checkout and the test helpers."""
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), str(TESTS)]), **extra)


# ----------------------------------------------------------------------------------------------------------------------
# Code blocks of README.md and docs/*.md
# ----------------------------------------------------------------------------------------------------------------------

DOCUMENTS = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"(?:<!-- (?P<marker>[^>]*?) -->\n)?```(?P<language>\w*)\n(?P<code>.*?)```", re.S)


def code_blocks(document: Path):
    """(language, code, marker) of every fenced block; marker is the HTML comment on the line right above the fence
    (`test: NAME`, `not run: REASON`) or None."""
    text = document.read_text(encoding="utf-8")
    return [(m["language"], m["code"], m["marker"]) for m in FENCE.finditer(text)]


def doc_block(name: str) -> str:
    """The code of the one block marked `<!-- test: NAME -->` in README.md or docs/*.md."""
    found = [code for document in DOCUMENTS for _, code, marker in code_blocks(document) if marker == f"test: {name}"]
    assert len(found) == 1, f"{len(found)} blocks marked 'test: {name}' in README.md and docs/"
    return found[0]
