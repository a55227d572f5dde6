"""``python -m sharpness``: the command line of :mod:`sharpness.cli` (try ``python -m sharpness demo``)."""

import sys

from sharpness.cli import main

if __name__ == "__main__":
    sys.exit(main())
