"""``python -m tagclip`` = the ``tagclip`` command."""
import sys

from .cli import main

sys.exit(main())
