"""Command line of ``clipse.report.summary``: ``python -m analysis.summary --help``."""

import sys

from clipse.report.summary import main

if __name__ == "__main__":
    sys.exit(main())
