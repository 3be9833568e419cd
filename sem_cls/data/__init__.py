"""Data: the folder layout, the built-in SEM-like set, info-bar cropping, splits."""
