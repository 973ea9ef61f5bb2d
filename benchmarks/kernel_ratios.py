"""Our mixers against the public reference implementations, side by side in one process.

Forward + backward of the mixer alone (gradient w.r.t. the input and every parameter), float32, the
same sizes for both, interleaved ours / reference / ours / ... so that machine noise hits both alike;
the median of ``--repeats`` after ``--warmup``. tokens/s = batch * L / median seconds.

References (never dependencies of benchbox, never committed):
- TTT-Linear / TTT-MLP: the official layer, ``ttt.py`` of test-time-training/ttt-lm-pytorch. Fetched into
  a temporary folder from ``--official-url`` (pinned commit), or read from ``--official-ttt PATH``.
  ``transformers`` is not needed: where it is missing, the few names ttt.py imports from it are stubbed
  (only its config base class and logger are used by the layer).
- Mamba: ``mambapy`` (PyPI) ``MambaBlock`` with its parallel scan (``pscan=True``). Install it into a
  scratch folder and name it: ``pip install --no-deps --target /tmp/mambapy_pkg mambapy`` then
  ``--mambapy-path /tmp/mambapy_pkg``.

    python benchmarks/kernel_ratios.py --official-ttt /tmp/official/ttt.py --mambapy-path /tmp/mambapy_pkg \
        --threads 2 --out results/kernel_ratios.csv
    python benchmarks/kernel_ratios.py --official-ttt /tmp/official/ttt.py --kernels ttt_linear --compile \
        --threads 1 --clock cpu --out results/kernel_ratios.csv   # also ours under torch.compile
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import logging
import os
import statistics
import sys
import tempfile
import time
import types
import urllib.request
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import mixers  # noqa: E402
from benchbox import BenchboxError  # noqa: E402
from benchbox.efficiency import CLOCK_HELP, CLOCKS, cpu_allocator, pick_clock  # noqa: E402
from benchbox.results import append_rows  # noqa: E402
from benchbox.train import device_name, error_line, is_compile_failure  # noqa: E402

OFFICIAL_URL = ("https://raw.githubusercontent.com/test-time-training/ttt-lm-pytorch/"
                "6990c68c979a0dd4d8fca41cc93e11e83d89914e/ttt.py")

# (kernel, L, mini_batch_size): the table plus the study's window (L 10)
CASES = [("ttt_linear", 200, 16), ("ttt_linear", 200, 1), ("ttt_linear", 50, 16), ("ttt_linear", 10, 1),
         ("ttt_linear", 10, 10), ("ttt_mlp", 200, 16), ("mamba", 200, None), ("mamba", 50, None)]


def _stub_transformers() -> None:
    """Just enough of ``transformers`` for ttt.py to import: its layer uses only the config base class."""
    if importlib.util.find_spec("transformers") is not None:
        return

    class PretrainedConfig:
        def __init__(self, **kwargs):
            for k, v in kwargs.items():
                setattr(self, k, v)

    class PreTrainedModel(torch.nn.Module):
        def __init__(self, config, *args, **kwargs):
            super().__init__()
            self.config = config

    class ModelOutput(dict):
        pass

    log = types.SimpleNamespace(get_logger=logging.getLogger)
    mods = {
        "transformers": dict(PretrainedConfig=PretrainedConfig),
        "transformers.activations": dict(ACT2FN={"silu": torch.nn.functional.silu,
                                                 "gelu": torch.nn.functional.gelu}),
        "transformers.modeling_outputs": dict(BaseModelOutputWithPast=ModelOutput,
                                              CausalLMOutputWithPast=ModelOutput),
        "transformers.modeling_utils": dict(PreTrainedModel=PreTrainedModel),
        "transformers.utils": dict(ModelOutput=ModelOutput, logging=log),
        "transformers.utils.import_utils": dict(is_causal_conv1d_available=lambda: False),
    }
    for name, attrs in mods.items():
        m = types.ModuleType(name)
        m.__dict__.update(attrs)
        sys.modules[name] = m


def load_official(path: str | None, url: str):
    _stub_transformers()
    if path is None:
        path = os.path.join(tempfile.mkdtemp(prefix="official_ttt_"), "ttt.py")
        try:
            urllib.request.urlretrieve(url, path)
        except OSError as e:
            sys.exit(f"cannot fetch the official ttt.py ({e}); pass --official-ttt PATH")
    spec = importlib.util.spec_from_file_location("official_ttt", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def build_pair(kernel, L, mbs, d_model, heads, official, mambapy):
    """(ours, reference, call_ours, call_ref) for one case, same sizes, float32; call_*(module, x) -> y."""
    if kernel.startswith("ttt"):
        ours = mixers.build(kernel, d_model, L, num_heads=heads, mini_batch_size=mbs)
        cfg = official.TTTConfig(hidden_size=d_model, num_attention_heads=heads, mini_batch_size=mbs,
                                 ttt_layer_type=kernel.split("_")[1], max_position_embeddings=L)
        ref = (official.TTTLinear if kernel == "ttt_linear" else official.TTTMLP)(cfg, layer_idx=0)
        pos = torch.arange(L)[None]
        return ours, ref, (lambda m, x: m(x)), (lambda m, x: m(x, position_ids=pos))
    ours = mixers.build("mamba", d_model, L)
    ref = mambapy.MambaBlock(mambapy.MambaConfig(d_model=d_model, n_layers=1, d_state=ours.d_state,
                                                 expand_factor=ours.d_inner // d_model, d_conv=4, pscan=True))
    return ours, ref, (lambda m, x: m(x)), (lambda m, x: m(x))


def time_interleaved(cases, x, warmup, repeats, clock=time.perf_counter):
    """Median seconds of forward + backward for each (module, call) in ``cases``, timed A B (C) A B (C)."""
    def once(m, call):
        xi = x.detach().requires_grad_(True)
        t0 = clock()
        y = call(m, xi)
        y.backward(torch.ones_like(y))
        return clock() - t0

    for _ in range(warmup):
        for m, call in cases:
            once(m, call)
    times = [[] for _ in cases]
    for _ in range(repeats):
        for t, (m, call) in zip(times, cases):
            t.append(once(m, call))
    return [statistics.median(t) for t in times]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--official-ttt", help="path of the official ttt.py (default: fetch --official-url)")
    p.add_argument("--official-url", default=OFFICIAL_URL)
    p.add_argument("--mambapy-path", help="folder where mambapy is installed (pip --target)")
    p.add_argument("--kernels", default="ttt_linear,ttt_mlp,mamba")
    p.add_argument("--cases", help="only these of the table, as KERNEL/L/MBS (MBS '-' for mamba), comma-separated; "
                                   "e.g. ttt_linear/10/10,ttt_linear/200/16")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--clock", choices=list(CLOCKS), default="wall", help=CLOCK_HELP)
    p.add_argument("--compile", action="store_true",
                   help="also time ours under torch.compile (what `benchbox run --compile` trains with), interleaved")
    p.add_argument("--profile", action="store_true",
                   help="then profile 20 calls of ours (compiled with --compile): top operators by self CPU time")
    p.add_argument("--malloc", choices=("retain", "system"), default="retain",
                   help="retain: glibc keeps freed memory for reuse, as benchbox runs train (efficiency.cpu_allocator); "
                        "system: glibc's defaults. Either way both layers run under the same one")
    p.add_argument("--out", help="append the rows to this CSV")
    a = p.parse_args(argv)
    if a.malloc == "system":
        os.environ["BENCHBOX_MALLOC"] = "system"
    allocator = cpu_allocator()
    from benchbox.blas import blas_in_force
    blas = blas_in_force()  # ours and the reference alike: they run in this one process
    print(f"allocator: {allocator}, blas: {blas}, {a.threads} thread(s), {a.clock} clock")
    try:
        clock = pick_clock(a.clock, a.threads)
    except BenchboxError as e:
        sys.exit(str(e))
    wanted = set(a.cases.split(",")) if a.cases else None
    unknown = wanted - {f"{k}/{L}/{m or '-'}" for k, L, m in CASES} if wanted else set()
    if unknown:
        sys.exit(f"unknown case(s) {', '.join(sorted(unknown))}: the table's are "
                 + ", ".join(f"{k}/{L}/{m or '-'}" for k, L, m in CASES))
    torch.set_num_threads(a.threads)
    kernels = set(a.kernels.split(","))
    official = load_official(a.official_ttt, a.official_url) if kernels & {"ttt_linear", "ttt_mlp"} else None
    mambapy = None
    if "mamba" in kernels:
        if a.mambapy_path:
            sys.path.insert(0, a.mambapy_path)
        try:
            import mambapy.mamba as mambapy
        except ImportError:
            sys.exit("mambapy is not importable: pip install --no-deps --target DIR mambapy; --mambapy-path DIR")
    rows = []
    head = "| layer | L | mbs | ours tok/s | reference tok/s | ours / reference |"
    if a.compile:
        head += " ours compiled tok/s | compiled / reference |"
    print(head + "\n" + "|---" * (head.count("|") - 1) + "|")
    for kernel, L, mbs in CASES:
        if kernel not in kernels or (wanted and f"{kernel}/{L}/{mbs or '-'}" not in wanted):
            continue
        torch.manual_seed(0)
        ours, ref, call_ours, call_ref = build_pair(kernel, L, mbs, a.d_model, a.heads, official, mambapy)
        x = torch.randn(a.batch_size, L, a.d_model)
        if kernel.startswith("ttt"):  # the same weights give the same outputs: the reference is the same maths
            ref.load_state_dict(ours.state_dict())
            # checked in float64: float32 rounding through 13 inner updates reaches ~1e-4 and varies with how
            # MKL blocks a product (it depends on the buffers' alignment), which made a float32 check flaky
            o64, r64, x64 = copy.deepcopy(ours).double(), copy.deepcopy(ref).double(), x[:4].double()
            with torch.no_grad():
                diff = (call_ours(o64, x64) - call_ref(r64, x64)).abs().max().item()
            if diff > 1e-5:  # the official float32 constants (RoPE, 1/i, GELU') alone differ by ~1e-7
                sys.exit(f"{kernel} L{L} mbs{mbs}: ours and the official layer differ by {diff:.2e}")
            print(f"{kernel} L{L} mbs{mbs}: float64 outputs agree with the official layer to {diff:.1e}",
                  file=sys.stderr)
        cases = [(ours, call_ours), (ref, call_ref)]
        compile_failed = None
        if a.compile:  # the first call compiles, inside the untimed warm-up
            cases.append((torch.compile(ours, dynamic=False), call_ours))
        try:
            t_ours, t_ref, *t_comp = time_interleaved(cases, x, max(a.warmup, 1), a.repeats, clock)
        except Exception as e:  # torch.compile's own failure: the case's eager columns still stand
            if not (a.compile and is_compile_failure(e)):
                raise
            compile_failed = error_line(e, 120)
            t_ours, t_ref = time_interleaved(cases[:2], x, max(a.warmup, 1), a.repeats, clock)
            t_comp = []
        tok = a.batch_size * L
        row = dict(kernel=kernel, seq_len=L, mini_batch_size=mbs or "", batch_size=a.batch_size, d_model=a.d_model,
                   heads=a.heads, threads=a.threads, ours_tok_s=round(tok / t_ours), reference_tok_s=round(tok / t_ref),
                   ratio=round(t_ref / t_ours, 2), clock=a.clock, reference="official ttt.py" if kernel != "mamba" else "mambapy pscan",
                   torch=torch.__version__, cpu=device_name(torch.device("cpu")), allocator=allocator, blas=blas,
                   time=time.strftime("%Y-%m-%dT%H:%M:%S"))
        line = f"| {kernel} | {L} | {mbs or '-'} | {row['ours_tok_s']:,} | {row['reference_tok_s']:,} | {row['ratio']:.2f}x |"
        if a.compile and compile_failed:
            row.update(compile_error=compile_failed)
            line += f" compile failed ({compile_failed}) | - |"
        elif a.compile:
            row.update(compiled_tok_s=round(tok / t_comp[0]), compiled_ratio=round(t_ref / t_comp[0], 2))
            line += f" {row['compiled_tok_s']:,} | {row['compiled_ratio']:.2f}x |"
        rows.append(row)
        print(line, flush=True)
        if a.profile:
            from torch.profiler import ProfilerActivity, profile
            mod, call = cases[-1] if a.compile else cases[0]
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(20):
                    xi = x.detach().requires_grad_(True)
                    call(mod, xi).sum().backward()
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=50))
    if a.out and rows:
        append_rows(a.out, rows)  # a new column (compiled_*) extends the header; older rows keep theirs empty


if __name__ == "__main__":
    from benchbox.blas import reexec_with_shim
    reexec_with_shim(sys.argv)  # MKL's fast kernels on AMD CPUs, as the benchbox command runs (benchbox/blas.py)
    main()
