"""``python -m encoder`` is ``imgenc``."""

import sys

from encoder.cli import main

sys.exit(main())
