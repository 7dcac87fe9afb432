"""Why a result matched: cross-attention / Grad-CAM maps (gradcam) and their overlays and the
embedding map (viz)."""
