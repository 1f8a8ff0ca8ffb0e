"""Self-checks used by the exercise notebooks (``exercises/NN_topic.ipynb``). Chapters 1–9.

After each task a notebook calls ``checks.check_<thing>(your_answer)``. The check runs your function
on fresh inputs (seeded inside the check, several trials, without touching your notebook's random
state), compares it with the library and with the properties every correct answer has, prints one
line starting with ✓ (and advice starting with 💡 where a correct answer could be cheaper), or
raises
:class:`CheckFailed` (an ``AssertionError``) whose message names the mistake.
``NotImplementedError`` from an unsolved exercise passes through unchanged.

The machinery is in :mod:`.harness`; each chapter's checks are in their own module (``ch01`` ...
``ch09``).
"""

from __future__ import annotations

from . import ch01, ch02, ch03, ch04, ch05, ch06, ch07, ch08, ch09, steps
from .ch01 import *  # noqa: F403
from .ch02 import *  # noqa: F403
from .ch03 import *  # noqa: F403
from .ch04 import *  # noqa: F403
from .ch05 import *  # noqa: F403
from .ch06 import *  # noqa: F403
from .ch07 import *  # noqa: F403
from .ch08 import *  # noqa: F403
from .ch09 import *  # noqa: F403
from .harness import CheckFailed
from .steps import *  # noqa: F403

__all__ = ["CheckFailed"] + [
    name
    for module in (ch01, ch02, ch03, ch04, ch05, ch06, ch07, ch08, ch09, steps)
    for name in module.__all__
]
