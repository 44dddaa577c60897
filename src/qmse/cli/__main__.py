"""python -m qmse.cli: the qmse command (used by torchrun)."""

import sys

from qmse.cli import main

sys.exit(main())
