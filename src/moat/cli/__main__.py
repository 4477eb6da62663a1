"""`python -m moat.cli` (also under torchrun)."""

import sys

from moat.cli import main

sys.exit(main())
