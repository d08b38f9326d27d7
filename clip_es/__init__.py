"""CLIP-ES stage of TagCLIP's classify-then-segment pipeline: CAMs from labels, refinement,
dense CRF and mIoU (SPEC §5-§6)."""
