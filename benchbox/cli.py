"""Command line: ``benchbox run | datasets | mixers | bench | sweep | table | plot | report``.

Every user mistake becomes one line on stderr and exit code 2 (no traceback); a diverged run exits 3.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from . import BenchboxError, Diverged

console = Console(width=None if sys.stdout.isatty() else 160)  # logs (CI) get whole tables


# --------------------------------------------------------------------------------------------
def add_run_options(p: argparse.ArgumentParser, with_mixer: bool = True) -> None:
    if with_mixer:
        p.add_argument("--mixer", default="ttt_linear", help="registered mixer (see `benchbox mixers`)")
        p.add_argument("--dataset", default="synthetic", help="card name, 'synthetic', or a path to a sequence file")
        p.add_argument("--opt", action="append", metavar="KEY=VALUE", help="mixer option (repeatable)")
    p.add_argument("--readout", default="last", help="readout over the sequence (last, din, comirec_sa, comirec_dr)")
    p.add_argument("--readout-opt", action="append", metavar="KEY=VALUE", help="readout option (repeatable)")
    p.add_argument("--data-dir", default=None, help="folder of offline datasets (default: $BENCHBOX_DATA)")
    p.add_argument("--download", action="store_true", help="fetch the official files if no offline copy is found")
    p.add_argument("--epochs", type=int, default=None, help="default 10 (50 for ComiRec readouts)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--n-layers", type=int, default=2)
    p.add_argument("--ffn-mult", type=int, default=2, help="FFN width multiple in each block (0: no FFN)")
    p.add_argument("--dropout", type=float, default=0.2)
    p.add_argument("--max-len", type=int, default=None, help="default from the dataset card (50 Amazon, 200 ML-1M)")
    p.add_argument("--train-neg", type=int, default=4)
    p.add_argument("--eval-neg", type=int, default=99)
    p.add_argument("--eval", choices=["sampled", "full"], default="sampled",
                   help="'full' also ranks all items (history masked) as a secondary result")
    p.add_argument("--eval-seed", type=int, default=42, help="seed of the stored validation/test candidates")
    p.add_argument("--patience", type=int, default=0, help="early stopping on validation NDCG@10 (0: off)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    p.add_argument("--results-dir", default="results")


def config_from_args(a, **override):
    from .config import RunConfig, parse_opts
    d = dict(mixer=a.mixer, dataset=a.dataset, mixer_opts=parse_opts(a.opt), readout=a.readout,
             readout_opts=parse_opts(a.readout_opt), data_dir=a.data_dir, download=a.download, epochs=a.epochs,
             batch_size=a.batch_size, lr=a.lr, weight_decay=a.weight_decay, d_model=a.d_model, n_layers=a.n_layers,
             ffn_mult=a.ffn_mult, dropout=a.dropout, max_len=a.max_len, train_neg=a.train_neg, eval_neg=a.eval_neg,
             eval_full=a.eval == "full", eval_seed=a.eval_seed, patience=a.patience, device=a.device,
             dtype=a.dtype, threads=a.threads)
    if hasattr(a, "seed"):
        d["seed"] = a.seed
    d.update(override)
    return RunConfig(**d).validate()


def progress_bar() -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[tps]:,.0f} tok/s"),
                    TimeElapsedColumn(), console=console, transient=True)


def metrics_table(row: dict, title: str) -> Table:
    t = Table(title=title)
    t.add_column("split")
    for m in ("NDCG@5", "NDCG@10", "HR@5", "HR@10"):
        t.add_column(m, justify="right")
    for split, prefix in (("validation", "val_"), ("test", "test_"), ("validation (full)", "val_full_"),
                          ("test (full)", "test_full_")):
        if f"{prefix}ndcg@10" in row:
            t.add_row(split, *(f"{row[prefix + m]:.4f}" for m in ("ndcg@5", "ndcg@10", "hr@5", "hr@10")))
    return t


def cmd_run(a) -> int:
    from .train import run
    cfg = config_from_args(a)
    _check_mixer(cfg)
    with progress_bar() as prog:
        res = run(cfg, a.results_dir, progress=prog, log=console.print)
    r = res.row
    console.print(metrics_table(r, f"{cfg.mixer} ({cfg.readout}) on {r['dataset']}: best epoch {r['best_epoch']}"
                                   f"/{r['epochs_run']}, seed {cfg.seed}"))
    console.print(f"{r['sec_per_epoch']:.1f} s/epoch train, {r['eval_seconds']:.1f} s eval in all, peak memory "
                  f"{r['peak_mem_mb']:.0f} MB, {r['params']:,} parameters, device {r['device']}")
    if a.results_dir:
        console.print(f"run {r['run_id']} appended to {os.path.join(a.results_dir, 'runs.csv')}")
    return 0


def _check_mixer(cfg) -> None:
    """Fail fast on an unknown mixer or option, before any data is read."""
    import mixers
    from .readouts import READOUTS
    if cfg.readout not in READOUTS:
        raise BenchboxError(f"unknown readout {cfg.readout!r}; registered: {', '.join(READOUTS)}")
    if cfg.mixer == "none":
        if cfg.mixer_opts:
            raise BenchboxError("mixer 'none' takes no options")
        return
    mixers.get_class(cfg.mixer)
    for k, v in cfg.mixer_opts.items():
        mixers.coerce_option(cfg.mixer, k, v)


def cmd_datasets(a) -> int:
    from . import data
    from .paths import data_dir
    root = data_dir(a.data_dir)
    t = Table(title=f"datasets (data dir: {root or 'unset: --data-dir or BENCHBOX_DATA'})")
    for c in ("name", "title", "max_len", "found at", "users", "items", "interactions", "median len"):
        t.add_column(c)
    syn = data.synthetic()
    s = syn.stats()
    t.add_row("synthetic", "generated, learnable sequential structure", "50", "embedded (no file)",
              f"{s['users']:,}", f"{s['items']:,}", f"{s['interactions']:,}", f"{s['len_median']:g}")
    for card in data.load_cards().values():
        try:
            d = data.load(card.name, a.data_dir)
            s = d.stats()
            ok = "" if not card.offline_sha256 or d.sha256 == card.offline_sha256 else " [red](checksum differs)[/]"
            t.add_row(card.name, card.title, str(card.max_len), d.source + ok, f"{s['users']:,}", f"{s['items']:,}",
                      f"{s['interactions']:,}", f"{s['len_median']:g}")
        except BenchboxError:
            how = f"missing: put {card.offline_file} under the data dir" + (", or --download" if card.download else "")
            t.add_row(card.name, card.title, str(card.max_len), f"[yellow]{how}[/]", "", "", "", "")
    console.print(t)
    return 0


def cmd_mixers(a) -> int:
    import mixers
    import torch
    t = Table(title="registered mixers")
    for c in ("name", "class", "streaming", "backends (cpu)", "auto (cpu)", "backends (cuda)", "options"):
        t.add_column(c)
    has_cuda = torch.cuda.is_available()
    for name in mixers.names():
        cls = mixers.get_class(name)
        m = mixers.build(name, 8, 8) if "num_heads" not in mixers.options(name) else mixers.build(name, 8, 8, num_heads=2)
        opts = ", ".join(f"{k}={v}" for k, v in mixers.options(name).items())
        cuda = ", ".join(cls.available_backends("cuda")) + (" (auto: " + cls.auto_backend("cuda") + ")") \
            if has_cuda else "no CUDA here"
        t.add_row(name, cls.__name__, "yes" if m.supports_streaming else "no", ", ".join(cls.available_backends("cpu")),
                  cls.auto_backend("cpu"), cuda, opts)
    console.print(t)
    return 0


# --------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="benchbox", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="train and evaluate one mixer on one dataset")
    add_run_options(r)
    r.add_argument("--seed", type=int, default=0)
    r.set_defaults(func=cmd_run)

    d = sub.add_parser("datasets", help="list datasets, where their data was found, and statistics")
    d.add_argument("--data-dir", default=None)
    d.set_defaults(func=cmd_datasets)

    m = sub.add_parser("mixers", help="list registered mixers, their options and backends")
    m.set_defaults(func=cmd_mixers)

    import importlib
    for mod in ("bench", "sweep", "table", "plots", "report"):  # each module adds its own subcommand
        importlib.import_module(f"benchbox.{mod}").register(sub) if importlib.util.find_spec(f"benchbox.{mod}") else None
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except Diverged as e:
        return _fail(f"diverged: {e}", 3)
    except (BenchboxError, ValueError, OSError) as e:
        return _fail(f"error: {e}", 2)
    except KeyboardInterrupt:
        return _fail("interrupted", 130)


def _fail(msg: str, code: int) -> int:
    """One line on stderr (never wrapped, never a traceback)."""
    sys.stderr.write("benchbox: " + " ".join(str(msg).split()) + "\n")
    return code


if __name__ == "__main__":
    sys.exit(main())
