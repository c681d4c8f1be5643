"""``python -m nepenthe``: the same command line as the ``nepenthe`` console script."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
