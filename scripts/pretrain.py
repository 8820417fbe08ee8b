#!/usr/bin/env python
"""Pretrain DeBERTa from plain text with an unchanged transformers.Trainer.

Objectives:
  mlm  masked-LM with the Enhanced Mask Decoder (DebertaCustomForMaskedLM); BERT masking 15% then 80/10/10.
  rtd  replaced-token detection (DeBERTaV3, DebertaCustomForRTDPreTraining): generator + discriminator with
       gradient-disentangled embedding sharing (config rtd_embedding_sharing), loss = MLM + rtd_loss_weight * RTD;
       rtd_mask_probability of the tokens, every one [MASK], as the original RTD task.
       --rtd_training decoupled (default, the authors'): the generator and the discriminator each get their own
       learning rate (--generator_learning_rate / --discriminator_learning_rate, default --learning_rate) and their own
       gradient clip at --max_grad_norm (modeling_deberta_custom.training.rtd_training). --rtd_training joint: one
       optimizer and one global clip on the summed loss (this script's behaviour before; needed under DeepSpeed/FSDP).

Text files are read line by line through `datasets`, tokenized, concatenated and cut into blocks of exactly
--max_seq_length tokens ([CLS] ... [SEP]). Every TrainingArguments flag works (--max_steps, --learning_rate,
--eval_strategy, --save_steps, --resume_from_checkpoint, --use_cpu, --bf16, ...); evaluation reports the loss terms
and accuracies (eval_mlm_loss, eval_mlm_accuracy / eval_generator_accuracy, eval_rtd_loss,
eval_discriminator_accuracy with eval_discriminator_baseline_accuracy (all "original") and precision / recall on
replaced tokens, eval_replaced_fraction), and training logs add train_* terms. A run writes
pretraining_summary.json (first / last value of each term, wall time) into --output_dir.

    python scripts/pretrain.py --objective rtd --model_preset tiny \
        --tokenizer ../shared/data/tokenizers/deberta-v3 \
        --train_files ../shared/data/corpus/wikitext-2-tokenized/valid.txt \
        --validation_files ../shared/data/corpus/wikitext-2-tokenized/test.txt --max_eval_samples 200 \
        --max_seq_length 128 --per_device_train_batch_size 16 --learning_rate 1e-3 --max_steps 300 \
        --eval_strategy steps --eval_steps 100 --logging_steps 20 --save_steps 100 --use_cpu \
        --output_dir outputs/rtd-tiny --export_discriminator outputs/rtd-tiny/discriminator

Two CPU processes (DDP over gloo): `accelerate launch --multi_gpu --num_processes 2 scripts/pretrain.py ... --use_cpu`
or `torchrun --nproc_per_node 2 scripts/pretrain.py ... --use_cpu`.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import transformers
from transformers import HfArgumentParser, Trainer, TrainingArguments, set_seed

from modeling_deberta_custom import DebertaCustomConfig, DebertaCustomForMaskedLM, DebertaCustomForRTDPreTraining
from modeling_deberta_custom.training.distributed import end_distributed_run
from modeling_deberta_custom.training.loss_terms import place_before_integrations
from modeling_deberta_custom.training.metrics import LossTermsCallback, PretrainingMetrics
from modeling_deberta_custom.training.packing import PackedCollator, tokenize_and_pack
from modeling_deberta_custom.training.pretraining import DebertaMaskingCollator, MaskingSeedCallback, tokenize_and_group
from modeling_deberta_custom.training.rtd_training import (
    RTD_TRAINING_MODES,
    DecoupledRTDCallback,
    decoupled_rtd_optimizer,
)
from modeling_deberta_custom.training.tokenization import (
    PortableTokenizerCallback,
    load_pretraining_tokenizer,
    make_tokenizer_portable,
    save_tokenizer,
)

logger = logging.getLogger("pretrain")
PRESET_DIR = Path(__file__).resolve().parents[1] / "configuration"


@dataclass
class PretrainingArguments:
    tokenizer: str = field(metadata={"help": "An spm.model file, a folder holding one (the official DeBERTa-v3 "
                                             "layout), or a tokenizer folder AutoTokenizer loads (scripts/train_tokenizer.py)"})
    train_files: list[str] = field(metadata={"help": "Plain text files, one text per line"})
    objective: str = field(default="rtd", metadata={"help": "mlm (masked-LM with EMD) or rtd (replaced-token "
                                                           "detection with GDES)", "choices": ["mlm", "rtd"]})
    validation_files: list[str] | None = field(default=None, metadata={"help": "Held-out text files"})
    validation_split_percentage: float = field(
        default=5.0, metadata={"help": "Without --validation_files: hold out the last this-percent of the training "
                                       "lines (0 disables evaluation)"})
    model_preset: str | None = field(default=None, metadata={"help": f"A size preset: a JSON name in {PRESET_DIR} "
                                                                     "(tiny, xsmall, small, base, large)"})
    config_path: str | None = field(default=None, metadata={
        "help": "A config JSON instead of a preset: ours, an official one (model_type deberta-v2), or an original "
                "DeBERTa rtd_*.json with 'generator' and 'discriminator' sections"})
    config_overrides: str | None = field(default=None, metadata={
        "help": 'JSON of config fields to override, e.g. \'{"rtd_loss_weight": 10, "rtd_embedding_sharing": "es"}\''})
    max_seq_length: int = field(default=128, metadata={"help": "Block length in tokens, [CLS] and [SEP] included"})
    pack_documents: bool = field(default=False, metadata={
        "help": "Keep each line a document of its own: blocks of up to max_seq_length tokens hold whole documents, "
                "fed as packed batches in which no document attends to another (modeling_deberta_custom.packing). "
                "Default: lines concatenated into full blocks"})
    whole_word_masking: bool = field(default=False, metadata={"help": "Mask whole words (pieces after a '▁' piece)"})
    mask_probability: float | None = field(default=None, metadata={
        "help": "Fraction of tokens (or words) to mask; default config.rtd_mask_probability for rtd, 0.15 for mlm"})
    mask_replace_prob: float | None = field(default=None, metadata={
        "help": "Of the masked tokens, the share replaced by [MASK] (default 0.8 for mlm, 1.0 for rtd)"})
    random_replace_prob: float | None = field(default=None, metadata={
        "help": "Of the masked tokens, the share replaced by a random token (default 0.1 for mlm, 0.0 for rtd)"})
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep only this many training blocks"})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep only this many evaluation blocks"})
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "Processes for tokenization"})
    init_from: str | None = field(default=None, metadata={
        "help": "Start from trained weights instead of a fresh model (the config then comes from them, so no "
                "--model_preset / --config_path): for rtd a discriminator (our export, or an official DeBERTa-v3 "
                "checkpoint such as microsoft/deberta-v3-xsmall), whose tables also seed the generator; for mlm a "
                "masked-LM checkpoint"})
    rtd_training: str = field(default="decoupled", metadata={
        "help": "rtd only: decoupled (the authors' default: generator and discriminator each with their own learning "
                "rate, optimizer step and gradient clip at --max_grad_norm) or joint (one optimizer, one global clip on "
                "MLM + lambda * RTD: earlier runs of this script, and the one that works under DeepSpeed / FSDP)",
        "choices": list(RTD_TRAINING_MODES)})
    generator_learning_rate: float | None = field(default=None, metadata={
        "aliases": ["--generator_lr"], "help": "rtd decoupled: the generator's peak learning rate (default --learning_rate)"})
    discriminator_learning_rate: float | None = field(default=None, metadata={
        "aliases": ["--discriminator_lr"],
        "help": "rtd decoupled: the discriminator's peak learning rate (default --learning_rate)"})
    export_discriminator: str | None = field(default=None, metadata={
        "help": "rtd only: after training, write the discriminator (E_G + E_delta merged) here, with the tokenizer, "
                "as a checkpoint that DebertaCustomModel and every task head load"})


def load_config(args: PretrainingArguments, vocab_size: int, pad_token_id: int) -> DebertaCustomConfig:
    if (args.model_preset is None) == (args.config_path is None):
        raise ValueError("Pass exactly one of --model_preset and --config_path")
    path = Path(args.config_path) if args.config_path else PRESET_DIR / f"{args.model_preset}.json"
    if not path.exists():
        presets = sorted(p.stem for p in PRESET_DIR.glob("*.json"))
        raise FileNotFoundError(f"No config at {path} (presets: {presets})")
    config_dict = json.loads(path.read_text())
    if "discriminator" in config_dict:  # the original DeBERTa rtd_*.json layout
        generator = config_dict.get("generator", {})
        discriminator = dict(config_dict["discriminator"])
        discriminator["rtd_embedding_sharing"] = config_dict.get("embedding_sharing", "gdes").lower()
        for ours, theirs in (("rtd_generator_num_layers", "num_hidden_layers"), ("rtd_generator_hidden_size", "hidden_size"),
                             ("rtd_generator_intermediate_size", "intermediate_size"),
                             ("rtd_generator_num_attention_heads", "num_attention_heads")):
            if theirs in generator and generator[theirs] != discriminator.get(theirs):
                discriminator[ours] = generator[theirs]
        config_dict = discriminator
    if args.config_overrides:
        config_dict.update(json.loads(args.config_overrides))
    config_dict.pop("auto_map", None)
    config_dict.pop("architectures", None)
    config = DebertaCustomConfig.from_dict(config_dict)
    if config.vocab_size < vocab_size:
        logger.info(f"vocab_size {config.vocab_size} -> {vocab_size} (the tokenizer's)")
        config.vocab_size = vocab_size
    config.pad_token_id = pad_token_id
    config.validate_fields()
    if args.max_seq_length > config.max_position_embeddings:
        raise ValueError(f"--max_seq_length {args.max_seq_length} exceeds max_position_embeddings="
                         f"{config.max_position_embeddings}, which the Enhanced Mask Decoder needs")
    return config


def init_model(args: PretrainingArguments, model_class, vocab_size: int):
    """The model of --init_from, with --config_overrides applied."""
    if args.model_preset or args.config_path:
        raise ValueError("--init_from takes the config from the checkpoint: drop --model_preset / --config_path")
    overrides = json.loads(args.config_overrides) if args.config_overrides else {}
    if model_class is DebertaCustomForRTDPreTraining:
        model = model_class.from_discriminator(args.init_from, **overrides)
    else:
        model = model_class.from_pretrained(args.init_from, **overrides)
    if model.config.vocab_size < vocab_size:
        raise ValueError(f"{args.init_from} has vocab_size {model.config.vocab_size}, fewer than the tokenizer's "
                         f"{vocab_size} tokens")
    if args.max_seq_length > model.config.max_position_embeddings:
        raise ValueError(f"--max_seq_length {args.max_seq_length} exceeds max_position_embeddings="
                         f"{model.config.max_position_embeddings} of {args.init_from}")
    return model.train()


def rtd_optimizer(args: PretrainingArguments, training_args: TrainingArguments, model):
    """The optimizer of decoupled RTD training (it also turns the Trainer's global clip off), or None for the
    Trainer's own (joint training, masked-LM)."""
    decoupled = args.objective == "rtd" and args.rtd_training == "decoupled"
    if not decoupled:
        if args.generator_learning_rate is not None or args.discriminator_learning_rate is not None:
            raise ValueError("--generator_learning_rate / --discriminator_learning_rate need --objective rtd with "
                             "--rtd_training decoupled")
        return None
    return decoupled_rtd_optimizer(model, training_args, generator_lr=args.generator_learning_rate,
                                   discriminator_lr=args.discriminator_learning_rate)


def load_blocks(args: PretrainingArguments, tokenizer, training_args: TrainingArguments):
    from datasets import DatasetDict, load_dataset

    data_files = {"train": list(args.train_files)}
    if args.validation_files:
        data_files["validation"] = list(args.validation_files)
    raw = load_dataset("text", data_files=data_files)
    if "validation" not in raw and args.validation_split_percentage > 0:
        lines = len(raw["train"])
        held_out = max(1, int(lines * args.validation_split_percentage / 100))
        raw = DatasetDict(train=raw["train"].select(range(lines - held_out)),
                          validation=raw["train"].select(range(lines - held_out, lines)))
    with training_args.main_process_first(desc="tokenizing and grouping"):
        blocks = (tokenize_and_pack if args.pack_documents else tokenize_and_group)(
            raw, tokenizer, args.max_seq_length, num_proc=args.preprocessing_num_workers)
    train, validation = blocks["train"], blocks.get("validation")
    if args.max_train_samples is not None:
        train = train.select(range(min(args.max_train_samples, len(train))))
    if validation is not None and args.max_eval_samples is not None:
        validation = validation.select(range(min(args.max_eval_samples, len(validation))))
    if len(train) == 0:
        raise ValueError(f"The training files hold less than one block of {args.max_seq_length} tokens")
    return train, (validation if validation is not None and len(validation) > 0 else None)


def summarize(log_history: list[dict], keys) -> dict:
    """First and last logged value of each key (training and evaluation logs)."""
    summary = {}
    for key in keys:
        values = [(entry["step"], entry[key]) for entry in log_history if key in entry]
        if values:
            summary[key] = {"first": {"step": values[0][0], "value": values[0][1]},
                            "last": {"step": values[-1][0], "value": values[-1][1]}}
    return summary


def main(argv=None):
    parser = HfArgumentParser((PretrainingArguments, TrainingArguments))
    if argv is None and len(sys.argv) == 2 and sys.argv[1].endswith(".json"):
        args, training_args = parser.parse_json_file(os.path.abspath(sys.argv[1]))
    else:
        args, training_args = parser.parse_args_into_dataclasses(args=argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        level=logging.INFO if training_args.process_index == 0 else logging.WARNING)
    transformers.utils.logging.set_verbosity_warning()
    if args.export_discriminator and args.objective != "rtd":
        raise ValueError("--export_discriminator needs --objective rtd (a masked-LM run saves its model in output_dir)")
    set_seed(training_args.seed)

    tokenizer = load_pretraining_tokenizer(args.tokenizer)
    if tokenizer.mask_token_id is None or tokenizer.cls_token_id is None or tokenizer.sep_token_id is None:
        raise ValueError(f"The tokenizer at {args.tokenizer} lacks [MASK], [CLS] or [SEP]")
    model_class = DebertaCustomForRTDPreTraining if args.objective == "rtd" else DebertaCustomForMaskedLM
    if args.init_from:
        model = init_model(args, model_class, len(tokenizer))
        config = model.config
    else:
        config = load_config(args, len(tokenizer), tokenizer.pad_token_id)
        model = model_class(config)
    if training_args.ddp_find_unused_parameters is None:
        # Every trainable parameter gets a gradient in every step (tables a model does not read are frozen, see
        # train_only_read_position_tables), so DDP need not search the graph for unused ones after each backward.
        training_args.ddp_find_unused_parameters = False
    parameters = sum(p.numel() for p in model.parameters())
    logger.info(f"{args.objective}: {model_class.__name__}, {parameters:,} parameters, vocab {config.vocab_size}, "
                f"{config.num_hidden_layers} layers of {config.hidden_size}"
                + (f", generator {model.generator.config.num_hidden_layers} layers, sharing "
                   f"{config.rtd_embedding_sharing}, lambda {config.rtd_loss_weight}" if args.objective == "rtd" else ""))

    train_dataset, eval_dataset = load_blocks(args, tokenizer, training_args)
    logger.info(f"{len(train_dataset)} training blocks, {len(eval_dataset) if eval_dataset else 0} evaluation "
                f"blocks of {args.max_seq_length} tokens")
    mask_probability = args.mask_probability
    if mask_probability is None:
        mask_probability = config.rtd_mask_probability if args.objective == "rtd" else 0.15
    # Compiled graphs compute masked-LM logits at a number of positions fixed by the batch shape
    # (config.sparse_mlm_max_fraction of its tokens; batches beyond it are exact but pay a dense pass): keep it above
    # the masking rate. Eager runs predict at exactly the masked positions and do not read it.
    if training_args.torch_compile and config.sparse_mlm_max_fraction < min(1.0, mask_probability + 0.1):
        config.sparse_mlm_max_fraction = min(1.0, mask_probability + 0.1)
        logger.info(f"sparse_mlm_max_fraction -> {config.sparse_mlm_max_fraction} (masking {mask_probability})")
    collator = DebertaMaskingCollator.for_objective(
        tokenizer, args.objective, mask_probability, whole_word_mask=args.whole_word_masking,
        mask_replace_prob=args.mask_replace_prob, random_replace_prob=args.random_replace_prob,
        seed=training_args.seed,
    )
    metrics = PretrainingMetrics(args.objective)
    optimizer = rtd_optimizer(args, training_args, model)
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=PackedCollator(collator) if args.pack_documents else collator,
        processing_class=tokenizer,
        compute_metrics=metrics.compute_metrics if eval_dataset is not None else None,
        preprocess_logits_for_metrics=metrics.preprocess_logits_for_metrics if eval_dataset is not None else None,
        optimizers=(optimizer, None),
    )
    trainer.add_callback(LossTermsCallback())  # the train_* terms, placed below ahead of the report_to integrations
    # Masks keyed by the position in training, so that a resumed run masks as the uninterrupted one (see the class).
    trainer.add_callback(MaskingSeedCallback(collator))
    trainer.add_callback(PortableTokenizerCallback())  # checkpoints' tokenizers load under transformers 4.x too
    if optimizer is not None:  # each model's gradient norm and learning rate in the logs
        trainer.callback_handler.callbacks.insert(1, DecoupledRTDCallback())
    place_before_integrations(trainer)

    resume = training_args.resume_from_checkpoint
    if isinstance(resume, str) and resume.lower() in ("true", "last"):
        resume = True  # the last checkpoint in output_dir
    started = time.time()
    train_result = trainer.train(resume_from_checkpoint=resume)
    wall_time = time.time() - started
    trainer.save_model()
    if trainer.args.should_save:
        make_tokenizer_portable(training_args.output_dir)
    trainer.log_metrics("train", train_result.metrics)
    trainer.save_metrics("train", train_result.metrics)
    trainer.save_state()

    final_eval = {}
    if eval_dataset is not None:
        final_eval = trainer.evaluate()
        trainer.log_metrics("eval", final_eval)
        trainer.save_metrics("eval", final_eval)

    if args.export_discriminator and trainer.is_world_process_zero():
        trainer.model.export_discriminator(args.export_discriminator)
        save_tokenizer(tokenizer, args.export_discriminator)
        logger.info(f"Discriminator for fine-tuning written to {args.export_discriminator}")

    if trainer.is_world_process_zero():
        terms = ["loss", "train_mlm_loss", "train_mlm_accuracy", "train_rtd_loss", "train_generator_accuracy",
                 "train_discriminator_accuracy", "grad_norm", "generator_grad_norm", "discriminator_grad_norm",
                 "eval_loss", "eval_mlm_loss", "eval_mlm_accuracy", "eval_rtd_loss",
                 "eval_generator_accuracy", "eval_discriminator_accuracy", "eval_discriminator_baseline_accuracy",
                 "eval_discriminator_recall", "eval_discriminator_precision", "eval_replaced_fraction"]
        summary = {
            "objective": args.objective,
            "rtd_training": args.rtd_training if args.objective == "rtd" else None,
            "world_size": training_args.world_size,
            "global_step": trainer.state.global_step,
            "train_wall_time_s": round(wall_time, 1),
            "parameters": parameters,
            "terms": summarize(trainer.state.log_history, terms),
            "final_eval": final_eval,
            "export_discriminator": args.export_discriminator,
        }
        with open(os.path.join(training_args.output_dir, "pretraining_summary.json"), "w") as handle:
            json.dump(summary, handle, indent=2)
        logger.info("summary: " + json.dumps(summary["terms"]))
    end_distributed_run()
    return trainer


if __name__ == "__main__":
    main()
