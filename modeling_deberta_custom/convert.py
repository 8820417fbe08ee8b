"""Checkpoint conversion: official DeBERTa checkpoints (microsoft/deberta-* and transformers' DebertaV2* / Deberta*
save_pretrained folders) in, transformers-loadable folders out.

Our parameter names are the official ones (`deberta.embeddings.*`, `deberta.encoder.layer.N.attention.self.*`,
`lm_predictions.lm_head.*`, `mask_predictions.*`; v1's `in_proj`, `q_bias`, `pos_proj`, ...). What differs:
  * transformers' legacy masked-LM head (`cls.predictions.*`, written when its config has legacy=True);
  * transformers drops `deberta.embeddings.position_embeddings` when position_biased_input is false; we keep it,
    since the Enhanced Mask Decoder reads it;
  * old checkpoints name LayerNorm parameters gamma / beta.

This file travels with the modeling file for `trust_remote_code` loading, so it imports only torch, transformers and
its siblings at module level.
"""

import json
import os
import re

import torch
from transformers.modeling_utils import load_state_dict
from transformers.utils import cached_file, logging

from .configuration_deberta_custom import OFFICIAL_MODEL_TYPES, DebertaCustomConfig

logger = logging.get_logger(__name__)

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
HUB_KWARGS = ("cache_dir", "force_download", "proxies", "token", "revision", "local_files_only", "subfolder")
# Prefixes of head weights; a checkpoint may carry heads that the loading class does not have.
HEAD_PREFIXES = ("lm_predictions.", "mask_predictions.", "pooler.", "classifier.", "qa_outputs.")

_RENAMES = (
    (re.compile(r"^cls\.predictions\.transform\.(dense|LayerNorm)\."), r"lm_predictions.lm_head.\1."),
    (re.compile(r"^cls\.predictions\.(decoder\.)?bias$"), "lm_predictions.lm_head.bias"),
    (re.compile(r"\.gamma$"), ".weight"),
    (re.compile(r"\.beta$"), ".bias"),
)
# Tied to the word embeddings (our decoder reads them directly) or rebuilt at run time: never loaded.
_DROPPED = (re.compile(r"^cls\.predictions\.decoder\.weight$"), re.compile(r"position_ids$"))

_LEGACY_HEAD_NAMES = re.compile(r"^lm_predictions\.lm_head\.(dense|LayerNorm)")

TRANSFORMERS_CLASS_SUFFIX = {
    "DebertaCustomModel": "Model",
    "DebertaCustomForMaskedLM": "ForMaskedLM",
    "DebertaCustomForSequenceClassification": "ForSequenceClassification",
    "DebertaCustomForTokenClassification": "ForTokenClassification",
    "DebertaCustomForQuestionAnswering": "ForQuestionAnswering",
    "DebertaCustomForMultipleChoice": "ForMultipleChoice",
}


def is_required_weight(key: str, config) -> bool:
    """Whether a checkpoint must provide this weight. Task heads may be newly initialised (fine-tuning starts that
    way), and the absolute position table may be absent when positions are relative-only: transformers' own
    save_pretrained drops it, and only the Enhanced Mask Decoder reads it."""
    key = key.removeprefix("deberta.")
    if key.startswith(HEAD_PREFIXES):
        return False
    return config.position_biased_input or key != "embeddings.position_embeddings.weight"


def rename_official_key(key: str) -> str | None:
    """Our name for an official / transformers state-dict key, or None for keys that are not loaded."""
    if any(pattern.search(key) for pattern in _DROPPED):
        return None
    for pattern, replacement in _RENAMES:
        key = pattern.sub(replacement, key)
    return key


def convert_official_state_dict(state_dict: dict) -> dict:
    converted = {}
    for key, value in state_dict.items():
        new_key = rename_official_key(key)
        if new_key is not None and new_key not in converted:  # decoder.bias and bias are one tied tensor
            converted[new_key] = value
    return converted


def align_prefix(state_dict: dict, model_keys, prefix: str) -> tuple[dict, list[str]]:
    """Match the checkpoint's base-model prefix to the model's: strip `deberta.` when loading a head checkpoint into
    the bare model (the head weights are returned as unused), add it when loading a bare checkpoint into a head."""
    model_has_prefix = any(k.startswith(prefix) for k in model_keys)
    checkpoint_has_prefix = any(k.startswith(prefix) for k in state_dict)
    if model_has_prefix == checkpoint_has_prefix:
        return state_dict, []
    if checkpoint_has_prefix:  # head checkpoint -> bare model
        aligned = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        return aligned, [k for k in state_dict if not k.startswith(prefix)]
    return {prefix + k: v for k, v in state_dict.items()}, []


def _hub_kwargs(kwargs: dict) -> dict:
    return {k: kwargs[k] for k in HUB_KWARGS if k in kwargs}


def resolve_official_config(name_or_path, kwargs: dict) -> dict | None:
    """The config dict of an official checkpoint at name_or_path (folder or Hub id), or None when it is not one
    (our own format, or nothing resolvable: then transformers' loader reports the problem)."""
    if not isinstance(name_or_path, (str, os.PathLike)):
        return None
    try:
        config_file = cached_file(str(name_or_path), "config.json", _raise_exceptions_for_missing_entries=False,
                                  **_hub_kwargs(kwargs))
    except (OSError, ValueError):
        return None
    if config_file is None:
        return None
    try:
        with open(config_file, encoding="utf-8") as handle:
            config_dict = json.load(handle)
    except (OSError, json.JSONDecodeError):
        return None
    return config_dict if config_dict.get("model_type") in OFFICIAL_MODEL_TYPES else None


def weight_files(name_or_path, hub_kwargs) -> list[str]:
    for filename in WEIGHT_FILES:
        resolved = cached_file(str(name_or_path), filename, _raise_exceptions_for_missing_entries=False, **hub_kwargs)
        if resolved is None:
            continue
        if not filename.endswith(".index.json"):
            return [resolved]
        with open(resolved, encoding="utf-8") as handle:
            shards = sorted(set(json.load(handle)["weight_map"].values()))
        return [cached_file(str(name_or_path), shard, **hub_kwargs) for shard in shards]
    raise OSError(f"No weights found in {name_or_path}: expected one of {', '.join(WEIGHT_FILES)}")


def describe_weight_source(name_or_path, kwargs: dict) -> str:
    """The weight file(s) of a checkpoint, for error messages: a path ending in model.safetensors (or the shards)."""
    try:
        files = weight_files(name_or_path, _hub_kwargs(kwargs))
    except Exception:  # nothing resolvable: name the folder
        return f"in {name_or_path}"
    return files[0] if len(files) == 1 else f"{len(files)} shards in {name_or_path} ({', '.join(files)})"


def read_checkpoint(files: list[str]) -> dict:
    """Read safetensors or pickle shards with transformers' own reader (and its torch.load safety policy). A file
    that cannot be read (truncated, corrupt) raises ValueError naming it."""
    state_dict = {}
    for path in files:
        try:
            state_dict.update(load_state_dict(path))
        except Exception as error:  # the readers raise several unrelated types; name the file whatever they are
            raise ValueError(f"Could not read checkpoint file {path}: {error}") from error
    return state_dict


def load_official_checkpoint(model_class, name_or_path, official_config: dict, **kwargs):
    """Build `model_class` from an official checkpoint, keeping every weight the class has a place for.

    Weights the model needs but the checkpoint lacks raise ValueError naming the file (a truncated or foreign
    checkpoint), except task heads, which are newly initialised with a warning as in transformers. Shape mismatches
    raise unless ignore_mismatched_sizes=True. Loads in float32 unless dtype / torch_dtype says otherwise ("auto":
    the checkpoint's dtype)."""
    hub_kwargs = {k: kwargs.pop(k) for k in HUB_KWARGS if k in kwargs}
    config = kwargs.pop("config", None)
    dtype = kwargs.pop("dtype", None) or kwargs.pop("torch_dtype", None)
    kwargs.pop("torch_dtype", None)
    attn_implementation = kwargs.pop("attn_implementation", None)
    output_loading_info = kwargs.pop("output_loading_info", False)
    ignore_mismatched_sizes = kwargs.pop("ignore_mismatched_sizes", False)
    device_map = kwargs.pop("device_map", None)
    if isinstance(device_map, dict):
        raise ValueError("Official checkpoints load onto one device: pass device_map as a device name, not a dict")
    for ignored in ("trust_remote_code", "low_cpu_mem_usage", "use_safetensors"):
        kwargs.pop(ignored, None)
    if config is None:
        config, unused = DebertaCustomConfig.from_dict(official_config, return_unused_kwargs=True, **kwargs)
    elif isinstance(config, DebertaCustomConfig):
        unused = {k: v for k, v in kwargs.items() if not hasattr(config, k)}
        for key, value in kwargs.items():
            if key not in unused:
                setattr(config, key, value)
    else:
        raise TypeError(f"config must be a DebertaCustomConfig, got {type(config).__name__}")
    if unused:
        raise TypeError(f"Unexpected keyword arguments for {model_class.__name__}.from_pretrained: {sorted(unused)}")
    if attn_implementation is not None:
        config._attn_implementation = attn_implementation

    files = weight_files(name_or_path, hub_kwargs)
    state_dict = convert_official_state_dict(read_checkpoint(files))
    model = model_class(config)
    model_state = model.state_dict()
    state_dict, unused_keys = align_prefix(state_dict, model_state.keys(), model_class.base_model_prefix + ".")
    source = files[0] if len(files) == 1 else f"{len(files)} shards in {name_or_path}"

    mismatched = [(k, tuple(v.shape), tuple(model_state[k].shape)) for k, v in state_dict.items()
                  if k in model_state and v.shape != model_state[k].shape]
    if mismatched and not ignore_mismatched_sizes:
        details = "; ".join(f"{k}: checkpoint {a} vs model {b}" for k, a, b in mismatched[:5])
        raise ValueError(f"Checkpoint {source} does not match the config's sizes ({len(mismatched)} tensors): "
                         f"{details}. Pass ignore_mismatched_sizes=True to re-initialise them.")
    for key, _, _ in mismatched:
        del state_dict[key]

    missing = [k for k in model_state if k not in state_dict]
    missing_backbone = [k for k in missing if is_required_weight(k, config)]
    if missing_backbone and not (ignore_mismatched_sizes and set(missing_backbone) <= {k for k, _, _ in mismatched}):
        raise ValueError(f"Checkpoint {source} lacks {len(missing_backbone)} weights of the model, such as "
                         f"{missing_backbone[:5]}: the file is truncated or holds a different architecture")
    unexpected = [k for k in state_dict if k not in model_state] + unused_keys
    if missing:
        logger.warning(f"Newly initialised (not in {source}): {missing}. Train this head before using it.")
    unknown = [k for k in unexpected if not k.startswith(HEAD_PREFIXES)]
    if unknown:
        logger.warning(f"Weights of {source} that {model_class.__name__} does not use: {unknown}")

    model.load_state_dict({k: v for k, v in state_dict.items() if k in model_state}, strict=False)
    if dtype == "auto":
        dtype = next(iter(state_dict.values())).dtype
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    model = model.to(dtype or torch.float32)
    if device_map is not None:
        model = model.to("cuda" if device_map == "auto" and torch.cuda.is_available() else
                         "cpu" if device_map == "auto" else device_map)
    model.eval()
    if output_loading_info:
        return model, {"missing_keys": missing, "unexpected_keys": unexpected,
                       "mismatched_keys": [k for k, _, _ in mismatched], "error_msgs": []}
    return model


def save_as_transformers(model, folder) -> None:
    """Write `model` as a folder that transformers' own DebertaV2* (or Deberta* for v1) classes load with the same
    outputs: their config (model_type deberta-v2 / deberta) and the state dict under official names (the masked-LM
    head as lm_predictions.lm_head, or in the legacy cls.predictions layout when embedding_size != hidden_size).
    The absolute position table is kept even where transformers ignores it, so the folder also loads back here with
    the Enhanced Mask Decoder intact."""
    from safetensors.torch import save_file  # only needed here; keeps module import light for remote code

    config = model.config
    official = config.to_official_dict()
    prefix = "Deberta" if config.attention_variant == "v1" else "DebertaV2"
    suffix = TRANSFORMERS_CLASS_SUFFIX.get(type(model).__name__)
    if suffix is None:
        raise ValueError(f"{type(model).__name__} has no counterpart in transformers to export to")
    official["architectures"] = [prefix + suffix]
    state_dict = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if suffix == "ForMaskedLM" and config.word_embedding_size != config.hidden_size:
        # transformers' lm_predictions head is hidden -> hidden; only its legacy cls.predictions head maps the hidden
        # size to a narrower embedding size, with an explicit (tied) decoder.
        official["legacy"] = True
        state_dict = {_LEGACY_HEAD_NAMES.sub(r"cls.predictions.transform.\1", k): v for k, v in state_dict.items()}
        bias = state_dict.pop("lm_predictions.lm_head.bias")
        state_dict["cls.predictions.bias"] = bias
        state_dict["cls.predictions.decoder.bias"] = bias.clone()
        state_dict["cls.predictions.decoder.weight"] = state_dict["deberta.embeddings.word_embeddings.weight"].clone()
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as handle:
        json.dump(official, handle, indent=2, sort_keys=True)
    save_file(state_dict, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
