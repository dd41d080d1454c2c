"""``python -m clipse.search``."""

import sys

from clipse.search.command import main

sys.exit(main())
