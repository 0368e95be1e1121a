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


#: The implementations the ratios compare with, the first present in a case: the base (``frozen``: the whole model
#: with nothing to train) and PEFT's VeRA (``peft_vera`` in the model cases).
REFERENCES = {"ratio_to_base": ("base", "frozen"), "ratio_to_peft": ("peft", "peft_vera")}


def set_ratios(rows: list[Result]) -> None:
    """Fill ratio_to_base / ratio_to_peft of the rows of one case (None where the reference is absent or 0)."""
    by = {r.implementation: r for r in rows}
    for attr, names in REFERENCES.items():
        ref = next((by[n] for n in names if n in by), None)
        denom = ref.value if ref is not None else None
        for r in rows:
            setattr(r, attr, r.value / denom if denom and r.value is not None else None)


def _rows_label(shape: dict) -> str:
    if "batch" in shape:  # a model case: sequences x tokens, or a decode batch after its context
        if "context" in shape:
            return f"B={shape['batch']} ctx={shape['context']}"
        return f"{shape['batch']}x{shape['seq']}"
    if "N" not in shape:
        return "-"
    return f"N={shape['N']}" + (f" M={shape['M']}" if "M" in shape else "")


def describe_ceilings(ceilings: dict) -> str:
    """One line: the GEMM rate and copy bandwidth measured at the start of the run."""
    return (
        f"ceilings: GEMM {ceilings['gemm_n']}^3 {ceilings['gemm_flops_per_s'] / 1e12:.3f} TFLOP/s, copy "
        f"{ceilings['copy_mib']} MiB {ceilings['copy_bytes_per_s'] / 1e9:.1f} GB/s (read + written)"
    )


#: Columns shown after the others when some row's ``extra`` has the key (the model cases fill them):
#: (heading, key, format, whether the value is a time).
EXTRA_COLUMNS = (
    ("tokens/s", "tokens_per_s", ".0f", False),
    ("overhead", "overhead_ms", None, True),
    ("x vera ovh", "overhead_x_peft_vera", ".3f", False),
    ("x lora32", "x_peft_lora_r32", ".3f", False),
)


def format_table(results: list[Result], header: str = "", unit: str = "ms") -> str:
    """Fixed-width table, one line per result; ``x base``/``x peft`` are ratios (time, or bytes for memory).
    ``unit``: ``"ms"`` or ``"us"`` for the times (median, IQR, floor, overhead). The model cases add the columns
    of ``EXTRA_COLUMNS``: tokens/s, the overhead over the reference without adapters, that overhead over PEFT VeRA's,
    and the time over PEFT LoRA r=32's."""
    scale = {"ms": 1.0, "us": 1e3}[unit]

    def num(v, width, fmt, times=False):
        return f"{v * (scale if times else 1):{width}{fmt}}" if v is not None else " " * width

    tfmt = ".3f" if unit == "ms" else ".1f"
    iw = max([9] + [len(r.implementation) + 1 for r in results])
    rw = max([11] + [len(_rows_label(r.shape)) for r in results])
    extra = [c for c in EXTRA_COLUMNS if any(c[1] in r.extra for r in results)]
    lines = [header] if header else []
    lines.append(
        f"{'case':<18} {'rows':<{rw}} {'impl':<{iw}} {'median ' + unit:>10} {'IQR':>8} {'x base':>7} "
        f"{'x peft':>7} {'floor ' + unit:>9} {'x floor':>8} {'saved MiB':>10}"
        + "".join(f" {heading + (' ' + unit if times else ''):>11}" for heading, _, _, times in extra)
    )
    previous = None
    for r in results:
        if previous is not None and (r.case, r.shape) != previous:
            lines.append("")
        previous = (r.case, r.shape)
        mib = r.saved_bytes / 2**20 if r.saved_bytes is not None else None
        lines.append(
            f"{r.case:<18} {_rows_label(r.shape):<{rw}} {r.implementation:<{iw}} {num(r.median_ms, 10, tfmt, True)} "
            f"{num(r.spread_ms, 8, tfmt, True)} {num(r.ratio_to_base, 7, '.3f')} {num(r.ratio_to_peft, 7, '.3f')} "
            f"{num(r.floor_ms, 9, tfmt, True)} {num(r.ratio_to_floor, 8, '.2f')} {num(mib, 10, '.2f')}"
            + "".join(f" {num(r.extra.get(key), 11, fmt or tfmt, times)}" for _, key, fmt, times in extra)
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
    """PNG of grouped bars: each case's ratios to PEFT's VeRA (left) and to the base (right; the frozen model in
    the model cases), log scale, with the 1.0 line (below it: faster, or less memory, than the reference)."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed, and no GUI backend chosen behind the user's back
    import matplotlib.pyplot as plt

    # One group of bars per case and rows label (a case measured at several sizes gets one group per size).
    groups = list(dict.fromkeys((r.case, _rows_label(r.shape)) for r in results))
    several = {c for c, _ in groups if sum(1 for g in groups if g[0] == c) > 1}
    panels = []
    for attr, label in (
        ("ratio_to_peft", "relative to PEFT's VeRA"),
        ("ratio_to_base", "relative to the base (layer or frozen model) alone"),
    ):
        shown = [g for g in groups if any(_group(r) == g and getattr(r, attr) is not None for r in results)]
        impls = list(
            dict.fromkeys(
                r.implementation
                for r in results
                if getattr(r, attr) is not None and r.implementation not in REFERENCES[attr]
            )
        )
        if shown and impls:
            panels.append((attr, label, shown, impls))
    if not panels:
        raise ValueError("nothing to plot: no case has a ratio (need a base or a PEFT row)")
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.8), squeeze=False)
    for ax, (attr, label, shown, impls) in zip(axes[0], panels):
        width = 0.8 / len(impls)
        for k, impl in enumerate(impls):
            xs, ys = [], []
            for c, group in enumerate(shown):
                row = next((r for r in results if _group(r) == group and r.implementation == impl), None)
                if row is not None and getattr(row, attr) is not None:
                    xs.append(c + (k - (len(impls) - 1) / 2) * width)
                    ys.append(getattr(row, attr))
            bars = ax.bar(xs, ys, width, label=impl, color=_COLORS.get(impl))
            ax.bar_label(bars, labels=[f"{y:.2f}" for y in ys], fontsize=7, padding=1)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log")
        ax.set_xticks(range(len(shown)))
        ax.set_xticklabels(
            [
                case + (f" {rows}" if case in several else "") + ("\n(memory)" if _is_memory(results, case) else "")
                for case, rows in shown
            ],
            rotation=25,
            ha="right",
            fontsize=8,
        )
        ax.set_ylabel("ratio (log scale; < 1 is better)")
        ax.set_title(label, fontsize=10)
        ax.legend(fontsize=8)
        ax.grid(axis="y", which="both", alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


_COLORS = {
    "base": "#9e9e9e",
    "frozen": "#9e9e9e",
    "peft": "#e08a2c",
    "peft_vera": "#e08a2c",
    "peft_lora_r32": "#6aa84f",
    "peft_lora_r16": "#a8d08d",
    "vera_ext": "#2b6cb0",
}


def _group(r: Result) -> tuple[str, str]:
    return r.case, _rows_label(r.shape)


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
