"""Resuming: a run of scripts/pretrain.py or scripts/run_glue.py stopped right after a checkpoint and resumed from
it with --resume_from_checkpoint ends with exactly the weights of the same run left uninterrupted (CPU, fixed seed,
one thread). The stop is a real interruption, not a shorter run: a callback ends training right after the
checkpoint at step 2 of a 4-step schedule, so the learning-rate schedule, data order and random state must all be
restored from the checkpoint for the weights to agree.

The scripts run in-process (their main(argv)), with the Trainer they build wrapped to add the stopping callback.
"""

import sys

import pytest
import torch
from helpers import PRETRAIN, RESUME_ARGS, RUN_GLUE, assert_resumed_exactly, load_script, run_three_ways

WORDS = ("the king and queen of england walked through the garden where roses were growing while their children "
         "were running and laughing beside the old fountain in the morning light").split()


@pytest.fixture
def text_and_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    generator = torch.Generator().manual_seed(0)
    lines = [" ".join(WORDS[int(i)] for i in torch.randint(len(WORDS), (int(n),), generator=generator))
             for n in torch.randint(6, 16, (200,), generator=generator)]
    (tmp_path / "train.txt").write_text("\n".join(lines) + "\n")
    backend = Tokenizer(models.Unigram())
    backend.normalizer = normalizers.NFKC()
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.train_from_iterator(lines, trainers.UnigramTrainer(
        vocab_size=120, special_tokens=["[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]"], unk_token="[UNK]"))
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 1), ("[SEP]", 2)])
    PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
                            unk_token="[UNK]", mask_token="[MASK]").save_pretrained(tmp_path / "tokenizer")
    return tmp_path


@pytest.mark.parametrize("objective", ["mlm", "rtd"])
def test_pretraining_resumes_to_the_same_weights(text_and_tokenizer, tmp_path, monkeypatch, objective):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets-cache")
    script = load_script(PRETRAIN)
    argv = ["--objective", objective, "--model_preset", "tiny", "--tokenizer", str(text_and_tokenizer / "tokenizer"),
            "--train_files", str(text_and_tokenizer / "train.txt"), "--validation_split_percentage", "0",
            "--max_seq_length", "32", "--per_device_train_batch_size", "4", "--learning_rate", "1e-3",
            "--warmup_steps", "1", *RESUME_ARGS]
    try:
        assert_resumed_exactly(*run_three_ways(script, argv, tmp_path / objective, monkeypatch))
    finally:
        sys.modules.pop(script.__name__, None)


@pytest.mark.parametrize("sift", [False, True], ids=["plain", "sift"])
def test_glue_fine_tuning_resumes_to_the_same_weights(tmp_path, monkeypatch, sift):
    """The bundled SST-2 demo (tiny model from scratch), with dropout on, and with SiFT's random perturbations."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets-cache")
    script = load_script(RUN_GLUE)
    argv = ["--demo", "--max_train_samples", "64", "--per_device_train_batch_size", "8", "--eval_strategy", "no",
            "--do_eval", "false", *RESUME_ARGS] + (["--sift"] if sift else [])
    try:
        assert_resumed_exactly(*run_three_ways(script, argv, tmp_path / "glue", monkeypatch))
    finally:
        sys.modules.pop(script.__name__, None)
