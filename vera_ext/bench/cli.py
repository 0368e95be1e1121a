"""`python -m vera_ext bench`: the base layer vs PEFT's VeRA vs vera_ext, side by side in one process.

    python -m vera_ext bench --quick                       # seconds: every case at small N, few rounds
    python -m vera_ext bench --device cuda --shape llama2-7b-qv --dtype bfloat16 --json out.json --plot out.png
    python -m vera_ext bench --case decode,decode_mixed --trace traces/
    python -m vera_ext bench --list                        # the cases and shape presets
    python -m vera_ext bench --device cuda --preset h200 --json out.json --log out.log   # the GPU plan
    python -m vera_ext bench --device cpu --preset h200    # its dry run at small sizes (seconds)
    python -m vera_ext bench --base nf4                    # on a bitsandbytes 4-bit base (needs bitsandbytes)

Implementations run interleaved, one timed sample of each per round, so machine noise hits all alike (CUDA: events
after warm-up; CPU: perf_counter); a sample of short calls starts with untimed ones, which refill the caches the
previous implementation's sample took (see timing.time_interleaved). Each case reports medians, interquartile
ranges, the ratios to the base layer and to PEFT in the same rounds, and the case's floor: max(FLOPs / GEMM rate,
bytes / bandwidth), both rates measured at the start of the run (the best of a few samples of a large mm and a
large copy). The bandwidth is memory's, not cache's: a layer whose weights stay in cache between calls (on the
CPU, a 1024x1024 fp32 weight is 4 MiB) can run below its floor, which then says that the case is cache-resident.
The table goes to stdout, a progress bar to stderr (when it is a terminal); --log copies stdout into a file.

``--preset`` runs a fixed plan instead (preset.py): its own sections and sizes, a section that fails recorded while
the others run, TARGET lines, and with --json one document (environment, settings, ceilings, records, targets,
errors). Exit status: 0; 1 when a plan's section failed (or --plot could not draw); 2 for unusable arguments (and
--device cuda without a GPU).

``--base nf4|fp4|int8`` quantizes the base layer (and, in the model cases, every linear layer of the model but the
head) with bitsandbytes before PEFT's VeRA and vera_ext wrap copies of it (quantize_base.py): every case but
``merge`` (merging into a quantized layer is not benchmarked) then compares the three on the same quantized base.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .cases import (
    CASE_HELP,
    CASES,
    DEFAULT_SHAPE,
    SHAPES,
    Case,
    Layers,
    ShapePreset,
    case_cost,
    decode_case,
    decode_cold_case,
    decode_mixed_case,
    merge_case,
    training_cases,
)
from .model_cases import (
    DEFAULT_MODEL,
    DEFAULT_TARGETS,
    MODEL_CASE_HELP,
    MODEL_CASES,
    MODELS,
    TARGET_SETS,
    ModelCase,
    ModelSpec,
    check_model_available,
)
from .model_cases import model_cases as build_model_cases
from .preset import PRESET_CASES, PRESET_HELP, PRESETS, Preset, PresetRun, refused
from .quantize_base import BASE_HELP, BASES, bitsandbytes_problem, quiet_int8_cast_notice
from .report import (
    Output,
    Result,
    check_writable_file,
    describe_ceilings,
    format_table,
    require_matplotlib,
    set_ratios,
    write_json,
    write_plot,
)
from .stack import STACK_CASE_HELP
from .timing import floor_ms, measure_ceilings, time_interleaved
from .trace import nvtx_range, trace_case

__all__ = ["Settings", "describe", "main", "make_parser", "parse_settings", "plot_title", "run_suite"]

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
DEFAULT_DTYPE = {"cpu": "float32", "cuda": "bfloat16"}
#: Every case, and the default list: the model cases at --quick sizes add a second or two to --quick.
ALL_CASES = CASES + MODEL_CASES
#: The cases that do not run on a quantized base (--base other than none), and why.
NOT_QUANTIZED = {"merge": "merging into a quantized base layer is not benchmarked"}


@dataclass
class Settings:
    """One run: ``shape`` already sized (quick sizes and overrides applied)."""

    device: str
    dtype: torch.dtype
    shape: ShapePreset
    cases: tuple[str, ...] = CASES
    rounds: int = 15
    quick: bool = False
    preset: Optional[Preset] = None  # a plan (--preset): its sizes; ``shape`` is then its training shape
    model: ModelSpec = MODELS[DEFAULT_MODEL]  # the model cases' model, sized
    targets: Optional[str] = None  # the model cases' target set (None: each case's default)
    base: str = "none"  # the base layers: float (none) or quantized (nf4, fp4, int8; quantize_base.py)

    @property
    def dry_run(self) -> bool:
        return self.preset is not None and self.preset.dry_run

    @property
    def warmup(self) -> int:
        # GPU warm-up calls are cheap; first calls not
        return 1 if (self.quick or self.dry_run) and self.device == "cpu" else 3

    @property
    def inner(self) -> Optional[int]:
        """Calls per timed sample: None lets time_interleaved choose; a dry run's numbers mean nothing, so one call
        keeps it short (on a loaded machine a sample sized from one fast call can take seconds)."""
        return 1 if self.dry_run else None

    @property
    def ceiling_rounds(self) -> int:
        """Samples of each ceiling; the best counts."""
        return self.preset.ceiling_rounds if self.preset else (3 if self.quick else 5)

    @property
    def ceiling_sizes(self) -> tuple[int, int]:
        """(GEMM n, copy MiB): large enough to reach the machine's rates, small enough for --quick."""
        if self.preset is not None:
            return self.preset.gemm_n, self.preset.copy_mib
        if self.device == "cuda":
            return (4096, 256) if self.quick else (8192, 1024)
        return 1024, 64


def default_rounds(device: str, quick: bool) -> int:
    return 5 if quick else (30 if device == "cuda" else 15)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def build_cases(s: Settings):
    """Yield the selected cases in CASES order, building layers only for what is selected."""
    selected = set(s.cases)
    if selected & {"train_fwd", "train_fwd_bwd", "saved_activations", "decode", "decode_cold", "merge"}:
        layers = Layers(s.shape, s.dtype, s.device, quantized=s.base)
        if selected & {"train_fwd", "train_fwd_bwd", "saved_activations"}:
            yield from training_cases(layers, s.shape.n_train, selected)
        if "decode" in selected:
            yield decode_case(layers, s.shape.n_decode)
        if "decode_cold" in selected:
            yield decode_cold_case(layers, s.shape.n_decode)
    if "decode_mixed" in selected:
        # Own layers: the PEFT loop switches adapters (and their requires_grad), which must not leak into others.
        mixed = Layers(s.shape, s.dtype, s.device, adapters=s.shape.adapters, quantized=s.base)
        yield decode_mixed_case(mixed, s.shape.n_mixed)
    if "merge" in selected:  # last: merge+unmerge round-trips the weight, up to rounding
        yield merge_case(layers)
    yield from build_model_cases(s.model, selected, s.targets, s.dtype, s.device, s.base)


def measure_case(case: Case, s: Settings, ceilings: dict) -> list[Result]:
    """Time (or read the memory of) one case; floors from ``ceilings`` (or the case's ``floor_impl``), except for the
    whole-model cases. Times are per unit of the case's ``per_call`` (per layer of a stack)."""
    shape = {"preset": s.shape.name, **case.shape}
    dt = _dtype_name(s.dtype)
    if case.metric == "memory":
        rows = [
            Result(
                case.name,
                shape,
                dt,
                s.device,
                k,
                None,
                None,
                saved_bytes=v,
                metric="memory",
                extra=case.extra.get(k, {}),
            )
            for k, v in case.saved_bytes.items()
        ]
    else:
        samples: dict[str, list[float]] = {}  # (a model case's overheads are taken over paired samples)
        paired = {"samples_out": samples} if isinstance(case, ModelCase) else {}
        with case.mode(), nvtx_range(f"bench/{case.name}", s.device):
            timings = time_interleaved(case.fns, s.device, s.rounds, s.inner, s.warmup, case.before_each, **paired)
        timings = {k: (m / case.per_call, q / case.per_call) for k, (m, q) in timings.items()}
        if isinstance(case, ModelCase):  # a whole-model case makes its own rows (no floors; model_cases.py)
            rows = case.results(timings, dt, s.device, samples)
            set_ratios(rows)
            return rows
        rows = []
        for k, (median, iqr) in timings.items():
            flops, moved = case.costs.get(k) or case_cost(case.name, case.shape, k != "base", s.dtype.itemsize)
            floor = timings[case.floor_impl][0] if case.floor_impl else floor_ms(flops, moved, ceilings)
            rows.append(
                Result(
                    case.name,
                    shape,
                    dt,
                    s.device,
                    k,
                    median,
                    iqr,
                    flops=flops,
                    bytes=moved,
                    floor_ms=floor,
                    extra={**case.extra.get(k, {}), "machine": ceilings},
                )
            )
    set_ratios(rows)
    return rows


def run_suite(s: Settings, progress=None, trace_dir: Optional[str] = None) -> tuple[list[Result], dict, list[str]]:
    """Measure the machine's ceilings, then every selected case; with ``trace_dir``, also write one profiler trace
    per timed case. Returns (results, ceilings, trace paths). ``progress``: a tqdm-like bar or None."""

    def step(what: str) -> None:
        if progress is not None:
            progress.set_postfix_str(what)

    step("ceilings")
    gemm_n, copy_mib = s.ceiling_sizes
    ceilings = measure_ceilings(s.device, s.dtype, gemm_n, copy_mib, rounds=s.ceiling_rounds)
    ceilings["dtype"] = _dtype_name(s.dtype)
    if progress is not None:
        progress.update()
    results, traces, timed = [], [], []
    for case in build_cases(s):
        step(case.name)
        results += measure_case(case, s, ceilings)
        if case.fns and trace_dir is not None:  # (kept alive only when needed: layers and inputs can be large)
            timed.append(case)
        if progress is not None:
            progress.update()
    if trace_dir is not None:
        for case in timed:
            step(f"trace {case.name}")
            traces.append(trace_case(case, s.device, trace_dir))
            if progress is not None:
                progress.update()
    return results, ceilings, traces


def describe(s: Settings, ceilings: dict) -> str:
    """The table's header: what ran where, and the measured ceilings."""
    try:
        import peft

        peft_version = peft.__version__
    except ImportError:
        peft_version = "not installed (no PEFT rows)"
    threads = torch.get_num_threads()
    where = torch.cuda.get_device_name() if s.device == "cuda" else f"{threads} thread{'s' * (threads != 1)}"
    sh = s.shape
    what = s.preset.summary if s.preset else f"shape {sh.name}: I={sh.in_f} O={sh.out_f} r={sh.r} ({sh.source})"
    return (
        f"vera_ext bench: {s.device} ({where}), {_dtype_name(s.dtype)}, {what}; {s.rounds} rounds"
        f"{' (quick)' if s.quick else ''}; torch {torch.__version__}, peft {peft_version}\n"
        + (f"base layers: {s.base}, {BASE_HELP[s.base]}\n" if s.base != "none" else "")
        + (_describe_model(s) + "\n" if _model_selected(s) else "")
        + describe_ceilings(ceilings)
    )


def _model_selected(s: Settings) -> bool:
    return any(c in MODEL_CASES for c in s.cases)


def _describe_model(s: Settings) -> str:
    targets = s.targets or ", ".join(f"{c} {t}" for c, t in DEFAULT_TARGETS.items() if c in s.cases)
    return f"{s.model.summary()}; targets {targets}"


def plot_title(s: Settings) -> str:
    sh = s.shape
    return (
        f"vera_ext bench: {s.device}, {_dtype_name(s.dtype)}, {sh.name} (I={sh.in_f}, O={sh.out_f}, r={sh.r}, "
        f"train N={sh.n_train}, mixed N={sh.n_mixed} over M={sh.adapters})"
        + (f"; model {s.model.name} (r={s.model.r})" if _model_selected(s) else "")
        + (f"; base {s.base}" if s.base != "none" else "")
    )


# ------------------------------------------------------------------------------------------------------ the CLI


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def make_parser() -> argparse.ArgumentParser:
    listed = [n for n, s in SHAPES.items() if not s.hidden]
    p = argparse.ArgumentParser(
        prog="python -m vera_ext bench",
        description="Benchmark and profile one adapted layer: the base layer alone vs "
        "PEFT's VeRA vs vera_ext, side by side in one process.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="cases:\n"
        + "\n".join(f"  {c:<18} {CASE_HELP[c]}" for c in CASES)
        + "\nshapes:\n"
        + "\n".join(f"  {n:<18} {SHAPES[n].in_f}x{SHAPES[n].out_f} r={SHAPES[n].r}: {SHAPES[n].source}" for n in listed)
        + "\npresets (--preset NAME runs a fixed plan; --case picks among its cases):\n"
        + "\n".join(
            f"  {n:<18} " + "\n                     ".join(textwrap.wrap(h, 90)) for n, h in PRESET_HELP.items()
        )
        + "\npreset cases (and train_fwd, train_fwd_bwd, saved_activations):\n"
        + "\n".join(f"  {c:<18} {h}" for c, h in STACK_CASE_HELP.items())
        + "\nmodel cases (a whole transformers model; --model NAME, --targets qkvo|qv|all):\n"
        + "\n".join(f"  {c:<18} {MODEL_CASE_HELP[c]}" for c in MODEL_CASES)
        + "\nmodels (--model):\n"
        + "\n".join(f"  {n:<18} {m.source}" for n, m in MODELS.items())
        + "\nserving (runs alone, CPU, not in the default list):\n"
        + "  serve              adding 100 / 1,000 / 10,000 adapters, a decode step over 16 distinct adapters vs one "
        "adapter vs the base model, and the LoRA export vs PEFT's conversion (llama-1024; --quick: seconds)",
    )
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when a GPU is visible, else cpu")
    p.add_argument(
        "--shape",
        metavar="PRESET",
        help=f"one of {', '.join(listed)} (default: {DEFAULT_SHAPE['cpu']} on cpu, {DEFAULT_SHAPE['cuda']} on cuda)",
    )
    p.add_argument(
        "--case",
        action="append",
        metavar="NAME[,NAME...]",
        help="cases to run, comma-separated or repeated (default: all cases and model cases listed below)",
    )
    p.add_argument(
        "--dtype",
        choices=list(DTYPES),
        help="activations and weights (default: float32 on cpu, bfloat16 on cuda); lambdas stay fp32",
    )
    p.add_argument(
        "--rounds",
        type=positive_int,
        help="timed samples per implementation (default: 15 on cpu, 30 on cuda, 5 with --quick)",
    )
    p.add_argument("--quick", action="store_true", help="small N, fewer adapters and rounds: a seconds-long run")
    p.add_argument("--r", type=positive_int, help="override the rank (the shape preset's and the model cases')")
    p.add_argument("--n", type=positive_int, help="override the preset's training N (rows)")
    p.add_argument(
        "--model",
        metavar="NAME",
        help=f"the model cases' model: {', '.join(MODELS)} (default: {DEFAULT_MODEL})",
    )
    p.add_argument(
        "--targets",
        choices=TARGET_SETS,
        help="the modules the model cases adapt: qkvo (attention q, k, v, o), qv, or all (every linear layer but "
        "the head); default: qkvo for model_train, qv for model_decode",
    )
    p.add_argument(
        "--base",
        choices=BASES,
        default="none",
        help="the base layers: none (float nn.Linear, the default), nf4 or fp4 (bitsandbytes Linear4bit), int8 "
        "(bitsandbytes Linear8bitLt); quantized, every case but merge runs on them (needs bitsandbytes)",
    )
    p.add_argument(
        "--preset",
        choices=list(PRESETS),
        help="run a fixed plan instead (see the list below; --device cpu: its dry run at small sizes); "
        "it fixes shapes, dtype and rounds, --json writes one document",
    )
    p.add_argument("--json", metavar="PATH", help="write the result records as a JSON list")
    p.add_argument("--log", metavar="PATH", help="also write everything printed to stdout into PATH")
    p.add_argument("--plot", metavar="PATH", help="write a PNG bar chart of the ratios (needs matplotlib)")
    p.add_argument("--trace", metavar="DIR", help="write a torch.profiler Chrome trace per case into DIR")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (also off when stderr is no tty)")
    p.add_argument("--list", action="store_true", help="list the cases and shape presets, and exit")
    return p


def parse_settings(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Settings:
    """Validate everything that can be checked before measuring (parser.error exits with status 2)."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible (use --device cpu)")
    if args.preset is not None:
        settings = _preset_settings(parser, args, device)
        _check_outputs(parser, args)
        return settings
    shape_name = args.shape or DEFAULT_SHAPE[device]
    if shape_name not in SHAPES:
        listed = [n for n, s in SHAPES.items() if not s.hidden]
        parser.error(f"--shape: unknown preset {shape_name!r}; choose from {', '.join(listed)}")
    cases = _selected_cases(parser, args.case, ALL_CASES)
    cases, model = _model_settings(parser, args, cases)
    cases = _base_cases(parser, args, cases)
    _check_outputs(parser, args)
    return Settings(
        device=device,
        dtype=DTYPES[args.dtype or DEFAULT_DTYPE[device]],
        shape=SHAPES[shape_name].sized(args.quick, r=args.r, n_train=args.n),
        cases=tuple(cases),
        rounds=args.rounds or default_rounds(device, args.quick),
        quick=args.quick,
        model=model,
        targets=args.targets,
        base=args.base,
    )


def _base_cases(parser: argparse.ArgumentParser, args: argparse.Namespace, cases: tuple[str, ...]) -> tuple[str, ...]:
    """The cases that run on ``--base``: a quantized base needs bitsandbytes, and a case of NOT_QUANTIZED asked for
    with --case is refused; from the default list it is left out (said on stderr)."""
    if args.base == "none":
        return cases
    problem = bitsandbytes_problem(args.base)
    if problem:
        parser.error(problem)
    refused_cases = [c for c in cases if c in NOT_QUANTIZED]
    if refused_cases and args.case:
        c = refused_cases[0]
        parser.error(
            f"--case {c}: not with --base {args.base} ({NOT_QUANTIZED[c]}); choose from "
            f"{', '.join(x for x in ALL_CASES if x not in NOT_QUANTIZED)}"
        )
    for c in refused_cases:
        print(f"python -m vera_ext bench: no {c} case with --base {args.base}: {NOT_QUANTIZED[c]}", file=sys.stderr)
    return tuple(c for c in cases if c not in NOT_QUANTIZED)


def _model_settings(
    parser: argparse.ArgumentParser, args: argparse.Namespace, cases: tuple[str, ...]
) -> tuple[tuple[str, ...], ModelSpec]:
    """The cases and the model cases' model (--model, sized by --quick and --r). --model and --targets need a model
    case; what the model cases need must be installed, else a default list runs without them."""
    name = args.model or DEFAULT_MODEL
    if not any(c in MODEL_CASES for c in cases):
        for flag, value in (("--model", args.model), ("--targets", args.targets)):
            if value is not None:
                parser.error(f"{flag}: only the model cases use it; add --case {','.join(MODEL_CASES)}")
    elif name not in MODELS:
        parser.error(f"--model: unknown model {name!r}; choose from {', '.join(MODELS)}")
    else:
        problem = check_model_available(MODELS[name])
        if problem and args.case:
            parser.error(f"--model {name}: {problem}")
        if problem:  # the default list: the layer cases still run
            print(f"python -m vera_ext bench: no model cases: {problem}", file=sys.stderr)
            cases = tuple(c for c in cases if c not in MODEL_CASES)
    return cases, MODELS[name].sized(args.quick, r=args.r)


def _selected_cases(
    parser: argparse.ArgumentParser, entries: Optional[list[str]], valid: tuple[str, ...], context: str = ""
) -> tuple[str, ...]:
    """The --case entries (comma-separated, repeatable) in ``valid``'s order; all of ``valid`` when none."""
    if not entries:
        return valid
    asked = [c.strip() for entry in entries for c in entry.split(",") if c.strip()]
    unknown = [c for c in asked if c not in valid]
    if unknown or not asked:
        preset_only = [c for c in unknown if c in PRESET_CASES and not context]
        hint = f" ({', '.join(preset_only)}: cases of --preset)" if preset_only else ""
        parser.error(
            f"--case: unknown case(s) {', '.join(map(repr, unknown)) or '(none given)'}{context}; choose "
            f"from {', '.join(valid)}{hint}"
        )
    return tuple(c for c in valid if c in asked)


def _preset_settings(parser: argparse.ArgumentParser, args: argparse.Namespace, device: str) -> Settings:
    """--preset: the plan's sizes and dtype; --case picks among its cases, --rounds overrides its rounds."""
    problem = refused(args, device)
    if problem:
        parser.error(problem)
    preset = PRESETS[args.preset][device]
    for flag, value in (("--model", args.model), ("--targets", args.targets)):
        if value is not None:
            parser.error(f"{flag}: --preset {args.preset} runs no model case")
    if args.base != "none":
        parser.error(f"--base {args.base}: --preset {args.preset} runs on float base layers only (drop --base)")
    cases = _selected_cases(parser, args.case, PRESET_CASES, f" of --preset {args.preset}")
    return Settings(
        device=device,
        dtype=preset.dtype,
        shape=preset.shape,
        cases=cases,
        rounds=args.rounds or preset.rounds,
        preset=preset,
    )


def _check_outputs(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """--json, --log, --plot and --trace must be writable (checked before measuring)."""
    for flag, path in (("--json", args.json), ("--log", args.log), ("--plot", args.plot)):
        if path is not None:
            problem = check_writable_file(path)
            if problem:
                parser.error(f"{flag}: cannot write {path!r}: {problem}")
    if args.plot is not None:
        try:
            require_matplotlib()
        except ImportError as err:
            parser.error(str(err))
    if args.trace is not None:
        if os.path.exists(args.trace) and not os.path.isdir(args.trace):
            parser.error(f"--trace: {args.trace!r} exists and is not a directory")
        try:
            os.makedirs(args.trace, exist_ok=True)
        except OSError as err:
            parser.error(f"--trace: cannot create directory {args.trace!r}: {err.strerror}")
        if not os.access(args.trace, os.W_OK):
            parser.error(f"--trace: directory {args.trace!r} is not writable")


def _progress_bar(total: int, disabled: bool):
    if disabled or not sys.stderr.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="vera_ext bench", file=sys.stderr, leave=False, unit="step")


def main(argv=None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    if args.list:
        print(parser.epilog)
        return 0
    if _serve_asked(parser, args):
        from .serve import run_serve

        device = args.device or "cpu"
        if device != "cpu":
            parser.error("--case serve: runs on the CPU only (--device cpu)")
        with Output(args.log) as say:
            return run_serve(args.quick, args.rounds, device, say, args.json)
    s = parse_settings(parser, args)
    with Output(args.log) as say, quiet_int8_cast_notice():
        return run_preset(s, args, say) if s.preset is not None else run_cases(s, args, say)


def _serve_asked(parser: argparse.ArgumentParser, args: argparse.Namespace) -> bool:
    """Whether --case asks for ``serve`` (serve.py), which runs alone: an error if other cases or the layer/model
    options come with it."""
    asked = [c.strip() for entry in args.case or () for c in entry.split(",") if c.strip()]
    if "serve" not in asked:
        return False
    if len(asked) > 1:
        parser.error("--case serve runs alone: drop the other cases")
    if args.preset or args.base != "none" or args.plot or args.trace:
        parser.error("--case serve takes only --quick, --rounds, --json, --log and --no-progress")
    return True


def run_cases(s: Settings, args: argparse.Namespace, say: Callable[[str], None]) -> int:
    """The standard cases: measure, print the table (through ``say``), write what was asked for; the exit status."""
    cases = len(s.cases) + ("model_decode" in s.cases) * (len(s.model.decode_batches) - 1)  # one case per batch
    timed_cases = cases - ("saved_activations" in s.cases)
    bar = _progress_bar(1 + cases + (timed_cases if args.trace else 0), args.no_progress)
    try:
        results, ceilings, traces = run_suite(s, bar, args.trace)
    finally:
        if bar is not None:
            bar.close()
    say(format_table(results, describe(s, ceilings)))
    if args.json:
        write_json(results, args.json)
        say(f"\nwrote {args.json} ({len(results)} records)")
    if args.plot:
        try:
            write_plot(results, args.plot, plot_title(s))
        except ValueError as err:
            print(f"--plot: {err}", file=sys.stderr)
            return 1
        say(f"wrote {args.plot}")
    for path in traces:
        say(f"trace: {path}")
    return 0


def run_preset(s: Settings, args: argparse.Namespace, say: Callable[[str], None]) -> int:
    """``s.preset``'s plan (PresetRun.execute), its cases measured and described as the standard ones are; the exit
    status."""
    run = PresetRun(s.preset, s.device, s.cases, s.rounds)

    def ceilings() -> dict:
        gemm_n, copy_mib = s.ceiling_sizes
        measured = measure_ceilings(s.device, s.dtype, gemm_n, copy_mib, rounds=s.ceiling_rounds)
        return {**measured, "dtype": _dtype_name(s.dtype)}

    bar = _progress_bar(1 + run.case_count(), args.no_progress)
    try:
        return run.execute(
            ceilings, lambda case, c: measure_case(case, s, c), lambda c: describe(s, c), say, bar, args.json
        )
    finally:
        if bar is not None:
            bar.close()
