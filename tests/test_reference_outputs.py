"""Outputs of the original microsoft/DeBERTa implementation (random weights, official checkpoint layout), kept in
../shared/data/reference (see its README.md): the Enhanced Mask Decoder masked-LM and the RTD discriminator.
Skipped when ../shared/data is absent."""

import pytest
import torch
from helpers import SHARED_DATA, requires_shared_data
from safetensors.torch import load_file

from modeling_deberta_custom import DebertaCustomForMaskedLM, DebertaCustomForReplacedTokenDetection

pytestmark = requires_shared_data

REFERENCE = SHARED_DATA / "reference"
TOLERANCE = 1e-5
ATTENTION = ["eager", "sdpa"]


def max_difference(expected, actual):
    assert expected.shape == actual.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    return (expected - actual).abs().max().item()


@pytest.fixture(scope="module")
def emd_io():
    io = load_file(REFERENCE / "emd_masked_lm" / "io.safetensors")
    # The README's contract: labels are set exactly at the masked positions.
    assert torch.equal(io["labels"] != -100, io["masked_positions"].bool())
    assert io["expected_logits_at_masked"].shape == (int(io["masked_positions"].sum()), 320)
    return io


@pytest.fixture(scope="module")
def rtd_io():
    return load_file(REFERENCE / "rtd_discriminator" / "io.safetensors")


def load_masked_lm(attn, **kwargs):
    model, info = DebertaCustomForMaskedLM.from_pretrained(
        REFERENCE / "emd_masked_lm", attn_implementation=attn, output_loading_info=True, **kwargs
    )
    assert not info["missing_keys"], info  # a list (transformers 4) or a set (5)
    return model


@pytest.mark.parametrize("attn", ATTENTION)
def test_emd_masked_lm_matches_original_in_eval(emd_io, attn):
    model = load_masked_lm(attn)
    assert model.config.uses_enhanced_mask_decoder and model.config.emd_num_passes == 2
    assert not model.training
    with torch.no_grad():
        output = model(input_ids=emd_io["input_ids"], attention_mask=emd_io["attention_mask"], labels=emd_io["labels"])
    masked = emd_io["masked_positions"].bool()
    logits = output.logits[masked]  # [M, V] in row-major order of the masked positions
    difference = max_difference(emd_io["expected_logits_at_masked"], logits)
    assert difference <= TOLERANCE, f"logits at masked positions differ by {difference:.3g}"
    assert abs(output.loss.item() - emd_io["expected_loss"].item()) <= TOLERANCE


@pytest.mark.parametrize("attn", ATTENTION)
def test_emd_masked_lm_matches_original_in_training_with_sparse_logits(emd_io, attn):
    """In training (dropout is 0 in this config) logits are computed only at labelled positions: [M, V]."""
    model = load_masked_lm(attn)
    assert model.config.sparse_mlm_logits
    assert model.config.hidden_dropout_prob == 0 and model.config.attention_probs_dropout_prob == 0
    model.train()
    output = model(input_ids=emd_io["input_ids"], attention_mask=emd_io["attention_mask"], labels=emd_io["labels"])
    expected = emd_io["expected_logits_at_masked"]
    # [K, V] rows, the masked positions first in row-major order (see sparse_prediction_positions)
    difference = max_difference(expected, output.logits.detach()[:expected.shape[0]])
    assert difference <= TOLERANCE, f"sparse logits differ by {difference:.3g}"
    assert abs(output.loss.item() - emd_io["expected_loss"].item()) <= TOLERANCE
    output.loss.backward()  # the training path is differentiable end to end
    assert model.deberta.embeddings.position_embeddings.weight.grad is not None  # EMD reads the absolute table


@pytest.mark.parametrize("attn", ATTENTION)
def test_enhanced_mask_decoder_matters(emd_io, attn):
    """Without EMD (or with one pass instead of two) the logits move far from the reference: the tests above
    would catch a decoder that is skipped or miswired."""
    masked = emd_io["masked_positions"].bool()
    inputs = dict(input_ids=emd_io["input_ids"], attention_mask=emd_io["attention_mask"])
    expected = emd_io["expected_logits_at_masked"]
    for kwargs in ({"use_enhanced_mask_decoder": False}, {"emd_num_passes": 1}):
        model = load_masked_lm(attn, **kwargs)
        with torch.no_grad():
            logits = model(**inputs).logits[masked]
        assert max_difference(expected, logits) > 1e-3, f"{kwargs} did not change the logits"


@pytest.mark.parametrize("attn", ATTENTION)
def test_rtd_discriminator_matches_original(rtd_io, attn):
    model, info = DebertaCustomForReplacedTokenDetection.from_pretrained(
        REFERENCE / "rtd_discriminator", attn_implementation=attn, output_loading_info=True
    )
    assert not info["missing_keys"], info  # a list (transformers 4) or a set (5)
    with torch.no_grad():
        logits = model(input_ids=rtd_io["input_ids"], attention_mask=rtd_io["attention_mask"]).logits
    assert logits.shape == rtd_io["expected_logits"].shape
    valid = rtd_io["attention_mask"].bool()
    difference = max_difference(rtd_io["expected_logits"][valid], logits[valid])
    assert difference <= TOLERANCE, f"per-token logits differ by {difference:.3g}"
