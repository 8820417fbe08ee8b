"""scripts/train_tokenizer.py: a Unigram tokenizer with DeBERTa's special tokens and templates, loadable with
AutoTokenizer (under transformers 5 and, where the CI installs it, transformers 4.57)."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
from helpers import CHILD_SCRIPTS, REPO_ROOT, TRANSFORMERS_457, skip_without_transformers_457
from transformers import AutoTokenizer

spec = importlib.util.spec_from_file_location("train_tokenizer", REPO_ROOT / "scripts" / "train_tokenizer.py")
train_tokenizer = importlib.util.module_from_spec(spec)
spec.loader.exec_module(train_tokenizer)

WORDS = ("the cat sat on the mat while a dog ran in the park and the bird sang a song about the sun "
         "every morning people walk to work some ride bikes others take the train").split()


def corpus(path, lines=300):
    text = [" ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(4 + i % 9)) for i in range(lines)]
    path.write_text("\n".join(text) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokenizer")
    source = corpus(folder / "corpus.txt")
    train_tokenizer.main(["--files", str(source), "--vocab_size", "120", "--output_dir", str(folder / "out")])
    return folder / "out"


def test_special_tokens_and_templates(trained):
    tokenizer = AutoTokenizer.from_pretrained(trained)
    assert 5 < len(tokenizer) <= 120  # the Unigram trainer stops early on a corpus this small
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in train_tokenizer.SPECIAL_TOKENS}
    assert ids == {"[PAD]": 0, "[CLS]": 1, "[SEP]": 2, "[UNK]": 3, "[MASK]": 4}
    assert (tokenizer.pad_token_id, tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.unk_token_id,
            tokenizer.mask_token_id) == (0, 1, 2, 3, 4)

    single = tokenizer("the cat sat")
    assert single["input_ids"][0] == 1 and single["input_ids"][-1] == 2
    assert set(single["token_type_ids"]) == {0}

    pair = tokenizer("the cat sat", "a dog ran")
    first_sep = pair["input_ids"].index(2)
    assert pair["input_ids"][-1] == 2 and first_sep < len(pair["input_ids"]) - 1
    assert pair["token_type_ids"] == [0] * (first_sep + 1) + [1] * (len(pair["input_ids"]) - first_sep - 1)
    assert tokenizer.decode(pair["input_ids"], skip_special_tokens=True).split() == "the cat sat a dog ran".split()

    padded = tokenizer(["the cat", "the cat sat on the mat"], padding=True)
    assert padded["input_ids"][0][-1] == 0 and padded["attention_mask"][0][-1] == 0  # [PAD] = 0, right side


def test_mask_swallows_the_space_before_it(trained):
    tokenizer = AutoTokenizer.from_pretrained(trained)
    with_mask = tokenizer("the [MASK] sat")["input_ids"]
    without = tokenizer("the sat")["input_ids"]
    assert with_mask.count(4) == 1
    position = with_mask.index(4)
    assert with_mask[:position] + with_mask[position + 1:] == without


def test_unknown_characters_map_to_unk(trained):
    tokenizer = AutoTokenizer.from_pretrained(trained)
    assert 3 in tokenizer("the 🦜 sat")["input_ids"]


def test_config_names_a_class_both_transformers_generations_load(trained):
    config = json.loads((trained / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert config["model_max_length"] == 512


def test_loads_under_transformers_4(trained):
    skip_without_transformers_457()
    environment = dict(os.environ, PYTHONPATH=str(TRANSFORMERS_457))
    result = subprocess.run([sys.executable, str(CHILD_SCRIPTS / "check_tokenizer_457.py"), str(trained)],
                            capture_output=True, text=True, env=environment, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


def test_tsv_column_and_lowercase(tmp_path):
    tsv = tmp_path / "train.tsv"
    rows = [f"{' '.join(WORDS[i % 20:(i % 20) + 5]).title()} \"quoted\tx{i}" for i in range(200)]
    tsv.write_text("sentence\tlabel\n" + "\n".join(rows) + "\n", encoding="utf-8")
    lines = list(train_tokenizer.iter_lines([str(tsv)], tsv_column="sentence"))
    assert len(lines) == 200 and lines[0].startswith("The Cat") and lines[0].endswith('"quoted')
    train_tokenizer.main(["--files", str(tsv), "--tsv_column", "sentence", "--vocab_size", "80", "--lowercase",
                          "--output_dir", str(tmp_path / "out")])
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tokenizer("The CAT")["input_ids"] == tokenizer("the cat")["input_ids"]
    with pytest.raises(ValueError, match="no column"):
        list(train_tokenizer.iter_lines([str(tsv)], tsv_column="text"))


def test_bundled_tokenizer_loads():
    folder = REPO_ROOT / "data" / "tokenizer"
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert len(tokenizer) == 4000 and tokenizer.pad_token_id == 0 and tokenizer.mask_token_id == 4
    assert (folder / "SOURCE.txt").is_file()
    assert tokenizer("It's a CHARMING film.")["input_ids"] == tokenizer("it's a charming film.")["input_ids"]
