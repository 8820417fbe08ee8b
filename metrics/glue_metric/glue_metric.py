"""GLUE's official metrics as a local `evaluate` module, so that evaluation works offline:

    metric = evaluate.load("metrics/glue_metric", "mrpc")   # a path to this folder, and the task
    metric.compute(predictions=[...], references=[...])     # {"accuracy": ..., "f1": ...}

Per task, as the GLUE benchmark (and the Hub's `glue` metric) reports them:
- cola: Matthews correlation;  sst2, mnli, mnli_matched, mnli_mismatched, qnli, rte, wnli, ax: accuracy;
- mrpc, qqp: accuracy and F1 of the positive class (1 = paraphrase / duplicate);
- stsb: Pearson and Spearman correlations of the predicted and gold similarity scores.
Computed with scikit-learn and SciPy. Values are fractions in [0, 1] (correlations in [-1, 1]), not percentages.
"""

import datasets
import evaluate
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import f1_score, matthews_corrcoef

_CITATION = """\
@inproceedings{wang2019glue,
  title={{GLUE}: A Multi-Task Benchmark and Analysis Platform for Natural Language Understanding},
  author={Wang, Alex and Singh, Amanpreet and Michael, Julian and Hill, Felix and Levy, Omer and Bowman, Samuel R.},
  booktitle={International Conference on Learning Representations},
  year={2019}
}
"""

_DESCRIPTION = "The official metric of each GLUE task (accuracy, F1, Matthews correlation, Pearson/Spearman)."

_KWARGS_DESCRIPTION = """
Args:
    predictions: predicted labels (class ids), or predicted scores for stsb.
    references: gold labels (class ids), or gold scores for stsb.
Returns, depending on the task (the configuration name):
    "accuracy", "f1", "matthews_correlation", "pearson", "spearmanr".
Example:
    >>> metric = evaluate.load("metrics/glue_metric", "mrpc")
    >>> metric.compute(predictions=[0, 1, 1], references=[0, 1, 0])
    {'accuracy': 0.6666666666666666, 'f1': 0.6666666666666666}
"""

ACCURACY_TASKS = ("sst2", "mnli", "mnli_matched", "mnli_mismatched", "qnli", "rte", "wnli", "ax")
TASKS = ("cola", "mrpc", "qqp", "stsb", *ACCURACY_TASKS)


def accuracy(predictions, references) -> float:
    return float(sum(int(p == r) for p, r in zip(predictions, references, strict=True)) / len(references))


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class GlueMetric(evaluate.Metric):
    def _info(self):
        if self.config_name not in TASKS:
            raise KeyError(f"Unknown GLUE task {self.config_name!r} for this metric; pick one of {list(TASKS)}")
        value_type = "float32" if self.config_name == "stsb" else "int64"
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value(value_type), "references": datasets.Value(value_type)}
            ),
            codebase_urls=["https://gluebenchmark.com/"],
            reference_urls=["https://arxiv.org/abs/1804.07461"],
        )

    def _compute(self, predictions, references):
        if len(references) == 0:
            raise ValueError("No references to score")
        task = self.config_name
        if task == "cola":
            return {"matthews_correlation": float(matthews_corrcoef(references, predictions))}
        if task == "stsb":
            return {"pearson": float(pearsonr(predictions, references)[0]),
                    "spearmanr": float(spearmanr(predictions, references)[0])}
        if task in ("mrpc", "qqp"):
            return {"accuracy": accuracy(predictions, references),
                    "f1": float(f1_score(y_true=references, y_pred=predictions))}
        return {"accuracy": accuracy(predictions, references)}
