"""DebertaCustomConfig: the presets in configuration/, their parameter counts, validation of every field, translation
of official configs (model_type deberta-v2 / deberta) and round trips."""

import json
import re

import pytest
import torch
import transformers
from helpers import REPO_ROOT, SHARED_DATA, requires_shared_data

from modeling_deberta_custom import (
    DebertaCustomConfig,
    DebertaCustomForMaskedLM,
    DebertaCustomForRTDPreTraining,
    DebertaCustomModel,
)
from modeling_deberta_custom.configuration_deberta_custom import config_dict_from_official

PRESET_DIR = REPO_ROOT / "configuration"
PRESETS = ("tiny", "xsmall", "small", "base", "large")
# The fields every preset must spell out, so that a preset does not silently change when a default does.
ARCHITECTURE_FIELDS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "attention_head_size",
    "intermediate_size", "hidden_act", "max_position_embeddings", "type_vocab_size", "layer_norm_eps",
    "attention_variant", "relative_attention", "pos_att_type", "position_buckets", "max_relative_positions",
    "share_att_key", "norm_rel_ebd", "position_biased_input", "conv_kernel_size", "embedding_size", "pad_token_id",
)
# (hidden, layers, heads, intermediate) of the official DeBERTa-v3 discriminators (rtd_*.json of the original code).
V3_SIZES = {
    "xsmall": (384, 12, 6, 1536),
    "small": (768, 6, 12, 3072),
    "base": (768, 12, 12, 3072),
    "large": (1024, 24, 16, 4096),
}

# Parameter counts of DebertaCustomModel (the backbone), measured, with this convention:
#   * "backbone" = every parameter except the word-embedding matrix AND except the absolute position table
#     (embeddings.position_embeddings, 512 x hidden). The table is kept in our model (the Enhanced Mask Decoder reads
#     it) but with position_biased_input=false the backbone itself never reads it, transformers' DebertaV2Model does
#     not have it, and the published figures (v3-base: 86M backbone + 98M embeddings = 184M) do not count it.
#   * "with embeddings" = backbone + the word-embedding matrix (vocab_size x hidden), still without the position
#     table. This is exactly the parameter count of transformers' DebertaV2Model on the same config.
# The relative embedding table (2 * 256 x hidden), every LayerNorm and every bias count in both.
EXACT_COUNTS = {  # preset: (backbone, with word embeddings)
    "tiny": (71_296, 583_296),
    "xsmall": (21_491_712, 70_682_112),
    "small": (42_923_520, 141_304_320),
    "base": (85_450_752, 183_831_552),
    "large": (302_837_760, 434_012_160),
}
# The figures Microsoft publishes for the backbones ("22M", "44M", "86M" / 85.5M, "304M"), rounded by them; ours must
# agree to within 3% (small is the loosest: 42.9M against the published 44M).
PUBLISHED_BACKBONE_MILLIONS = {"xsmall": 22, "small": 44, "base": 85.5, "large": 304}


def load_preset(name: str) -> DebertaCustomConfig:
    return DebertaCustomConfig.from_json_file(str(PRESET_DIR / f"{name}.json"))


def count_parameters(config: DebertaCustomConfig) -> tuple[int, int]:
    """(backbone without word embeddings and absolute position table, backbone with word embeddings): see above."""
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        model = DebertaCustomModel(config)
    total = sum(p.numel() for p in model.parameters())
    word = model.embeddings.word_embeddings.weight.numel()
    absolute = model.embeddings.position_embeddings.weight.numel()
    return total - word - absolute, total - absolute


# ----------------------------------------------------------------------------------------------------------------------
# Presets
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", PRESETS)
def test_preset_loads_and_lists_every_architecture_field(name):
    raw = json.loads((PRESET_DIR / f"{name}.json").read_text())
    assert raw["model_type"] == "deberta_custom"
    missing = [field for field in ARCHITECTURE_FIELDS if field not in raw]
    assert not missing, f"{name}.json does not list {missing}"
    config = load_preset(name)
    assert isinstance(config, DebertaCustomConfig)
    # from_json_file and from_dict of the same json agree, and every listed value arrives unchanged
    assert config.to_dict() == DebertaCustomConfig.from_dict(raw).to_dict()
    for field in ARCHITECTURE_FIELDS:
        assert getattr(config, field) == raw[field], field


def test_preset_readme_mentions_every_preset():
    readme = (PRESET_DIR / "README.md").read_text()
    for name in PRESETS:
        assert f"{name}.json" in readme


@pytest.mark.parametrize("name", sorted(V3_SIZES))
def test_preset_matches_official_v3_geometry(name):
    config = load_preset(name)
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads,
            config.intermediate_size) == V3_SIZES[name]
    assert config.head_size == 64
    assert config.vocab_size == 128100
    assert config.max_position_embeddings == 512
    assert config.position_buckets == 256
    assert config.relative_span == 256
    assert config.pos_att_type == ["p2c", "c2p"]
    assert config.share_att_key and config.relative_attention
    assert config.norm_rel_ebd == "layer_norm"
    assert config.position_biased_input is False
    assert config.layer_norm_eps == 1e-7
    assert config.type_vocab_size == 0
    assert config.attention_variant == "v2"
    assert config.rtd_generator_num_layers == config.num_hidden_layers // 2  # the original generators: half depth


@requires_shared_data
@pytest.mark.parametrize("name", sorted(V3_SIZES))
def test_preset_equals_the_original_rtd_config(name):
    """Each preset, read the way we read an official config, is the discriminator of the original rtd_<name>.json."""
    original = json.loads((SHARED_DATA / "deberta-configs" / "microsoft_DeBERTa" / f"rtd_{name}.json").read_text())
    official = DebertaCustomConfig.from_dict({**original["discriminator"], "model_type": "deberta-v2"})
    ours = load_preset(name)
    for field in ARCHITECTURE_FIELDS:
        assert getattr(official, field) == getattr(ours, field), field
    assert ours.rtd_generator_num_layers == original["generator"]["num_hidden_layers"]


def test_base_parameter_count_matches_deberta_v3_base():
    backbone, with_embeddings = count_parameters(load_preset("base"))
    assert round(backbone / 1e6, 1) == 85.5
    assert round(with_embeddings / 1e6, 1) == 183.8
    # The position table is what makes the difference: counting it would give 85.8M / 184.2M.
    assert round((backbone + 512 * 768) / 1e6, 1) == 85.8


@pytest.mark.parametrize("name", PRESETS)
def test_preset_parameter_counts(name):
    assert count_parameters(load_preset(name)) == EXACT_COUNTS[name]
    if name in PUBLISHED_BACKBONE_MILLIONS:
        backbone_millions = EXACT_COUNTS[name][0] / 1e6
        assert backbone_millions == pytest.approx(PUBLISHED_BACKBONE_MILLIONS[name], rel=0.03)


@pytest.mark.parametrize("name", ["tiny", "base"])
def test_parameter_count_equals_transformers_deberta_v2(name):
    """Cross-check of the convention: transformers' own DebertaV2Model on the same geometry (built from an official-
    style dict, not through our export) has exactly our 'with embeddings' count."""
    raw = json.loads((PRESET_DIR / f"{name}.json").read_text())
    official = {k: v for k, v in raw.items()
                if v is not None and k not in ("model_type", "attention_variant") and not k.startswith("rtd_")}
    with torch.device("meta"):
        reference = transformers.DebertaV2Model(transformers.DebertaV2Config(**official))
    assert sum(p.numel() for p in reference.parameters()) == EXACT_COUNTS[name][1]


# ----------------------------------------------------------------------------------------------------------------------
# Validation: every invalid value raises ValueError naming the field. A value no config can hold (a wrong type, an
# unknown name, a size or probability out of range) is refused at construction; values that do not fit together are
# refused when a model is built from them (transformers' convention: a config can be built, edited, then fixed).
# ----------------------------------------------------------------------------------------------------------------------

_V1 = dict(attention_variant="v1", position_buckets=-1, share_att_key=False, norm_rel_ebd="none")

INVALID = [
    # (field the message must name, overrides): refused at construction
    ("attention_head_size", dict(attention_head_size=0)),
    ("pos_att_type", dict(pos_att_type=["c2p", "p2x"])),
    ("pos_att_type", dict(pos_att_type="p2c|c2q")),
    ("pos_att_type", dict(pos_att_type=["c2p", "c2p"])),
    ("vocab_size", dict(vocab_size=0)),
    ("vocab_size", dict(vocab_size=-5)),
    ("hidden_size", dict(hidden_size=0)),
    ("hidden_size", dict(hidden_size=768.0)),
    ("num_hidden_layers", dict(num_hidden_layers=0)),
    ("num_hidden_layers", dict(num_hidden_layers=True)),
    ("num_attention_heads", dict(num_attention_heads=-12)),
    ("intermediate_size", dict(intermediate_size=0)),
    ("max_position_embeddings", dict(max_position_embeddings=-1)),
    ("emd_num_passes", dict(emd_num_passes=0)),
    ("embedding_size", dict(embedding_size=0)),
    ("pooler_hidden_size", dict(pooler_hidden_size=-3)),
    ("type_vocab_size", dict(type_vocab_size=-1)),
    ("hidden_dropout_prob", dict(hidden_dropout_prob=1.0)),
    ("hidden_dropout_prob", dict(hidden_dropout_prob=-0.1)),
    ("attention_probs_dropout_prob", dict(attention_probs_dropout_prob=1.5)),
    ("pooler_dropout", dict(pooler_dropout=-0.5)),
    ("cls_dropout", dict(cls_dropout=2.0)),
    ("layer_norm_eps", dict(layer_norm_eps=0.0)),
    ("initializer_range", dict(initializer_range=-0.02)),
    ("hidden_act", dict(hidden_act="not_an_activation")),
    ("pooler_hidden_act", dict(pooler_hidden_act="swishy")),
    ("conv_act", dict(conv_act="nope")),
    ("attention_variant", dict(attention_variant="v3")),
    ("position_buckets", dict(position_buckets=1)),
    ("position_buckets", dict(position_buckets=0)),
    ("max_relative_positions", dict(max_relative_positions=1)),
    ("norm_rel_ebd", dict(norm_rel_ebd="batch_norm")),
    ("conv_kernel_size", dict(conv_kernel_size=-3)),
    ("conv_kernel_size", dict(conv_kernel_size=4)),
    ("rtd_embedding_sharing", dict(rtd_embedding_sharing="shared")),
    ("rtd_loss_weight", dict(rtd_loss_weight=-1.0)),
    ("rtd_mask_probability", dict(rtd_mask_probability=0.0)),
    ("rtd_mask_probability", dict(rtd_mask_probability=1.0)),
    ("rtd_sampling_temperature", dict(rtd_sampling_temperature=0.0)),
    ("rtd_generator_num_layers", dict(rtd_generator_num_layers=0)),
    ("rtd_generator_hidden_size", dict(rtd_generator_hidden_size=-64)),
    ("rtd_generator_intermediate_size", dict(rtd_generator_intermediate_size=0)),
    ("rtd_generator_num_attention_heads", dict(rtd_generator_num_attention_heads=0)),
]

STRUCTURAL = [
    # (field the message must name, overrides): accepted at construction, refused when a model is built
    ("num_attention_heads", dict(hidden_size=768, num_attention_heads=7)),
    ("attention_head_size", dict(hidden_size=768, num_attention_heads=12, attention_head_size=32)),
    ("position_buckets", dict(max_position_embeddings=64, position_buckets=256)),
    ("conv_groups", dict(conv_kernel_size=3, conv_groups=5)),
    ("position_buckets", {**_V1, "position_buckets": 256}),
    ("share_att_key", {**_V1, "share_att_key": True}),
    ("norm_rel_ebd", {**_V1, "norm_rel_ebd": "layer_norm"}),
]

_ALL_FIELDS = sorted(DebertaCustomConfig().to_dict(), key=len, reverse=True)


def first_field_named(message: str) -> str | None:
    """The config field mentioned first in an error message (whole-word match, so that `hidden_size` is not found
    inside `pooler_hidden_size`)."""
    positions = {}
    for field in _ALL_FIELDS:
        found = re.search(rf"(?<![A-Za-z0-9_]){re.escape(field)}(?![A-Za-z0-9_])", message)
        if found:
            positions[field] = found.start()
    return min(positions, key=positions.get) if positions else None


@pytest.mark.parametrize("field,overrides", INVALID, ids=[f"{f}-{i}" for i, (f, _) in enumerate(INVALID)])
def test_invalid_value_raises_value_error_naming_the_field(field, overrides):
    with pytest.raises(ValueError, match=rf"(?<![A-Za-z0-9_]){field}(?![A-Za-z0-9_])") as error:
        DebertaCustomConfig(**overrides)
    # The field named first is the offending one (messages may mention others, e.g. "must divide hidden_size").
    assert first_field_named(str(error.value)) == field


@pytest.mark.parametrize("field,overrides", STRUCTURAL, ids=[f"{f}-{i}" for i, (f, _) in enumerate(STRUCTURAL)])
def test_fields_that_do_not_fit_together_are_refused_when_the_model_is_built(field, overrides):
    config = DebertaCustomConfig(**overrides)  # accepted: a user may still be editing it
    for build in (DebertaCustomModel, DebertaCustomForMaskedLM, DebertaCustomForRTDPreTraining):
        with torch.device("meta"), pytest.raises(ValueError, match=rf"(?<![A-Za-z0-9_]){field}(?![A-Za-z0-9_])") as error:
            build(config)
        assert first_field_named(str(error.value)) == field, build.__name__


def test_a_config_can_be_built_edited_and_then_fixed():
    """transformers' ConfigTester builds DebertaV2Config(hidden_size=37) with 12 heads; so can we, and once the
    fields fit together the model builds."""
    config = DebertaCustomConfig(hidden_size=37)
    with torch.device("meta"), pytest.raises(ValueError, match="num_attention_heads.*hidden_size=37"):
        DebertaCustomModel(config)
    config.hidden_size = 48
    with torch.device("meta"):
        assert DebertaCustomModel(config).config.head_size == 4
    # the same with the generator of RTD pretraining: its own sizes are checked when it is built
    config.rtd_generator_num_attention_heads = 5
    with torch.device("meta"), pytest.raises(ValueError, match="num_attention_heads.*hidden_size=48"):
        DebertaCustomForRTDPreTraining(config)


def test_invalid_value_in_a_preset_file_is_reported(tmp_path):
    raw = json.loads((PRESET_DIR / "tiny.json").read_text())
    raw["num_attention_heads"] = 3  # 64 is not divisible by 3
    raw["attention_head_size"] = None
    config = DebertaCustomConfig.from_dict(raw)
    with pytest.raises(ValueError, match="num_attention_heads"):
        DebertaCustomModel(config)
    raw["hidden_dropout_prob"] = 1.5  # a value no config can hold: refused on reading
    with pytest.raises(ValueError, match="hidden_dropout_prob"):
        DebertaCustomConfig.from_dict(raw)


VALID_EDGES = [
    dict(pos_att_type=[]),
    dict(pos_att_type="c2p"),
    dict(pos_att_type="P2C | C2P"),
    dict(relative_attention=False, position_biased_input=True),
    dict(position_buckets=-1),
    dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, cls_dropout=0.0),
    dict(hidden_size=64, num_attention_heads=4, attention_head_size=16),
    dict(conv_kernel_size=3, conv_groups=4, conv_act="gelu"),
    dict(type_vocab_size=2),
    dict(embedding_size=128),
    _V1,
    dict(rtd_embedding_sharing="none", rtd_loss_weight=0.0),
]


@pytest.mark.parametrize("overrides", VALID_EDGES)
def test_valid_edge_values_are_accepted(overrides):
    config = DebertaCustomConfig(**overrides)
    assert all(item in ("c2p", "p2c") for item in config.pos_att_type)


def test_pos_att_type_string_parses():
    assert DebertaCustomConfig(pos_att_type="p2c|c2p").pos_att_type == ["p2c", "c2p"]
    assert DebertaCustomConfig(pos_att_type="C2P | p2c").pos_att_type == ["c2p", "p2c"]
    assert DebertaCustomConfig(pos_att_type="c2p").pos_att_type == ["c2p"]
    assert DebertaCustomConfig(pos_att_type=None).pos_att_type == []


@pytest.mark.parametrize("value, expected", [("None", []), ("none", []), (["none"], []), (["None"], []),
                                             ("c2p|none", ["c2p"])])
def test_pos_att_type_none_means_no_position_term(value, expected):
    """transformers' DebertaV2Config accepts "None" and stores ["none"] (no position term); so do we, as []."""
    config = DebertaCustomConfig(pos_att_type=value)
    assert config.pos_att_type == expected
    assert DebertaCustomConfig.from_dict(config.to_dict()).pos_att_type == expected
    official = transformers.DebertaV2Config(pos_att_type=value).to_dict()
    assert DebertaCustomConfig.from_dict(official).pos_att_type == expected


# ----------------------------------------------------------------------------------------------------------------------
# Official configs (model_type deberta-v2 / deberta)
# ----------------------------------------------------------------------------------------------------------------------

_SMALL_GEOMETRY = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37)


def test_absent_official_fields_take_transformers_defaults():
    """A minimal deberta-v2 config.json means what transformers reads from it: no relative attention, absolute
    positions at the input, no buckets, no shared keys, no normalised relative embeddings."""
    translated = config_dict_from_official({"model_type": "deberta-v2", **_SMALL_GEOMETRY})
    reference = transformers.DebertaV2Config(**_SMALL_GEOMETRY)
    config = DebertaCustomConfig(**translated)
    assert config.relative_attention is False and reference.relative_attention is False
    assert config.position_biased_input is True and reference.position_biased_input is True
    assert config.pos_att_type == []
    assert config.position_buckets == -1
    assert config.share_att_key is False
    assert config.norm_rel_ebd == "none"
    assert config.max_relative_positions == -1
    assert config.attention_variant == "v2"
    for field in ("hidden_act", "hidden_dropout_prob", "attention_probs_dropout_prob", "max_position_embeddings",
                  "type_vocab_size", "initializer_range", "layer_norm_eps", "pad_token_id", "pooler_dropout",
                  "pooler_hidden_act"):
        assert getattr(config, field) == getattr(reference, field), field
    # an official file that leaves out the sizes gets transformers' (v2-xlarge) sizes, not our v3-base defaults
    bare = DebertaCustomConfig.from_dict({"model_type": "deberta-v2"})
    assert (bare.hidden_size, bare.num_hidden_layers, bare.num_attention_heads) == (1536, 24, 24)


def test_official_v3_config_translates():
    official = {"model_type": "deberta-v2", **_SMALL_GEOMETRY, "max_position_embeddings": 64,
                "relative_attention": True, "pos_att_type": "p2c|c2p", "position_buckets": 8,
                "norm_rel_ebd": "layer_norm", "share_att_key": True, "position_biased_input": False,
                "legacy": True, "transformers_version": "4.0.0", "architectures": ["DebertaV2ForMaskedLM"]}
    config = DebertaCustomConfig.from_dict(official)
    assert config.model_type == "deberta_custom"
    assert config.pos_att_type == ["p2c", "c2p"]
    assert config.relative_attention and config.share_att_key
    assert config.norm_rel_ebd == "layer_norm"
    assert config.position_buckets == 8
    assert config.position_biased_input is False
    assert not hasattr(config, "legacy")
    # "layer_norm|..." spellings of norm_rel_ebd (transformers tests for the substring) mean layer_norm too
    assert DebertaCustomConfig.from_dict({**official, "norm_rel_ebd": "layer_norm|none"}).norm_rel_ebd == "layer_norm"


def test_official_v1_config_translates():
    config = DebertaCustomConfig.from_dict({"model_type": "deberta", **_SMALL_GEOMETRY, "relative_attention": True,
                                            "pos_att_type": "c2p|p2c", "max_relative_positions": 16})
    assert config.attention_variant == "v1"
    assert config.pos_att_type == ["c2p", "p2c"]
    assert config.position_buckets == -1 and not config.share_att_key and config.norm_rel_ebd == "none"
    assert config.position_biased_input is True  # transformers' DebertaConfig default
    assert config.max_relative_positions == 16
    # v1 defaults: roberta-sized vocabulary, not v2's
    assert DebertaCustomConfig.from_dict({"model_type": "deberta"}).vocab_size == 50265


def test_non_official_model_type_is_rejected():
    with pytest.raises(ValueError, match="model_type"):
        config_dict_from_official({"model_type": "bert"})


@pytest.mark.parametrize("model_type", ["deberta-v2", "deberta"])
def test_from_pretrained_reads_official_folders(tmp_path, model_type):
    """Folders as transformers' own DebertaV2Config / DebertaConfig.save_pretrained write them, and a hand-written
    minimal config.json."""
    reference_class = transformers.DebertaV2Config if model_type == "deberta-v2" else transformers.DebertaConfig
    extra = dict(position_buckets=8, norm_rel_ebd="layer_norm", share_att_key=True) if model_type == "deberta-v2" else {}
    reference = reference_class(**_SMALL_GEOMETRY, relative_attention=True, pos_att_type="p2c|c2p",
                                max_position_embeddings=64, position_biased_input=False, type_vocab_size=2, **extra)
    reference.save_pretrained(tmp_path / "saved")
    config = DebertaCustomConfig.from_pretrained(tmp_path / "saved")
    assert isinstance(config, DebertaCustomConfig) and config.model_type == "deberta_custom"
    assert config.attention_variant == ("v2" if model_type == "deberta-v2" else "v1")
    for field in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                  "max_position_embeddings", "relative_attention", "position_biased_input", "type_vocab_size", *extra):
        assert getattr(config, field) == getattr(reference, field), field
    assert config.pos_att_type == ["p2c", "c2p"]

    (tmp_path / "minimal").mkdir()
    (tmp_path / "minimal" / "config.json").write_text(json.dumps({"model_type": model_type, **_SMALL_GEOMETRY}))
    minimal = DebertaCustomConfig.from_pretrained(tmp_path / "minimal")
    assert minimal.relative_attention is False and minimal.position_biased_input is True
    assert minimal.pos_att_type == [] and minimal.position_buckets == -1


@pytest.mark.parametrize("preset", ["tiny", "base"])
def test_to_official_dict_round_trips_through_transformers(preset):
    """to_official_dict -> transformers.DebertaV2Config -> a DebertaV2Model transformers can build -> back to ours:
    the architecture is unchanged."""
    config = load_preset(preset)
    official = config.to_official_dict()
    assert official["model_type"] == "deberta-v2"
    reference = transformers.DebertaV2Config(**{k: v for k, v in official.items() if k != "model_type"})
    with torch.device("meta"):  # transformers must be able to build the model from what we exported
        reference_model = transformers.DebertaV2Model(reference)
    assert sum(p.numel() for p in reference_model.parameters()) == EXACT_COUNTS[preset][1]
    back = DebertaCustomConfig.from_dict(reference.to_dict())
    for field in ARCHITECTURE_FIELDS:
        if field == "attention_head_size":
            assert back.head_size == config.head_size
        elif field == "embedding_size":
            assert back.word_embedding_size == config.word_embedding_size
        else:
            assert getattr(back, field) == getattr(config, field), field


def test_to_official_dict_v1_round_trips_through_transformers():
    config = DebertaCustomConfig(**_SMALL_GEOMETRY, **_V1, max_position_embeddings=64, max_relative_positions=16,
                                 position_biased_input=True)
    official = config.to_official_dict()
    assert official["model_type"] == "deberta"
    reference = transformers.DebertaConfig(**{k: v for k, v in official.items() if k != "model_type"})
    back = DebertaCustomConfig.from_dict(reference.to_dict())
    for field in ("attention_variant", "hidden_size", "num_attention_heads", "pos_att_type", "max_relative_positions",
                  "position_biased_input", "relative_attention", "share_att_key", "position_buckets"):
        assert getattr(back, field) == getattr(config, field), field


# ----------------------------------------------------------------------------------------------------------------------
# Our own format
# ----------------------------------------------------------------------------------------------------------------------

_NON_DEFAULT = dict(
    vocab_size=321, hidden_size=48, num_hidden_layers=3, num_attention_heads=6, intermediate_size=50,
    pos_att_type=["c2p"], position_buckets=16, max_position_embeddings=100, share_att_key=False, norm_rel_ebd="none",
    type_vocab_size=2, conv_kernel_size=3, conv_groups=2, cls_dropout=0.2, emd_num_passes=3, sparse_mlm_logits=False,
    rtd_generator_num_layers=1, rtd_embedding_sharing="es", rtd_loss_weight=10.0, num_labels=5,
    problem_type="multi_label_classification",
)


def test_to_dict_from_dict_round_trip():
    config = DebertaCustomConfig(**_NON_DEFAULT)
    again = DebertaCustomConfig.from_dict(config.to_dict())
    assert again.to_dict() == config.to_dict()
    assert again.num_labels == 5 and again.pos_att_type == ["c2p"]
    assert json.loads(config.to_json_string())["model_type"] == "deberta_custom"


def test_save_pretrained_round_trip(tmp_path):
    config = DebertaCustomConfig(**_NON_DEFAULT)
    config.save_pretrained(tmp_path)
    loaded = DebertaCustomConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == config.to_dict()
    auto = transformers.AutoConfig.from_pretrained(tmp_path)
    assert isinstance(auto, DebertaCustomConfig)
    assert {k: v for k, v in auto.to_dict().items() if k != "_name_or_path"} == {
        k: v for k, v in config.to_dict().items() if k != "_name_or_path"}


def test_preset_round_trips_through_save_pretrained(tmp_path):
    config = load_preset("tiny")
    config.save_pretrained(tmp_path)
    assert DebertaCustomConfig.from_pretrained(tmp_path).to_dict() == config.to_dict()


def test_defaults_describe_v3_base():
    default = DebertaCustomConfig()
    base = load_preset("base")
    for field in ARCHITECTURE_FIELDS:
        if field == "attention_head_size":
            assert default.head_size == base.head_size
        else:
            assert getattr(default, field) == getattr(base, field), field
