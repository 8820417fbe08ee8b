"""GLUE: TSV reading, label ids per task, the local metric module, scripts/run_glue.py end to end (tiny model, a
handful of examples), the model card and the Hub push (network mocked)."""

import importlib.util
import json
import subprocess
import sys

import evaluate
import numpy as np
import pytest
from helpers import REPO_ROOT, SHARED_DATA, TINY_OFFICIAL_V2, requires_shared_data, tokenize_under_transformers_457
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import f1_score, matthews_corrcoef
from transformers import AutoTokenizer

from modeling_deberta_custom import DebertaCustomForSequenceClassification
from modeling_deberta_custom.training.glue import TASKS, get_task, load_glue, read_split, read_tsv

spec = importlib.util.spec_from_file_location("run_glue", REPO_ROOT / "scripts" / "run_glue.py")
run_glue = importlib.util.module_from_spec(spec)
sys.modules["run_glue"] = run_glue  # its dataclasses look their module up
spec.loader.exec_module(run_glue)

METRIC = str(REPO_ROOT / "metrics" / "glue_metric")
HUB_LABEL_NAMES = {  # nyu-mll/glue's ClassLabel names, in id order
    "cola": ["unacceptable", "acceptable"], "sst2": ["negative", "positive"],
    "mrpc": ["not_equivalent", "equivalent"], "qqp": ["not_duplicate", "duplicate"],
    "mnli": ["entailment", "neutral", "contradiction"], "qnli": ["entailment", "not_entailment"],
    "rte": ["entailment", "not_entailment"], "wnli": ["not_entailment", "entailment"],
}


def write(path, lines, bom=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(("\ufeff" if bom else "") + "\n".join(lines) + "\n", encoding="utf-8")


# ----------------------------------------------------------------------------------------------------------------------
# Reading the original TSV files
# ----------------------------------------------------------------------------------------------------------------------


def test_read_tsv_disables_quoting(tmp_path):
    path = tmp_path / "dev.tsv"
    write(path, ["sentence\tlabel", '"a stray quote opens here\t1', "and this is the next row\t0",
                 'a "quoted" word and a lone " quote\t1'])
    rows = read_tsv(path)
    assert len(rows) == 4  # a quoting CSV reader would glue rows 2 and 3 into one field
    assert rows[1] == ['"a stray quote opens here', "1"]
    assert rows[3][0] == 'a "quoted" word and a lone " quote'


MINI_GLUE = {
    "CoLA/train.tsv": ["gj04\t1\t\tOur friends won't buy this.", "gj04\t0\t*\tHim left \"quickly."],
    "CoLA/test.tsv": ["index\tsentence", "0\tBill whistled."],
    "SST-2/dev.tsv": ["sentence\tlabel", "it 's charming . \t1", "\" dull \t0"],
    "MRPC/dev.tsv": ["Quality\t#1 ID\t#2 ID\t#1 String\t#2 String", '1\t1\t2\t"He said" it.\tHe said "it".',
                     "0\t3\t4\tA cat.\tA dog."],
    "QQP/dev.tsv": ["id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate", "0\t1\t2\tWhy?\tWhy not?\t0",
                    "1\t3\t4\tHow?\tHow so?\t1", "2\t5\t6\ttoo few fields"],
    "STS-B/dev.tsv": ["index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore",
                      "0\tmain\tMSRvid\t2012\t0001\tnone\tnone\tA plane.\tAn air plane.\t4.250"],
    "MNLI/dev_matched.tsv": ["index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\t"
                             "sentence1_parse\tsentence2_parse\tsentence1\tsentence2\tlabel1\tgold_label",
                             "0\t1\t1e\tfiction\t(\t(\t(\t(\tP one.\tH one.\tneutral\tneutral",
                             "1\t2\t2e\tfiction\t(\t(\t(\t(\tP two.\tH two.\tcontradiction\tcontradiction",
                             "2\t3\t3e\tfiction\t(\t(\t(\t(\tP three.\tH three.\tentailment\tentailment"],
    "QNLI/dev.tsv": ["index\tquestion\tsentence\tlabel", "0\tWho?\tHe did.\tentailment",
                     "1\tWhen?\tBlue.\tnot_entailment"],
    "RTE/dev.tsv": ["index\tsentence1\tsentence2\tlabel", "0\tA.\tB.\tnot_entailment", "1\tC.\tC.\tentailment"],
    "WNLI/dev.tsv": ["index\tsentence1\tsentence2\tlabel", "0\tIt rained.\tIt was wet.\t1", "1\tX.\tY.\t0"],
}


@pytest.fixture(scope="module")
def mini_glue(tmp_path_factory):
    root = tmp_path_factory.mktemp("glue")
    for name, lines in MINI_GLUE.items():
        write(root / name, lines, bom=name.startswith("MRPC"))
    return root


def test_every_task_has_the_hub_schema(mini_glue):
    for name, task in TASKS.items():
        dataset = load_glue(name, mini_glue)
        split = dataset[task.validation_splits[0] if name != "cola" else "train"]
        assert split.column_names == [*task.text_columns, "label", "idx"]
        if name == "stsb":
            assert split.features["label"].dtype == "float32"
        else:
            assert split.features["label"].names == HUB_LABEL_NAMES[name]


@pytest.mark.parametrize("name, split, labels", [
    ("cola", "train", [1, 0]), ("sst2", "validation", [1, 0]), ("mrpc", "validation", [1, 0]),
    ("qqp", "validation", [0, 1]), ("stsb", "validation", [4.25]),
    ("mnli", "validation_matched", [1, 2, 0]), ("qnli", "validation", [0, 1]), ("rte", "validation", [1, 0]),
    ("wnli", "validation", [1, 0]),
])
def test_label_ids_per_task(mini_glue, name, split, labels):
    assert load_glue(name, mini_glue)[split]["label"] == labels


def test_text_with_quotes_and_headerless_cola(mini_glue):
    cola = load_glue("cola", mini_glue)
    assert cola["train"]["sentence"] == ["Our friends won't buy this.", 'Him left "quickly.']
    assert cola["test"][0] == {"sentence": "Bill whistled.", "label": -1, "idx": 0}
    mrpc = load_glue("mrpc", mini_glue / "MRPC")  # the task folder itself works too
    assert mrpc["validation"][0]["sentence1"] == '"He said" it.'  # BOM-prefixed header read, quotes kept
    assert load_glue("sst2", mini_glue)["validation"]["sentence"][1] == '" dull '


def test_malformed_rows_are_skipped(mini_glue):
    columns = read_split(get_task("qqp"), mini_glue / "QQP" / "dev.tsv")
    assert columns["question1"] == ["Why?", "How?"]


def test_missing_task_and_bad_labels(mini_glue, tmp_path):
    with pytest.raises(FileNotFoundError, match="QNLI"):
        load_glue("qnli", tmp_path)
    write(tmp_path / "RTE" / "dev.tsv", ["index\tsentence1\tsentence2\tlabel", "0\tA.\tB.\tmaybe"])
    with pytest.raises(ValueError, match="unknown label 'maybe'"):
        load_glue("rte", tmp_path)
    with pytest.raises(ValueError, match="Unknown GLUE task"):
        get_task("squad")
    assert get_task("SST-2").name == "sst2"


@requires_shared_data
def test_shared_glue_row_counts():
    expected = {"sst2": (67349, 872), "cola": (8551, 1043), "mrpc": (3668, 408), "rte": (2490, 277),
                "stsb": (5749, 1500), "wnli": (635, 71)}
    for name, (train, dev) in expected.items():
        dataset = load_glue(name, SHARED_DATA / "glue")
        assert (len(dataset["train"]), len(dataset["validation"])) == (train, dev), name


def test_bundled_demo_data():
    dataset = load_glue("sst2", REPO_ROOT / "data" / "glue")
    assert (len(dataset["train"]), len(dataset["validation"])) == (8000, 872)
    assert set(dataset["train"]["label"]) == {0, 1}
    assert (REPO_ROOT / "data" / "glue" / "SST-2" / "SOURCE.txt").is_file()
    size = sum(p.stat().st_size for p in (REPO_ROOT / "data").rglob("*") if p.is_file())
    assert size < 1_000_000


# ----------------------------------------------------------------------------------------------------------------------
# The metric module
# ----------------------------------------------------------------------------------------------------------------------


def test_metric_module_matches_sklearn_and_scipy():
    rng = np.random.default_rng(0)
    labels, predictions = rng.integers(0, 2, 50), rng.integers(0, 2, 50)
    accuracy = float((labels == predictions).mean())
    mrpc = evaluate.load(METRIC, "mrpc").compute(predictions=predictions, references=labels)
    assert mrpc == pytest.approx({"accuracy": accuracy, "f1": f1_score(labels, predictions)})
    cola = evaluate.load(METRIC, "cola").compute(predictions=predictions, references=labels)
    assert cola == pytest.approx({"matthews_correlation": matthews_corrcoef(labels, predictions)})
    for name in ("sst2", "rte", "qnli", "wnli", "mnli_matched", "mnli_mismatched"):
        assert evaluate.load(METRIC, name).compute(predictions=predictions, references=labels) == pytest.approx(
            {"accuracy": accuracy})
    gold, scores = rng.uniform(0, 5, 40), rng.uniform(0, 5, 40)
    stsb = evaluate.load(METRIC, "stsb").compute(predictions=scores, references=gold)
    assert stsb == pytest.approx({"pearson": pearsonr(scores, gold)[0], "spearmanr": spearmanr(scores, gold)[0]},
                                 rel=1e-5)  # the module stores float32
    # By hand: 3 of 4 right, one true positive, one false positive, one false negative.
    assert evaluate.load(METRIC, "qqp").compute(predictions=[1, 1, 0, 0], references=[1, 0, 1, 0]) == pytest.approx(
        {"accuracy": 0.5, "f1": 0.5})
    with pytest.raises(KeyError, match="Unknown GLUE task"):
        evaluate.load(METRIC, "squad")


# ----------------------------------------------------------------------------------------------------------------------
# scripts/run_glue.py
# ----------------------------------------------------------------------------------------------------------------------


def test_defaults_come_in_layers():
    _, data, _, _, training = run_glue.parse_arguments(["--task", "rte", "--model_name_or_path", "x"])
    assert (training.learning_rate, training.warmup_steps, data.max_seq_length) == (2e-5, 100, 320)  # rte.json
    assert training.adam_epsilon == 1e-6 and training.do_train and training.do_eval
    assert training.output_dir == "outputs/glue/rte"
    model, data, _, _, training = run_glue.parse_arguments(["--task_name", "rte", "--model_preset", "tiny"])
    assert training.learning_rate == 1e-3 and data.max_seq_length == 320  # from_scratch.json over rte.json
    assert model.cls_dropout == 0.1
    _, _, _, _, training = run_glue.parse_arguments(["--task", "rte", "--model_preset", "tiny", "--learning_rate", "5e-4"])
    assert training.learning_rate == 5e-4  # the command line wins
    model, data, sift, _, training = run_glue.parse_arguments(["--demo"])
    assert (data.task_name, model.model_preset, model.torch_num_threads) == ("sst2", "tiny", 1)
    assert data.data_dir == str(REPO_ROOT / "data" / "glue") and model.tokenizer == str(REPO_ROOT / "data" / "tokenizer")
    assert not sift.sift and run_glue.parse_arguments(["--demo", "--sift"])[2].sift
    model, _, _, _, _ = run_glue.parse_arguments(["--demo", "--model_name_or_path", "ckpt"])
    assert model.model_preset is None and model.tokenizer is None  # a given model brings its own tokenizer
    with pytest.raises(SystemExit):
        run_glue.parse_arguments(["--task", "rte"])  # no model
    with pytest.raises(SystemExit):
        run_glue.parse_arguments(["--model_preset", "tiny"])  # no task


def test_official_checkpoint_folder_loads_into_our_classes(tmp_path):
    official = transformers_official_folder(tmp_path)
    model_args = run_glue.ModelArguments(model_name_or_path=str(official), cls_dropout=0.2)
    tokenizer = run_glue.load_tokenizer(run_glue.ModelArguments(tokenizer=str(REPO_ROOT / "data" / "tokenizer")))
    model = run_glue.load_model(model_args, get_task("mnli"), tokenizer)
    assert isinstance(model, DebertaCustomForSequenceClassification)
    assert model.config.num_labels == 3 and model.config.id2label[2] == "contradiction"
    assert model.config.cls_dropout == 0.2


def transformers_official_folder(tmp_path):
    """A model_type deberta-v2 folder written by transformers' own DeBERTa-v2 (the official checkpoint layout)."""
    from transformers import DebertaV2Config, DebertaV2ForMaskedLM

    config = DebertaV2Config(**{k: v for k, v in TINY_OFFICIAL_V2.items() if k != "model_type"} | {"vocab_size": 4000})
    DebertaV2ForMaskedLM(config).save_pretrained(tmp_path / "official")
    return tmp_path / "official"


def test_run_glue_end_to_end_in_a_subprocess(mini_glue, tmp_path):
    glue = tmp_path / "glue"
    mrpc_rows = [f'1\t{i}\t{i + 1}\tThe "cat" sat number {i}.\tA cat sat, number {i}.' if i % 2 else
                 f"0\t{i}\t{i + 1}\tRain fell {i} times.\tThe sun rose {i} times." for i in range(12)]
    header = "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String"
    write(glue / "MRPC" / "train.tsv", [header, *mrpc_rows], bom=True)
    write(glue / "MRPC" / "dev.tsv", [header, *mrpc_rows[:6]], bom=True)
    write(glue / "MRPC" / "test.tsv", ["index\t#1 ID\t#2 ID\t#1 String\t#2 String", "0\t1\t2\tA.\tB.", "1\t3\t4\tC.\tD."])
    output = tmp_path / "out"
    command = [sys.executable, str(REPO_ROOT / "scripts" / "run_glue.py"), "--task", "mrpc", "--data_dir", str(glue),
               "--model_preset", "tiny", "--config_overrides", "num_hidden_layers=1", "--max_steps", "3",
               "--per_device_train_batch_size", "4", "--output_dir", str(output), "--sift", "--sift_lambda", "3",
               "--do_predict", "--use_cpu", "True", "--disable_tqdm", "True", "--torch_num_threads", "1"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "mrpc (12 training examples, SiFT): validation f1 = " in result.stdout

    results = json.loads((output / "results.json").read_text())
    assert results["task"] == "mrpc" and results["num_train_examples"] == 12
    assert results["sift"]["sift_lambda"] == 3.0 and results["model_source"] == "preset"
    metrics = results["eval"]["validation"]
    assert {"eval_f1", "eval_accuracy", "eval_samples"} <= set(metrics) and metrics["eval_samples"] == 6
    assert results["train"]["train_samples"] == 12 and "--sift" in results["command"]
    history = json.loads((output / "trainer_state.json").read_text())["log_history"]
    assert any("train_sift_loss" in entry for entry in history)
    predictions = (output / "predict_results_mrpc_test.tsv").read_text().splitlines()
    assert predictions[0] == "index\tprediction" and len(predictions) == 3
    assert predictions[1].split("\t")[1] in ("equivalent", "not_equivalent")
    # A Hub-ready folder: weights, config with auto_map, code files, tokenizer, model card.
    for name in ("model.safetensors", "config.json", "modeling_deberta_custom.py", "tokenizer.json", "README.md"):
        assert (output / name).is_file(), name
    config = json.loads((output / "config.json").read_text())
    assert config["num_hidden_layers"] == 1 and config["vocab_size"] == 4000 and config["id2label"]["1"] == "equivalent"
    # The tokenizers saved beside the model (the pushed folder, any checkpoint) load under transformers 4.57 too, with
    # the ids that transformers 5 gives (transformers 5 names its TokenizersBackend class, which 4.57 lacks).
    folders = [output, *sorted(output.glob("checkpoint-*"))]
    text = 'The "cat" sat, number 7.'
    expected = AutoTokenizer.from_pretrained(output)(text)["input_ids"]
    assert tokenize_under_transformers_457(folders, text) == {str(folder): expected for folder in folders}


class FakeHfApi:
    calls = []

    def __init__(self, token=None):
        self.token = token

    def create_repo(self, repo_id, private=None, exist_ok=False):
        FakeHfApi.calls.append(("create_repo", repo_id, private, exist_ok))
        return type("RepoUrl", (), {"repo_id": repo_id})()

    def upload_folder(self, repo_id, folder_path, **kwargs):
        from pathlib import Path

        FakeHfApi.calls.append(("upload_folder", repo_id, sorted(p.name for p in Path(folder_path).iterdir()), kwargs))


def test_push_to_hub_writes_a_model_card_and_uploads(tmp_path, monkeypatch):
    import huggingface_hub

    glue = tmp_path / "glue"
    header = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore"
    rows = [f"{i}\tmain\tMSRvid\t2012\t{i}\tnone\tnone\tA man plays {i}.\tA man is playing {i}.\t{i % 5}.0"
            for i in range(10)]
    write(glue / "STS-B" / "train.tsv", [header, *rows])
    write(glue / "STS-B" / "dev.tsv", [header, *rows[:6]])
    FakeHfApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    output = tmp_path / "stsb"
    arguments = ["--task", "stsb", "--data_dir", str(glue), "--model_preset", "tiny", "--config_overrides",
                 "num_hidden_layers=1", "--max_steps", "2", "--output_dir", str(output), "--use_cpu", "True",
                 "--disable_tqdm", "True", "--push_to_hub", "--hub_model_id", "someone/deberta-tiny-stsb",
                 "--hub_private_repo", "True"]
    results = run_glue.main(arguments)
    assert FakeHfApi.calls[0] == ("create_repo", "someone/deberta-tiny-stsb", True, True)
    _, repo_id, files, options = FakeHfApi.calls[1]
    assert repo_id == "someone/deberta-tiny-stsb"
    assert {"README.md", "config.json", "model.safetensors", "results.json", "tokenizer.json"} <= set(files)
    assert "checkpoint-*" in options["ignore_patterns"]

    card = (output / "README.md").read_text()
    metadata = huggingface_hub.ModelCard(card).data
    assert metadata.library_name == "transformers" and "glue" in metadata.tags and "sift" not in metadata.tags
    assert metadata.datasets == ["nyu-mll/glue"]
    pearson = results["eval"]["validation"]["eval_pearson"]
    [entry] = metadata.to_dict()["model-index"]
    values = {m["type"]: m["value"] for m in entry["results"][0]["metrics"]}
    assert values["pearson"] == pytest.approx(round(pearson, 4))
    assert "spearmanr" in values and entry["results"][0]["dataset"]["config"] == "stsb"
    assert "# someone/deberta-tiny-stsb" in card and "trained from scratch (size preset `tiny`" in card
    assert "trust_remote_code=True" in card and "| validation | pearson |" in card
    assert "scripts/run_glue.py --task stsb" in card and "Trained without SiFT." in card

    # The pushed folder is a checkpoint of ours: evaluating it gives the same numbers.
    again = run_glue.main(["--task", "stsb", "--data_dir", str(glue), "--model_name_or_path", str(output),
                           "--do_train", "False", "--output_dir", str(tmp_path / "reeval"), "--use_cpu", "True",
                           "--disable_tqdm", "True"])
    # (1e-4: the weights are equal, but matmuls on reloaded, differently aligned tensors may differ in the last bit,
    # and the Pearson correlation of six nearly equal predictions of a 2-step model magnifies that to ~1e-5.)
    assert again["eval"]["validation"]["eval_pearson"] == pytest.approx(pearson, abs=1e-4)
