"""``python -m pigeon`` is the ``pigeon`` command."""

import sys

from pigeon.control.cli import main

sys.exit(main())
