"""Decoupled RTD training (modeling_deberta_custom.training.rtd_training) under the unchanged Trainer: each model
clipped by its own norm, its own learning rate, the same step as a hand-written two-optimizer loop on the authors'
two losses; joint training as before; resume, gradient accumulation and mixed precision; scripts/pretrain.py's
default. Tiny model, CPU, a few steps each."""

import copy
import importlib.util
import sys
import types

import pytest
import torch
from helpers import REPO_ROOT, random_batch, tiny_config
from transformers import HfArgumentParser, Trainer, TrainerCallback, TrainingArguments

from modeling_deberta_custom import DebertaCustomForRTDPreTraining
from modeling_deberta_custom.training.rtd_training import (
    DISCRIMINATOR,
    GENERATOR,
    DecoupledRTDCallback,
    check_decoupled_training_supported,
    decoupled_rtd_optimizer,
    gradient_norms_by_model,
    rtd_parameter_groups,
)

MASK_ID = 4
LAMBDA = 50.0


def rtd_model(sharing="gdes", seed=0, temperature=1e-4):
    """Sampling at temperature 1e-4 is the generator's argmax, so runs that draw random numbers in a different order
    (the Trainer's sampler, a hand-written loop) still see the same replacements."""
    torch.manual_seed(seed)
    config = tiny_config(rtd_embedding_sharing=sharing, rtd_loss_weight=LAMBDA, rtd_sampling_temperature=temperature,
                         sparse_mlm_max_fraction=0.5)
    return DebertaCustomForRTDPreTraining(config).train()


def masked_rows(vocab_size, rows=4, length=12, seed=0, padded=False):
    """Rows with 2 masked tokens each ([MASK] in input_ids, the original id in labels); no padding unless asked, so
    every micro-batch masks the same share of its tokens."""
    input_ids, attention_mask = random_batch(vocab_size, batch=rows, length=length, seed=seed,
                                             pad_row=1 if padded else None)
    input_ids = input_ids.clamp(min=MASK_ID + 1)
    generator = torch.Generator().manual_seed(seed + 1)
    labels = torch.full_like(input_ids, -100)
    for row in range(rows):
        real = int(attention_mask[row].sum())
        for position in torch.randperm(real - 2, generator=generator)[:2] + 1:
            labels[row, position] = input_ids[row, position]
            input_ids[row, position] = MASK_ID
    return [{"input_ids": input_ids[i], "attention_mask": attention_mask[i], "labels": labels[i]} for i in range(rows)]


def stack(rows):
    return {key: torch.stack([row[key] for row in rows]) for key in rows[0]}


def training_args(tmp_path, **overrides):
    fields = dict(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none", disable_tqdm=True,
                  dataloader_num_workers=0, save_strategy="no", logging_steps=1, seed=0, max_steps=1,
                  per_device_train_batch_size=4, optim="sgd", learning_rate=0.1, lr_scheduler_type="constant",
                  weight_decay=0.0, max_grad_norm=1.0)
    fields.update(overrides)
    return TrainingArguments(**fields)


def parameters_of(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def hand_written_step(model, batch, learning_rates, max_grad_norm, clip="per_model"):
    """The authors' decoupled step written out: the generator's gradient from its MLM loss, the discriminator's from
    lambda * RTD (two backward passes over one forward), each clipped by its own total norm, plain SGD on each.
    clip="global" instead clips both by their joint norm with one learning rate (joint training). Returns the norms."""
    output = model(**batch)
    groups = rtd_parameter_groups(model)
    es = model.config.rtd_embedding_sharing == "es"
    generator_loss = output.mlm_loss + (LAMBDA * output.rtd_loss if es else 0.0)  # es: the shared table gets both
    losses = {GENERATOR: generator_loss, DISCRIMINATOR: LAMBDA * output.rtd_loss}
    grads = {}
    for name, named in groups.items():
        params = [p for _, p in named]
        grads[name] = torch.autograd.grad(losses[name], params, retain_graph=True, allow_unused=True)
        grads[name] = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads[name], strict=True)]
    norms = {name: torch.sqrt(sum((g.double() ** 2).sum() for g in model_grads)).item()
             for name, model_grads in grads.items()}
    norms["both"] = (norms[GENERATOR] ** 2 + norms[DISCRIMINATOR] ** 2) ** 0.5
    with torch.no_grad():
        for name, named in groups.items():
            norm = norms[name] if clip == "per_model" else norms["both"]
            scale = min(1.0, max_grad_norm / (norm + 1e-6))
            for (_, p), g in zip(named, grads[name], strict=True):
                p -= learning_rates[name] * scale * g
    return norms


def assert_same_parameters(expected, actual, atol=1e-6):
    assert expected.keys() == actual.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], atol=atol, rtol=1e-5, msg=name)


def train_one_batch(model, args, batch, optimizer=None):
    """One Trainer step on exactly `batch` (a collator that ignores the sampled rows, so their order is fixed)."""
    trainer = Trainer(model=model, args=args, train_dataset=list(range(len(batch["input_ids"]))),
                      data_collator=lambda rows: {key: value.clone() for key, value in batch.items()},
                      optimizers=(optimizer, None))
    if optimizer is not None:
        trainer.add_callback(DecoupledRTDCallback())
    trainer.train()
    return trainer


# --- the optimizer ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sharing", ["gdes", "es", "none"])
def test_each_model_owns_its_parameters_and_only_those(tmp_path, sharing):
    """Every trainable parameter sits in exactly one model's groups; the shared tables (es, gdes) are the
    generator's, E_delta the discriminator's. A step with gradients on one model's parameters only moves only them."""
    model = rtd_model(sharing)
    optimizer = decoupled_rtd_optimizer(model, training_args(tmp_path, optim="adamw_torch", weight_decay=0.1))
    owner = {id(p): group["rtd_model"] for group in optimizer.param_groups for p in group["params"]}
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert len(owner) == sum(len(group["params"]) for group in optimizer.param_groups) == len(trainable)
    for name, p in trainable.items():
        assert owner[id(p)] == (GENERATOR if name.startswith("generator.") else DISCRIMINATOR), name
    if sharing != "none":
        assert owner[id(model.generator.deberta.embeddings.word_embeddings.weight)] == GENERATOR
    if sharing == "gdes":
        assert owner[id(model.deberta.embeddings.word_embeddings.delta)] == DISCRIMINATOR

    for stepped in (GENERATOR, DISCRIMINATOR):
        before = parameters_of(model)
        optimizer.zero_grad()
        for p in trainable.values():
            if owner[id(p)] == stepped:
                p.grad = torch.randn_like(p)
        optimizer.step()
        moved = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
        assert moved == {name for name, p in trainable.items() if owner[id(p)] == stepped}


def test_each_model_is_clipped_by_its_own_norm(tmp_path):
    """Hand-computed: SGD with lr 1 moves each parameter by -g * min(1, c / (||g_model|| + 1e-6)), with the norm of
    its own model's gradient; a global clip would scale both by c / ||g_both||."""
    model = rtd_model()
    optimizer = decoupled_rtd_optimizer(model, training_args(tmp_path, learning_rate=1.0, max_grad_norm=0.5))
    model(**stack(masked_rows(model.config.vocab_size))).loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    before = parameters_of(model)
    groups = rtd_parameter_groups(model)
    norms = {model_name: torch.sqrt(sum((grads[name] ** 2).sum() for name, _ in named if name in grads)).item()
             for model_name, named in groups.items()}
    assert min(norms.values()) > 0.5 and norms[DISCRIMINATOR] > 3 * norms[GENERATOR]  # both clip, differently
    optimizer.step()
    for model_name, named in groups.items():
        scale = 0.5 / (norms[model_name] + 1e-6)
        for name, p in named:
            torch.testing.assert_close(p.detach(), before[name] - scale * grads[name], atol=1e-7, rtol=1e-5)
    recorded = optimizer.per_model_clipping.grad_norms
    assert recorded.keys() == {GENERATOR, DISCRIMINATOR}
    for model_name in norms:
        assert recorded[model_name].item() == pytest.approx(norms[model_name], rel=1e-5)


def test_learning_rates_weight_decay_and_the_trainers_clip(tmp_path):
    """Per-model learning rates, the Trainer's own weight-decay split in each model, and the Trainer's global clip
    turned off in the args it is given (its value moves into the per-model groups)."""
    model = rtd_model()
    args = training_args(tmp_path, optim="adamw_torch", weight_decay=0.01, max_grad_norm=0.7)
    optimizer = decoupled_rtd_optimizer(model, args, generator_lr=1e-3, discriminator_lr=3e-3)
    assert args.max_grad_norm == 0
    decay = set(Trainer(model=model, args=training_args(tmp_path)).get_decay_parameter_names(model))
    names = {id(p): name for name, p in model.named_parameters()}
    for group in optimizer.param_groups:
        assert group["lr"] == {GENERATOR: 1e-3, DISCRIMINATOR: 3e-3}[group["rtd_model"]]
        assert group["max_grad_norm"] == 0.7
        assert {names[id(p)] in decay for p in group["params"]} == {group["weight_decay"] == 0.01}
    assert isinstance(optimizer, torch.optim.AdamW)


def test_deepspeed_and_fsdp_are_refused_with_the_reason(monkeypatch):
    for args in (types.SimpleNamespace(deepspeed={"zero_optimization": {"stage": 2}}, fsdp=None),
                 types.SimpleNamespace(deepspeed=None, fsdp=["full_shard"])):
        with pytest.raises(ValueError, match="rtd_training joint"):
            check_decoupled_training_supported(args)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ValueError, match="FSDP"):
        check_decoupled_training_supported(types.SimpleNamespace(deepspeed=None, fsdp=None))


def test_a_wrapper_that_replaces_the_parameters_is_refused(tmp_path):
    """What DeepSpeed's ZeRO does to the groups of an optimizer it wraps: the step must not clip shards as models."""
    model = rtd_model()
    optimizer = decoupled_rtd_optimizer(model, training_args(tmp_path))
    flat = torch.nn.Parameter(torch.zeros(10))
    flat.grad = torch.ones(10)
    optimizer.param_groups[0]["params"] = [flat]
    with pytest.raises(RuntimeError, match="per model"):
        optimizer.step()


# --- through the Trainer -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("sharing", ["gdes", "es", "none"])
def test_a_decoupled_trainer_step_is_the_two_optimizer_step(tmp_path, sharing):
    """One Trainer step equals the authors' loop written by hand: the generator stepped on its MLM loss, the
    discriminator on lambda * RTD, each gradient clipped by its own norm, each model at its own learning rate.
    The clip is set between the two models' norms' scale so both clip, by different factors."""
    model = rtd_model(sharing)
    reference = copy.deepcopy(model)
    batch = stack(masked_rows(model.config.vocab_size, padded=True))
    probe = copy.deepcopy(model)
    probe(**batch).loss.backward()
    norms = gradient_norms_by_model(probe)
    max_grad_norm = norms[GENERATOR] / 2
    assert norms[DISCRIMINATOR] > 3 * norms[GENERATOR]
    learning_rates = {GENERATOR: 0.2, DISCRIMINATOR: 0.05}

    args = training_args(tmp_path, max_grad_norm=max_grad_norm)
    optimizer = decoupled_rtd_optimizer(model, args, learning_rates[GENERATOR], learning_rates[DISCRIMINATOR])
    trainer = train_one_batch(model, args, batch, optimizer)
    hand_norms = hand_written_step(reference, batch, learning_rates, max_grad_norm)
    assert_same_parameters(parameters_of(reference), parameters_of(model))
    logged = trainer.state.log_history[0]
    assert logged["generator_grad_norm"] == pytest.approx(hand_norms[GENERATOR], rel=1e-4)
    assert logged["discriminator_grad_norm"] == pytest.approx(hand_norms[DISCRIMINATOR], rel=1e-4)
    assert logged["generator_learning_rate"] == 0.2 and logged["discriminator_learning_rate"] == 0.05
    if sharing != "es":  # the generator's gradient is its MLM loss's alone: RTD never reaches it
        output = copy.deepcopy(reference)(**batch)
        generator_params = [p for _, p in rtd_parameter_groups(reference)[GENERATOR]]
        rtd_grads = torch.autograd.grad(output.rtd_loss, generator_params, allow_unused=True)
        assert all(g is None or not g.any() for g in rtd_grads)


def test_joint_training_is_one_optimizer_and_one_global_clip(tmp_path):
    """No optimizer given (--rtd_training joint): the Trainer's own, one learning rate, one clip over both models on
    MLM + lambda * RTD, as before decoupled training existed."""
    model = rtd_model()
    reference = copy.deepcopy(model)
    batch = stack(masked_rows(model.config.vocab_size, padded=True))
    args = training_args(tmp_path, max_grad_norm=1.0, learning_rate=0.2)
    train_one_batch(model, args, batch)
    norms = hand_written_step(reference, batch, {GENERATOR: 0.2, DISCRIMINATOR: 0.2}, 1.0, clip="global")
    assert norms["both"] > 1.0  # the clip engaged
    assert_same_parameters(parameters_of(reference), parameters_of(model))


def test_gradient_accumulation_equals_the_large_batch(tmp_path):
    """Batch 4 against 2 x accumulation 2, decoupled, both models clipped: one clip per optimizer step on the
    accumulated gradient (every row masks 2 of 12 tokens, so each micro-batch's RTD mean weighs in equally)."""
    rows = masked_rows(99)
    results = []
    for batch_size, accumulation in ((4, 1), (2, 2)):
        model = rtd_model()
        args = training_args(tmp_path / f"b{batch_size}", per_device_train_batch_size=batch_size,
                             gradient_accumulation_steps=accumulation, max_grad_norm=0.5, learning_rate=0.1)
        optimizer = decoupled_rtd_optimizer(model, args, discriminator_lr=0.03)
        trainer = Trainer(model=model, args=args, train_dataset=rows, optimizers=(optimizer, None))
        trainer.train()
        norms = optimizer.per_model_clipping.grad_norms
        assert all(norm > 0.5 for norm in norms.values())
        results.append((parameters_of(model), {k: v.item() for k, v in norms.items()}))
    (large, large_norms), (accumulated, accumulated_norms) = results
    assert_same_parameters(large, accumulated)
    assert accumulated_norms == pytest.approx(large_norms, rel=1e-5)


class StopAfter(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        control.should_training_stop = state.global_step >= self.step
        return control


def test_resuming_from_a_checkpoint_is_exact(tmp_path):
    """AdamW with warmup and linear decay, two learning rates, sampling at temperature 1: 4 steps straight against 2
    steps, a checkpoint, and a resumed run to 4. Weights, optimizer state and each group's learning rate agree."""
    rows = masked_rows(99, rows=8)

    def run(output, stop=None, resume=None):
        model = rtd_model(temperature=1.0)
        args = training_args(output, max_steps=4, per_device_train_batch_size=2, optim="adamw_torch",
                             learning_rate=1e-2, lr_scheduler_type="linear", warmup_steps=1, weight_decay=0.01,
                             save_strategy="steps", save_steps=2, max_grad_norm=0.5)
        optimizer = decoupled_rtd_optimizer(model, args, discriminator_lr=3e-2)
        trainer = Trainer(model=model, args=args, train_dataset=rows, optimizers=(optimizer, None),
                          callbacks=[DecoupledRTDCallback()] + ([StopAfter(stop)] if stop else []))
        trainer.train(resume_from_checkpoint=resume)
        return parameters_of(model), trainer.optimizer.state_dict()

    straight, straight_state = run(tmp_path / "straight")
    stopped, _ = run(tmp_path / "stopped", stop=2)
    resumed, resumed_state = run(tmp_path / "stopped", resume=str(tmp_path / "stopped" / "out" / "checkpoint-2"))
    assert any(not torch.equal(straight[name], stopped[name]) for name in straight)
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name
    for index, state in straight_state["state"].items():
        for key, value in state.items():
            assert torch.equal(value, resumed_state["state"][index][key]), (index, key)
    lrs = [(group["rtd_model"], group["lr"], group["max_grad_norm"]) for group in straight_state["param_groups"]]
    assert lrs == [(g["rtd_model"], g["lr"], g["max_grad_norm"]) for g in resumed_state["param_groups"]]
    generator_lr, discriminator_lr = (next(lr for model, lr, _ in lrs if model == name)
                                      for name in (GENERATOR, DISCRIMINATOR))
    assert discriminator_lr == pytest.approx(3 * generator_lr) and generator_lr < 1e-2  # one schedule, two peaks


def test_the_trainer_must_not_clip_globally_as_well(tmp_path):
    model = rtd_model()
    optimizer = decoupled_rtd_optimizer(model, training_args(tmp_path))
    batch = stack(masked_rows(model.config.vocab_size))
    with pytest.raises(ValueError, match="one global norm"):
        train_one_batch(model, training_args(tmp_path, max_grad_norm=1.0), batch, optimizer)


@pytest.mark.parametrize("precision", ["bf16", pytest.param("fp16", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="the fp16 loss scaler runs on CUDA (on CPU the Trainer uses none)"))])
def test_mixed_precision_clips_unscaled_gradients(tmp_path, precision):
    """Under autocast (and fp16's loss scaler, which unscales before the optimizer's step) each model's recorded
    pre-clip norm is the fp32 one to a few percent, not 65536 times it, and the step moves both models."""
    model = rtd_model()
    batch = stack(masked_rows(model.config.vocab_size))
    probe = copy.deepcopy(model)
    probe(**batch).loss.backward()
    expected = gradient_norms_by_model(probe)
    args = training_args(tmp_path, **{precision: True}, max_grad_norm=0.5, use_cpu=precision == "bf16")
    optimizer = decoupled_rtd_optimizer(model, args)
    before = {name: p.to(args.device) for name, p in parameters_of(model).items()}
    trainer = train_one_batch(model, args, batch, optimizer)
    assert (trainer.accelerator.scaler is not None) == (precision == "fp16")
    for name, norm in optimizer.per_model_clipping.grad_norms.items():
        assert norm.item() == pytest.approx(expected[name], rel=0.05), name
    groups = rtd_parameter_groups(model)
    for name in (GENERATOR, DISCRIMINATOR):
        assert any(not torch.equal(p, before[n]) for n, p in groups[name])


# --- scripts/pretrain.py -----------------------------------------------------------------------------------------


@pytest.fixture
def pretrain_script():
    spec = importlib.util.spec_from_file_location("rtd_training_test_pretrain", REPO_ROOT / "scripts" / "pretrain.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # HfArgumentParser resolves the dataclass annotations through sys.modules
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def parse(script, *extra):
    parser = HfArgumentParser((script.PretrainingArguments, TrainingArguments))
    return parser.parse_args_into_dataclasses(args=["--tokenizer", "t", "--train_files", "f", "--output_dir", "o",
                                                    "--use_cpu", "--max_grad_norm", "1.0", *extra])


def test_pretrain_script_trains_rtd_decoupled_by_default(pretrain_script):
    args, train_args = parse(pretrain_script)
    assert args.rtd_training == "decoupled"
    optimizer = pretrain_script.rtd_optimizer(args, train_args, rtd_model())
    assert {group["rtd_model"] for group in optimizer.param_groups} == {GENERATOR, DISCRIMINATOR}
    assert train_args.max_grad_norm == 0 and {group["max_grad_norm"] for group in optimizer.param_groups} == {1.0}

    args, train_args = parse(pretrain_script, "--rtd-training", "decoupled", "--discriminator_learning_rate", "2e-4")
    optimizer = pretrain_script.rtd_optimizer(args, train_args, rtd_model())
    assert {(g["rtd_model"], g["lr"]) for g in optimizer.param_groups} == {(GENERATOR, train_args.learning_rate),
                                                                            (DISCRIMINATOR, 2e-4)}

    args, train_args = parse(pretrain_script, "--rtd_training", "joint")
    assert pretrain_script.rtd_optimizer(args, train_args, rtd_model()) is None and train_args.max_grad_norm == 1.0
    args, train_args = parse(pretrain_script, "--rtd_training", "joint", "--generator_learning_rate", "1e-3")
    with pytest.raises(ValueError, match="decoupled"):
        pretrain_script.rtd_optimizer(args, train_args, rtd_model())


def test_pretrain_script_runs_decoupled_end_to_end(pretrain_script, tmp_path, monkeypatch):
    """main() with no RTD option: the Trainer gets the decoupled optimizer, logs each model's norm and rate."""
    import datasets
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets-cache")
    words = "the king and queen walked through the garden where roses were growing in the morning".split()
    generator = torch.Generator().manual_seed(0)
    lines = [" ".join(words[int(i)] for i in torch.randint(len(words), (12,), generator=generator)) for _ in range(40)]
    (tmp_path / "train.txt").write_text("\n".join(lines) + "\n")
    backend = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.train_from_iterator(lines, trainers.WordLevelTrainer(special_tokens=["[PAD]", "[CLS]", "[SEP]", "[UNK]",
                                                                                 "[MASK]"]))
    backend.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                           special_tokens=[("[CLS]", 1), ("[SEP]", 2)])
    PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
                            unk_token="[UNK]", mask_token="[MASK]").save_pretrained(tmp_path / "tokenizer")
    trainer = pretrain_script.main([
        "--objective", "rtd", "--model_preset", "tiny", "--tokenizer", str(tmp_path / "tokenizer"),
        "--train_files", str(tmp_path / "train.txt"), "--validation_split_percentage", "0", "--max_seq_length", "16",
        "--per_device_train_batch_size", "4", "--max_steps", "2", "--logging_steps", "1", "--use_cpu",
        "--report_to", "none", "--disable_tqdm", "true", "--save_strategy", "no", "--dataloader_num_workers", "0",
        "--discriminator_learning_rate", "3e-5", "--output_dir", str(tmp_path / "out")])
    optimizer = trainer.optimizer.optimizer  # inside accelerate's wrapper
    assert {group["rtd_model"] for group in optimizer.param_groups} == {GENERATOR, DISCRIMINATOR}
    assert trainer.args.max_grad_norm == 0
    logged = trainer.state.log_history[0]
    assert {"generator_grad_norm", "discriminator_grad_norm", "train_rtd_loss"} <= logged.keys()
    assert logged["discriminator_learning_rate"] < logged["generator_learning_rate"]
