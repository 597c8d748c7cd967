"""hsd: hindsight self-distillation from logged conversations."""

import logging

__version__ = "0.1.0"

logger = logging.getLogger("hsd")
logger.addHandler(logging.NullHandler())
