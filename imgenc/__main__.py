"""``python -m imgenc`` is ``imgenc``."""

import sys

from imgenc.cli import main

sys.exit(main())
