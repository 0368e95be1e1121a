"""How the benchmark reports: result records, the text table, the JSON list and the PNG bar chart, the log."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Optional


@dataclass
class Result:
    """One implementation in one case.

    ``metric`` says what the ratios compare: ``"time"`` (``median_ms``) or ``"memory"`` (``saved_bytes``; then
    ``median_ms`` is None). ``flops`` and ``bytes`` are the case's ideal work and memory traffic for this
    implementation's function (base alone, or with the VeRA term); ``floor_ms`` = max(flops / GEMM rate,
    bytes / bandwidth) with both rates measured in the same run (``extra["machine"]``).
    """

    case: str
    shape: dict
    dtype: str
    device: str
    implementation: str
    median_ms: Optional[float]
    spread_ms: Optional[float]  # interquartile range over rounds
    ratio_to_base: Optional[float] = None
    ratio_to_peft: Optional[float] = None
    saved_bytes: Optional[int] = None
    flops: Optional[int] = None
    bytes: Optional[int] = None
    floor_ms: Optional[float] = None
    metric: str = "time"
    extra: dict = field(default_factory=dict)

    @property
    def value(self) -> Optional[float]:
        return self.saved_bytes if self.metric == "memory" else self.median_ms

    @property
    def ratio_to_floor(self) -> Optional[float]:
        return self.median_ms / self.floor_ms if self.median_ms and self.floor_ms else None


def set_ratios(rows: list[Result]) -> None:
    """Fill ratio_to_base / ratio_to_peft of the rows of one case (None where the reference is absent or 0)."""
    by = {r.implementation: r for r in rows}
    for r in rows:
        for ref, attr in (("base", "ratio_to_base"), ("peft", "ratio_to_peft")):
            denom = by[ref].value if ref in by else None
            setattr(r, attr, r.value / denom if denom and r.value is not None else None)


def _rows_label(shape: dict) -> str:
    if "N" not in shape:
        return "-"
    return f"N={shape['N']}" + (f" M={shape['M']}" if "M" in shape else "")


def describe_ceilings(ceilings: dict) -> str:
    """One line: the GEMM rate and copy bandwidth measured at the start of the run."""
    return (
        f"ceilings: GEMM {ceilings['gemm_n']}^3 {ceilings['gemm_flops_per_s'] / 1e12:.3f} TFLOP/s, copy "
        f"{ceilings['copy_mib']} MiB {ceilings['copy_bytes_per_s'] / 1e9:.1f} GB/s (read + written)"
    )


def format_table(results: list[Result], header: str = "", unit: str = "ms") -> str:
    """Fixed-width table, one line per result; ``x base``/``x peft`` are ratios (time, or bytes for memory).
    ``unit``: ``"ms"`` or ``"us"`` for the times (median, IQR, floor)."""
    scale = {"ms": 1.0, "us": 1e3}[unit]

    def num(v, width, fmt, times=False):
        return f"{v * (scale if times else 1):{width}{fmt}}" if v is not None else " " * width

    tfmt = ".3f" if unit == "ms" else ".1f"
    iw = max([9] + [len(r.implementation) + 1 for r in results])
    lines = [header] if header else []
    lines.append(
        f"{'case':<18} {'rows':<11} {'impl':<{iw}} {'median ' + unit:>10} {'IQR':>8} {'x base':>7} "
        f"{'x peft':>7} {'floor ' + unit:>9} {'x floor':>8} {'saved MiB':>10}"
    )
    previous = None
    for r in results:
        if previous is not None and r.case != previous:
            lines.append("")
        previous = r.case
        mib = r.saved_bytes / 2**20 if r.saved_bytes is not None else None
        lines.append(
            f"{r.case:<18} {_rows_label(r.shape):<11} {r.implementation:<{iw}} {num(r.median_ms, 10, tfmt, True)} "
            f"{num(r.spread_ms, 8, tfmt, True)} {num(r.ratio_to_base, 7, '.3f')} {num(r.ratio_to_peft, 7, '.3f')} "
            f"{num(r.floor_ms, 9, tfmt, True)} {num(r.ratio_to_floor, 8, '.2f')} {num(mib, 10, '.2f')}"
        )
    return "\n".join(lines)


def write_json(results: list[Result], path: str) -> None:
    """The records as a JSON list."""
    write_document(as_records(results), path)


def as_records(results: list[Result]) -> list[dict]:
    return [asdict(r) for r in results]


def write_document(doc, path: str) -> None:
    """Any JSON-able ``doc`` (dtypes and other objects written as their str)."""
    with open(path, "w") as f:
        json.dump(doc, f, indent=1, default=str)
        f.write("\n")


def require_matplotlib() -> None:
    """ImportError with the fix, raised before any measuring when --plot is asked for."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ImportError("--plot needs matplotlib: pip install matplotlib") from None


def write_plot(results: list[Result], path: str, title: str) -> None:
    """PNG of grouped bars: each case's ratios to PEFT's VeRA (left) and to the base layer (right), log scale,
    with the 1.0 line (below it: faster, or less memory, than the reference)."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed, and no GUI backend chosen behind the user's back
    import matplotlib.pyplot as plt

    panels = []
    for attr, ref, label in (
        ("ratio_to_peft", "peft", "relative to PEFT's VeRA"),
        ("ratio_to_base", "base", "relative to the base layer alone"),
    ):
        cases = list(dict.fromkeys(r.case for r in results if getattr(r, attr) is not None))
        impls = [
            i
            for i in ("base", "peft", "vera_ext")
            if i != ref and any(r.implementation == i and getattr(r, attr) is not None for r in results)
        ]
        if cases and impls:
            panels.append((attr, label, cases, impls))
    if not panels:
        raise ValueError("nothing to plot: no case has a ratio (need a base or a PEFT row)")
    colors = {"base": "#9e9e9e", "peft": "#e08a2c", "vera_ext": "#2b6cb0"}
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.8), squeeze=False)
    for ax, (attr, label, cases, impls) in zip(axes[0], panels):
        width = 0.8 / len(impls)
        for k, impl in enumerate(impls):
            xs, ys = [], []
            for c, case in enumerate(cases):
                row = next((r for r in results if r.case == case and r.implementation == impl), None)
                if row is not None and getattr(row, attr) is not None:
                    xs.append(c + (k - (len(impls) - 1) / 2) * width)
                    ys.append(getattr(row, attr))
            bars = ax.bar(xs, ys, width, label=impl, color=colors[impl])
            ax.bar_label(bars, labels=[f"{y:.2f}" for y in ys], fontsize=7, padding=1)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log")
        ax.set_xticks(range(len(cases)))
        ax.set_xticklabels(
            [c + ("\n(memory)" if _is_memory(results, c) else "") for c in cases], rotation=25, ha="right", fontsize=8
        )
        ax.set_ylabel("ratio (log scale; < 1 is better)")
        ax.set_title(label, fontsize=10)
        ax.legend(fontsize=8)
        ax.grid(axis="y", which="both", alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _is_memory(results: list[Result], case: str) -> bool:
    return any(r.case == case and r.metric == "memory" for r in results)


def check_writable_file(path: str) -> Optional[str]:
    """None when ``path`` can be written as a file, else why not (checked before measuring)."""
    if os.path.isdir(path):
        return f"{path!r} is a directory"
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        return f"directory {parent!r} does not exist"
    if os.path.exists(path) and not os.access(path, os.W_OK):
        return f"{path!r} is not writable"
    if not os.access(parent, os.W_OK):
        return f"directory {parent!r} is not writable"
    return None


class Output:
    """Prints to stdout and, with a path, writes the same lines into that file, flushed line by line: a run stopped
    by a time limit keeps what it printed. A context manager (closes the file)."""

    def __init__(self, path: Optional[str]):
        self.file = open(path, "w") if path else None

    def __call__(self, text: str = "") -> None:
        print(text, flush=True)
        if self.file is not None:
            self.file.write(text + "\n")
            self.file.flush()

    def __enter__(self) -> "Output":
        return self

    def __exit__(self, *exc) -> None:
        if self.file is not None:
            self.file.close()
