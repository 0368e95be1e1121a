"""The op cases the kernel cost report predicts and the GPU check measures: the target shapes of the GPU work
(training N=8192, I=O=4096, r=256, bf16, one adapter and 16 mixed; decode N=1, 4, 16 with one adapter and with 16
distinct adapters out of 1,000, plus N=32 (the most rows of the fused path) and N=3 and 16 with an odd in_f (rows not
16-byte aligned: the element-wise kernels), so that every decode kernel instantiation is predicted; merges of
4096x4096 and 4096x11008 weights), each with its ideal bytes (every operand read once, every output written once) and
the floor it is judged against.

A case runs through any namespace that has vera_ext's op names (`torch.ops.vera_ext` on a GPU, the emulated build's
`op_*` ops through `EmulatedOps`), so the prediction and the measurement run the very same calls.
"""

from dataclasses import dataclass, replace

import torch

GROUPS = ("training", "decode", "merge")

# Our kernels whose arithmetic is a GEMM on the CUDA cores (fp32 SIMT): model.py credits them with no more than the
# rate it assumes cuBLAS SGEMM sustains, not the CUDA cores' datasheet peak.
SIMT_GEMM_KERNELS = frozenset({"merge_kernel"})


@dataclass(frozen=True)
class Case:
    name: str
    group: str  # training | decode | merge
    what: str  # one line for the report
    step: str  # forward | backward | merge | safe_merge | delta_weight
    n: int = 0  # rows of x (0 for merges)
    in_f: int = 4096
    out_f: int = 4096
    r: int = 256
    adapters: int = 1  # adapters registered (lambda table rows); > 1 means a mixed batch with adapter_idx
    distinct: int = 1  # distinct adapters among the rows
    dtype: torch.dtype = torch.bfloat16
    proj_dtype: torch.dtype = None  # merges: A's and B's dtype when not the data's (VeraLinear keeps them fp32)
    near_limit: bool = False  # merges: one weight entry within 0.05% of its dtype's largest finite value

    @property
    def mixed(self):
        return self.adapters > 1

    @property
    def elem(self):
        return torch.empty((), dtype=self.dtype).element_size()

    def dims(self):
        return {
            "n": self.n,
            "in_f": self.in_f,
            "out_f": self.out_f,
            "r": self.r,
            "adapters": self.adapters,
            "distinct": self.distinct,
            "dtype": str(self.dtype).replace("torch.", ""),
        }

    def make_inputs(self, device, seed=0):
        """The op's inputs on `device` (random values; lambdas fp32 as PEFT keeps them)."""
        g = torch.Generator().manual_seed(seed)

        def rand(*shape, dtype=self.dtype):
            return (torch.randn(*shape, generator=g) * 0.05).to(device=device, dtype=dtype)

        n, i, o, r, k = self.n, self.in_f, self.out_f, self.r, self.adapters
        proj = self.proj_dtype or self.dtype
        t = {"A": rand(r, i, dtype=proj), "B": rand(o, r, dtype=proj), "weight": rand(o, i)}
        if self.near_limit:  # the safe merge's max-abs bound cannot prove this finite: the check pass runs
            t["weight"][0, 0] = torch.finfo(self.dtype).max * 0.9995
        t["lambda_d"] = rand(k, r, dtype=torch.float32) if self.mixed else rand(r, dtype=torch.float32)
        t["lambda_b"] = rand(k, o, dtype=torch.float32) if self.mixed else rand(o, dtype=torch.float32)
        t["adapter_idx"] = None
        if self.mixed:
            chosen = torch.randperm(k, generator=g)[: self.distinct]
            t["adapter_idx"] = chosen[torch.arange(n) % self.distinct].to(device)
        if self.step in ("forward", "backward"):
            t["x"] = rand(n, i)
        if self.step == "backward":
            t["grad_out"] = rand(n, o)
            t["u"] = rand(n, r)
        return t

    def run(self, ops, t):
        """One call of the op under study through `ops` (a namespace with vera_ext's op names)."""
        if self.step == "forward":
            return ops.vera_linear_forward(
                t["x"], t["weight"], None, t["A"], t["B"], t["lambda_d"], t["lambda_b"], t["adapter_idx"]
            )
        if self.step == "backward":
            return ops.vera_backward(
                t["grad_out"],
                t["u"],
                t["A"],
                t["B"],
                t["lambda_d"],
                t["lambda_b"],
                t["adapter_idx"],
                t["weight"],
                [True, True, True],
            )
        if self.step == "delta_weight":
            return ops.vera_delta_weight(t["A"], t["B"], t["lambda_d"], t["lambda_b"], False, self.dtype)
        return ops.vera_merge_(
            t["weight"], t["A"], t["B"], t["lambda_d"], t["lambda_b"], 1.0, False, self.step == "safe_merge"
        )

    def ideal_bytes(self):
        """{"read", "write"}: every operand read once and every output written once (lambda rows: only those the
        batch uses)."""
        n, i, o, r, e = self.n, self.in_f, self.out_f, self.r, self.elem
        lam = self.distinct * (r + o) * 4
        idx = n * 8 if self.mixed else 0
        pe = torch.empty((), dtype=self.proj_dtype).element_size() if self.proj_dtype else e
        proj = (r * i + o * r) * pe
        if self.step == "forward":
            return {"read": n * i * e + o * i * e + proj + lam + idx, "write": n * o * e + n * r * e}
        if self.step == "backward":
            return {
                "read": n * o * e + n * r * e + o * i * e + proj + lam + idx,
                "write": n * i * e + self.distinct * (r + o) * 4,
            }
        if self.step == "delta_weight":  # no weight: the (O, I) delta written once
            return {"read": proj + lam, "write": o * i * e}
        return {"read": o * i * e + proj + lam, "write": o * i * e}

    def gemm_flops(self):
        """The FLOPs of the layer's GEMMs that any implementation performs (base layer and adapter)."""
        n, i, o, r = self.n, self.in_f, self.out_f, self.r
        if self.step == "forward":
            return 2 * n * i * o + 2 * n * r * (i + o)
        if self.step == "backward":  # grad_x through the frozen base; gv = g B_hat, (gv lambda_d) A, g^T u
            return 2 * n * i * o + 2 * n * r * (i + 2 * o)
        return 2 * o * r * i  # the delta weight

    def kernel_flops(self, kernel_base):
        """CUDA-core FLOPs of one of our fused kernels in this case (the dot products of the decode kernels, the
        tile GEMM of the merge kernel: 2 O I r per pass); None for kernels whose arithmetic is negligible next to
        their memory traffic."""
        n, i, o, r = self.n, self.in_f, self.out_f, self.r
        if kernel_base == "merge_kernel":
            return 2 * o * i * r
        if kernel_base == "decode_u_kernel":
            return 2 * n * r * i
        if kernel_base == "decode_y_kernel":
            return 2 * n * o * (i + r)
        return None

    def base_layer_us(self, gpu):
        """(microseconds, how it is computed) for decode cases, None for others: the frozen base layer alone, the
        issue's yardstick for decode ("<= 1.15x the base layer alone"), modelled as a cuBLAS GEMV is modelled
        (model.predict_other): its bytes (W, x, y) at the HBM rate plus one kernel launch. The floor (floor_us)
        leaves the launch out; the report gives both ratios."""
        if self.group != "decode":
            return None
        b = (self.out_f * self.in_f + self.n * (self.in_f + self.out_f)) * self.elem
        return (
            b / gpu.hbm_bytes_per_s * 1e6 + gpu.kernel_overhead_us,
            f"base layer alone: {b / 2**20:.0f} MiB at {gpu.hbm_bytes_per_s / 1e12:.1f} TB/s "
            f"+ one launch ({gpu.kernel_overhead_us:.0f} us)",
        )

    def floor_us(self, gpu):
        """(microseconds, how it is computed): the bound this case is judged against."""
        if self.group == "decode":
            b = self.out_f * self.in_f * self.elem
            return (
                b / gpu.hbm_bytes_per_s * 1e6,
                f"base weight {b / 2**20:.0f} MiB at {gpu.hbm_bytes_per_s / 1e12:.1f} TB/s",
            )
        if self.group == "training":
            f = self.gemm_flops()
            return f / gpu.cublas_bf16_flops_per_s * 1e6, (
                f"GEMM {f / 1e9:.0f} GFLOP at {gpu.cublas_bf16_flops_per_s / 1e12:.0f} TFLOP/s"
            )
        passes = 1 if self.step == "delta_weight" else 2  # the delta written; W read and written
        f, w = self.gemm_flops(), passes * self.out_f * self.in_f * self.elem
        return (f / gpu.cublas_fp32_flops_per_s + w / gpu.hbm_bytes_per_s) * 1e6, (
            f"fp32 GEMM {f / 1e9:.1f} GFLOP at {gpu.cublas_fp32_flops_per_s / 1e12:.0f} TFLOP/s + "
            + ("delta write" if passes == 1 else "W read+write")
        )


def _training(n, i, o, r):
    out = []
    for step, short in (("forward", "fwd"), ("backward", "bwd")):
        out.append(Case(f"train_{short}", "training", f"training {step}, one adapter", step, n, i, o, r))
        out.append(
            Case(
                f"train_{short}_mixed16",
                "training",
                f"training {step}, 16 adapters mixed",
                step,
                n,
                i,
                o,
                r,
                adapters=16,
                distinct=16,
            )
        )
    return out


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def all_cases(small=False, dtype="bf16"):
    """Every case at the target shapes, or (small) at reduced sizes with the same code paths, for tests. The target
    dtype is bf16; other dtypes run the same cases (named with an @fp16 / @fp32 suffix) to cover every kernel
    instantiation (fp32 training takes the W + delta_W path at these sizes)."""
    return [
        c if dtype == "bf16" else replace(c, name=f"{c.name}@{dtype}", dtype=DTYPES[dtype]) for c in _bf16_cases(small)
    ]


def _bf16_cases(small):
    if small:
        n_train, d, d_up, r, k = 512, 512, 1376, 64, 100
    else:
        n_train, d, d_up, r, k = 8192, 4096, 11008, 256, 1000
    cases = _training(n_train, d, d, r)
    for n in (1, 4, 16):
        cases.append(Case(f"decode_n{n}", "decode", f"decode N={n}, one adapter", "forward", n, d, d, r))
    cases.append(
        Case(
            "decode_n16_mixed",
            "decode",
            f"decode N=16, 16 distinct adapters of {k}",
            "forward",
            16,
            d,
            d,
            r,
            adapters=k,
            distinct=16,
        )
    )
    cases.append(Case("decode_n32", "decode", "decode N=32 (the most rows of the fused path)", "forward", 32, d, d, r))
    for n in (3, 16):  # the element-wise kernels' two row buckets (4, 32)
        cases.append(
            Case(
                f"decode_n{n}_odd",
                "decode",
                f"decode N={n}, in_f={d - 1}: rows not 16-byte aligned (element-wise path)",
                "forward",
                n,
                d - 1,
                d,
                r,
            )
        )
    cases.append(Case(f"merge_{d}x{d}", "merge", f"merge of a {d}x{d} weight", "merge", 0, d, d, r))
    cases.append(Case(f"merge_{d}x{d_up}", "merge", f"merge of a {d}x{d_up} weight (O={d_up})", "merge", 0, d, d_up, r))
    cases.append(Case(f"safe_merge_{d}x{d}", "merge", f"safe merge of a {d}x{d} weight", "safe_merge", 0, d, d, r))
    # get_delta_weight: the full delta in the data dtype (row_scale to fp32, GEMM, cast), the op merges no longer use
    cases.append(Case(f"delta_weight_{d}x{d}", "merge", f"delta weight of a {d}x{d} layer", "delta_weight", 0, d, d, r))
    # The merge kernel's other instantiations: the check-only pass of a safe merge whose max-abs bound cannot decide
    # (a weight entry near its dtype's max), with the projection in fp32 (as VeraLinear keeps it next to a 16-bit
    # weight) and in each 16-bit dtype whatever the weight's (the op takes any pair).
    for short, proj in (("fp32", torch.float32), ("fp16", torch.float16), ("bf16", torch.bfloat16)):
        cases.append(
            Case(
                f"safe_merge_{d}x{d}_checked_proj_{short}",
                "merge",
                f"safe merge of a {d}x{d} weight near its dtype's max (check pass + write pass), projection {short}",
                "safe_merge",
                0,
                d,
                d,
                r,
                proj_dtype=proj,
                near_limit=True,
            )
        )
    return cases


def select(shapes="all", small=False, dtypes=("bf16",)):
    """The cases of one group (training | decode | merge) or all of them, in each of `dtypes`."""
    if shapes != "all" and shapes not in GROUPS:
        raise ValueError(f"shapes must be one of training, decode, merge, all; got {shapes!r}")
    unknown = [d for d in dtypes if d not in DTYPES]
    if unknown:
        raise ValueError(f"dtypes must be among {', '.join(DTYPES)}; got {', '.join(unknown)}")
    return [c for d in dtypes for c in all_cases(small, d) if shapes in ("all", c.group)]


class EmulatedOps:
    """vera_ext's op names over the emulated build's op_* ops (torch.ops.vera_emu)."""

    def __init__(self, emu):
        self.vera_linear_forward = emu.op_vera_linear_forward
        self.vera_forward = emu.op_vera_forward
        self.vera_backward = emu.op_vera_backward
        self.vera_merge_ = emu.op_vera_merge_
        self.vera_delta_weight = emu.op_vera_delta_weight
