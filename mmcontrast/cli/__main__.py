"""``python -m mmcontrast.cli``: the ``mmcontrast`` command (launchers start it this way)."""

import sys

from mmcontrast.cli import main

sys.exit(main())
