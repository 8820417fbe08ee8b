"""Shared helpers for the test suite: tiny configs, official-layout folders written by transformers, and paths."""

import json
import os
from pathlib import Path

import pytest
import torch

import modeling_deberta_custom  # noqa: F401  (registers the Auto classes)
from modeling_deberta_custom import DebertaCustomConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("DEBERTA_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))

requires_shared_data = pytest.mark.skipif(
    not SHARED_DATA.is_dir(), reason=f"../shared/data not found at {SHARED_DATA} (set DEBERTA_SHARED_DATA)"
)

# transformers 4.57 beside the main environment (the README set-up command installs it): the oldest version we support.
TRANSFORMERS_457 = Path(os.environ.get("DEBERTA_TRANSFORMERS_457", REPO_ROOT / ".venv" / "transformers-4.57"))
SETUP_457 = '.venv/bin/pip install --target .venv/transformers-4.57 "transformers==4.57.6"'

_TOKENIZE_457 = """
import json, sys
import transformers
from transformers import AutoTokenizer
assert transformers.__version__.startswith("4.57."), transformers.__version__
text, folders = sys.argv[1], sys.argv[2:]
print(json.dumps({folder: AutoTokenizer.from_pretrained(folder)(text)["input_ids"] for folder in folders}))
"""


def tokenize_under_transformers_457(folders, text: str) -> dict:
    """{folder: input ids of `text`} from `AutoTokenizer.from_pretrained(folder)` under transformers 4.57, in a
    subprocess (skips the test when 4.57 is not installed)."""
    import subprocess
    import sys

    if not (TRANSFORMERS_457 / "transformers").is_dir():
        pytest.skip(f"transformers 4.57 not found at {TRANSFORMERS_457}; set it up with: {SETUP_457}")
    env = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "TRANSFORMERS_", "PYTHON"))}
    env.update(PYTHONPATH=str(TRANSFORMERS_457.resolve()), HF_HUB_OFFLINE="1", PYTHONNOUSERSITE="1")
    result = subprocess.run([sys.executable, "-c", _TOKENIZE_457, text, *map(str, folders)], env=env,
                            capture_output=True, text=True, timeout=300, cwd=REPO_ROOT.parent)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])

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


# The test models are tiny: one thread avoids thread start-up and contention costs that dominate at this size.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
