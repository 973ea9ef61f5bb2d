"""Seconds per training epoch of RecBole 1.2.1's SASRec beside benchbox's, on the same rows.

RecBole's sequential training epoch is the "prefix" epoch: one row per (user, training target), the
history the last MAX_ITEM_LIST_LENGTH items before it. benchbox's instance regime with ``--window`` =
that length trains exactly those rows. Both sides: Amazon Beauty (the offline copy), leave-one-out,
2,048 rows per step, d 64, 2 layers, 2 heads, the same thread count. What differs, by design of each
tool: RecBole's SASRec default loss is a softmax over all items (CE), benchbox's is BCE on 1 positive +
4 sampled negatives; RecBole's inner FFN is 256 wide, benchbox's 128.

RecBole runs in a scratch environment (never a dependency):
    python -m venv /tmp/rbenv && /tmp/rbenv/bin/pip install torch==2.13.0 recbole==1.2.1 \
        "numpy<2" "pandas<2.3" "scipy<1.14"     # RecBole 1.2.1 uses np.float_ (gone in NumPy 2)
    python benchmarks/recbole_ratio.py --recbole-python /tmp/rbenv/bin/python --threads 1

Only training epochs are timed (RecBole: ``Trainer._train_epoch``; benchbox: the row's train_seconds).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

DRIVER = r"""
import json, sys, time, torch
from recbole.config import Config
from recbole.data import create_dataset, data_preparation
from recbole.model.sequential_recommender import SASRec
from recbole.trainer import Trainer
a = json.loads(sys.argv[1])
torch.set_num_threads(a["threads"])
cfg = Config(model="SASRec", dataset="beauty", config_dict={
    "data_path": a["data_path"], "USER_ID_FIELD": "user_id", "ITEM_ID_FIELD": "item_id",
    "TIME_FIELD": "timestamp", "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
    "MAX_ITEM_LIST_LENGTH": a["max_len"], "train_batch_size": a["rows"], "epochs": a["epochs"],
    "eval_step": 0, "hidden_size": 64, "n_layers": 2, "n_heads": 2, "train_neg_sample_args": None,
    "loss_type": "CE", "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "mode": "full"},
    "device": "cpu", "use_gpu": False, "show_progress": False, "seed": 0, "state": "WARNING",
    "checkpoint_dir": a["data_path"] + "/saved"})
dataset = create_dataset(cfg)
train_data, valid_data, test_data = data_preparation(cfg, dataset)
model = SASRec(cfg, train_data.dataset)
trainer = Trainer(cfg, model)
out = {"rows_per_epoch": len(train_data.dataset), "steps_per_epoch": len(train_data), "epoch_seconds": []}
for epoch in range(a["epochs"]):
    t0 = time.perf_counter()
    trainer._train_epoch(train_data, epoch)
    out["epoch_seconds"].append(time.perf_counter() - t0)
print("RESULT " + json.dumps(out))
"""


def write_inter(seq_file: Path, out_dir: Path) -> None:
    """RecBole atomic file from a sequence file (``user item item ...``): timestamp = position."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(seq_file) as f, open(out_dir / "beauty.inter", "w") as g:
        g.write("user_id:token\titem_id:token\ttimestamp:float\n")
        for line in f:
            user, *items = line.split()
            for t, item in enumerate(items):
                g.write(f"{user}\t{item}\t{t}\n")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--recbole-python", required=True, help="python of the scratch environment with recbole")
    p.add_argument("--data-dir", default=os.environ.get("BENCHBOX_DATA", str(ROOT.parent / "shared" / "data")))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--epochs", type=int, default=1, help="RecBole epochs timed (each is minutes)")
    p.add_argument("--ours-epochs", type=int, default=3, help="epochs of the sequence-regime side")
    p.add_argument("--instance-epochs", type=int, default=1, help="epochs of the instance-regime side")
    p.add_argument("--compile", action="store_true",
                   help="also the instance regime with --compile (its first epoch compiles; the median leaves it out "
                        "from 3 epochs up)")
    p.add_argument("--max-len", type=int, default=50)
    p.add_argument("--rows", type=int, default=2048, help="training rows per step")
    a = p.parse_args(argv)
    seq = Path(a.data_dir) / "beauty" / "Beauty.txt"
    if not seq.exists():
        sys.exit(f"no Beauty.txt under {a.data_dir}/beauty")
    with tempfile.TemporaryDirectory() as tmp:
        write_inter(seq, Path(tmp) / "beauty")
        args = json.dumps(dict(data_path=tmp, threads=a.threads, epochs=a.epochs, max_len=a.max_len, rows=a.rows))
        res = subprocess.run([a.recbole_python, "-c", DRIVER, args], capture_output=True, text=True, cwd=tmp)
        lines = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")]
        if res.returncode or not lines:
            sys.exit(f"RecBole failed (exit {res.returncode}): {res.stderr.strip().splitlines()[-1:]}")
        rb = json.loads(lines[-1][7:])
    rb_s = sorted(rb["epoch_seconds"])[len(rb["epoch_seconds"]) // 2]
    print(f"RecBole 1.2.1 SASRec: {rb['rows_per_epoch']:,} rows, {rb['steps_per_epoch']} steps per epoch, "
          f"{rb_s:.1f} s/epoch (median of {len(rb['epoch_seconds'])})", flush=True)

    sys.path.insert(0, str(ROOT))
    import benchbox
    common = dict(mixer="attention", dataset="beauty", data_dir=a.data_dir, train_neg=4, threads=a.threads,
                  results_dir=None, log=None)
    # the same rows computed two ways: one encode per row (what RecBole does), and one causal pass per user
    # (the sequence regime: every position of a user's last max_len training items is a target)
    sides = {"instances, window %d (one encode per row)" % a.max_len:
             dict(regime="instances", window=a.max_len, batch_size=a.rows * 5, epochs=a.instance_epochs),
             "sequence, max_len %d (one causal pass per user)" % a.max_len:
             dict(regime="sequence", max_len=a.max_len, epochs=a.ours_epochs)}
    if a.compile:
        sides["instances, window %d, --compile" % a.max_len] = dict(
            regime="instances", window=a.max_len, batch_size=a.rows * 5, epochs=a.instance_epochs, compile=True)
    for name, opts in sides.items():
        ours = benchbox.run(**common, **opts)
        s = sorted(c["epoch_seconds"] for c in ours.curves)[len(ours.curves) // 2]
        print(f"benchbox SASRec, {name}: {ours.row['train_targets_per_epoch']:,} targets, "
              f"{ours.row['steps_per_epoch']} steps per epoch, {s:.1f} s/epoch (median of {len(ours.curves)}); "
              f"RecBole / benchbox = {rb_s / s:.1f}x", flush=True)
    print(f"{a.threads} thread(s) each")


if __name__ == "__main__":
    from benchbox.blas import reexec_with_shim
    reexec_with_shim(sys.argv)  # MKL's fast kernels on AMD CPUs, as the benchbox command runs (benchbox/blas.py)
    main()
