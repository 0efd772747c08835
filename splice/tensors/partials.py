"""Hidden partial output directories, and the removal of those whose owner died.

Every output is built in `.<out>.splice-partial-<pid>-<hex>` beside it. Its owner keeps the lock file
`.splice-owner` inside it locked (`fcntl.flock`) while it works; the kernel drops that lock when the process
ends, however it ends (SIGKILL included). So a partial whose lock can be taken belongs to no live process,
and the next run into the same output removes it. A reused pid cannot make a dead owner look alive, nor a
live one dead: the lock, not the pid, decides. Only in the instants where the lock file does not exist (just
created, or just before publishing) does the pid in the name decide, and a live pid keeps the partial.
Partials named otherwise (by an older splice) are left alone.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

PARTIAL = ".splice-partial-"
OWNER = ".splice-owner"
_OWNED = re.compile(r"(\d+)-[0-9a-f]{8}")


def partial_prefix(out: Path) -> str:
    return f".{out.name}{PARTIAL}"


def process_alive(pid: int) -> bool:
    """Is a process with this id running on this machine?"""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


@contextlib.contextmanager
def _dead_owner(partial: Path) -> Iterator[bool]:
    """True (holding the dead owner's lock until the block ends) when no live process owns `partial`."""
    match = _OWNED.fullmatch(partial.name[partial.name.index(PARTIAL) + len(PARTIAL) :])
    if match is None:
        yield False
        return
    try:
        fd = os.open(partial / OWNER, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        yield not process_alive(int(match.group(1)))
        return
    except OSError:
        yield False
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # held: its owner is alive
        os.close(fd)
        yield False
        return
    try:
        yield True
    finally:
        os.close(fd)


def remove_stale_partials(out: Path) -> list[Path]:
    """Remove the partials (directories, or files of a single-file output) of `out` that no live process owns;
    returns them."""
    prefix, removed = partial_prefix(out), []
    with contextlib.suppress(FileNotFoundError):
        for entry in out.parent.iterdir():
            if not entry.name.startswith(prefix) or entry.is_symlink():
                continue
            if entry.is_file():  # a single file's partial (write_output_file): only its pid says whose it is
                match = _OWNED.fullmatch(entry.name[len(prefix) :])
                if match and not process_alive(int(match.group(1))):
                    entry.unlink(missing_ok=True)
                    removed.append(entry)
                continue
            if not entry.is_dir():
                continue
            with _dead_owner(entry) as dead:
                if dead:
                    shutil.rmtree(entry, ignore_errors=True)
                    removed.append(entry)
                    log.info("removed %s, the partial output of a process that no longer runs", entry)
    return removed


class OwnedPartial:
    """A new partial directory for `out`, locked by this process until `release` (or `discard`).
    `adopt`: an existing directory (the output being replaced) becomes the partial instead, so that a run
    killed while deleting it leaves it to the next run's cleaning too."""

    def __init__(self, out: Path, adopt: Path | None = None):
        self.path = out.parent / f"{partial_prefix(out)}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        home = adopt or self.path
        if adopt is None:
            self.path.mkdir()
        # locked under another name, then renamed: a cleaner never sees an owner file that is not yet locked
        fresh = home / f"{OWNER}.new"
        self._fd: int | None = os.open(fresh, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        os.write(self._fd, f"{os.getpid()}\n".encode())
        os.rename(fresh, home / OWNER)
        if adopt is not None:
            try:
                adopt.rename(self.path)
            except BaseException:
                self.path = adopt
                self.restore(adopt)
                raise

    def restore(self, out: Path) -> None:
        """Put an adopted directory back where it was, as it was."""
        self.release()
        if self.path != out:
            self.path.rename(out)
        self.close()

    def release(self) -> None:
        """Take the lock file out (the directory becomes the output); the live pid keeps it ours meanwhile.
        Call `close` once the directory has been renamed into place."""
        (self.path / OWNER).unlink(missing_ok=True)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        self.close()
