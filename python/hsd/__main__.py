"""``python -m hsd``: the same as the ``hsd`` command."""

import sys

from hsd.cli import main

sys.exit(main())
