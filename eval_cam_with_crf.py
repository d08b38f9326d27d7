"""Dense-CRF pseudo masks and evaluation of CLIP-ES CAMs; see ``python eval_cam_with_crf.py -h``."""
import sys

from clip_es.eval_cli import eval_crf_main

if __name__ == "__main__":
    sys.exit(eval_crf_main())
