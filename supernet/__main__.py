"""`python -m supernet ...` runs the `supernet` command (also what `torchrun -m supernet ...` starts)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
