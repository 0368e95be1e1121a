"""csrc/sources.py is the one list of what is compiled: every C++/CUDA source under csrc/ and tests/emulated/ is in
it (or is a header), every listed file exists, and csrc/ holds only what the extension compiles."""

import os
import runpy

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = runpy.run_path(os.path.join(REPO, "csrc", "sources.py"))
COMPILED = (".cpp", ".cu")


def files_under(folder):
    out = []
    for root, _, files in os.walk(os.path.join(REPO, folder)):
        out += [os.path.relpath(os.path.join(root, f), REPO) for f in files if f.endswith(COMPILED)]
    return sorted(out)


def test_every_listed_file_exists():
    for group, files in SOURCES["GROUPS"].items():
        for f in files:
            assert os.path.isfile(os.path.join(REPO, f)), f"csrc/sources.py {group}: {f} does not exist"


def test_every_source_is_listed():
    listed = {f for files in SOURCES["GROUPS"].values() for f in files}
    unlisted = [f for f in files_under("csrc") + files_under(os.path.join("tests", "emulated")) if f not in listed]
    assert not unlisted, f"sources no list in csrc/sources.py names: {unlisted}"


def test_csrc_holds_only_the_extension():
    extension = set(SOURCES["EXTENSION"]) | set(SOURCES["EXTENSION_CUDA"])
    assert set(files_under("csrc")) == extension
