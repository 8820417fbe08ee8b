"""Moved to `modeling_deberta_custom.training.glue`; this module keeps `from modeling_deberta_custom.glue import ...`
working."""

from .training.glue import *  # noqa: F403
