"""``python -m kvdecode``: the same command line as the ``kvdecode`` console script."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
