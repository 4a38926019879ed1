"""python -m surgery: the same as the surgery command."""

import sys

from .cli import main

sys.exit(main())
