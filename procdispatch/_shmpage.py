"""SharedPage: one named page of memory shared by processes, with a lock that dies with its holder.

Theory of operation
-------------------
A page is three files named after it, in ``/dev/shm`` (RAM-backed) or, where that does not
exist, the temporary directory::

    procdispatch-rl-<uid>-<key>.rl      the page itself, mmapped by every user
    procdispatch-rl-<uid>-<key>.pool    a FIFO every user holds open (read-write, non-blocking)
    procdispatch-rl-<uid>-<key>.users   held with flock(LOCK_SH) by every user while it is open

The FIFO is a kernel pipe shared by every user (:attr:`SharedPage.pipe`): the owner of the page
keeps items in it that any process takes with one ``read``, atomically and without the lock.
Its contents live as long as some user holds it open.

*Mutual exclusion* is ``flock(LOCK_EX)`` on the ``.rl`` file (:meth:`SharedPage.locked`). The
kernel drops a flock when the last descriptor of its open file description closes, and a dying
process closes all of its descriptors, so a process SIGKILLed while holding the lock releases it
at once: the others never wait on a dead holder, and no liveness check or timeout is involved.
flock belongs to the open file description, not to the thread, so a ``threading.Lock`` sits in
front of it. Descriptors are close-on-exec, and after ``fork()`` a hook gives every inherited
page fresh descriptors and a fresh thread lock, so parent and child never share a lock owner.
(POSIX record locks would be dropped by any ``close()`` of the file in the process; OFD locks
are Linux-only. flock has neither problem.)

*Lifetime*: an opener creates the ``.users`` file if needed, takes LOCK_SH, then checks that the
path still names the inode it locked (a closer may have unlinked it meanwhile; then it retries).
A closer that can turn its LOCK_SH into LOCK_EX without blocking is the last user and unlinks
all three files, the users file last. A last user that died cannot clean up, so openers first
remove leftovers that nobody holds (the same LOCK_EX test): :func:`sweep` for all of this
user's pages, and each open for its own name, so a dead user's state is never inherited.

The page's contents belong to the caller: ``setup`` runs under the lock when the page is opened,
to initialise a fresh page (all zero) or to check an existing one; if it raises, the open fails
and leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import mmap
import os
import re
import stat
import tempfile
import threading
import weakref
from collections.abc import Callable, Iterator

__all__ = ["PAGE_SIZE", "SharedPage", "paths", "prefix", "segment_dir", "sweep"]

PAGE_SIZE = 4096
_SAFE_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_LIVE: weakref.WeakSet[SharedPage] = weakref.WeakSet()
_flock = fcntl.flock
_EX, _UN, _NB = fcntl.LOCK_EX, fcntl.LOCK_UN, fcntl.LOCK_NB
# No symlinks: the directory is shared with other users. Descriptors are close-on-exec anyway.
_OPEN_FLAGS = os.O_RDWR | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


def segment_dir() -> str:
    shm = "/dev/shm"
    if os.path.isdir(shm) and os.access(shm, os.W_OK | os.X_OK):
        return shm
    return tempfile.gettempdir()


def prefix() -> str:
    return f"procdispatch-rl-{os.getuid()}-"


def paths(name: str) -> tuple[str, str, str]:
    """The (page, users, pool FIFO) file paths for a page name."""
    if _SAFE_NAME.fullmatch(name):
        key = "n" + name
    else:
        key = "h" + hashlib.sha256(name.encode()).hexdigest()[:40]
    base = os.path.join(segment_dir(), prefix() + key)
    return base + ".rl", base + ".users", base + ".pool"


def _names_same_file(fd: int, path: str) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (st.st_ino, st.st_dev) == (mine.st_ino, mine.st_dev)


def _check_owner(fd: int, path: str) -> None:
    if os.fstat(fd).st_uid != os.getuid():
        raise PermissionError(f"{path} belongs to another user; refusing to share it")


def _unlink_if_last(ufd: int, data_path: str, users_path: str, pool_path: str) -> None:
    """Unlink the files if ``ufd`` gets LOCK_EX on the users file: nobody else has it open.
    The users file goes last, so a crash in between leaves a users file that is still swept."""
    try:
        _flock(ufd, _EX | _NB)
    except BlockingIOError:
        return
    if _names_same_file(ufd, users_path):
        for path in (data_path, pool_path, users_path):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


def _remove_if_unused(data_path: str, users_path: str, pool_path: str) -> None:
    try:
        fd = os.open(users_path, _OPEN_FLAGS)
    except OSError:
        return
    try:
        _unlink_if_last(fd, data_path, users_path, pool_path)
    finally:
        os.close(fd)


def sweep() -> None:
    """Remove every page of this user that no process holds (left by dead last users)."""
    mine = prefix()
    with contextlib.suppress(OSError), os.scandir(segment_dir()) as entries:
        for entry in entries:
            if entry.name.startswith(mine) and entry.name.endswith(".users"):
                base = entry.path[: -len(".users")]
                _remove_if_unused(base + ".rl", entry.path, base + ".pool")


Setup = Callable[[memoryview, mmap.mmap], None]
_F_SETPIPE_SZ: int | None = getattr(fcntl, "F_SETPIPE_SZ", None)  # Linux only
_POOL_PIPE_BYTES = 1 << 20


def _open_fifo(path: str) -> int:
    """Create the FIFO if needed and open it read-write and non-blocking (so that opening never
    waits for a peer); refuse anything but a FIFO of ours."""
    with contextlib.suppress(FileExistsError):
        os.mkfifo(path, 0o600)
    fd = os.open(path, _OPEN_FLAGS | os.O_NONBLOCK)
    try:
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            raise OSError(f"{path} is not a FIFO; refusing to use it")
        _check_owner(fd, path)
        if _F_SETPIPE_SZ is not None:  # elsewhere the pipe keeps its default size
            with contextlib.suppress(OSError):  # capped by /proc/sys/fs/pipe-max-size
                fcntl.fcntl(fd, _F_SETPIPE_SZ, _POOL_PIPE_BYTES)
    except BaseException:
        os.close(fd)
        raise
    return fd


class SharedPage:
    """The named page, mapped: ``mm`` (bytes) and ``mv`` (native int64 words), and its FIFO
    (``pipe``, a non-blocking read-write descriptor).

    Hot paths read ``tlock``, ``closed``, ``fd``, ``pipe``, ``mm`` and ``mv`` directly and take
    the lock as ``with tlock: flock(fd, LOCK_EX) ... flock(fd, LOCK_UN)``; :meth:`locked` does
    the same.
    """

    fd: int
    pipe: int
    mm: mmap.mmap
    mv: memoryview

    def __init__(self, name: str, setup: Setup) -> None:
        self.name = name
        self._setup = setup
        self.closed = True
        self.tlock = threading.Lock()
        #: Per-thread scratch space for the page's owner; a forked child starts with none.
        self.local = threading.local()
        self._attach()
        self.closed = False
        _LIVE.add(self)

    def _attach(self) -> None:
        data_path, users_path, pool_path = paths(self.name)
        _remove_if_unused(data_path, users_path, pool_path)  # a dead last user's is not ours
        while True:
            ufd = os.open(users_path, _OPEN_FLAGS | os.O_CREAT, 0o600)
            try:
                _check_owner(ufd, users_path)
                _flock(ufd, fcntl.LOCK_SH)
                if _names_same_file(ufd, users_path):
                    break
            except BaseException:
                os.close(ufd)
                raise
            os.close(ufd)  # unlinked by a closer between our open and our lock: again
        try:
            self.pipe = _open_fifo(pool_path)
        except BaseException:
            os.close(ufd)
            raise
        try:
            self.fd = os.open(data_path, _OPEN_FLAGS | os.O_CREAT, 0o600)
        except BaseException:
            os.close(self.pipe)
            os.close(ufd)
            raise
        self._ufd = ufd
        try:
            _check_owner(self.fd, data_path)
            _flock(self.fd, _EX)
            try:
                if os.fstat(self.fd).st_size < PAGE_SIZE:
                    if hasattr(os, "posix_fallocate"):  # a full tmpfs fails here, not as SIGBUS
                        os.posix_fallocate(self.fd, 0, PAGE_SIZE)
                    else:
                        os.ftruncate(self.fd, PAGE_SIZE)
                self.mm = mmap.mmap(self.fd, PAGE_SIZE)
                self.mv = memoryview(self.mm).cast("q")
                self._setup(self.mv, self.mm)
            finally:
                _flock(self.fd, _UN)
        except BaseException:
            self._detach(unlink=False)
            raise

    def _detach(self, *, unlink: bool) -> None:
        if hasattr(self, "mv"):
            self.mv.release()
            self.mm.close()
            del self.mv, self.mm
        os.close(self.fd)
        os.close(self.pipe)
        try:
            if unlink:
                _unlink_if_last(self._ufd, *paths(self.name))
        finally:
            os.close(self._ufd)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the thread lock and the cross-process lock."""
        with self.tlock:
            if self.closed:
                raise ValueError(f"shared page {self.name!r} is closed")
            try:
                _flock(self.fd, _EX)
                yield
            finally:
                _flock(self.fd, _UN)

    def close(self) -> None:
        """Unmap; the files go if this was the last user."""
        with self.tlock:
            if self.closed:
                return
            self.closed = True
            _LIVE.discard(self)
            self._detach(unlink=True)

    def _after_fork_in_child(self) -> None:
        # The inherited descriptors share the parent's open file descriptions, and so its flock
        # ownership: close them without unlocking anything, then open our own.
        self.tlock = threading.Lock()
        self.local = threading.local()
        if self.closed:
            return
        self.closed = True
        self.mv.release()
        self.mm.close()
        del self.mv, self.mm
        os.close(self.fd)
        os.close(self.pipe)
        os.close(self._ufd)
        self._attach()
        self.closed = False


def _after_fork_in_child() -> None:
    for page in list(_LIVE):
        try:
            page._after_fork_in_child()
        except Exception:  # this copy stays closed; the others still get their own descriptors
            page.closed = True


os.register_at_fork(after_in_child=_after_fork_in_child)
