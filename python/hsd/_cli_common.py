"""Argument types shared by the ``hsd`` command families (``cli``, ``online_cli``, ``demo_cli``).

Kept in a module of its own, importing nothing heavy, because ``cli`` imports the other
families at its end: a family importing ``cli`` back would be circular.
"""

from __future__ import annotations

import argparse
import json


def json_object(text: str) -> dict:
    """argparse ``type=``: parse a JSON object (e.g. ``--chat-template-kwargs``), else a usage error."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"invalid JSON ({e.msg} at column {e.colno}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(
            f"must be a JSON object such as '{{\"enable_thinking\": false}}', got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    """argparse ``type=``: an integer >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def positive_int(text: str) -> int:
    """argparse ``type=``: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value
