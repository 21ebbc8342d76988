"""``python -m plait`` is the ``plait`` command (what ``torchrun … -m plait run CONFIG`` starts on each rank)."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
