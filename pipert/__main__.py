"""``python -m pipert``: the ``pipert`` command."""
import sys

from .cli import main

sys.exit(main())
