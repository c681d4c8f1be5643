"""The package version (a module of its own, so that no module below the front door imports
``nepenthe/__init__.py`` to read it)."""

__version__ = "0.1.0"
