"""``python -m safekern.cli``: the ``safekern`` console script."""
import sys

from . import main

sys.exit(main())
