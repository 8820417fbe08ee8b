"""Moved to `modeling_deberta_custom.training` (pretraining.py: data and collators; tokenization.py: tokenizers;
metrics.py: PretrainingMetrics and LossTermsCallback); this module keeps
`from modeling_deberta_custom.pretraining import ...` working."""

from .training.metrics import *  # noqa: F403
from .training.pretraining import *  # noqa: F403
from .training.tokenization import *  # noqa: F403
from .training.tokenization import SPM_SPECIAL_TOKENS  # noqa: F401
