"""The foundation's CPU targets, measured side by side in one process (a script, not a timed test).

    python benchmarks/bench_cpu.py [--rounds 15] [--json PATH]

Targets: training at N=2048, I=O=1024, r=256, fp32: forward+backward no slower than PEFT's VeRA, activation memory
saved for backward <= 0.30x PEFT's; decode at N=1: forward <= 0.45x PEFT's time.
"""

import argparse
import json
from dataclasses import asdict

import torch

from vera_ext import bench


def ratio(results, case, impl="vera_ext"):
    row = next(r for r in results if r.case == case and r.implementation == impl)
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    results = bench.bench_training(2048, 1024, 1024, 256, torch.float32, "cpu", args.rounds)
    results += bench.bench_decode(1, 1024, 1024, 256, torch.float32, "cpu", args.rounds)
    results += bench.bench_merge(1024, 1024, 256, torch.float32, "cpu", max(3, args.rounds // 3))
    print(bench.format_table(results))

    fwd_bwd = ratio(results, "train_fwd_bwd").ratio_to_peft
    ours_mem = ratio(results, "saved_activations").saved_bytes
    peft_mem = ratio(results, "saved_activations", "peft").saved_bytes
    decode = ratio(results, "decode").ratio_to_peft
    print()
    print(f"train fwd+bwd time   vera_ext/peft = {fwd_bwd:.3f}   (target <= 1.00)")
    print(f"saved activations    vera_ext/peft = {ours_mem / peft_mem:.3f}   (target <= 0.30)")
    print(f"decode N=1 forward   vera_ext/peft = {decode:.3f}   (target <= 0.45)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in results], f, indent=1)


if __name__ == "__main__":
    main()
