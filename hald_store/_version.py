"""The package version, declared once: read by ``hald_store.__init__``, ``schema`` and ``setup.py``."""

__version__ = "0.1.0"
