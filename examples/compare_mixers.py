"""Compare two mixers on the embedded synthetic data from Python: runs, a DataFrame, a plot.

    python examples/compare_mixers.py [OUT_DIR]      # default OUT_DIR: examples_out/

Everything goes to OUT_DIR (its own runs.csv and curves.csv), never into the committed results/.
"""
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

import benchbox

out = Path(sys.argv[1] if len(sys.argv) > 1 else "examples_out")
for mixer in ("gru", "attention"):
    benchbox.run(mixer=mixer, dataset="synthetic", epochs=3, d_model=32, n_layers=1, results_dir=out, log=None)

runs = benchbox.load_runs(out)
table = runs.groupby("mixer")[["test_ndcg@10", "test_hr@10", "sec_per_epoch"]].mean()
print(table.to_string(float_format="{:.4f}".format))

curves = benchbox.load_curves(out).merge(runs[["run_id", "mixer"]], on="run_id")
fig, ax = plt.subplots(figsize=(5, 3.5))
for mixer, c in curves.groupby("mixer"):
    ax.plot(c["epoch"], c["val_ndcg@10"], marker="o", label=mixer)
ax.set_xticks(sorted(curves["epoch"].unique()))
ax.set_xlabel("epoch")
ax.set_ylabel("validation NDCG@10")
ax.set_title("gru vs attention on synthetic")
ax.legend()
fig.tight_layout()
fig.savefig(out / "compare_mixers.png", dpi=120)
print(f"figure: {out / 'compare_mixers.png'}")
