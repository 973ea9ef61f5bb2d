"""``python -m benchbox`` and the ``benchbox`` command: the CLI, on AMD CPUs with MKL's fast kernels (blas.py).

The re-exec happens here, before torch loads, and only here: ``benchbox.cli.main`` called in-process (the
tests, the API) never replaces its caller's process."""
import sys


def entry() -> None:
    from .blas import reexec_with_shim
    reexec_with_shim(["-m", "benchbox", *sys.argv[1:]])
    from .cli import main
    sys.exit(main())


if __name__ == "__main__":
    entry()
