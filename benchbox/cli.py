"""The command line, a thin typer layer over the API: ``benchbox run | rerun | datasets | mixers | bench |
sweep | table | plot | report | blas``. The ``benchbox`` command enters through ``__main__.py``.

Every user mistake (typer's own usage errors too) becomes one line on stderr and exit code 2, never a
traceback; a diverged run exits 3; ``rerun --check`` exits 1 when the numbers differ.
"""
import enum
import functools
import inspect
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from . import BenchboxError, Diverged
from .config import DROPOUT_MASKS, TRAIN_NEGATIVES, TRAIN_ORDERS
from .tables import MODELS

console = Console(width=None if sys.stdout.isatty() else 160)  # logs (CI) get whole tables
app = typer.Typer(name="benchbox", help="Compare sequence mixers inside one sequential recommender and one protocol.",
                  no_args_is_help=True, pretty_exceptions_enable=False, context_settings={"help_option_names": ["-h", "--help"]})
plot_app = typer.Typer(help="Figures from the result CSVs (sweep heatmap, learning curves).", no_args_is_help=True)
app.add_typer(plot_app, name="plot")

Eval = enum.StrEnum("Eval", ["sampled", "full"])
Dtype = enum.StrEnum("Dtype", ["float32", "bfloat16"])
Regime = enum.StrEnum("Regime", ["sequence", "instances"])
Cover = enum.StrEnum("Cover", ["windows", "last"])
Budget = enum.StrEnum("Budget", ["study", "converged"])
TrainOrder = enum.StrEnum("TrainOrder", list(TRAIN_ORDERS))
DropoutMasks = enum.StrEnum("DropoutMasks", list(DROPOUT_MASKS))
TrainNegatives = enum.StrEnum("TrainNegatives", list(TRAIN_NEGATIVES))
Protocol = enum.StrEnum("Protocol", ["study"])
Executor = enum.StrEnum("Executor", ["local", "ray"])
Backends = enum.StrEnum("Backends", ["auto", "all"])
Pairs = Optional[list[str]]  # a repeatable KEY=VALUE option


def _o(help: str, panel: str = "Run options", **kw) -> typer.Option:
    return typer.Option(help=help, rich_help_panel=panel, **kw)


# the options of one run, shared by `run`, `sweep` and `table`: name -> (type, default, typer option)
RUN_OPTIONS = {
    "mixer": (str, "ttt_linear", _o("registered mixer (see `benchbox mixers`)", "Model")),
    "dataset": (str, "synthetic", _o("card name, 'synthetic', or a path to a sequence file or interaction log", "Data")),
    "opt": (Pairs, None, _o("mixer option (repeatable)", "Model", metavar="KEY=VALUE")),
    "readout": (str, "last", _o("readout over the sequence (last, din, comirec_sa, comirec_dr)", "Model")),
    "readout_opt": (Pairs, None, _o("readout option (repeatable)", "Model", metavar="KEY=VALUE")),
    "data_dir": (Optional[str], None, _o("folder of offline datasets (default: $BENCHBOX_DATA)", "Data")),
    "kcore": (int, 0, _o("iterated k-core on users and items of an interaction log (0: none)", "Data")),
    "dedup": (bool, False, typer.Option("--dedup", help="keep only the first interaction of each (user, item)",
                                        rich_help_panel="Data")),
    "columns": (Optional[str], None, _o("columns of a CSV/TSV log, if its header names are not recognised", "Data",
                                        metavar="user=COL,item=COL,time=COL")),
    "download": (bool, False, typer.Option("--download", help="fetch the official files if no offline copy is found",
                                           rich_help_panel="Data")),
    "protocol": (Optional[Protocol], None, _o("a named preset; 'study' = --regime instances --window 10 "
                                              "--train-neg 4 --eval-neg 99 --budget study --batch-size 1024 (its "
                                              "settings yield to options given explicitly)", "Protocol")),
    "regime": (Regime, "sequence", _o("'sequence': one causal pass per user, every position a target; "
                                      "'instances': one row per (user, target) with the last --window items", "Protocol")),
    "window": (Optional[int], None, _o("instances: history items per row (default: max_len)", "Protocol")),
    "cover": (Cover, "windows", _o("sequence regime, histories over max_len: 'windows' trains every target, "
                                   "'last' only the last max_len (rows before 2026-12-02)", "Protocol")),
    "train_order": (TrainOrder, "shuffled", _o("instances: 'shuffled' = a new random row order each epoch; 'user' = by "
                                               "user, then time, every epoch (the study lineage's unshuffled file; a "
                                               "sensitivity row)", "Protocol")),
    "train_negatives": (TrainNegatives, "redrawn", _o("instances: training negatives 'redrawn' each epoch, or 'fixed' "
                                                      "once per run (the study lineage's file; a sensitivity row)",
                                                      "Protocol")),
    "budget": (Budget, "study", _o("'study': 10 epochs (50 ComiRec); 'converged': early stopping on validation "
                                   "NDCG@10, patience 10, at most 300 epochs", "Protocol")),
    "epochs": (Optional[int], None, _o("default: the budget's (study 10, 50 for ComiRec readouts; converged 300)")),
    "batch_size": (int, 128, _o("sequences per step (instances: the study's rows, 1 + train_neg per target)")),
    "lr": (float, 1e-3, _o("Adam learning rate")),
    "weight_decay": (float, 0.0, _o("Adam weight decay")),
    "d_model": (int, 64, _o("width of the item embedding and the mixer", "Model")),
    "n_layers": (int, 2, _o("mixer blocks", "Model")),
    "ffn_mult": (int, 2, _o("FFN width multiple in each block (0: no FFN)", "Model")),
    "dropout": (float, 0.2, _o("dropout in each block", "Model")),
    "dropout_masks": (DropoutMasks, "torch", _o("'torch': torch's dropout; 'fast': masks from 16-bit random lanes "
                                                "(the same distribution, another random stream: other numbers, a "
                                                "sensitivity row; no faster than torch's draws, which come from a C kernel on CPU)", "Model")),
    "max_len": (Optional[int], None, _o("default from the dataset card (50 Amazon, 200 ML-1M)", "Data")),
    "train_neg": (int, 4, _o("negatives per positive in training")),
    "eval_neg": (int, 99, _o("sampled negatives per positive at validation and test", "Evaluation")),
    "eval": (Eval, "sampled", _o("'full' also ranks all items (history masked) as a secondary result", "Evaluation")),
    "eval_seed": (int, 42, _o("seed of the stored validation/test candidates", "Evaluation")),
    "patience": (int, 0, _o("early stopping on validation NDCG@10 (0: the budget's: off, or 10 if converged)")),
    "device": (str, "auto", _o("cpu, cuda or auto", "Execution")),
    "dtype": (Dtype, "float32", _o("training precision", "Execution")),
    "threads": (int, 0, _o("torch CPU threads (0: torch default)", "Execution")),
    "compile": (bool, False, typer.Option("--compile", help="torch.compile the training step (inductor; dropout "
                                          "keeps the eager random stream; evaluation stays eager)",
                                          rich_help_panel="Execution")),
    "results_dir": (str, "results", _o("where runs.csv and curves.csv are appended ('' writes nothing)", "Execution")),
}


# options a preset may set (config.PROTOCOLS)
PRESET_OPTIONS = ("regime", "window", "train_neg", "eval_neg", "budget", "batch_size", "lr", "epochs", "patience")


def run_options(*, mixer: bool = True, **defaults):
    """Add the run options to a command's signature (typer reads it); the command receives them as
    one dict ``options`` in the API's spelling, enums turned back into strings."""
    names = [n for n in RUN_OPTIONS if mixer or n not in ("mixer", "dataset", "opt")]

    def deco(fn):
        sig = inspect.signature(fn, eval_str=True)
        own = [p for p in sig.parameters.values() if p.name != "options"]
        extra = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=defaults.get(n, RUN_OPTIONS[n][1]),
                                   annotation=Annotated[RUN_OPTIONS[n][0], RUN_OPTIONS[n][2]]) for n in names]

        @functools.wraps(fn)
        def command(ctx: typer.Context, **kw):
            options = {n: (v.value if isinstance(v, enum.Enum) else v) for n, v in kw.items() if n in RUN_OPTIONS}
            # an option left at its default is not passed on, so that a --protocol preset can set it
            unset = [n for n in PRESET_OPTIONS if n in options and options[n] == RUN_OPTIONS[n][1]
                     and ctx.get_parameter_source(n).name == "DEFAULT"]
            for n in unset:
                options.pop(n)
            return fn(**{p.name: kw[p.name] for p in own}, options=options)
        ctx_param = inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context)
        command.__signature__ = sig.replace(parameters=[ctx_param] + own + extra)
        return command
    return deco


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


def _table(title: str, columns, rows) -> Table:
    t = Table(title=title)
    for c in columns:
        t.add_column(c)
    for r in rows:
        t.add_row(*map(str, r))
    return t


# --------------------------------------------------------------------------------------------
@app.command("run")
@run_options()
def run_command(seed: Annotated[int, _o("seed of the model, the batches and the training negatives")] = 0, *,
                options: dict):
    """Train and evaluate one mixer on one dataset; append the run to results/."""
    from .api import run
    results_dir = options.pop("results_dir") or None
    with progress_bar() as prog:
        res = run(**options, seed=seed, results_dir=results_dir, progress=prog, log=console.print)
    r = res.row
    console.print(metrics_table(r, f"{r['mixer']} ({r['readout']}) on {r['dataset']}: best epoch {r['best_epoch']}"
                                   f"/{r['epochs_run']}, seed {seed}"))
    console.print(f"{r['sec_per_epoch']:.1f} s/epoch train, {r['eval_seconds']:.1f} s eval in all, peak memory "
                  f"{r['peak_mem_mb']:.0f} MB, {r['params']:,} parameters, device {r['device']}, "
                  f"blas {r['blas']}, C kernels {r['cpu_kernels']}")
    if results_dir:
        console.print(f"run {r['run_id']} appended to {os.path.join(results_dir, 'runs.csv')}")


@app.command("rerun")
def rerun_command(run_id: Annotated[str, typer.Argument(help="a run id of runs.csv (or its unique prefix)", metavar="RUN_ID")],
                  check: Annotated[bool, typer.Option("--check", help="exit 1 when a number differs by more than --tol")] = False,
                  tol: Annotated[float, typer.Option(help="largest difference counted as float noise")] = 1e-6,
                  threads: Annotated[Optional[int], typer.Option(help="default: the threads the row ran with")] = None,
                  data_dir: Annotated[Optional[str], typer.Option(help="folder of offline datasets")] = None,
                  results_dir: Annotated[str, typer.Option(help="where runs.csv is read")] = "results"):
    """Run a stored row's exact configuration again and compare the numbers (nothing is written)."""
    from .api import rerun
    with progress_bar() as prog:
        r = rerun(run_id, results_dir, data_dir=data_dir, threads=threads, progress=prog, log=None)
    console.print(_table(f"rerun of {r.stored['run_id']} ({r.stored.get('mixer')}/{r.stored.get('readout')} on "
                         f"{r.stored.get('dataset')}, seed {r.stored.get('seed')})", ("number", "stored", "new", "difference"),
                         ((k, f"{a:.10g}", f"{b:.10g}", f"{b - a:+.3g}") for k, a, b in r.comparison)))
    for k, was, now in r.environment_changes:
        console.print(f"[yellow]differs from the stored row:[/] {k}: {was} -> {now}")
    same = r.matches(tol)
    console.print(f"{'reproduced' if same else 'NOT reproduced'}: largest difference {r.max_difference():.3g} (tolerance {tol:g})")
    return 1 if check and not same else 0


@app.command("datasets")
def datasets_command(data_dir: Annotated[Optional[str], typer.Option(help="folder of offline datasets")] = None,
                     show_mapping: Annotated[Optional[str], typer.Option(
                         help="print where the raw-id mapping of this dataset (name or file) is, and its first rows",
                         metavar="NAME")] = None,
                     kcore: int = 0, dedup: Annotated[bool, typer.Option("--dedup")] = False,
                     columns: Annotated[Optional[str], typer.Option(metavar="user=COL,item=COL,time=COL")] = None):
    """List datasets, where their data was found, and statistics."""
    from .data import catalog, load, mapping_path
    from .paths import data_dir as resolve
    if show_mapping:
        from .config import make_config
        cfg = make_config(dataset=show_mapping, data_dir=data_dir, kcore=kcore, dedup=dedup, columns=columns)
        d = load(cfg.dataset, data_dir, kcore=cfg.kcore, dedup=cfg.dedup, columns=cfg.columns or None)
        path = mapping_path(d)
        console.print(f"{d.name}: {d.n_users:,} users (of {d.raw_users:,} raw ids), {d.n_items:,} items (of "
                      f"{d.raw_items:,} raw ids, {'renumbered in first-seen order' if d.remapped else 'dense already, kept'})")
        console.print(f"mapping: {path}")
        with open(path) as f:
            console.print("".join(next(f, "") for _ in range(6)).rstrip(), markup=False)
        return
    rows = catalog(data_dir)
    cols = ("name", "title", "max_len", "found at", "users", "items", "interactions", "median len")
    console.print(_table(f"datasets (data dir: {resolve(data_dir) or 'unset: --data-dir or BENCHBOX_DATA'})", cols,
                         ([r[c] for c in cols] for r in rows)))


@app.command("blas")
def blas_command(path: Annotated[bool, typer.Option("--path", help="print only the shim's path (building it "
                                                    "once), for LD_PRELOAD in a Python session of your own")] = False):
    """What torch's CPU matrix products run in here, and whether MKL's fast kernels are taken (AMD CPUs)."""
    from .blas import SHIM_ENV, blas_in_force, build_shim, shim_loaded, shim_wanted
    if path:
        built = build_shim()
        if built is None:
            raise BenchboxError("the shim could not be built: no C compiler (cc, or $CC), or the cache folder "
                                "($BENCHBOX_CACHE, ~/.cache/benchbox) is not writable")
        print(built)
        return
    wanted, why = shim_wanted()
    console.print(f"blas in force: {blas_in_force()}")
    state = ("loaded" if shim_loaded() else "wanted, not loaded in this process (the benchbox command and python -m "
             "benchbox preload it)") if wanted else "not wanted"
    console.print(f"shim: {state} ({why}); {SHIM_ENV}=off keeps MKL's own choice")


@app.command("mixers")
def mixers_command():
    """List registered mixers, their options and backends."""
    import mixers
    cols = ("name", "class", "streaming", "backends (cpu)", "auto (cpu)", "backends (cuda)", "options")
    console.print(_table("registered mixers", cols, ([r[c] for c in cols] for r in mixers.catalog())))


@app.command("bench")
def bench_command(mixers: Annotated[str, typer.Option(help="comma list or 'all'")] = "all",
                  seq_lens: Annotated[str, typer.Option(help="comma list of lengths")] = "50,200,1000",
                  batch_sizes: Annotated[str, typer.Option(help="comma list of batch sizes")] = "64",
                  d_model: int = 64, n_layers: int = 2, device: str = "cpu", dtype: Dtype = "float32",
                  modes: Annotated[str, typer.Option(help="comma list of train, encode, stream")] = "train,encode,stream",
                  repeats: int = 5, warmup: int = 2, n_items: int = 10000,
                  budget: Annotated[float, typer.Option(help="seconds of repeats per point before stopping early")] = 20.0,
                  timeout: Annotated[float, typer.Option(help="seconds per point before it is recorded as timeout")] = 900.0,
                  backends: Backends = "auto",
                  opt: Annotated[Pairs, typer.Option(help="mixer option for every mixer that has it", metavar="KEY=VALUE")] = None,
                  out: str = "results/efficiency.csv", figures: str = "results/figures"):
    """Speed, memory and scaling of every mixer (train, encode, streaming)."""
    from .efficiency import bench, exponents, summary_table
    rows, paths = bench(mixers, seq_lens, batch_sizes, d_model=d_model, n_layers=n_layers, device=device,
                        dtype=str(dtype), modes=modes, repeats=repeats, warmup=warmup, n_items=n_items, budget_s=budget,
                        timeout_s=timeout, opts=opt, backends=str(backends), out=out, figures=figures, log=console.print)
    console.print(summary_table(rows, f"benchbox bench ({rows[0]['device'] if rows else device}, {dtype})"))
    for (m, b, B), e in sorted(exponents(rows).items()):
        console.print(f"growth exponent of train time vs length: {m} ({b}), batch {B}: {e:.2f}")
    for p in paths:
        console.print(f"figure: {p}")


S = "Sweep"


@app.command("sweep")
@run_options()
def sweep_command(grid: Annotated[Pairs, _o("a swept option (repeatable)", S, metavar="KEY=V1,V2,...")] = None,
                  file: Annotated[Optional[str], _o("sweep file in TOML (run options, seeds = [...], [grid])", S)] = None,
                  seeds: Annotated[str, _o("comma-separated seeds", S)] = "0",
                  name: Annotated[Optional[str], _o("sweep id (default: a hash of the sweep definition)", S)] = None,
                  workers: Annotated[int, _o("parallel local processes (or Ray tasks)", S)] = 1,
                  executor: Annotated[Executor, _o("local processes or a Ray cluster", S)] = "local",
                  address: Annotated[Optional[str], _o("Ray cluster address (default: start a local Ray)", S)] = None,
                  dry_run: Annotated[bool, typer.Option("--dry-run", help="list the points and what is already done",
                                                        rich_help_panel=S)] = False, *, options: dict):
    """Run a grid of runs (resumable, parallel, optional Ray)."""
    from .sweeps import sweep
    try:
        seed_list = [int(s) for s in seeds.split(",")]
    except ValueError:
        raise BenchboxError(f"--seeds must be comma-separated integers, got {seeds!r}") from None
    res = sweep(grid or [], file=file, seeds=seed_list, name=name, workers=workers, executor=str(executor),
                address=address, dry_run=dry_run, log=console.print, **options)
    if not dry_run:
        c = res.counts
        console.print(f"sweep {res.sweep_id} finished: {c['ok']} ok, {c['diverged']} diverged, {c['failed']} failed")


T = "Table 1"


@app.command("table")
@run_options(mixer=False, eval="full")
def table_command(datasets: Annotated[str, _o("comma list of datasets", T)] = "ml-1m,beauty,electronics",
                  models: Annotated[str, _o(f"comma list of {', '.join(MODELS)}", T)] = ",".join(MODELS),
                  seeds: Annotated[int, _o("seeds 0..N-1", T)] = 3,
                  seed_list: Annotated[Optional[str], _o("run only these seeds (e.g. to split seeds over processes or "
                                                         "machines); the table still shows every finished seed", T,
                                                         metavar="S1,S2")] = None,
                  workers: Annotated[int, _o("parallel local processes", T)] = 1,
                  no_run: Annotated[bool, typer.Option("--no-run", help="only rebuild table1.md/csv from the results",
                                                       rich_help_panel=T)] = False,
                  dry_run: Annotated[bool, typer.Option("--dry-run", help="print what would run and its cost estimated "
                                                        "from the measured rows of runs.csv; run nothing",
                                                        rich_help_panel=T)] = False, *, options: dict):
    """Run the study's Table 1 (every model, N seeds, resumable) and write it."""
    from .tables import cost_summary, table
    if dry_run:
        est = table(datasets, models, seeds, seed_list, workers, True, options.pop("results_dir"), dry_run=True,
                    **options)
        rows = [(g["dataset"], g["model"], g["setting"], g["points"], g["measured_rows"],
                 "-" if g["sec_per_epoch"] is None else f"{g['sec_per_epoch']:.1f}", f"{g['epochs']:.0f}",
                 "no measured row" if g["cpu_seconds"] is None else f"{g['cpu_seconds']:,.0f}",
                 g["basis"] + (f" (rows of {g['measured']})" if g["measured"] else "")) for g in est]
        tot = cost_summary(est)  # priced from rows of the device kind the points would run on
        kind, unit = ("cuda" if tot["unit"] == "GPU-s" else "cpu"), tot["unit"]
        console.print(_table(f"Table 1 points to run (cost from the measured {kind} rows of runs.csv)",
                             ["dataset", "model", "setting", "points", "rows measured", "s/epoch", "epochs", unit,
                              "basis"],
                             rows))
        console.print(f"{tot['points']} points; estimated {tot['cpu_seconds']:,.0f} {unit}, about "
                      f"{tot['cpu_seconds'] / max(workers, 1) / 3600:.1f} h wall with {workers} worker(s)"
                      + (f"; {tot['unpriced_points']} point(s) without an estimate" if tot["unpriced_points"] else ""))
        return
    md, csv_path = table(datasets, models, seeds, seed_list, workers, no_run, options.pop("results_dir"),
                         log=console.print, **options)
    console.print(Path(md).read_text())
    console.print(f"wrote {md} and {csv_path}")


@app.command("report")
def report_command(results_dir: str = "results", out: Optional[str] = None,
                   print_: Annotated[bool, typer.Option("--print", help="also print the report (CI logs)")] = False):
    """Write results/report.md from the CSVs."""
    from .report import write_report
    path = write_report(results_dir, out)
    if print_:
        print(path.read_text())
    console.print(f"report: {path}")


@plot_app.command("sweep")
def plot_sweep_command(sweep_id: Annotated[Optional[str], typer.Option(help="default: the latest sweep in runs.csv")] = None,
                       x: str = "mini_batch_size", y: str = "initializer_range", metric: str = "test_ndcg@5",
                       results_dir: str = "results", out: Optional[str] = None):
    """Heatmap of a metric over two swept options (Figure 3)."""
    from .plots import plot_sweep
    console.print(f"figure: {plot_sweep(results_dir, sweep_id, x, y, metric, out)}")


@plot_app.command("curves")
def plot_curves_command(runs: Annotated[str, typer.Option(help="comma-separated run ids")],
                        reference: Annotated[Optional[str], typer.Option(help="run id drawn as a dashed line")] = None,
                        reference_epoch: int = 1, metric: str = "test_ndcg@10",
                        labels: Annotated[Optional[str], typer.Option(help="comma-separated legend labels")] = None,
                        results_dir: str = "results", out: Optional[str] = None):
    """A metric per epoch for runs, with a reference line (Figure 2)."""
    from .plots import plot_curves
    console.print(f"figure: {plot_curves(results_dir, runs.split(','), reference, reference_epoch, metric, out, labels.split(',') if labels else None)}")


# --------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    try:
        code = app(args=argv, prog_name="benchbox", standalone_mode=False)
        return code if isinstance(code, int) else 0
    except typer.Abort:
        return _fail("interrupted", 130)
    except typer.TyperException as e:  # typer's own usage errors: unknown flag, bad value, missing argument
        ctx = getattr(e, "ctx", None)
        where = f"{ctx.command_path}: " if ctx is not None else ""
        return _fail(f"error: {where}{e.format_message()} (see --help)", 2)
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
