"""Evaluation reports: confusion matrices and per-class scores."""
