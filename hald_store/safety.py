"""Safe writes: one writer per output, and overwrites that never destroy a good store.

* **Locks.** A writer holds an exclusive :mod:`filelock` lock on its output (a store, or a
  ``hald-train`` run directory) for as long as it writes, and records who it is (pid, host,
  command, start time) in a small owner file beside the lock, so that a second writer's error
  names the holder. The operating system drops the lock when its process dies (even with
  ``kill -9``), so a lock never goes stale; both files are removed on release. For a store ``DIR/labels.zarr`` the files are
  ``DIR/.hald-store-lock-labels.zarr`` and ``DIR/.hald-store-owner-labels.zarr`` (outside the
  store, which an overwrite replaces). Object stores (``s3://...``) get no lock: a warning says
  that concurrent writers there are not detected.
* **Links.** Lock and owner files are opened without following links (a planted link is
  refused or removed, never written through), and helper files sit beside the store's real
  location (``DIR`` with its links resolved), so two names of one store share one lock. A store
  path that is itself a symbolic link is refused for writing (pass its target): an overwrite
  would otherwise replace the link, not the store. Reading through a link is fine.
* **Overwrites** write the new store beside the old one (``DIR/.hald-store-new-labels.zarr``)
  and swap it in only once it is complete; a killed overwrite leaves the old store readable
  and continues with ``--resume``. A kill between the two renames of the swap is repaired by
  the next writer (:func:`recover`).
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import shutil
import socket
import sys
import warnings
from contextlib import contextmanager, nullcontext
from typing import ContextManager, Iterator

from .errors import LockError
from .locations import is_remote

SIBLING_PREFIX = ".hald-store-"


def sibling(path: str | os.PathLike, kind: str) -> str:
    """``DIR/.hald-store-<kind>-<name>`` for ``path = DIR/<name>``: a helper file or folder of a store
    (``DIR`` with its links resolved, so that every name of a store finds the same helpers)."""
    path = os.path.abspath(os.fspath(path))
    return os.path.join(os.path.realpath(os.path.dirname(path)), f"{SIBLING_PREFIX}{kind}-{os.path.basename(path)}")


def _holder(owner_file: str) -> str:
    try:
        with open(owner_file) as f:
            o = json.load(f)
        return f"pid {o['pid']} on host {o['host']} since {o['since']} ({o['command']})"
    except (OSError, ValueError, KeyError):
        return "another process (it has not recorded itself)"


def _open_nofollow(path: str, flags: int) -> int:
    try:
        return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise LockError(f"{path!r} is a symbolic link; hald-store never makes one there and does not write "
                            "through it (remove it)") from None
        raise


def _try_lock(lock_file: str) -> int | None:
    """A descriptor holding an exclusive ``flock`` on ``lock_file``, or None while another process holds it."""
    while True:
        fd = _open_nofollow(lock_file, os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        try:  # the last holder unlinks the file on release: a lock on an unlinked inode is no lock, retry
            if os.stat(lock_file, follow_symlinks=False).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


@contextmanager
def exclusive_lock(lock_file: str, owner_file: str, what: str) -> Iterator[None]:
    """Hold an exclusive lock on ``what`` or raise :class:`LockError` naming its holder."""
    fd = _try_lock(lock_file)
    if fd is None:
        raise LockError(f"{what} is being written by {_holder(owner_file)}; wait for it to finish or stop it "
                        f"(lock file {lock_file})")
    try:
        owner = {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv)[:300],
                 "since": datetime.datetime.now().isoformat(timespec="seconds")}
        if os.path.lexists(owner_file):  # a killed holder's, or a planted link: removed, never written through
            os.remove(owner_file)
        with os.fdopen(_open_nofollow(owner_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL), "w") as f:
            json.dump(owner, f)
        yield
    finally:
        for path in (owner_file, lock_file):  # unlinked while held: a contender on the old inode retries
            try:
                os.remove(path)
            except OSError:
                pass
        os.close(fd)


def store_lock(out: str | os.PathLike, remote: bool) -> ContextManager:
    """The lock of the store at ``out`` (a no-op, with a warning, for object stores)."""
    if remote:
        warnings.warn(f"{os.fspath(out)!r} is an object store: hald-store cannot lock it, so a second writer "
                      "(another build, convert or import of the same URL) is not detected; run one at a time",
                      stacklevel=3)
        return nullcontext()
    if os.path.islink(out):
        raise LockError(f"store {os.fspath(out)!r} is a symbolic link (to {os.path.realpath(out)!r}); writers refuse "
                        "links (an overwrite would replace the link, not the store): pass its target")
    os.makedirs(os.path.dirname(os.path.abspath(os.fspath(out))), exist_ok=True)
    return exclusive_lock(sibling(out, "lock"), sibling(out, "owner"), f"store {os.fspath(out)!r}")


def output_lock(out: str) -> ContextManager:
    """The exclusive lock of the store output ``out`` (local or remote, see :func:`store_lock`)."""
    return store_lock(out, is_remote(out))


def run_dir_lock(out_dir: str | os.PathLike) -> ContextManager:
    """The lock of a ``hald-train`` run directory (created if needed)."""
    os.makedirs(out_dir, exist_ok=True)
    return exclusive_lock(os.path.join(out_dir, ".hald-train-lock"), os.path.join(out_dir, ".hald-train-owner"),
                          f"run directory {os.fspath(out_dir)!r}")


def swap_into_place(new: str, out: str) -> None:
    """Replace ``out`` (if any) by the complete store ``new``: two renames, old copy removed last."""
    old = sibling(out, "old")
    if os.path.lexists(out):
        os.rename(out, old)
    os.rename(new, out)
    shutil.rmtree(old, ignore_errors=True)


def recover(out: str, new_is_complete: bool) -> None:
    """Repair what a killed writer of ``out`` left (call with the lock held): finish or undo an
    interrupted swap, and remove a half-made creation folder."""
    old, new = sibling(out, "old"), sibling(out, "new")
    if os.path.lexists(old):
        if not os.path.lexists(out):
            os.rename(new if new_is_complete else old, out)
        shutil.rmtree(old, ignore_errors=True)
    for tmp in (sibling(out, "tmp"), sibling(new, "tmp")):
        shutil.rmtree(tmp, ignore_errors=True)
