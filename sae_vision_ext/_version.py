"""The package version (one home: the root package and the SAE metadata read it)."""

__version__ = "0.1.0"
