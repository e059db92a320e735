"""synpref: align small language models with synthetic preferences."""

__version__ = "0.1.0"

from synpref import moved as _moved  # noqa: E402

_moved.install()
