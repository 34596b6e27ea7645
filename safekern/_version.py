"""The package version (one place; ``safekern.__version__``, ``safekern.info()``, CSV rows)."""
__version__ = "0.1.0"
