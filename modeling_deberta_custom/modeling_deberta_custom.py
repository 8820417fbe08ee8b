"""PyTorch DeBERTa (v1, v2, v3) for Hugging Face Transformers.

Read top to bottom: layer -> encoder -> embeddings -> base model -> heads (Enhanced Mask Decoder masked-LM,
sequence / token classification, question answering, multiple choice, replaced-token detection). Disentangled
attention (relative positions, c2p / p2c, the attention implementations) is in attention.py, the loss helpers the
heads share in losses.py, checkpoint key maps and load diagnostics in loading.py.

Notation in shape comments: B batch, N sequence length, H heads, D head size, C hidden size, S relative span
(the relative embedding table has 2S rows), V vocabulary.

The remote-code wing: this file is copied next to the weights by `save_pretrained` for `trust_remote_code` loading,
with its siblings, so it imports only torch, transformers and those siblings (tests/test_package_boundary.py).
"""

import inspect
import os
import shutil
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.activations import ACT2FN
from transformers.dynamic_module_utils import get_relative_import_files
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutput,
    MaskedLMOutput,
    MultipleChoiceModelOutput,
    QuestionAnsweringModelOutput,
    SequenceClassifierOutput,
    TokenClassifierOutput,
)
from transformers.utils import ModelOutput

# transformers 4.x copies out of a local folder only the siblings that the auto_map file itself names in `from .x
# import y` lines, not theirs: attention_cpu.py (imported by attention.py) is named here for that alone
# (tests/test_remote_code.py checks that every auto_map file names each wing file it reaches).
from .attention import (
    ATTENTION_FUNCTIONS,
    DebertaCustomSelfAttention,
    KeyMask,
    RelativePositions,
    prepare_key_mask,
    relative_positions,
)
from .attention_cpu import cpu_kernels_apply  # (also read by sequence_layout: lengths are free on CPU)
from .configuration_deberta_custom import DebertaCustomConfig
from .loading import (
    CHECKPOINT_KEY_MAPPING,
    IGNORED_CHECKPOINT_KEYS,
    RTD_PRETRAINING_ONLY_KEYS,
    RTD_SHARED_TABLE_MAPPING,
    check_device_map,
    checkpoint_config_dict,
    describe_weight_source,
    is_required_weight,
    merge_embedding_deltas,
    rtd_shared_tables,
    unreadable_weight_file,
)
from .losses import (
    binary_cross_entropy_sum,
    can_check_values,
    check_labels,
    cross_entropy_sum,
    left_out_labels,
    mean_over_items,
    prediction_positions,
)
from .padding import (
    SequenceLayout,
    check_packing_kwargs,
    layout_from_attention_mask,
    layout_from_cu_seq_lens,
    layout_from_sequence_ids,
)

try:  # transformers >= 5: these initialisers skip tensors that were loaded from a checkpoint
    from transformers import initialization as init
except ImportError:  # transformers 4.x initialises before loading, so plain torch initialisers are right
    from torch.nn import init


# Every Auto class this file serves, as written into a saved config's `auto_map` ("file.ClassName").
AUTO_MAP = {
    "AutoConfig": "configuration_deberta_custom.DebertaCustomConfig",
    "AutoModel": "modeling_deberta_custom.DebertaCustomModel",
    "AutoModelForMaskedLM": "modeling_deberta_custom.DebertaCustomForMaskedLM",
    "AutoModelForSequenceClassification": "modeling_deberta_custom.DebertaCustomForSequenceClassification",
    "AutoModelForTokenClassification": "modeling_deberta_custom.DebertaCustomForTokenClassification",
    "AutoModelForQuestionAnswering": "modeling_deberta_custom.DebertaCustomForQuestionAnswering",
    "AutoModelForMultipleChoice": "modeling_deberta_custom.DebertaCustomForMultipleChoice",
}


# ----------------------------------------------------------------------------------------------------------------------
# Layer and encoder (the self-attention module, DebertaCustomSelfAttention, is in attention.py)
# ----------------------------------------------------------------------------------------------------------------------


class DebertaCustomResidualOutput(nn.Module):
    """dense -> dropout -> LayerNorm(x + residual): closes both the attention and the feed-forward block."""

    def __init__(self, config: DebertaCustomConfig, input_size: int):
        super().__init__()
        self.dense = nn.Linear(input_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states, residual):
        return self.LayerNorm(self.dropout(self.dense(hidden_states)) + residual)


class DebertaCustomAttention(nn.Module):
    def __init__(self, config: DebertaCustomConfig):
        super().__init__()
        self.self = DebertaCustomSelfAttention(config)
        self.output = DebertaCustomResidualOutput(config, config.hidden_size)

    def forward(self, hidden_states, mask: KeyMask, relative=None, rel_embeddings=None, query_states=None,
                output_attentions=False):
        context, probs = self.self(hidden_states, mask, relative, rel_embeddings, query_states, output_attentions)
        # The residual is the query: in EMD passes it is the decoder's query, not the keys.
        residual = hidden_states if query_states is None else query_states
        return self.output(context, residual), probs


class DebertaCustomIntermediate(nn.Module):
    def __init__(self, config: DebertaCustomConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.activation = ACT2FN[config.hidden_act]

    def forward(self, hidden_states):
        return self.activation(self.dense(hidden_states))


class DebertaCustomLayer(GradientCheckpointingLayer):
    def __init__(self, config: DebertaCustomConfig):
        super().__init__()
        self.attention = DebertaCustomAttention(config)
        self.intermediate = DebertaCustomIntermediate(config)
        self.output = DebertaCustomResidualOutput(config, config.intermediate_size)

    def forward(self, hidden_states, mask: KeyMask, relative=None, rel_embeddings=None, query_states=None,
                output_attentions=False):
        attention_output, probs = self.attention(
            hidden_states, mask, relative, rel_embeddings, query_states, output_attentions
        )
        return self.output(self.intermediate(attention_output), attention_output), probs


class DebertaCustomConvLayer(nn.Module):
    """v2-xlarge and larger: a 1-D convolution over the embeddings, added to the first layer's output."""

    def __init__(self, config: DebertaCustomConfig):
        super().__init__()
        kernel = config.conv_kernel_size
        self.conv = nn.Conv1d(config.hidden_size, config.hidden_size, kernel, padding=kernel // 2,
                              groups=config.conv_groups)
        self.activation = ACT2FN[config.conv_act]
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, embeddings, layer_output, token_mask):
        """token_mask [B, N] (True at real tokens); or, for the real tokens [T, C] of an unpadded batch, its
        SequenceLayout: the convolution then runs over each sequence on the layout's grid, which holds zeros past
        the sequence's ends as the padded path does."""
        layout = token_mask if isinstance(token_mask, SequenceLayout) else None
        if layout is not None:
            embeddings = layout.to_grid(embeddings)  # [T, C] -> [R, W, C]
        conv_output = self.conv(embeddings.transpose(1, 2)).transpose(1, 2)  # [B, N, C]
        if layout is not None:
            conv_output = layout.from_grid(conv_output)  # [R, W, C] -> [T, C]
        else:
            token_mask = token_mask[..., None].to(conv_output.dtype)  # [B, N, 1], 0 at padding
            conv_output = conv_output * token_mask
        output = self.LayerNorm(layer_output + self.activation(self.dropout(conv_output)))
        return output if layout is not None else output * token_mask


class DebertaCustomEncoder(nn.Module):
    def __init__(self, config: DebertaCustomConfig):
        super().__init__()
        self.config = config
        self.layer = nn.ModuleList([DebertaCustomLayer(config) for _ in range(config.num_hidden_layers)])
        if config.relative_attention:
            self.rel_embeddings = nn.Embedding(2 * config.relative_span, config.hidden_size)
        if config.norm_rel_ebd == "layer_norm":  # exists even without relative attention, as in the checkpoints
            self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.conv = DebertaCustomConvLayer(config) if config.conv_kernel_size > 0 else None

    def relative_embeddings(self):
        """The relative embedding table [2S, C] as the attention layers read it, or None."""
        if not self.config.relative_attention:
            return None
        table = self.rel_embeddings.weight
        return self.LayerNorm(table) if self.config.norm_rel_ebd == "layer_norm" else table

    def relative_index(self, length, device) -> RelativePositions | None:
        """Relative positions of a length-N sequence against itself (see RelativePositions), or None."""
        if not self.config.relative_attention:
            return None
        return relative_positions(length, length, self.config, device)

    def key_mask(self, token_mask, output_attentions=False) -> KeyMask:
        """The key mask of self-attention over [B, N] tokens (see KeyMask); with output_attentions the layers run
        eager, which needs no FlexAttention blocks."""
        return prepare_key_mask(token_mask, "eager" if output_attentions else self.config._attn_implementation)

    def attention_inputs(self, token_mask, hidden_states, output_attentions=False):
        """What every layer's attention reads, prepared once per forward: (the KeyMask of [B, N] tokens, or for an
        unpadded batch its SequenceLayout holding a KeyMask per attention group; relative positions of a sequence as
        long as the rows attention sees, one per group of a layout; the relative embedding table)."""
        device = hidden_states.device
        if isinstance(token_mask, SequenceLayout):
            layout = token_mask.with_group_masks(self.key_mask)
            relative = tuple(self.relative_index(width, device) for _, _, width in layout.groups)
            return layout, relative, self.relative_embeddings()
        mask = self.key_mask(token_mask, output_attentions)
        return mask, self.relative_index(hidden_states.shape[1], device), self.relative_embeddings()

    def forward(self, embeddings, token_mask, output_attentions=False, output_hidden_states=False):
        """embeddings [B, N, C] with token_mask [B, N] (True at real tokens); or the real tokens [T, C] of an
        unpadded batch with its SequenceLayout in place of the mask: every layer then runs on [T, C] and attention
        on the layout's grid (padding.py)."""
        # Once per forward, shared by every layer: the key mask, relative positions and the relative table.
        mask, relative, rel_embeddings = self.attention_inputs(token_mask, embeddings, output_attentions)

        all_hidden_states = (embeddings,) if output_hidden_states else None
        all_attentions = () if output_attentions else None
        hidden_states = embeddings
        for i, layer in enumerate(self.layer):
            hidden_states, probs = layer(hidden_states, mask, relative, rel_embeddings,
                                         output_attentions=output_attentions)
            if i == 0 and self.conv is not None:
                hidden_states = self.conv(embeddings, hidden_states, token_mask)
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            if output_attentions:
                all_attentions += (probs,)
        return BaseModelOutput(
            last_hidden_state=hidden_states, hidden_states=all_hidden_states, attentions=all_attentions
        )


# ----------------------------------------------------------------------------------------------------------------------
# Embeddings and the base model
# ----------------------------------------------------------------------------------------------------------------------


class DebertaCustomEmbeddings(nn.Module):
    """Word (+ absolute position when position_biased_input) (+ token type) -> [embed_proj] -> LayerNorm -> mask.
    The absolute position table always exists: the Enhanced Mask Decoder adds it before the last layer."""

    def __init__(self, config: DebertaCustomConfig):
        super().__init__()
        self.config = config
        size = config.word_embedding_size
        self.word_embeddings = nn.Embedding(config.vocab_size, size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, size)
        if config.type_vocab_size > 0:
            self.token_type_embeddings = nn.Embedding(config.type_vocab_size, size)
        if size != config.hidden_size:
            self.embed_proj = nn.Linear(size, config.hidden_size, bias=False)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids, token_type_ids, position_ids, inputs_embeds, token_mask=None):
        """Ids [B, N] (or inputs_embeds [B, N, E]) -> [B, N, C], zeros where token_mask [B, N] is False; the real
        tokens of an unpadded batch, [T] -> [T, C], come without a mask."""
        embeddings = self.word_embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        if self.config.position_biased_input:
            embeddings = embeddings + self.position_embeddings(position_ids)
        if self.config.type_vocab_size > 0:
            embeddings = embeddings + self.token_type_embeddings(token_type_ids)
        if self.config.word_embedding_size != self.config.hidden_size:
            embeddings = self.embed_proj(embeddings)
        embeddings = self.LayerNorm(embeddings)
        if token_mask is not None:
            embeddings = embeddings * token_mask[..., None].to(embeddings.dtype)
        return self.dropout(embeddings)


def train_only_read_position_tables(model: nn.Module) -> None:
    """Relative-only models (position_biased_input false) read the absolute position table only in the Enhanced Mask
    Decoder. Elsewhere it is frozen, so that DistributedDataParallel needs no find_unused_parameters search (and the
    Trainer turns it off under gradient checkpointing) and optimizers skip it; the weight is kept.
    An RTD discriminator's table is a view of its generator's: what it owns (the GDES delta, none under plain
    sharing) is switched, the generator's table follows the generator's own decoder."""
    for module in model.modules():
        if isinstance(module, DebertaCustomEmbeddings):
            for parameter in module.position_embeddings.parameters():
                parameter.requires_grad_(module.config.position_biased_input)
    for module in model.modules():
        if isinstance(module, DebertaCustomForMaskedLM) and module.config.uses_enhanced_mask_decoder:
            module.deberta.embeddings.position_embeddings.weight.requires_grad_(True)



def _check_integer_ids(name, ids, upper, what):
    """Ids must be integers in [0, upper). The dtype is always checked, the range where it is free (CPU tensors,
    not while compiling, exporting or tracing: see can_check_values)."""
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer ids, got dtype {ids.dtype}")
    if not can_check_values(ids) or ids.numel() == 0:
        return
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= upper:
        raise ValueError(f"{name} holds values in [{low}, {high}], outside [0, {upper - 1}] ({what})")


def _check_attention_mask_values(attention_mask):
    """A float attention mask must hold only 0 and 1 (checked where free, see can_check_values)."""
    if attention_mask.is_floating_point() and can_check_values(attention_mask):
        if not ((attention_mask == 0) | (attention_mask == 1)).all():
            raise ValueError("attention_mask must hold only 0 and 1")


def _sizes_readable(device) -> bool:
    """Whether a data-dependent size may be read on the host: not on the meta device (no values) and not while
    compiling, exporting or tracing (a graph that serves every batch cannot depend on one batch's values). Where
    not, padded batches take the padded path."""
    tracing = (torch.compiler.is_compiling() or torch.jit.is_tracing()
               or getattr(torch.compiler, "is_exporting", torch.compiler.is_compiling)())
    return torch.device(device).type != "meta" and not tracing


class DebertaCustomPreTrainedModel(PreTrainedModel):
    config_class = DebertaCustomConfig
    base_model_prefix = "deberta"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _no_split_modules = ["DebertaCustomLayer", "DebertaCustomEmbeddings"]
    # Checkpoint keys that are never loaded, so transformers does not report them as unused: stale buffers, the legacy
    # head's tied decoder copies, and an RTD pretraining folder's generator (a head loads only its discriminator).
    _keys_to_ignore_on_load_unexpected = [*IGNORED_CHECKPOINT_KEYS, *RTD_PRETRAINING_ONLY_KEYS]
    # What save_pretrained writes as `auto_map`; classes defined in sibling files (modeling_rtd.py) extend it.
    saved_auto_map = AUTO_MAP
    # Whether this class holds RTD pretraining's generator (and loads such folders as they are, without merging).
    holds_rtd_generator = False
    # Explicit, as every forward takes **kwargs (the packing arguments of DataCollatorWithFlattening): transformers'
    # Trainer would otherwise read them as loss kwargs and pass num_items_in_batch. Heads that use it say True.
    accepts_loss_kwargs = False

    def __init__(self, config: DebertaCustomConfig, *inputs, **kwargs):
        config.validate_structure()  # the config accepted any sizes; a model refuses those it cannot be built with
        super().__init__(config, *inputs, **kwargs)

    @torch.no_grad()
    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Conv1d)):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.padding_idx is not None and not getattr(module.weight, "_is_hf_initialized", False):
                init.zeros_(module.weight[module.padding_idx])
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, DebertaCustomSelfAttention) and module.fused_projection:
            init.zeros_(module.q_bias)
            init.zeros_(module.v_bias)
        elif isinstance(module, (DebertaCustomLMPredictionHead, DebertaCustomRTDHead)) and hasattr(module, "bias"):
            init.zeros_(module.bias)

    def post_init(self):
        super().post_init()
        train_only_read_position_tables(self)

    def set_attn_implementation(self, attn_implementation: str | dict):
        """Switch attention paths on a live model: the layers read config._attn_implementation at every call. A dict
        (transformers' per-submodule form) is read at its "" key, the model itself: it has no sub-models."""
        if isinstance(attn_implementation, dict):
            attn_implementation = attn_implementation.get("", self.config._attn_implementation)
        if attn_implementation not in ATTENTION_FUNCTIONS:
            raise ValueError(f'Specified `attn_implementation="{attn_implementation}"` is not supported. The only '
                             f"possible arguments are {sorted(ATTENTION_FUNCTIONS)}.")
        self.config._attn_implementation = attn_implementation

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Writes a Hub-ready folder: weights under our names, config with the full `auto_map` (the config and every
        head, so one repo serves every Auto class), and the code files for `trust_remote_code=True` loading."""
        self.config.auto_map = dict(self.saved_auto_map)
        if "save_original_format" in inspect.signature(PreTrainedModel.save_pretrained).parameters:
            # transformers >= 5 would write back the names a checkpoint was loaded under (cls.predictions.*, an RTD
            # folder's generator tables); our folders hold our names whatever the model was loaded from.
            kwargs.setdefault("save_original_format", False)
        result = super().save_pretrained(save_directory, *args, **kwargs)
        # transformers copies code only for classes registered with an Auto class; the RTD discriminator has none.
        # Copy every file the auto_map names, with the siblings they import, so each folder loads as remote code.
        here = os.path.dirname(os.path.abspath(__file__))
        for module in {target.split(".")[0] for target in self.config.auto_map.values()}:
            source = os.path.join(here, module + ".py")
            for path in [source, *get_relative_import_files(source)]:
                destination = os.path.join(save_directory, os.path.basename(path))
                if not os.path.exists(destination):
                    shutil.copyfile(path, destination)
        return result

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """transformers' own loader (every from_pretrained argument works as for its models: dtype, device_map,
        quantization_config, sharded and Hub checkpoints), reading our folders and the official checkpoints: a folder
        or Hub repo whose config.json has model_type `deberta-v2` or `deberta` (the microsoft/deberta-* repos, or
        transformers' own save_pretrained), renamed on load by `loading.CHECKPOINT_KEY_MAPPING`. RTD pretraining
        folders load into the backbone and every head as the exported discriminator (E_G + E_delta merged).

        Added to transformers' checks: weights of the backbone that the checkpoint lacks raise ValueError naming the
        file (a truncated or foreign checkpoint) instead of being initialised at random; a weight file that cannot
        be read is named; a device_map naming a device this machine lacks says so."""
        check_device_map(kwargs.get("device_map"))
        shared_tables = None if cls.holds_rtd_generator else rtd_shared_tables(
            checkpoint_config_dict(pretrained_model_name_or_path, kwargs))
        key_mapping = {**(kwargs.pop("key_mapping", None) or {}), **CHECKPOINT_KEY_MAPPING,
                       **(RTD_SHARED_TABLE_MAPPING if shared_tables else {})}
        output_loading_info = kwargs.pop("output_loading_info", False)
        try:
            model, info = super().from_pretrained(
                pretrained_model_name_or_path, *model_args, key_mapping=key_mapping, output_loading_info=True, **kwargs
            )
        except Exception as error:
            unreadable = unreadable_weight_file(pretrained_model_name_or_path, kwargs)
            if unreadable is None:
                raise  # transformers' own error (usage, missing files, sizes) already says what is wrong
            path, reader_error = unreadable
            raise ValueError(f"Could not read the checkpoint file {path}: {reader_error}") from error
        missing = [k for k in info["missing_keys"] if is_required_weight(k, model.config)]
        if missing:
            raise ValueError(
                f"The checkpoint {describe_weight_source(pretrained_model_name_or_path, kwargs)} lacks {len(missing)} "
                f"weights of the model, such as {sorted(missing)[:5]}: the weight file is truncated or holds a "
                "different architecture"
            )
        if shared_tables == "gdes":
            merge_embedding_deltas(model, pretrained_model_name_or_path, kwargs)
        train_only_read_position_tables(model)  # loading installs fresh Parameters
        return (model, info) if output_loading_info else model

    def _validate_inputs(self, input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds):
        """Turn bad input into errors that name the problem instead of failures deep inside torch."""
        config = self.config
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids and inputs_embeds")
        if input_ids is not None:
            if not isinstance(input_ids, torch.Tensor):
                raise TypeError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
            if input_ids.dim() != 2:
                raise ValueError(f"input_ids must be [batch, length], got shape {tuple(input_ids.shape)}")
            _check_integer_ids("input_ids", input_ids, config.vocab_size, f"vocab_size={config.vocab_size}")
            shape = input_ids.shape
        else:
            if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != config.word_embedding_size:
                raise ValueError(
                    f"inputs_embeds must be [batch, length, {config.word_embedding_size}], "
                    f"got shape {tuple(inputs_embeds.shape)}"
                )
            shape = inputs_embeds.shape[:2]
        if shape[1] == 0:
            raise ValueError("The input sequence is empty (length 0)")
        for name, tensor in (("attention_mask", attention_mask), ("token_type_ids", token_type_ids),
                             ("position_ids", position_ids)):
            if tensor is not None and tensor.shape != shape and not (name == "position_ids" and tensor.shape == shape[1:]):
                raise ValueError(f"{name} has shape {tuple(tensor.shape)} but the input ids are {tuple(shape)}")
        if attention_mask is not None:
            _check_attention_mask_values(attention_mask)
        # Token types are ignored when the model has none (type_vocab_size 0), as tokenizers emit them for pairs.
        if token_type_ids is not None and config.type_vocab_size > 0:
            _check_integer_ids("token_type_ids", token_type_ids, config.type_vocab_size,
                               f"type_vocab_size={config.type_vocab_size}")
        if config.position_biased_input and position_ids is not None:
            limit = config.max_position_embeddings
            _check_integer_ids("position_ids", position_ids, limit, f"max_position_embeddings={limit}")
        return shape

    def _default_position_ids(self, length, device, layout=None, why="this model adds absolute positions at the input"):
        """[1, N] positions 0..N-1, broadcast over the batch (a packed batch's restart with each sequence: see
        SequenceLayout.unpad_positions). The longest sequence must fit max_position_embeddings."""
        longest = layout.grid_shape[1] if layout is not None and layout.packed else length
        limit = self.config.max_position_embeddings
        if longest > limit:
            raise ValueError(f"Sequence length {longest} exceeds max_position_embeddings={limit}: {why}; truncate the "
                             "input")
        return torch.arange(length, device=device)[None, :]


class DebertaCustomModel(DebertaCustomPreTrainedModel):
    def __init__(self, config: DebertaCustomConfig):
        super().__init__(config)
        self.embeddings = DebertaCustomEmbeddings(config)
        self.encoder = DebertaCustomEncoder(config)
        self.post_init()

    def get_input_embeddings(self):
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, new_embeddings):
        self.embeddings.word_embeddings = new_embeddings

    def sequence_layout(self, input_ids=None, inputs_embeds=None, attention_mask=None, position_ids=None,
                        output_attentions=None, **packing) -> SequenceLayout | None:
        """How a forward lays out its tokens (padding.py): a SequenceLayout for a packed batch (cu_seq_lens_q with
        max_length_q, seq_idx, or a batch of one whose position_ids restart), or for a padded batch when
        config.unpad_inputs allows it; None for the padded path. At most one host read. Heads that use the layout
        themselves build it here and pass it to forward(sequence_layout=...), so the mask is read once."""
        output_attentions = self.config.output_attentions if output_attentions is None else output_attentions
        reference = input_ids if input_ids is not None else inputs_embeds
        if not isinstance(reference, torch.Tensor) or reference.dim() < 2:
            return None  # forward's input checks name the problem
        shape, device = tuple(reference.shape[:2]), reference.device
        cu_seq_lens, seq_idx = packing.get("cu_seq_lens_q"), packing.get("seq_idx")
        check_packing_kwargs(packing, shape, check_values=cu_seq_lens is not None and can_check_values(cu_seq_lens))
        # On CPU attention runs by groups of similar length, which needs the lengths on the host (free there); not
        # for FlexAttention, which compiles a kernel for every new width.
        group = dict(group_by_length=cpu_kernels_apply(device) and self.config._attn_implementation != "flex_attention",
                     training=self.training)
        if cu_seq_lens is not None:
            layout = None if cu_seq_lens.shape[0] == 2 else layout_from_cu_seq_lens(
                cu_seq_lens.to(device), packing["max_length_q"], shape[1], **group)
        elif seq_idx is not None:
            layout = layout_from_sequence_ids(seq_idx.to(device), attention_mask, position_ids=False, **group)
        elif position_ids is not None and shape[0] == 1 and torch.device(device).type != "meta":
            layout = layout_from_sequence_ids(position_ids, attention_mask, position_ids=True, **group)
        elif self.config.unpad_inputs and attention_mask is not None and not output_attentions:
            if not _sizes_readable(device):
                return None
            return layout_from_attention_mask(attention_mask, **group)
        else:
            return None
        if layout is not None and output_attentions:
            raise ValueError("output_attentions is not available for packed batches (several sequences in one row): "
                             "run the sequences as a padded batch to get [B, H, N, N] probabilities")
        return layout

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        inputs_embeds=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
        sequence_layout="auto",
        **kwargs,
    ):
        """kwargs: the packing arguments of DataCollatorWithFlattening (cu_seq_lens_q/k, max_length_q/k, seq_idx).
        sequence_layout: "auto" (decided here by `sequence_layout`), or what a head decided: a SequenceLayout or None
        (the padded path). Outputs keep the input's [B, N, ...] shapes either way, zeros at padding when unpadded."""
        output_attentions = self.config.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = (
            self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
        )
        return_dict = self.config.return_dict if return_dict is None else return_dict
        batch, length = self._validate_inputs(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds)
        device = input_ids.device if input_ids is not None else inputs_embeds.device
        layout = sequence_layout
        if isinstance(layout, str):
            layout = self.sequence_layout(input_ids, inputs_embeds, attention_mask, position_ids, output_attentions,
                                          **kwargs)
        if token_type_ids is None and self.config.type_vocab_size > 0:
            token_type_ids = torch.zeros(batch, length, dtype=torch.long, device=device)

        given_positions = position_ids
        if position_ids is None and self.config.position_biased_input:
            position_ids = self._default_position_ids(length, device, layout)
        if layout is None:
            token_mask = (torch.ones(batch, length, dtype=torch.bool, device=device) if attention_mask is None
                          else attention_mask.bool())
            embeddings = self.embeddings(input_ids, token_type_ids, position_ids, inputs_embeds, token_mask)
            outputs = self.encoder(embeddings, token_mask, output_attentions, output_hidden_states)
            return outputs if return_dict else outputs.to_tuple()
        # Unpadded: the real tokens [T] in, [T, C] through every layer, padded back to [B, N, C] at the end.
        input_ids, token_type_ids, inputs_embeds = (None if t is None else layout.unpad(t)
                                                    for t in (input_ids, token_type_ids, inputs_embeds))
        position_ids = None if position_ids is None else layout.unpad_positions(given_positions)  # [T]
        embeddings = self.embeddings(input_ids, token_type_ids, position_ids, inputs_embeds)
        outputs = self.encoder(embeddings, layout, output_attentions, output_hidden_states)
        outputs = BaseModelOutput(
            last_hidden_state=layout.pad(outputs.last_hidden_state),
            hidden_states=None if outputs.hidden_states is None else tuple(map(layout.pad, outputs.hidden_states)),
        )
        return outputs if return_dict else outputs.to_tuple()


# ----------------------------------------------------------------------------------------------------------------------
# Heads
# ----------------------------------------------------------------------------------------------------------------------



class DebertaCustomLMPredictionHead(nn.Module):
    """dense -> activation -> LayerNorm -> tied word-embedding decoder + bias. State-dict names follow the official
    checkpoints: `lm_predictions.lm_head.{dense,LayerNorm,bias}`."""

    def __init__(self, config: DebertaCustomConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.word_embedding_size)
        self.activation = ACT2FN[config.hidden_act]
        self.LayerNorm = nn.LayerNorm(config.word_embedding_size, eps=config.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, hidden_states, word_embeddings: nn.Embedding):
        return self.vocabulary_logits(self.transform(hidden_states), word_embeddings)  # [..., V]

    def transform(self, hidden_states):
        """dense -> activation -> LayerNorm: [..., C] -> [..., E]."""
        return self.LayerNorm(self.activation(self.dense(hidden_states)))

    def vocabulary_logits(self, hidden_states, word_embeddings: nn.Embedding):
        """The tied decoder: [..., E] -> [..., V]. Sparse prediction runs only this on selected rows."""
        return F.linear(hidden_states, word_embeddings.weight, self.bias)


class DebertaCustomOnlyMLMHead(nn.Module):
    def __init__(self, config: DebertaCustomConfig):
        super().__init__()
        self.lm_head = DebertaCustomLMPredictionHead(config)


class DebertaCustomForMaskedLM(DebertaCustomPreTrainedModel):
    """Masked-LM with the Enhanced Mask Decoder (EMD, paper section 3.2) when absolute positions are not at the input:
    keys and values are the second-to-last layer's output; the first query is that output plus the absolute position
    embedding; the last encoder layer is applied `emd_num_passes` times with shared weights, each output becoming the
    next query; the LM head reads the final pass. With position_biased_input (or use_enhanced_mask_decoder false) the
    head reads the last layer."""

    # transformers' Trainer passes num_items_in_batch (the labelled tokens of every micro-batch of one optimizer step)
    # to models that declare this, and then no longer divides their loss by the accumulation steps.
    accepts_loss_kwargs = True

    def __init__(self, config: DebertaCustomConfig):
        super().__init__(config)
        if config.uses_enhanced_mask_decoder and config.word_embedding_size != config.hidden_size:
            raise ValueError("The Enhanced Mask Decoder needs embedding_size == hidden_size (it adds absolute position "
                             f"embeddings to hidden states); got {config.embedding_size} and {config.hidden_size}")
        self.deberta = DebertaCustomModel(config)
        self.lm_predictions = DebertaCustomOnlyMLMHead(config)
        self.post_init()

    def get_input_embeddings(self):
        return self.deberta.embeddings.word_embeddings

    def set_input_embeddings(self, new_embeddings):
        self.deberta.embeddings.word_embeddings = new_embeddings

    def resize_token_embeddings(self, new_num_tokens=None, pad_to_multiple_of=None, **kwargs):
        """The decoder is the word-embedding matrix itself, so only the output bias needs resizing alongside it."""
        embeddings = super().resize_token_embeddings(new_num_tokens, pad_to_multiple_of, **kwargs)
        _resize_vector(self.lm_predictions.lm_head, "bias", embeddings.num_embeddings)
        return embeddings

    def enhanced_mask_decoder(self, hidden_states, token_mask, position_ids):
        """hidden_states: all layer outputs from the encoder, [B, N, C] with token_mask [B, N]; or the real tokens
        [T, C] with the batch's SequenceLayout as token_mask and position_ids [T]. Returns the final decoder pass."""
        encoder = self.deberta.encoder
        context = hidden_states[-2]  # keys and values: the second-to-last layer
        query = context + self.deberta.embeddings.position_embeddings(position_ids)
        # the decoder's own (once per forward, shared by its passes)
        mask, rel_index, rel_embeddings = encoder.attention_inputs(token_mask, context)
        last_layer = encoder.layer[-1]
        for _ in range(self.config.emd_num_passes):
            # Positional: reentrant gradient checkpointing only re-feeds positional tensors to the recomputation.
            query, _ = last_layer(context, mask, rel_index, rel_embeddings, query)
        return query

    def decode(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None, inputs_embeds=None,
               output_attentions=None, output_hidden_states=None, sequence_layout="auto", **kwargs):
        """Backbone, then the Enhanced Mask Decoder where it applies: (backbone outputs, hidden states that the LM head
        reads, the SequenceLayout or None). Those hidden states are [B, N, C] on the padded path, the real tokens
        [T, C] with a layout (see DebertaCustomModel.forward for sequence_layout and kwargs)."""
        layout = sequence_layout
        if isinstance(layout, str):
            layout = self.deberta.sequence_layout(input_ids, inputs_embeds, attention_mask, position_ids,
                                                  output_attentions, **kwargs)
        use_emd = self.config.uses_enhanced_mask_decoder
        outputs = self.deberta(
            input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
            output_attentions=output_attentions,
            output_hidden_states=True if use_emd else output_hidden_states,
            return_dict=True,
            sequence_layout=layout,
        )
        if not use_emd:
            states = outputs.last_hidden_state
            return outputs, (states if layout is None else layout.unpad(states)), layout
        batch, length = outputs.last_hidden_state.shape[:2]
        device = outputs.last_hidden_state.device
        limit = self.config.max_position_embeddings
        given_positions = position_ids
        if position_ids is None:
            position_ids = self._default_position_ids(
                length, device, layout, why="the Enhanced Mask Decoder needs absolute positions")
        else:
            _check_integer_ids("position_ids", position_ids, limit, f"max_position_embeddings={limit}")
        if layout is not None:  # the decoder runs on the real tokens, as the encoder did
            states = [layout.unpad(h) for h in outputs.hidden_states[-2:]]
            position_ids = layout.unpad_positions(given_positions)  # [T]
            return outputs, self.enhanced_mask_decoder(states, layout, position_ids), layout
        token_mask = (attention_mask.bool() if attention_mask is not None
                      else torch.ones(batch, length, dtype=torch.bool, device=device))
        return outputs, self.enhanced_mask_decoder(outputs.hidden_states, token_mask, position_ids), None

    def sparse_logits_and_loss(self, sequence_output, labels, positions):
        """Vocabulary logits [R, V] only at `positions` [R] (from `prediction_positions`: the labelled positions first,
        in row-major order) and the summed cross-entropy over every labelled position. Eager: R = the labelled
        positions. Compiled: R is a budget fixed by the shapes, and labelled positions beyond it are scored by a dense
        pass under torch.cond (their logits are not returned)."""
        lm_head, word_embeddings = self.lm_predictions.lm_head, self.deberta.embeddings.word_embeddings
        # The head's transform runs on every position (C x E, small next to the E x V decoder): a torch.cond branch
        # may not close over LayerNorm's eps, which torch.compile(dynamic=True) makes a symbolic float.
        hidden = lm_head.transform(sequence_output).flatten(0, 1)  # [B, N, E] -> [B * N, E]
        logits = lm_head.vocabulary_logits(hidden.index_select(0, positions), word_embeddings)  # [R, V]
        loss_sum = cross_entropy_sum(logits, labels.flatten().index_select(0, positions))
        left_out = left_out_labels(labels, positions)  # [B * N], or None when the rows hold every label
        if left_out is not None:
            def dense_pass(hidden, left_out):
                return cross_entropy_sum(lm_head.vocabulary_logits(hidden, word_embeddings), left_out)

            def nothing_left(hidden, left_out):
                return torch.zeros((), dtype=torch.float32, device=hidden.device)

            loss_sum = loss_sum + torch.cond(left_out.ne(-100).any(), dense_pass, nothing_left, (hidden, left_out))
        return logits, loss_sum

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        inputs_embeds=None,
        labels=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
        num_items_in_batch=None,
        **kwargs,
    ):
        return_dict = self.config.return_dict if return_dict is None else return_dict
        output_hidden_states = (
            self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
        )
        sparse = labels is not None and self.training and self.config.sparse_mlm_logits
        if labels is not None:
            input_shape = input_ids.shape if input_ids is not None else inputs_embeds.shape[:2]
            check_labels(labels, input_shape, self.config.vocab_size, "labels")
            labels = ignore_padding(labels, attention_mask)
        # Chosen before the backbone runs: eager mode reads the number of labels on the host, and that device sync
        # costs least while little work is queued (on an H200, base, one after the encoder cost 17% of the step).
        positions = prediction_positions(labels, self.config.sparse_mlm_max_fraction) if sparse else None  # [R]
        outputs, sequence_output, layout = self.decode(input_ids, attention_mask, token_type_ids, position_ids,
                                                       inputs_embeds, output_attentions, output_hidden_states, **kwargs)
        loss_sum = None
        if sparse:
            if layout is not None:  # [T, C] -> [B, N, C]: the positions count the input's [B * N] places
                sequence_output = layout.pad(sequence_output)
            logits, loss_sum = self.sparse_logits_and_loss(sequence_output, labels, positions)  # [R, V]
        else:
            logits = self.lm_predictions.lm_head(sequence_output, self.deberta.embeddings.word_embeddings)
            if layout is not None:
                logits = layout.pad(logits)  # [T, V] -> [B, N, V], zeros at padding
            if labels is not None:
                loss_sum = cross_entropy_sum(logits, labels)
        loss = None
        if labels is not None:
            loss = mean_over_items(loss_sum, (labels != -100).sum(), num_items_in_batch)

        hidden_states = outputs.hidden_states if output_hidden_states else None
        result = MaskedLMOutput(loss=loss, logits=logits, hidden_states=hidden_states, attentions=outputs.attentions)
        return result if return_dict else result.to_tuple()


def _head_output(output_class, return_dict, encoder_outputs, **fields):
    """A head's output dataclass, carrying the encoder's hidden states and attentions; for return_dict=False the
    tuple transformers users expect: (loss,) when present, then the head's tensors, then the optional encoder ones."""
    result = output_class(**fields, hidden_states=encoder_outputs.hidden_states, attentions=encoder_outputs.attentions)
    return result if return_dict else result.to_tuple()


def _resize_vector(module, name, new_size):
    """Resize a 1-D parameter (an output bias) to new_size, keeping old values and zero-filling new entries."""
    old = getattr(module, name)
    if old.shape[0] == new_size:
        return
    new = torch.zeros(new_size, dtype=old.dtype, device=old.device)
    keep = min(new_size, old.shape[0])
    new[:keep] = old.data[:keep]
    setattr(module, name, nn.Parameter(new))



def on_real_tokens(head, hidden_states, layout=None):
    """A token-wise head on [B, N, C] -> [B, N, ...]; with a SequenceLayout it runs on the real tokens only and the
    padding positions of its output hold zeros."""
    if layout is None:
        return head(hidden_states)
    return layout.pad(head(layout.unpad(hidden_states)))


def ignore_padding(labels, attention_mask):
    """Token labels with -100 at padding: padding never counts in a token-level loss (on the unpadded path its
    outputs are zeros, on the padded path whatever the padding computed)."""
    return labels if attention_mask is None else labels.masked_fill(~attention_mask.bool(), -100)


def first_tokens(hidden_states, attention_mask=None, layout=None):
    """What sequence-level heads read: the first real token ([CLS]) of each row, [B, 1, C] (position 0 unless the batch
    is left-padded; a row without any real token reads position 0), or of each sequence of a packed batch, [S, 1, C]."""
    if layout is not None and layout.packed:
        return layout.first_tokens(layout.unpad(hidden_states))[:, None]
    if attention_mask is None:
        return hidden_states[:, :1]
    first = attention_mask.to(torch.int8).argmax(-1)  # [B]: the first real column
    return hidden_states.gather(1, first[:, None, None].expand(-1, 1, hidden_states.shape[-1]))


class DebertaCustomContextPooler(nn.Module):
    """First token -> dropout -> dense -> activation."""

    def __init__(self, config: DebertaCustomConfig):
        super().__init__()
        size = config.pooler_hidden_size or config.hidden_size
        self.dense = nn.Linear(config.hidden_size, size)
        self.dropout = nn.Dropout(config.pooler_dropout)
        self.activation = ACT2FN[config.pooler_hidden_act]

    def forward(self, hidden_states):
        return self.activation(self.dense(self.dropout(hidden_states[:, 0])))


def _classifier_dropout(config: DebertaCustomConfig) -> nn.Dropout:
    return nn.Dropout(config.hidden_dropout_prob if config.cls_dropout is None else config.cls_dropout)


class DebertaCustomForSequenceClassification(DebertaCustomPreTrainedModel):
    """Pooled first token -> classifier. The loss follows config.problem_type as transformers does: regression
    (MSE), single_label_classification (cross-entropy) or multi_label_classification (BCE with logits); when unset
    it is inferred from num_labels and the labels' dtype."""

    def __init__(self, config: DebertaCustomConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.deberta = DebertaCustomModel(config)
        self.pooler = DebertaCustomContextPooler(config)
        self.dropout = _classifier_dropout(config)
        self.classifier = nn.Linear(config.pooler_hidden_size or config.hidden_size, config.num_labels)
        self.post_init()

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        inputs_embeds=None,
        labels=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
        **kwargs,
    ):
        """A packed batch (DataCollatorWithFlattening) gets one answer per sequence: logits [S, num_labels], labels
        [S] (its first token pooled)."""
        return_dict = self.config.return_dict if return_dict is None else return_dict
        layout = self.deberta.sequence_layout(input_ids, inputs_embeds, attention_mask, position_ids,
                                              output_attentions, **kwargs)
        outputs = self.deberta(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
                               output_attentions, output_hidden_states, return_dict=True, sequence_layout=layout)
        pooled = self.pooler(first_tokens(outputs.last_hidden_state, attention_mask, layout))
        logits = self.classifier(self.dropout(pooled))  # [B, num_labels], or [S, num_labels] packed
        if labels is not None and layout is not None and layout.packed and labels.shape[0] != logits.shape[0]:
            raise ValueError(f"A packed batch of {logits.shape[0]} sequences takes one label per packed sequence, "
                             f"[{logits.shape[0]}, ...]; got labels of shape {tuple(labels.shape)}")
        loss = None if labels is None else self.sequence_classification_loss(logits, labels)
        return _head_output(SequenceClassifierOutput, return_dict, outputs, loss=loss, logits=logits)

    def sequence_classification_loss(self, logits, labels):
        problem_type = self.config.problem_type
        if problem_type is None:
            if self.num_labels == 1:
                problem_type = "regression"
            elif labels.dtype in (torch.long, torch.int, torch.int16, torch.int8, torch.uint8):
                problem_type = "single_label_classification"
            else:
                problem_type = "multi_label_classification"
        batch = logits.shape[0]
        if problem_type == "regression":
            if labels.numel() != batch * self.num_labels:
                raise ValueError(f"Regression labels have shape {tuple(labels.shape)}; expected {batch} x "
                                 f"{self.num_labels} values")
            return F.mse_loss(logits.float().view(-1), labels.float().view(-1))
        if problem_type == "single_label_classification":
            if labels.dim() == 2 and labels.shape[1] == 1:
                labels = labels[:, 0]
            check_labels(labels, (batch,), self.num_labels, "labels")
            return mean_over_items(cross_entropy_sum(logits, labels), (labels != -100).sum())
        if problem_type == "multi_label_classification":
            if tuple(labels.shape) != (batch, self.num_labels):
                raise ValueError(f"Multi-label labels have shape {tuple(labels.shape)}, expected "
                                 f"{(batch, self.num_labels)}")
            return F.binary_cross_entropy_with_logits(logits.float(), labels.float())
        raise ValueError(f"Unknown config.problem_type {problem_type!r}")


class DebertaCustomForTokenClassification(DebertaCustomPreTrainedModel):
    accepts_loss_kwargs = True  # num_items_in_batch, as for the masked-LM head

    def __init__(self, config: DebertaCustomConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.deberta = DebertaCustomModel(config)
        self.dropout = _classifier_dropout(config)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        inputs_embeds=None,
        labels=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
        num_items_in_batch=None,
        **kwargs,
    ):
        return_dict = self.config.return_dict if return_dict is None else return_dict
        layout = self.deberta.sequence_layout(input_ids, inputs_embeds, attention_mask, position_ids,
                                              output_attentions, **kwargs)
        outputs = self.deberta(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
                               output_attentions, output_hidden_states, return_dict=True, sequence_layout=layout)
        logits = on_real_tokens(lambda h: self.classifier(self.dropout(h)), outputs.last_hidden_state, layout)
        loss = None
        if labels is not None:
            check_labels(labels, logits.shape[:2], self.num_labels, "labels")
            labels = ignore_padding(labels, attention_mask)
            loss = mean_over_items(cross_entropy_sum(logits, labels), (labels != -100).sum(), num_items_in_batch)
        return _head_output(TokenClassifierOutput, return_dict, outputs, loss=loss, logits=logits)


class DebertaCustomForQuestionAnswering(DebertaCustomPreTrainedModel):
    """Span extraction: start and end logits per token. The span softmax runs over each sequence's real tokens;
    positions outside the sequence, or on padding, are ignored in the loss. In a packed batch (DataCollatorWithFlattening)
    start_positions / end_positions [S] count from each sequence's first token."""

    def __init__(self, config: DebertaCustomConfig):
        super().__init__(config)
        if config.num_labels != 2:
            raise ValueError(f"Question answering needs num_labels=2 (start, end), got {config.num_labels}")
        self.deberta = DebertaCustomModel(config)
        self.qa_outputs = nn.Linear(config.hidden_size, 2)
        self.post_init()

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        inputs_embeds=None,
        start_positions=None,
        end_positions=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
        **kwargs,
    ):
        return_dict = self.config.return_dict if return_dict is None else return_dict
        layout = self.deberta.sequence_layout(input_ids, inputs_embeds, attention_mask, position_ids,
                                              output_attentions, **kwargs)
        outputs = self.deberta(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
                               output_attentions, output_hidden_states, return_dict=True, sequence_layout=layout)
        start_logits, end_logits = on_real_tokens(self.qa_outputs, outputs.last_hidden_state, layout).unbind(-1)
        loss = None
        if (start_positions is None) != (end_positions is None):
            raise ValueError("Pass both start_positions and end_positions, or neither")
        if start_positions is not None:
            spans, real = self.spans(start_logits, end_logits, attention_mask, layout)  # [2, rows, length]
            rows, length = real.shape
            positions = []
            for name, value in (("start_positions", start_positions), ("end_positions", end_positions)):
                if value.is_floating_point():
                    raise TypeError(f"{name} must be integer token positions, got dtype {value.dtype}")
                value = value.reshape(-1)
                if value.shape[0] != rows:
                    raise ValueError(f"{name} has {value.shape[0]} entries for {rows} "
                                     f"{'packed sequences' if layout is not None and layout.packed else 'rows'}")
                value = value.clamp(0, length)  # as transformers: below 0 -> 0; past the window -> ignored
                on_token = F.pad(real, (0, 1)).gather(1, value[:, None])[:, 0]  # [rows]: not padding, in the window
                positions.append(value.masked_fill(~on_token, -100))  # the answer is not in this window
            loss = sum(mean_over_items(cross_entropy_sum(logits, target), (target != -100).sum())
                       for logits, target in zip(spans, positions, strict=True)) / 2
        return _head_output(QuestionAnsweringModelOutput, return_dict, outputs, loss=loss, start_logits=start_logits,
                            end_logits=end_logits)

    @staticmethod
    def spans(start_logits, end_logits, attention_mask, layout):
        """The rows the span softmax runs over: (start and end logits [2, rows, length] in float32 with every place that
        holds no real token at the lowest value, real [rows, length] bool). A packed batch's rows are its sequences,
        laid out from their first token (the layout's grid)."""
        logits = torch.stack([start_logits, end_logits]).float()  # [2, B, N]
        if layout is not None and layout.packed:
            tokens = layout.unpad(logits.permute(1, 2, 0))  # [T, 2]
            logits = layout.by_sequence(layout.to_grid(tokens)).permute(2, 0, 1)  # [2, S, W]
            real = layout.by_sequence(layout.to_grid(torch.ones_like(tokens[:, 0], dtype=torch.bool)))  # [S, W]
        elif attention_mask is not None:
            real = attention_mask.bool()
        else:
            real = torch.ones_like(start_logits, dtype=torch.bool)
        return logits.masked_fill(~real, torch.finfo(logits.dtype).min), real


class DebertaCustomForMultipleChoice(DebertaCustomPreTrainedModel):
    """Inputs [B, num_choices, N]: each choice is encoded, pooled and scored; softmax over choices."""

    def __init__(self, config: DebertaCustomConfig):
        super().__init__(config)
        self.deberta = DebertaCustomModel(config)
        self.pooler = DebertaCustomContextPooler(config)
        self.dropout = _classifier_dropout(config)
        self.classifier = nn.Linear(config.pooler_hidden_size or config.hidden_size, 1)
        self.post_init()

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        inputs_embeds=None,
        labels=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
        **kwargs,
    ):
        return_dict = self.config.return_dict if return_dict is None else return_dict
        if any(value is not None for value in kwargs.values()):
            raise ValueError(f"Multiple choice does not take packed batches (got {sorted(kwargs)}): each choice is a "
                             "row of [batch, num_choices, length] input")
        reference = input_ids if input_ids is not None else inputs_embeds
        if reference is None:
            raise ValueError("Pass exactly one of input_ids and inputs_embeds")
        expected_rank = 3 if input_ids is not None else 4
        if reference.dim() != expected_rank:
            raise ValueError(
                f"Multiple choice takes {'input_ids' if input_ids is not None else 'inputs_embeds'} of rank "
                f"{expected_rank} ([batch, num_choices, length{', hidden' if expected_rank == 4 else ''}]), "
                f"got shape {tuple(reference.shape)}"
            )
        batch, num_choices = reference.shape[:2]

        def flatten(tensor):  # [B, K, N, ...] -> [B * K, N, ...]
            return None if tensor is None else tensor.reshape(batch * num_choices, *tensor.shape[2:])

        for name, tensor in (("attention_mask", attention_mask), ("token_type_ids", token_type_ids),
                             ("position_ids", position_ids)):
            if tensor is not None and tuple(tensor.shape) != tuple(reference.shape[:3]):
                raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected {tuple(reference.shape[:3])}")
        outputs = self.deberta(flatten(input_ids), flatten(attention_mask), flatten(token_type_ids),
                               flatten(position_ids), flatten(inputs_embeds), output_attentions,
                               output_hidden_states, return_dict=True)
        pooled = self.pooler(first_tokens(outputs.last_hidden_state, flatten(attention_mask)))
        logits = self.classifier(self.dropout(pooled))  # [B * K, 1]
        logits = logits.view(batch, num_choices)
        loss = None
        if labels is not None:
            check_labels(labels, (batch,), num_choices, "labels")
            loss = mean_over_items(cross_entropy_sum(logits, labels), (labels != -100).sum())
        return _head_output(MultipleChoiceModelOutput, return_dict, outputs, loss=loss, logits=logits)


class DebertaCustomRTDHead(nn.Module):
    """Replaced-token-detection head (DeBERTaV3), official names `mask_predictions.{dense,LayerNorm,classifier}`:
    LayerNorm(h + h[CLS]) -> dense -> activation -> one logit per token."""

    def __init__(self, config: DebertaCustomConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.activation = ACT2FN[config.hidden_act]
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.classifier = nn.Linear(config.hidden_size, 1)

    def forward(self, hidden_states, attention_mask=None, layout=None):
        """[B, N, C] -> [B, N] logits. h[CLS] is the first real token of each row, or of each sequence of a packed
        batch; with a SequenceLayout the head runs on the real tokens only (zeros at padding)."""
        if layout is None:
            return self.token_logits(hidden_states, first_tokens(hidden_states, attention_mask))
        tokens = layout.unpad(hidden_states)  # [T, C]
        return layout.pad(self.token_logits(tokens, layout.first_token_of_each(tokens)))

    def token_logits(self, hidden_states, cls_states):
        hidden_states = self.LayerNorm(hidden_states + cls_states)
        return self.classifier(self.activation(self.dense(hidden_states))).squeeze(-1)  # [B, N] or [T]



@dataclass
class ReplacedTokenDetectionOutput(ModelOutput):
    """loss: BCE over non-padding tokens; logits [B, N]: > 0 means "replaced"."""

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


class DebertaCustomForReplacedTokenDetection(DebertaCustomPreTrainedModel):
    """The DeBERTaV3 discriminator: one logit per token saying whether it was replaced. `labels` [B, N] hold 1
    (replaced), 0 (original) or -100 (ignored); padding never counts (put -100 there too when training with
    gradient accumulation: the Trainer's num_items_in_batch counts every label that is not -100)."""

    accepts_loss_kwargs = True

    def __init__(self, config: DebertaCustomConfig):
        super().__init__(config)
        self.deberta = DebertaCustomModel(config)
        self.mask_predictions = DebertaCustomRTDHead(config)
        self.post_init()

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        inputs_embeds=None,
        labels=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
        num_items_in_batch=None,
        **kwargs,
    ):
        return_dict = self.config.return_dict if return_dict is None else return_dict
        layout = self.deberta.sequence_layout(input_ids, inputs_embeds, attention_mask, position_ids,
                                              output_attentions, **kwargs)
        outputs = self.deberta(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
                               output_attentions, output_hidden_states, return_dict=True, sequence_layout=layout)
        logits = self.mask_predictions(outputs.last_hidden_state, attention_mask, layout)  # [B, N]
        loss = None
        if labels is not None:
            check_labels(labels, logits.shape, 2, "labels")
            counted = labels != -100
            if attention_mask is not None:
                counted = counted & attention_mask.bool()
            loss = mean_over_items(binary_cross_entropy_sum(logits, labels, counted), counted.sum(),
                                    num_items_in_batch)
        return _head_output(ReplacedTokenDetectionOutput, return_dict, outputs, loss=loss, logits=logits)


__all__ = [
    "DebertaCustomPreTrainedModel",
    "DebertaCustomModel",
    "DebertaCustomForMaskedLM",
    "DebertaCustomForSequenceClassification",
    "DebertaCustomForTokenClassification",
    "DebertaCustomForQuestionAnswering",
    "DebertaCustomForMultipleChoice",
    "DebertaCustomForReplacedTokenDetection",
]
