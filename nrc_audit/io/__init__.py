"""Readers at the boundary: checkpoints and datasets, validated once."""
