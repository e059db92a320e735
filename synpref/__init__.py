"""synpref: align small language models with synthetic preferences."""

__version__ = "0.1.0"
