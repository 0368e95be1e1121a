"""Files replaced without loss: each new file is written beside its target (a temporary file in the same
directory, fsynced), and only when every file of a save is written are they renamed over their targets
(os.replace, atomic on POSIX). A failed write or rename leaves the previous files as they were and no temporary
file behind. Used by the adapter checkpoints (vera_ext.checkpoint, VeraConfig.save_pretrained)."""

from __future__ import annotations

import os
import secrets
import shutil
import stat
import warnings
from typing import Optional

__all__ = ["StagedFiles", "missing_dirs"]


class StagedFiles:
    """Files written to temporary files beside their targets, then renamed into place together by ``commit``."""

    def __init__(self) -> None:
        self._staged: list[tuple[str, str]] = []  # (temporary file, target)

    def write(self, target: str, write) -> None:
        """``write(path)`` writes the content of ``target`` to the path it is given (a new temporary file)."""
        tmp = _new_temp_path(target, create=True)
        self._staged.append((tmp, target))
        # The mode: a replaced file keeps its own; a new one gets what open() gives (0o666 less the umask, as the
        # temporary file was made), also where ``write`` replaces the file (safetensors >= 0.8 writes 0o600 files).
        try:
            mode = stat.S_IMODE(os.stat(target).st_mode)
        except OSError:
            mode = stat.S_IMODE(os.stat(tmp).st_mode)
        write(tmp)
        if stat.S_IMODE(os.stat(tmp).st_mode) != mode:
            os.chmod(tmp, mode)
        _fsync(tmp)

    def write_text(self, target: str, text: str) -> None:
        def write(path: str) -> None:
            with open(path, "w") as f:
                f.write(text)

        self.write(target, write)

    def commit(self) -> None:
        """Rename every temporary file over its target; if one rename fails, undo those done and re-raise."""
        backups: list[tuple[Optional[str], str]] = []  # (the target's previous file kept aside, or None; target)
        kept: set[str] = set()  # backups that could not be put back: the only copy of a previous file, not removed
        try:
            for _, target in self._staged:
                backups.append((_keep_aside(target) if os.path.lexists(target) else None, target))
            done = 0
            try:
                for tmp, target in self._staged:
                    os.replace(tmp, target)
                    done += 1
            except BaseException:
                for backup, target in reversed(backups[:done]):
                    if not _restore(backup, target):
                        kept.add(backup)
                raise
            targets = [target for _, target in self._staged]
            self._staged = []
            for directory in dict.fromkeys(os.path.dirname(target) for target in targets):
                _fsync(directory, directory=True)
        finally:
            for backup, _ in backups:
                if backup is not None and backup not in kept:
                    _remove(backup)

    def discard(self) -> None:
        """Remove the temporary files not renamed into place."""
        for tmp, _ in self._staged:
            _remove(tmp)
        self._staged = []


def _new_temp_path(target: str, create: bool) -> str:
    """A free name beside ``target`` (same directory, so os.replace is a rename); with ``create``, an empty file made
    with the mode a new file gets (0o666 less the umask)."""
    directory, base = os.path.split(target)
    for _ in range(100):
        path = os.path.join(directory, f".{base}.{secrets.token_hex(6)}.tmp")
        if not create:
            if not os.path.lexists(path):
                return path
            continue
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666))
        except FileExistsError:
            continue
        return path
    raise FileExistsError(f"no free temporary file name beside {target!r}")


def _keep_aside(target: str) -> str:
    """A second name for the file at ``target`` (a hard link, else a copy), so that a failed commit can put it back."""
    backup = _new_temp_path(target, create=False)
    try:
        os.link(target, backup, follow_symlinks=False)
    except (OSError, NotImplementedError):
        if os.path.lexists(backup):
            _remove(backup)
        shutil.copy2(target, backup, follow_symlinks=False)
    return backup


def _restore(backup: Optional[str], target: str) -> bool:
    """Put ``target`` back as it was before the commit (``backup`` None: it did not exist); False if that failed."""
    try:
        if backup is None:
            _remove(target)
        else:
            os.replace(backup, target)
        return True
    except OSError as err:
        kept = "" if backup is None else f"; its previous content is kept in {backup!r}"
        warnings.warn(f"save_pretrained failed and could not undo its change to {target!r} ({err}){kept}")
        return False


def _fsync(path: str, directory: bool = False) -> None:
    """Flush ``path`` to disk. Directories: best effort (not every OS or file system lets one open or sync them)."""
    try:
        fd = os.open(path, os.O_RDONLY if directory else os.O_RDWR | getattr(os, "O_BINARY", 0))
    except OSError:
        if directory:
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not directory:
            raise
    finally:
        os.close(fd)


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def abandon(staged: StagedFiles, created: list[str]) -> None:
    """Undo a save that failed before its commit: drop ``staged``'s temporary files and remove the directories in
    ``created`` (missing_dirs' lists, made for the save) that are still empty, innermost first."""
    staged.discard()
    for made in reversed(created):
        try:
            os.rmdir(made)  # only if still empty
        except OSError:
            pass


def missing_dirs(path: str) -> list[str]:
    """The directories ``os.makedirs(path)`` would create, outermost first."""
    missing = []
    path = os.path.abspath(path)
    while not os.path.exists(path):
        missing.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return missing[::-1]
