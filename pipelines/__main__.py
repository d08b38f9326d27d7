"""``python -m pipelines`` = the ``tagclip`` command."""
import sys

from .command import main

sys.exit(main())
