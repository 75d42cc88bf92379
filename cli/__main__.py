"""`python -m cli ...`: the same as the `miadpo` console script (the launchers start services this way)."""

import sys

from cli.main import main

sys.exit(main())
