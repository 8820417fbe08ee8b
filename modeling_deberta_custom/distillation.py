"""Moved to `modeling_deberta_custom.training.distillation`; this module keeps
`from modeling_deberta_custom.distillation import ...` working."""

from .training.distillation import *  # noqa: F403
from .training.distillation import __all__  # noqa: F401
