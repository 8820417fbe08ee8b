"""Replaced-token-detection pretraining (DebertaCustomForRTDPreTraining): embedding sharing (gdes / es / none), label
construction, sampling, loss terms, export of the discriminator, saving and Auto loading."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from helpers import CHILD_SCRIPTS, SHARED_DATA, perturb_parameters, random_batch, requires_shared_data, tiny_config
from transformers import AutoModelForPreTraining

from modeling_deberta_custom import (
    DebertaCustomForReplacedTokenDetection,
    DebertaCustomForRTDPreTraining,
    DebertaCustomForSequenceClassification,
    DebertaCustomModel,
)
from modeling_deberta_custom.modeling_rtd import DebertaCustomSharedEmbedding, rtd_generator_config

MASK_ID = 4


def masked_batch(vocab_size, batch=4, length=16, rate=0.3, seed=0):
    """A batch as the masking collator makes it: ~rate of the real tokens replaced by MASK_ID, labels = original ids
    there and -100 elsewhere; row 1 right-padded."""
    input_ids, attention_mask = random_batch(vocab_size, batch=batch, length=length, seed=seed)
    generator = torch.Generator().manual_seed(seed + 1)
    masked = (torch.rand(input_ids.shape, generator=generator) < rate) & attention_mask.bool()
    masked[0, 1] = True  # never an empty selection
    labels = torch.where(masked, input_ids, torch.full_like(input_ids, -100))
    return dict(input_ids=input_ids.masked_fill(masked, MASK_ID), attention_mask=attention_mask, labels=labels)


def rtd_model(**overrides):
    torch.manual_seed(0)
    return DebertaCustomForRTDPreTraining(tiny_config(**overrides))


def generator_tables(model):
    embeddings = model.generator.deberta.embeddings
    return embeddings.word_embeddings.weight, embeddings.position_embeddings.weight


# ----------------------------------------------------------------------------------------------------------------------
# Structure and embedding sharing
# ----------------------------------------------------------------------------------------------------------------------


def test_generator_config_defaults_to_half_depth_and_same_width():
    config = tiny_config(num_hidden_layers=4)
    generator = rtd_generator_config(config)
    assert generator.num_hidden_layers == 2
    assert (generator.hidden_size, generator.num_attention_heads, generator.intermediate_size) == (
        config.hidden_size, config.num_attention_heads, config.intermediate_size)
    assert rtd_generator_config(tiny_config(num_hidden_layers=1)).num_hidden_layers == 1
    custom = rtd_generator_config(tiny_config(rtd_generator_num_layers=3, rtd_generator_intermediate_size=20,
                                              rtd_generator_num_attention_heads=2))
    assert (custom.num_hidden_layers, custom.intermediate_size, custom.num_attention_heads) == (3, 20, 2)
    model = rtd_model(num_hidden_layers=4)
    assert len(model.generator.deberta.encoder.layer) == 2 and len(model.deberta.encoder.layer) == 4


def test_sharing_needs_equal_widths():
    with pytest.raises(ValueError, match="rtd_embedding_sharing"):
        rtd_model(rtd_generator_hidden_size=16, rtd_generator_num_attention_heads=2)
    model = rtd_model(rtd_generator_hidden_size=16, rtd_generator_num_attention_heads=2, rtd_embedding_sharing="none")
    assert model.generator.config.hidden_size == 16
    assert model(**masked_batch(model.config.vocab_size)).loss.isfinite()


def test_state_dict_names_follow_the_official_layout():
    names = set(rtd_model().state_dict())
    assert "deberta.encoder.layer.0.attention.self.query_proj.weight" in names
    assert {"mask_predictions.dense.weight", "mask_predictions.LayerNorm.weight", "mask_predictions.classifier.weight"} <= names
    assert "generator.lm_predictions.lm_head.dense.weight" in names
    assert "generator.deberta.embeddings.word_embeddings.weight" in names
    # gdes: the discriminator keeps deltas, not tables; es: nothing of its own; none: its own tables
    assert {"deberta.embeddings.word_embeddings.delta", "deberta.embeddings.position_embeddings.delta"} <= names
    assert "deberta.embeddings.word_embeddings.weight" not in names
    es_names = set(rtd_model(rtd_embedding_sharing="es").state_dict())
    assert not any(k.startswith(("deberta.embeddings.word_embeddings", "deberta.embeddings.position_embeddings"))
                   for k in es_names)
    none_names = set(rtd_model(rtd_embedding_sharing="none").state_dict())
    assert "deberta.embeddings.word_embeddings.weight" in none_names


@pytest.mark.parametrize("build", ["init", "from_config"])
def test_gdes_delta_starts_at_zero_and_discriminator_sees_generator_embeddings(build):
    config = tiny_config()
    model = DebertaCustomForRTDPreTraining(config) if build == "init" else AutoModelForPreTraining.from_config(config)
    assert isinstance(model, DebertaCustomForRTDPreTraining)
    embeddings = model.deberta.embeddings
    for shared, table in zip((embeddings.word_embeddings, embeddings.position_embeddings), generator_tables(model),
                             strict=True):
        assert isinstance(shared, DebertaCustomSharedEmbedding) and shared.mode == "gdes"
        assert torch.count_nonzero(shared.delta) == 0
        assert torch.equal(shared.weight, table)
    ids = torch.randint(0, config.vocab_size, (2, 7))
    assert torch.equal(embeddings.word_embeddings(ids), F.embedding(ids, generator_tables(model)[0]))


def test_no_sharing_gives_the_discriminator_its_own_tables():
    model = rtd_model(rtd_embedding_sharing="none")
    assert isinstance(model.deberta.embeddings.word_embeddings, torch.nn.Embedding)
    assert not torch.equal(model.deberta.embeddings.word_embeddings.weight, generator_tables(model)[0])


@pytest.mark.parametrize("position_biased_input", [False, True])
@pytest.mark.parametrize("mode", ["gdes", "es", "none"])
def test_rtd_loss_gradient_on_generator_embeddings(mode, position_biased_input):
    """gdes: the RTD loss gives the generator's tables exactly zero gradient (its deltas take it); es: the shared
    tables get it; the rest of the generator never gets any (replacements are sampled without gradient)."""
    model = rtd_model(rtd_embedding_sharing=mode, position_biased_input=position_biased_input)
    perturb_parameters(model)
    model.train()
    model.zero_grad()
    model(**masked_batch(model.config.vocab_size)).rtd_loss.backward()
    word, position = generator_tables(model)

    def is_zero(parameter):
        return parameter.grad is None or torch.count_nonzero(parameter.grad) == 0

    for name, parameter in model.generator.named_parameters():
        if "word_embeddings" in name or (position_biased_input and "position_embeddings" in name):
            continue
        assert is_zero(parameter), f"{name} got gradient from the RTD loss"
    if mode == "es":
        assert not is_zero(word)
        assert is_zero(position) != position_biased_input  # the table only matters when positions are at the input
    else:
        assert is_zero(word) and is_zero(position)
    if mode == "gdes":
        embeddings = model.deberta.embeddings
        assert not is_zero(embeddings.word_embeddings.delta)
        assert is_zero(embeddings.position_embeddings.delta) != position_biased_input


def test_mlm_loss_does_not_reach_the_discriminator():
    model = rtd_model()
    perturb_parameters(model)
    model.train()
    model(**masked_batch(model.config.vocab_size)).mlm_loss.backward()
    for name, parameter in model.named_parameters():
        if not name.startswith("generator."):
            assert parameter.grad is None or torch.count_nonzero(parameter.grad) == 0, name
    assert torch.count_nonzero(generator_tables(model)[0].grad) > 0


def test_gdes_training_step_leaves_generator_table_to_the_mlm_loss():
    """One optimizer step on the RTD loss alone moves the delta and leaves the generator's table unchanged."""
    model = rtd_model()
    model.train()
    word_before = generator_tables(model)[0].detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    model(**masked_batch(model.config.vocab_size)).rtd_loss.backward()
    optimizer.step()
    assert torch.equal(generator_tables(model)[0], word_before)
    assert torch.count_nonzero(model.deberta.embeddings.word_embeddings.delta) > 0


# ----------------------------------------------------------------------------------------------------------------------
# One forward pass: labels, sampling, loss terms
# ----------------------------------------------------------------------------------------------------------------------


def test_replaced_token_labels_hand_built():
    """Masked positions hold the generator's samples; a sample equal to the original is not a replacement; a masked
    position whose input carried a random token (the 10% case) counts against the original, not that input; padding
    is -100; [CLS]/[SEP] are ordinary non-replaced tokens."""
    model = rtd_model()
    model.eval()
    input_ids = torch.tensor([[1, 10, MASK_ID, MASK_ID, 77, 2], [1, MASK_ID, 21, 2, 0, 0]])
    attention_mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    labels = torch.full_like(input_ids, -100)
    labels[0, 2], labels[0, 3], labels[0, 4], labels[1, 1] = 11, 12, 13, 20
    samples = torch.tensor([11, 50, 13, 30])  # one per masked position, in row-major order
    model.sample_replacements = lambda logits: samples
    out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    assert out.discriminator_input_ids.tolist() == [[1, 10, 11, 50, 13, 2], [1, 30, 21, 2, 0, 0]]
    assert out.rtd_labels.tolist() == [[0, 0, 0, 1, 0, 0], [0, 1, 0, 0, -100, -100]]
    assert out.replaced_fraction.item() == pytest.approx(2 / 4)
    counted = out.rtd_labels != -100
    expected = F.binary_cross_entropy_with_logits(out.logits[counted], out.rtd_labels[counted].float())
    torch.testing.assert_close(out.rtd_loss, expected)
    manual_accuracy = ((out.logits[counted] > 0).long() == out.rtd_labels[counted]).float().mean()
    assert torch.equal(out.discriminator_accuracy, manual_accuracy)
    # The discriminator logits are those of the corrupted input.
    assert torch.equal(out.logits, model.discriminator_logits(out.discriminator_input_ids, attention_mask))


def test_every_loss_term_is_returned_and_combined():
    model = rtd_model(rtd_loss_weight=10.0)
    model.train()
    batch = masked_batch(model.config.vocab_size)
    out = model(**batch)
    for name in ("loss", "mlm_loss", "rtd_loss", "generator_accuracy", "discriminator_accuracy", "replaced_fraction",
                 "logits", "rtd_labels", "discriminator_input_ids", "generator_logits"):
        assert getattr(out, name) is not None, name
    assert torch.equal(out.loss, out.mlm_loss + 10.0 * out.rtd_loss)
    masked = batch["labels"] != -100
    count = int(masked.sum())
    assert out.generator_logits.shape == (count, model.config.vocab_size)  # eager: exactly the masked positions
    assert torch.equal(out.generator_positions, masked.flatten().nonzero()[:, 0])  # in row-major order
    generator_logits = out.generator_logits[:count]
    targets = batch["labels"][masked]
    torch.testing.assert_close(out.generator_accuracy, (generator_logits.argmax(-1) == targets).float().mean())
    assert 0.0 <= out.discriminator_accuracy.item() <= 1.0
    # Unmasked positions keep their input; the MLM term is the generator's own masked-LM loss.
    assert torch.equal(out.discriminator_input_ids[~masked], batch["input_ids"][~masked])
    standalone = model.generator(**batch)
    assert torch.allclose(out.mlm_loss, standalone.loss, atol=1e-6)
    assert torch.allclose(out.generator_logits, standalone.logits, atol=1e-5)  # both [M, V] at the same positions
    as_tuple = model(**batch, return_dict=False)
    assert isinstance(as_tuple, tuple) and as_tuple[0].shape == ()


def test_mlm_term_matches_the_generator_in_eval_mode():
    """In eval mode the generator's logits are still computed at masked positions only, with the same values."""
    model = rtd_model()
    perturb_parameters(model)
    model.eval()
    batch = masked_batch(model.config.vocab_size)
    out = model(**batch)
    dense = model.generator(**batch)
    masked = batch["labels"] != -100
    assert torch.allclose(out.generator_logits[:int(masked.sum())], dense.logits[masked], atol=1e-5)
    assert torch.allclose(out.mlm_loss, dense.loss, atol=1e-6)


def test_without_labels_only_the_discriminator_runs():
    model = rtd_model()
    model.eval()
    input_ids, attention_mask = random_batch(model.config.vocab_size)
    out = model(input_ids=input_ids, attention_mask=attention_mask)
    assert out.loss is None and out.logits.shape == input_ids.shape
    assert torch.equal(out.logits, model.discriminator_logits(input_ids, attention_mask))


def test_sampling_at_tiny_temperature_is_argmax():
    model = rtd_model(rtd_sampling_temperature=1e-6)
    logits = torch.randn(500, 40) * 3
    assert torch.equal(model.sample_replacements(logits), logits.argmax(-1))


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_sampled_token_frequencies_match_the_softmax(temperature):
    """Chi-square goodness of fit of 40k draws from one row of logits against softmax(logits / T)."""
    from scipy.stats import chi2

    model = rtd_model(rtd_sampling_temperature=temperature)
    row = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, 1.5, 0.2])
    draws = 40_000
    samples = model.sample_replacements(row.expand(draws, -1))
    observed = torch.bincount(samples, minlength=row.numel()).double()
    expected = torch.softmax(row.double() / temperature, -1) * draws
    statistic = ((observed - expected) ** 2 / expected).sum().item()
    assert statistic < chi2.ppf(1 - 1e-4, df=row.numel() - 1)
    # and the temperature matters: at T=1 vs T=2 the distributions differ beyond sampling noise
    other = torch.softmax(row.double() / (3.0 - temperature), -1) * draws
    assert ((observed - other) ** 2 / other).sum().item() > chi2.ppf(1 - 1e-4, df=row.numel() - 1)


def test_sampling_has_no_gradient_and_batches_without_masks_work():
    model = rtd_model()
    logits = torch.randn(5, model.config.vocab_size, requires_grad=True)
    assert not model.sample_replacements(logits).requires_grad
    batch = masked_batch(model.config.vocab_size)
    batch["input_ids"] = torch.where(batch["labels"] != -100, batch["labels"], batch["input_ids"])
    batch["labels"] = torch.full_like(batch["labels"], -100)
    out = model(**batch)
    assert out.mlm_loss.item() == 0.0 and out.rtd_labels.max() <= 0 and out.loss.isfinite()


# ----------------------------------------------------------------------------------------------------------------------
# Export, saving and loading
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["gdes", "es", "none"])
def test_exported_discriminator_reproduces_the_pretraining_model(mode, tmp_path):
    model = rtd_model(rtd_embedding_sharing=mode)
    perturb_parameters(model)  # deltas non-zero: the merge matters
    model.eval()
    batch = masked_batch(model.config.vocab_size)
    out = model(**batch)
    corrupted, attention_mask = out.discriminator_input_ids, batch["attention_mask"]
    folder = tmp_path / "discriminator"
    model.export_discriminator(folder)

    state = DebertaCustomForReplacedTokenDetection.from_pretrained(folder).state_dict()
    assert not any(k.endswith(".delta") for k in state)
    expected_word = generator_tables(model)[0] + (model.deberta.embeddings.word_embeddings.delta if mode == "gdes" else 0)
    if mode != "none":
        assert torch.equal(state["deberta.embeddings.word_embeddings.weight"], expected_word)

    discriminator = DebertaCustomForReplacedTokenDetection.from_pretrained(folder)
    assert torch.equal(discriminator(corrupted, attention_mask).logits, out.logits)
    hidden = model.deberta(corrupted, attention_mask).last_hidden_state
    assert torch.equal(DebertaCustomModel.from_pretrained(folder)(corrupted, attention_mask).last_hidden_state, hidden)
    classifier = DebertaCustomForSequenceClassification.from_pretrained(folder, num_labels=3)
    assert torch.equal(classifier.deberta(corrupted, attention_mask).last_hidden_state, hidden)
    assert classifier(corrupted, attention_mask).logits.shape == (corrupted.shape[0], 3)
    in_memory = model.discriminator_for_finetuning()
    assert torch.equal(in_memory(corrupted, attention_mask).logits, out.logits)
    # The folder is Hub-ready: code files for trust_remote_code, full auto_map.
    assert (folder / "modeling_deberta_custom.py").exists()
    assert "AutoModelForSequenceClassification" in json.loads((folder / "config.json").read_text())["auto_map"]


def test_official_format_export_loads_here_and_in_transformers(tmp_path):
    from transformers import DebertaV2Model

    model = rtd_model()
    perturb_parameters(model)
    model.eval()
    input_ids, attention_mask = random_batch(model.config.vocab_size)
    hidden = model.deberta(input_ids, attention_mask).last_hidden_state
    model.export_discriminator(tmp_path, official_format=True)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "deberta-v2"
    ours = DebertaCustomForReplacedTokenDetection.from_pretrained(tmp_path)
    assert torch.equal(ours.deberta(input_ids, attention_mask).last_hidden_state, hidden)
    assert torch.equal(ours(input_ids, attention_mask).logits, model.discriminator_logits(input_ids, attention_mask))
    theirs = DebertaV2Model.from_pretrained(tmp_path).eval()
    real = attention_mask.bool()
    with torch.no_grad():
        reference = theirs(input_ids, attention_mask=attention_mask).last_hidden_state
    torch.testing.assert_close(reference[real], hidden[real], atol=1e-5, rtol=1e-5)


def test_save_and_load_with_auto_model_for_pretraining(tmp_path):
    model = rtd_model()
    perturb_parameters(model)
    model.eval()
    model.save_pretrained(tmp_path)
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModelForPreTraining"] == "modeling_rtd.DebertaCustomForRTDPreTraining"
    assert auto_map["AutoModelForMaskedLM"] == "modeling_deberta_custom.DebertaCustomForMaskedLM"
    assert (tmp_path / "modeling_rtd.py").exists() and (tmp_path / "modeling_deberta_custom.py").exists()
    loaded = AutoModelForPreTraining.from_pretrained(tmp_path)
    assert type(loaded) is DebertaCustomForRTDPreTraining
    original, reloaded = model.state_dict(), loaded.state_dict()
    assert original.keys() == reloaded.keys()
    assert all(torch.equal(original[k], reloaded[k]) for k in original)
    input_ids, attention_mask = random_batch(model.config.vocab_size)
    assert torch.equal(loaded(input_ids, attention_mask).logits, model(input_ids, attention_mask).logits)
    # The shared tables still point at the loaded generator's.
    assert torch.equal(loaded.deberta.embeddings.word_embeddings.weight,
                       loaded.generator.deberta.embeddings.word_embeddings.weight
                       + loaded.deberta.embeddings.word_embeddings.delta)


def test_pretraining_folder_and_export_load_as_remote_code(tmp_path):
    """Where the package cannot be imported, AutoModelForPreTraining loads the pretraining folder and
    AutoModelForSequenceClassification the exported discriminator from the folders' own code files."""
    model = rtd_model()
    perturb_parameters(model)
    model.eval()
    model.save_pretrained(tmp_path / "pretraining")
    model.export_discriminator(tmp_path / "discriminator")
    input_ids, attention_mask = random_batch(model.config.vocab_size)
    torch.save({"input_ids": input_ids, "attention_mask": attention_mask}, tmp_path / "data.pt")
    result = subprocess.run(
        [sys.executable, str(CHILD_SCRIPTS / "load_rtd_remote_code.py"), str(tmp_path / "pretraining"),
         str(tmp_path / "discriminator"), str(tmp_path / "data.pt")],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
        env=dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "modules"), OMP_NUM_THREADS="1"),
    )
    assert result.returncode == 0, result.stderr[-4000:]
    out = torch.load(tmp_path / "data.pt.out")
    assert all(module.startswith("transformers_modules") for module in out["modules"]), out["modules"]
    with torch.no_grad():
        assert torch.equal(out["rtd_logits"], model(input_ids, attention_mask).logits)
        assert torch.equal(out["hidden"], model.deberta(input_ids, attention_mask).last_hidden_state)


@pytest.mark.parametrize("mode", ["gdes", "none"])
def test_pretraining_continues_from_an_exported_discriminator(mode, tmp_path):
    model = rtd_model()
    perturb_parameters(model)
    model.export_discriminator(tmp_path)
    exported = DebertaCustomForReplacedTokenDetection.from_pretrained(tmp_path)
    resumed = DebertaCustomForRTDPreTraining.from_discriminator(tmp_path, rtd_embedding_sharing=mode)
    resumed.eval()  # as `exported` (from_pretrained): CPU attention picks its kernel by module.training
    input_ids, attention_mask = random_batch(model.config.vocab_size)
    assert torch.equal(resumed.discriminator_logits(input_ids, attention_mask), exported(input_ids, attention_mask).logits)
    if mode == "gdes":
        assert torch.count_nonzero(resumed.deberta.embeddings.word_embeddings.delta) == 0
        assert torch.equal(generator_tables(resumed)[0], exported.deberta.embeddings.word_embeddings.weight)
    assert resumed(**masked_batch(model.config.vocab_size)).loss.isfinite()


@requires_shared_data
def test_pretraining_starts_from_the_original_implementations_discriminator():
    """The reference RTD discriminator (official layout, outputs of the original DeBERTa code) as the starting point:
    the discriminator inside the pretraining model reproduces the original logits."""
    from safetensors.torch import load_file

    folder = SHARED_DATA / "reference" / "rtd_discriminator"
    io = load_file(folder / "io.safetensors")
    model = DebertaCustomForRTDPreTraining.from_discriminator(folder).eval()
    with torch.no_grad():
        logits = model.discriminator_logits(io["input_ids"], io["attention_mask"])
    real = io["attention_mask"].bool()
    torch.testing.assert_close(logits[real], io["expected_logits"][real], atol=1e-5, rtol=1e-5)
