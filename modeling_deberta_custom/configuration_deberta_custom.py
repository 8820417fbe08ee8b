"""Configuration of the DeBERTa family (v1, v2, v3): every default in one place; each field validated on creation,
how fields fit together when a model is built from it.

This file is copied next to the weights by `save_pretrained`, so it imports only transformers and the standard library.
"""

from transformers import PretrainedConfig
from transformers.activations import ACT2FN

POSITION_ATTENTION_TYPES = ("c2p", "p2c")
ATTENTION_VARIANTS = ("v1", "v2")
EMBEDDING_SHARING_MODES = ("gdes", "es", "none")
MODEL_TYPE = "deberta_custom"
OFFICIAL_MODEL_TYPES = ("deberta", "deberta-v2")

# What transformers' DebertaConfig / DebertaV2Config assume for a field an official config.json leaves out (their
# class defaults, and the getattr fallbacks of their modeling code). Our own defaults describe v3-base instead, so an
# official file must be read against these.
_OFFICIAL_DEFAULTS = {
    "deberta-v2": dict(
        vocab_size=128100, hidden_size=1536, num_hidden_layers=24, num_attention_heads=24, intermediate_size=6144,
        hidden_act="gelu", hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, max_position_embeddings=512,
        type_vocab_size=0, initializer_range=0.02, layer_norm_eps=1e-7, relative_attention=False,
        max_relative_positions=-1, pad_token_id=0, position_biased_input=True, pos_att_type=None, pooler_dropout=0.0,
        pooler_hidden_act="gelu", position_buckets=-1, share_att_key=False, norm_rel_ebd="none",
        attention_head_size=None, conv_kernel_size=0, conv_groups=1, conv_act="tanh", embedding_size=None,
        cls_dropout=None,
    ),
    "deberta": dict(
        vocab_size=50265, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
        hidden_act="gelu", hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, max_position_embeddings=512,
        type_vocab_size=0, initializer_range=0.02, layer_norm_eps=1e-7, relative_attention=False,
        max_relative_positions=-1, pad_token_id=0, position_biased_input=True, pos_att_type=None, pooler_dropout=0.0,
        pooler_hidden_act="gelu", embedding_size=None, cls_dropout=None,
    ),
}
# Fields of the official configs that mean nothing here (transformers-only switches).
_OFFICIAL_ONLY_FIELDS = ("legacy", "z_steps", "model_type", "transformers_version", "auto_map", "architectures")


def config_dict_from_official(config_dict: dict) -> dict:
    """Translate an official config.json (model_type `deberta-v2` or `deberta`) into DebertaCustomConfig fields,
    filling absent fields with what transformers assumes for them."""
    model_type = config_dict.get("model_type")
    if model_type not in OFFICIAL_MODEL_TYPES:
        raise ValueError(f"Not an official DeBERTa config: model_type={model_type!r}, expected {OFFICIAL_MODEL_TYPES}")
    if config_dict.get("talking_head"):
        raise ValueError("talking_head=True (a DeBERTa v1 research option) is not supported")
    translated = dict(_OFFICIAL_DEFAULTS[model_type])
    translated.update({k: v for k, v in config_dict.items() if k not in _OFFICIAL_ONLY_FIELDS and k != "talking_head"})
    if model_type == "deberta":
        translated.update(attention_variant="v1", position_buckets=-1, share_att_key=False, norm_rel_ebd="none",
                          attention_head_size=None, conv_kernel_size=0)
    else:
        translated["attention_variant"] = "v2"
    if translated.get("pooler_hidden_size") == translated["hidden_size"]:
        translated["pooler_hidden_size"] = None
    translated["norm_rel_ebd"] = "layer_norm" if "layer_norm" in str(translated["norm_rel_ebd"]) else "none"
    return translated


def _position_attention_terms(pos_att_type) -> list:
    """pos_att_type as a list of terms: None -> [], "p2c|c2p" -> ["p2c", "c2p"]. transformers' DebertaV2Config keeps
    "None" as the item "none" (written to config.json as ["none"]), which its attention matches with no term; here it is
    dropped, so ["none"] and [] mean the same."""
    if pos_att_type is None:
        return []
    if isinstance(pos_att_type, str):
        pos_att_type = [item.strip() for item in pos_att_type.lower().split("|") if item.strip()]
    return [item for item in pos_att_type if not (isinstance(item, str) and item.lower() == "none")]


def readable_config_dict(config_dict: dict, source=None) -> dict:
    """A config.json dict as DebertaCustomConfig reads it: ours (model_type `deberta_custom`, or none given) as it
    is, an official one translated; any other model_type raises ValueError naming it, before an unrelated field
    would fail validation."""
    model_type = config_dict.get("model_type")
    if model_type in OFFICIAL_MODEL_TYPES:
        return config_dict_from_official(config_dict)
    if model_type not in (None, "", MODEL_TYPE):
        where = f" in {source}" if source else ""
        raise ValueError(
            f"The config{where} has model_type={model_type!r}, which DebertaCustomConfig does not read: accepted are "
            f"{MODEL_TYPE!r} (this package) and the official DeBERTa types {', '.join(map(repr, OFFICIAL_MODEL_TYPES))}"
        )
    return config_dict


class DebertaCustomConfig(PretrainedConfig):
    r"""
    Configuration for DeBERTa models. The defaults describe DeBERTa-v3-base.

    Field names follow transformers' `DebertaV2Config`, including the fields that transformers only reads through
    `getattr` (position_buckets, share_att_key, norm_rel_ebd, attention_head_size, conv_*, embedding_size, cls_dropout),
    so an official `config.json` maps onto this class field by field (see `loading.py`).

    Architecture:
        attention_variant (`str`, "v2"): "v2" (DeBERTa v2 and v3: separate query/key/value projections) or "v1"
            (DeBERTa v1: a fused `in_proj` without bias plus `q_bias` / `v_bias`, `pos_proj` / `pos_q_proj` for the
            position terms, no position buckets).
        relative_attention (`bool`, True): use disentangled attention with relative position embeddings.
        pos_att_type (`list[str]`, ["p2c", "c2p"]): which position terms to add: "c2p" (content-to-position) and/or
            "p2c" (position-to-content). A string "p2c|c2p" is accepted as in the original configs. Each term counts
            in the score scale 1 / sqrt(head_size * (1 + len(pos_att_type))). "none" (any case, alone or as an item,
            as transformers' own test config writes it) adds no term: it is read as []. (transformers' v1 port,
            DebertaModel, still counts a "none" item in its scale; its v2 port and this class count c2p/p2c only.)
        position_buckets (`int`, 256): number of log buckets per direction for relative distances; -1 disables
            bucketing (plain clipping at max_relative_positions).
        max_relative_positions (`int`, -1): span of relative distances; -1 means max_position_embeddings. Also the
            `max_position` of the log buckets. Distances beyond it are not clamped before bucketing (transformers'
            behaviour; the original code clamps them): far-away keys share the outermost table rows.
        share_att_key (`bool`, True): project relative embeddings with the content query/key projections instead
            of separate `pos_key_proj` / `pos_query_proj`.
        norm_rel_ebd (`str`, "layer_norm"): "layer_norm" passes the relative embedding table through
            `encoder.LayerNorm`; "none" leaves it as is.
        position_biased_input (`bool`, False): add absolute position embeddings at the input (BERT style, v1).
            The absolute table exists either way: the Enhanced Mask Decoder uses it.
        attention_head_size (`int`, None): size of each head; None means hidden_size // num_attention_heads.
        conv_kernel_size (`int`, 0): > 0 adds a convolution after the first layer (v2-xlarge and larger).
        conv_groups (`int`, 1), conv_act (`str`, "tanh"): groups and activation of that convolution.
        embedding_size (`int`, None): width of the word embeddings; None means hidden_size, otherwise a linear
            `embed_proj` maps it to hidden_size.

    Speed:
        unpad_inputs (`bool`, True): for padded batches (an attention_mask with zeros), run every token-wise layer
            (embeddings, projections, feed-forward, LayerNorms, heads) on the real tokens only, and attention on the
            sequences laid out side by side (modeling_deberta_custom/padding.py). Outputs keep their padded shapes
            and, at real tokens, the padded path's values; padding positions of the hidden states hold zeros (a
            row without any real token holds zeros throughout, and sequence-level heads read zeros for it). Costs
            one host read per forward (the number of real tokens: a device sync on accelerators). Where values
            cannot be read (the meta device, torch.compile, torch.export, TorchScript tracing) and with
            output_attentions the padded path runs. Packed batches (DataCollatorWithFlattening) always run
            padding-free, whatever this says. On both paths sequence-level heads read each row's first real token
            (position 0 unless the batch is left-padded) and token-level losses never count padding.

    Heads:
        pooler_hidden_size (`int`, None), pooler_hidden_act (`str`, "gelu"), pooler_dropout (`float`, 0.0): the
            context pooler (first real token -> dropout -> dense -> activation) of sequence-level heads.
        cls_dropout (`float`, None): dropout before classifiers; None means hidden_dropout_prob.
        use_enhanced_mask_decoder (`bool`, True): the masked-LM head decodes with EMD when absolute positions are
            not at the input (position_biased_input false); otherwise it reads the last layer as BERT does.
        emd_num_passes (`int`, 2): how many times EMD applies the last encoder layer (shared weights).
        sparse_mlm_logits (`bool`, True): in training with labels, compute vocabulary logits only where there are
            labels (the vocabulary projection is the largest cost of masked-LM pretraining with a 128k vocabulary);
            the returned logits are then [R, vocab_size] at `prediction_positions(labels, sparse_mlm_max_fraction)`,
            the labelled positions first in row-major order. The loss is the dense one for every batch, whatever its
            number of labels. Eager: R = the number of labelled positions, read on the host (free on CPU, one device
            sync per step on accelerators). False: dense logits [B, N, vocab_size], no host read.
        sparse_mlm_max_fraction (`float`, 0.25): under torch.compile / torch.export only, where no shape may depend on
            the data: R = ceil(sparse_mlm_max_fraction * batch * length), fixed by the shapes (one graph). A batch
            with more labelled positions is still exact: those beyond R are scored by a dense pass under torch.cond
            (that step then pays for the dense projection), so keep it above the masking rate with a margin for small
            batches. RTD's generator follows both fields in training and evaluation alike.

    Replaced-token-detection pretraining (DeBERTaV3):
        rtd_generator_num_layers (`int`, None): generator depth; None means half the discriminator's.
        rtd_generator_hidden_size / rtd_generator_intermediate_size / rtd_generator_num_attention_heads (`int`, None):
            generator width; None means the discriminator's.
        rtd_embedding_sharing (`str`, "gdes"): "gdes" (gradient-disentangled), "es" (plain sharing) or "none".
        rtd_loss_weight (`float`, 50.0): lambda in loss = MLM + lambda * RTD (the paper's 50; the original code's 10).
        rtd_mask_probability (`float`, 0.15): fraction of tokens the generator predicts.
        rtd_sampling_temperature (`float`, 1.0): temperature of the generator's sampling of replacements.
    """

    model_type = MODEL_TYPE

    def __init__(
        self,
        vocab_size=128100,
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=3072,
        hidden_act="gelu",
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
        max_position_embeddings=512,
        type_vocab_size=0,
        initializer_range=0.02,
        layer_norm_eps=1e-7,
        attention_variant="v2",
        relative_attention=True,
        pos_att_type=("p2c", "c2p"),
        position_buckets=256,
        max_relative_positions=-1,
        share_att_key=True,
        norm_rel_ebd="layer_norm",
        position_biased_input=False,
        attention_head_size=None,
        conv_kernel_size=0,
        conv_groups=1,
        conv_act="tanh",
        embedding_size=None,
        pooler_hidden_size=None,
        pooler_hidden_act="gelu",
        pooler_dropout=0.0,
        cls_dropout=None,
        use_enhanced_mask_decoder=True,
        emd_num_passes=2,
        sparse_mlm_logits=True,
        sparse_mlm_max_fraction=0.25,
        rtd_generator_num_layers=None,
        rtd_generator_hidden_size=None,
        rtd_generator_intermediate_size=None,
        rtd_generator_num_attention_heads=None,
        rtd_embedding_sharing="gdes",
        rtd_loss_weight=50.0,
        rtd_mask_probability=0.15,
        rtd_sampling_temperature=1.0,
        unpad_inputs=True,
        pad_token_id=0,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act
        self.hidden_dropout_prob = hidden_dropout_prob
        self.attention_probs_dropout_prob = attention_probs_dropout_prob
        self.max_position_embeddings = max_position_embeddings
        self.type_vocab_size = type_vocab_size
        self.initializer_range = initializer_range
        self.layer_norm_eps = layer_norm_eps
        self.attention_variant = attention_variant
        self.relative_attention = relative_attention
        self.pos_att_type = _position_attention_terms(pos_att_type)
        self.position_buckets = position_buckets
        self.max_relative_positions = max_relative_positions
        self.share_att_key = share_att_key
        self.norm_rel_ebd = norm_rel_ebd
        self.position_biased_input = position_biased_input
        self.attention_head_size = attention_head_size
        self.conv_kernel_size = conv_kernel_size
        self.conv_groups = conv_groups
        self.conv_act = conv_act
        self.embedding_size = embedding_size
        self.pooler_hidden_size = pooler_hidden_size
        self.pooler_hidden_act = pooler_hidden_act
        self.pooler_dropout = pooler_dropout
        self.cls_dropout = cls_dropout
        self.use_enhanced_mask_decoder = use_enhanced_mask_decoder
        self.emd_num_passes = emd_num_passes
        self.sparse_mlm_logits = sparse_mlm_logits
        self.sparse_mlm_max_fraction = sparse_mlm_max_fraction
        self.rtd_generator_num_layers = rtd_generator_num_layers
        self.rtd_generator_hidden_size = rtd_generator_hidden_size
        self.rtd_generator_intermediate_size = rtd_generator_intermediate_size
        self.rtd_generator_num_attention_heads = rtd_generator_num_attention_heads
        self.rtd_embedding_sharing = rtd_embedding_sharing
        self.rtd_loss_weight = rtd_loss_weight
        self.rtd_mask_probability = rtd_mask_probability
        self.rtd_sampling_temperature = rtd_sampling_temperature
        self.unpad_inputs = unpad_inputs
        super().__init__(pad_token_id=pad_token_id, **kwargs)
        self.validate_fields()

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path, **kwargs):
        """Reads official config.json files (translated here, so transformers does not warn that the model_type
        differs) and refuses foreign ones by their model_type."""
        config_dict, kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        return readable_config_dict(config_dict, source=pretrained_model_name_or_path), kwargs

    @classmethod
    def from_dict(cls, config_dict, **kwargs):
        """Also reads official configs (model_type `deberta-v2` / `deberta`), translating their fields."""
        config_dict = readable_config_dict(config_dict)
        result = super().from_dict(config_dict, **kwargs)
        # Keyword overrides are applied after __init__, so check the final values again.
        (result[0] if isinstance(result, tuple) else result).validate_fields()
        return result

    def to_official_dict(self) -> dict:
        """The config as transformers' DebertaV2Config (or DebertaConfig for v1) reads it, every field explicit."""
        official = self.to_dict()
        for field in ("attention_variant", "use_enhanced_mask_decoder", "emd_num_passes", "sparse_mlm_logits",
                      "sparse_mlm_max_fraction", "unpad_inputs",
                      "auto_map", "architectures", "transformers_version") + tuple(
                          k for k in official if k.startswith("rtd_")):
            official.pop(field, None)
        official["model_type"] = "deberta" if self.attention_variant == "v1" else "deberta-v2"
        official["pooler_hidden_size"] = self.pooler_hidden_size or self.hidden_size
        # transformers reads these with getattr(config, name, default): an explicit null would reach nn.Embedding /
        # nn.Linear as a size, so write the resolved values.
        official["embedding_size"] = self.word_embedding_size
        official["attention_head_size"] = self.head_size
        official["legacy"] = False  # transformers then names its masked-LM head lm_predictions.lm_head, as we do
        return official

    # Derived sizes: one place computes them so modules never re-derive defaults.
    @property
    def head_size(self) -> int:
        return self.attention_head_size or self.hidden_size // self.num_attention_heads

    @property
    def word_embedding_size(self) -> int:
        return self.embedding_size or self.hidden_size

    @property
    def relative_span(self) -> int:
        """Half the size of the relative embedding table: distances map to indices in [0, 2 * span)."""
        if self.position_buckets > 0:
            return self.position_buckets
        return self.max_relative_distance

    @property
    def max_relative_distance(self) -> int:
        return self.max_relative_positions if self.max_relative_positions >= 1 else self.max_position_embeddings

    @property
    def uses_enhanced_mask_decoder(self) -> bool:
        return self.use_enhanced_mask_decoder and not self.position_biased_input

    def _require(self, condition, field, message):
        if not condition:
            raise ValueError(f"DebertaCustomConfig.{field}={getattr(self, field)!r} is invalid: {message}")

    def validate_fields(self):
        """Raise ValueError naming the first field whose value no config can hold: a wrong type, an unknown name, a
        size or probability out of range. Run on construction and on loading; how fields fit together is checked when
        a model is built (`validate_structure`)."""
        require = self._require
        for field in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                      "max_position_embeddings", "emd_num_passes", "conv_groups"):
            value = getattr(self, field)
            require(isinstance(value, int) and not isinstance(value, bool) and value > 0, field,
                    "must be a positive integer")
        for field in ("attention_head_size", "embedding_size", "pooler_hidden_size", "rtd_generator_num_layers",
                      "rtd_generator_hidden_size", "rtd_generator_intermediate_size",
                      "rtd_generator_num_attention_heads"):
            value = getattr(self, field)
            require(value is None or (isinstance(value, int) and value > 0), field,
                    "must be None or a positive integer")
        require(isinstance(self.type_vocab_size, int) and self.type_vocab_size >= 0, "type_vocab_size",
                "must be a non-negative integer (0 disables token types)")
        for field in ("hidden_dropout_prob", "attention_probs_dropout_prob", "pooler_dropout", "cls_dropout"):
            value = getattr(self, field)
            require(value is None or 0.0 <= value < 1.0, field, "must be a probability in [0, 1)")
        require(self.layer_norm_eps > 0, "layer_norm_eps", "must be positive")
        require(self.initializer_range > 0, "initializer_range", "must be positive")
        require(self.attention_variant in ATTENTION_VARIANTS, "attention_variant", f"expected one of {ATTENTION_VARIANTS}")
        unknown = [item for item in self.pos_att_type if item not in POSITION_ATTENTION_TYPES]
        require(not unknown, "pos_att_type", f"unknown item(s) {unknown}; allowed: {POSITION_ATTENTION_TYPES}")
        require(len(set(self.pos_att_type)) == len(self.pos_att_type), "pos_att_type", "items must not repeat")
        require(self.position_buckets == -1 or self.position_buckets > 1, "position_buckets",
                "must be -1 (no buckets) or at least 2")
        require(self.max_relative_positions == -1 or self.max_relative_positions > 1, "max_relative_positions",
                "must be -1 (use max_position_embeddings) or at least 2")
        require(self.norm_rel_ebd in ("none", "layer_norm"), "norm_rel_ebd", "expected 'none' or 'layer_norm'")
        require(self.hidden_act in ACT2FN, "hidden_act", "unknown activation")
        require(self.pooler_hidden_act in ACT2FN, "pooler_hidden_act", "unknown activation")
        require(self.conv_act in ACT2FN, "conv_act", "unknown activation")
        require(isinstance(self.conv_kernel_size, int) and self.conv_kernel_size >= 0, "conv_kernel_size",
                "must be 0 (no convolution) or a positive integer")
        require(self.conv_kernel_size % 2 == 1 or self.conv_kernel_size == 0, "conv_kernel_size",
                "must be odd so the length is preserved")
        require(self.rtd_embedding_sharing in EMBEDDING_SHARING_MODES, "rtd_embedding_sharing",
                f"expected one of {EMBEDDING_SHARING_MODES}")
        require(0.0 < self.sparse_mlm_max_fraction <= 1.0, "sparse_mlm_max_fraction", "must be in (0, 1]")
        require(self.rtd_loss_weight >= 0, "rtd_loss_weight", "must be non-negative")
        require(0.0 < self.rtd_mask_probability < 1.0, "rtd_mask_probability", "must be in (0, 1)")
        require(self.rtd_sampling_temperature > 0, "rtd_sampling_temperature", "must be positive")
        require(isinstance(self.unpad_inputs, bool), "unpad_inputs", "must be True or False")

    def validate_structure(self):
        """Raise ValueError naming the first field whose value does not fit the others (heads that do not divide the
        width, buckets beyond the relative span, options DeBERTa v1 lacks). Every model class runs it when it is
        built: as with transformers' configs, a config accepts such values, so that it can be built, edited and then
        fixed (transformers' own tests build DebertaV2Config(hidden_size=37) with 12 heads)."""
        self.validate_fields()  # fields may have been edited since construction
        require = self._require
        require(self.hidden_size % self.num_attention_heads == 0 or self.attention_head_size is not None,
                "num_attention_heads", f"must divide hidden_size={self.hidden_size}")
        require(self.head_size * self.num_attention_heads == self.hidden_size, "attention_head_size",
                f"num_attention_heads * head size must equal hidden_size={self.hidden_size}")
        if self.position_buckets > 0:
            require(self.max_relative_distance > self.position_buckets // 2 + 1, "position_buckets",
                    f"half of it must stay below max_relative_positions={self.max_relative_distance} - 1")
        if self.conv_kernel_size > 0:
            require(self.hidden_size % self.conv_groups == 0, "conv_groups",
                    f"must divide hidden_size={self.hidden_size}")
        if self.attention_variant == "v1":
            require(self.position_buckets <= 0, "position_buckets", "DeBERTa v1 attention has no position buckets")
            require(not self.share_att_key, "share_att_key", "DeBERTa v1 attention has separate position projections")
            require(self.norm_rel_ebd == "none", "norm_rel_ebd", "DeBERTa v1 does not normalise relative embeddings")


__all__ = ["DebertaCustomConfig"]
