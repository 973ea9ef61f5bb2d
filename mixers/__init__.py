"""Mixer library: one interface (``mixers.base.Mixer``) and a registry of names.

A new mixer is one file in this folder and one line in ``REGISTRY`` (name -> "module:Class").
Classes are imported lazily, so an optional dependency of one mixer never breaks the others.
"""
from __future__ import annotations

import importlib
import inspect
from typing import Any

from .base import Mixer

REGISTRY: dict[str, str] = {
    "gru": "mixers.gru:GRUMixer",
    "attention": "mixers.attention:AttentionMixer",
    "ttt_linear": "mixers.ttt:TTTLinear",
    "ttt_mlp": "mixers.ttt:TTTMLP",
    "mamba": "mixers.mamba:MambaMixer",
}


class MixerError(ValueError):
    """Unknown mixer or bad mixer option (the CLI turns it into a one-line error)."""


def names() -> list[str]:
    return list(REGISTRY)


def get_class(name: str) -> type[Mixer]:
    if name not in REGISTRY:
        raise MixerError(f"unknown mixer {name!r}; registered: {', '.join(REGISTRY)}")
    module, cls = REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)


def options(name: str) -> dict[str, Any]:
    """The keyword options of a mixer with their defaults (d_model and max_len excluded)."""
    sig = inspect.signature(get_class(name).__init__)
    skip = ("self", "d_model", "max_len")
    return {p.name: p.default for p in sig.parameters.values()
            if p.name not in skip and p.default is not inspect.Parameter.empty}


def coerce_option(name: str, key: str, value: Any) -> Any:
    """Turn a CLI string into the type of the option's default (int, float, bool, str)."""
    opts = options(name)
    if key not in opts:
        raise MixerError(f"unknown option {key!r} for mixer {name!r}; valid: {', '.join(sorted(opts)) or 'none'}")
    default = opts[key]
    if not isinstance(value, str):
        return value
    try:
        if isinstance(default, bool):
            low = value.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if isinstance(default, int):
            return int(value)
        if isinstance(default, float):
            return float(value)
    except ValueError:
        raise MixerError(f"option {key}={value!r} of mixer {name!r} must be a {type(default).__name__}") from None
    if default is None:  # untyped option: best effort
        for conv in (int, float):
            try:
                return conv(value)
            except ValueError:
                pass
    return value


def build(name: str, d_model: int, max_len: int = 512, **opts: Any) -> Mixer:
    """Build mixer ``name``; unknown options raise MixerError, impossible values ValueError."""
    cls = get_class(name)
    clean = {k: coerce_option(name, k, v) for k, v in opts.items()}
    try:
        return cls(d_model=d_model, max_len=max_len, **clean)
    except (TypeError, AssertionError) as e:  # impossible combinations reported by the class
        raise MixerError(f"mixer {name!r}: {e}") from None


def catalog() -> list[dict]:
    """Every registered mixer: class, streaming, the backends of each device and the one ``auto`` picks."""
    import torch
    has_cuda = torch.cuda.is_available()
    out = []
    for name in names():
        cls = get_class(name)
        m = build(name, 8, 8, **({"num_heads": 2} if "num_heads" in options(name) else {}))
        cuda = (", ".join(cls.available_backends("cuda")) + " (auto: " + cls.auto_backend("cuda") + ")") \
            if has_cuda else "no CUDA here"
        out.append({"name": name, "class": cls.__name__, "streaming": "yes" if m.supports_streaming else "no",
                    "backends (cpu)": ", ".join(cls.available_backends("cpu")), "auto (cpu)": cls.auto_backend("cpu"),
                    "backends (cuda)": cuda, "options": ", ".join(f"{k}={v}" for k, v in options(name).items())})
    return out
