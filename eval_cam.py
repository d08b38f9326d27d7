"""Evaluate CLIP-ES CAMs against GT masks (reference flags + --dataset); see ``python eval_cam.py -h``."""
import sys

from clip_es.eval_cli import eval_cam_main

if __name__ == "__main__":
    sys.exit(eval_cam_main())
