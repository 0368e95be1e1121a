"""``--preset``: a whole measurement plan under one name, its sizes fixed and its targets reported.

``h200`` is the GPU plan: vera_ext against PEFT's VeRA and the base layer on one GPU, bf16 activations and
weights (lambdas fp32), I = O = 4096 and r = 256 (Llama-2-7B's q/v projections), in one process, in this order:

1. ``ceilings``, measured first: the bf16 GEMM rate (8192^3, random data) and the device copy bandwidth (1 GiB,
   bytes read plus written), the denominators of every floor;
2. ``training`` at N = 8192: ``train_fwd``, ``train_fwd_bwd``, ``saved_activations`` (cases.py);
3. ``decode`` at N = 1, 4, 16 through a stack of 8 layers sharing one projection, times per layer, with 1000
   adapters registered for the mixed calls, eager and as CUDA-graph replay: ``decode_stack``, ``decode_stack_graph``
   (stack.py);
4. ``merge`` over that stack, against the fp32 mm every merge contains: ``merge_stack``.

A section that raises is recorded (its traceback goes to the JSON) and the next one runs; without the ceilings
nothing runs. The targets are reported as TARGET lines, never enforced (see ``targets``). With ``--device cpu``
the same plan runs at small sizes without graphs: a dry run of the plumbing, whose numbers mean nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import time
import traceback
from dataclasses import dataclass
from typing import Callable, Generator, Iterable, Iterator, Optional

import torch

from .._C import build_info
from .cases import SHAPES, Case, Layers, ShapePreset, training_cases
from .report import Result, as_records, describe_ceilings, format_table, write_document
from .stack import STACK_CASES, Stack, decode_cases, graph_probe, merge_case

TRAINING_CASES = ("train_fwd", "train_fwd_bwd", "saved_activations")
PRESET_CASES = TRAINING_CASES + STACK_CASES


@dataclass(frozen=True)
class Preset:
    """A plan's sizes on one device. ``shape``: the training layer (I, O, r, training N); the stack's layers are
    I -> I (``shape.in_f == shape.out_f``) with rank ``shape.r``."""

    name: str
    shape: ShapePreset
    decode_ns: tuple[int, ...]  # rows per decode call; each <= adapters (every row its own adapter)
    layers: int  # the decode stack's depth
    adapters: int  # K, registered on every layer of the mixed stack
    gemm_n: int  # the GEMM ceiling's n (an n^3 mm)
    copy_mib: int  # the bandwidth ceiling's copy
    ceiling_rounds: int  # a ceiling is the best of this many samples
    rounds: int  # timed samples per implementation (--rounds overrides)
    graphs: bool  # CUDA-graph replay cases (CUDA only)
    dtype: torch.dtype = torch.bfloat16
    dry_run: bool = False

    @property
    def summary(self) -> str:
        """One line for the table's header."""
        sh = self.shape
        return (
            f"preset {self.name}{' (dry run)' if self.dry_run else ''}: I=O={sh.in_f} r={sh.r}, training "
            f"N={sh.n_train}, decode N={','.join(map(str, self.decode_ns))} through {self.layers} layers, "
            f"{self.adapters} adapters"
        )


_DRY_RUN_SHAPE = ShapePreset(
    "h200-dry-run", 128, 128, 16, 64, 64, 8, 8, 4, 4, "the h200 preset at CPU size", hidden=True
)
PRESETS = {
    "h200": {
        "cuda": Preset(
            "h200",
            SHAPES["llama2-7b-qv"],
            (1, 4, 16),
            layers=8,
            adapters=1000,
            gemm_n=8192,
            copy_mib=1024,
            ceiling_rounds=10,
            rounds=30,
            graphs=True,
        ),
        "cpu": Preset(
            "h200",
            _DRY_RUN_SHAPE,
            (1, 4, 16),
            layers=2,
            adapters=50,
            gemm_n=256,
            copy_mib=8,
            ceiling_rounds=3,
            rounds=5,
            graphs=False,
            dry_run=True,
        ),
    },
}
PRESET_HELP = {
    "h200": "the GPU plan: ceilings; training N=8192 I=O=4096 r=256 bf16; decode N=1,4,16 through 8 layers with "
    "1000 adapters, eager and CUDA graphs; merge vs fp32 mm; TARGET lines. With --device cpu: a dry run at "
    "small sizes",
}


def refused(args: argparse.Namespace, device: str) -> Optional[str]:
    """Why the command line cannot run ``args.preset`` (a usage error naming the argument), or None."""
    name = args.preset
    for flag, value in (
        ("--shape", args.shape),
        ("--dtype", args.dtype),
        ("--r", args.r),
        ("--n", args.n),
        ("--quick", args.quick or None),
    ):
        if value is not None:
            return f"{flag}: not with --preset {name}, whose plan fixes the shapes and dtype (drop one)"
    for flag, value in (("--plot", args.plot), ("--trace", args.trace)):
        if value is not None:
            return (
                f"{flag}: not with --preset {name}, whose cases repeat at several N (use --json, or {flag} on "
                f"the standard cases)"
            )
    if device == "cuda" and not build_info().get("with_cuda"):
        return (
            f"--preset {name} --device cuda: vera_ext was built without its CUDA kernels ({build_info()}); "
            f"rebuild it with VERA_EXT_CUDA=1"
        )
    return None


class PresetRun:
    """One run of ``preset``: its sections, built lazily, and what they leave for the report (``info``)."""

    def __init__(self, preset: Preset, device: str, cases: Iterable[str], rounds: int):
        self.preset, self.device, self.cases, self.rounds = preset, device, tuple(cases), rounds
        self.info: dict = {}
        self._stack: Optional[Stack] = None

    def execute(
        self,
        ceilings: Callable[[], dict],
        measure: Callable[[Case, dict], list[Result]],
        header: Callable[[dict], str],
        say: Callable[[str], None],
        progress=None,
        json_path: Optional[str] = None,
    ) -> int:
        """The whole run, reported through ``say``: the environment; the ceilings (``ceilings()``); each section,
        its cases measured by ``measure(case, ceilings)``, a line each; the table under ``header(ceilings)`` (times
        in microseconds); summary_lines. With ``json_path`` the document: ``preset``, ``environment``,
        ``settings``, ``ceilings``, ``info``, ``errors`` (name -> traceback), ``records``, ``targets``,
        ``seconds``. Returns the exit status: 0 when every section ran, 1 when one failed (or the ceilings, after
        which nothing runs: every floor needs them)."""
        started = time.perf_counter()
        doc = {
            "preset": self.preset.name,
            "environment": environment(self.device),
            "settings": {**self.settings(), "rounds": self.rounds},
            "ceilings": None,
            "info": self.info,
            "errors": {},
        }
        say(json.dumps(doc["environment"], default=str))
        results = []
        try:
            doc["ceilings"] = ceilings()
        except Exception as err:
            doc["errors"]["ceilings"] = traceback.format_exc()
            say(f"[ceilings] FAILED: {type(err).__name__}: {err}")
        else:
            say(describe_ceilings(doc["ceilings"]))
            if progress is not None:
                progress.update()
            results = self.run_sections(lambda case: measure(case, doc["ceilings"]), progress, doc["errors"], say)
        doc.update(targets=self.finish(results), records=as_records(results), seconds=time.perf_counter() - started)
        if json_path:
            write_document(doc, json_path)
        say()
        if doc["ceilings"] is not None:
            say(
                format_table(
                    results,
                    header(doc["ceilings"]) + "\ntimes per call; decode_stack and merge_stack per layer",
                    unit="us",
                )
            )
            say()
        for line in summary_lines(self, results, doc["targets"], doc["errors"], json_path):
            say(line)
        say(
            f"vera_ext bench --preset {self.preset.name}: {len(results)} records in {doc['seconds']:.0f} s"
            + (f"; JSON {json_path}" if json_path else "")
        )
        return 1 if doc["errors"] else 0

    def stack(self) -> Stack:
        """The decode stack, built on first use: the decode and merge sections share it."""
        if self._stack is None:
            p = self.preset
            self._stack = Stack(p.shape.in_f, p.shape.r, p.layers, p.adapters, p.dtype, self.device)
        return self._stack

    @property
    def graphs(self) -> bool:
        return self.preset.graphs and "decode_stack_graph" in self.cases

    def case_count(self) -> int:
        """How many cases the sections will yield (for the progress bar)."""
        per_n = ("decode_stack" in self.cases) + self.graphs
        return (
            len(set(TRAINING_CASES) & set(self.cases))
            + per_n * len(self.preset.decode_ns)
            + ("merge_stack" in self.cases)
        )

    def sections(self) -> list[tuple[str, Generator[Case, None, None]]]:
        """(name, cases) in order; each generator builds its layers when first advanced."""
        out = []
        if set(TRAINING_CASES) & set(self.cases):
            out.append(("training", self._training()))
        if {"decode_stack", "decode_stack_graph"} & set(self.cases):
            out.append(("decode", self._decode()))
        if "merge_stack" in self.cases:
            out.append(("merge", self._merge()))
        return out

    def run_sections(
        self, measure: Callable[[Case], list[Result]], progress, errors: dict, log: Callable[[str], None]
    ) -> list[Result]:
        """Every section in order, each case measured by ``measure`` as the loop reaches it (a section's layers go
        when it ends); a line to ``log`` per section. An exception is recorded in ``errors`` (section name ->
        traceback) and the next section runs. ``progress``: a tqdm-like bar or None."""
        results = []
        for name, cases in self.sections():
            t0 = time.perf_counter()
            try:
                for case in cases:
                    if progress is not None:
                        progress.set_postfix_str(case.name)
                    results += measure(case)
                    if progress is not None:
                        progress.update()
            except Exception as err:
                errors[name] = traceback.format_exc()
                log(f"[{name}] FAILED after {time.perf_counter() - t0:.1f} s: {type(err).__name__}: {err}")
            else:
                log(f"[{name}] done in {time.perf_counter() - t0:.1f} s")
            cases.close()  # (a section stopped by a failed measurement lets go of its layers now)
            if self.device == "cuda":
                torch.cuda.empty_cache()  # the next section's layers get what this one's held
        return results

    def _training(self) -> Iterator[Case]:
        p = self.preset
        layers = Layers(p.shape, p.dtype, self.device)
        if layers.peft is not None:  # what PEFT's defaults made of a low-precision model
            self.info["peft_dtypes"] = {
                "lambda": str(layers.peft.vera_lambda_d["default"].dtype),
                "vera_A": str(layers.peft.vera_A["default"].dtype),
                "base_weight": str(layers.peft.base_layer.weight.dtype),
            }
        yield from training_cases(layers, p.shape.n_train, set(self.cases))

    def _decode(self) -> Iterator[Case]:
        if "decode_stack_graph" in self.cases and not self.graphs:
            self.info["decode_stack_graph"] = "not run: CUDA graphs need a GPU"
        for n in self.preset.decode_ns:
            yield from decode_cases(self.stack(), n, "decode_stack" in self.cases, self.graphs, self.info)

    def _merge(self) -> Iterator[Case]:
        yield merge_case(self.stack())

    def finish(self, results: list[Result]) -> list[dict]:
        """After the sections: each eager decode row's launch overhead (minus its graph replay's time), the graph
        probe (CUDA), and the targets."""
        replay = {(r.shape["N"], r.implementation): r.median_ms for r in results if r.case == "decode_stack_graph"}
        for r in results:
            if r.case == "decode_stack" and (r.shape["N"], r.implementation) in replay:
                r.extra["launch_overhead_ms"] = r.median_ms - replay[(r.shape["N"], r.implementation)]
        if self.preset.graphs and self._stack is not None:
            self.info["graph_probe_mixed_layer_call"] = graph_probe(self._stack)
        return targets(results, self.preset)

    def settings(self) -> dict:
        """The plan as run, for the JSON."""
        p = dataclasses.asdict(self.preset)
        p["shape"] = {
            "name": self.preset.shape.name,
            "I": self.preset.shape.in_f,
            "O": self.preset.shape.out_f,
            "r": self.preset.shape.r,
            "n_train": self.preset.shape.n_train,
        }
        return {
            **p,
            "dtype": str(self.preset.dtype).replace("torch.", ""),
            "device": self.device,
            "cases": list(self.cases),
        }


def targets(results: list[Result], preset: Preset) -> list[dict]:
    """The plan's targets, each ``{"target", "value", "bound", "met"}`` (only those whose rows ran):

    - training forward+backward at least 1.5x faster than PEFT, and within 1.10x of its floor (at this shape the
      FLOPs' term: the GEMMs any implementation needs, over the measured GEMM rate);
    - decode with every row on a different one of K adapters (``mixed op``) within 1.15x of the base layer alone,
      under CUDA-graph replay (the eager ratio is shown for information: it includes the host's launch overhead);
    - merge within 1.2x of the fp32 mm of the same shape (the op; ``VeraLinear.merge()`` for information).
    """

    def row(case: str, impl: str, n: Optional[int] = None) -> Optional[Result]:
        return next(
            (
                r
                for r in results
                if r.case == case and r.implementation == impl and (n is None or r.shape.get("N") == n)
            ),
            None,
        )

    out = []

    def add(name: str, value: Optional[float], op: str, bound: float) -> None:
        if value is not None:
            out.append(
                {
                    "target": name,
                    "value": value,
                    "bound": f"{op} {bound}",
                    "met": value >= bound if op == ">=" else value <= bound,
                }
            )

    train = row("train_fwd_bwd", "vera_ext")
    if train is not None:
        add(
            "train fwd+bwd: PEFT time / vera_ext time",
            1 / train.ratio_to_peft if train.ratio_to_peft else None,
            ">=",
            1.5,
        )
        add("train fwd+bwd: vera_ext / floor", train.ratio_to_floor, "<=", 1.10)
    for n in preset.decode_ns:
        for case, mode in (("decode_stack_graph", "graph"), ("decode_stack", "eager")):
            r = row(case, "mixed op", n)
            tail = "" if mode == "graph" else " (info: the target applies to graph replay)"
            add(
                f"decode N={n}, {preset.adapters} adapters, {mode}: mixed op / base alone{tail}",
                r.ratio_to_base if r else None,
                "<=",
                1.15,
            )
    for impl, what in (
        ("vera_ext op", "merge: vera_ext op / fp32 mm of the same shape"),
        ("vera_ext", "merge: VeraLinear.merge() / fp32 mm (info)"),
    ):
        r = row("merge_stack", impl)
        add(what, r.ratio_to_floor if r else None, "<=", 1.2)
    return out


def summary_lines(
    run: PresetRun, results: list[Result], found: list[dict], errors: dict, json_path: Optional[str]
) -> list[str]:
    """What follows the table: launch overheads, TARGET lines, the graph probe and what did not run, the failed
    sections (gpu_check.sh copies the TARGET, SECTION FAILED and VeraLinear(x... lines into its summary)."""
    lines = overhead_lines(results) + target_lines(found)
    if "graph_probe_mixed_layer_call" in run.info:
        lines.append(
            f"VeraLinear(x, adapter_names=...) under CUDA-graph capture: {run.info['graph_probe_mixed_layer_call']}"
        )
    lines += [f"{key}: {run.info[key]}" for key in ("decode_stack_graph", "graph_capture_failed") if key in run.info]
    lines += [f"SECTION FAILED: {name} (traceback in {json_path or 'the JSON: add --json PATH'})" for name in errors]
    if run.preset.dry_run:
        lines.append(
            f"DRY RUN of --preset {run.preset.name} on the CPU at small sizes: it checks the plumbing; the "
            f"numbers mean nothing"
        )
    return lines


def target_lines(found: list[dict]) -> list[str]:
    return [
        f"TARGET {'MET   ' if t['met'] else 'MISSED'} {t['target']}: {t['value']:.3f} (want {t['bound']})"
        for t in found
    ]


def overhead_lines(results: list[Result]) -> list[str]:
    """Per decode N: eager minus graph replay per layer, microseconds (the host's launch overhead)."""
    by_n: dict[int, list[str]] = {}
    for r in results:
        if "launch_overhead_ms" in r.extra:
            by_n.setdefault(r.shape["N"], []).append(f"{r.implementation} {r.extra['launch_overhead_ms'] * 1e3:.1f}")
    return [
        f"launch overhead per layer (eager - graph replay), N={n}, us: {', '.join(parts)}" for n, parts in by_n.items()
    ]


def environment(device: str) -> dict:
    """Versions, build and device: what the numbers were measured on."""
    try:
        import peft

        peft_version = peft.__version__
    except ImportError:
        peft_version = None
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "peft": peft_version,
        "vera_ext_build": build_info(),
        "device": device,
        "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "threads": torch.get_num_threads(),
        "time": time.strftime("%F %T %Z"),
    }
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        env.update(
            gpu=p.name,
            sms=p.multi_processor_count,
            memory_gib=round(p.total_memory / 2**30, 1),
            l2_bytes=getattr(p, "L2_cache_size", None),
        )
    return env
