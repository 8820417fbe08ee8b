#!/usr/bin/env python
"""Fine-tune and evaluate DeBERTa on a GLUE task with the unchanged transformers Trainer.

    # the demo: a tiny model from scratch on the SST-2 sample bundled in data/ (no network, no ../shared)
    python scripts/run_glue.py --demo

    # a GLUE folder in the original TSV layout, a checkpoint folder (ours or an official microsoft/deberta-*)
    python scripts/run_glue.py --task rte --data_dir ../shared/data/glue --model_name_or_path path/to/checkpoint

    # from scratch with a size preset (configuration/<preset>.json), SiFT on, every TrainingArguments flag
    python scripts/run_glue.py --task mrpc --data_dir ../shared/data/glue --model_preset tiny --sift \\
        --num_train_epochs 3 --output_dir outputs/mrpc-sift

    # the Hub dataset nyu-mll/glue (needs the network) when --data_dir is not given
    python scripts/run_glue.py --task cola --model_name_or_path microsoft/deberta-v3-base

Defaults come in layers, later ones winning: the TrainingArguments defaults; the task's recipe in
configuration/glue/<task>.json (from the DeBERTa papers' fine-tuning scripts); for a from-scratch model
(--model_preset) configuration/glue/from_scratch.json (a freshly initialised model needs a much larger learning
rate); --demo's paths; then the command line.

Metrics are each task's official ones, computed with the local `evaluate` module metrics/glue_metric (offline).
Results go to <output_dir>/results.json (and the Trainer's all_results.json); with --push_to_hub the output folder,
with a model card (README.md), is uploaded to --hub_model_id at the end.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import shlex
import sys
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path

import datasets
import evaluate
import numpy as np
import torch
import transformers
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    HfArgumentParser,
    PretrainedConfig,
    Trainer,
    TrainingArguments,
    set_seed,
)

from modeling_deberta_custom import DebertaCustomForSequenceClassification
from modeling_deberta_custom.training.distillation import DistillationCallback
from modeling_deberta_custom.training.distributed import end_distributed_run
from modeling_deberta_custom.training.glue import HUB_DATASET, TASKS, GlueTask, get_task, load_glue, tokenize_function
from modeling_deberta_custom.training.loss_terms import place_before_integrations
from modeling_deberta_custom.training.sift import AVERAGE_OVER, REGRESSION_MODES, SiFTCallback
from modeling_deberta_custom.training.tokenization import PortableTokenizerCallback, make_tokenizer_portable

logger = logging.getLogger("run_glue")

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO / "configuration"
GLUE_CONFIG_DIR = CONFIG_DIR / "glue"
METRIC_PATH = REPO / "metrics" / "glue_metric"
DEMO = {  # what --demo means: everything the run needs ships with the repository
    "task_name": "sst2",
    "data_dir": str(REPO / "data" / "glue"),
    "tokenizer": str(REPO / "data" / "tokenizer"),
    "model_preset": "tiny",
    "output_dir": "outputs/glue-demo/sst2",
    "torch_num_threads": 1,
    "dataloader_pin_memory": False,  # nothing to pin for on a CPU (torch warns otherwise)
}
OFFICIAL_MODEL_TYPES = ("deberta-v2", "deberta")  # microsoft/deberta-* checkpoints; our classes load them


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(default=None, metadata={
        "help": "A checkpoint folder or Hub id: ours (model_type deberta_custom, e.g. from the pretraining script) or "
                "an official one (model_type deberta-v2 / deberta, e.g. microsoft/deberta-v3-base)."})
    model_preset: str | None = field(default=None, metadata={
        "help": "Train from scratch with a size preset: tiny, xsmall, small, base, large (configuration/<name>.json) "
                "or the path of a config JSON. The vocabulary size follows the tokenizer."})
    tokenizer: str | None = field(default=None, metadata={
        "help": "Tokenizer folder or Hub id. Default: the model's folder; the bundled data/tokenizer with a preset."})
    config_overrides: str | None = field(default=None, metadata={
        "help": "Comma-separated key=value pairs applied to the model config, e.g. 'hidden_dropout_prob=0.2'."})
    cls_dropout: float | None = field(default=None, metadata={
        "help": "Dropout before the classifier (the recipes' cls_drop_out); default: hidden_dropout_prob."})
    ignore_mismatched_sizes: bool = field(default=False, metadata={
        "help": "Re-initialise a classifier whose number of labels differs (e.g. starting RTE from an MNLI model)."})
    cache_dir: str | None = field(default=None, metadata={"help": "Cache folder for Hub downloads."})
    unpad_inputs: bool = field(default=True, metadata={
        "help": "Run the token-wise layers on the real tokens of each padded batch only (config.unpad_inputs; faster "
                "on CPU, see the README). --no_unpad_inputs runs the padded path, to compare."})
    torch_num_threads: int | None = field(default=None, metadata={
        "help": "CPU threads for torch (default: torch's choice). The demo uses 1: a tiny model gains little from "
                "more, and loses much when other processes share the cores."})


@dataclass
class DataArguments:
    task_name: str | None = field(default=None, metadata={
        "aliases": ["--task"], "help": f"The GLUE task: {', '.join(TASKS)}."})
    data_dir: str | None = field(default=None, metadata={
        "help": "A GLUE folder in the original TSV layout (holding SST-2/, CoLA/, ...) or one task's folder. "
                f"Without it the Hub dataset {HUB_DATASET} is downloaded."})
    demo: bool = field(default=False, metadata={
        "help": "The out-of-the-box run: SST-2 sample and tokenizer bundled in data/, tiny model from scratch."})
    max_seq_length: int = field(default=128, metadata={"help": "Truncate inputs to this many tokens."})
    max_train_samples: int | None = field(default=None, metadata={
        "help": "Train on a random subset of this many examples (seeded by --seed)."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Evaluate on the first N examples."})
    max_predict_samples: int | None = field(default=None, metadata={"help": "Predict the first N test examples."})
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "Processes for tokenization."})


@dataclass
class SiFTArguments:
    sift: bool = field(default=False, metadata={
        "help": "Scale-invariant fine-tuning (modeling_deberta_custom.training.sift)."})
    sift_lambda: float = field(default=5.0, metadata={
        "help": "Weight of the adversarial loss (the original's vat_lambda: 5 in its SiFT recipes, 3 for v3-xsmall)."})
    sift_init_perturbation: float = field(default=1e-2, metadata={"help": "Std of the initial perturbation."})
    sift_perturbation_clamp: float | None = field(default=None, metadata={
        "help": "Clamp of the initial perturbation (default: twice its std)."})
    sift_step_size: float = field(default=1e-4, metadata={"help": "Size of the normalized ascent step."})
    sift_ascent_steps: int = field(default=1, metadata={"help": "Number of ascent steps (1 in the original)."})
    sift_loss_fn: str = field(default="symmetric-kl", metadata={
        "help": "Loss of the ascent step, the original's --vat_loss_fn: symmetric-kl, kl or mse."})
    sift_module: str | None = field(default=None, metadata={
        "help": "The LayerNorm whose input is perturbed (default: the model's embeddings.LayerNorm)."})
    sift_regression_mode: str = field(default="authors", metadata={
        "help": "One-logit (regression) heads such as STS-B: 'authors' (their code: a softmax across the batch, "
                "2 ln B at equal logits) or 'zero' (ours: no adversarial term).",
        "choices": list(REGRESSION_MODES)})
    sift_average_over: str = field(default="positions", metadata={
        "help": "Rows the adversarial term averages: 'positions' (the authors': every predicted position) or "
                "'items' (ours: the task loss's labelled items, exact under gradient accumulation).",
        "choices": list(AVERAGE_OVER)})

    def callback(self) -> SiFTCallback:
        return SiFTCallback(adv_weight=self.sift_lambda, init_perturbation=self.sift_init_perturbation,
                            perturbation_clamp=self.sift_perturbation_clamp, step_size=self.sift_step_size,
                            ascent_steps=self.sift_ascent_steps, loss_fn=self.sift_loss_fn,
                            perturbed_module=self.sift_module, regression_mode=self.sift_regression_mode,
                            average_over=self.sift_average_over)


@dataclass
class DistillationArguments:
    teacher: str | None = field(default=None, metadata={
        "help": "Distill from this fine-tuned model (a checkpoint folder or Hub id with the same labels and tokenizer "
                "as the student; modeling_deberta_custom.training.distillation)."})
    distill_temperature: float = field(default=2.0, metadata={"help": "Temperature T of the soft targets."})
    distill_alpha_task: float = field(default=0.5, metadata={"help": "Weight of the task loss (hard labels)."})
    distill_alpha_kd: float = field(default=0.5, metadata={
        "help": "Weight of T^2 * KL(teacher || student) (squared error for regression)."})
    distill_relation_weight: float = field(default=0.0, metadata={
        "help": "Weight of the MiniLMv2 self-attention relation KL (0: off)."})
    distill_relations: str = field(default="query,key,value", metadata={
        "help": "Comma-separated projections whose relations are transferred."})
    distill_relation_heads: int | None = field(default=None, metadata={
        "help": "Relation heads (default: the student's attention heads)."})
    distill_teacher_layer: int = field(default=-1, metadata={"help": "Teacher layer of the relations."})
    distill_student_layer: int = field(default=-1, metadata={"help": "Student layer of the relations."})

    def settings(self) -> dict | None:
        return asdict(self) if self.teacher else None

    def callback(self, student, tokenizer, cache_dir: str | None = None) -> DistillationCallback:
        """Loads the teacher; a clear error, before training, when its labels or tokenizer differ from the
        student's."""
        config_dict, _ = PretrainedConfig.get_config_dict(self.teacher, cache_dir=cache_dir)
        teacher_class = (DebertaCustomForSequenceClassification if config_dict.get("model_type") in OFFICIAL_MODEL_TYPES
                         else AutoModelForSequenceClassification)
        teacher = teacher_class.from_pretrained(self.teacher, cache_dir=cache_dir)
        try:
            teacher_tokenizer = AutoTokenizer.from_pretrained(self.teacher, cache_dir=cache_dir)
        except (OSError, ValueError):
            teacher_tokenizer = None
            logger.warning("No tokenizer in the teacher folder %s: only its vocabulary size is checked", self.teacher)
        if teacher_tokenizer is not None and teacher_tokenizer.get_vocab() != tokenizer.get_vocab():
            raise SystemExit(f"The teacher {self.teacher} uses a different tokenizer than the student (different "
                             "vocabularies): distillation needs both to read the same token ids")
        try:
            callback = DistillationCallback(
                teacher, temperature=self.distill_temperature, alpha_task=self.distill_alpha_task,
                alpha_kd=self.distill_alpha_kd, relation_weight=self.distill_relation_weight,
                relations=[r.strip() for r in self.distill_relations.split(",") if r.strip()],
                relation_heads=self.distill_relation_heads, teacher_layer=self.distill_teacher_layer,
                student_layer=self.distill_student_layer)
            callback.install(student)  # every check now, not at the first training step
        except ValueError as error:
            raise SystemExit(f"--teacher {self.teacher}: {error}") from error
        callback.remove()
        logger.info("Distilling from %s (%.2fM parameters)", self.teacher, teacher.num_parameters() / 1e6)
        return callback


ARGUMENT_CLASSES = (ModelArguments, DataArguments, SiFTArguments, DistillationArguments, TrainingArguments)


# ----------------------------------------------------------------------------------------------------------------------
# Arguments: defaults in layers
# ----------------------------------------------------------------------------------------------------------------------


def read_defaults(path: Path) -> dict:
    """A defaults file: argument name -> value; keys starting with "_" are comments (the recipe's source)."""
    with open(path, encoding="utf-8") as handle:
        return {k: v for k, v in json.load(handle).items() if not k.startswith("_")}


def _truthy(value) -> bool:
    return value is True or str(value).lower() in ("1", "true", "yes", "y")


def layered_defaults(argv: list[str]) -> dict:
    """Task recipe < from-scratch settings < demo, from the few arguments that select them."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--task_name", "--task", default=None)
    pre.add_argument("--demo", nargs="?", const="true", default="false")
    pre.add_argument("--model_preset", default=None)
    pre.add_argument("--model_name_or_path", default=None)
    known, _ = pre.parse_known_args(argv)
    demo = _truthy(known.demo)
    defaults = {"do_train": True, "do_eval": True}
    task_name = known.task_name or (DEMO["task_name"] if demo else None)
    if task_name is not None:
        task = get_task(task_name)
        defaults.update(read_defaults(GLUE_CONFIG_DIR / f"{task.name}.json"))
        defaults["output_dir"] = f"outputs/glue/{task.name}"
    from_scratch = known.model_preset is not None or (demo and known.model_name_or_path is None)
    if from_scratch:
        defaults.update(read_defaults(GLUE_CONFIG_DIR / "from_scratch.json"))
    if demo:
        skip = () if from_scratch else ("model_preset", "tokenizer")  # a given model brings its own tokenizer
        defaults.update({k: v for k, v in DEMO.items() if k not in skip})
    return defaults


def parse_arguments(argv: list[str] | None = None):
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser(ARGUMENT_CLASSES)
    defaults = layered_defaults(argv)
    destinations = {action.dest for action in parser._actions}
    unknown = sorted(set(defaults) - destinations)
    if unknown:
        raise ValueError(f"Unknown argument names in the defaults files: {unknown}")
    parser.set_defaults(**defaults)
    model_args, data_args, sift_args, distill_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    if data_args.task_name is None:
        parser.error("--task_name (or --task) is required, e.g. --task sst2; --demo runs the bundled SST-2 sample")
    data_args.task_name = get_task(data_args.task_name).name
    if (model_args.model_name_or_path is None) == (model_args.model_preset is None):
        parser.error("Pass exactly one of --model_name_or_path (a checkpoint) and --model_preset (from scratch)")
    return model_args, data_args, sift_args, distill_args, training_args


# ----------------------------------------------------------------------------------------------------------------------
# Tokenizer and model
# ----------------------------------------------------------------------------------------------------------------------


def load_tokenizer(model_args: ModelArguments):
    source = model_args.tokenizer
    if source is None and model_args.model_preset is not None:
        source = DEMO["tokenizer"]
        logger.info("From-scratch model without --tokenizer: using the bundled tokenizer %s", source)
    source = source or model_args.model_name_or_path
    try:
        return AutoTokenizer.from_pretrained(source, cache_dir=model_args.cache_dir)
    except (OSError, ValueError) as error:
        raise SystemExit(f"Could not load a tokenizer from {source}: {error}\nPass --tokenizer <folder or Hub id> "
                         "(checkpoints saved without their tokenizer need it).") from error


def label_config(task: GlueTask) -> dict:
    if task.is_regression:
        return {"num_labels": 1, "problem_type": "regression"}
    return {"num_labels": task.num_labels, "problem_type": "single_label_classification",
            "id2label": dict(enumerate(task.label_names)),
            "label2id": {name: i for i, name in enumerate(task.label_names)}}


def preset_path(preset: str) -> Path:
    path = Path(preset)
    if path.suffix == ".json":
        return path
    path = CONFIG_DIR / f"{preset}.json"
    if not path.is_file():
        available = sorted(p.stem for p in CONFIG_DIR.glob("*.json"))
        raise SystemExit(f"No model preset {preset!r}: {path} does not exist (available: {available})")
    return path


def load_model(model_args: ModelArguments, task: GlueTask, tokenizer):
    overrides = label_config(task)
    if model_args.cls_dropout is not None:
        overrides["cls_dropout"] = model_args.cls_dropout
    if model_args.model_preset is not None:
        config = AutoConfig.from_pretrained(preset_path(model_args.model_preset))
        config.update({"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id,
                       "bos_token_id": tokenizer.cls_token_id, "eos_token_id": tokenizer.sep_token_id, **overrides})
        if model_args.config_overrides:
            config.update_from_string(model_args.config_overrides)
        return AutoModelForSequenceClassification.from_config(config)
    path = model_args.model_name_or_path
    config_dict, _ = PretrainedConfig.get_config_dict(path, cache_dir=model_args.cache_dir)
    # AutoModel would map an official checkpoint (model_type deberta-v2) to transformers' own DeBERTa classes; ours
    # read it directly and keep every weight.
    model_class = (DebertaCustomForSequenceClassification if config_dict.get("model_type") in OFFICIAL_MODEL_TYPES
                   else AutoModelForSequenceClassification)
    model = model_class.from_pretrained(path, cache_dir=model_args.cache_dir,
                                        ignore_mismatched_sizes=model_args.ignore_mismatched_sizes, **overrides)
    if model_args.config_overrides:
        model.config.update_from_string(model_args.config_overrides)
    if model.config.vocab_size < len(tokenizer):
        raise SystemExit(f"The tokenizer has {len(tokenizer)} tokens but the model only {model.config.vocab_size}")
    return model


# ----------------------------------------------------------------------------------------------------------------------
# Data and metrics
# ----------------------------------------------------------------------------------------------------------------------


def prepare_datasets(task: GlueTask, data_args: DataArguments, tokenizer, training_args: TrainingArguments,
                     cache_dir: str | None):
    raw = load_glue(task, data_args.data_dir, cache_dir=cache_dir)
    if data_args.max_train_samples is not None and "train" in raw:
        n = min(data_args.max_train_samples, len(raw["train"]))
        raw["train"] = raw["train"].shuffle(seed=training_args.seed).select(range(n))
    for split in raw:
        limit = data_args.max_predict_samples if split.startswith("test") else data_args.max_eval_samples
        if split != "train" and limit is not None:
            raw[split] = raw[split].select(range(min(limit, len(raw[split]))))
    max_length = min(data_args.max_seq_length, tokenizer.model_max_length)
    with training_args.main_process_first(desc="tokenization"):
        tokenized = raw.map(tokenize_function(task, tokenizer, max_length), batched=True,
                            num_proc=data_args.preprocessing_num_workers, desc="Tokenizing",
                            remove_columns=list(task.text_columns))
    return raw, tokenized


def metric_function(task: GlueTask):
    metric = evaluate.load(str(METRIC_PATH), task.name)

    def compute_metrics(prediction):
        logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
        predicted = np.squeeze(logits, -1) if task.is_regression else np.argmax(logits, axis=-1)
        return metric.compute(predictions=predicted, references=prediction.label_ids)

    return compute_metrics


def split_prefix(task: GlueTask, split: str) -> str:
    """Metric prefix of an evaluation split: eval_ (eval_matched_, eval_mismatched_ for MNLI)."""
    return "eval" if len(task.validation_splits) == 1 else "eval_" + split.split("_", 1)[1]


# ----------------------------------------------------------------------------------------------------------------------
# Model card and Hub
# ----------------------------------------------------------------------------------------------------------------------


def main_metrics(results: dict, task: GlueTask):
    """(split, metric, value) of the task's official metrics in `results["eval"]`."""
    for split, metrics in results["eval"].items():
        for key in task.metric_keys:
            name = f"{split_prefix(task, split)}_{key}"
            if name in metrics:
                yield split, key, float(metrics[name])


def hub_base_model(results: dict) -> str | None:
    """The starting checkpoint when it is a Hub id (a local folder means nothing on the Hub)."""
    model = results["model"]
    return model if results["model_source"] == "checkpoint" and not Path(model).exists() else None


def model_card(results: dict, task: GlueTask, training_args: TrainingArguments) -> str:
    """README.md for the output folder: Hub metadata (model-index with the dev results) and a readable summary."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    dataset_name = f"GLUE {task.name.upper()}"
    eval_results = [
        EvalResult(task_type="text-classification", dataset_type=HUB_DATASET, dataset_name=dataset_name,
                   dataset_config=task.name, dataset_split=split, metric_type=key, metric_name=key,
                   metric_value=round(value, 4))
        for split, key, value in main_metrics(results, task)
    ]
    name = training_args.hub_model_id or Path(training_args.output_dir).name
    tags = ["deberta", "deberta_custom", "glue", "text-classification"] + (["sift"] if results["sift"] else [])
    data = ModelCardData(library_name="transformers", tags=tags, datasets=[HUB_DATASET], language="en",
                         metrics=list(task.metric_keys), model_name=name, eval_results=eval_results or None,
                         pipeline_tag="text-classification",
                         base_model=hub_base_model(results))
    rows = "\n".join(f"| {split} | {key} | {value:.4f} |" for split, key, value in main_metrics(results, task))
    origin = (f"fine-tuned from `{results['model']}`" if results["model_source"] == "checkpoint"
              else f"trained from scratch (size preset `{results['model']}`, no pretraining)")
    sift = results["sift"]
    sift_text = ("Trained with SiFT (scale-invariant fine-tuning, DeBERTa paper §4): "
                 + ", ".join(f"{k.removeprefix('sift_')} = {v}" for k, v in sift.items() if v is not None) + "."
                 if sift else "Trained without SiFT.")
    hyper = results["hyperparameters"]
    content = f"""---
{data.to_yaml()}
---

# {name}

DeBERTa (`modeling_deberta_custom`) {origin} on {dataset_name} with `scripts/run_glue.py` and the unchanged
`transformers.Trainer`. {sift_text}

## Results (GLUE dev set)

| split | metric | value |
|---|---|---|
{rows}

Trained on {results['num_train_examples']} examples.

## Training

{chr(10).join(f"- {k}: {v}" for k, v in hyper.items())}

Command:

```
{results['command']}
```

## Use

```python
from transformers import AutoModelForSequenceClassification, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("{name}")
model = AutoModelForSequenceClassification.from_pretrained("{name}", trust_remote_code=True)
```

`trust_remote_code=True` loads the model code saved next to the weights; with the `modeling_deberta_custom`
package installed (`import modeling_deberta_custom`) it is not needed.

Framework versions: {', '.join(f"{k} {v}" for k, v in results['versions'].items())}.
"""
    ModelCard(content)  # validates the metadata block
    return content


def push_to_hub(folder: str, training_args: TrainingArguments) -> None:
    """Upload the output folder (model, tokenizer, code files, README.md, results) to `hub_model_id`."""
    from huggingface_hub import HfApi

    api = HfApi(token=training_args.hub_token)
    repo_id = training_args.hub_model_id or Path(folder).absolute().name
    repo = api.create_repo(repo_id, private=training_args.hub_private_repo, exist_ok=True)
    api.upload_folder(repo_id=repo.repo_id, folder_path=folder, commit_message="scripts/run_glue.py: end of training",
                      revision=training_args.hub_revision, ignore_patterns=["checkpoint-*", "_*", "runs/*"])
    logger.info("Pushed %s to %s", folder, repo.repo_id)


# ----------------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    model_args, data_args, sift_args, distill_args, training_args = parse_arguments(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        handlers=[logging.StreamHandler(sys.stdout)],
                        level=logging.INFO if training_args.should_log else logging.WARNING)
    transformers.utils.logging.set_verbosity_warning()
    datasets.utils.logging.set_verbosity_warning()
    # The Hub upload happens once, at the end, with our model card: the Trainer itself must not push.
    push = training_args.push_to_hub
    training_args.push_to_hub = False

    if model_args.torch_num_threads is not None:
        torch.set_num_threads(model_args.torch_num_threads)
    task = get_task(data_args.task_name)
    set_seed(training_args.seed)
    tokenizer = load_tokenizer(model_args)
    raw, tokenized = prepare_datasets(task, data_args, tokenizer, training_args, model_args.cache_dir)
    model = load_model(model_args, task, tokenizer)
    model.config.unpad_inputs = model_args.unpad_inputs
    logger.info("Task %s | model %s (%.2fM parameters) | train %s | %s", task.name,
                model_args.model_name_or_path or f"preset {model_args.model_preset}", model.num_parameters() / 1e6,
                len(tokenized["train"]) if "train" in tokenized else 0,
                ", ".join(f"{s} {len(tokenized[s])}" for s in task.validation_splits if s in tokenized))

    if training_args.do_train and "train" not in tokenized:
        raise SystemExit(f"No training split for {task.name} in {data_args.data_dir or HUB_DATASET} "
                         "(pass --do_train False to only evaluate)")
    validation = {s: tokenized[s] for s in task.validation_splits if s in tokenized}
    if not validation and (training_args.do_eval or training_args.eval_strategy != "no"):
        raise SystemExit(f"No validation split for {task.name} in {data_args.data_dir or HUB_DATASET}: pass "
                         "--do_eval False --eval_strategy no to train without evaluating")
    eval_dataset = None
    if validation:
        eval_dataset = next(iter(validation.values())) if len(validation) == 1 else {
            split.split("_", 1)[1]: ds for split, ds in validation.items()}
    pad_multiple = 8 if training_args.fp16 or training_args.bf16 else None
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=tokenized["train"] if training_args.do_train else None,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer, pad_to_multiple_of=pad_multiple),
        compute_metrics=metric_function(task),
        callbacks=[sift_args.callback()] if sift_args.sift else None,
    )
    if distill_args.teacher is not None:
        trainer.add_callback(distill_args.callback(model, tokenizer, model_args.cache_dir))
    trainer.add_callback(PortableTokenizerCallback())  # checkpoints' tokenizers load under transformers 4.x too
    place_before_integrations(trainer)  # report_to integrations receive sift_loss and the distill_* terms

    results = {
        "task": task.name,
        "model": model_args.model_name_or_path or model_args.model_preset,
        "model_source": "checkpoint" if model_args.model_name_or_path else "preset",
        "tokenizer": model_args.tokenizer or model_args.model_name_or_path or DEMO["tokenizer"],
        "data": data_args.data_dir or HUB_DATASET,
        "num_train_examples": len(tokenized["train"]) if training_args.do_train else 0,
        "sift": ({k: v for k, v in asdict(sift_args).items() if k != "sift"} if sift_args.sift else None),
        "hyperparameters": {k: _plain(getattr(training_args, k)) for k in (
            "learning_rate", "per_device_train_batch_size", "gradient_accumulation_steps", "num_train_epochs",
            "max_steps", "warmup_steps", "weight_decay", "adam_epsilon", "max_grad_norm", "lr_scheduler_type",
            "seed")} | {"max_seq_length": data_args.max_seq_length,
                        "cls_dropout": model.config.cls_dropout, "world_size": training_args.world_size},
        "command": " ".join(["python", "scripts/run_glue.py", *map(shlex.quote, argv)]),
        "versions": {"transformers": transformers.__version__, "torch": torch.__version__,
                     "datasets": datasets.__version__, "python": platform.python_version()},
        "train": None,
        "eval": {},
    }
    results["distillation"] = distill_args.settings()

    if training_args.do_train:
        train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        trainer.save_model()
        if trainer.args.should_save:  # the folder that is pushed: its tokenizer loads under transformers 4.x too
            make_tokenizer_portable(training_args.output_dir)
        metrics = dict(train_result.metrics, train_samples=len(tokenized["train"]))
        trainer.log_metrics("train", metrics)
        trainer.save_metrics("train", metrics)
        trainer.save_state()
        results["train"] = metrics

    if training_args.do_eval:
        for split, dataset in validation.items():
            prefix = split_prefix(task, split)
            metrics = trainer.evaluate(eval_dataset=dataset, metric_key_prefix=prefix)
            metrics[f"{prefix}_samples"] = len(dataset)
            trainer.log_metrics(prefix, metrics)
            trainer.save_metrics(prefix, metrics)
            results["eval"][split] = metrics

    if training_args.do_predict:
        for split in (s for s in tokenized if s.startswith("test")):
            predictions = trainer.predict(tokenized[split].remove_columns("label"), metric_key_prefix="predict")
            logits = predictions.predictions
            values = np.squeeze(logits, -1) if task.is_regression else np.argmax(logits, axis=-1)
            if trainer.is_world_process_zero():
                path = Path(training_args.output_dir) / f"predict_results_{task.name}_{split}.tsv"
                with open(path, "w", encoding="utf-8") as handle:
                    handle.write("index\tprediction\n")
                    for index, value in zip(tokenized[split]["idx"], values, strict=True):
                        label = f"{value:.3f}" if task.is_regression else task.label_names[int(value)]
                        handle.write(f"{index}\t{label}\n")
                logger.info("Test predictions written to %s", path)

    if trainer.is_world_process_zero():
        output_dir = Path(training_args.output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "results.json").write_text(json.dumps(_jsonable(results), indent=2) + "\n", encoding="utf-8")
        if training_args.do_train:
            (output_dir / "README.md").write_text(model_card(results, task, training_args), encoding="utf-8")
        summary = "; ".join(f"{split} {key} = {value:.4f}" for split, key, value in main_metrics(results, task))
        print(f"\n{task.name} ({results['num_train_examples']} training examples"
              f"{', SiFT' if sift_args.sift else ''}): {summary or 'no evaluation'}")
        print(f"Results: {output_dir / 'results.json'}")
        if push:
            if not training_args.do_train:
                raise SystemExit("--push_to_hub needs --do_train (there is no fine-tuned model to push)")
            push_to_hub(str(output_dir), training_args)
    end_distributed_run()
    return results


def _plain(value):
    return value.value if isinstance(value, Enum) else value


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if hasattr(value, "item"):
        return value.item()
    return str(value)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
