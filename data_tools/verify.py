"""``python -m data_tools.verify OUTPUT_DIR``: the same command as ``data_tools.inspect`` (an alias)."""

import sys

from data_tools.inspect import main

if __name__ == "__main__":
    sys.exit(main())
