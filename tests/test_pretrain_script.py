"""scripts/pretrain.py end to end, in subprocesses: a few steps of each objective with the tiny preset on a small text
written here and a tokenizer trained here with the `tokenizers` library; checkpoints, resuming, evaluation of the
loss terms, and the exported discriminator loading into a task head."""

import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import REPO_ROOT, tokenize_under_transformers_457
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from modeling_deberta_custom import (
    DebertaCustomForMaskedLM,
    DebertaCustomForRTDPreTraining,
    DebertaCustomForSequenceClassification,
)

SCRIPT = REPO_ROOT / "scripts" / "pretrain.py"
SPECIALS = ["[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]"]
WORDS = ("the king and queen of england walked through the garden where roses were growing while their "
         "children were running and laughing beside the old fountain in the morning light").split()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A text file and a SentencePiece-style (Unigram, '▁' word starts) tokenizer folder trained on it."""
    root = tmp_path_factory.mktemp("pretrain")
    generator = torch.Generator().manual_seed(0)
    lines = []
    for _ in range(300):
        count = int(torch.randint(6, 16, (1,), generator=generator))
        lines.append(" ".join(WORDS[int(i)] for i in torch.randint(len(WORDS), (count,), generator=generator)))
        if int(torch.randint(10, (1,), generator=generator)) == 0:
            lines.append("")
    (root / "train.txt").write_text("\n".join(lines) + "\n")
    backend = Tokenizer(models.Unigram())
    backend.normalizer = normalizers.NFKC()
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.train_from_iterator(lines, trainers.UnigramTrainer(vocab_size=120, special_tokens=SPECIALS,
                                                               unk_token="[UNK]"))
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 1), ("[SEP]", 2)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", cls_token="[CLS]",
                                        sep_token="[SEP]", unk_token="[UNK]", mask_token="[MASK]")
    tokenizer.save_pretrained(root / "tokenizer")
    return root


def run_script(workspace, output_dir, *extra):
    command = [
        sys.executable, str(SCRIPT), "--model_preset", "tiny", "--tokenizer", str(workspace / "tokenizer"),
        "--train_files", str(workspace / "train.txt"), "--validation_split_percentage", "10",
        "--max_seq_length", "32", "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "4",
        "--max_eval_samples", "8", "--learning_rate", "1e-3", "--logging_steps", "1", "--use_cpu",
        "--report_to", "none", "--disable_tqdm", "true", "--dataloader_num_workers", "0",
        "--output_dir", str(output_dir), *extra,
    ]
    env = dict(os.environ, HF_DATASETS_CACHE=str(workspace / "datasets-cache"), OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false")
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return json.loads((output_dir / "pretraining_summary.json").read_text())


def test_rtd_pretraining_checkpoints_resumes_and_exports(workspace):
    output = workspace / "rtd"
    common = ("--objective", "rtd", "--save_steps", "2", "--eval_strategy", "steps", "--eval_steps", "2",
              "--config_overrides", '{"rtd_loss_weight": 10}')
    first = run_script(workspace, output, *common, "--max_steps", "2")
    assert first["global_step"] == 2 and (output / "checkpoint-2" / "model.safetensors").exists()
    for term in ("loss", "train_mlm_loss", "train_rtd_loss", "train_generator_accuracy",
                 "train_discriminator_accuracy", "eval_mlm_loss", "eval_rtd_loss", "eval_generator_accuracy",
                 "eval_discriminator_accuracy", "eval_replaced_fraction"):
        assert term in first["terms"], term

    # Resume from the checkpoint to step 4, then export the discriminator.
    discriminator_dir = workspace / "discriminator"
    second = run_script(workspace, output, *common, "--max_steps", "4", "--resume_from_checkpoint",
                        str(output / "checkpoint-2"), "--export_discriminator", str(discriminator_dir))
    assert second["global_step"] == 4 and (output / "checkpoint-4").exists()
    state = json.loads((output / "trainer_state.json").read_text())
    logged_steps = [entry["step"] for entry in state["log_history"] if "loss" in entry]
    assert logged_steps == [1, 2, 3, 4]  # the history of the first run carried over: resumed, not restarted

    pretrained = DebertaCustomForRTDPreTraining.from_pretrained(output).eval()
    assert pretrained.config.rtd_loss_weight == 10
    classifier = DebertaCustomForSequenceClassification.from_pretrained(discriminator_dir, num_labels=2).eval()
    input_ids = torch.randint(5, 100, (2, 12))
    with torch.no_grad():
        expected = pretrained.deberta(input_ids).last_hidden_state
        assert torch.equal(classifier.deberta(input_ids).last_hidden_state, expected)
        assert classifier(input_ids).logits.shape == (2, 2)
    assert (discriminator_dir / "tokenizer.json").exists()
    # Every tokenizer the script saved (output folder, checkpoints, exported discriminator) loads under transformers
    # 4.57 too, with the ids transformers 5 gives (transformers 5 names its TokenizersBackend class, which 4.57 lacks).
    folders = [output, output / "checkpoint-2", output / "checkpoint-4", discriminator_dir]
    text = "the king walked through the garden"
    expected = PreTrainedTokenizerFast.from_pretrained(output)(text)["input_ids"]
    assert tokenize_under_transformers_457(folders, text) == {str(folder): expected for folder in folders}


def test_mlm_pretraining_with_whole_word_masking(workspace):
    output = workspace / "mlm"
    summary = run_script(workspace, output, "--objective", "mlm", "--whole_word_masking", "--max_steps", "2",
                         "--eval_strategy", "steps", "--eval_steps", "2")
    assert summary["global_step"] == 2
    for term in ("loss", "train_mlm_loss", "train_mlm_accuracy", "eval_mlm_loss", "eval_mlm_accuracy"):
        assert term in summary["terms"], term
    assert 0.0 <= summary["final_eval"]["eval_mlm_accuracy"] <= 1.0
    model = DebertaCustomForMaskedLM.from_pretrained(output)
    assert model.config.vocab_size >= 120


def load_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("pretrain_script", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = script  # dataclasses and HfArgumentParser resolve annotations through sys.modules
    spec.loader.exec_module(script)
    return script


def test_rtd_pretraining_from_a_trained_discriminator_in_process(workspace, tmp_path):
    """--init_from: continue RTD pretraining from a discriminator (here a tiny one exported by the pretraining model;
    official DeBERTa-v3 checkpoints load the same way); and the argument checks."""
    from helpers import tiny_config

    DebertaCustomForRTDPreTraining(tiny_config(vocab_size=128)).export_discriminator(tmp_path / "start")
    script = load_script()
    try:
        base = ["--tokenizer", str(workspace / "tokenizer"), "--train_files", str(workspace / "train.txt"),
                "--max_seq_length", "32", "--per_device_train_batch_size", "4", "--use_cpu", "--report_to", "none",
                "--disable_tqdm", "true", "--validation_split_percentage", "0", "--save_strategy", "no"]
        with pytest.raises(ValueError, match="--export_discriminator needs --objective rtd"):
            script.main(base + ["--objective", "mlm", "--model_preset", "tiny", "--output_dir", str(tmp_path / "a"),
                                "--export_discriminator", str(tmp_path / "nowhere")])
        with pytest.raises(ValueError, match="drop --model_preset"):
            script.main(base + ["--model_preset", "tiny", "--init_from", str(tmp_path / "start"),
                                "--output_dir", str(tmp_path / "b")])
        trainer = script.main(base + ["--init_from", str(tmp_path / "start"), "--config_overrides",
                                      '{"rtd_generator_num_layers": 1}', "--max_steps", "1",
                                      "--output_dir", str(tmp_path / "c")])
    finally:
        sys.modules.pop("pretrain_script", None)
    model = trainer.model
    assert isinstance(model, DebertaCustomForRTDPreTraining) and trainer.state.global_step == 1
    assert model.config.hidden_size == 32 and model.generator.config.num_hidden_layers == 1
