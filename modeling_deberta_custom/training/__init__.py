"""The training wing: everything that trains a DeBERTa but is never copied next to saved weights.

  loss_terms.py    the one base of the callbacks that add or log loss terms under an unchanged Trainer: hooks,
                   the re-entry guard, exact gradient accumulation of added terms, logging, place_before_integrations
  sift.py          SiFT, scale-invariant adversarial fine-tuning (DeBERTa paper section 4)
  distillation.py  knowledge distillation: soft targets and MiniLMv2 attention relations
  pretraining.py   text into blocks, the masking collator for masked-LM and replaced-token detection
  metrics.py       pretraining metrics for evaluation, LossTermsCallback for the training logs
  tokenization.py  the official SentencePiece model as an exact fast tokenizer; tokenizer folders portable to 4.x
  glue.py          GLUE tasks, readers for the original TSV files, preprocessing
  distributed.py   end_distributed_run: closes the process group at the end of a torchrun launch

The model files (the remote-code wing) never import this package.
"""

from .distillation import DistillationCallback
from .loss_terms import LossTermCallback, place_before_integrations
from .metrics import LossTermsCallback, PretrainingMetrics
from .pretraining import DebertaMaskingCollator, MaskingSeedCallback
from .sift import SiFTCallback

__all__ = [
    "DebertaMaskingCollator",
    "DistillationCallback",
    "LossTermCallback",
    "LossTermsCallback",
    "MaskingSeedCallback",
    "PretrainingMetrics",
    "SiFTCallback",
    "place_before_integrations",
]
