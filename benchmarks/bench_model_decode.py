"""Decode (N=1) through a small transformer-like stack: what one generated token costs a model, not one layer.

    python benchmarks/bench_model_decode.py [--hidden 1024] [--ffn 4096] [--blocks 4] [--r 256] [--rounds 25]

Each block runs q, k, v, o (hidden x hidden) and up/down (hidden <-> ffn) projections; VeRA adapts q and v, as in
the VeRA paper. The base model alone, PEFT 0.21.2's VeRA and vera_ext run side by side in one process, interleaved,
on identical weights and lambdas (vera_ext.bench.timing.time_interleaved). At the default size the weights
(192 MiB) far exceed the caches, so each layer's weights come from memory on every token, as in real decode; the one
projection shared by every adapted layer (2 MiB) stays in cache. Prints medians per token and the ratios.
"""

import argparse
import copy
import sys
import warnings

import torch
from torch import nn

from vera_ext.bench.timing import time_interleaved
from vera_ext.config import VeraConfig
from vera_ext.model import get_vera_model


class Block(nn.Module):
    def __init__(self, hidden: int, ffn: int):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(hidden, hidden) for _ in range(4))
        self.up, self.down = nn.Linear(hidden, ffn), nn.Linear(ffn, hidden)

    def forward(self, x):
        # (an attention-free stand-in: every projection runs once per token, as in decode)
        x = x + self.o(torch.tanh(self.q(x) + self.k(x) + self.v(x)))
        return x + self.down(torch.relu(self.up(x)))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--ffn", type=int, default=4096)
    p.add_argument("--blocks", type=int, default=4)
    p.add_argument("--r", type=int, default=256)
    p.add_argument("--rounds", type=int, default=25)
    args = p.parse_args(argv)
    from peft import VeraConfig as PeftVeraConfig
    from peft import get_peft_model

    torch.manual_seed(0)
    base = nn.Sequential(*[Block(args.hidden, args.ffn) for _ in range(args.blocks)]).eval()
    config = dict(r=args.r, target_modules=["q", "v"], init_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft = get_peft_model(copy.deepcopy(base), PeftVeraConfig(**config))
        ours = get_vera_model(copy.deepcopy(base), VeraConfig(**config))
    with torch.no_grad():  # the same lambdas (init_weights=False draws them at random)
        peft_params = dict(peft.named_parameters())
        for name, t in ours.named_parameters():
            if "vera_lambda" in name:  # ours: model.0.q.vera_lambda_b.default; PEFT: base_model.model.0.q...
                t.copy_(peft_params["base_model." + name])
    x = torch.randn(1, args.hidden)
    fns = {"base": lambda: base(x), "peft": lambda: peft(x), "vera_ext": lambda: ours(x)}
    with torch.inference_mode():
        outputs = {k: f() for k, f in fns.items()}
        rel = ((outputs["vera_ext"] - outputs["peft"]).norm() / outputs["peft"].norm()).item()
        timings = time_interleaved(fns, "cpu", args.rounds, inner=10)
    med = {k: median_ms for k, (median_ms, _) in timings.items()}
    weights_mib = sum(t.numel() * t.element_size() for t in base.parameters()) / 2**20
    print(
        f"model decode, N=1: {args.blocks} blocks, hidden {args.hidden}, ffn {args.ffn}, VeRA r={args.r} on q and "
        f"v; base weights {weights_mib:.0f} MiB; {torch.get_num_threads()} threads; output rel. diff vs PEFT "
        f"{rel:.1e}"
    )
    for k, v in med.items():
        print(f"  {k:9s} {v:8.3f} ms per token   x base {v / med['base']:.3f}   x peft {v / med['peft']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
