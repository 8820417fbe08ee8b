"""Loading: checkpoint key maps, the GDES shared-table merge, load diagnostics, and export to transformers' own
classes. Official DeBERTa checkpoints (microsoft/deberta-* and transformers' DebertaV2* / Deberta* save_pretrained
folders) in, transformers-loadable folders out.

Loading goes through transformers' own `from_pretrained` (so dtype, device_map, meta-device initialisation, sharded
files and quantization behave as for any transformers model); this file holds what that loader is given and what it
cannot do alone. Our parameter names are the official ones (`deberta.embeddings.*`,
`deberta.encoder.layer.N.attention.self.*`, `lm_predictions.lm_head.*`, `mask_predictions.*`; v1's fused `in_proj`,
`q_bias` / `v_bias`, `pos_proj` / `pos_q_proj`), so official files need only a few renames:
  * transformers' legacy masked-LM head (`cls.predictions.*`, written when its config has legacy=True): renamed by
    `CHECKPOINT_KEY_MAPPING`, which `from_pretrained` passes to transformers as `key_mapping`;
  * old checkpoints name LayerNorm parameters gamma / beta: transformers renames those itself;
  * `position_ids` buffers and the legacy head's tied decoder copies: never loaded (`IGNORED_CHECKPOINT_KEYS`).
transformers drops `deberta.embeddings.position_embeddings` when position_biased_input is false; we keep it, since
the Enhanced Mask Decoder reads it (a file without it loads with the table newly initialised, reported as missing).

RTD pretraining folders (DebertaCustomForRTDPreTraining) load into the backbone and every head as the discriminator
that `export_discriminator` writes: under gdes / es the generator's tables are renamed onto the discriminator
(`RTD_SHARED_TABLE_MAPPING`) and, under gdes, `merge_embedding_deltas` adds E_delta after loading. Every E_G + E_delta
(these loads, the RTD model's live tables and its export) is `merged_shared_table`.

Part of the remote-code wing (copied next to the weights by `save_pretrained`): imports only torch, transformers and
its siblings at module level.
"""

import json
import os
import re

import torch
from transformers.utils import cached_file, logging

from .configuration_deberta_custom import readable_config_dict

logger = logging.get_logger(__name__)

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
HUB_KWARGS = ("cache_dir", "force_download", "proxies", "token", "revision", "local_files_only", "subfolder")
# Prefixes of head weights; a checkpoint may carry heads that the loading class does not have.
HEAD_PREFIXES = ("lm_predictions.", "mask_predictions.", "pooler.", "classifier.", "qa_outputs.")

# Official key -> our key (regular expressions; transformers' `key_mapping` format: the first matching pattern wins).
CHECKPOINT_KEY_MAPPING = {
    r"^cls\.predictions\.transform\.(dense|LayerNorm)\.": r"lm_predictions.lm_head.\1.",
    r"^cls\.predictions\.bias": "lm_predictions.lm_head.bias",
}
# Keys that are never loaded: buffers rebuilt at run time, and the legacy head's decoder (a copy of the word
# embeddings, which our decoder reads directly, and a second copy of the bias). Patterns for re.search.
IGNORED_CHECKPOINT_KEYS = (r"position_ids$", r"^cls\.predictions\.decoder\.")
# RTD pretraining folders under gdes / es: the discriminator's word and position tables are the generator's
# (plus E_delta under gdes, merged after loading); the generator itself is not part of the discriminator.
RTD_SHARED_TABLE_MAPPING = {
    r"^generator\.deberta\.embeddings\.(word|position)_embeddings\.weight": r"deberta.embeddings.\1_embeddings.weight",
}
RTD_PRETRAINING_ONLY_KEYS = (r"^generator\.", r"embeddings\.(word|position)_embeddings\.delta$")
SHARED_TABLES = ("word_embeddings", "position_embeddings")

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
    """Our name for the key of an official state dict, or None for keys that are never loaded: what
    `from_pretrained` does through `CHECKPOINT_KEY_MAPPING`, transformers' LayerNorm gamma / beta rule and
    `IGNORED_CHECKPOINT_KEYS`."""
    if any(re.search(pattern, key) for pattern in IGNORED_CHECKPOINT_KEYS):
        return None
    key = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", key))
    for pattern, replacement in CHECKPOINT_KEY_MAPPING.items():
        key, replaced = re.subn(pattern, replacement, key)
        if replaced:
            break
    return key


def convert_official_state_dict(state_dict: dict) -> dict:
    """An official state dict (for example a microsoft/deberta-* `pytorch_model.bin` read with torch.load) under
    our names, for `model.load_state_dict`. `from_pretrained` does the same from a folder."""
    converted = {}
    for key, value in state_dict.items():
        new_key = rename_official_key(key)
        if new_key is not None:
            converted[new_key] = value
    return converted


def hub_kwargs(kwargs: dict) -> dict:
    """The keyword arguments of from_pretrained that locate files (Hub revision, cache, subfolder, ...)."""
    return {k: kwargs[k] for k in HUB_KWARGS if k in kwargs}


def checkpoint_config_dict(name_or_path, kwargs: dict) -> dict | None:
    """The checkpoint's config.json as a dict, read as DebertaCustomConfig reads it (official fields translated;
    a foreign model_type raises), or None when there is none to read (transformers' loader then reports it)."""
    if not isinstance(name_or_path, (str, os.PathLike)):
        return None
    try:
        config_file = cached_file(str(name_or_path), "config.json", _raise_exceptions_for_missing_entries=False,
                                  **hub_kwargs(kwargs))
    except (OSError, ValueError):
        return None
    if config_file is None:
        return None
    try:
        with open(config_file, encoding="utf-8") as handle:
            config_dict = json.load(handle)
    except (OSError, json.JSONDecodeError):
        return None
    return readable_config_dict(config_dict, source=config_file)


def weight_files(name_or_path, kwargs: dict) -> list[str]:
    """Local paths of the checkpoint's weight files (the shards of a sharded checkpoint)."""
    if not isinstance(name_or_path, (str, os.PathLike)):  # e.g. from_pretrained(None, state_dict=...)
        raise OSError("No checkpoint folder or Hub id given")
    locate = hub_kwargs(kwargs)
    for filename in WEIGHT_FILES:
        resolved = cached_file(str(name_or_path), filename, _raise_exceptions_for_missing_entries=False, **locate)
        if resolved is None:
            continue
        if not filename.endswith(".index.json"):
            return [resolved]
        with open(resolved, encoding="utf-8") as handle:
            shards = sorted(set(json.load(handle)["weight_map"].values()))
        return [cached_file(str(name_or_path), shard, **locate) for shard in shards]
    raise OSError(f"No weights found in {name_or_path}: expected one of {', '.join(WEIGHT_FILES)}")


def describe_weight_source(name_or_path, kwargs: dict) -> str:
    """The weight file(s) of a checkpoint, for error messages: a path ending in model.safetensors (or the shards)."""
    try:
        files = weight_files(name_or_path, kwargs)
    except Exception:  # nothing resolvable: name the folder
        return f"in {name_or_path}"
    return files[0] if len(files) == 1 else f"{len(files)} shards in {name_or_path} ({', '.join(files)})"


def _read_file(path: str, keys=None, map_location="cpu") -> dict:
    """Tensors of one weight file (all, or those of `keys` that it holds): safetensors, or a pickle under torch's
    weights-only policy (as transformers reads it; a pickle that would run code is refused, with torch's reason).
    map_location="meta" reads only the safetensors header."""
    if path.endswith(".safetensors"):
        from safetensors import safe_open  # a dependency of transformers

        with safe_open(path, framework="pt") as handle:
            names = [k for k in handle.keys() if keys is None or k in keys]
            if map_location == "meta":
                return dict.fromkeys(names)
            return {k: handle.get_tensor(k) for k in names}
    state_dict = torch.load(path, map_location=map_location, weights_only=True)
    return {k: v for k, v in state_dict.items() if keys is None or k in keys}


def check_device_map(device_map) -> None:
    """Raise ValueError naming a device of `device_map` (a device name, or a dict of them) that this machine lacks,
    before transformers' loader fails on it deep inside torch ("Torch not compiled with CUDA enabled"). Strategies
    ("auto", "balanced", ...), "disk", and names torch does not know are left to transformers, which explains them."""
    devices = device_map.values() if isinstance(device_map, dict) else [device_map]
    for device in devices:
        if isinstance(device, int) and not isinstance(device, bool):
            if not torch.cuda.is_available() and not (hasattr(torch, "xpu") and torch.xpu.is_available()):
                raise ValueError(f"device_map places weights on accelerator {device}, but this machine has none "
                                 "(torch.cuda.is_available() is False): use device_map='cpu' or leave it out")
            continue
        try:
            device = torch.device(device)
        except (TypeError, RuntimeError):
            continue
        backend = getattr(torch, device.type, None) if device.type not in ("cpu", "meta") else None
        if backend is None or not hasattr(backend, "is_available"):
            continue
        if not backend.is_available():
            raise ValueError(f"device_map asks for {device}, but this machine has no {device.type} device "
                             f"(torch.{device.type}.is_available() is False): use device_map='cpu' or leave it out")
        if device.index is not None and device.index >= backend.device_count():
            raise ValueError(f"device_map asks for {device}, but this machine has {backend.device_count()} "
                             f"{device.type} device(s)")


def unreadable_weight_file(name_or_path, kwargs: dict) -> tuple[str, Exception] | None:
    """The first weight file that cannot be read (truncated, corrupt, or a pickle that the weights-only policy
    refuses) and the reader's error; None when every file reads (or none can be found). Reads headers only."""
    try:
        files = weight_files(name_or_path, kwargs)
    except Exception:  # nothing to diagnose: the loader's own error stands
        return None
    for path in files:
        try:
            _read_file(path, map_location="meta")
        except Exception as error:  # the readers raise assorted types; each means this file is unreadable
            return path, error
    return None


def read_checkpoint_tensors(name_or_path, keys, kwargs: dict) -> dict:
    """The named tensors of a checkpoint, read from whichever files hold them."""
    found = {}
    for path in weight_files(name_or_path, kwargs):
        found.update(_read_file(path, keys=set(keys)))
    missing = sorted(set(keys) - set(found))
    if missing:
        raise ValueError(f"The checkpoint {describe_weight_source(name_or_path, kwargs)} lacks {missing}")
    return found


def rtd_shared_tables(config_dict: dict | None) -> str | None:
    """The embedding-sharing mode ("gdes" / "es") of an RTD pretraining checkpoint whose discriminator reads the
    generator's tables, or None for any other checkpoint."""
    if not config_dict or "DebertaCustomForRTDPreTraining" not in (config_dict.get("architectures") or ()):
        return None
    mode = config_dict.get("rtd_embedding_sharing", "gdes")
    return mode if mode in ("gdes", "es") else None


def merged_shared_table(generator_table: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """GDES (DeBERTaV3 section 3): the discriminator's embedding table E_D = E_G + E_delta, summed in the inputs'
    precision. Pass E_G detached where the discriminator's loss must not reach the generator's table (training);
    the exported and the loaded discriminator hold this sum as a plain table."""
    return generator_table + delta


@torch.no_grad()
def merge_embedding_deltas(model, name_or_path, kwargs: dict) -> None:
    """E_D = E_G + E_delta for the word and position tables of a model loaded from a gdes RTD pretraining checkpoint,
    summed in the checkpoint's precision before the cast to the model's, as `export_discriminator` computes them.
    (from_pretrained has already placed E_G in the tables through RTD_SHARED_TABLE_MAPPING.)"""
    embeddings = model.base_model.embeddings
    names = {table: (f"generator.deberta.embeddings.{table}.weight", f"deberta.embeddings.{table}.delta")
             for table in SHARED_TABLES}
    tensors = read_checkpoint_tensors(name_or_path, [key for pair in names.values() for key in pair], kwargs)
    for table, (generator_key, delta_key) in names.items():
        weight = getattr(embeddings, table).weight
        if weight.device.type == "meta":
            raise ValueError(f"Cannot merge the RTD embedding delta into {table}: the table was offloaded (meta "
                             "device). Export the discriminator (export_discriminator) and load that folder instead")
        weight.copy_(merged_shared_table(tensors[generator_key], tensors[delta_key]))


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
