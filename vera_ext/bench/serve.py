"""``python -m vera_ext bench --case serve``: serving many adapters on the bench's llama-1024 model (built from its
config, VeRA r=256 on q_proj and v_proj; ``--quick``: its quick sizes and fewer adapters), CPU, side by side in one
run (docs/DESIGN.md §2.6, §9):

- adding K adapters (K = 100, 1,000, 10,000; ``--quick``: 16, 100) one ``add_adapter`` call each and in one
  ``load_adapters`` call, the bank's bytes and the process's memory growth per adapter against the λ bytes;
- at the largest K, a decode step for 16 sequences, each with its own adapter (16 distinct of K, ``adapter_indices=``)
  against the base model alone and against one adapter for every row (serve_case.py);
- the LoRA export at full rank against PEFT's ``save_as_lora`` / ``convert_to_lora`` at the same rank
  (export_case.py), with the exactness of both.

It runs on its own (``--case serve`` takes no other case) and is not part of the default case list (minutes on 2
cores at full sizes).
"""

from __future__ import annotations

import json
from typing import Callable, Optional

from .export_case import export_lora_bench, format_export_table
from .serve_case import serve_case

FULL_COUNTS = (100, 1_000, 10_000)
QUICK_COUNTS = (16, 100)
TARGETS = {"add_10000_s": 10.0, "memory_over_lambda": 1.1, "mixed_over_single": 1.10, "mixed_over_base": 1.15}


def run_serve(
    quick: bool, rounds: Optional[int], device: str, say: Callable[[str], None], json_path: Optional[str] = None
) -> int:
    """Measures and prints the three parts (module docstring); writes them to ``json_path`` if given."""
    counts = QUICK_COUNTS if quick else FULL_COUNTS
    decode_rounds = rounds or (5 if quick else 15)
    rows = 16
    adds = []
    for k in counts:
        for how in ("add_adapter", "load_adapters"):
            decode = k == counts[-1] and how == "load_adapters"  # one decode measurement, at the largest bank
            res = serve_case(
                adapters=k, rows=rows, how=how, rounds=decode_rounds, quick=quick, device=device, decode=decode
            )
            adds.append(res)
    say(f"serve: {adds[0]['model']}, {device}, fp32")
    say(
        f"\n{'adapters':>9} {'how':<14} {'add (s)':>9} {'λ B/adapter':>12} {'bank alloc x λ':>15} "
        f"{'bank used x λ':>14} {'RSS x λ':>8} {'trimmed':>8}"
    )
    for a in adds:
        trimmed = a["rss_trimmed_over_lambda"]
        say(
            f"{a['adapters']:>9} {a['how']:<14} {a['add_s']:>9.2f} {a['lambda_bytes_per_adapter']:>12} "
            f"{a['bank_over_lambda']:>15.2f} {a['bank_used_over_lambda']:>14.2f} {a['rss_over_lambda']:>8.2f} "
            f"{'n/a' if trimmed is None else f'{trimmed:.2f}':>8}"
        )
    say(
        f"  (targets at {counts[-1]:,} adapters: add <= {TARGETS['add_10000_s']:.0f} s, memory per adapter <= "
        f"{TARGETS['memory_over_lambda']} x its λ bytes. bank alloc: the tables' allocation, on the CPU from 1 MiB a "
        "mapping whose unwritten rows take no memory; used: the rows handed out; RSS: the process's growth across "
        "the add call; trimmed: the same after malloc_trim hands freed heap pages back)"
    )
    last = adds[-1]
    ms = last["decode_ms"]
    say(
        f"\ndecode step, {last['decode_rows']} sequences, {last['decode_rows']} distinct adapters of "
        f"{last['adapters']} (medians of {decode_rounds} interleaved rounds, ms; IQR in brackets):"
    )
    for key in ("base", "single", "mixed"):
        say(f"  {key:<7} {ms[key]:8.3f}  [{last['decode_iqr_ms'][key]:.3f}]")
    say(
        f"  mixed / single {last['mixed_over_single']:.3f} (target <= {TARGETS['mixed_over_single']}), "
        f"mixed / base {last['mixed_over_base']:.3f} (target <= {TARGETS['mixed_over_base']})"
    )
    export = export_lora_bench(r=64 if quick else 256, rounds=3 if quick else 5, quick=quick)  # (quick: hidden 128)
    say("\nLoRA export at full rank vs PEFT's conversion at the same rank:\n" + format_export_table(export))
    if json_path:
        with open(json_path, "w", encoding="utf-8") as f:
            json.dump({"adds": adds, "export": export}, f, indent=1, default=str)
        say(f"\nwrote {json_path}")
    return 0
