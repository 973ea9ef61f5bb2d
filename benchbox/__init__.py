"""benchbox: compare sequence mixers inside one sequential recommender and one protocol.

The Python API (the CLI is a thin layer over it)::

    import benchbox
    res = benchbox.run(mixer="gru", dataset="synthetic", epochs=2, results_dir=None)
    res.metrics["test_ndcg@10"]
    runs = benchbox.load_runs("results")            # a pandas DataFrame, one row per run
    benchbox.sweep({"lr": [1e-3, 3e-3]}, mixer="gru", epochs=1)
    benchbox.table(datasets="beauty", seeds=3)
    benchbox.bench(mixers="gru,attention", seq_lens=[50, 200])
    benchbox.rerun("20261128-232726-03240a").matches()
"""
__version__ = "0.1.0"


class BenchboxError(Exception):
    """A user-facing error: the CLI prints its message on one line and exits with code 2."""


class Diverged(BenchboxError):
    """Training produced a NaN or infinite loss."""


# name -> module that defines it; imported on first use, so `import benchbox` stays light (no torch)
_API = {"run": "api", "rerun": "api", "Rerun": "api", "sweep": "sweeps", "SweepResult": "sweeps", "table": "tables",
        "bench": "efficiency", "load_runs": "results", "load_curves": "results", "load_efficiency": "results",
        "write_report": "report", "plot_sweep": "plots", "plot_curves": "plots", "RunConfig": "config",
        "make_config": "config", "RunResult": "train"}
__all__ = ["BenchboxError", "Diverged", *_API]


def __getattr__(name: str):
    if name in _API:
        import importlib
        return getattr(importlib.import_module(f"benchbox.{_API[name]}"), name)
    raise AttributeError(f"module 'benchbox' has no attribute {name!r}")
