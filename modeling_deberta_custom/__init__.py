"""DeBERTa (v1, v2, v3) for Hugging Face Transformers.

Importing the package registers `deberta_custom` with AutoConfig and every head with its AutoModel class, and marks
the classes for `trust_remote_code` export so `save_pretrained` writes a Hub-ready folder.
"""

import transformers

from .configuration_deberta_custom import DebertaCustomConfig
from .loading import save_as_transformers
from .modeling_deberta_custom import (
    AUTO_MAP,  # noqa: F401  (public name; RTD_AUTO_MAP extends it)
    DebertaCustomForMaskedLM,
    DebertaCustomForMultipleChoice,
    DebertaCustomForQuestionAnswering,
    DebertaCustomForReplacedTokenDetection,
    DebertaCustomForSequenceClassification,
    DebertaCustomForTokenClassification,
    DebertaCustomModel,
    DebertaCustomPreTrainedModel,
)
from .modeling_rtd import RTD_AUTO_MAP, DebertaCustomForRTDPreTraining

__version__ = "0.1.0"


def _register_auto_classes():
    transformers.AutoConfig.register(DebertaCustomConfig.model_type, DebertaCustomConfig, exist_ok=True)
    DebertaCustomConfig.register_for_auto_class("AutoConfig")
    classes = {cls.__name__: cls for cls in (
        DebertaCustomModel, DebertaCustomForMaskedLM, DebertaCustomForSequenceClassification,
        DebertaCustomForTokenClassification, DebertaCustomForQuestionAnswering, DebertaCustomForMultipleChoice,
        DebertaCustomForRTDPreTraining,
    )}
    for auto_name, target in RTD_AUTO_MAP.items():  # AUTO_MAP plus AutoModelForPreTraining
        if auto_name == "AutoConfig":
            continue
        model_class = classes[target.split(".")[-1]]
        getattr(transformers, auto_name).register(DebertaCustomConfig, model_class, exist_ok=True)
        model_class.register_for_auto_class(auto_name)


_register_auto_classes()

__all__ = [
    "DebertaCustomConfig",
    "DebertaCustomPreTrainedModel",
    "DebertaCustomModel",
    "DebertaCustomForMaskedLM",
    "DebertaCustomForSequenceClassification",
    "DebertaCustomForTokenClassification",
    "DebertaCustomForQuestionAnswering",
    "DebertaCustomForMultipleChoice",
    "DebertaCustomForReplacedTokenDetection",
    "DebertaCustomForRTDPreTraining",
    "save_as_transformers",
]
