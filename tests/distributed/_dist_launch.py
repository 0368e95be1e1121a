"""Run a worker script as a 2-rank gloo job on 127.0.0.1 and collect what each rank saved.

Each rank is its own ``python <script> <rank> <out_dir>`` process (no fork of the pytest process: torch and gloo
start clean). A rank that fails ends the job at once (the others would wait in a collective), and the whole job
is killed after ``timeout`` seconds, so a hung rank fails the test instead of hanging CI.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

WORLD_SIZE = 2
_TESTS = Path(__file__).resolve().parents[1]
_ROOT = _TESTS.parent


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(script: str, out_dir: Path, timeout: float = 120.0) -> list[dict]:
    """Run ``script`` (a file next to this one) on WORLD_SIZE ranks; return each rank's saved dict, by rank.
    Raises AssertionError with every rank's log when a rank fails or the job outlives ``timeout``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
        WORLD_SIZE=str(WORLD_SIZE),
        OMP_NUM_THREADS="1",  # two ranks share a small machine; threads would only contend
        PYTHONPATH=os.pathsep.join([str(_ROOT), str(_TESTS), str(Path(__file__).parent), env.get("PYTHONPATH", "")]),
    )
    logs = [out_dir / f"rank{rank}.log" for rank in range(WORLD_SIZE)]
    procs = []
    for rank in range(WORLD_SIZE):
        with open(logs[rank], "w") as log:  # a file, not a pipe: a chatty rank must not block on a full pipe
            procs.append(
                subprocess.Popen(
                    [sys.executable, str(Path(__file__).parent / script), str(rank), str(out_dir)],
                    env=env,
                    cwd=str(_ROOT),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
    deadline = time.monotonic() + timeout
    failure = None
    while any(p.poll() is None for p in procs):
        if any(p.returncode not in (None, 0) for p in procs):
            failure = "a rank failed"
            break
        if time.monotonic() > deadline:
            failure = f"the job did not finish within {timeout:.0f} s"
            break
        time.sleep(0.05)
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()
    codes = [p.returncode for p in procs]
    if failure is None and any(codes):
        failure = "a rank failed"
    if failure:
        text = "\n".join(
            f"--- rank {r} (exit {codes[r]}) ---\n{logs[r].read_text()[-4000:]}" for r in range(WORLD_SIZE)
        )
        raise AssertionError(f"{script}: {failure}\n{text}")
    return [torch.load(out_dir / f"rank{rank}.pt") for rank in range(WORLD_SIZE)]


def init_rank(rank: int):
    """In a worker: join the gloo group the launcher set up (collectives time out instead of hanging)."""
    from datetime import timedelta

    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=int(os.environ["WORLD_SIZE"]), timeout=timedelta(seconds=60))
    torch.manual_seed(0)
