"""benchbox: compare sequence mixers inside one sequential recommender and one protocol."""
__version__ = "0.1.0"


class BenchboxError(Exception):
    """A user-facing error: the CLI prints its message on one line and exits with code 2."""


class Diverged(BenchboxError):
    """Training produced a NaN or infinite loss."""
