"""The package version (kept in step with pyproject.toml; written into saved folders)."""

__version__ = "0.1.0"
