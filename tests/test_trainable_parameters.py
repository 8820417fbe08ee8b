"""Every trainable parameter receives a gradient in every training step, under each pretraining objective and
embedding-sharing mode, so that DistributedDataParallel runs without find_unused_parameters (which would search the
autograd graph after every backward); and a two-process DDP run of scripts/pretrain.py that way."""

import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import REPO_ROOT, random_batch, tiny_config

from modeling_deberta_custom import DebertaCustomForMaskedLM, DebertaCustomForRTDPreTraining


def masked_lm_batch(vocab_size):
    input_ids, attention_mask = random_batch(vocab_size, batch=3, length=12)
    labels = torch.full_like(input_ids, -100)
    labels[0, 2], labels[1, 1], labels[2, 7] = 5, 6, 7
    return dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels)


OBJECTIVES = [("mlm", None), ("rtd", "gdes"), ("rtd", "es"), ("rtd", "none")]


@pytest.mark.parametrize("position_biased_input", [False, True])
@pytest.mark.parametrize("objective,sharing", OBJECTIVES, ids=[f"{o}-{s}" if s else o for o, s in OBJECTIVES])
def test_every_trainable_parameter_gets_a_gradient(tmp_path, objective, sharing, position_biased_input):
    """Also after a save/load round trip, since loading installs fresh parameters. Under gdes the discriminator's
    position delta is read only with position_biased_input (the discriminator has no Enhanced Mask Decoder): it is
    trainable exactly then."""
    if objective == "mlm":
        config = tiny_config(position_biased_input=position_biased_input)
        DebertaCustomForMaskedLM(config).save_pretrained(tmp_path)
        model = DebertaCustomForMaskedLM.from_pretrained(tmp_path)
    else:
        config = tiny_config(position_biased_input=position_biased_input, rtd_embedding_sharing=sharing)
        DebertaCustomForRTDPreTraining(config).save_pretrained(tmp_path)
        model = DebertaCustomForRTDPreTraining.from_pretrained(tmp_path)
    model.train()
    model(**masked_lm_batch(config.vocab_size)).loss.backward()
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert [name for name, p in trainable.items() if p.grad is None] == []
    if sharing == "gdes":
        assert ("deberta.embeddings.position_embeddings.delta" in trainable) == position_biased_input
        assert "deberta.embeddings.word_embeddings.delta" in trainable
    if objective == "rtd":  # the generator's decoder reads its absolute table in every mode
        assert "generator.deberta.embeddings.position_embeddings.weight" in trainable


def test_frozen_gdes_delta_keeps_the_export_exact():
    """A frozen position delta stays zero through training, so the exported discriminator's table is the generator's;
    the word table is merged as E_G + E_delta."""
    torch.manual_seed(0)
    model = DebertaCustomForRTDPreTraining(tiny_config())
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        model(**masked_lm_batch(model.config.vocab_size)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    embeddings, generator = model.deberta.embeddings, model.generator.deberta.embeddings
    assert torch.count_nonzero(embeddings.position_embeddings.delta) == 0
    assert torch.count_nonzero(embeddings.word_embeddings.delta) > 0
    state = model.discriminator_state_dict()
    assert torch.equal(state["deberta.embeddings.position_embeddings.weight"], generator.position_embeddings.weight)
    assert torch.equal(state["deberta.embeddings.word_embeddings.weight"],
                       generator.word_embeddings.weight + embeddings.word_embeddings.delta)


def test_rtd_pretraining_under_ddp_without_unused_parameter_search(tmp_path):
    """torchrun, two CPU processes over gloo, find_unused_parameters off (scripts/pretrain.py's default now, explicit
    here): a trainable parameter without gradient fails the second step ("Expected to have finished reduction in
    the prior iteration")."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    words = "the king and queen walked through the garden where roses were growing in the morning".split()
    generator = torch.Generator().manual_seed(0)
    lines = [" ".join(words[int(i)] for i in torch.randint(len(words), (12,), generator=generator)) for _ in range(40)]
    (tmp_path / "train.txt").write_text("\n".join(lines) + "\n")
    backend = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = ["[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]"]
    backend.train_from_iterator(lines, trainers.WordLevelTrainer(special_tokens=specials))
    backend.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[
        ("[CLS]", 1), ("[SEP]", 2)])
    PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
                            unk_token="[UNK]", mask_token="[MASK]").save_pretrained(tmp_path / "tokenizer")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(REPO_ROOT / "scripts" / "pretrain.py"), "--objective", "rtd", "--model_preset", "tiny",
               "--tokenizer", str(tmp_path / "tokenizer"), "--train_files", str(tmp_path / "train.txt"),
               "--validation_split_percentage", "0", "--max_seq_length", "16", "--per_device_train_batch_size", "2",
               "--max_steps", "3", "--use_cpu", "--report_to", "none", "--disable_tqdm", "true",
               "--save_strategy", "no", "--dataloader_num_workers", "0", "--ddp_find_unused_parameters", "false",
               "--output_dir", str(tmp_path / "out")]
    environment = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT), TOKENIZERS_PARALLELISM="false",
                       HF_DATASETS_CACHE=str(tmp_path / "datasets-cache"))
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=environment, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    summary = json.loads((tmp_path / "out" / "pretraining_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_step"] == 3
