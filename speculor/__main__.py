"""`python -m speculor` runs the command line."""

import sys

from speculor.cli import main

sys.exit(main())
