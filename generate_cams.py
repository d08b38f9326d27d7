"""CLIP-ES CAMs from a label file with the reference's flags; see ``python generate_cams.py -h``."""
import sys

from clip_es.cli import generate_cams_main

if __name__ == "__main__":
    sys.exit(generate_cams_main())
