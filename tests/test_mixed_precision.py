"""Mixed precision: masked-LM pretraining with the Enhanced Mask Decoder under bf16 autocast tracks the fp32 loss curve
within the curve's own noise, and no precision (fp32, bf16, fp16; cast or autocast) gives NaN or inf for fully padded
rows or sequences longer than the bucket range and max_position_embeddings, forward or backward. fp16 training with
the gradient scaler is checked on CUDA when a GPU is present."""

import math

import pytest
import torch
from helpers import perturb_parameters, tiny_config

from modeling_deberta_custom import (
    DebertaCustomForMaskedLM,
    DebertaCustomForSequenceClassification,
    DebertaCustomModel,
)

VOCAB, BATCH, LENGTH, STEPS, WINDOW = 96, 16, 32, 200, 20
PAD_ID, MASK_ID = 0, 4


def synthetic_mlm_batches(steps=STEPS, seed=0):
    """Sequences from a fixed Markov chain (each token has 3 likely successors, so there is something to learn),
    right-padded to random lengths, 15% of real tokens masked. Precomputed so every run sees the same batches."""
    generator = torch.Generator().manual_seed(seed)
    successors = torch.randint(5, VOCAB, (VOCAB, 3), generator=generator)
    batches = []
    for _ in range(steps):
        ids = torch.empty(BATCH, LENGTH, dtype=torch.long)
        ids[:, 0] = torch.randint(5, VOCAB, (BATCH,), generator=generator)
        for t in range(1, LENGTH):
            ids[:, t] = successors[ids[:, t - 1], torch.randint(0, 3, (BATCH,), generator=generator)]
        lengths = torch.randint(LENGTH // 2, LENGTH + 1, (BATCH,), generator=generator)
        attention_mask = (torch.arange(LENGTH)[None] < lengths[:, None]).long()
        ids = ids.masked_fill(attention_mask == 0, PAD_ID)
        masked = (torch.rand(BATCH, LENGTH, generator=generator) < 0.15) & attention_mask.bool()
        labels = torch.where(masked, ids, torch.full_like(ids, -100))
        batches.append((ids.masked_fill(masked, MASK_ID), attention_mask, labels))
    return batches


def pretrain(batches, autocast_dtype=None, device="cpu", scaler=None):
    """Masked-LM steps with EMD (dropout on, fixed seed); returns the per-step losses and the model."""
    torch.manual_seed(0)
    config = tiny_config(vocab_size=VOCAB, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    model = DebertaCustomForMaskedLM(config).to(device).train()
    assert model.config.uses_enhanced_mask_decoder
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for input_ids, attention_mask, labels in batches:
        input_ids, attention_mask, labels = (t.to(device) for t in (input_ids, attention_mask, labels))
        with torch.autocast(device, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return torch.tensor(losses, dtype=torch.float64), model


def moving_average(values, window=WINDOW):
    return values.unfold(0, window, 1).mean(-1)


def compare_curves(reference, other):
    """Tolerance from the data: the step-to-step noise of the reference curve (std of its residuals about its moving
    average) over sqrt(window) is the standard error of a smoothed point; the smoothed curves must agree within
    twice that everywhere. Also checks that the run learned (smoothed loss fell by ten standard errors)."""
    smooth_reference, smooth_other = moving_average(reference), moving_average(other)
    noise = float((reference[WINDOW - 1:] - smooth_reference).std())
    tolerance = 2 * noise / math.sqrt(WINDOW)
    gap = float((smooth_other - smooth_reference).abs().max())
    return gap, tolerance, float(smooth_other[0] - smooth_other[-1]), noise


def test_bf16_autocast_pretraining_tracks_fp32():
    batches = synthetic_mlm_batches()
    fp32_losses, _ = pretrain(batches)

    # A probe step shows that the encoder really computes in bf16 under autocast.
    seen_dtypes = set()
    probe = DebertaCustomForMaskedLM(tiny_config(vocab_size=VOCAB)).train()
    probe.deberta.encoder.layer[0].attention.self.query_proj.register_forward_hook(
        lambda module, args, output: seen_dtypes.add(output.dtype)
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        probe(input_ids=batches[0][0], attention_mask=batches[0][1], labels=batches[0][2])
    assert seen_dtypes == {torch.bfloat16}

    bf16_losses, model = pretrain(batches, torch.bfloat16)
    assert torch.isfinite(fp32_losses).all() and torch.isfinite(bf16_losses).all()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    gap, tolerance, learned, noise = compare_curves(fp32_losses, bf16_losses)
    print(f"fp32 {fp32_losses[:WINDOW].mean():.3f} -> {fp32_losses[-WINDOW:].mean():.3f}; bf16 "
          f"{bf16_losses[:WINDOW].mean():.3f} -> {bf16_losses[-WINDOW:].mean():.3f}; max smoothed gap {gap:.4f}, "
          f"tolerance {tolerance:.4f} (step noise {noise:.4f})")
    assert gap <= tolerance, (gap, tolerance)
    assert learned > 10 * noise / math.sqrt(WINDOW), learned


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 with the gradient scaler needs CUDA")
def test_fp16_autocast_with_grad_scaler_on_cuda_tracks_fp32():
    batches = synthetic_mlm_batches()
    fp32_losses, _ = pretrain(batches, device="cuda")
    fp16_losses, model = pretrain(batches, torch.float16, device="cuda", scaler=torch.amp.GradScaler("cuda"))
    assert torch.isfinite(fp16_losses).all()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    gap, tolerance, learned, noise = compare_curves(fp32_losses, fp16_losses)
    assert gap <= tolerance, (gap, tolerance)
    assert learned > 10 * noise / math.sqrt(WINDOW), learned


# ----------------------------------------------------------------------------------------------------------------------
# No NaN: fully padded rows, long sequences, every precision, forward and backward
# ----------------------------------------------------------------------------------------------------------------------

PRECISIONS = {
    "fp32": (torch.float32, None),
    "bf16": (torch.bfloat16, None),
    "fp16": (torch.float16, None),
    "bf16-autocast": (torch.float32, torch.bfloat16),
    "fp16-autocast": (torch.float32, torch.float16),
}


def _cpu_supports(dtype, autocast_dtype):
    if autocast_dtype is not None and not torch.amp.is_autocast_available("cpu"):
        return False
    try:
        with torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
            torch.nn.functional.layer_norm(torch.ones(2, 4, dtype=dtype), (4,)) @ torch.ones(4, 4, dtype=dtype)
    except RuntimeError:
        return False
    return True


def padded_batch(vocab_size, length, all_padded=False):
    """Row 0 full, row 1 half padding, row 2 only padding (or every row padding)."""
    generator = torch.Generator().manual_seed(length)
    input_ids = torch.randint(5, vocab_size, (3, length), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, length // 2:] = 0
    attention_mask[2] = 0
    if all_padded:
        attention_mask[:] = 0
    return input_ids.masked_fill(attention_mask == 0, PAD_ID), attention_mask


CASES = {
    # model class, lengths (past the 8 buckets; past max_position_embeddings=64 where positions are relative only)
    "base": (DebertaCustomModel, (40, 130)),
    "sequence-classification": (DebertaCustomForSequenceClassification, (130,)),
    "masked-lm-emd": (DebertaCustomForMaskedLM, (64,)),
}


def _loss(name, model, input_ids, attention_mask):
    if name == "base":
        output = model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return output, output.float().pow(2).mean()
    if name == "sequence-classification":
        output = model(input_ids=input_ids, attention_mask=attention_mask, labels=torch.tensor([0, 1, 1]))
        return output.logits, output.loss
    labels = torch.full_like(input_ids, -100)
    labels[0, ::3] = input_ids[0, ::3]  # labels in row 0 only; rows 1 and 2 carry padding
    output = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    return output.logits, output.loss


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("precision", list(PRECISIONS))
@pytest.mark.parametrize("case", list(CASES))
def test_no_nan_with_padded_rows_and_long_sequences(case, precision, implementation):
    dtype, autocast_dtype = PRECISIONS[precision]
    if not _cpu_supports(dtype, autocast_dtype):
        pytest.skip(f"{precision} is not supported on this CPU")
    model_class, lengths = CASES[case]
    model = model_class(tiny_config(num_labels=2)).train()  # dropout is 0 in the tiny config; train-mode paths
    perturb_parameters(model, scale=0.2)
    model.config._attn_implementation = implementation
    model.to(dtype)
    for length in lengths:
        for all_padded in (False, True):
            input_ids, attention_mask = padded_batch(model.config.vocab_size, length, all_padded)
            with torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
                output, loss = _loss(case, model, input_ids, attention_mask)
            assert torch.isfinite(output).all(), (length, all_padded, "forward")
            assert torch.isfinite(loss), (length, all_padded, "loss")
            loss.backward()
            for name, parameter in model.named_parameters():
                if parameter.grad is not None:
                    assert torch.isfinite(parameter.grad).all(), (length, all_padded, name)
            model.zero_grad(set_to_none=True)
