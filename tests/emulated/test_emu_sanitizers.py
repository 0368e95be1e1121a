"""The emulated kernels under AddressSanitizer + UndefinedBehaviorSanitizer and under ThreadSanitizer, through
run_sanitizers.sh (a standalone program, tests/emulated/sanitize: no torch, no python). The clean run must produce
no report; each planted fault of tests/emulated/kernels/planted_faults.cu must be reported, naming the faulty kernel.
About a minute the first time (two builds), some 20 s when the builds are cached."""

import os
import subprocess

import pytest

import emu_build

pytestmark = pytest.mark.emulated

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def sanitizers():
    """Runs the whole script once; returns (exit status, its output, a reader of the per-run logs)."""
    proc = subprocess.run(
        ["bash", os.path.join(HERE, "run_sanitizers.sh"), "all"], capture_output=True, text=True, timeout=1500
    )

    def log(cfg, mode):
        with open(os.path.join(emu_build.build_root(), f"sanitize-{cfg}", f"{mode}.log"), encoding="utf-8") as f:
            return f.read()

    return proc.returncode, proc.stdout + proc.stderr, log


def verdict(output, cfg, mode):
    lines = [line for line in output.splitlines() if line.split(":")[0].split(None, 1)[-1] == f"{cfg} {mode}"]
    assert len(lines) == 1, f"no verdict for {cfg} {mode} in:\n{output}"
    return lines[0]


@pytest.mark.parametrize("cfg", ["asan", "tsan"])
def test_kernels_run_clean_under_sanitizer(sanitizers, cfg):
    _, output, log = sanitizers
    assert verdict(output, cfg, "clean").startswith("PASS"), output
    text = log(cfg, "clean")
    assert "all clean checks passed" in text
    assert "Sanitizer" not in text and "runtime error" not in text, text[-4000:]


def test_asan_catches_planted_out_of_bounds_write(sanitizers):
    _, output, log = sanitizers
    assert verdict(output, "asan", "oob").startswith("PASS"), output
    text = log("asan", "oob")
    assert "ERROR: AddressSanitizer: heap-buffer-overflow" in text and "planted_oob_write_kernel" in text


def test_asan_catches_planted_shared_memory_overflow(sanitizers):
    _, output, log = sanitizers
    assert verdict(output, "asan", "shared-oob").startswith("PASS"), output
    text = log("asan", "shared-oob")
    assert "out of bounds" in text or "global-buffer-overflow" in text


def test_tsan_catches_planted_missing_syncthreads(sanitizers):
    _, output, log = sanitizers
    assert verdict(output, "tsan", "race").startswith("PASS"), output
    text = log("tsan", "race")
    assert "WARNING: ThreadSanitizer: data race" in text and "planted_missing_sync_kernel" in text


def test_script_succeeds(sanitizers):
    status, output, _ = sanitizers
    assert status == 0, output
