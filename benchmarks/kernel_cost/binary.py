"""Facts read from the compiled extension, without a GPU: what each kernel's cubin says about its resources, and
what its SASS says about its global memory accesses.

    resource_usage()   cuobjdump --dump-resource-usage: registers, stack, static shared memory, local memory
    sass()             cuobjdump -sass: each kernel's instructions
    count_wide_loads() the global loads and stores of a kernel by width (are the 16-byte loads there?)
    load_batches()     how many bytes a lane has in flight in the kernel's hot loop (a heuristic, see there)
    kernel_facts()     all of the above, keyed by kernel_key()

The parse_* functions, kernel_key, count_wide_loads and load_batches are pure (text or instructions in), so tests
can feed them canned listings; the rest run cuobjdump and c++filt.
"""

from __future__ import annotations

import glob
import importlib.machinery
import importlib.util
import os
import re
import shutil
import subprocess
from typing import Dict, List, NamedTuple, Optional, Set, Tuple


class Instr(NamedTuple):
    """One SASS instruction, e.g. `/*0420*/  @!P0 BRA 0x3b40 ;`."""

    address: int  # byte offset in its function (0x420)
    predicate: Optional[str]  # the guard without its '@' ("!P0"), None when the instruction is unguarded
    opcode: str  # with its modifiers ("BRA", "LDG.E.128")
    operands: str  # as printed, up to the ';' ("0x3b40", "R16, desc[UR12][R58.64]")


# ---------------------------------------------------------------------------------------------------------------
# Finding the tools and the binary


def find_cuobjdump() -> str:
    """Path of a cuobjdump to run: $CUOBJDUMP if set; else the first that exists of `cuobjdump` on PATH,
    $CUDA_HOME/bin, /usr/local/cuda/bin, the copy shipped in the `triton` package (backends/nvidia/bin) and one in
    an `nvidia.*` wheel (nvidia/*/bin, e.g. from `pip install nvidia-cuda-cuobjdump`).

    Neither triton nor nvidia is imported: their directories come from importlib.util.find_spec. Raises
    FileNotFoundError listing every place looked at when there is none, or when $CUOBJDUMP names no executable.
    """
    explicit = os.environ.get("CUOBJDUMP")
    if explicit:
        if not _is_executable(explicit):
            raise FileNotFoundError(
                f"CUOBJDUMP={explicit!r} is not an executable file; expected the path of a cuobjdump binary"
            )
        return explicit
    looked = ["$CUOBJDUMP (not set)", "cuobjdump on PATH"]
    on_path = shutil.which("cuobjdump")
    if on_path:
        return on_path
    candidates = []
    if os.environ.get("CUDA_HOME"):
        candidates.append(os.path.join(os.environ["CUDA_HOME"], "bin", "cuobjdump"))
    candidates.append("/usr/local/cuda/bin/cuobjdump")
    candidates += _package_candidates()
    for path in candidates:
        looked.append(path)
        if _is_executable(path):
            return path
    raise FileNotFoundError(
        "no cuobjdump found; looked at: " + ", ".join(looked) + ". Get one with "
        "`pip install nvidia-cuda-cuobjdump` (or a CUDA toolkit), or set CUOBJDUMP to its path"
    )


def _is_executable(path: str) -> bool:
    return os.path.isfile(path) and os.access(path, os.X_OK)


def _package_candidates() -> List[str]:
    """Where the triton and nvidia-* wheels would keep a cuobjdump (patterns for the nvidia namespace)."""
    found = []
    triton = importlib.util.find_spec("triton")
    if triton is not None and triton.submodule_search_locations:
        for base in triton.submodule_search_locations:
            found.append(os.path.join(base, "backends", "nvidia", "bin", "cuobjdump"))
    nvidia = importlib.util.find_spec("nvidia")
    if nvidia is not None and nvidia.submodule_search_locations:
        for base in nvidia.submodule_search_locations:
            pattern = os.path.join(base, "*", "bin", "cuobjdump")
            found += sorted(glob.glob(pattern)) or [pattern]  # the pattern itself names the place looked at
    return found


def extension_binary() -> str:
    """Path of the built extension, vera_ext/_C*.so, found where `import vera_ext` would find the package (it is
    not imported). With several builds there, the one this interpreter would load."""
    spec = importlib.util.find_spec("vera_ext")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "package vera_ext not found on sys.path; expected the repository root on it or "
            "vera_ext installed (pip install -e .)"
        )
    dirs = list(spec.submodule_search_locations)
    builds = sorted(p for d in dirs for p in glob.glob(os.path.join(d, "_C*.so")))
    if not builds:
        raise FileNotFoundError(
            f"no built extension _C*.so in {', '.join(dirs)}; build it first (pip install --no-build-isolation -e .)"
        )
    if len(builds) == 1:
        return builds[0]
    ours = [p for p in builds if any(p.endswith("_C" + s) for s in importlib.machinery.EXTENSION_SUFFIXES)]
    if not ours:
        raise FileNotFoundError(
            f"several builds of the extension ({', '.join(builds)}) and none for this "
            f"interpreter (suffixes {importlib.machinery.EXTENSION_SUFFIXES})"
        )
    return ours[0]


def _run_cuobjdump(flag: str, binary: str, cuobjdump: Optional[str], arch: Optional[str]) -> str:
    """stdout of `cuobjdump <flag> [-arch <arch>] <binary>`; ValueError when the binary holds no device code."""
    cmd = [cuobjdump or find_cuobjdump(), flag] + (["-arch", arch] if arch else []) + [binary]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        if "does not contain device code" in proc.stdout + proc.stderr:
            raise ValueError(_no_cubin(binary, arch))
        raise RuntimeError(f"`{' '.join(cmd)}` failed with exit status {proc.returncode}: {proc.stderr.strip()}")
    return proc.stdout


def _no_cubin(binary: str, arch: Optional[str]) -> str:
    """Why a binary gave no kernels, for the ValueError."""
    which = f"no cubin for {arch}" if arch else "no cubin"
    return (
        f"{binary} has {which}: the extension was built without CUDA (rebuild with VERA_EXT_CUDA=1 and nvcc "
        "available)" + (" or only for other architectures (TORCH_CUDA_ARCH_LIST)" if arch else "")
    )


def _demangle(names: List[str]) -> List[str]:
    """The demangled names, in order, from a single c++filt run that reads them on stdin."""
    cxxfilt = shutil.which("c++filt")
    if cxxfilt is None:
        raise FileNotFoundError("c++filt not found on PATH; expected it from binutils (apt-get install binutils)")
    proc = subprocess.run([cxxfilt], input="\n".join(names) + "\n", capture_output=True, text=True, check=True)
    out = proc.stdout.splitlines()
    if len(out) != len(names):
        raise RuntimeError(f"c++filt returned {len(out)} lines for {len(names)} names; expected one per name")
    return out


# ---------------------------------------------------------------------------------------------------------------
# Kernel names


def _split_top_level(text: str, sep: str) -> List[str]:
    """`text` split at each `sep` that is outside every <...>, (...), [...] and {...}."""
    parts, depth, start, i = [], 0, 0, 0
    while i < len(text):
        c = text[i]
        if c in "<([{":
            depth += 1
        elif c in ">)]}":
            depth -= 1
        elif depth == 0 and text.startswith(sep, i):
            parts.append(text[start:i])
            start = i + len(sep)
            i = start
            continue
        i += 1
    parts.append(text[start:])
    return parts


def _drop_parameter_list(name: str) -> str:
    """`name` without its last top-level (...) group when it ends with one (a function's parameters)."""
    if not name.endswith(")"):
        return name
    depth = 0
    for i in range(len(name) - 1, -1, -1):
        depth += {")": 1, "(": -1}.get(name[i], 0)
        if depth == 0:
            return name[:i]
    raise ValueError(f"unbalanced parentheses in kernel name {name!r}")


def kernel_key(demangled: str) -> str:
    """A short key for one kernel instantiation: its unqualified name with its template arguments.

        void vera::cuda::(anonymous namespace)::merge_kernel<float, true>(vera::cuda::MergeParams)
        vera::cuda::{anonymous}::merge_kernel<float,true>            (gcc's __PRETTY_FUNCTION__ spelling)
            -> merge_kernel<float, true>

    Drops a leading return type, the parameter list and every namespace qualifier; template arguments are kept,
    spelled with ", " between them and no spaces next to < and >. Raises ValueError when no name is left.
    """
    name = _drop_parameter_list(demangled.strip())
    name = _split_top_level(name, " ")[-1]  # the return type, if any, is before the last top-level space
    name = _split_top_level(name, "::")[-1]
    name = re.sub(r"\s*,\s*", ", ", name)
    name = re.sub(r"\s*([<>])\s*", r"\1", name)
    if not re.match(r"[A-Za-z_]\w*", name):
        raise ValueError(
            f"cannot read a kernel name from {demangled!r}; expected a demangled function name such "
            "as 'void ns::kernel<float>(Params)'"
        )
    return name


# ---------------------------------------------------------------------------------------------------------------
# Resource usage

_RESOURCE_FUNCTION = re.compile(r"^\s*Function\s+(\S+):\s*$")
_RESOURCE_FIELD = re.compile(r"([A-Z]+(?:\[\d+\])?):(\d+)")


def parse_resource_usage(text: str) -> List[dict]:
    """One dict per `Function <mangled>:` entry of a `cuobjdump --dump-resource-usage` listing, in listing order:
    mangled, source_file (basename of the cubin's `identifier = ...`), arch (`arch = ...`), registers, stack_bytes,
    static_shared_bytes, local_bytes, spills (stack or local memory in use: registers spilled, or a local array).

    Raises ValueError when a Function line is not followed by its `REG:... STACK:...` line.
    """
    kernels, arch, source_file, pending = [], None, None, None
    for line in text.splitlines():
        stripped = line.strip()
        if pending is not None:
            fields = dict(_RESOURCE_FIELD.findall(stripped))
            if not all(name in fields for name in ("REG", "STACK", "SHARED", "LOCAL")):
                raise ValueError(
                    f"expected a 'REG:.. STACK:.. SHARED:.. LOCAL:..' line after Function {pending}, got {stripped!r}"
                )
            stack, local = int(fields["STACK"]), int(fields["LOCAL"])
            kernels.append(
                {
                    "mangled": pending,
                    "source_file": source_file,
                    "arch": arch,
                    "registers": int(fields["REG"]),
                    "stack_bytes": stack,
                    "static_shared_bytes": int(fields["SHARED"]),
                    "local_bytes": local,
                    "spills": stack > 0 or local > 0,
                }
            )
            pending = None
        elif stripped.startswith("arch = "):
            arch = stripped[len("arch = ") :]
        elif stripped.startswith("identifier = "):
            source_file = os.path.basename(stripped[len("identifier = ") :])
        else:
            match = _RESOURCE_FUNCTION.match(line)
            if match:
                pending = match.group(1)
    if pending is not None:
        raise ValueError(f"the listing ends after Function {pending}, before its 'REG:..' line")
    return kernels


def resource_usage(
    binary: Optional[str] = None, cuobjdump: Optional[str] = None, arch: Optional[str] = None
) -> List[dict]:
    """parse_resource_usage of `cuobjdump --dump-resource-usage` on `binary` (default: the built extension), with
    `key` (kernel_key) and `demangled` added in front of each dict. `arch` (e.g. "sm_90") keeps that
    architecture's cubins only.

    Raises ValueError when the binary has no cubin (a CPU-only build, or none for `arch`).
    """
    binary = binary or extension_binary()
    kernels = parse_resource_usage(_run_cuobjdump("--dump-resource-usage", binary, cuobjdump, arch))
    if not kernels:
        raise ValueError(_no_cubin(binary, arch))
    demangled = _demangle([k["mangled"] for k in kernels])
    return [{"key": kernel_key(d), "demangled": d, **k} for d, k in zip(demangled, kernels)]


# ---------------------------------------------------------------------------------------------------------------
# SASS

_SASS_FUNCTION = re.compile(r"^\s*Function\s*:\s*(\S+)\s*$")
_SASS_INSTR = re.compile(r"^\s*/\*([0-9a-fA-F]+)\*/\s+(?:@(!?U?P(?:T|\d+))\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*?)\s*;")


def parse_sass(text: str) -> Dict[str, List[Instr]]:
    """{mangled name: its instructions in address order} from a `cuobjdump -sass` listing.

    Raises ValueError when a function appears twice (cubins for several architectures: choose one with `arch`).
    """
    functions: Dict[str, List[Instr]] = {}
    current = None
    for line in text.splitlines():
        header = _SASS_FUNCTION.match(line)
        if header:
            name = header.group(1)
            if name in functions:
                raise ValueError(
                    f"function {name} appears twice in the SASS listing; expected one cubin per "
                    "kernel (pass arch= to pick one architecture)"
                )
            current = functions[name] = []
            continue
        instr = _SASS_INSTR.match(line)
        if instr and current is not None:
            address, predicate, opcode, operands = instr.groups()
            current.append(Instr(int(address, 16), predicate, opcode, operands))
    return functions


def sass(
    binary: Optional[str] = None, cuobjdump: Optional[str] = None, arch: Optional[str] = None
) -> Dict[str, List[Instr]]:
    """parse_sass of `cuobjdump -sass` on `binary` (default: the built extension); `arch` as in resource_usage."""
    binary = binary or extension_binary()
    functions = parse_sass(_run_cuobjdump("-sass", binary, cuobjdump, arch))
    if not functions:
        raise ValueError(_no_cubin(binary, arch))
    return functions


# ---------------------------------------------------------------------------------------------------------------
# Global memory accesses

WIDTHS = (1, 2, 4, 8, 16)
# Width modifiers of a memory access; without one the access is 4 bytes. Other modifiers (.E, .CONSTANT, .EL,
# .LTC128B, ...) say how, not how much.
_WIDTH_MODIFIERS = {"U8": 1, "S8": 1, "U16": 2, "S16": 2, "64": 8, "128": 16}
_LOADS = {"LD", "LDG", "LDL", "LDS", "LDC"}  # data operand first
_STORES = {"ST", "STG", "STL", "STS"}  # data operand last
_REGISTER = re.compile(r"(?<![A-Za-z0-9_])R(\d+)(\.64)?")  # not RZ, UR4 or SR_TID


def _base(opcode: str) -> str:
    return opcode.split(".", 1)[0]


def access_bytes(opcode: str) -> int:
    """Bytes per lane that a load or store opcode moves: LDG.E.128 16, LDG.E.64 8, LDG.E.U16 2, LDG.E 4."""
    for modifier in opcode.split(".")[1:]:
        if modifier in _WIDTH_MODIFIERS:
            return _WIDTH_MODIFIERS[modifier]
    return 4


def count_wide_loads(instrs: List[Instr]) -> dict:
    """{"loads": {width: count}, "stores": {width: count}} over the global loads (LDG with any modifiers) and
    stores (STG) of one function, for every width in WIDTHS (zeros included), widths in bytes per lane."""
    counts = {"loads": dict.fromkeys(WIDTHS, 0), "stores": dict.fromkeys(WIDTHS, 0)}
    for ins in instrs:
        kind = {"LDG": "loads", "STG": "stores"}.get(_base(ins.opcode))
        if kind:
            counts[kind][access_bytes(ins.opcode)] += 1
    return counts


def _split_operands(operands: str) -> List[str]:
    return [op.strip() for op in _split_top_level(operands, ",")] if operands else []


def _span(operand: str, nbytes: int) -> Set[int]:
    """Registers a data operand `Rn` covers for an access of `nbytes` (Rn .. Rn + nbytes/4 - 1); empty for RZ."""
    match = re.match(r"R(\d+)\b", operand)
    if not match:
        return set()
    first = int(match.group(1))
    return set(range(first, first + max(1, nbytes // 4)))


def _registers(ins: Instr) -> Set[int]:
    """Registers `ins` reads or writes, as far as its text shows: every Rn (Rn.64 is the pair Rn, Rn+1), and a
    load's or store's data operand over its whole width. Implicit widths (IMAD.WIDE's destination pair, ...) are
    not seen."""
    operands = _split_operands(ins.operands)
    regs = set()
    for op in operands:
        for number, pair in _REGISTER.findall(op):
            regs.update(range(int(number), int(number) + (2 if pair else 1)))
    base = _base(ins.opcode)
    if operands and (base in _LOADS or base in _STORES):
        regs |= _span(operands[0] if base in _LOADS else operands[-1], access_bytes(ins.opcode))
    return regs


def _is_global_load(ins: Instr) -> bool:
    return _base(ins.opcode) == "LDG"


# Control flow: BRA jumps (and falls through when guarded or given a condition operand such as BRA.DIV UR4, ...);
# CALL enters a subroutine of the same function and comes back; an unguarded EXIT, RET or indirect jump (BRX, JMX,
# whose targets the text does not give) ends its path.
_ENDS_PATH = {"EXIT", "RET", "BRX", "JMX"}
_TRANSFERS = _ENDS_PATH | {"BRA", "CALL"}


def _target(ins: Instr) -> Optional[int]:
    """The address a BRA or CALL goes to (its last hex operand), None for other instructions."""
    if _base(ins.opcode) not in ("BRA", "CALL"):
        return None
    targets = re.findall(r"0x([0-9a-fA-F]+)", ins.operands)
    return int(targets[-1], 16) if targets else None


def _falls_through(ins: Instr) -> bool:
    """Whether control can go on to the next instruction after `ins`."""
    base = _base(ins.opcode)
    guarded = ins.predicate not in (None, "PT")
    if base == "BRA":
        return guarded or len(_split_operands(ins.operands)) > 1
    return guarded or base not in _ENDS_PATH


def _basic_blocks(instrs: List[Instr]) -> Tuple[List[List[Instr]], List[List[int]]]:
    """The basic blocks of a function, in address order, and each block's successors (block indices)."""
    targets = {t for t in map(_target, instrs) if t is not None}
    blocks: List[List[Instr]] = []
    for i, ins in enumerate(instrs):
        if not blocks or ins.address in targets or _base(instrs[i - 1].opcode) in _TRANSFERS:
            blocks.append([])
        blocks[-1].append(ins)
    first = {block[0].address: n for n, block in enumerate(blocks)}
    successors = []
    for n, block in enumerate(blocks):
        last = block[-1]
        succ = [first[_target(last)]] if _target(last) in first else []
        if _falls_through(last) and n + 1 < len(blocks):
            succ.append(n + 1)
        successors.append(succ)
    return blocks, successors


def _immediate_dominators(successors: List[List[int]]) -> Dict[int, int]:
    """{block: its immediate dominator} for the blocks reachable from block 0 (the entry, its own), by Cooper,
    Harvey and Kennedy's iteration over reverse postorder."""
    postorder, seen, stack = [], {0}, [(0, iter(successors[0]))]
    while stack:
        node, children = stack[-1]
        child = next(children, None)
        if child is None:
            postorder.append(node)
            stack.pop()
        elif child not in seen:
            seen.add(child)
            stack.append((child, iter(successors[child])))
    rpo = postorder[::-1]
    rank = {b: i for i, b in enumerate(rpo)}
    predecessors: Dict[int, List[int]] = {b: [] for b in rpo}
    for b in rpo:
        for s in successors[b]:
            predecessors[s].append(b)
    idom = {0: 0}

    def common(a: int, b: int) -> int:
        while a != b:
            while rank[a] > rank[b]:
                a = idom[a]
            while rank[b] > rank[a]:
                b = idom[b]
        return a

    changed = True
    while changed:
        changed = False
        for b in rpo[1:]:
            done = [p for p in predecessors[b] if p in idom]
            new = done[0]
            for p in done[1:]:
                new = common(p, new)
            if idom.get(b) != new:
                idom[b], changed = new, True
    return idom


def _dominates(idom: Dict[int, int], a: int, b: int) -> bool:
    """Whether every path from the entry to block b passes block a."""
    while b != a and b != 0:
        b = idom[b]
    return b == a


def _natural_loops(instrs: List[Instr]) -> List[List[Instr]]:
    """Each loop's instructions in address order: a back edge u -> h (h dominates u) makes the loop of header h,
    h plus every block that reaches u without passing h; back edges to one header make one loop."""
    blocks, successors = _basic_blocks(instrs)
    idom = _immediate_dominators(successors)
    predecessors: Dict[int, List[int]] = {b: [] for b in idom}
    for b in idom:
        for s in successors[b]:
            predecessors[s].append(b)
    loops: Dict[int, Set[int]] = {}
    for u in idom:
        for h in successors[u]:
            if _dominates(idom, h, u):
                body = loops.setdefault(h, {h})
                stack = [u]
                while stack:
                    b = stack.pop()
                    if b not in body:
                        body.add(b)
                        stack.extend(predecessors[b])
    return [[ins for b in sorted(body) for ins in blocks[b]] for _, body in sorted(loops.items())]


def _innermost_loops_with_loads(instrs: List[Instr]) -> List[List[Instr]]:
    """The loops that hold a global load and contain no other loop that does."""
    with_loads = [loop for loop in _natural_loops(instrs) if any(map(_is_global_load, loop))]
    sets = [{ins.address for ins in loop} for loop in with_loads]
    return [loop for loop, inner in zip(with_loads, sets) if not any(other < inner for other in sets)]


def _walk(body: List[Instr]) -> dict:
    """Scoreboard walk of `body` as straight-line code: loads, bytes per lane, batches (see load_batches)."""
    in_flight: List[Set[int]] = []  # destination registers of the loads not yet waited for
    loads = nbytes = waits = 0
    for ins in body:
        touched = _registers(ins)
        if any(regs & touched for regs in in_flight):
            # The warp stalls here for one load; the loads issued before this point arrive in the same wait.
            waits += 1
            in_flight.clear()
        if _is_global_load(ins):
            width = access_bytes(ins.opcode)
            loads += 1
            nbytes += width
            in_flight.append(_span(_split_operands(ins.operands)[0], width))
    batches = waits + (1 if in_flight else 0)
    return {"loads": loads, "bytes_per_lane": nbytes, "batches": max(batches, 1) if loads else 0}


def load_batches(instrs: List[Instr]) -> dict:
    """The memory-level parallelism of a kernel's hot loops, read from its SASS: how many bytes each lane has in
    flight when it waits for global memory.

    The loops: in the function's control flow graph, a jump to a block that dominates the jump (every path from
    the entry to it passes that block) closes a natural loop: that block and the blocks that lead back to the jump,
    wherever the compiler placed them. In SASS such a jump is a backward BRA; the test of dominance matters because
    not every backward BRA closes a loop: compilers place rare paths out of line (e.g. the divergent-warp fallback
    of a shuffle, entered by BRA.DIV) and jump back from there. The chosen loops are the innermost ones that hold a
    global load (LDG*), or, when no loop holds one, the whole function.

    Each chosen loop is walked once in address order as straight-line code: an LDG of w bytes into Rn puts
    Rn .. Rn+w/4-1 (Rn alone for 1 and 2 bytes) in flight; the first later instruction that reads or writes one of
    them waits for it, and since loads issued back to back arrive together, that wait completes every load in
    flight: one wait. A loop's batches = its waits + 1 if loads are still in flight at its end (at least 1 when it
    has loads).

    Returns {"loops": [{"start", "end" (its first and last instruction's address), "loads", "bytes_per_lane",
    "batches"}], "bytes_per_lane", "batches" (both summed over the chosen loops), "bytes_in_flight_per_warp":
    32 * bytes_per_lane / batches (0.0 without loads)}.

    A heuristic: it ignores the branches inside a loop body (both sides of an if are walked as if both ran, each
    once; a predicated-off load counts), registers whose width the text does not show, and the hardware's own
    limits on outstanding loads; it reads the compiler's schedule, not the time the loads take.
    """
    loops = _innermost_loops_with_loads(instrs)
    if not loops and any(map(_is_global_load, instrs)):
        loops = [instrs]
    rows = [{"start": loop[0].address, "end": loop[-1].address, **_walk(loop)} for loop in loops]
    nbytes = sum(r["bytes_per_lane"] for r in rows)
    batches = sum(r["batches"] for r in rows)
    return {
        "loops": rows,
        "bytes_per_lane": nbytes,
        "batches": batches,
        "bytes_in_flight_per_warp": 32 * nbytes / batches if batches else 0.0,
    }


# ---------------------------------------------------------------------------------------------------------------
# Everything per kernel


def kernel_facts(binary: Optional[str] = None, cuobjdump: Optional[str] = None, arch: Optional[str] = "sm_90") -> dict:
    """{kernel_key: facts} for every kernel of `binary` (default: the built extension) in the cubins for `arch`
    (default sm_90, the H200's; None: all, which fails when a kernel is built for several): resource_usage's
    dict plus "widths" (count_wide_loads) and "load_batches" (load_batches) of its SASS.

    Raises ValueError when two kernels share a key (kernel_key would have to tell them apart) or a kernel has no
    SASS.
    """
    binary = binary or extension_binary()
    cuobjdump = cuobjdump or find_cuobjdump()
    code = sass(binary, cuobjdump, arch)
    facts = {}
    for kernel in resource_usage(binary, cuobjdump, arch):
        key = kernel["key"]
        if key in facts:
            raise ValueError(
                f"kernels {facts[key]['demangled']!r} and {kernel['demangled']!r} share the key "
                f"{key!r}; expected one kernel per key"
            )
        if kernel["mangled"] not in code:
            raise ValueError(
                f"no SASS for {kernel['demangled']!r} in {binary}; expected every kernel listed by "
                "--dump-resource-usage to be in the -sass listing"
            )
        instrs = code[kernel["mangled"]]
        facts[key] = {**kernel, "widths": count_wide_loads(instrs), "load_batches": load_batches(instrs)}
    return facts
