"""Moved to `modeling_deberta_custom.training.sift`; this module keeps `from modeling_deberta_custom.sift import ...`
working."""

from .training.loss_terms import LABEL_ARGUMENTS, check_loss_hook_arguments, output_logits  # noqa: F401
from .training.sift import *  # noqa: F403
from .training.sift import __all__  # noqa: F401
