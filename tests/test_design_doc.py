"""docs/DESIGN.md keeps up with the code: every op of csrc/ops.cpp's TORCH_LIBRARY block and every __global__ kernel
of csrc/ is in its op table (§3.1), every test-only kernel is in its §3.3 table, every path of its layout (§1.1)
exists, and every section the code cites as "docs/DESIGN.md §N" exists. Reads text only: no build, no imports."""

import os
import re

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DESIGN = os.path.join(REPO, "docs", "DESIGN.md")

# The headings that open the checked parts of DESIGN.md; each part ends at the next heading of any level.
OP_TABLE_HEADING = "### 3.1 Op table"
TEST_KERNELS_HEADING = "### 3.3 Test-only kernels"
LAYOUT_HEADING = "### 1.1 Layout"

SOURCE_EXTENSIONS = (".cu", ".cuh", ".h", ".hpp", ".cpp", ".inl")
# `__global__ void name(`, also with a template head before it or __launch_bounds__(...) between.
GLOBAL_KERNEL = re.compile(
    r"__global__\s+(?:static\s+)?void\s+(?:__launch_bounds__\s*\([^)]*\)\s*)?([A-Za-z_]\w*)\s*\("
)
OP_DEF = re.compile(r'\bm\.def\(\s*"([A-Za-z_]\w*)\(')
CITATION = re.compile(r"(\S*)DESIGN\.md\s*§\s*(\d+)")
SECTION = re.compile(r"^## (\d+)\. ", re.M)


def _read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def _strip_comments(text):
    """C/C++ text without its comments (// to the end of the line, /* ... */)."""
    return re.sub(r"//[^\n]*|/\*.*?\*/", " ", text, flags=re.S)


def _section(doc, heading):
    """The text from the line that starts with `heading` to the next heading line (any level)."""
    lines = doc.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith(heading)]
    assert len(starts) == 1, f"docs/DESIGN.md must have exactly one heading starting with {heading!r}"
    body = []
    for line in lines[starts[0] + 1 :]:
        if line.startswith("#"):
            break
        body.append(line)
    return "\n".join(body)


def _mentions(text, name):
    return re.search(rf"(?<![\w]){re.escape(name)}(?![\w])", text) is not None


def _kernels_under(folder):
    found = set()
    for root, _, files in os.walk(os.path.join(REPO, folder)):
        for f in files:
            if f.endswith(SOURCE_EXTENSIONS):
                found.update(GLOBAL_KERNEL.findall(_strip_comments(_read(os.path.join(root, f)))))
    return found


@pytest.fixture(scope="module")
def doc():
    return _read(DESIGN)


def library_ops():
    text = _strip_comments(_read(os.path.join(REPO, "csrc", "ops.cpp")))
    match = re.search(r"TORCH_LIBRARY\(\s*vera_ext\s*,\s*\w+\s*\)\s*\{(.*?)\n\}", text, re.S)
    assert match, "csrc/ops.cpp: no TORCH_LIBRARY(vera_ext, m) { ... } block found"
    return OP_DEF.findall(match.group(1))


def test_the_scans_find_the_known_ops_and_kernels():
    # Guards the parsers themselves: a scan that finds nothing would pass every test below.
    assert {"vera_forward", "vera_linear_forward", "vera_backward", "vera_delta_weight", "vera_merge_"} <= set(
        library_ops()
    )
    assert {"decode_u_kernel", "merge_kernel", "col_dot_finish_kernel"} <= _kernels_under("csrc")
    assert {"planted_oob_write_kernel", "warp_ops_kernel"} <= _kernels_under(
        os.path.join("tests", "emulated", "kernels")
    )


def test_every_op_is_in_the_op_table(doc):
    table = _section(doc, OP_TABLE_HEADING)
    missing = [op for op in library_ops() if not _mentions(table, op)]
    assert not missing, f"ops of csrc/ops.cpp missing from docs/DESIGN.md {OP_TABLE_HEADING!r}: {missing}"


def test_every_kernel_is_in_the_op_table(doc):
    table = _section(doc, OP_TABLE_HEADING)
    missing = sorted(k for k in _kernels_under("csrc") if not _mentions(table, k))
    assert not missing, f"__global__ kernels of csrc/ missing from docs/DESIGN.md {OP_TABLE_HEADING!r}: {missing}"


def test_every_test_kernel_is_in_its_table(doc):
    table = _section(doc, TEST_KERNELS_HEADING)
    kernels = _kernels_under(os.path.join("tests", "emulated", "kernels"))
    missing = sorted(k for k in kernels if not _mentions(table, k))
    assert not missing, f"test-only kernels missing from docs/DESIGN.md {TEST_KERNELS_HEADING!r}: {missing}"


def test_every_layout_path_exists(doc):
    block = re.search(r"```[^\n]*\n(.*?)```", _section(doc, LAYOUT_HEADING), re.S)
    assert block, f"docs/DESIGN.md {LAYOUT_HEADING!r} must hold the layout as a fenced block"
    paths = [line.split()[0] for line in block.group(1).splitlines() if line.strip()]
    assert paths, "the layout block names no path"
    missing = [p for p in paths if not os.path.exists(os.path.join(REPO, p.rstrip("/")))]
    assert not missing, f"paths in docs/DESIGN.md's layout that do not exist: {missing}"
    not_folders = [p for p in paths if p.endswith("/") and not os.path.isdir(os.path.join(REPO, p))]
    assert not not_folders, f"layout entries ending in / that are not folders: {not_folders}"


def test_cited_sections_exist(doc):
    sections = set(SECTION.findall(doc))
    bad = []
    for folder in ("csrc", "vera_ext", "tests", "benchmarks"):
        for root, _, files in os.walk(os.path.join(REPO, folder)):
            for f in files:
                path = os.path.join(root, f)
                if not f.endswith(SOURCE_EXTENSIONS + (".py", ".sh")) or path == os.path.abspath(__file__):
                    continue
                for prefix, number in CITATION.findall(_read(path)):
                    where = os.path.relpath(path, REPO)
                    if not prefix.endswith("docs/"):
                        bad.append(f"{where}: cite docs/DESIGN.md, not {prefix}DESIGN.md")
                    if number not in sections:
                        bad.append(f"{where}: §{number} is not a section of docs/DESIGN.md")
    assert not bad, bad
