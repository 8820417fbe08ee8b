"""The old import path of loading.py (`from modeling_deberta_custom.convert import save_as_transformers`), kept for
users' code: every public name of loading.py is reachable here. Nothing in the package imports this module (the
remote-code wing imports loading.py)."""

from . import loading
from .loading import convert_official_state_dict, rename_official_key, save_as_transformers


def __getattr__(name):  # any other name of the old module, e.g. convert.CHECKPOINT_KEY_MAPPING
    return getattr(loading, name)


__all__ = ["convert_official_state_dict", "rename_official_key", "save_as_transformers"]
