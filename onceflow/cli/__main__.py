"""``python -m onceflow.cli``: the ``onceflow`` console script."""

import sys

from onceflow.cli import main

sys.exit(main())
