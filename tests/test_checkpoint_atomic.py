"""save_pretrained writes every file beside its target and renames it into place: a save that fails midway (while
writing the weights or adapter_config.json, while syncing, or in os.replace itself) raises, leaves the previous
checkpoint byte-identical and loadable (by us and by PEFT 0.21.2), and leaves no temporary file behind."""

import builtins
import errno
import os
import sys
import warnings

import pytest
import safetensors.torch
import torch

from vera_ext.config import VeraConfig
from vera_ext.model import VeraModel

from vera_models import mlp, ours, randomize_lambdas

FILES = {
    "adapter_config.json",
    "adapter_model.safetensors",
    os.path.join("other", "adapter_config.json"),
    os.path.join("other", "adapter_model.safetensors"),
}
X = torch.randn(4, 10, generator=torch.Generator().manual_seed(0))


def _model():
    """Two adapters: "default" is written into the directory, "other" into its sub-folder."""
    vm = ours(mlp(), r=8, target_modules=["lin0", "lin1"], init_weights=False)
    vm.add_adapter("other", VeraConfig(r=8, target_modules=["lin1"], init_weights=False))
    randomize_lambdas(vm)
    return vm


def _lambdas(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "vera_lambda" in n}


def _change_lambdas(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "vera_lambda" in name:
                p.mul_(-2).add_(0.5)


def _outputs(model):
    out = {}
    for name in ("default", "other"):
        model.set_adapter(name)
        with torch.no_grad():
            out[name] = model(X)
    return out


def _files(directory):
    """{relative path: bytes} of every file under ``directory`` (temporary files included)."""
    out = {}
    for root, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, directory)] = f.read()
    return out


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def _load_ours(directory):
    vm = _quiet(VeraModel.from_pretrained, mlp(), directory)
    _quiet(vm.load_adapter, directory / "other", "other")
    return vm


def _load_peft(directory):
    from peft import PeftModel

    pm = _quiet(PeftModel.from_pretrained, mlp(), directory)
    _quiet(pm.load_adapter, directory / "other", "other")
    return pm


def _assert_loads_as(directory, lambdas, outputs):
    vm = _load_ours(directory)
    got = _lambdas(vm)
    assert got.keys() == lambdas.keys()
    for name, value in lambdas.items():
        assert torch.equal(got[name], value), name
    for model in (vm, _load_peft(directory)):
        for name, expected in _outputs(model).items():
            torch.testing.assert_close(expected, outputs[name])


def _nth_call_fails(n, real, before_raising=None):
    """``real``, except that its n-th call (1-based) runs ``before_raising(*args)`` and raises 'disk full'."""
    calls = []

    def fake(*args, **kwargs):
        calls.append(args)
        if len(calls) == n:
            if before_raising is not None:
                before_raising(*args, **kwargs)
            raise OSError(errno.ENOSPC, "disk full")
        return real(*args, **kwargs)

    fake.calls = calls
    return fake


def _write_a_few_bytes(tensors, filename, *args, **kwargs):
    with open(filename, "wb") as f:
        f.write(b"\x08\x00\x00\x00\x00\x00\x00")  # what an interrupted save_file left before: 7 bytes


class _FailingFile:
    """A text file whose first write stores a few characters, then fails."""

    def __init__(self, f):
        self._f = f

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()

    def write(self, text):
        self._f.write(text[:9])
        self._f.flush()
        raise OSError(errno.ENOSPC, "disk full")

    def close(self):
        self._f.close()


def _config_write_fails_on(monkeypatch, n):
    """The n-th opening of an adapter_config.json for writing gives a file whose write fails midway."""
    real_open = builtins.open
    opened = []

    def fake_open(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        if "adapter_config.json" in os.path.basename(os.fspath(file)) and "w" in mode:
            opened.append(file)
            if len(opened) == n:
                return _FailingFile(f)
        return f

    monkeypatch.setattr(builtins, "open", fake_open)
    return opened


FAILURES = [
    "weights_default",
    "weights_other",
    "config_default",
    "config_other",
    "fsync",
    "replace_1",
    "replace_2",
    "replace_3",
    "replace_4",
]


def _inject(monkeypatch, failure):
    """Make the next save_pretrained of the two-adapter model fail at ``failure``; returns the patched callable's
    record of calls (to check the failure was hit)."""
    if failure.startswith("weights_"):
        fake = _nth_call_fails(1 if failure.endswith("default") else 2, safetensors.torch.save_file, _write_a_few_bytes)
        monkeypatch.setattr(safetensors.torch, "save_file", fake)
        return fake.calls
    if failure.startswith("config_"):
        return _config_write_fails_on(monkeypatch, 1 if failure.endswith("default") else 2)
    if failure == "fsync":  # the third file: "other"'s weights
        fake = _nth_call_fails(3, os.fsync)
        monkeypatch.setattr(os, "fsync", fake)
        return fake.calls
    # os.replace of the n-th of the four files: the renames before it have to be undone
    fake = _nth_call_fails(int(failure.split("_")[1]), os.replace)
    monkeypatch.setattr(os, "replace", fake)
    return fake.calls


@pytest.mark.parametrize("failure", FAILURES)
def test_failed_save_keeps_previous_checkpoint(failure, tmp_path, monkeypatch):
    vm = _model()
    vm.save_pretrained(tmp_path)
    before = _files(tmp_path)
    assert set(before) == FILES
    old_lambdas, old_outputs = _lambdas(vm), _outputs(vm)

    _change_lambdas(vm)
    assert not torch.equal(next(iter(_lambdas(vm).values())), next(iter(old_lambdas.values())))
    with monkeypatch.context() as m:
        calls = _inject(m, failure)
        with pytest.raises(OSError, match="disk full"):
            vm.save_pretrained(tmp_path)
        assert calls, "the injected failure was not reached"

    assert _files(tmp_path) == before  # byte-identical, and no temporary file left
    _assert_loads_as(tmp_path, old_lambdas, old_outputs)

    # and the next save, without the fault, goes through
    new_lambdas, new_outputs = _lambdas(vm), _outputs(vm)
    vm.save_pretrained(tmp_path)
    assert set(_files(tmp_path)) == FILES
    _assert_loads_as(tmp_path, new_lambdas, new_outputs)


@pytest.mark.parametrize("failure", ["weights_other", "config_other", "replace_4"])
def test_failed_first_save_leaves_nothing(failure, tmp_path, monkeypatch):
    """Into a directory that did not exist: no file of the failed save is left (and no directory it made)."""
    vm = _model()
    (tmp_path / "keep").mkdir()
    with monkeypatch.context() as m:
        _inject(m, failure)
        with pytest.raises(OSError, match="disk full"):
            vm.save_pretrained(tmp_path / "new" / "adapters")
    assert sorted(os.listdir(tmp_path)) == ["keep"]


def test_failed_save_keeps_previous_files_of_a_partial_directory(tmp_path, monkeypatch):
    """A target that did not exist before the failed save does not exist after it (the renames are undone)."""
    vm = _model()
    vm.save_pretrained(tmp_path, selected_adapters=["default"])
    before = _files(tmp_path)
    assert set(before) == {"adapter_config.json", "adapter_model.safetensors"}
    with monkeypatch.context() as m:
        _inject(m, "replace_4")
        with pytest.raises(OSError, match="disk full"):
            vm.save_pretrained(tmp_path)
    assert _files(tmp_path) == before
    assert not (tmp_path / "other").exists()


def test_successful_save_leaves_exactly_the_adapter_files(tmp_path):
    vm = _model()
    vm.save_pretrained(tmp_path)
    assert set(_files(tmp_path)) == FILES
    _assert_loads_as(tmp_path, _lambdas(vm), _outputs(vm))

    # over an existing checkpoint: replaced, same files, nothing else
    _change_lambdas(vm)
    vm.save_pretrained(tmp_path)
    assert set(_files(tmp_path)) == FILES
    _assert_loads_as(tmp_path, _lambdas(vm), _outputs(vm))


def test_successful_legacy_save_leaves_exactly_the_adapter_files(tmp_path):
    vm = _model()
    vm.save_pretrained(tmp_path, safe_serialization=False)
    assert set(_files(tmp_path)) == {f.replace(".safetensors", ".bin") for f in FILES}
    _assert_loads_as(tmp_path, _lambdas(vm), _outputs(vm))


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX permission bits")
def test_file_modes(tmp_path):
    """New files get the mode a plain open would give them (not a temporary file's 0600); replaced files keep
    theirs."""
    umask = os.umask(0o022)
    os.umask(umask)
    vm = _model()
    vm.save_pretrained(tmp_path)
    for name in FILES:
        assert os.stat(tmp_path / name).st_mode & 0o777 == 0o666 & ~umask, name
    os.chmod(tmp_path / "adapter_model.safetensors", 0o640)
    vm.save_pretrained(tmp_path)
    assert os.stat(tmp_path / "adapter_model.safetensors").st_mode & 0o777 == 0o640


def test_config_save_pretrained_failure_keeps_previous_file(tmp_path, monkeypatch):
    VeraConfig(r=8, target_modules=["lin0"]).save_pretrained(tmp_path)
    before = _files(tmp_path)
    with monkeypatch.context() as m:
        _config_write_fails_on(m, 1)
        with pytest.raises(OSError, match="disk full"):
            VeraConfig(r=16, target_modules=["lin1"]).save_pretrained(tmp_path)
    assert _files(tmp_path) == before
    assert VeraConfig.from_pretrained(tmp_path).r == 8
    VeraConfig(r=16, target_modules=["lin1"]).save_pretrained(tmp_path)
    assert set(_files(tmp_path)) == {"adapter_config.json"}
    assert VeraConfig.from_pretrained(tmp_path).r == 16
