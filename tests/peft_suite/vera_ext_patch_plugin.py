"""pytest plugin: run PEFT's own test-suite with vera_ext.patch_peft() in force, and prove the patch was used.

Loaded with ``-p vera_ext_patch_plugin`` (this folder on PYTHONPATH). It patches before any test runs, counts
every call into vera_ext's ops made by the patched PEFT layers, and fails the session if the patch was removed
or never exercised.
"""

from collections import Counter

import vera_ext.peft_patch as peft_patch
from vera_ext import ops

calls = Counter()


class _CountingOps:
    def __getattr__(self, name):
        fn = getattr(ops, name)

        def counted(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)

        return counted


def pytest_configure(config):
    peft_patch.patch_peft()
    peft_patch.ops = _CountingOps()


def _still_patched():
    from peft.tuners.vera.layer import Linear

    return Linear.forward is peft_patch._forward and Linear.merge is peft_patch._merge


def pytest_terminal_summary(terminalreporter):
    terminalreporter.write_line(f"vera_ext patch in force: {_still_patched()}; calls into vera_ext ops: {dict(calls)}")


def pytest_sessionfinish(session, exitstatus):
    if session.testscollected and (not _still_patched() or calls["vera_forward"] == 0):
        session.exitstatus = 1
