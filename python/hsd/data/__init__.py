"""hsd.data: logged conversations -> interaction tuples -> student/teacher token layouts.

The pipeline, in the order data flows::

    read_conversations(source)            # Conversation records (hub, jsonl, json, parquet)
      -> extract_tuples(..., FilterConfig)  # InteractionTuple (x, y, o), drops counted in DataReport
      -> tokenize_tuple / tokenize_conversation(..., HindsightTemplate, LayoutConfig)
      -> HindsightCollator                # padded tensors plus gather indices for the loss
"""

from .collate import HindsightCollator
from .layouts import ConversationExample, LayoutConfig, PackedTuple, StudentBranch, TupleExample
from .readers import read_conversations, read_rows
from .records import FORMATS, Conversation, DataError, RecordError, detect_format
from .render import ChatRenderer, ChatTemplateError
from .report import DataReport
from .templates import HINDSIGHT_PRESETS, HindsightTemplate, append_to_last_user, append_to_system
from .tokenization import iter_examples, tokenize_conversation, tokenize_tuple
from .tuples import FilterConfig, InteractionTuple, conversation_tuples, extract_tuples, group_by_conversation

__all__ = [
    "FORMATS",
    "HINDSIGHT_PRESETS",
    "ChatRenderer",
    "ChatTemplateError",
    "Conversation",
    "ConversationExample",
    "DataError",
    "DataReport",
    "FilterConfig",
    "HindsightCollator",
    "HindsightTemplate",
    "InteractionTuple",
    "LayoutConfig",
    "PackedTuple",
    "RecordError",
    "StudentBranch",
    "TupleExample",
    "append_to_last_user",
    "append_to_system",
    "conversation_tuples",
    "detect_format",
    "extract_tuples",
    "group_by_conversation",
    "iter_examples",
    "read_conversations",
    "read_rows",
    "tokenize_conversation",
    "tokenize_tuple",
]
