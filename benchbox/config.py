"""One run's settings. Everything that changes a number lives here and is stored in the CSV row."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields

from . import BenchboxError


class ConfigError(BenchboxError):
    pass


@dataclass
class RunConfig:
    mixer: str = "ttt_linear"
    dataset: str = "synthetic"
    mixer_opts: dict = field(default_factory=dict)
    readout: str = "last"
    readout_opts: dict = field(default_factory=dict)
    data_dir: str | None = None
    kcore: int = 0  # iterated k-core on users and items of an interaction log (0: none; a card may set it)
    dedup: bool = False  # keep only the first interaction of each (user, item)
    columns: dict = field(default_factory=dict)  # {user, item, time: column name} of a CSV/TSV log
    d_model: int = 64
    n_layers: int = 2
    ffn_mult: int = 2
    dropout: float = 0.2
    max_len: int | None = None  # None: the dataset card's default (50 Amazon, 200 ML-1M)
    # how training rows are made (see pipeline.py): "sequence" = one causal pass per user, every position a
    # target; "instances" = one row per (user, target), the history = the last ``window`` items before it
    regime: str = "sequence"
    window: int | None = None  # instances only; None: max_len
    # sequence regime, histories longer than max_len: "windows" cuts them into max_len windows so that every
    # training target is trained each epoch; "last" trains only the last max_len targets (rows before 2026-12-02)
    cover: str = "windows"
    # instances only, for sensitivity rows (see pipeline.InstanceLoader): "user" = rows by user, then time, every
    # epoch (the study lineage's unshuffled file); "fixed" = negatives drawn once per run (the lineage's file)
    train_order: str = "shuffled"
    train_negatives: str = "redrawn"
    # "study": the study's epochs (10; 50 for ComiRec); "converged": early stopping on validation NDCG@10,
    # patience 10, at most 300 epochs. --epochs and --patience still override either.
    budget: str = "study"
    protocol: str = ""  # the preset named (PROTOCOLS), if any; its settings are the fields above
    epochs: int | None = None  # None: the budget's (study: 10, 50 for ComiRec; converged: 300)
    batch_size: int = 128  # sequence regime: users per step; instances: the study's rows (1 + train_neg per target)
    lr: float = 1e-3
    weight_decay: float = 0.0
    train_neg: int = 4
    eval_neg: int = 99
    eval_full: bool = False
    eval_seed: int = 42  # the stored validation/test candidates; same for every run by default
    seed: int = 0
    patience: int = 0  # stop after this many epochs without a better validation NDCG@10 (0: never)
    device: str = "auto"
    dtype: str = "float32"
    threads: int = 0  # torch CPU threads (0: leave torch's default)
    # instances only: torch.compile the training step's forward (and so its backward); evaluation stays eager.
    # An execution setting like threads: the same point, its numbers equal to float noise (train.compile_training)
    compile: bool = False
    # dropout's random masks: "torch" = torch's dropout draws (its CPU bernoulli_, one float draw per element:
    # 27% of a study-protocol SASRec step on CPU; drawn bit for bit as float64 uniform_ where that is the same
    # stream, benchbox.model.torch_dropout_noise); "fast" = benchbox.model.dropout_mask everywhere (16-bit lanes, four
    # per 64-bit draw): the same distribution from another random stream, so other numbers (a sensitivity row)
    dropout_masks: str = "torch"
    download: bool = False
    sweep_id: str = ""

    def validate(self) -> "RunConfig":
        checks = [
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (self.max_len is None or self.max_len >= 2, f"max_len must be >= 2, got {self.max_len}"),
            (self.epochs is None or self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.d_model >= 1, f"d_model must be >= 1, got {self.d_model}"),
            (self.n_layers >= 0, f"n_layers must be >= 0, got {self.n_layers}"),
            (self.ffn_mult >= 0, f"ffn_mult must be >= 0, got {self.ffn_mult}"),
            (0 <= self.dropout < 1, f"dropout must be in [0, 1), got {self.dropout}"),
            (self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}"),
            (self.train_neg >= 1, f"train_neg must be >= 1, got {self.train_neg}"),
            (self.eval_neg >= 1, f"eval_neg must be >= 1, got {self.eval_neg}"),
            (self.patience >= 0, f"patience must be >= 0, got {self.patience}"),
            (self.kcore >= 0, f"kcore must be >= 0, got {self.kcore}"),
            (self.regime in REGIMES, f"regime must be one of {', '.join(REGIMES)}, got {self.regime!r}"),
            (self.window is None or self.window >= 1, f"window must be >= 1, got {self.window}"),
            (self.window is None or self.regime == "instances",
             "--window applies to --regime instances only (the sequence regime reads max_len items)"),
            (self.cover in COVERS, f"cover must be one of {', '.join(COVERS)}, got {self.cover!r}"),
            (self.train_order in TRAIN_ORDERS,
             f"train_order must be one of {', '.join(TRAIN_ORDERS)}, got {self.train_order!r}"),
            (self.train_negatives in TRAIN_NEGATIVES,
             f"train_negatives must be one of {', '.join(TRAIN_NEGATIVES)}, got {self.train_negatives!r}"),
            (self.regime == "instances" or (self.train_order, self.train_negatives) == ("shuffled", "redrawn"),
             "--train-order and --train-negatives apply to --regime instances only"),
            (self.budget in BUDGETS, f"budget must be one of {', '.join(BUDGETS)}, got {self.budget!r}"),
            (self.protocol in ("",) + tuple(PROTOCOLS),
             f"protocol must be one of {', '.join(PROTOCOLS)}, got {self.protocol!r}"),
            (set(self.columns) <= {"user", "item", "time"}, f"columns takes user=, item= and time=, got {self.columns}"),
            (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"),
             f"device must be cpu, cuda or auto, got {self.device!r}"),
            (self.dtype in ("float32", "bfloat16"), f"dtype must be float32 or bfloat16, got {self.dtype!r}"),
            (self.dropout_masks in DROPOUT_MASKS,
             f"dropout_masks must be one of {', '.join(DROPOUT_MASKS)}, got {self.dropout_masks!r}"),
            (not self.compile or self.regime == "instances",
             "--compile applies to --regime instances (fixed batch shapes); the sequence regime's lengths vary "
             "by batch and would recompile"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(msg)
        return self

    def to_json(self) -> str:
        d = asdict(self)
        d.pop("data_dir")  # where the file was found is not part of the result; its checksum is
        for k, default in LATER_OPTIONS.items():  # absent at their defaults, as in the rows written before them
            if d[k] == default:
                d.pop(k)
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict, stored: bool = True) -> "RunConfig":
        """A config from a stored one (``to_json``'s dict; ``stored=False``: from options a user gave,
        where a missing option takes today's default)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown run option(s): {', '.join(unknown)}")
        # a stored config lacks the options added after it: it ran with their value of that time
        return cls(**({**LATER_OPTIONS, **d} if stored else d))


# options added after rows were first stored, with the value every older row ran with. A config leaves
# them out at that value, so that an older row and a new run of the same point have one identity (sweep
# resume, Table 1, rerun), and a config read back without them gets that value (not today's default).
LATER_OPTIONS = {"kcore": 0, "dedup": False, "columns": {}, "regime": "sequence", "window": None, "cover": "last",
                 "budget": "study", "protocol": "", "train_order": "shuffled", "train_negatives": "redrawn",
                 "compile": False, "dropout_masks": "torch"}
REGIMES = ("sequence", "instances")
TRAIN_ORDERS = ("shuffled", "user")
TRAIN_NEGATIVES = ("redrawn", "fixed")
COVERS = ("windows", "last")
DROPOUT_MASKS = ("torch", "fast")
BUDGETS = ("study", "converged")
CONVERGED = {"patience": 10, "epochs": 300}  # RecBole's and SASRec's practice
# named presets: what `--protocol NAME` sets unless the option is given explicitly
PROTOCOLS = {
    # The study (TTT4Rec) in its own words: 1:4 negatives in training, 1:99 at test, lr 0.001, 10 epochs (50
    # for ComiRec), one instance X = {u, v, s} with label y per target. Reconstructed from its co-author's
    # public pipeline for the same baselines (HelloZicky/DUET): one row per (user, target, history, label),
    # batch 1024 rows, and (a public reproduction of it on ML-1M) a history window of 10.
    "study": {"regime": "instances", "window": 10, "train_neg": 4, "eval_neg": 99, "budget": "study",
              "batch_size": 1024, "lr": 1e-3},
}


def make_config(**options) -> RunConfig:
    """A validated RunConfig from run options as both the CLI and the API spell them: the field names
    above, plus ``opt``/``readout_opt`` (lists of "key=value", merged into mixer_opts/readout_opts) and
    ``eval`` ("sampled" or "full", for eval_full). An unknown name is an error, not ignored."""
    o = dict(options)
    if o.get("protocol") is None:
        o.pop("protocol", None)
    if o.get("protocol"):  # a preset fills what was not given explicitly
        if o["protocol"] not in PROTOCOLS:
            raise ConfigError(f"unknown protocol {o['protocol']!r}; known: {', '.join(PROTOCOLS)}")
        o = {**PROTOCOLS[o["protocol"]], **o}
    for alias, name in (("opt", "mixer_opts"), ("readout_opt", "readout_opts")):
        if alias in o:
            given = o.pop(alias)
            o[name] = {**(o.get(name) or {}), **(given if isinstance(given, dict) else parse_opts(given))}
    if isinstance(o.get("columns"), str):  # "user=reviewerID,item=asin,time=unixReviewTime"
        o["columns"] = parse_opts([c for c in o["columns"].split(",") if c.strip()])
    if o.get("columns") is None:
        o.pop("columns", None)
    if "eval" in o:
        kind = o.pop("eval")
        if kind not in ("sampled", "full"):
            raise ConfigError(f"eval must be 'sampled' or 'full', got {kind!r}")
        o["eval_full"] = kind == "full"
    return RunConfig.from_dict(o, stored=False).validate()


def parse_opts(pairs: list[str] | None, numbers: bool = False) -> dict:
    """``["num_heads=2", "use_gate=true"]`` -> dict of strings (mixers coerce them to their types);
    ``numbers``: integers as ints (run-config fields, e.g. the benchmarks' ``--set window=50``)."""
    out = {}
    for p in pairs or []:
        if "=" not in p:
            raise ConfigError(f"option {p!r} must look like key=value")
        k, v = p.split("=", 1)
        v = v.strip()
        out[k.strip()] = int(v) if numbers and v.lstrip("-").isdigit() else v
    return out
