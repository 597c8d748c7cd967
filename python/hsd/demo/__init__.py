"""``hsd demo``: hindsight self-distillation learning a hidden user preference, on a laptop CPU.

An embedded world (:mod:`hsd.demo.world`: requests, six answer styles, a simulated user, rule
judges), a tiny base model that can revise in context (:mod:`hsd.demo.reviser`, pretrained and
cached at first run) and the experiment (:mod:`hsd.demo.experiment`: online learning through
:class:`hsd.online.OnlineDistiller`, controls, report, plot). Run it with ``hsd demo``.
"""

from .experiment import ARMS, DemoConfig, check_targets, format_summary, run_demo
from .reviser import ReviserRecipe, build_tokenizer, load_or_build_reviser
from .world import STYLES, World, judge_strict, judge_style

__all__ = ["ARMS", "DemoConfig", "ReviserRecipe", "STYLES", "World", "build_tokenizer", "check_targets",
           "format_summary", "judge_strict", "judge_style", "load_or_build_reviser", "run_demo"]
