"""GLUE for fine-tuning scripts: the task table, readers for the original GLUE TSV files, and preprocessing.

Training-only code (it needs `datasets`); the model files never import it. Local TSV folders and the Hub dataset
(`nyu-mll/glue`) come out with the same splits, column names and label ids, so the rest of a script does not care
which one it read:

    raw = load_glue("sst2", data_dir="../shared/data/glue")   # or data_dir=None for the Hub
    raw["train"][0]  ->  {"sentence": "hide new secretions ...", "label": 0, "idx": 0}

Label ids follow the Hub dataset (e.g. MNLI: 0 entailment, 1 neutral, 2 contradiction); STS-B labels are float
scores; test splits carry label -1.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

HUB_DATASET = "nyu-mll/glue"


@dataclass(frozen=True)
class GlueTask:
    name: str
    folder: str  # folder of the original GLUE distribution
    text_columns: tuple[str, ...]  # column names of the Hub dataset: one sentence or a pair
    label_names: tuple[str, ...] | None  # id -> name (the Hub dataset's order); None: regression
    tsv_columns: dict  # Hub column -> TSV header name
    metric_keys: tuple[str, ...]  # what the metric returns; the first is the task's main number
    validation_splits: tuple[str, ...] = ("validation",)
    # Raw TSV label -> id when the TSV writes names; None when it writes the id itself.
    tsv_label_ids: dict | None = None
    # Hub column -> column index, for files without a header (CoLA's train and dev files).
    headerless_columns: dict | None = None

    @property
    def is_regression(self) -> bool:
        return self.label_names is None

    @property
    def num_labels(self) -> int:
        return 1 if self.label_names is None else len(self.label_names)

    @property
    def main_metric(self) -> str:
        return self.metric_keys[0]

    def metric_config(self, split: str) -> str:
        """The `glue_metric` configuration for an evaluation split (MNLI: mnli_matched / mnli_mismatched)."""
        if self.name == "mnli" and split != "train":
            return "mnli_mismatched" if split.endswith("mismatched") else "mnli_matched"
        return self.name


_NLI = {"entailment": 0, "not_entailment": 1}

TASKS: dict[str, GlueTask] = {
    task.name: task
    for task in (
        GlueTask("cola", "CoLA", ("sentence",), ("unacceptable", "acceptable"),
                 {"sentence": "sentence", "label": "label"}, ("matthews_correlation",),
                 headerless_columns={"sentence": 3, "label": 1}),
        GlueTask("sst2", "SST-2", ("sentence",), ("negative", "positive"),
                 {"sentence": "sentence", "label": "label"}, ("accuracy",)),
        GlueTask("mrpc", "MRPC", ("sentence1", "sentence2"), ("not_equivalent", "equivalent"),
                 {"sentence1": "#1 String", "sentence2": "#2 String", "label": "Quality"}, ("f1", "accuracy")),
        GlueTask("qqp", "QQP", ("question1", "question2"), ("not_duplicate", "duplicate"),
                 {"question1": "question1", "question2": "question2", "label": "is_duplicate"}, ("f1", "accuracy")),
        GlueTask("stsb", "STS-B", ("sentence1", "sentence2"), None,
                 {"sentence1": "sentence1", "sentence2": "sentence2", "label": "score"}, ("pearson", "spearmanr")),
        GlueTask("mnli", "MNLI", ("premise", "hypothesis"), ("entailment", "neutral", "contradiction"),
                 {"premise": "sentence1", "hypothesis": "sentence2", "label": "gold_label"}, ("accuracy",),
                 validation_splits=("validation_matched", "validation_mismatched"),
                 tsv_label_ids={"entailment": 0, "neutral": 1, "contradiction": 2}),
        GlueTask("qnli", "QNLI", ("question", "sentence"), ("entailment", "not_entailment"),
                 {"question": "question", "sentence": "sentence", "label": "label"}, ("accuracy",),
                 tsv_label_ids=_NLI),
        GlueTask("rte", "RTE", ("sentence1", "sentence2"), ("entailment", "not_entailment"),
                 {"sentence1": "sentence1", "sentence2": "sentence2", "label": "label"}, ("accuracy",),
                 tsv_label_ids=_NLI),
        GlueTask("wnli", "WNLI", ("sentence1", "sentence2"), ("not_entailment", "entailment"),
                 {"sentence1": "sentence1", "sentence2": "sentence2", "label": "label"}, ("accuracy",)),
    )
}


def get_task(name: str) -> GlueTask:
    key = name.lower().replace("-", "")
    if key not in TASKS:
        raise ValueError(f"Unknown GLUE task {name!r}; pick one of {sorted(TASKS)}")
    return TASKS[key]


# ----------------------------------------------------------------------------------------------------------------------
# The original TSV files
# ----------------------------------------------------------------------------------------------------------------------


def read_tsv(path: str | Path) -> list[list[str]]:
    """Rows of a GLUE TSV file, the header included. Quoting is disabled: GLUE sentences contain unbalanced quote
    characters that a CSV reader would otherwise take as the start of a multi-line field. A leading byte-order mark
    (MRPC) is dropped."""
    with open(path, encoding="utf-8-sig", newline="") as handle:
        return [row for row in csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)]


def _split_files(task: GlueTask) -> dict[str, str]:
    """Hub split name -> TSV file name."""
    if task.name == "mnli":
        return {"train": "train.tsv", "validation_matched": "dev_matched.tsv",
                "validation_mismatched": "dev_mismatched.tsv", "test_matched": "test_matched.tsv",
                "test_mismatched": "test_mismatched.tsv"}
    return {"train": "train.tsv", "validation": "dev.tsv", "test": "test.tsv"}


def task_folder(task: GlueTask, data_dir: str | Path) -> Path:
    """`data_dir` may be the GLUE root (holding SST-2/, CoLA/, ...) or the task's folder itself."""
    data_dir = Path(data_dir)
    folder = data_dir / task.folder
    if folder.is_dir():
        return folder
    if any((data_dir / name).is_file() for name in _split_files(task).values()):
        return data_dir
    raise FileNotFoundError(f"No GLUE {task.folder} data in {data_dir}: expected {folder}/ with "
                            f"{', '.join(_split_files(task).values())}")


def parse_label(task: GlueTask, raw: str):
    """A TSV label as the Hub dataset stores it: class id (int) or STS-B score (float)."""
    raw = raw.strip()
    if task.is_regression:
        return float(raw)
    if task.tsv_label_ids is not None:
        if raw not in task.tsv_label_ids:
            raise ValueError(f"{task.name}: unknown label {raw!r}; expected one of {sorted(task.tsv_label_ids)}")
        return task.tsv_label_ids[raw]
    value = int(raw)
    if not 0 <= value < task.num_labels:
        raise ValueError(f"{task.name}: label {value} outside [0, {task.num_labels - 1}]")
    return value


def read_split(task: GlueTask, path: str | Path, labeled: bool = True) -> dict[str, list]:
    """One split as columns {text columns..., "label", "idx"}. Rows with too few fields (a handful in QQP and
    MNLI) are skipped and counted in the log. `labeled=False` (test files) gives label -1."""
    rows = read_tsv(path)
    wanted = [*task.text_columns, "label"] if labeled else list(task.text_columns)
    if task.headerless_columns is not None and not (rows and rows[0][:1] == ["index"]):
        index = {name: task.headerless_columns[name] for name in wanted}
    else:
        header, rows = (rows[0], rows[1:]) if rows else ([], [])
        positions = {name: i for i, name in enumerate(header)}
        missing = [task.tsv_columns[name] for name in wanted if task.tsv_columns[name] not in positions]
        if missing:
            raise ValueError(f"{path}: the header {header} lacks the columns {missing}")
        index = {name: positions[task.tsv_columns[name]] for name in wanted}
    out = {name: [] for name in (*task.text_columns, "label", "idx")}
    needed = max(index.values()) + 1
    skipped = 0
    for row in rows:
        if len(row) < needed:
            skipped += 1
            continue
        for name in task.text_columns:
            out[name].append(row[index[name]])
        out["label"].append(parse_label(task, row[index["label"]]) if labeled else (-1.0 if task.is_regression else -1))
        out["idx"].append(len(out["idx"]))
    if skipped:
        logger.warning("%s: skipped %d malformed rows (fewer than %d fields)", path, skipped, needed)
    return out


def load_glue_tsv(task: GlueTask | str, data_dir: str | Path):
    """A `datasets.DatasetDict` from the original GLUE TSV layout, with the Hub dataset's splits, columns, label
    ids and `ClassLabel` names. Missing split files (e.g. no MNLI train offline) are left out."""
    import datasets

    task = get_task(task) if isinstance(task, str) else task
    folder = task_folder(task, data_dir)
    label_feature = datasets.Value("float32") if task.is_regression else datasets.ClassLabel(names=list(task.label_names))
    features = datasets.Features({**{c: datasets.Value("string") for c in task.text_columns},
                                  "label": label_feature, "idx": datasets.Value("int32")})
    splits = {}
    for split, file_name in _split_files(task).items():
        path = folder / file_name
        if path.is_file():
            columns = read_split(task, path, labeled=not split.startswith("test"))
            if not task.is_regression and split.startswith("test"):  # ClassLabel cannot hold -1: keep ints
                split_features = features.copy()
                split_features["label"] = datasets.Value("int64")
            else:
                split_features = features
            splits[split] = datasets.Dataset.from_dict(columns, features=split_features)
    if not splits:
        raise FileNotFoundError(f"No split files of {task.name} in {folder}")
    return datasets.DatasetDict(splits)


def load_glue(task: GlueTask | str, data_dir: str | Path | None = None, cache_dir: str | None = None):
    """Local TSV folder when `data_dir` is given, else the Hub dataset `nyu-mll/glue` (needs the network)."""
    task = get_task(task) if isinstance(task, str) else task
    if data_dir is not None:
        return load_glue_tsv(task, data_dir)
    import datasets

    return datasets.load_dataset(HUB_DATASET, task.name, cache_dir=cache_dir)


# ----------------------------------------------------------------------------------------------------------------------
# Preprocessing
# ----------------------------------------------------------------------------------------------------------------------


def tokenize_function(task: GlueTask, tokenizer, max_length: int):
    """For `Dataset.map(batched=True)`: one sentence or a pair -> input_ids, token_type_ids, attention_mask
    ([CLS] A [SEP] B [SEP]); truncation to `max_length`, padding left to the data collator."""

    def tokenize(batch):
        texts = [batch[column] for column in task.text_columns]
        return tokenizer(*texts, truncation=True, max_length=max_length)

    return tokenize
