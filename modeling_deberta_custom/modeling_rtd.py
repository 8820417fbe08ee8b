"""Replaced-token-detection pretraining (DeBERTaV3, ELECTRA-style) with gradient-disentangled embedding sharing.

`DebertaCustomForRTDPreTraining` holds a generator (a masked-LM with the Enhanced Mask Decoder) and a discriminator
(the backbone plus the replaced-token-detection head). One forward pass:

    1. the generator predicts the masked tokens (labels != -100)                    -> mlm_loss
    2. replacements are sampled from its softmax at rtd_sampling_temperature, without gradient
    3. the discriminator reads the input with the masked positions holding the samples and says, for every
       non-padding token, whether it differs from the original                        -> rtd_loss
    4. loss = mlm_loss + rtd_loss_weight * rtd_loss

Embedding sharing (config.rtd_embedding_sharing), for the word and the absolute position tables:
    "gdes"  E_D = stop_gradient(E_G) + E_delta, E_delta initialised to zero: the RTD loss trains E_delta only and never
            reaches the generator's table (gradient-disentangled embedding sharing, DeBERTaV3 section 3).
    "es"    E_D = E_G: one table trained by both losses.
    "none"  the discriminator has its own tables.

State-dict names: the discriminator sits at the top under the official names (`deberta.*`, `mask_predictions.*`), as
in the released DeBERTa-v3 checkpoints, so `model.deberta` is the backbone a fine-tuning run starts from; the
generator sits under `generator.*` (`generator.deberta.*`, `generator.lm_predictions.lm_head.*`). Under gdes the
discriminator's tables are `deberta.embeddings.{word,position}_embeddings.delta` (E_delta); under es they are the
generator's (no parameter of their own). `export_discriminator` writes the discriminator with E_G + E_delta merged
as a normal checkpoint (`deberta.embeddings.word_embeddings.weight`, ...) that DebertaCustomModel and every task head
load.

Masking is the data collator's job (modeling_deberta_custom.pretraining.DebertaMaskingCollator, which the pretraining
script configures with rtd_mask_probability): the forward takes the masked `input_ids` and `labels` holding the
original ids at masked positions and -100 elsewhere, as transformers' masked-LM collators produce them.

This file is copied next to the weights by `save_pretrained`, so it imports only torch, transformers and its siblings.
"""

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import ModelOutput

# transformers 4.x copies out of a local folder only the siblings that the auto_map file itself names in `from .x
# import y` lines, not theirs: the attention files are named here for that alone (tests/test_remote_code.py).
from .attention import ATTENTION_FUNCTIONS  # noqa: F401  (see above)
from .attention_cpu import cpu_kernels_apply  # noqa: F401  (see above)
from .configuration_deberta_custom import DebertaCustomConfig
from .loading import merged_shared_table
from .losses import (
    binary_cross_entropy_sum,
    check_labels,
    cross_entropy_sum,
    left_out_labels,
    mean_over_items,
    prediction_positions,
)
from .modeling_deberta_custom import (
    AUTO_MAP,
    DebertaCustomForMaskedLM,
    DebertaCustomForReplacedTokenDetection,
    DebertaCustomModel,
    DebertaCustomPreTrainedModel,
    DebertaCustomRTDHead,
    ignore_padding,
    init,  # the initialisers that match the installed transformers (see modeling_deberta_custom)
)
from .padding import SequenceLayout  # noqa: F401  (named for transformers 4.x, see the attention imports above)

RTD_AUTO_MAP = {**AUTO_MAP, "AutoModelForPreTraining": "modeling_rtd.DebertaCustomForRTDPreTraining"}


def rtd_generator_config(config: DebertaCustomConfig) -> DebertaCustomConfig:
    """The generator's config: the discriminator's, with the rtd_generator_* sizes where they are set. By default the
    generator has the discriminator's width and heads and half its depth (at least one layer)."""
    generator = copy.deepcopy(config)
    generator.auto_map = None
    generator.architectures = None
    generator.num_hidden_layers = config.rtd_generator_num_layers or max(1, config.num_hidden_layers // 2)
    generator.hidden_size = config.rtd_generator_hidden_size or config.hidden_size
    generator.intermediate_size = config.rtd_generator_intermediate_size or config.intermediate_size
    generator.num_attention_heads = config.rtd_generator_num_attention_heads or config.num_attention_heads
    if (generator.hidden_size, generator.num_attention_heads) != (config.hidden_size, config.num_attention_heads):
        generator.attention_head_size = None  # a different width or head count: heads of hidden_size / heads
    generator.validate_fields()
    return generator


class DebertaCustomSharedEmbedding(nn.Module):
    """The discriminator's view of one of the generator's embedding tables (word or absolute position).

    es:   lookups read the generator's table; both losses train it.
    gdes: lookups read stop_gradient(generator table) + delta, computed as two lookups summed (no V x C table is
          materialised); `delta` is a parameter initialised to zero, so the discriminator starts from the generator's
          embedding and only delta receives the discriminator's gradient.
    The generator owns the table: it is referenced here, not registered, so it appears once in the state dict."""

    def __init__(self, source: nn.Embedding, mode: str):
        super().__init__()
        if mode not in ("es", "gdes"):
            raise ValueError(f"Embedding sharing mode must be 'es' or 'gdes', got {mode!r}")
        object.__setattr__(self, "_source", source)  # plain attribute: not a submodule of the discriminator
        self.mode = mode
        self.padding_idx = source.padding_idx
        if mode == "gdes":
            self.delta = nn.Parameter(torch.zeros_like(source.weight))

    @property
    def source(self) -> nn.Embedding:
        return self._source

    @property
    def num_embeddings(self) -> int:
        return self._source.num_embeddings

    @property
    def embedding_dim(self) -> int:
        return self._source.embedding_dim

    @property
    def weight(self) -> torch.Tensor:
        """The effective table the discriminator reads: E_G (es) or stop_gradient(E_G) + delta (gdes)."""
        if self.mode == "gdes":
            return merged_shared_table(self._source.weight.detach(), self.delta)
        return self._source.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.mode == "gdes":  # merged_shared_table looked up row by row: (E_G + E_delta)[ids]
            return (F.embedding(ids, self._source.weight.detach(), self.padding_idx)
                    + F.embedding(ids, self.delta, self.padding_idx))
        return F.embedding(ids, self._source.weight, self.padding_idx)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, mode={self.mode}"


@dataclass
class RTDPreTrainingOutput(ModelOutput):
    """Every term of the RTD objective.

    loss: mlm_loss + rtd_loss_weight * rtd_loss (with num_items_in_batch, the step-normalised form: see forward).
    mlm_loss: the generator's cross-entropy at masked positions.
    rtd_loss: the discriminator's binary cross-entropy over non-padding tokens.
    generator_accuracy: share of masked positions where the generator's argmax is the original token.
    discriminator_accuracy: share of non-padding tokens the discriminator classifies right (logit > 0 = replaced).
    replaced_fraction: share of masked positions whose sampled token differs from the original.
    logits: [B, N] discriminator logits on `discriminator_input_ids`.
    rtd_labels: [B, N] 1 replaced, 0 original, -100 padding.
    discriminator_input_ids: [B, N] the input with the sampled tokens at masked positions.
    generator_logits: [R, V] the generator's logits at `generator_positions`.
    generator_positions: [R] where those logits are, as indices into the flattened [B * N] positions: every masked
        position in row-major order first. Eager: exactly the M masked positions (every position with
        config.sparse_mlm_logits=False); compiled: a budget fixed by the shapes, then unmasked ones, or the first of
        the masked ones when they are more (see `prediction_positions` and config.sparse_mlm_max_fraction).
    """

    loss: torch.FloatTensor | None = None
    mlm_loss: torch.FloatTensor | None = None
    rtd_loss: torch.FloatTensor | None = None
    generator_accuracy: torch.FloatTensor | None = None
    discriminator_accuracy: torch.FloatTensor | None = None
    replaced_fraction: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    rtd_labels: torch.LongTensor | None = None
    discriminator_input_ids: torch.LongTensor | None = None
    generator_logits: torch.FloatTensor | None = None
    generator_positions: torch.LongTensor | None = None


class DebertaCustomForRTDPreTraining(DebertaCustomPreTrainedModel):
    """DeBERTaV3 pretraining: generator (masked-LM with EMD) + discriminator (replaced-token detection), with gdes / es /
    no embedding sharing. `config` describes the discriminator; the generator's sizes come from its rtd_generator_*
    fields (see `rtd_generator_config`).

    forward(input_ids, attention_mask, labels): input_ids are the generator's (masked) input, labels the original ids
    at masked positions and -100 elsewhere. Without labels only the discriminator runs, on input_ids as given."""

    saved_auto_map = RTD_AUTO_MAP
    accepts_loss_kwargs = True  # the Trainer's num_items_in_batch (masked tokens of one optimizer step), see forward
    holds_rtd_generator = True  # its own folders load as they are (the heads merge E_G + E_delta on load instead)

    def __init__(self, config: DebertaCustomConfig):
        super().__init__(config)
        generator_config = rtd_generator_config(config)
        sharing = config.rtd_embedding_sharing
        if sharing != "none":
            mismatched = [name for name in ("word_embedding_size", "vocab_size", "max_position_embeddings")
                          if getattr(generator_config, name) != getattr(config, name)]
            if mismatched:
                raise ValueError(
                    f"rtd_embedding_sharing={sharing!r} needs the generator's and the discriminator's embedding "
                    f"tables to have the same shape, but {mismatched} differ (generator hidden size "
                    f"{generator_config.hidden_size} vs {config.hidden_size}); use rtd_embedding_sharing='none' or "
                    "equal widths"
                )
        # Discriminator under the official names, generator beside it.
        self.deberta = DebertaCustomModel(config)
        self.mask_predictions = DebertaCustomRTDHead(config)
        self.generator = DebertaCustomForMaskedLM(generator_config)
        if sharing != "none":
            generator_embeddings = self.generator.deberta.embeddings
            embeddings = self.deberta.embeddings
            embeddings.word_embeddings = DebertaCustomSharedEmbedding(generator_embeddings.word_embeddings, sharing)
            embeddings.position_embeddings = DebertaCustomSharedEmbedding(
                generator_embeddings.position_embeddings, sharing
            )
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, DebertaCustomSharedEmbedding) and module.mode == "gdes":
            init.zeros_(module.delta)

    def get_input_embeddings(self):
        return self.deberta.embeddings.word_embeddings

    def set_input_embeddings(self, new_embeddings):
        raise NotImplementedError("Resize the vocabulary of the exported discriminator, not of the RTD pretraining model")

    # --- the two networks ----------------------------------------------------------------------------------------

    def generator_predictions(self, input_ids, attention_mask, token_type_ids, position_ids, labels, layout="auto"):
        """The generator's side of one step: (positions [R], logits [R, V] there, summed masked-LM cross-entropy, number
        of masked positions whose argmax is right, input_ids [B, N] with a sample at every masked position).

        Vocabulary logits are computed at the masked positions only (`prediction_positions`; at every position with
        config.sparse_mlm_logits=False), in training and evaluation alike, so that a 128k vocabulary never builds
        [B, N, V]. Compiled, R is a budget fixed by the shapes and masked positions beyond it get their loss,
        accuracy and sample from a dense pass under torch.cond. layout: the batch's SequenceLayout, None (padded path)
        or "auto" (see DebertaCustomModel.sequence_layout)."""
        flat_labels, flat_ids = labels.flatten(), input_ids.flatten()  # [B * N]
        if self.config.sparse_mlm_logits:  # before the generator runs: see DebertaCustomForMaskedLM.forward
            positions = prediction_positions(labels, self.config.sparse_mlm_max_fraction)  # [R]
        else:
            positions = torch.arange(flat_ids.shape[0], device=flat_ids.device)  # [B * N]
        _, sequence_output, layout = self.generator.decode(input_ids, attention_mask, token_type_ids, position_ids,
                                                           sequence_layout=layout)
        lm_head, word_embeddings = self.generator.lm_predictions.lm_head, self.generator.deberta.embeddings.word_embeddings
        # The head's transform on every token, its decoder on selected rows (see DebertaCustomForMaskedLM).
        hidden = lm_head.transform(sequence_output)  # [B, N, E], or [T, E] unpadded
        if layout is not None:  # [T, E] -> [B, N, E]: the positions count the input's places
            hidden = layout.pad(hidden)
        hidden = hidden.flatten(0, 1)  # [B, N, E] -> [B * N, E]
        logits = lm_head.vocabulary_logits(hidden.index_select(0, positions), word_embeddings)  # [R, V]
        targets = flat_labels.index_select(0, positions)  # [R]: the masked ids, then -100
        predicted = targets != -100
        mlm_sum = cross_entropy_sum(logits, targets)
        with torch.no_grad():
            correct = ((logits.argmax(-1) == targets) & predicted).sum()
        # Replacements sampled without gradient, written at the masked positions only.
        sampled = self.sample_replacements(logits).to(flat_ids.dtype)  # [R]
        replacements = torch.where(predicted, sampled, flat_ids.index_select(0, positions))
        sampled_ids = flat_ids.scatter(0, positions, replacements)  # [B * N]

        left_out = left_out_labels(labels, positions) if self.config.sparse_mlm_logits else None
        if left_out is not None:  # compiled: masked positions beyond the budget, if any, in a dense pass
            def dense_pass(hidden, left_out, temperature):
                dense_logits = lm_head.vocabulary_logits(hidden, word_embeddings)  # [B * N, V]
                with torch.no_grad():
                    hits = (dense_logits.argmax(-1) == left_out).sum().float()
                    # float: cond's autograd takes no integer outputs (ids are exact in float32 up to 2**24)
                    samples = self.sample_replacements(dense_logits, temperature).float()
                return cross_entropy_sum(dense_logits, left_out), hits, samples

            def nothing_left(hidden, left_out, temperature):
                zero = torch.zeros((), dtype=torch.float32, device=hidden.device)
                return zero, zero.clone(), torch.zeros(left_out.shape, dtype=torch.float32, device=hidden.device)

            temperature = torch.full((), self.config.rtd_sampling_temperature, device=hidden.device)
            extra_sum, extra_hits, samples = torch.cond(left_out.ne(-100).any(), dense_pass, nothing_left,
                                                        (hidden, left_out, temperature))
            mlm_sum = mlm_sum + extra_sum
            correct = correct + extra_hits.detach().long()
            sampled_ids = torch.where(left_out != -100, samples.detach().to(flat_ids.dtype), sampled_ids)
        return positions, logits, mlm_sum, correct, sampled_ids.view_as(input_ids)

    def discriminator_logits(self, input_ids, attention_mask, token_type_ids=None, position_ids=None, layout="auto"):
        """[B, N] replaced-token logits (> 0: replaced)."""
        if isinstance(layout, str):
            layout = self.deberta.sequence_layout(input_ids, None, attention_mask, position_ids)
        outputs = self.deberta(input_ids, attention_mask, token_type_ids, position_ids, return_dict=True,
                               sequence_layout=layout)
        return self.mask_predictions(outputs.last_hidden_state, attention_mask, layout)

    @torch.no_grad()
    def sample_replacements(self, generator_logits: torch.Tensor, temperature=None) -> torch.Tensor:
        """One token per row of [M, V] logits, drawn from softmax(logits / temperature), by default
        rtd_sampling_temperature (a 0-dim tensor works too: torch.cond branches take no float)."""
        if generator_logits.shape[0] == 0:
            return torch.zeros(0, dtype=torch.long, device=generator_logits.device)
        temperature = self.config.rtd_sampling_temperature if temperature is None else temperature
        probs = torch.softmax(generator_logits.float() / temperature, dim=-1)
        return torch.multinomial(probs, 1).squeeze(-1)

    @staticmethod
    def replaced_token_labels(discriminator_input_ids, input_ids, labels, attention_mask):
        """1 where the discriminator's input differs from the original text, 0 where it does not, -100 at padding.
        The original is `labels` at masked positions and `input_ids` elsewhere."""
        original = torch.where(labels != -100, labels, input_ids)
        rtd_labels = (discriminator_input_ids != original).long()
        return rtd_labels.masked_fill(~attention_mask.bool(), -100)

    # --- forward ---------------------------------------------------------------------------------------------------

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        labels=None,
        return_dict=None,
        num_items_in_batch=None,
        **kwargs,
    ):
        """kwargs: the packing arguments of DataCollatorWithFlattening (see DebertaCustomModel.forward)."""
        return_dict = self.config.return_dict if return_dict is None else return_dict
        if input_ids is None:
            raise ValueError("RTD pretraining needs input_ids (replacements are token ids, not embeddings)")
        # One layout (one host read) for the generator and the discriminator: they read the same tokens.
        layout = self.deberta.sequence_layout(input_ids, None, attention_mask, position_ids, **kwargs)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)

        if labels is None:  # detection only: is each token of this text replaced?
            logits = self.discriminator_logits(input_ids, attention_mask, token_type_ids, position_ids, layout)
            output = RTDPreTrainingOutput(logits=logits)
            return output if return_dict else output.to_tuple()

        check_labels(labels, input_ids.shape, self.config.vocab_size, "labels")
        labels = ignore_padding(labels, attention_mask)  # as in DebertaCustomForMaskedLM: padding never counts
        masked = labels != -100  # [B, N]: positions the generator predicts
        num_masked = masked.sum()

        # 1-2. Generator: masked-LM loss at masked positions, and replacements sampled there (no gradient).
        positions, generator_logits, mlm_sum, generator_correct, discriminator_input_ids = self.generator_predictions(
            input_ids, attention_mask, token_type_ids, position_ids, labels, layout)
        mlm_loss = mean_over_items(mlm_sum, num_masked)
        rtd_labels = self.replaced_token_labels(discriminator_input_ids, input_ids, labels, attention_mask)

        # 3. Discriminator: binary cross-entropy over non-padding tokens.
        logits = self.discriminator_logits(discriminator_input_ids, attention_mask, token_type_ids, position_ids,
                                           layout)
        counted = rtd_labels != -100
        num_counted = counted.sum()
        rtd_loss = mean_over_items(binary_cross_entropy_sum(logits, rtd_labels, counted), num_counted)
        loss = mlm_loss + self.config.rtd_loss_weight * rtd_loss
        if num_items_in_batch is not None:
            # Gradient accumulation (the Trainer's num_items_in_batch: masked tokens over all micro-batches of one
            # step, and the Trainer no longer divides by the steps). The MLM term becomes its sum over the step's
            # masked tokens: exact. The RTD term's items (non-padding tokens) are not counted for the step, so each
            # micro-batch's mean weighs in by its share of the masked tokens: the large batch's mean when the
            # micro-batches mask the same share of their tokens, and its gradient scale always (the shares sum to 1).
            # mlm_loss and rtd_loss stay this batch's means, for logging; `loss` is what to differentiate.
            share = mean_over_items(num_masked, None, num_items_in_batch)
            loss = (mean_over_items(mlm_sum, None, num_items_in_batch)
                    + self.config.rtd_loss_weight * rtd_loss * share)

        with torch.no_grad():
            generator_accuracy = generator_correct / num_masked.clamp(min=1)
            discriminator_accuracy = (((logits > 0).long() == rtd_labels) & counted).sum() / num_counted.clamp(min=1)
            replaced_fraction = ((rtd_labels == 1) & masked).sum() / num_masked.clamp(min=1)

        output = RTDPreTrainingOutput(
            loss=loss,
            mlm_loss=mlm_loss,
            rtd_loss=rtd_loss,
            generator_accuracy=generator_accuracy,
            discriminator_accuracy=discriminator_accuracy,
            replaced_fraction=replaced_fraction,
            logits=logits,
            rtd_labels=rtd_labels,
            discriminator_input_ids=discriminator_input_ids,
            generator_logits=generator_logits,
            generator_positions=positions,
        )
        return output if return_dict else output.to_tuple()

    # --- starting from a trained discriminator ------------------------------------------------------------------

    @classmethod
    def from_discriminator(cls, discriminator, **config_overrides):
        """Continue RTD pretraining from a trained discriminator: a DebertaCustomForReplacedTokenDetection (or
        DebertaCustomModel), or a folder / Hub id of one, our format or official (the microsoft/deberta-v3-*
        checkpoints are discriminators: `deberta.*` + `mask_predictions.*`).

        Its backbone and RTD head become this model's discriminator (a missing head is newly initialised). The
        generator is newly initialised, except that under es / gdes it takes the discriminator's word and position
        tables and the deltas start at zero, so the discriminator starts exactly where the checkpoint was.
        `config_overrides` set config fields first (rtd_embedding_sharing, rtd_generator_num_layers, ...)."""
        if not isinstance(discriminator, DebertaCustomPreTrainedModel):
            discriminator = DebertaCustomForReplacedTokenDetection.from_pretrained(discriminator)
        config = copy.deepcopy(discriminator.config)
        config.auto_map = None
        config.architectures = None
        for key, value in config_overrides.items():
            setattr(config, key, value)
        config.validate_fields()
        model = cls(config)
        source = {k: v for k, v in discriminator.state_dict().items()}
        if not any(k.startswith("deberta.") for k in source):  # a bare DebertaCustomModel
            source = {f"deberta.{k}": v for k, v in source.items()}
        tables = {name: source.pop(f"deberta.embeddings.{name}.weight")
                  for name in ("word_embeddings", "position_embeddings")}
        with torch.no_grad():
            if config.rtd_embedding_sharing == "none":
                source.update({f"deberta.embeddings.{name}.weight": table for name, table in tables.items()})
            else:
                generator_embeddings = model.generator.deberta.embeddings
                for name, table in tables.items():
                    getattr(generator_embeddings, name).weight.copy_(table)
            missing, unexpected = model.load_state_dict(source, strict=False)
        unexpected = [k for k in unexpected if not k.startswith("lm_predictions.")]  # official v3: an unused MLM head
        missing = [k for k in missing if not k.startswith(("generator.", "mask_predictions.")) and not k.endswith(".delta")]
        if missing or unexpected:
            raise ValueError(f"The discriminator does not fit this model: missing {missing[:5]}, unexpected "
                             f"{unexpected[:5]}")
        parameter = next(discriminator.parameters())
        return model.to(device=parameter.device, dtype=parameter.dtype)

    # --- export ----------------------------------------------------------------------------------------------------

    def discriminator_state_dict(self) -> dict:
        """The discriminator's weights under the official names, with shared tables merged (E_G + E_delta under
        gdes, E_G under es): the state dict of a DebertaCustomForReplacedTokenDetection."""
        state = {}
        for key, value in self.state_dict().items():
            if key.startswith(("deberta.", "mask_predictions.")) and not key.endswith(".delta"):
                state[key] = value.detach().clone()
        embeddings = self.deberta.embeddings
        for name in ("word_embeddings", "position_embeddings"):
            table = getattr(embeddings, name)
            if isinstance(table, DebertaCustomSharedEmbedding):
                with torch.no_grad():
                    state[f"deberta.embeddings.{name}.weight"] = table.weight.detach().clone()
        return state

    def discriminator_for_finetuning(self) -> DebertaCustomForReplacedTokenDetection:
        """A standalone DebertaCustomForReplacedTokenDetection holding the discriminator with merged embeddings, on
        this model's device and dtype. Its `deberta` is what a task head fine-tunes."""
        config = copy.deepcopy(self.config)
        config.auto_map = None
        config.architectures = None
        discriminator = DebertaCustomForReplacedTokenDetection(config)
        parameter = next(self.parameters())
        discriminator.to(device=parameter.device, dtype=parameter.dtype)
        discriminator.load_state_dict(self.discriminator_state_dict(), strict=True)
        discriminator.train(self.training)
        return discriminator

    def export_discriminator(self, save_directory, official_format: bool = False, **save_kwargs) -> None:
        """Write the discriminator (E_G + E_delta merged) as a checkpoint that DebertaCustomModel and every task head
        load (`from_pretrained(save_directory)`), with the code files for trust_remote_code loading.

        official_format=True writes the layout of the microsoft/deberta-v3-* repos instead: config.json with
        model_type deberta-v2 and the state dict `deberta.*` + `mask_predictions.*`, which transformers' own
        DebertaV2Model / DebertaV2For* load as well (they ignore the head and the absolute position table)."""
        import os

        discriminator = self.discriminator_for_finetuning()
        if not official_format:
            discriminator.save_pretrained(save_directory, **save_kwargs)  # weights, config and the code files
            return
        import json

        from safetensors.torch import save_file

        os.makedirs(save_directory, exist_ok=True)
        # Fields left None (embedding_size, attention_head_size, cls_dropout) are left out: transformers reads them
        # with getattr(config, name, default) and would take an explicit null as the value.
        official = {k: v for k, v in discriminator.config.to_official_dict().items() if v is not None}
        with open(os.path.join(save_directory, "config.json"), "w", encoding="utf-8") as handle:
            json.dump(official, handle, indent=2, sort_keys=True)
        state = {k: v.detach().contiguous().cpu() for k, v in discriminator.state_dict().items()}
        save_file(state, os.path.join(save_directory, "model.safetensors"), metadata={"format": "pt"})


__all__ = ["DebertaCustomForRTDPreTraining", "DebertaCustomSharedEmbedding", "RTDPreTrainingOutput",
           "rtd_generator_config"]
