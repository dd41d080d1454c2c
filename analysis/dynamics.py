"""Command line of ``clipse.report.dynamics``: ``python -m analysis.dynamics --help``."""

import sys

from clipse.report.dynamics import main

if __name__ == "__main__":
    sys.exit(main())
