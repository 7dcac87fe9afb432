"""`python -m envlf ...` is the `envlf` console script."""

import sys

from envlf.cli import main

sys.exit(main())
