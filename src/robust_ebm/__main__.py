"""`python -m robust_ebm` = the `robust-ebm` command."""

import sys

from .cli import main

sys.exit(main())
