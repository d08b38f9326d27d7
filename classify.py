"""TagCLIP classification with the paper repository's flags; see ``python classify.py -h``."""
import sys

from tagclip.cli import classify_main

if __name__ == "__main__":
    sys.exit(classify_main())
