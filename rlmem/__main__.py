"""``python -m rlmem ...`` runs the command line (``torchrun ... -m rlmem train CONFIG`` starts ranks this way)."""

import sys

from rlmem.cli import main

sys.exit(main())
