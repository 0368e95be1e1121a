"""The CPU targets of vera_ext against PEFT's VeRA, measured side by side in one process (a script, not a timed test).

    python benchmarks/bench_cpu.py [--rounds 15] [--json PATH] [--plot PATH]

The same measurement as ``python -m vera_ext bench --device cpu --shape cpu-1024 --dtype float32`` (N=2048,
I=O=1024, r=256, fp32 training; decode at N=1), followed by the targets: training forward+backward no slower than
PEFT's VeRA, activation memory saved for backward <= 0.30x PEFT's, decode at N=1 <= 0.45x PEFT's time (weights in
cache, as in a loop over one layer). Also printed, without a target: decode with the caches evicted before every
call, as in the decode of a model too large for them.
"""

import argparse
import sys

import torch

from vera_ext.bench.cases import SHAPES
from vera_ext.bench.cli import Settings, describe, plot_title, positive_int, run_suite
from vera_ext.bench.report import check_writable_file, format_table, write_json, write_plot

TARGETS = (  # (case, what, target ratio to PEFT)
    ("train_fwd_bwd", "train fwd+bwd time  ", 1.00),
    ("saved_activations", "saved activations   ", 0.30),
    ("decode", "decode N=1 forward  ", 0.45),
)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=positive_int, default=15)
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument("--plot", metavar="PATH")
    args = parser.parse_args(argv)
    for flag, path in (("--json", args.json), ("--plot", args.plot)):  # before minutes of measuring
        problem = path and check_writable_file(path)
        if problem:
            parser.error(f"{flag}: cannot write {path!r}: {problem}")
    settings = Settings(device="cpu", dtype=torch.float32, shape=SHAPES["cpu-1024"], rounds=args.rounds)
    results, ceilings, _ = run_suite(settings)
    print(format_table(results, describe(settings, ceilings)))
    print()
    for case, what, target in TARGETS:
        row = next((r for r in results if r.case == case and r.implementation == "vera_ext"), None)
        if row is None or row.ratio_to_peft is None:
            print(f"{what} vera_ext/peft: not measured (is peft installed?)")
            continue
        print(f"{what} vera_ext/peft = {row.ratio_to_peft:.3f}   (target <= {target:.2f})")
    cold = next((r for r in results if r.case == "decode_cold" and r.implementation == "vera_ext"), None)
    if cold is not None and cold.ratio_to_peft is not None:
        print(
            f"decode N=1, caches evicted before each call (no target): vera_ext/peft = {cold.ratio_to_peft:.3f}, "
            f"vera_ext/base = {cold.ratio_to_base:.3f}"
        )
    if args.json:
        write_json(results, args.json)
    if args.plot:
        write_plot(results, args.plot, plot_title(settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
