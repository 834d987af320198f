"""``python -m protopnet`` (and ``torchrun -m protopnet``) run the command line."""

import sys

from .cli import main

sys.exit(main())
