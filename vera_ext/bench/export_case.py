"""Export to LoRA, timed: ``vera_ext.export_lora`` at full rank vs PEFT 0.21.2's own conversion at the same rank.

    python -m vera_ext.bench.export_case                 # llama-1024, VeRA r=256 on q_proj and v_proj, 3 rounds
    python -m vera_ext.bench.export_case --quick         # llama-1024's quick sizes (hidden 128), r=64: seconds

The model is the bench's ``llama-1024`` (model_cases.py: a Llama-shaped causal LM built from its config, hidden
1024, 4 layers, random weights from a fixed seed); PEFT's VeRA (``get_peft_model``) and vera_ext's, with the same
config and the same random nonzero lambdas (``same_lambdas``), target q_proj and v_proj. Two pairs, run interleaved
(one sample of each per round), on the CPU in fp32, medians over the rounds:

- ``files``: ``vera_ext.export_lora(model, "default", dir)`` vs PEFT's ``save_as_lora(dir, peft_model, rank=r)``
  (``convert_to_lora`` + its safetensors and config writes): each writes a loadable LoRA directory.
- ``in memory``: ``vera_ext.lora_export.lora_state_dict`` vs PEFT's ``convert_to_lora(peft_model, rank=r)``.

PEFT converts by an SVD of every dense delta weight (``torch.linalg.svd``, fp32); vera_ext writes the VeRA factors
themselves (docs/DESIGN.md §9). Exactness: both directories are loaded with ``PeftModel.from_pretrained`` onto
copies of the base model and their logits on random tokens compared with the VeRA model's (max abs difference), and
the written factors' product compared with the float64 delta weight of each layer (relative Frobenius error).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
import warnings
from typing import Optional

import torch

from ..lora_export import export_lora, lora_factors, lora_state_dict
from .model_cases import MODELS, build_base, peft_vera, same_lambdas, vera_ext_model

__all__ = ["export_lora_bench", "format_export_table", "main"]


def export_lora_bench(
    model: str = "llama-1024",
    r: int = 256,
    targets: str = "qv",
    rounds: int = 3,
    quick: bool = False,
    work_dir: Optional[str] = None,
) -> dict:
    """Time the two pairs (module docstring) and check both exports in PEFT; the directories are written into a
    temporary directory (under ``work_dir``) removed at the end. Returns {"setup": ..., "rows": [{"pair", "impl",
    "median_s", "samples_s"}], "ratios": {pair: peft / vera_ext}, "max_abs_diff": {impl: max abs difference of the
    logits}, "delta_rel_error": {impl: largest relative Frobenius error of the written lora_B @ lora_A against the
    float64 delta weight over the layers}, "adapter_term_max_abs": how much the adapter changes the logits}."""
    from ..peft_patch import is_peft_patched

    if is_peft_patched():
        raise RuntimeError("patch_peft() is in force: PEFT's conversion would run vera_ext's ops; unpatch_peft() first")
    spec = MODELS[model].sized(quick, r=r)
    names = spec.targets(targets)
    base = build_base(spec, torch.float32, "cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft = peft_vera(base, spec, names).eval()
        ours = vera_ext_model(base, spec, names).eval()
    same_lambdas(ours, peft)
    with tempfile.TemporaryDirectory(prefix="vera_export_bench_", dir=work_dir) as tmp:
        return _measure(spec, targets, rounds, base, peft, ours, tmp)


def _measure(spec, targets, rounds, base, peft, ours, tmp) -> dict:
    from peft import PeftModel
    from peft.tuners.lora import convert_to_lora, save_as_lora
    from safetensors.torch import load_file

    counter = iter(range(10**9))

    def fresh(what: str) -> str:
        return os.path.join(tmp, f"{what}_{next(counter)}")

    pairs = {
        "files": {
            "vera_ext": lambda: export_lora(ours, "default", fresh("ours")),
            "peft": lambda: save_as_lora(fresh("peft"), peft, rank=spec.r),
        },
        "in memory": {
            "vera_ext": lambda: lora_state_dict(ours, "default"),
            "peft": lambda: convert_to_lora(peft, rank=spec.r),
        },
    }
    samples = {(pair, impl): [] for pair, fns in pairs.items() for impl in fns}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        for fns in pairs.values():  # warm-up: first calls (imports, allocator) are not timed
            for fn in fns.values():
                fn()
        for _ in range(rounds):
            for pair, fns in pairs.items():
                for impl, fn in fns.items():
                    t0 = time.perf_counter()
                    fn()
                    samples[(pair, impl)].append(time.perf_counter() - t0)
        ours_dir, peft_dir = os.path.join(tmp, "check_ours"), os.path.join(tmp, "check_peft")
        export_lora(ours, "default", ours_dir)
        save_as_lora(peft_dir, peft, rank=spec.r)
        tokens = torch.randint(0, spec.llama["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(0))
        want = ours(tokens).logits
        diffs, delta_errors = {}, {}
        exact = {path: B @ A for path, (A, B) in lora_factors(ours, "default").items()}  # float64 dW per layer
        for impl, directory in (("vera_ext", ours_dir), ("peft", peft_dir)):
            loaded = PeftModel.from_pretrained(copy.deepcopy(base), directory).eval()
            diffs[impl] = (loaded(tokens).logits - want).abs().max().item()
            tensors = load_file(os.path.join(directory, "adapter_model.safetensors"))
            delta_errors[impl] = max(
                (
                    tensors[f"base_model.model.{path}.lora_B.weight"].double()
                    @ tensors[f"base_model.model.{path}.lora_A.weight"].double()
                    - dW
                )
                .norm()
                .item()
                / dW.norm().item()
                for path, dW in exact.items()
            )
        adapter_term = (want - base(tokens).logits).abs().max().item()
    rows = [
        {"pair": pair, "impl": impl, "median_s": statistics.median(s), "samples_s": s}
        for (pair, impl), s in samples.items()
    ]
    median = {(row["pair"], row["impl"]): row["median_s"] for row in rows}
    ratios = {pair: median[(pair, "peft")] / median[(pair, "vera_ext")] for pair in pairs}
    layers = len(ours.vera_layers())
    setup = (
        f"model {spec.name}{' (quick sizes)' if spec.quick else ''}: hidden {spec.llama['hidden_size']}, "
        f"{spec.llama['num_hidden_layers']} layers; VeRA r={spec.r} on {targets} ({layers} layers); LoRA rank "
        f"{spec.r} (full); CPU fp32, "
        f"{torch.get_num_threads()} threads; {rounds} rounds; torch {torch.__version__}"
    )
    return {
        "setup": setup,
        "rows": rows,
        "ratios": ratios,
        "max_abs_diff": diffs,
        "delta_rel_error": delta_errors,
        "adapter_term_max_abs": adapter_term,
    }


def format_export_table(result: dict) -> str:
    lines = [result["setup"], "", f"{'pair':<10} {'vera_ext (s)':>13} {'PEFT (s)':>10} {'PEFT / vera_ext':>16}"]
    median = {(row["pair"], row["impl"]): row["median_s"] for row in result["rows"]}
    for pair, ratio in result["ratios"].items():
        lines.append(f"{pair:<10} {median[(pair, 'vera_ext')]:>13.4f} {median[(pair, 'peft')]:>10.4f} {ratio:>15.1f}x")
    d, e = result["max_abs_diff"], result["delta_rel_error"]
    lines += [
        "",
        "logits of the exported LoRA loaded with PeftModel.from_pretrained vs the VeRA model (max abs difference; "
        f"the adapter changes the logits by up to {result['adapter_term_max_abs']:.3g}):",
        f"  vera_ext.export_lora: {d['vera_ext']:.3g}    PEFT save_as_lora (SVD): {d['peft']:.3g}",
        "the written factors' lora_B @ lora_A vs the float64 delta weight (largest relative Frobenius error over the "
        "layers):",
        f"  vera_ext.export_lora: {e['vera_ext']:.3g}    PEFT save_as_lora (SVD): {e['peft']:.3g}",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vera_ext.bench.export_case", description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=[n for n, m in MODELS.items() if m.llama is not None], default="llama-1024")
    parser.add_argument("--r", type=int, default=None, help="VeRA r and LoRA rank (default: 256, --quick: 64)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="the model's quick sizes (hidden 128)")
    args = parser.parse_args(argv)
    r = args.r or (64 if args.quick else 256)
    if r < 1 or args.rounds < 1:
        parser.error("--r and --rounds must be >= 1")
    result = export_lora_bench(args.model, r=r, rounds=args.rounds, quick=args.quick)
    print(format_export_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
