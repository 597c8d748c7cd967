"""Test-wide settings: offline hubs, and Triton's CPU interpreter when no GPU is present.

TRITON_INTERPRET must be set before any @triton.jit module is imported.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
try:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:  # torch missing: collection will report it clearly
    pass

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    import torch

    torch.manual_seed(1234)


@pytest.fixture(scope="module")
def tok():
    """The tiny chatml tokenizer of hsd.data.testing, fresh per module; a module may define its own."""
    from hsd.data.testing import tiny_chat_tokenizer

    return tiny_chat_tokenizer("chatml")
