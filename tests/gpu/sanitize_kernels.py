"""Call every vera_ext op on the GPU at small shapes and check it against the CPU ops: the compute-sanitizer driver.

    python tests/gpu/sanitize_kernels.py                   # a correctness run (~seconds on a GPU)
    python tests/gpu/sanitize_kernels.py --device cpu      # dry run of this script's logic without a GPU
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 1 \
        python tests/gpu/sanitize_kernels.py
    compute-sanitizer --tool racecheck --kernel-name kns=vera --error-exitcode 1 \
        python tests/gpu/sanitize_kernels.py --quick

Covered: fp32/fp16/bf16; A and B as strided slices of larger projections (16-byte aligned rows, and odd row strides
that force the kernels' unaligned paths); N in {0, 1, 3, 5, 32, 33, 300} (0: empty; 1..32: the fused decode path, one
N per row bucket of its kernels: 1, 2..4, 5..16, 17..32; 33: first GEMM-path size; 300: a multi-chunk column
reduction); single adapter and mixed batches (3 adapters, rows with -1 = no adapter); forward + backward of
vera_forward and vera_linear_forward; a strided (non-contiguous, misaligned) x; vera_delta_weight; merge and unmerge
with and without fan_in_fan_out; safe merge accepted and refused (weight left bit-identical). Each result is compared
with the CPU op on the same inputs and with a float64 evaluation of the formula; on the GPU each forward+backward
also runs twice and must match bit for bit.

Under memcheck, PYTORCH_NO_CUDA_MEMORY_CACHING=1 gives every tensor its own allocation, so an out-of-bounds access
lands outside it and is reported (inside the caching allocator's big blocks it would go unseen). Without it, the
cache is filled with NaN before each GPU call, so an output element a kernel forgot to write shows up as NaN.
Exit status: 0 all passed, 1 a check failed, 2 cannot run (no GPU, extension without CUDA).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# ||got - want|| / ||want||, for the result vs the CPU op (same dtype, another summation order) and vs float64.
# The CPU ops' own worst errors vs float64 on these cases: fp32 4e-7, fp16 7e-4, bf16 4.5e-3; these bounds leave
# about 7x room for the GPU's different rounding and summation order (fp32: 1e-5 allows 25x).
TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}
# (name, I_max, O_max, R_max, I, O, r): A = A_full[:r, :I], B = B_full[:O, :r] read in place.
CONFIGS = [
    ("aligned", 320, 256, 80, 256, 192, 60),  # 16-byte row strides: vector paths (r=60: a tail in fp16/bf16)
    ("odd", 101, 53, 67, 77, 45, 40),  # odd strides and sizes: scalar paths, partial tiles
]
NS = (0, 1, 3, 5, 32, 33, 300)
NUM_ADAPTERS = 3


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want|| in float64; inf for a shape mismatch or any non-finite value (NaN never passes)."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    if got.shape != want.shape or not torch.isfinite(got).all():
        return math.inf
    diff, scale = (got - want).norm().item(), want.norm().item()
    if scale == 0.0:
        return 0.0 if diff == 0.0 else math.inf
    return diff / scale


class Checker:
    def __init__(self, device: str, poison: bool):
        self.device = device
        self.poison_cache = poison
        self.failures: list[str] = []
        self.count = 0
        self.worst = {"cpu": 0.0, "f64": 0.0}

    def close(self, what: str, got, want, tol: float, kind: str) -> None:
        self.count += 1
        err = rel_err(got, want)
        self.worst[kind] = max(self.worst[kind], err if math.isfinite(err) else 0.0)
        if not err <= tol:
            self.failures.append(f"{what}: rel err vs {kind} {err:.3g} > {tol:g}")

    def equal(self, what: str, got, want) -> None:
        self.count += 1
        if got.shape != want.shape or not torch.equal(got.cpu(), want.cpu()):
            self.failures.append(f"{what}: not bit-identical")

    def fail(self, what: str) -> None:
        self.count += 1
        self.failures.append(what)

    def poison(self) -> None:
        """Fill freed blocks of the caching allocator (small and large pools) with NaN."""
        if self.device != "cuda" or not self.poison_cache:
            return
        blocks = [torch.empty(n, device="cuda").fill_(float("nan")) for n in [1 << 17] * 16 + [1 << 22] * 2]
        del blocks


def make_case(cfg, dtype, n, seed):
    _, i_max, o_max, r_max, in_f, out_f, r = cfg
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    idx = torch.randint(-1, NUM_ADAPTERS, (n,), generator=g)
    if n >= 2:
        idx[0] = -1  # at least one row without an adapter
    return {
        "x": rnd(n, in_f),
        "x_wide": rnd(n, in_f + 3),  # x = x_wide[:, 1:in_f + 1]: row stride in_f + 3, misaligned start
        "base": rnd(n, out_f),
        "W": rnd(out_f, in_f, scale=in_f**-0.5),
        "bias": rnd(out_f),
        "A_full": rnd(r_max, i_max, scale=i_max**-0.5),
        "B_full": rnd(o_max, r_max, scale=r_max**-0.5),
        "ld": torch.randn(r, generator=g),
        "lb": torch.randn(out_f, generator=g),
        "ld_k": torch.randn(NUM_ADAPTERS, r, generator=g),
        "lb_k": torch.randn(NUM_ADAPTERS, out_f, generator=g),
        "idx": idx,
        "grad": rnd(n, out_f),
        "dims": (in_f, out_f, r),
    }


def run_forward(ops, c, device, op, mixed, strided_x=False, dtype=None):
    """Forward then backward of one op on `device`; returns (y, {name: grad}). dtype=float64 gives the reference
    evaluated with PyTorch's own ops (no vera_ext)."""
    in_f, out_f, r = c["dims"]
    ref = dtype == torch.float64
    cast = (lambda t: t.to(device, torch.float64)) if ref else (lambda t: t.to(device))
    x = cast(c["x_wide"])[:, 1 : in_f + 1] if strided_x else cast(c["x"])
    x = x.detach().requires_grad_()
    A, B = cast(c["A_full"])[:r, :in_f], cast(c["B_full"])[:out_f, :r]
    ld = cast(c["ld_k"] if mixed else c["ld"]).detach().requires_grad_()
    lb = cast(c["lb_k"] if mixed else c["lb"]).detach().requires_grad_()
    idx = c["idx"].to(device) if mixed else None
    leaves = {"x": x, "lambda_d": ld, "lambda_b": lb}
    if op == "vera_forward":
        base = cast(c["base"]).detach().requires_grad_()
        leaves["base_out"] = base
    else:
        base = None
        W, bias = cast(c["W"]), cast(c["bias"])

    if ref:
        base_out = base if base is not None else x @ W.T + bias
        if mixed:
            keep = (idx >= 0).unsqueeze(1).to(torch.float64)
            ld_rows, lb_rows = ld[idx.clamp(min=0)] * keep, lb[idx.clamp(min=0)] * keep
        else:
            ld_rows, lb_rows = ld, lb
        y = base_out + lb_rows * (((x @ A.T) * ld_rows) @ B.T)
    elif op == "vera_forward":
        y = ops.vera_forward(x, base, A, B, ld, lb, idx)
    else:
        y = ops.vera_linear_forward(x, W, bias, A, B, ld, lb, idx)
    grads = torch.autograd.grad(y, list(leaves.values()), cast(c["grad"]), allow_unused=True)
    grads = {k: torch.zeros_like(v) if gr is None else gr for (k, v), gr in zip(leaves.items(), grads)}
    return y.detach(), {k: v.detach() for k, v in grads.items()}


def check_forward(chk, ops, c, dtype, tag, op, mixed, strided_x, determinism):
    what = f"{tag} {op}{' mixed' if mixed else ''}{' strided-x' if strided_x else ''}"
    try:
        want_y, want_g = run_forward(ops, c, "cpu", op, mixed, strided_x)
    except Exception as err:  # the CPU op refuses these inputs: the GPU op must refuse them the same way
        try:
            run_forward(ops, c, chk.device, op, mixed, strided_x)
            chk.fail(f"{what}: the CPU op raised {type(err).__name__} ({err}) but the {chk.device} op did not")
        except Exception as dev_err:
            if type(dev_err) is not type(err):
                chk.fail(
                    f"{what}: the CPU op raised {type(err).__name__}, the {chk.device} op "
                    f"{type(dev_err).__name__} ({dev_err})"
                )
        return
    chk.poison()
    got_y, got_g = run_forward(ops, c, chk.device, op, mixed, strided_x)
    ref_y, ref_g = run_forward(ops, c, "cpu", op, mixed, strided_x, dtype=torch.float64)
    chk.close(f"{what} y", got_y, want_y, TOL[dtype], "cpu")
    chk.close(f"{what} y", got_y, ref_y, TOL[dtype], "f64")
    for name in want_g:
        chk.close(f"{what} grad {name}", got_g[name], want_g[name], TOL[dtype], "cpu")
        chk.close(f"{what} grad {name}", got_g[name], ref_g[name], TOL[dtype], "f64")
    if determinism:
        chk.poison()
        again_y, again_g = run_forward(ops, c, chk.device, op, mixed, strided_x)
        chk.equal(f"{what} y run to run", again_y, got_y)
        for name in got_g:
            chk.equal(f"{what} grad {name} run to run", again_g[name], got_g[name])


def check_merge(chk, ops, cfg, dtype, tag, seed):
    """Delta weight (projection in `dtype`) and merge/unmerge (fp32 projection, as VeraLinear keeps it)."""
    c = make_case(cfg, dtype, 0, seed)
    in_f, out_f, r = c["dims"]
    g = torch.Generator().manual_seed(seed + 1)
    dev = chk.device
    ld, lb = c["ld"], c["lb"]

    def slices(device, dt):  # strided views of the full projections, taken on the device (a moved view is dense)
        return c["A_full"].to(device, dt)[:r, :in_f], c["B_full"].to(device, dt)[:out_f, :r]

    for fifo in (False, True):
        what = f"{tag}{' fan_in_fan_out' if fifo else ''}"
        A, B = slices("cpu", dtype)
        want = ops.vera_delta_weight(A, B, ld, lb, fifo, dtype)
        chk.poison()
        got = ops.vera_delta_weight(*slices(dev, dtype), ld.to(dev), lb.to(dev), fifo, dtype)
        ref = (lb.double()[:, None] * B.double()) @ (ld.double()[:, None] * A.double())
        chk.close(f"{what} delta_weight", got, want, TOL[dtype], "cpu")
        chk.close(f"{what} delta_weight", got, ref.T if fifo else ref, TOL[dtype], "f64")

        A32, B32 = slices("cpu", torch.float32)
        dev_args = (*slices(dev, torch.float32), ld.to(dev), lb.to(dev))
        w0 = torch.randn(*((in_f, out_f) if fifo else (out_f, in_f)), generator=g).to(dtype)
        for alpha, name in ((1.0, "merge"), (-1.0, "unmerge")):
            want_w = w0.clone()
            ops.vera_merge_(want_w, A32, B32, ld, lb, alpha, fifo, False)
            got_w = w0.to(dev, copy=True)
            ops.vera_merge_(got_w, *dev_args, alpha, fifo, False)
            ref_w = w0.double() + alpha * (ref.T if fifo else ref)
            chk.close(f"{what} {name}", got_w, want_w, TOL[dtype], "cpu")
            chk.close(f"{what} {name}", got_w, ref_w, TOL[dtype], "f64")
            if alpha == 1.0:
                safe_w = w0.to(dev, copy=True)
                ops.vera_merge_(safe_w, *dev_args, alpha, fifo, True)
                chk.equal(f"{what} safe merge (accepted) vs plain merge", safe_w, got_w)

        bad_lb = lb.clone()
        bad_lb[min(3, out_f - 1)] = float("inf")
        for device in ("cpu", dev):
            w = w0.to(device, copy=True)
            try:
                ops.vera_merge_(w, *slices(device, torch.float32), ld.to(device), bad_lb.to(device), 1.0, fifo, True)
                chk.fail(f"{what} safe merge with an inf lambda_b on {device}: not refused")
            except ValueError:
                chk.equal(f"{what} refused safe merge on {device}: weight untouched", w, w0)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--device",
        choices=["cuda", "cpu"],
        default="cuda",
        help="cpu: a dry run of this script's logic (CPU vs CPU and float64), no GPU needed",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="fp32+bf16, N in {0, 5, 33, 300}, no run-to-run repeat: for racecheck, which is slow",
    )
    args = parser.parse_args(argv)

    if args.device == "cuda" and not torch.cuda.is_available():
        print(
            "sanitize_kernels: no CUDA device visible (torch.cuda.is_available() is False); "
            "use --device cpu for a dry run of the script's logic",
            file=sys.stderr,
        )
        return 2
    import vera_ext
    from vera_ext import ops

    if args.device == "cuda":
        info = vera_ext.build_info()
        missing = [
            op
            for op in ("vera_forward", "vera_linear_forward", "vera_backward", "vera_delta_weight", "vera_merge_")
            if not torch._C._dispatch_has_kernel_for_dispatch_key(f"vera_ext::{op}", "CUDA")
        ]
        if not info.get("with_cuda") or missing:
            print(
                f"sanitize_kernels: vera_ext was built without its CUDA kernels (build_info={info}, no CUDA "
                f"kernel for {missing}); rebuild on this machine",
                file=sys.stderr,
            )
            return 2
        print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  build_info {info}")
    no_cache = os.environ.get("PYTORCH_NO_CUDA_MEMORY_CACHING") == "1"
    chk = Checker(args.device, poison=not no_cache)
    dtypes = ["fp32", "bf16"] if args.quick else list(DTYPES)
    ns = (0, 1, 3, 5, 32, 33, 300) if args.quick else NS  # --quick (race and sync checks): every decode row bucket
    determinism = args.device == "cuda" and not args.quick
    t0 = time.perf_counter()
    seed = 0
    for cfg in CONFIGS:
        for dname in dtypes:
            dtype = DTYPES[dname]
            for n in ns:
                seed += 1
                before = len(chk.failures)
                c = make_case(cfg, dtype, n, seed)
                tag = f"{cfg[0]} {dname} N={n}"
                for op in ("vera_forward", "vera_linear_forward"):
                    for mixed in (False, True):
                        check_forward(chk, ops, c, dtype, tag, op, mixed, False, determinism)
                if n in (5, 33):
                    check_forward(chk, ops, c, dtype, tag, "vera_forward", False, True, False)
                print(f"  {tag:<22} forward+backward {'ok' if len(chk.failures) == before else 'FAILED'}", flush=True)
            before = len(chk.failures)
            check_merge(chk, ops, cfg, dtype, f"{cfg[0]} {dname}", seed)
            print(
                f"  {cfg[0] + ' ' + dname:<22} delta_weight/merge/unmerge/safe merge "
                f"{'ok' if len(chk.failures) == before else 'FAILED'}",
                flush=True,
            )
    if args.device == "cuda":
        torch.cuda.synchronize()  # surface any asynchronous kernel fault here, inside the run
    print(
        f"{chk.count} checks in {time.perf_counter() - t0:.1f} s on {args.device}; worst rel err vs CPU op "
        f"{chk.worst['cpu']:.2e}, vs float64 {chk.worst['f64']:.2e}"
    )
    for f in chk.failures:
        print(f"FAIL {f}")
    print(f"sanitize_kernels: {'FAILED (' + str(len(chk.failures)) + ')' if chk.failures else 'PASSED'}")
    return 1 if chk.failures else 0


if __name__ == "__main__":
    sys.exit(main())
