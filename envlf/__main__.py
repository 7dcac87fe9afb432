"""`python -m envlf ...` is the `envlf` console script."""

import sys

from .cli import main

sys.exit(main())
