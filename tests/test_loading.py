"""Loading through transformers' own `from_pretrained` (issue 10 point 4; issue 12 points 3, 5 and 7).

Official checkpoints (transformers' DebertaV2* save_pretrained output, the Hub layout) load with every from_pretrained
argument that transformers' models take: dtype, device_map given as a name or a dict, quantization configs; the model
is built on the meta device first. Usage errors say what is wrong, and transformers' own errors pass through. RTD
pretraining folders load into every head as the exported discriminator. A foreign model_type is refused by name.
"""

import json
import os

import pytest
import torch
import transformers
from helpers import (
    REPO_ROOT,
    TINY_OFFICIAL_V2,
    TRANSFORMERS_457,
    flatten_outputs,
    perturb_parameters,
    random_batch,
    run_without_package,
    skip_without_transformers_457,
    tiny_config,
)
from safetensors.torch import load_file
from transformers import AutoModel, AutoModelForSequenceClassification

from modeling_deberta_custom import (
    DebertaCustomConfig,
    DebertaCustomForMaskedLM,
    DebertaCustomForReplacedTokenDetection,
    DebertaCustomForRTDPreTraining,
    DebertaCustomForSequenceClassification,
    DebertaCustomModel,
    DebertaCustomPreTrainedModel,
)
from modeling_deberta_custom.loading import convert_official_state_dict


def transformers_folder(path, head="ForMaskedLM", legacy=False, seed=0, **save_kwargs):
    """What transformers' DebertaV2<head>.save_pretrained writes (random, perturbed weights)."""
    fields = {k: v for k, v in TINY_OFFICIAL_V2.items() if k not in ("model_type", "legacy")}
    torch.manual_seed(seed)
    model = getattr(transformers, "DebertaV2" + head)(transformers.DebertaV2Config(legacy=legacy, **fields))
    perturb_parameters(model, seed=seed)
    model.save_pretrained(path, **save_kwargs)
    return model.eval()


def state_of_file(folder) -> dict:
    state = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            state.update(load_file(folder / name))
    return state


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    folder = tmp_path_factory.mktemp("official")
    transformers_folder(folder)
    return folder


# ----------------------------------------------------------------------------------------------------------------------
# transformers' loading arguments work for official checkpoints
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device_map", ["cpu", {"": "cpu"}, "auto"], ids=["name", "dict", "auto"])
def test_official_checkpoint_takes_dtype_and_device_map(official, device_map):
    """On main a dict device_map raised ("pass device_map as a device name") for official folders."""
    file_state = state_of_file(official)
    model = DebertaCustomForMaskedLM.from_pretrained(official, dtype=torch.bfloat16, device_map=device_map)
    state = model.state_dict()
    for key, value in file_state.items():  # every weight of the file, cast to bf16, where its name says
        assert state[key].dtype == torch.bfloat16 and state[key].device.type == "cpu", key
        assert torch.equal(state[key], value.to(torch.bfloat16)), key
    input_ids, attention_mask = random_batch(TINY_OFFICIAL_V2["vocab_size"])
    with torch.no_grad():
        assert torch.isfinite(model(input_ids, attention_mask).logits.float()).all()


@pytest.mark.parametrize("layout", ["official", "ours"])
def test_model_is_built_on_the_meta_device(tmp_path, official, layout, monkeypatch):
    """transformers' loader builds the model with empty (meta) weights and fills them from the file: no random
    initialisation of weights that the checkpoint replaces (main built official models on the CPU first)."""
    folder = official
    if layout == "ours":
        folder = tmp_path / "ours"
        DebertaCustomForMaskedLM.from_pretrained(official).save_pretrained(folder)
    built_on = []
    original = DebertaCustomPreTrainedModel.post_init

    def record(self):
        built_on.append(self.get_input_embeddings().weight.device.type)
        original(self)

    monkeypatch.setattr(DebertaCustomPreTrainedModel, "post_init", record)
    model = DebertaCustomForMaskedLM.from_pretrained(folder)
    assert built_on and set(built_on) == {"meta"}
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_official_checkpoint_takes_a_quantization_config(official):
    """Quantization configs reach transformers' quantizer (here optimum-quanto int8 weights, which runs on CPU);
    main refused the argument for official folders."""
    pytest.importorskip("optimum.quanto", reason="optimum-quanto is in the dev extra")
    from transformers import QuantoConfig

    reference = DebertaCustomForMaskedLM.from_pretrained(official)
    quantized = DebertaCustomForMaskedLM.from_pretrained(official, quantization_config=QuantoConfig(weights="int8"))
    query = quantized.deberta.encoder.layer[0].attention.self.query_proj
    assert type(query).__name__ == "QLinear"
    input_ids, attention_mask = random_batch(TINY_OFFICIAL_V2["vocab_size"])
    with torch.no_grad():
        expected, actual = reference(input_ids, attention_mask).logits, quantized(input_ids, attention_mask).logits
    error = (expected - actual).abs().max().item()
    assert 0 < error < 0.05 * expected.abs().max().item()  # int8 weights: close, not equal


def test_transformers_sharded_save_loads_every_weight(tmp_path):
    transformers_folder(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    file_state = state_of_file(tmp_path)
    model, info = DebertaCustomForMaskedLM.from_pretrained(tmp_path, output_loading_info=True)
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in file_state.items())
    # transformers does not save the absolute table of a relative-only model: reported, and left to EMD training
    assert set(info["missing_keys"]) == {"deberta.embeddings.position_embeddings.weight"}


def test_legacy_head_loads_reports_and_resaves_under_our_names(tmp_path):
    """transformers' legacy masked-LM head (cls.predictions.*) is renamed on load; saving writes our names (transformers
    5 would otherwise write the names the weights were loaded under)."""
    reference = transformers_folder(tmp_path / "legacy", legacy=True)
    raw = load_file(tmp_path / "legacy" / "model.safetensors")
    assert any(k.startswith("cls.predictions.") for k in raw)
    model, info = DebertaCustomForMaskedLM.from_pretrained(tmp_path / "legacy", output_loading_info=True,
                                                           use_enhanced_mask_decoder=False)
    assert not info["unexpected_keys"]
    converted = convert_official_state_dict(raw)  # the named conversion does what the loader does
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in converted.items())
    assert torch.equal(model.lm_predictions.lm_head.bias, raw["cls.predictions.bias"])
    input_ids, attention_mask = random_batch(TINY_OFFICIAL_V2["vocab_size"])
    real = attention_mask.bool()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids, attention_mask).logits[real],
                                   reference(input_ids, attention_mask=attention_mask).logits[real],
                                   atol=1e-5, rtol=1e-5)
    model.save_pretrained(tmp_path / "resaved")
    resaved = load_file(tmp_path / "resaved" / "model.safetensors")
    assert not any(k.startswith("cls.") for k in resaved)
    assert torch.equal(resaved["lm_predictions.lm_head.dense.weight"], raw["cls.predictions.transform.dense.weight"])


def test_unused_head_weights_are_reported_as_transformers_does(official):
    backbone, info = DebertaCustomForSequenceClassification.from_pretrained(official, output_loading_info=True)
    assert {k for k in info["missing_keys"] if not k.startswith("deberta.")} == {
        "classifier.weight", "classifier.bias", "pooler.dense.weight", "pooler.dense.bias"}


# ----------------------------------------------------------------------------------------------------------------------
# Issue 12.3: usage errors say what is wrong; transformers' own errors pass through
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["official", "ours"])
def test_meta_device_context_is_reported_as_such(tmp_path, official, layout):
    folder = official
    if layout == "ours":
        folder = tmp_path / "ours"
        DebertaCustomModel(tiny_config()).save_pretrained(folder)
    with pytest.raises(RuntimeError, match="meta device") as caught, torch.device("meta"):
        DebertaCustomModel.from_pretrained(folder)
    assert "Could not" not in str(caught.value)


def test_device_map_naming_a_missing_device_says_so(official):
    if torch.cuda.is_available():
        device = f"cuda:{torch.cuda.device_count()}"
        match = rf"asks for {device}, but this machine has {torch.cuda.device_count()} cuda device"
    else:
        device, match = "cuda:0", r"asks for cuda:0, but this machine has no cuda device"
    for device_map in (device, {"": device}):
        with pytest.raises(ValueError, match=match):
            DebertaCustomModel.from_pretrained(official, device_map=device_map)


def test_transformers_own_errors_pass_through(tmp_path, official):
    with pytest.raises(ValueError, match="device name") as caught:  # transformers' own check of the name
        DebertaCustomModel.from_pretrained(official, device_map="gpu7")
    assert "Could not" not in str(caught.value)
    with pytest.raises(OSError):
        DebertaCustomModel.from_pretrained(tmp_path / "nothing-here")


# ----------------------------------------------------------------------------------------------------------------------
# Issue 12.5: an RTD pretraining folder loads into every head as the exported discriminator
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["gdes", "es", "none"])
def rtd_folders(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"rtd_{request.param}")
    torch.manual_seed(0)
    model = DebertaCustomForRTDPreTraining(tiny_config(rtd_embedding_sharing=request.param, rtd_generator_num_layers=1))
    perturb_parameters(model)  # non-zero deltas: the merge matters
    model.eval()
    model.save_pretrained(root / "pretraining")
    model.export_discriminator(root / "discriminator")
    return request.param, model, root / "pretraining", root / "discriminator"


def assert_same_state(loaded, expected):
    loaded_state, expected_state = loaded.state_dict(), expected.state_dict()
    assert loaded_state.keys() == expected_state.keys()
    for key, value in expected_state.items():
        assert torch.equal(loaded_state[key], value), key


def test_rtd_pretraining_folder_loads_as_classifier(rtd_folders):
    mode, model, pretraining, discriminator = rtd_folders
    classifier, info = AutoModelForSequenceClassification.from_pretrained(pretraining, num_labels=3,
                                                                         output_loading_info=True)
    assert type(classifier) is DebertaCustomForSequenceClassification
    exported = DebertaCustomModel.from_pretrained(discriminator)
    assert_same_state(classifier.deberta, exported)
    # The generator and the deltas are not reported (not part of the discriminator); the unused RTD head is.
    assert {k.split(".")[0] for k in info["unexpected_keys"]} == {"mask_predictions"}
    if mode == "gdes":  # the merge is E_G + E_delta, not E_G
        generator_table = model.generator.deberta.embeddings.word_embeddings.weight
        assert not torch.equal(classifier.deberta.embeddings.word_embeddings.weight, generator_table)
    input_ids, attention_mask = random_batch(model.config.vocab_size)
    with torch.no_grad():
        expected = model.deberta(input_ids, attention_mask).last_hidden_state
        actual = classifier.deberta(input_ids, attention_mask).last_hidden_state
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-6)


def test_rtd_pretraining_folder_loads_as_backbone_and_discriminator(rtd_folders):
    mode, model, pretraining, discriminator = rtd_folders
    assert_same_state(AutoModel.from_pretrained(pretraining), DebertaCustomModel.from_pretrained(discriminator))
    rtd = DebertaCustomForReplacedTokenDetection.from_pretrained(pretraining)
    assert_same_state(rtd, DebertaCustomForReplacedTokenDetection.from_pretrained(discriminator))
    # In bf16 the merge happens before the cast, as when the exported folder is loaded in bf16.
    assert_same_state(DebertaCustomModel.from_pretrained(pretraining, dtype=torch.bfloat16),
                      DebertaCustomModel.from_pretrained(discriminator, dtype=torch.bfloat16))
    # The pretraining model itself still loads whole.
    assert_same_state(DebertaCustomForRTDPreTraining.from_pretrained(pretraining), model)


@pytest.mark.parametrize("version", ["installed", "4.57"])
def test_rtd_pretraining_folder_loads_as_classifier_from_remote_code(tmp_path, version):
    """The merge travels with the folder's code files (loading.py), for trust_remote_code users, under the installed
    transformers and 4.57 (helpers.run_without_package: the package cannot be imported there)."""
    if version == "4.57":
        skip_without_transformers_457()
    torch.manual_seed(0)
    model = DebertaCustomForRTDPreTraining(tiny_config(rtd_generator_num_layers=1))
    perturb_parameters(model)
    model.eval()
    model.save_pretrained(tmp_path / "pretraining")
    input_ids, attention_mask = random_batch(model.config.vocab_size)
    inputs = dict(input_ids=input_ids, attention_mask=attention_mask)
    exported = model.discriminator_for_finetuning().eval()
    with torch.no_grad():
        expected = flatten_outputs(exported.deberta(**inputs, output_hidden_states=True, return_dict=True))
    torch.save(dict(inputs=inputs, expected=expected), tmp_path / "data.pt")
    case = dict(name="rtd", folder=str(tmp_path / "pretraining"), auto_class="AutoModelForSequenceClassification",
                data=str(tmp_path / "data.pt"), compare_backbone=True, call=dict(output_hidden_states=True), seed=0)
    report = run_without_package(tmp_path, [case], None if version == "installed" else TRANSFORMERS_457.resolve())
    assert report["package_importable"] is False and report["package_loaded_after"] is False
    result = report["cases"]["rtd"]
    assert "error" not in result, result["error"]
    assert result["module"].startswith("transformers_modules.")
    assert result["class"] == "DebertaCustomForSequenceClassification"
    assert set(expected) <= set(result["keys"])
    # Equal weights; loaded tensors stay in the memory-mapped file, whose alignment can move the last bit.
    assert all(isinstance(d, float) and d <= 1e-6 for d in result["mismatch"].values()), result["mismatch"]


# ----------------------------------------------------------------------------------------------------------------------
# Issue 12.7: a foreign model_type is refused by name
# ----------------------------------------------------------------------------------------------------------------------


def test_foreign_model_type_is_named(tmp_path):
    transformers.BertConfig(hidden_size=32, num_attention_heads=4, num_hidden_layers=1).save_pretrained(tmp_path)
    expected = r"model_type='bert'.*'deberta_custom'.*'deberta', 'deberta-v2'"
    with pytest.raises(ValueError, match=expected):
        DebertaCustomModel.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match=expected):
        DebertaCustomConfig.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match=expected):
        DebertaCustomConfig.from_dict(json.loads((tmp_path / "config.json").read_text()))
    # Ours and the official types still read; a dict without model_type is read as ours.
    assert DebertaCustomConfig.from_dict({"hidden_size": 32, "num_attention_heads": 4}).hidden_size == 32


# ----------------------------------------------------------------------------------------------------------------------
# The loading benchmark, at a tiny size, so that it does not rot
# ----------------------------------------------------------------------------------------------------------------------


def test_loading_benchmark_runs_tiny(tmp_path):
    """The script's loaders, weight checks and report, in one process (each child would cost seconds of imports)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("benchmark_loading", REPO_ROOT / "benchmarks" / "benchmark_loading.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.main(["--size", "tiny", "--repeats", "1", "--in-process", "--workdir", str(tmp_path / "work"),
                 "--out", str(tmp_path / "result.json")])
    report = json.loads((tmp_path / "result.json").read_text())
    rows = {(row["loader"], row["dtype"]) for row in report["results"]}
    assert rows == {(loader, dtype) for loader in ("ours", "transformers") for dtype in ("float32", "bfloat16")}
    for row in report["results"]:
        assert row["peak_rss_mb"] > 0 and row["seconds"] > 0
        assert row["checked"], row  # what each load gave is the file's weights, in the requested dtype
    modules = {run["module"] for row in report["results"] for run in row["runs"]}
    assert modules == {"modeling_deberta_custom.modeling_deberta_custom",
                       "transformers.models.deberta_v2.modeling_deberta_v2"}
