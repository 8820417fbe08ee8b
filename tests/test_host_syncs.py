"""No host read of device data in the forward pass and the training step of any head, but one documented read.

A read of an accelerator tensor on the host (`.item()`, `int()`, `bool()`, boolean indexing, `nonzero`) waits for the
device to finish: one stall of its stream per read, every step. Two complementary checks:

  * the meta device: tensors without data, so any read of their values raises. Models and inputs are built on
    `torch.device("meta")` and run an inference forward and a training step (forward, loss, backward).
  * a dispatch mode on CPU that records every operation that reads values on the host, with where it came from.
    On CPU the input checks (id ranges, label values, mask values) do read, as they are free there; nothing else may.

The one read by design: a masked-LM training step in eager mode (DebertaCustomForMaskedLM, and the generator of
DebertaCustomForRTDPreTraining) selects the labelled positions with `nonzero` (losses.prediction_positions), so
that the vocabulary projection runs on exactly those rows and no batch exceeds a budget: one read per step, as in
ModernBERT. sparse_mlm_logits=False (dense logits) reads nothing; compiled graphs keep a fixed budget instead.
"""

import traceback

import pytest
import torch
from helpers import random_batch, tiny_config
from torch.utils._python_dispatch import TorchDispatchMode

from modeling_deberta_custom import (
    DebertaCustomForMaskedLM,
    DebertaCustomForMultipleChoice,
    DebertaCustomForQuestionAnswering,
    DebertaCustomForReplacedTokenDetection,
    DebertaCustomForRTDPreTraining,
    DebertaCustomForSequenceClassification,
    DebertaCustomForTokenClassification,
    DebertaCustomModel,
)

aten = torch.ops.aten
# Operations whose result depends on tensor values read back by the host.
HOST_READS = {aten._local_scalar_dense, aten.nonzero, aten.masked_select, aten.masked_scatter, aten.is_nonzero,
              aten.equal, aten.unique_consecutive, aten._unique2, aten.repeat_interleave}
BOOLEAN_INDEXING = {aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_}
# Reads that are free by design: value checks of inputs on CPU tensors (skipped for accelerator tensors), and the
# relative-position bookkeeping, which reads a table it builds on the host (on accelerators it rebuilds it on CPU).
# Reads on accelerators by design: the labelled-position selection of an eager masked-LM step (SELECTION, see
# above), and the sequence layout of an unpadded or packed batch (padding.py), which reads its sizes once per forward
# (tests/test_unpadding.py counts the layouts); on the meta device padded batches take the padded path.
ALLOWED = {"_check_integer_ids", "check_labels", "_check_attention_mask_values", "relative_positions",
           "layout_from_attention_mask", "layout_from_sequence_ids", "check_packing_kwargs"}
SELECTION = "prediction_positions"  # the one read by design (see above)

BATCH, LENGTH, CHOICES = 2, 10, 3  # 10 tokens > position_buckets / 2: the bucketed relative-position path too


class HostReadRecorder(TorchDispatchMode):
    """Records (operation, calling functions) for every host read of tensor values."""

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        packet = func.overloadpacket
        boolean_index = packet in BOOLEAN_INDEXING and any(
            isinstance(index, torch.Tensor) and index.dtype in (torch.bool, torch.uint8) for index in args[1] or ()
            if index is not None)
        if packet in HOST_READS or boolean_index:
            self.reads.append((str(func), {frame.name for frame in traceback.extract_stack()}))
        return func(*args, **(kwargs or {}))

    def outside_checks(self):
        """Reads outside the input checks and the one masked-LM selection read."""
        return [(name, sorted(callers & {"forward", "backward"})) for name, callers in self.reads
                if not callers & (ALLOWED | {SELECTION})]

    def selection_reads(self):
        return [name for name, callers in self.reads if SELECTION in callers]


def selects_labelled_positions(head, train, config):
    """Whether a step of `head` makes the one documented read: an eager masked-LM or RTD training step with sparse
    logits (RTD's generator selects in evaluation too, when given labels; these inference steps have none)."""
    return config.sparse_mlm_logits and train and head in (DebertaCustomForMaskedLM, DebertaCustomForRTDPreTraining)


def head_batch(head, config, device, train):
    """Inputs (and labels in training) for `head`, on `device`; float attention mask for one head."""
    input_ids, attention_mask = random_batch(config.vocab_size, batch=BATCH, length=LENGTH)
    inputs = dict(input_ids=input_ids, attention_mask=attention_mask)
    if head is DebertaCustomForMultipleChoice:
        inputs = {k: v[:, None].expand(-1, CHOICES, -1).contiguous() for k, v in inputs.items()}
    if head is DebertaCustomForTokenClassification:
        inputs["attention_mask"] = attention_mask.float()  # the float-mask check must not read either
    if train:
        if head in (DebertaCustomForSequenceClassification, DebertaCustomForMultipleChoice):
            inputs["labels"] = torch.tensor([1, 0])
        elif head is DebertaCustomForQuestionAnswering:
            inputs.update(start_positions=torch.tensor([1, 3]), end_positions=torch.tensor([2, 30]))
        elif head is DebertaCustomForTokenClassification:
            inputs["labels"] = torch.randint(0, 2, (BATCH, LENGTH)).masked_fill(attention_mask == 0, -100)
        elif head is DebertaCustomForReplacedTokenDetection:
            inputs["labels"] = torch.randint(0, 2, (BATCH, LENGTH))
        else:  # masked-LM and RTD pretraining: a few masked positions
            labels = torch.full_like(input_ids, -100)
            labels[0, 2], labels[1, 1], labels[1, 3] = 5, 6, 7
            inputs["labels"] = labels
    return {k: v.to(device) for k, v in inputs.items()}


HEADS = [
    (DebertaCustomForSequenceClassification, dict(num_labels=2)),
    (DebertaCustomForTokenClassification, dict(num_labels=2)),
    (DebertaCustomForQuestionAnswering, dict(num_labels=2)),
    (DebertaCustomForMultipleChoice, {}),
    (DebertaCustomForMaskedLM, {}),  # the Enhanced Mask Decoder, sparse logits in training
    (DebertaCustomForMaskedLM, dict(position_biased_input=True)),  # no EMD: absolute positions at the input
    (DebertaCustomForReplacedTokenDetection, {}),
    (DebertaCustomForRTDPreTraining, dict(rtd_embedding_sharing="gdes")),
    (DebertaCustomForRTDPreTraining, dict(rtd_embedding_sharing="none")),
]
HEAD_IDS = [f"{head.__name__}{'-' + '-'.join(f'{v}' for v in kw.values()) if kw else ''}" for head, kw in HEADS]


def build(head, device, attn, **overrides):
    config = tiny_config(**{"hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1, **overrides})
    config._attn_implementation = attn
    with torch.device(device):
        torch.manual_seed(0)
        return head(config)


def step(model, inputs, train):
    """An inference forward (no labels, no gradient) or a training step (forward with labels, loss, backward)."""
    model.train(train)
    if not train:
        with torch.no_grad():
            return model(**inputs)
    output = model(**inputs)
    output.loss.backward()
    return output


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("train", [False, True], ids=["inference", "training"])
@pytest.mark.parametrize("head,overrides", HEADS, ids=HEAD_IDS)
def test_no_host_read_on_the_meta_device(head, overrides, train, attn):
    model = build(head, "meta", attn, **overrides)
    inputs = head_batch(head, model.config, "meta", train)
    if head is DebertaCustomForRTDPreTraining and not train:
        inputs.pop("labels", None)
    # Any read raises "cannot be called on meta tensors", but the selection's nonzero, which the meta device answers
    # with a made-up size (every position) when asked to: the recorder counts it.
    with torch.fx.experimental._config.patch(meta_nonzero_assume_all_nonzero=True), HostReadRecorder() as recorder:
        output = step(model, inputs, train)
    assert all(value.device.type == "meta" for value in output.values() if isinstance(value, torch.Tensor))
    assert (output.loss is not None) == train
    expected = ["aten.nonzero.default"] if selects_labelled_positions(head, train, model.config) else []
    assert [name for name, _ in recorder.reads] == expected


def test_no_host_read_in_the_base_model_on_the_meta_device():
    model = build(DebertaCustomModel, "meta", "sdpa")
    inputs = head_batch(DebertaCustomModel, model.config, "meta", False)
    assert step(model, inputs, False).last_hidden_state.shape == (BATCH, LENGTH, model.config.hidden_size)


@pytest.mark.parametrize("train", [False, True], ids=["inference", "training"])
@pytest.mark.parametrize("head,overrides", HEADS, ids=HEAD_IDS)
def test_host_reads_on_cpu_come_only_from_input_checks(head, overrides, train):
    """What meta cannot see (a read of a tensor built on the host, boolean indexing of known size): on CPU every host
    read must come from an input check. The recorder sees the checks' own reads, so it does see reads."""
    model = build(head, "cpu", "sdpa", **overrides)
    inputs = head_batch(head, model.config, "cpu", train)
    with HostReadRecorder() as recorder:
        step(model, inputs, train)
    assert recorder.outside_checks() == []
    assert len(recorder.selection_reads()) == selects_labelled_positions(head, train, model.config)
    assert any(callers & {"_check_integer_ids"} for _, callers in recorder.reads)  # the recorder works


@pytest.mark.parametrize("head", [DebertaCustomForMaskedLM, DebertaCustomForRTDPreTraining],
                         ids=lambda head: head.__name__)
def test_dense_logits_read_nothing_on_the_meta_device(head):
    """sparse_mlm_logits=False: the switch for a run that must never wait for its accelerator (it pays the dense
    vocabulary projection instead)."""
    model = build(head, "meta", "sdpa", sparse_mlm_logits=False)
    inputs = head_batch(head, model.config, "meta", True)
    step(model, inputs, True)  # raises at any read


def test_every_token_labelled_trains_on_cpu():
    """No budget to exceed: a batch labelled at every position, padding included, is a legal batch (labels at padding
    never count, so the logits are those of the real tokens)."""
    model = build(DebertaCustomForMaskedLM, "cpu", "sdpa", hidden_dropout_prob=0.0)
    inputs = head_batch(DebertaCustomForMaskedLM, model.config, "cpu", True)
    inputs["labels"] = inputs["input_ids"].clone()
    output = step(model, inputs, True)
    assert output.logits.shape == (int(inputs["attention_mask"].sum()), model.config.vocab_size)


def test_loss_terms_are_logged_without_a_host_read_per_step():
    """LossTermsCallback sums the terms of each training forward on the device; only on_log (when the Trainer logs)
    reads them."""
    from types import SimpleNamespace

    from modeling_deberta_custom.training.metrics import LossTermsCallback

    model = build(DebertaCustomForRTDPreTraining, "cpu", "sdpa", hidden_dropout_prob=0.0,
                  attention_probs_dropout_prob=0.0)
    callback = LossTermsCallback()
    callback.on_train_begin(None, None, None, model=model)
    inputs = head_batch(DebertaCustomForRTDPreTraining, model.config, "cpu", True)
    outputs = []
    model.train()
    for _ in range(2):
        with HostReadRecorder() as recorder:
            outputs.append(model(**inputs))
        assert recorder.outside_checks() == []  # the hook read nothing
    logs = {"loss": 1.0}
    state = SimpleNamespace(log_history=[], global_step=1)
    callback.on_log(None, state, None, logs=logs)
    callback.on_train_end(None, None, None)
    for name in LossTermsCallback.RTD_TERMS:
        expected = sum(float(getattr(output, name).detach()) for output in outputs) / 2
        assert logs[f"train_{name}"] == pytest.approx(expected, abs=1e-4), name
