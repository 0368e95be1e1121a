"""Packaging: the single-sourced version, the import-time torch check (vera_ext/build_check.py) that refuses a _C
compiled against another torch before loading it, `python -m vera_ext info`, and what the sdist ships. Fast: the
only build is the sdist (no compiling). CI builds the wheel and installs it into a fresh venv (.ci/run)."""

import importlib.metadata
import json
import os
import subprocess
import sys
import tarfile
import textwrap

import pytest

import vera_ext
from vera_ext import build_check, info

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REBUILD_HINT = "pip install --no-build-isolation ."


def test_version_is_single_sourced():
    assert vera_ext.__version__ == importlib.metadata.version("vera_ext")
    assert vera_ext.build_info()["version"] == vera_ext.__version__, "_C was compiled from another version: rebuild"
    tomllib = pytest.importorskip("tomllib")
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        pyproject = tomllib.load(f)
    assert "version" not in pyproject["project"] and "version" in pyproject["project"]["dynamic"]
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "vera_ext.__version__"}


def test_build_info_and_build_config_agree():
    """The two records of one build: the file read before _C loads, and the macros compiled into _C."""
    config = build_check.read_build_config()
    compiled = vera_ext.build_info()
    for key in ("torch_version", "torch_cuda", "with_cuda", "cuda_archs", "debug"):
        assert compiled[key] == config[key], key
    assert config["vera_ext_version"] == vera_ext.__version__
    assert compiled["torch_headers_version"] == config["torch_version"].split("+")[0]


CUDA130 = "CUDA 13.0"


@pytest.mark.parametrize(
    "built, built_variant, running, running_variant",
    [
        ("2.14.1+cu130", CUDA130, "2.14.1+cu130", CUDA130),
        ("2.14.1+cu130", CUDA130, "2.14.1", CUDA130),  # PyPI's default wheel has no local label: the same build
        ("2.14.1", "CPU-only", "2.14.1", "CPU-only"),
    ],
)
def test_same_torch_build_is_accepted(built, built_variant, running, running_variant):
    assert build_check.torch_mismatch(built, built_variant, running, running_variant) is None


@pytest.mark.parametrize(
    "built, built_variant, running, running_variant",
    [
        ("2.14.1+cu130", CUDA130, "2.13.0+cpu", "CPU-only"),
        ("2.14.1+cu130", CUDA130, "2.14.0+cu130", CUDA130),  # patch
        ("2.14.1+cu130", CUDA130, "2.15.1+cu130", CUDA130),  # minor
        ("2.14.1+cu130", CUDA130, "3.14.1+cu130", CUDA130),  # major
        ("2.14.1+cu130", CUDA130, "2.14.1+cpu", "CPU-only"),  # CUDA build vs CPU build of one release
        ("2.14.1", CUDA130, "2.14.1", "CPU-only"),  # the same, told by the variant when neither has a label
        ("2.14.1+cu128", "CUDA 12.8", "2.14.1+cu130", CUDA130),  # another CUDA
        ("2.15.0.dev20260101+cu130", CUDA130, "2.15.0.dev20260102+cu130", CUDA130),  # nightlies of two days
        ("2.14.0a0+git1a2b3c", "CPU-only", "2.14.0a0+git4d5e6f", "CPU-only"),  # source builds of two commits
    ],
)
def test_other_torch_is_refused_naming_both(built, built_variant, running, running_variant):
    reason = build_check.torch_mismatch(built, built_variant, running, running_variant)
    assert reason is not None
    assert f"torch {built} ({built_variant})" in reason and f"torch {running} ({running_variant})" in reason
    assert "Rebuild" in reason and REBUILD_HINT in reason


def test_variant_names():
    assert build_check.torch_variant("13.0") == CUDA130
    assert build_check.torch_variant(None, "6.2") == "ROCm 6.2"
    assert build_check.torch_variant(None, None) == "CPU-only"


def test_check_build_refuses_a_config_for_another_torch(monkeypatch):
    fake = {**build_check.read_build_config(), "torch_version": "2.13.0+cpu", "torch_cuda": None}
    monkeypatch.setattr(build_check, "read_build_config", lambda: fake)
    with pytest.raises(ImportError, match=r"compiled against torch 2\.13\.0\+cpu \(CPU-only\)"):
        build_check.check_build()


# Run at interpreter start (sitecustomize): a stand-in vera_ext/_build_config.py that says _C was compiled against
# torch 2.13.0+cpu, so the real file and _C are left alone.
FAKE_CONFIG = """
import sys, types
config = types.ModuleType("vera_ext._build_config")
config.BUILD_CONFIG = {"vera_ext_version": "0", "torch_version": "2.13.0+cpu", "torch_cuda": None, "torch_hip": None,
                       "with_cuda": False, "cuda_archs": None, "cuda_toolkit": None, "debug": False}
sys.modules["vera_ext._build_config"] = config
"""


def run_with_fake_config(tmp_path, args):
    (tmp_path / "sitecustomize.py").write_text(FAKE_CONFIG)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.path.join(REPO, "tests")])}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)


def test_import_under_another_torch_raises_before_loading_C(tmp_path):
    script = textwrap.dedent("""
        import sys, torch
        try:
            import vera_ext
        except ImportError as err:
            print("IMPORT ERROR:", err)
        print("C LOADED:", "vera_ext._C" in sys.modules)
    """)
    proc = run_with_fake_config(tmp_path, ["-c", script])
    assert proc.returncode == 0, proc.stderr
    import torch

    assert (
        f"IMPORT ERROR: vera_ext._C was compiled against torch 2.13.0+cpu (CPU-only) but torch {torch.__version__}"
        in proc.stdout
    ), proc.stdout
    assert REBUILD_HINT in proc.stdout
    assert "C LOADED: False" in proc.stdout


def test_info_prints_the_fields(capsys):
    assert info.main([]) == 0
    out = capsys.readouterr().out
    import torch

    for field in (
        "vera_ext:",
        "built with torch:",
        "running torch:",
        "torch check:",
        "CUDA part:",
        "compiled archs:",
        "CUDA runtime compiled in:",
        "build_info():",
        "GPU visible:",
    ):
        assert field in out, field
    assert f"running torch: {torch.__version__}" in " ".join(out.split())
    assert "torch check: ok" in " ".join(out.split())


def test_info_json():
    proc = subprocess.run(
        [sys.executable, "-m", "vera_ext.info", "--json"], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["build_info"]["with_cuda"] == report["build_config"]["with_cuda"]
    assert report["gpu"].startswith("yes" if __import__("torch").cuda.is_available() else "no")


@pytest.mark.parametrize("command", [["-m", "vera_ext.info"], ["-m", "vera_ext", "info"]])
def test_info_works_when_C_cannot_load(tmp_path, command):
    proc = run_with_fake_config(tmp_path, command)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert (
        "extension:" in proc.stdout and "not loaded: vera_ext._C was compiled against torch 2.13.0+cpu" in proc.stdout
    ), proc.stdout
    assert "Traceback" not in proc.stderr


def shipped_sources():
    """The files the sdist must hold: everything git tracks (or would: untracked, not ignored) in these folders."""
    folders = ["csrc", "docs", "tests", "benchmarks", "vera_ext"]
    try:
        listed = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", *folders],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: nothing to compare the sdist with")
    top = ["README.md", "requirements.txt", "requirements-test.txt", "setup.py", "pyproject.toml", "MANIFEST.in"]
    return {f for f in listed + top if os.path.isfile(os.path.join(REPO, f))}


def test_sdist_ships_sources_docs_tests_and_benchmarks(tmp_path):
    # The PEP 517 hook that `python -m build --sdist` and pip call; no compiling.
    script = f"from setuptools import build_meta; print(build_meta.build_sdist({str(tmp_path)!r}))"
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    name = proc.stdout.split()[-1]
    assert name == f"vera_ext-{vera_ext.__version__}.tar.gz"
    with tarfile.open(tmp_path / name) as tar:
        prefix = f"vera_ext-{vera_ext.__version__}/"
        shipped = {m.name[len(prefix) :] for m in tar.getmembers() if m.isfile()}
    missing = shipped_sources() - shipped
    assert not missing, f"not in the sdist: {sorted(missing)}"
    for required in ("csrc/module.cpp", "csrc/sources.py", "tests/emulated/emu_build.py", "README.md"):
        assert required in shipped
    assert any(f.startswith("docs/") for f in shipped) and any(f.startswith("benchmarks/") for f in shipped)
    stray = [f for f in shipped if f.endswith((".so", ".o", ".pyc")) or f == "vera_ext/_build_config.py"]
    assert not stray, f"build outputs in the sdist: {stray}"


def _setup_functions(*names):
    """Functions of setup.py, compiled alone (importing setup.py would run the build)."""
    import ast
    import re

    with open(os.path.join(REPO, "setup.py")) as f:
        tree = ast.parse(f.read())
    module = ast.Module(
        body=[n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in names], type_ignores=[]
    )
    namespace = {"re": re}
    exec(compile(module, "setup.py", "exec"), namespace)
    return [namespace[n] for n in names]


def test_default_archs_embed_ptx_for_the_newest_arch():
    with_ptx, describe = _setup_functions("with_ptx", "describe_archs")
    assert with_ptx("8.0;9.0") == "8.0;9.0+PTX"
    assert with_ptx("9.0;8.6") == "9.0+PTX;8.6"
    assert with_ptx("10.0") == "10.0+PTX"
    assert with_ptx("8.0+PTX;9.0") == "8.0+PTX;9.0"  # the user's own choice of PTX is kept
    assert describe("8.0;9.0+PTX") == "SASS for sm_80, sm_90; PTX for compute_90"
    assert "no +PTX" in describe("9.0")
