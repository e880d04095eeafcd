"""hf_sparse: learned (SparseBERT/DAM) and predicted (Sparsefinder) sparse attention for 🤗 Transformers.

Importing the package registers its configs and models with the Auto classes, so
``AutoModelForMaskedLM.from_pretrained(path)`` works in-process; checkpoints also carry their code
(``auto_map``) and load elsewhere with ``trust_remote_code=True``.
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForMaskedLM,
    AutoModelForMultipleChoice,
    AutoModelForQuestionAnswering,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)

from . import patterns
from .configuration_entmax_marian import EntmaxSparsefinderMarianConfig
from .configuration_sparse_bert import SparseBertConfig
from .modeling_entmax_marian import EntmaxSparsefinderMarianModel, EntmaxSparsefinderMarianMTModel
from .modeling_sparse_bert import (
    SparseBertForMaskedLM,
    SparseBertForMultipleChoice,
    SparseBertForQuestionAnswering,
    SparseBertForSequenceClassification,
    SparseBertForTokenClassification,
    SparseBertModel,
    SparseBertPreTrainedModel,
)

__version__ = "0.1.0"

AutoConfig.register(SparseBertConfig.model_type, SparseBertConfig, exist_ok=True)
AutoConfig.register(EntmaxSparsefinderMarianConfig.model_type, EntmaxSparsefinderMarianConfig, exist_ok=True)
AutoModel.register(EntmaxSparsefinderMarianConfig, EntmaxSparsefinderMarianModel, exist_ok=True)
AutoModelForSeq2SeqLM.register(EntmaxSparsefinderMarianConfig, EntmaxSparsefinderMarianMTModel, exist_ok=True)
for _auto, _model in (
    (AutoModel, SparseBertModel),
    (AutoModelForMaskedLM, SparseBertForMaskedLM),
    (AutoModelForSequenceClassification, SparseBertForSequenceClassification),
    (AutoModelForTokenClassification, SparseBertForTokenClassification),
    (AutoModelForQuestionAnswering, SparseBertForQuestionAnswering),
    (AutoModelForMultipleChoice, SparseBertForMultipleChoice),
):
    _auto.register(SparseBertConfig, _model, exist_ok=True)



def __getattr__(name: str):
    """``from hf_sparse import DAMCallback, SparsefinderCallback``: the Trainer callbacks, imported on first use
    (they pull in Transformers' Trainer, which plain model loading does not need)."""
    if name in ("DAMCallback", "SparsefinderCallback"):
        from . import callbacks

        return getattr(callbacks, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DAMCallback",
    "SparsefinderCallback",
    "patterns",
    "EntmaxSparsefinderMarianConfig",
    "EntmaxSparsefinderMarianModel",
    "EntmaxSparsefinderMarianMTModel",
    "SparseBertConfig",
    "SparseBertModel",
    "SparseBertPreTrainedModel",
    "SparseBertForMaskedLM",
    "SparseBertForSequenceClassification",
    "SparseBertForTokenClassification",
    "SparseBertForQuestionAnswering",
    "SparseBertForMultipleChoice",
]
