"""tests/gpu/sanitize_kernels.py, the compute-sanitizer driver of the GPU check, stays runnable: its dry run on the
CPU (the same checks against the CPU ops) passes. On a GPU the script itself is run by benchmarks/gpu_check.sh."""

import os
import subprocess
import sys

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sanitize_kernels.py")


def test_dry_run_on_the_cpu_passes():
    done = subprocess.run([sys.executable, SCRIPT, "--device", "cpu", "--quick"], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "sanitize_kernels: PASSED" in done.stdout
