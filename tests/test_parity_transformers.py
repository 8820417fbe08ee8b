"""Parity with transformers' own DeBERTa classes, the independent reference (issue 2, point 4).

Forward: transformers' DebertaV2<Head> / Deberta<Head> with random, perturbed weights -> save_pretrained ->
DebertaCustom<Head>.from_pretrained gives the same outputs (fp32, eval, 1e-5) at non-padding positions of padded
batches, across the config variants that change the architecture, for both of our attention implementations.
Reverse: our models -> save_as_transformers -> transformers' classes give the same outputs, and the folder loads
back here exactly. Official Hub layout: a folder shaped like microsoft/deberta-v3-base keeps every weight.
"""

import json

import pytest
import torch
import transformers
from helpers import TINY_OFFICIAL_V2, perturb_parameters, random_batch, tiny_config
from safetensors.torch import save_file

import modeling_deberta_custom as ours
from modeling_deberta_custom import save_as_transformers

TOLERANCE = 1e-5
HEADS = ("Model", "ForMaskedLM", "ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering",
         "ForMultipleChoice")
V1 = dict(model_type="deberta", position_buckets=-1, share_att_key=False, norm_rel_ebd="none",
          max_relative_positions=6, pos_att_type="c2p|p2c", position_biased_input=True)

# Config variants in the official (transformers) vocabulary, as overrides of helpers.TINY_OFFICIAL_V2: buckets 8,
# max_position_embeddings 64, relative positions only, share_att_key, p2c|c2p, layer-normed relative embeddings.
VARIANTS = {
    "v3": {},
    "separate_keys": dict(share_att_key=False),
    "c2p_only": dict(pos_att_type="c2p", share_att_key=False),
    "p2c_only": dict(pos_att_type="p2c", share_att_key=False),
    "c2p_only_shared": dict(pos_att_type="c2p"),
    "no_buckets": dict(position_buckets=-1, max_relative_positions=6),
    "buckets_short_span": dict(max_relative_positions=24),  # log buckets with max_position 24, not 64
    "no_rel_norm": dict(norm_rel_ebd="none"),
    "conv": dict(conv_kernel_size=3, conv_act="gelu"),
    "conv_groups": dict(conv_kernel_size=3, conv_act="tanh", conv_groups=4, share_att_key=False),
    "token_types": dict(type_vocab_size=2),
    "absolute_and_relative": dict(position_biased_input=True, type_vocab_size=2),
    "absolute_only": dict(relative_attention=False, position_biased_input=True),
    # pos_att_type="None": no position term (DebertaV2Config keeps it as ["none"] in its config.json), with and
    # without the relative table; the second is transformers' own DebertaV2 test config.
    "no_position_terms": dict(pos_att_type="None"),
    "transformers_test_config": dict(relative_attention=False, position_biased_input=True, pos_att_type="None"),
    "embedding_size": dict(embedding_size=24),
    "v1": V1,
    "v1_relative_only": dict(V1, position_biased_input=False, pos_att_type="c2p", max_relative_positions=-1),
}


def official_config(variant: str, **extra) -> dict:
    return {**TINY_OFFICIAL_V2, **VARIANTS[variant], **extra}


def is_v1(config: dict) -> bool:
    return config["model_type"] == "deberta"


def transformers_class(config: dict, head: str):
    return getattr(transformers, ("Deberta" if is_v1(config) else "DebertaV2") + head)


def build_transformers_model(config: dict, head: str, seed: int = 0):
    config_class = transformers.DebertaConfig if is_v1(config) else transformers.DebertaV2Config
    fields = {k: v for k, v in config.items() if k != "model_type"}
    if head == "ForSequenceClassification":
        fields.setdefault("num_labels", 3)
    torch.manual_seed(seed)
    model = transformers_class(config, head)(config_class(**fields))
    perturb_parameters(model, seed=seed)
    return model.eval()


def lengths_for(config: dict) -> list[int]:
    """Shorter and longer than the bucket range (8); past max_position_embeddings (64) when positions are
    relative only."""
    return [12, 40] + ([] if config["position_biased_input"] else [100])


def make_inputs(config: dict, head: str, length: int, seed: int = 0) -> dict:
    input_ids, attention_mask = random_batch(config["vocab_size"], batch=3, length=length, seed=seed)
    inputs = dict(input_ids=input_ids, attention_mask=attention_mask)
    if config.get("type_vocab_size", 0) > 0:
        generator = torch.Generator().manual_seed(seed + 1)
        inputs["token_type_ids"] = torch.randint(0, config["type_vocab_size"], input_ids.shape, generator=generator)
    if head == "ForMultipleChoice":  # [B, N] -> [B, K=2, N]: the second choice is the batch rolled by one row
        inputs = {k: torch.stack([v, v.roll(1, 0)], dim=1) for k, v in inputs.items()}
    return inputs


def make_labels(config: dict, head: str, inputs: dict, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed + 2)
    mask = inputs["attention_mask"]
    batch, length = mask.shape[0], mask.shape[-1]
    if head == "ForMaskedLM":
        labels = torch.randint(0, config["vocab_size"], (batch, length), generator=generator)
        return {"labels": labels.masked_fill(mask == 0, -100)}
    if head == "ForTokenClassification":
        labels = torch.randint(0, 2, (batch, length), generator=generator)
        return {"labels": labels.masked_fill(mask == 0, -100)}
    if head == "ForSequenceClassification":
        return {"labels": torch.randint(0, 3, (batch,), generator=generator)}
    if head == "ForMultipleChoice":
        return {"labels": torch.randint(0, mask.shape[1], (batch,), generator=generator)}
    if head == "ForQuestionAnswering":
        return {"start_positions": torch.randint(0, length // 2, (batch,), generator=generator),
                "end_positions": torch.randint(0, length // 2, (batch,), generator=generator)}
    return {}


def main_outputs(head: str, outputs) -> dict:
    if head == "Model":
        return {"last_hidden_state": outputs.last_hidden_state}
    if head == "ForQuestionAnswering":
        return {"start_logits": outputs.start_logits, "end_logits": outputs.end_logits}
    return {"logits": outputs.logits}


def assert_close_at_tokens(expected, actual, attention_mask, name=""):
    """Compare [B, N, ...] tensors at non-padding positions; tensors without a token axis are compared whole."""
    assert expected.shape == actual.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if expected.dim() >= 2 and expected.shape[:2] == attention_mask.shape:
        valid = attention_mask.bool()
        expected, actual = expected[valid], actual[valid]
    difference = (expected - actual).abs().max().item()
    assert difference <= TOLERANCE, f"{name}: max abs difference {difference:.3g} > {TOLERANCE}"


def assert_same_outputs(head, reference_model, model, inputs, context=""):
    with torch.no_grad():
        expected = main_outputs(head, reference_model(**inputs))
        actual = main_outputs(head, model(**inputs))
    for name in expected:
        assert_close_at_tokens(expected[name], actual[name], inputs["attention_mask"], f"{context} {name}")


@pytest.fixture(scope="module")
def transformers_folder(tmp_path_factory):
    """(variant or config dict key, head, extra) -> (transformers model, folder written by its save_pretrained);
    cached for the module so each reference model is built and saved once."""
    cache = {}

    def get(variant: str, head: str, **extra):
        key = (variant, head, tuple(sorted(extra.items())))
        if key not in cache:
            config = official_config(variant, **extra)
            model = build_transformers_model(config, head)
            folder = tmp_path_factory.mktemp(f"transformers_{variant}_{head}")
            model.save_pretrained(folder)
            cache[key] = (config, model, folder)
        return cache[key]

    return get


# ----------------------------------------------------------------------------------------------------------------------
# transformers -> ours
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_backbone_matches_transformers(transformers_folder, variant, attn):
    config, reference, folder = transformers_folder(variant, "Model")
    model = ours.DebertaCustomModel.from_pretrained(folder, attn_implementation=attn)
    assert model.config._attn_implementation == attn
    assert not model.training
    for length in lengths_for(config):
        inputs = make_inputs(config, "Model", length, seed=length)
        assert_same_outputs("Model", reference, model, inputs, f"{variant}/{attn}/length {length}")


HEAD_CASES = [(head, variant) for head in HEADS if head not in ("Model", "ForMaskedLM")
              for variant in ("v3", "absolute_and_relative", "v1") if not (variant == "v1" and head == "ForMultipleChoice")]


@pytest.mark.parametrize(("head", "variant"), HEAD_CASES)
def test_task_heads_match_transformers(transformers_folder, head, variant):
    """Logits and loss of every task head, both attention implementations."""
    config, reference, folder = transformers_folder(variant, head)
    for attn in ("eager", "sdpa"):
        model = getattr(ours, "DebertaCustom" + head).from_pretrained(folder, attn_implementation=attn)
        for length in (12, 40):
            inputs = make_inputs(config, head, length, seed=length)
            assert_same_outputs(head, reference, model, inputs, f"{head}/{variant}/{attn}/length {length}")
            if head == "ForQuestionAnswering":
                # The span softmax runs over every position, padding included, and outputs at padding positions
                # are undefined (transformers gives padded queries uniform attention, we keep them on real keys):
                # compare the loss on an unpadded batch.
                inputs = {**inputs, "attention_mask": torch.ones_like(inputs["attention_mask"])}
            labels = make_labels(config, head, inputs)
            with torch.no_grad():
                expected, actual = reference(**inputs, **labels).loss, model(**inputs, **labels).loss
            assert abs(expected.item() - actual.item()) <= TOLERANCE, f"{head}/{variant}/{attn}: loss differs"


MASKED_LM_CASES = [(variant, legacy) for variant in ("v3", "conv", "absolute_and_relative", "v1", "v1_relative_only")
                   for legacy in (False, True)]
# transformers' non-legacy head projects hidden -> hidden and cannot decode with narrower word embeddings (its forward
# fails); its legacy head (dense hidden -> embedding_size) can, and so can ours.
MASKED_LM_CASES.append(("embedding_size", True))


@pytest.mark.parametrize(("variant", "legacy"), MASKED_LM_CASES)
def test_masked_lm_matches_transformers(transformers_folder, variant, legacy):
    """transformers has no Enhanced Mask Decoder: for relative-only configs ours must be loaded with
    use_enhanced_mask_decoder=False; with position_biased_input the decoder is off by itself. legacy=True folders
    name the head cls.predictions.*, which our loader renames."""
    config, reference, folder = transformers_folder(variant, "ForMaskedLM", legacy=legacy)
    state_names = set(reference.state_dict())
    assert any(k.startswith("cls.predictions." if legacy else "lm_predictions.") for k in state_names)
    if config["position_biased_input"]:
        extra = {}
        assert not ours.DebertaCustomForMaskedLM.from_pretrained(folder).config.uses_enhanced_mask_decoder
    else:
        extra = {"use_enhanced_mask_decoder": False}
        if config.get("embedding_size", config["hidden_size"]) != config["hidden_size"]:
            # EMD adds absolute positions to hidden states: it cannot run on narrower embeddings, and says so.
            with pytest.raises(ValueError, match="embedding_size"):
                ours.DebertaCustomForMaskedLM.from_pretrained(folder)
        else:
            # Loaded as it is, the decoder is on (so the flag above is what makes the comparison valid).
            assert ours.DebertaCustomForMaskedLM.from_pretrained(folder).config.uses_enhanced_mask_decoder
    for attn in ("eager", "sdpa"):
        model = ours.DebertaCustomForMaskedLM.from_pretrained(folder, attn_implementation=attn, **extra)
        assert not model.config.uses_enhanced_mask_decoder
        # The LM head was loaded, not initialised: the bias is the reference's (legacy: cls.predictions.bias).
        reference_bias = reference.state_dict()["cls.predictions.bias" if legacy else "lm_predictions.lm_head.bias"]
        torch.testing.assert_close(model.lm_predictions.lm_head.bias, reference_bias, rtol=0, atol=0)
        for length in lengths_for(config):
            inputs = make_inputs(config, "ForMaskedLM", length, seed=length)
            assert_same_outputs("ForMaskedLM", reference, model, inputs, f"{variant}/{attn}/legacy={legacy}/{length}")
        labels = make_labels(config, "ForMaskedLM", inputs)
        with torch.no_grad():
            expected, actual = reference(**inputs, **labels).loss, model(**inputs, **labels).loss
        assert abs(expected.item() - actual.item()) <= TOLERANCE


@pytest.mark.parametrize(("head", "variant"), [("ForSequenceClassification", "conv_groups"),
                                               ("ForMaskedLM", "v1"), ("ForTokenClassification", "token_types")])
def test_gradients_match_transformers(transformers_folder, head, variant):
    """The backward pass of a head's loss gives every parameter the same gradient as in transformers."""
    config, reference, folder = transformers_folder(variant, head)
    model = getattr(ours, "DebertaCustom" + head).from_pretrained(folder)
    inputs = make_inputs(config, head, 40, seed=3)
    labels = make_labels(config, head, inputs, seed=3)
    reference.zero_grad()
    reference(**inputs, **labels).loss.backward()
    model(**inputs, **labels).loss.backward()
    ours_parameters = dict(model.named_parameters())
    compared = 0
    for name, parameter in reference.named_parameters():
        if parameter.grad is None:
            continue
        name = name.replace("cls.predictions.transform.", "lm_predictions.lm_head.")
        assert name in ours_parameters, f"transformers parameter {name} has no counterpart"
        ours_grad = ours_parameters[name].grad
        assert ours_grad is not None, f"{name}: no gradient in our model"
        difference = (parameter.grad - ours_grad).abs().max().item()
        assert difference <= TOLERANCE, f"{name}: gradient differs by {difference:.3g}"
        compared += 1
    reference.zero_grad()  # the cached reference model is shared with other tests
    assert compared == sum(1 for p in reference.parameters()), "some reference parameters got no gradient"
    # Whatever transformers lacks (the absolute table of a relative-only model) takes no part in the loss.
    reference_names = {n for n, _ in reference.named_parameters()}
    for name, parameter in ours_parameters.items():
        if name not in reference_names and parameter.grad is not None:
            assert not parameter.grad.any(), f"{name} gets a gradient that transformers has nowhere"


@pytest.mark.parametrize("variant", ["v3", "v1"])
def test_hidden_states_and_attentions_match_transformers(transformers_folder, variant):
    config, reference, folder = transformers_folder(variant, "Model")
    inputs = make_inputs(config, "Model", 40, seed=5)
    mask = inputs["attention_mask"].bool()
    with torch.no_grad():
        expected = reference(**inputs, output_hidden_states=True, output_attentions=True)
    for attn in ("eager", "sdpa"):  # sdpa returns no probabilities, so output_attentions falls back to eager
        model = ours.DebertaCustomModel.from_pretrained(folder, attn_implementation=attn)
        with torch.no_grad():
            actual = model(**inputs, output_hidden_states=True, output_attentions=True)
        assert len(actual.hidden_states) == len(expected.hidden_states) == config["num_hidden_layers"] + 1
        for i, (e, a) in enumerate(zip(expected.hidden_states, actual.hidden_states, strict=True)):
            assert_close_at_tokens(e, a, inputs["attention_mask"], f"{attn} hidden_states[{i}]")
        assert len(actual.attentions) == len(expected.attentions) == config["num_hidden_layers"]
        for i, (e, a) in enumerate(zip(expected.attentions, actual.attentions, strict=True)):
            assert a is not None and a.shape == e.shape
            # Rows of real query tokens ([B, H, Nq, Nk] -> [tokens, H, Nk]); padded query rows are undefined.
            e, a = e.transpose(1, 2)[mask], a.transpose(1, 2)[mask]
            difference = (e - a).abs().max().item()
            assert difference <= TOLERANCE, f"{attn} attentions[{i}] differ by {difference:.3g}"


# ----------------------------------------------------------------------------------------------------------------------
# ours -> transformers
# ----------------------------------------------------------------------------------------------------------------------


def our_config(variant: str, head: str, **extra):
    """Our config for an official variant (translated the way the loader does)."""
    from modeling_deberta_custom.configuration_deberta_custom import config_dict_from_official

    fields = config_dict_from_official({k: v for k, v in official_config(variant).items() if k != "legacy"})
    if head == "ForSequenceClassification":
        fields["num_labels"] = 3
    fields.update(extra)
    return ours.DebertaCustomConfig(**fields)


EXPORT_CASES = [(head, "v3") for head in HEADS] + [
    (head, variant) for variant in ("v1", "conv_groups", "no_buckets", "embedding_size", "absolute_and_relative")
    for head in ("Model", "ForMaskedLM", "ForSequenceClassification")
    if (head, variant) != ("ForMaskedLM", "embedding_size")
]
# With embedding_size != hidden_size the masked-LM head is exported in transformers' legacy cls.predictions layout.
EXPORT_CASES.append(("ForMaskedLM", "embedding_size"))


@pytest.mark.parametrize(("head", "variant"), EXPORT_CASES)
def test_export_loads_in_transformers(tmp_path, head, variant):
    """Our model (EMD off: transformers has none) -> save_as_transformers -> transformers' class: same outputs, no
    weight missing on their side; the folder loads back into our class with identical outputs."""
    config = our_config(variant, head, use_enhanced_mask_decoder=False)
    model = getattr(ours, "DebertaCustom" + head)(config)
    perturb_parameters(model, seed=1)
    model.eval()
    save_as_transformers(model, tmp_path)
    official = json.loads((tmp_path / "config.json").read_text())
    assert official["model_type"] == ("deberta" if variant == "v1" else "deberta-v2")

    reference, info = transformers_class(official, head).from_pretrained(tmp_path, output_loading_info=True)
    assert info["missing_keys"] in ([], set()), f"transformers initialised {info['missing_keys']}"
    reference.eval()
    official_variant = official_config(variant)
    for length in (12, 40):
        inputs = make_inputs(official_variant, head, length, seed=length)
        assert_same_outputs(head, reference, model, inputs, f"export {head}/{variant}/length {length}")

    reloaded = getattr(ours, "DebertaCustom" + head).from_pretrained(tmp_path, use_enhanced_mask_decoder=False)
    saved, loaded = model.state_dict(), reloaded.state_dict()
    assert saved.keys() == loaded.keys()
    for key in saved:
        assert torch.equal(saved[key], loaded[key]), f"round trip changed {key}"
    inputs = make_inputs(official_variant, head, 40, seed=7)
    with torch.no_grad():
        expected, actual = main_outputs(head, model(**inputs)), main_outputs(head, reloaded(**inputs))
    for name in expected:
        # Equal weights; transformers 5 leaves loaded tensors in the memory-mapped file, whose unaligned addresses
        # can change the last bit of a CPU matmul.
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=1e-6, msg=f"round trip changed {name}")


@pytest.mark.parametrize("variant", ["v3", "no_buckets"])
def test_export_round_trip_keeps_enhanced_mask_decoder(tmp_path, variant):
    """With EMD on, the absolute position table (unused by transformers) survives the export and the reload."""
    model = ours.DebertaCustomForMaskedLM(our_config(variant, "ForMaskedLM"))
    assert model.config.uses_enhanced_mask_decoder
    perturb_parameters(model, seed=2)
    model.eval()
    save_as_transformers(model, tmp_path)
    reloaded = ours.DebertaCustomForMaskedLM.from_pretrained(tmp_path)
    assert reloaded.config.uses_enhanced_mask_decoder
    table = "deberta.embeddings.position_embeddings.weight"
    assert torch.equal(reloaded.state_dict()[table], model.state_dict()[table])
    inputs = make_inputs(official_config(variant), "ForMaskedLM", 40, seed=4)
    with torch.no_grad():
        expected, actual = model(**inputs).logits, reloaded(**inputs).logits
    assert torch.equal(expected, actual)


# ----------------------------------------------------------------------------------------------------------------------
# The official Hub layout (microsoft/deberta-v3-*)
# ----------------------------------------------------------------------------------------------------------------------

# config.json as the microsoft/deberta-v3-base repo writes it (original-style fields), at the tiny geometry.
HUB_CONFIG = {
    "model_type": "deberta-v2",
    "attention_probs_dropout_prob": 0.1,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "hidden_size": 32,
    "initializer_range": 0.02,
    "intermediate_size": 37,
    "max_position_embeddings": 64,
    "relative_attention": True,
    "position_buckets": 8,
    "norm_rel_ebd": "layer_norm",
    "share_att_key": True,
    "pos_att_type": "p2c|c2p",
    "layer_norm_eps": 1e-7,
    "max_relative_positions": -1,
    "position_biased_input": False,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "type_vocab_size": 0,
    "vocab_size": 99,
}


@pytest.fixture(scope="module")
def hub_state_dict():
    """deberta.* (with the absolute position table), lm_predictions.lm_head.* and mask_predictions.*, named as in
    the official checkpoints (taken from our models, whose names are the official ones)."""
    masked_lm = ours.DebertaCustomForMaskedLM(tiny_config())
    perturb_parameters(masked_lm, seed=3)
    rtd = ours.DebertaCustomForReplacedTokenDetection(tiny_config())
    perturb_parameters(rtd, seed=4)
    state = {k: v.clone() for k, v in masked_lm.state_dict().items()}
    state.update({k: v.clone() for k, v in rtd.state_dict().items() if k.startswith("mask_predictions.")})
    names = set(state)
    assert "deberta.embeddings.position_embeddings.weight" in names
    assert {"lm_predictions.lm_head.dense.weight", "lm_predictions.lm_head.LayerNorm.weight",
            "lm_predictions.lm_head.bias"} <= names
    assert {"mask_predictions.dense.weight", "mask_predictions.LayerNorm.weight",
            "mask_predictions.classifier.weight"} <= names
    return state


def write_hub_config(folder):
    (folder / "config.json").write_text(json.dumps(HUB_CONFIG, indent=2))


def assert_keeps(model, state, prefixes):
    model_state = model.state_dict()
    kept = [k for k in state if k.startswith(prefixes)]
    assert kept
    for key in kept:
        assert key in model_state, f"{key} dropped"
        assert torch.equal(model_state[key], state[key]), f"{key} differs from the file"


def test_official_pytorch_bin_keeps_every_weight(tmp_path, hub_state_dict):
    write_hub_config(tmp_path)
    torch.save(hub_state_dict, tmp_path / "pytorch_model.bin")

    model, info = ours.DebertaCustomForMaskedLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"], info  # a list (transformers 4) or a set (5)
    assert all(k.startswith("mask_predictions.") for k in info["unexpected_keys"])
    assert model.config.pos_att_type == ["p2c", "c2p"] and model.config.uses_enhanced_mask_decoder
    assert model.config.position_buckets == 8 and model.config.share_att_key
    assert_keeps(model, hub_state_dict, ("deberta.", "lm_predictions."))

    rtd, info = ours.DebertaCustomForReplacedTokenDetection.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"], info  # a list (transformers 4) or a set (5)
    assert_keeps(rtd, hub_state_dict, ("deberta.", "mask_predictions."))

    classifier, info = ours.DebertaCustomForSequenceClassification.from_pretrained(tmp_path, output_loading_info=True)
    assert not [k for k in info["missing_keys"] if k.startswith("deberta.")], info
    assert_keeps(classifier, hub_state_dict, ("deberta.",))

    backbone, info = ours.DebertaCustomModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"], info  # a list (transformers 4) or a set (5)
    assert torch.equal(backbone.embeddings.position_embeddings.weight,
                       hub_state_dict["deberta.embeddings.position_embeddings.weight"])

    # The EMD masked-LM loaded from the file computes what the model the weights came from computes.
    source = ours.DebertaCustomForMaskedLM(tiny_config())
    source.load_state_dict({k: v for k, v in hub_state_dict.items() if not k.startswith("mask_predictions.")})
    source.eval()
    inputs = make_inputs(HUB_CONFIG, "ForMaskedLM", 20)
    with torch.no_grad():
        assert torch.equal(source(**inputs).logits, model(**inputs).logits)


def test_official_sharded_safetensors(tmp_path, hub_state_dict):
    write_hub_config(tmp_path)
    keys = sorted(hub_state_dict)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    weight_map = {}
    for filename, shard_keys in shards.items():
        save_file({k: hub_state_dict[k].contiguous() for k in shard_keys}, tmp_path / filename,
                  metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard_keys, filename))
    total = sum(v.numel() * v.element_size() for v in hub_state_dict.values())
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))

    model, info = ours.DebertaCustomForMaskedLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"], info  # a list (transformers 4) or a set (5)
    assert_keeps(model, hub_state_dict, ("deberta.", "lm_predictions."))
    rtd = ours.DebertaCustomForReplacedTokenDetection.from_pretrained(tmp_path)
    assert_keeps(rtd, hub_state_dict, ("deberta.", "mask_predictions."))
