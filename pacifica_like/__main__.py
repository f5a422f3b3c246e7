"""``python -m pacifica_like``: the same command line as ``pacifica-like``."""

import sys

from pacifica_like.cli.main import main

sys.exit(main())
