"""Command line of ``clipse.report.search_plots``: ``python -m analysis.search_plots --help``."""

import sys

from clipse.report.search_plots import main

if __name__ == "__main__":
    sys.exit(main())
