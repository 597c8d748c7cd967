"""hsd: hindsight self-distillation from logged conversations.

The public loss API lives in :mod:`hsd.loss`; kernels are reached through
:func:`hsd.backends.select_backend`.
"""

import logging

logger = logging.getLogger("hsd")
logger.addHandler(logging.NullHandler())

__version__ = "0.1.0"

from ._extension import ExtensionWarning  # noqa: E402
from .backends import available_backends, select_backend  # noqa: E402
from .data import (  # noqa: E402
    Conversation,
    ConversationExample,
    DataReport,
    FilterConfig,
    HindsightCollator,
    HindsightTemplate,
    InteractionTuple,
    LayoutConfig,
    TupleExample,
    extract_tuples,
    read_conversations,
    tokenize_conversation,
    tokenize_tuple,
)
from .loss import (  # noqa: E402
    HindsightLoss,
    divergence,
    fused_hindsight_loss,
    hindsight_loss,
    reference_token_terms,
)
from .forward import EMATeacher, HiddenStates, hindsight_hidden_states  # noqa: E402
from .step import StepOutput, hindsight_step  # noqa: E402

__all__ = [
    "Conversation",
    "ConversationExample",
    "DataReport",
    "ExtensionWarning",
    "FilterConfig",
    "HindsightCollator",
    "HindsightTemplate",
    "InteractionTuple",
    "LayoutConfig",
    "TupleExample",
    "extract_tuples",
    "read_conversations",
    "tokenize_conversation",
    "tokenize_tuple",
    "HindsightLoss",
    "available_backends",
    "divergence",
    "fused_hindsight_loss",
    "hindsight_loss",
    "reference_token_terms",
    "select_backend",
    "EMATeacher",
    "HiddenStates",
    "StepOutput",
    "hindsight_hidden_states",
    "hindsight_step",
]


def __getattr__(name):
    # the Trainer integration imports transformers' Trainer (seconds): only when asked for
    if name in ("HSDConfig", "HSDTrainer"):
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'hsd' has no attribute {name!r}")
