"""``python -m esam_ros.cli``: the ``esam`` command line (the console script runs the same)."""

import sys

from esam_ros.cli import main

sys.exit(main())
