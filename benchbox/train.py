"""The trainer: one run = data -> model -> epochs of training + validation/test -> one CSV row.

Model selection is on validation NDCG@10 (sampled); the reported test metrics are those of the best
validation epoch. Test is evaluated every epoch only so that learning curves can be drawn; it never
influences selection.
"""
from __future__ import annotations

import math
import os
import platform
import resource
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import BenchboxError, Diverged, __version__
from . import data as data_mod
from .config import ConfigError, RunConfig
from .blas import blas_in_force
from .kernels import kernels_in_force
from .efficiency import cpu_allocator
from .evaluate import evaluate, evaluate_splits
from .model import Recommender, bce_loss
from .paths import PROJECT_ROOT
from .config import CONVERGED
from .pipeline import InstanceLoader, TrainLoader, eval_batches, eval_candidates
from .readouts import READOUTS, LastReadout
from .results import append_rows

METRICS = ("ndcg@5", "ndcg@10", "hr@5", "hr@10")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda asked for, but no CUDA device is available")
    return dev


def device_name(dev: torch.device) -> str:
    """The GPU's name, or the CPU's model, cores and widest vector extension ("cpu: AMD EPYC x2, avx2"): a
    virtual machine may name two CPU generations alike, and the C kernels' lane width follows the extension."""
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        text = ""
    return cpu_description(text, platform.processor() or platform.machine(), os.cpu_count())


def cpu_description(cpuinfo: str, fallback: str, cores: int | None) -> str:
    model, isa = fallback, ""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and model == fallback:
            model = value.strip()
        elif key.strip() in ("flags", "Features") and not isa:
            flags = set(value.split())
            isa = next((name for name in ("avx512f", "avx2", "avx", "sve", "asimd") if name in flags), "")
            isa = {"avx512f": "avx512"}.get(isa, isa)
    return f"cpu: {model} x{cores}" + (f", {isa}" if isa else "")


def git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=PROJECT_ROOT, capture_output=True,
                             text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=PROJECT_ROOT,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return (sha + ("-dirty" if dirty else "")) if sha else "unknown"
    except Exception:
        return "unknown"


def environment(dev: torch.device) -> dict:
    return {"device": device_name(dev), "torch_version": torch.__version__, "python_version": platform.python_version(),
            "numpy_version": np.__version__, "benchbox_version": __version__, "git_commit": git_commit(),
            "threads": torch.get_num_threads(), "hostname": platform.node(),
            "allocator": cpu_allocator() if dev.type == "cpu" else "cuda", "blas": blas_in_force(),
            "cpu_kernels": kernels_in_force() if dev.type == "cpu" else "-"}


def peak_memory_mb(dev: torch.device) -> float:
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated(dev) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


@dataclass
class RunResult:
    """One run: ``row`` is its runs.csv row (config, environment, best epoch's metrics), ``curves`` its
    per-epoch curves.csv rows."""
    row: dict
    curves: list[dict] = field(default_factory=list)

    @property
    def run_id(self) -> str:
        return self.row["run_id"]

    @property
    def metrics(self) -> dict[str, float]:
        """Validation and test metrics of the selected epoch (``test_ndcg@10``, ``val_hr@5``, ...)."""
        return {k: v for k, v in self.row.items() if k.startswith(("val_", "test_"))}


def default_epochs(readout: str) -> int:
    return getattr(READOUTS.get(readout), "DEFAULT_EPOCHS", 10)


def budget_epochs(cfg: RunConfig) -> tuple[int, int]:
    """(most epochs, patience) of a run: its budget's, unless --epochs / --patience say otherwise."""
    if cfg.budget == "converged":
        return cfg.epochs or CONVERGED["epochs"], cfg.patience or CONVERGED["patience"]
    return cfg.epochs or default_epochs(cfg.readout), cfg.patience


@dataclass
class Training:
    """What one run trains: the data, model, optimiser and training loader, on their device."""
    data: data_mod.Sequences
    model: Recommender
    opt: torch.optim.Optimizer
    loader: TrainLoader | InstanceLoader
    dev: torch.device
    amp: torch.dtype | None  # autocast dtype (bf16) or None
    max_len: int  # the dataset's (or --max-len) cut
    read_len: int  # what the model reads: max_len, or the window of the instance regime


def build_training(cfg: RunConfig) -> Training:
    """Validate ``cfg``, load its data, seed torch and build model, optimiser and loader as ``run`` does."""
    cfg.validate()
    check_names(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    cpu_allocator()  # keep freed CPU memory for reuse: ~10% of a CPU step was page faults (efficiency.py)
    dev = resolve_device(cfg.device)
    amp = torch.bfloat16 if cfg.dtype == "bfloat16" else None
    data = data_mod.load(cfg.dataset, cfg.data_dir, download=cfg.download, max_len=cfg.max_len, kcore=cfg.kcore,
                         dedup=cfg.dedup, columns=cfg.columns or None)
    max_len = cfg.max_len or data.max_len
    # instances: the model reads (and is evaluated on) the last `window` items
    read_len = (cfg.window or max_len) if cfg.regime == "instances" else max_len
    if cfg.train_neg >= data.n_items:
        raise ConfigError(f"train_neg={cfg.train_neg} is impossible with {data.n_items} items")

    torch.manual_seed(cfg.seed)
    model = Recommender(data.n_items, cfg.mixer, cfg.mixer_opts, cfg.d_model, cfg.n_layers, read_len, cfg.dropout,
                        cfg.ffn_mult, cfg.readout, cfg.readout_opts).to(dev)
    # rows in groups of similar length (model.length_groups) for the instance regime's shuffled rows only:
    # the sequence regime's loader already batches users of similar length (and grouping its few mixed
    # batches would change their dropout draws, hence the stored rows: ML-1M Mamba, 2 batches of 68)
    model.group_lengths = cfg.regime == "instances"
    model.fast_dropout = cfg.dropout_masks == "fast"
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    if cfg.regime == "instances":  # batch_size counts the study's rows: 1 positive + train_neg negatives each
        loader = InstanceLoader(data, read_len, max(1, cfg.batch_size // (1 + cfg.train_neg)), cfg.train_neg, cfg.seed,
                                cfg.train_order, cfg.train_negatives)
    else:
        loader = TrainLoader(data, max_len, cfg.batch_size, cfg.train_neg, cfg.seed, cfg.cover)
    if cfg.compile:
        compile_training(model, grouped=bool(model.group_lengths and model.blocks
                                             and loader.batch_size * read_len >= model.group_min_positions))
    return Training(data, model, opt, loader, dev, amp, max_len, read_len)


def compile_training(model: Recommender, grouped: bool = False) -> None:
    """torch.compile the instance regime's training forward, hence its backward (AOTAutograd). Under
    ``no_grad`` (evaluation, whose batch shapes vary) the eager methods run. ``fallback_random``: dropout
    draws the eager random stream, so a compiled run sees the same masks as an eager one and differs from
    it by summation order only (float noise).

    Steps run whole (``grouped`` False: the study protocol's 204 rows x 10): the step's forward
    (``score_candidates``) as one static graph per batch shape (``dynamic=False``; the epoch's last batch
    is a second). Steps in length groups (``grouped``: the batch reaches the mixer's ``group_min_positions``,
    e.g. RecBole's rows at window 50): the groups are formed eagerly and each group's encoder
    (``_encode_last``; ``_encode`` under a readout of every position) runs compiled with dynamic shapes (rows and length vary by group and step: one
    graph, not one per shape); the same groups and masks as the eager grouped step."""
    import torch._inductor.config as inductor_config
    inductor_config.fallback_random = True
    name = ("_encode_last" if isinstance(model.readout, LastReadout) else "_encode") if grouped else "score_candidates"
    if not grouped:
        model.group_lengths = False
    eager = getattr(model, name)
    compiled = torch.compile(eager, dynamic=grouped)

    def run(*args, **kwargs):
        return (compiled if torch.is_grad_enabled() else eager)(*args, **kwargs)

    setattr(model, name, run)


def train_step(model, opt, batch, dev, amp) -> float:
    """One optimiser step on one batch; the batch's mean loss. Raises Diverged on a non-finite loss."""
    batch = batch.to(dev)
    with torch.autocast(dev.type, dtype=amp, enabled=amp is not None):
        if batch.targets is None:  # instances: one target per row, scored at the last position
            logits = model.score_candidates(batch.inputs, batch.lengths, batch.candidates)
        else:
            logits = model.train_logits(batch.inputs, batch.lengths, batch.targets, batch.negatives)
    loss = bce_loss(logits.float(), batch.targets)
    value = loss.item()
    if not math.isfinite(value):
        raise Diverged(f"non-finite loss ({value})")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return value


def run(cfg: RunConfig, results_dir: str | os.PathLike | None = "results", progress=None, log=print) -> RunResult:
    """Train and evaluate one configuration. Raises BenchboxError on bad input (nothing written) and
    Diverged (after writing a ``diverged`` row) when the loss stops being finite."""
    tr = build_training(cfg)
    data, model, opt, loader, dev, amp, max_len, read_len = (tr.data, tr.model, tr.opt, tr.loader, tr.dev, tr.amp,
                                                             tr.max_len, tr.read_len)
    epochs, patience = budget_epochs(cfg)
    valid_cand = eval_candidates(data, "valid", cfg.eval_neg, cfg.eval_seed)
    test_cand = eval_candidates(data, "test", cfg.eval_neg, cfg.eval_seed)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)

    run_id = time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]
    row = {"run_id": run_id, "status": "running", "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
           "sweep_id": cfg.sweep_id, "dataset": data.name, "data_source": data.source, "data_sha256": data.sha256,
           "n_users": data.n_users, "n_items": data.n_items, "mixer": cfg.mixer, "readout": cfg.readout,
           "mixer_opts": _json(cfg.mixer_opts), "readout_opts": _json(cfg.readout_opts), "seed": cfg.seed,
           "epochs": epochs, "max_len": read_len, "regime": cfg.regime, "budget": cfg.budget,
           "protocol": cfg.protocol, "steps_per_epoch": len(loader), "train_targets_per_epoch": loader.n_targets, "d_model": cfg.d_model, "n_layers": cfg.n_layers,
           "batch_size": cfg.batch_size, "lr": cfg.lr, "dtype": cfg.dtype,
           "params": sum(p.numel() for p in model.parameters()), "config": cfg.to_json(),
           "raw_users": data.raw_users or data.n_users, "raw_items": data.raw_items or data.n_items,
           "ids_remapped": data.remapped, "eval_sha256": data_mod.checksum(valid_cand, test_cand),
           # full ranking masks the user's whole history (rows before 2026-12-02 masked the input window only)
           "full_mask": "history" if cfg.eval_full else ""}
    row.update(environment(dev))
    if data.raw_items:
        log(f"data {data.name}: {data.n_users:,} users, {data.n_items:,} items ({data.raw_users:,} raw user ids, "
            f"{data.raw_items:,} raw item ids, {'renumbered 1..n in first-seen order' if data.remapped else 'dense already, kept'}"
            f"{'; ' + data.settings if data.settings else ''}; {data.dropped_users:,} users with < 3 items dropped)")
    log(f"{cfg.regime} regime" + (f", window {read_len}, rows {cfg.train_order}, negatives {cfg.train_negatives}"
                                  if cfg.regime == "instances" else f", max_len {max_len}, "
        f"cover {cfg.cover}") + f": {loader.n_targets:,} training targets, {len(loader):,} steps per epoch of "
        f"{loader.batch_size} rows; budget {cfg.budget}: at most {epochs} epochs"
        + (f", patience {patience}" if patience else ""))
    curves, best, best_epoch = [], None, 0
    stop = "diverged"
    train_s = eval_s = 0.0
    t_loss = float("nan")
    try:
        for epoch in range(1, epochs + 1):
            model.train()
            t0 = time.perf_counter()
            t_loss, n_tok = _train_epoch(model, opt, loader, dev, amp, progress, epoch, epochs)
            dt = time.perf_counter() - t0
            train_s += dt
            t0 = time.perf_counter()
            val, test = evaluate_splits(model, data, read_len, valid_cand, test_cand, dev, amp)
            eval_s += time.perf_counter() - t0
            point = {"run_id": run_id, "epoch": epoch, "train_loss": t_loss, "epoch_seconds": round(dt, 3),
                     "tokens_per_s": round(n_tok / dt, 1)}
            point.update({f"val_{k}": v for k, v in val.items()})
            point.update({f"test_{k}": v for k, v in test.items()})
            curves.append(point)
            if results_dir:
                append_rows(Path(results_dir) / "curves.csv", [point])
            log(f"epoch {epoch}/{epochs}  loss {t_loss:.4f}  val ndcg@10 {val['ndcg@10']:.4f}  "
                f"test ndcg@10 {test['ndcg@10']:.4f}  {dt:.1f}s ({n_tok / dt:,.0f} tok/s)")
            if best is None or val["ndcg@10"] > best[0]["ndcg@10"]:
                best, best_epoch = (val, test), epoch
                if cfg.eval_full:  # full ranking is costly: done once, on the selected epoch's weights
                    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            elif patience and epoch - best_epoch >= patience:
                stop = f"no better validation NDCG@10 for {patience} epochs"
                break
        else:
            stop = f"epoch cap ({epochs})" if patience else f"budget done ({epochs} epochs)"
        row["status"] = "ok"
        if cfg.eval_full and best is not None:
            t0 = time.perf_counter()
            model.load_state_dict(best_state)
            for split, cand, res in (("valid", valid_cand, best[0]), ("test", test_cand, best[1])):
                full = evaluate(model, eval_batches(data, split, read_len, 128, cand, history=True), data.n_items, True,
                                dev, amp)
                res.update({k: v for k, v in full.items() if k.startswith("full_")})
            eval_s += time.perf_counter() - t0
    except Diverged as e:
        row.update(status="diverged", error=str(e))
    except KeyboardInterrupt:
        raise
    row.update(best_epoch=best_epoch, epochs_run=len(curves), stop_reason=stop, final_train_loss=t_loss,
               train_seconds=round(train_s, 2), eval_seconds=round(eval_s, 2),
               sec_per_epoch=round(train_s / max(len(curves), 1), 2), peak_mem_mb=round(peak_memory_mb(dev), 1))
    if best is not None:
        row.update({f"val_{k}": v for k, v in best[0].items()})
        row.update({f"test_{k}": v for k, v in best[1].items()})
    if results_dir:
        append_rows(Path(results_dir) / "runs.csv", [row])
    if row["status"] == "diverged":
        raise Diverged(f"run {run_id} diverged: {row['error']} (row stored with status 'diverged')")
    return RunResult(row, curves)


def check_names(cfg: RunConfig) -> None:
    """Fail fast on an unknown mixer, readout or mixer option, before any data is read."""
    import mixers
    if cfg.readout not in READOUTS:
        raise ConfigError(f"unknown readout {cfg.readout!r}; registered: {', '.join(READOUTS)}")
    if cfg.mixer == "none":
        if cfg.mixer_opts:
            raise ConfigError("mixer 'none' takes no options")
        return
    try:
        mixers.get_class(cfg.mixer)
        for k, v in cfg.mixer_opts.items():
            mixers.coerce_option(cfg.mixer, k, v)
    except mixers.MixerError as e:  # the mixer library's own error, as benchbox's
        raise ConfigError(str(e)) from None


def _json(d: dict) -> str:
    import json
    return json.dumps(d, sort_keys=True)


def is_compile_failure(e: BaseException) -> bool:
    """An error raised by torch.compile's machinery (dynamo, AOTAutograd, inductor), not by the model."""
    return any(c.__module__.startswith(("torch._dynamo", "torch._inductor")) for c in type(e).__mro__)


def error_line(e: BaseException, width: int = 200) -> str:
    """``Type: the last line of its message`` (cut to ``width``): a long compiler error told in one line."""
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[-1][:width]}"


def _train_epoch(model, opt, loader, dev, amp, progress, epoch, epochs):
    total, n_tok, n_batches = 0.0, 0, len(loader)
    task = progress.add_task(f"epoch {epoch}/{epochs}", total=n_batches, loss=float("nan"), tps=0.0) \
        if progress is not None else None
    t0 = time.perf_counter()
    for step, batch in enumerate(loader):
        tok = batch.n_targets
        try:
            value = train_step(model, opt, batch, dev, amp)
        except Diverged as e:
            raise Diverged(f"{e} at epoch {epoch}, step {step + 1}") from None
        except Exception as e:
            if is_compile_failure(e):  # torch.compile's own failure (forward or backward graph): one clear line
                raise BenchboxError(f"torch.compile failed on this model and machine ({error_line(e)}) "
                                    f"at epoch {epoch}, step {step + 1}; run without --compile") from e
            raise
        total += value * tok
        n_tok += tok
        if task is not None:
            progress.update(task, advance=1, loss=total / n_tok, tps=n_tok / (time.perf_counter() - t0))
    if task is not None:
        progress.remove_task(task)
    return total / max(n_tok, 1), n_tok
