"""The official DeBERTa-v3 SentencePiece model (../shared/data/tokenizers/deberta-v3/spm.model) through transformers.

expected_ids_fixtures/ hold the ids that the reference (Hugging Face) tokenizers of microsoft/deberta-v3-{base,large,
small} produce for 37 strings, plus pair / batch encodings (whose inputs the fixtures do not store; they are
reconstructed here from the fixture tokens: "a a" is [266, 266], "b" is 2165).

Two routes:
  * the Hub layout (spm.model + config.json with model_type deberta-v2) through AutoTokenizer: transformers' own
    DeBERTa-v2 conversion. It gets ordinary text and the special tokens right, but transformers 5.x drops
    SentencePiece's NFKC normaliser and byte fallback (10 of the 37 fixture strings -- '…', emoji, '₣', a literal
    '▁', CJK with byte-fallback pieces -- come out differently) and 4.57's fast converter drops the byte fallback
    (it warns so): marked xfail below, not hidden.
  * `write_spm_tokenizer_folder` (modeling_deberta_custom.training.tokenization): a tokenizer.json converted with the
    normaliser and byte fallback kept, loaded by AutoTokenizer; it reproduces every fixture and sentencepiece itself.
"""

import json
import shutil

import pytest
from helpers import SHARED_DATA, requires_shared_data

pytestmark = requires_shared_data

SPM_DIR = SHARED_DATA / "tokenizers" / "deberta-v3"
FIXTURE_MODELS = ("deberta-v3-base", "deberta-v3-large", "deberta-v3-small")
# The special-token fixture is tokenized by HF (specials split out first), not by raw SentencePiece.
SPECIAL_TEXT = "<s></s><unk><pad>[CLS][SEP][UNK][PAD][MASK]"


def fixtures(model="deberta-v3-base"):
    return json.loads((SPM_DIR / "expected_ids_fixtures" / f"models--microsoft--{model}.json").read_text())


@pytest.fixture(scope="module")
def converted_folder(tmp_path_factory):
    from modeling_deberta_custom.training.tokenization import write_spm_tokenizer_folder

    folder = tmp_path_factory.mktemp("deberta-v3-tokenizer")
    write_spm_tokenizer_folder(SPM_DIR / "spm.model", folder)
    return folder


@pytest.fixture(scope="module")
def converted(converted_folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(converted_folder)


@pytest.fixture(scope="module")
def hub_layout(tmp_path_factory):
    """spm.model + tokenizer_config.json (microsoft/deberta-v3-base's, 52 bytes) + config.json (model_type
    deberta-v2), as the Hub repos hold them; AutoTokenizer converts spm.model itself."""
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("deberta-v3-hub-layout")
    shutil.copyfile(SPM_DIR / "spm.model", folder / "spm.model")
    (folder / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": False, "vocab_type": "spm"}))
    (folder / "config.json").write_text(json.dumps({"model_type": "deberta-v2", "vocab_size": 128100}))
    return AutoTokenizer.from_pretrained(folder)


def check_special_tokens(tokenizer):
    assert len(tokenizer) == 128001
    assert tokenizer.mask_token == "[MASK]" and tokenizer.mask_token_id == 128000
    assert [tokenizer.pad_token_id, tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.unk_token_id] == [0, 1, 2, 3]
    assert tokenizer("hello [MASK] world")["input_ids"] == [1, 12018, 128000, 447, 2]


@pytest.mark.parametrize("model", FIXTURE_MODELS)
def test_converted_spm_reproduces_every_fixture(converted, model):
    data = fixtures(model)
    assert data["special_tokens"] == {"[CLS]": 1, "[SEP]": 2, "[UNK]": 3, "[PAD]": 0, "[MASK]": 128000}
    for case in data["datasets"]:
        ids = converted(case["input"])["input_ids"]
        assert ids == case["ids"], case["input"]
        assert converted.convert_ids_to_tokens(ids)[1:-1] == case["tokens"], case["input"]
        assert converted.decode(ids, skip_special_tokens=True) == case["decoded"], case["input"]
    assert dict(converted("a a", "b b b b")) == data["pair_encode"]
    assert dict(converted(["a a", "b b b b b b b b"], padding=True)) == data["batch_encode"]
    assert dict(converted(["a a", "a a"], ["b", "b b b b b"], padding=True)) == data["batch_pair_encode"]


def test_converted_spm_has_deberta_special_tokens(converted):
    check_special_tokens(converted)


def test_converted_spm_matches_sentencepiece_on_corpus_text(converted):
    import sentencepiece

    processor = sentencepiece.SentencePieceProcessor(model_file=str(SPM_DIR / "spm.model"))
    corpus = SHARED_DATA / "corpus"
    lines = []
    for path in (corpus / "wikitext-2-raw-test" / "wiki.test.raw", corpus / "tinyshakespeare" / "input.txt"):
        with open(path, encoding="utf-8") as handle:
            lines += [line for _, line in zip(range(400), handle, strict=False)]
    ours = converted(lines, add_special_tokens=False)["input_ids"]
    assert ours == processor.encode(lines)


def test_converted_folder_loads_without_the_package_helpers(converted_folder):
    """The folder is self-describing: tokenizer.json + a tokenizer_config naming a class transformers 4 and 5 have."""
    config = json.loads((converted_folder / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast" and config["mask_token"] == "[MASK]"
    assert (converted_folder / "tokenizer.json").exists() and (converted_folder / "spm.model").exists()


def test_hub_layout_through_auto_tokenizer(hub_layout):
    check_special_tokens(hub_layout)
    data = fixtures()
    assert dict(hub_layout("a a", "b b b b")) == data["pair_encode"]
    plain = [case for case in data["datasets"] if case["input"].isascii() and "\u2581" not in case["input"]]
    assert len(plain) >= 25
    for case in plain:
        assert hub_layout(case["input"])["input_ids"] == case["ids"], case["input"]


@pytest.mark.xfail(reason="transformers' DeBERTa-v2 conversion drops spm's byte fallback (and in 5.x its NFKC map)",
                   strict=False)
def test_hub_layout_reproduces_every_fixture(hub_layout):
    mismatched = [case["input"] for case in fixtures()["datasets"]
                  if hub_layout(case["input"])["input_ids"] != case["ids"]]
    assert mismatched == []


def test_pretraining_loader_accepts_the_spm_file_and_its_folder(tmp_path):
    from modeling_deberta_custom.training.tokenization import load_pretraining_tokenizer

    shutil.copyfile(SPM_DIR / "spm.model", tmp_path / "spm.model")
    for source in (SPM_DIR / "spm.model", tmp_path):
        tokenizer = load_pretraining_tokenizer(source)
        assert tokenizer("you…  🦙")["input_ids"] == [1, 274, 260, 260, 260, 507, 244, 163, 170, 157, 2]
        assert tokenizer.mask_token_id == 128000
