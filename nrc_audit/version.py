"""The package version: one home, read by the package, its metadata (pyproject.toml) and every report."""

__version__ = "0.1.0"
