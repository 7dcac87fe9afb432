"""Data: dataset readers for UCM/RSICD/RSITMD-style caption files and image folders (datasets),
image transforms and augments (transforms), and the frozen-trunk feature cache (features)."""
