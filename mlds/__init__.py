"""MLDS: generate model zoos, datasets of thousands of trained networks."""

__version__ = "0.1.0"
