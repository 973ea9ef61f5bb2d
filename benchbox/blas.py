"""Which kernels torch's CPU matrix products run, and MKL's fast kernels on AMD CPUs.

torch's CPU wheels do their float32 matrix products (mm, bmm, addmm, linear, the GEMMs inside CPU
attention and the RNNs) in MKL. MKL picks its kernels by CPU vendor: on an AMD CPU it takes a generic
path, AVX-512 or not. Measured on the 2-core AMD EPYC (Zen 5) of our runs, one thread, torch 2.13 with MKL
2024.2, sgemm 2040 x 64 x 256 (a study-protocol step's projection): 96-103 GFLOP/s as shipped, 229-250
once MKL takes the CPU for Intel; numpy's OpenBLAS reaches 206-235 and oneDNN 214-236 on the same core.
MKL's own switches (``MKL_ENABLE_INSTRUCTIONS=AVX512``, the retired ``MKL_DEBUG_CPU_TYPE=5``) change
nothing here (measured).

MKL asks one internal function, ``mkl_serv_intel_cpu_true``, whether the CPU is Intel. A two-function
library preloaded ahead of torch answers yes (the usual workaround for MKL on AMD), and MKL then chooses
among its kernels by the instructions the CPU reports. The ``benchbox`` command (``python -m benchbox``)
builds that library once with the system C compiler into the cache folder and re-executes itself with it
preloaded, on Linux x86-64 AMD CPUs with AVX2 and FMA; its worker processes inherit it. Products change by
float rounding only (another blocking of the same sums). Every row records what ran (``blas``), and a
rerun names it when it differs. ``BENCHBOX_MKL_SHIM=off`` keeps MKL's own choice; in a Python session of
your own, preload it yourself: ``LD_PRELOAD=$(benchbox blas --path) python ...``.
"""
from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

SHIM_ENV = "BENCHBOX_MKL_SHIM"  # "off" keeps MKL's own kernel choice
SHIM_SYMBOL = "benchbox_mkl_shim"  # how a process tells that the shim is loaded in it
SHIM_FILE = "libbenchbox_mkl_shim-1.so"  # the version in the name: a changed source is a new file
_TRIED_ENV = "_BENCHBOX_MKL_SHIM_TRIED"  # set on the re-exec: never loop, even if the preload did not take
_SOURCE = """\
/* benchbox (benchbox/blas.py): answer MKL's CPU vendor check with yes, so that MKL picks its kernels
   by the instructions the CPU reports instead of a generic path for non-Intel CPUs. */
int mkl_serv_intel_cpu_true(void) { return 1; }
int benchbox_mkl_shim(void) { return 1; }
"""


def _cpu_fields(cpuinfo: str) -> tuple[str, set[str]]:
    """vendor_id and flags of the first processor in /proc/cpuinfo text."""
    vendor, flags = "", set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "vendor_id" and not vendor:
            vendor = value.strip()
        elif key == "flags" and not flags:
            flags = set(value.split())
        if vendor and flags:
            break
    return vendor, flags


def shim_wanted(cpuinfo: str | None = None, environ=None, system: str | None = None,
                machine: str | None = None) -> tuple[bool, str]:
    """Whether this machine's torch should run MKL with its vendor check answered, and why (or why not)."""
    environ = os.environ if environ is None else environ
    if environ.get(SHIM_ENV, "on").strip().lower() in ("off", "0", "no", "false"):
        return False, f"{SHIM_ENV}=off"
    system, machine = system or platform.system(), machine or platform.machine()
    if system != "Linux" or machine.lower() not in ("x86_64", "amd64"):
        return False, f"{system} {machine}: the preload is for Linux x86-64"
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False, "no /proc/cpuinfo"
    vendor, flags = _cpu_fields(cpuinfo)
    if vendor == "GenuineIntel":
        return False, "Intel CPU: MKL's own choice is its fast path already"
    if vendor != "AuthenticAMD":
        return False, f"{vendor or 'unknown'} CPU: only AMD CPUs are handled"
    if not {"avx2", "fma"} <= flags:
        return False, "AMD CPU without AVX2 and FMA"
    return True, "AMD CPU" + (" with AVX-512" if {"avx512f", "avx512bw", "avx512dq", "avx512vl"} <= flags
                              else " with AVX2")


def shim_loaded() -> bool:
    """Whether the shim is loaded in this process (preloaded: its symbols are global)."""
    import ctypes
    try:
        return hasattr(ctypes.CDLL(None), SHIM_SYMBOL)
    except OSError:
        return False


def build_shim(folder: Path | None = None) -> Path | None:
    """The shim library, built once into ``folder`` (default: the cache folder) with ``$CC`` (default
    ``cc``); None where no compiler builds it (MKL's own choice then stays)."""
    from .kernels import build_library
    return build_library(SHIM_FILE, _SOURCE, ("-O2",), folder)


def reexec_with_shim(args: list[str]) -> None:
    """Where the shim is wanted and not yet loaded, re-execute this interpreter as ``python *args`` with it
    preloaded (same pid, same environment otherwise). Returns where it does nothing: not wanted, already
    loaded, tried once already, or no compiler to build it; rows then record ``mkl``."""
    if os.environ.get(_TRIED_ENV) or shim_loaded() or not shim_wanted()[0]:
        return
    path = build_shim()
    if path is None:
        return
    env = dict(os.environ)
    env["LD_PRELOAD"] = " ".join(p for p in (str(path), env.get("LD_PRELOAD", "")) if p)
    env[_TRIED_ENV] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *args], env)


def blas_in_force() -> str:
    """What torch's CPU float32 products run in, as rows record it: ``mkl`` (MKL's own kernel choice),
    ``mkl+shim`` (MKL with its vendor check answered, above), or torch's BLAS_INFO (e.g. ``openblas``)."""
    import torch
    if torch.backends.mkl.is_available():
        return "mkl+shim" if shim_loaded() else "mkl"
    for part in torch.__config__.show().replace("\n", ",").split(","):
        key, _, value = part.strip().partition("=")
        if key == "BLAS_INFO" and value:
            return value
    return "unknown"
