"""``python -m tcmu_py``: the same command line as ``tcmu-py``."""

import sys

from tcmu_py.cli import main

sys.exit(main())
