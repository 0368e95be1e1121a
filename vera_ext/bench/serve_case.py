"""Serving many adapters: adding them to the adapter bank, their memory, and a mixed decode step.

Functions only (a ``--case serve`` entry is wired elsewhere). :func:`serve_case` builds the llama-1024 model of
``model_cases`` (or its quick sizes), VeRA r=256 on q_proj and v_proj, adds ``adapters`` adapters and reports, side
by side in one run (CPU, fp32 by default):

- ``add_s``: seconds to add them, one ``add_adapter`` call each (``how="add_adapter"``) or one
  ``load_adapters`` call with in-memory (config, tensors) pairs (``how="load_adapters"``);
- ``bank_bytes_per_adapter`` / ``lambda_bytes_per_adapter``: the banks' allocated table bytes (all layers) per
  adapter (on the CPU a large bank is a mapping whose unwritten rows take no memory: address space), and the bytes
  of one adapter's λ (sum over layers of (r + O) fp32); ``bank_used_over_lambda``: the rows handed out;
  ``rss_bytes_per_adapter`` / ``rss_over_lambda``: the growth of the process's resident memory across the add
  call alone (its inputs made before), per adapter, Python objects included; ``rss_trimmed_over_lambda``: the same
  once glibc's ``malloc_trim`` has handed freed heap pages back (what is still held, without the heap's
  fragmentation; None without glibc);
- decode: one token for each of ``rows`` sequences against a prefilled ``DynamicCache`` (``model_cases``'s
  ``decode_call``: the cache is cropped back after each call), medians of interleaved rounds: ``base`` (the base
  model alone, its own copy), ``single`` (the VeRA model, one active adapter, a plain call) and ``mixed`` (each
  row its own adapter out of all of them, ``adapter_indices=``), with ``mixed / single`` and ``mixed / base``.
"""

from __future__ import annotations

import copy
import ctypes
import functools
import gc
import os
import time
import warnings
from typing import Optional

import torch

from ..config import VeraConfig
from ..model import get_vera_model
from .model_cases import MODELS, SEED, decode_call, token_ids, build_base
from .timing import time_interleaved

__all__ = ["add_adapters_timed", "serve_case", "lambda_bytes_per_adapter", "bank_bytes"]


def _rss_bytes(trim: bool = False) -> Optional[int]:
    """The process's resident bytes after a garbage collection; with ``trim``, after glibc's ``malloc_trim`` too
    (None where there is no glibc)."""
    gc.collect()
    if trim:
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            return None
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def lambda_bytes_per_adapter(vera_model, name: str) -> int:
    """Bytes of adapter ``name``'s λ over all layers."""
    total = 0
    for layer in vera_model.vera_layers().values():
        if name in layer.vera_lambda_d:
            for p in (layer.vera_lambda_d.row(name), layer.vera_lambda_b.row(name)):
                total += p.numel() * p.element_size()
    return total


def bank_bytes(vera_model, used: bool = False) -> int:
    """Bytes of every layer's λ tables: allocated (capacity included), or ``used``: the rows handed out."""
    banks = [layer._bank for layer in vera_model.vera_layers().values()]
    return sum(bank.used_bytes() if used else bank.nbytes() for bank in banks)


def add_adapters_timed(vera_model, count: int, config: VeraConfig, how: str = "add_adapter", prefix: str = "a") -> dict:
    """Add ``count`` adapters named ``{prefix}{i}`` with ``config`` (λ random: init_weights=False draws them, the
    in-memory pairs of load_adapters are drawn here, before the clock and the memory readings start); returns
    {"seconds", "names", "rss_growth", "rss_trimmed_growth" (None without glibc)}."""
    names = [f"{prefix}{i}" for i in range(count)]
    if how == "add_adapter":
        add = functools.partial(_add_each, vera_model, names, config)
    elif how == "load_adapters":
        add = functools.partial(vera_model.load_adapters, _in_memory_adapters(vera_model, names, config))
    else:
        raise ValueError(f"how must be 'add_adapter' or 'load_adapters', got {how!r}")
    trimmed0 = _rss_bytes(trim=True)
    rss0 = trimmed0 if trimmed0 is not None else _rss_bytes()  # (the same state: no second reading after a trim)
    t0 = time.perf_counter()
    add()
    seconds = time.perf_counter() - t0
    rss1 = _rss_bytes()
    trimmed1 = _rss_bytes(trim=True)
    trimmed = None if trimmed0 is None or trimmed1 is None else trimmed1 - trimmed0
    return {"seconds": seconds, "names": names, "rss_growth": rss1 - rss0, "rss_trimmed_growth": trimmed}


def _add_each(vera_model, names: list[str], config: VeraConfig) -> None:
    for name in names:  # (each adapter keeps a config object of its own, as with PEFT: timed and counted here)
        vera_model.add_adapter(name, copy.deepcopy(config))


def _in_memory_adapters(vera_model, names: list[str], config: VeraConfig) -> dict:
    """{name: (config, tensors)} for load_adapters: random λ for every layer, the projection if it is saved."""
    shapes = {}
    for path, layer in vera_model.vera_layers().items():
        shapes[f"base_model.model.{path}.vera_lambda_d"] = (config.r,)
        shapes[f"base_model.model.{path}.vera_lambda_b"] = (layer.out_features,)
    projection = {}
    if config.save_projection:
        projection = {
            "base_model.vera_A": vera_model.vera_projection.vera_A,
            "base_model.vera_B": vera_model.vera_projection.vera_B,
        }
    g = torch.Generator().manual_seed(SEED)
    return {
        name: (config, {**{k: torch.randn(s, generator=g) for k, s in shapes.items()}, **projection}) for name in names
    }


def serve_case(
    model: str = "llama-1024",
    adapters: int = 10_000,
    rows: int = 16,
    how: str = "add_adapter",
    rounds: int = 15,
    quick: bool = False,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    r: Optional[int] = None,
    decode: bool = True,
) -> dict:
    """The serve measurements (module docstring) as a dict; without ``decode``, the adds and their memory only."""
    if rows > adapters:
        raise ValueError(f"rows ({rows}) must be at most adapters ({adapters}): each row gets its own adapter")
    spec = MODELS[model].sized(quick, r)
    base = build_base(spec, dtype, device).eval()
    base_copy = copy.deepcopy(base) if decode else None  # (the base model alone, for the decode comparison)
    config = VeraConfig(r=spec.r, target_modules=spec.targets("qv"), init_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        vm = get_vera_model(base, copy.deepcopy(config), adapter_name="first")
        added = add_adapters_timed(vm, adapters, config, how)
    names, trimmed = added["names"], added["rss_trimmed_growth"]
    vm.eval()
    lam = lambda_bytes_per_adapter(vm, names[0])
    bank = bank_bytes(vm)
    adds = {
        "model": spec.summary(),
        "adapters": adapters,
        "how": how,
        "add_s": added["seconds"],
        "lambda_bytes_per_adapter": lam,
        "bank_bytes_per_adapter": bank / (adapters + 1),
        "bank_over_lambda": bank / (adapters + 1) / lam,
        "bank_used_over_lambda": bank_bytes(vm, used=True) / (adapters + 1) / lam,
        "rss_bytes_per_adapter": added["rss_growth"] / adapters,
        "rss_over_lambda": added["rss_growth"] / adapters / lam,
        "rss_trimmed_over_lambda": None if trimmed is None else trimmed / adapters / lam,
    }
    if not decode:
        return adds

    # rows distinct adapters spread over the bank, and one adapter active for the single-adapter call
    chosen = [names[(i * len(names)) // rows] for i in range(rows)]
    idx = vm.adapter_indices(chosen)
    vm.set_adapter(chosen[0])
    prompt = token_ids(base_copy, rows, spec.context, SEED + rows, device)
    token = token_ids(base_copy, rows, 1, SEED + rows + 1, device)
    with torch.inference_mode():
        fns = {}
        for key, mdl, kwargs in (
            ("base", base_copy, {}),
            ("single", vm, {}),
            ("mixed", vm, {"adapter_indices": idx}),
        ):
            cache = mdl(input_ids=prompt, use_cache=True, **kwargs).cache
            fns[key] = decode_call(functools.partial(mdl, **kwargs), token, cache, spec.context)
        times = time_interleaved(fns, device, rounds)
    ms = {k: v[0] for k, v in times.items()}
    return {
        **adds,
        "decode_rows": rows,
        "decode_ms": ms,
        "decode_iqr_ms": {k: v[1] for k, v in times.items()},
        "mixed_over_single": ms["mixed"] / ms["single"],
        "mixed_over_base": ms["mixed"] / ms["base"],
        "single_over_base": ms["single"] / ms["base"],
    }
