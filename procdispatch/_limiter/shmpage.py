"""The files behind a shared page: one page of memory, a FIFO and a users file, and their locks.

Theory of operation
-------------------
A page is three files named after it, in ``/dev/shm`` (RAM-backed) or, where that does not
exist, the temporary directory::

    procdispatch-rl-<uid>-<key>.rl      the page itself, mmapped by every user
    procdispatch-rl-<uid>-<key>.pool    a FIFO every user holds open (read-write, non-blocking)
    procdispatch-rl-<uid>-<key>.users   held with flock(LOCK_SH) by every user while it is open

One user's hold on them is a :class:`Files`: the page's descriptor (``fd``, for the lock), the
users file's (``ufd``), the FIFO's (``pipe``) and the mapping (``mm``, and ``mv`` as native
int64 words).

*Mutual exclusion* is ``flock(LOCK_EX)`` on ``fd``. The kernel drops a flock when the last
descriptor of its open file description closes, and a dying process closes all of its
descriptors, so a process SIGKILLed while holding the lock releases it at once: the others never
wait on a dead holder, and no liveness check or timeout is involved. flock belongs to the open
file description, not to the thread, so its owners put a ``threading.Lock`` in front of it.
(POSIX record locks would be dropped by any ``close()`` of the file in the process; OFD locks are
Linux-only. flock has neither problem.) A process stopped while holding it (SIGSTOP, a debugger)
does hold it: the others wait until it runs again.

*Interrupts* (KeyboardInterrupt, or any exception a signal handler raises) reach Python code
(CPython 3.10 and later) at a function's entry, after a call returns and at backward jumps, and
as the failure of a blocking call. So every lock here is taken on a descriptor that an owner
already holds, inside the ``try`` that releases it; a lock that could keep others waiting is
released by a call written in the ``finally`` itself (a function's entry is a point an interrupt
can reach); and every descriptor is stored into its :class:`Files` by the statement that opens
it, so that the ``Files`` (released explicitly, or when it is garbage-collected) owns whatever
an interrupt cut short. At worst a descriptor just opened, with no lock on it, is lost.

*The pipe's number never changes while anyone may read it.* Takes from the FIFO run without any
lock, so a descriptor number they loaded must not be closed under them (another thread could
open something that gets the number). Releasing a ``Files`` therefore points ``pipe`` at a dead
pipe (``dup2``: one atomic step, reads then find end-of-file) and closes the number only when the
``Files`` object itself goes, when nobody can hold it any more; likewise the mapping lives as
long as the object. Lock descriptors (``fd``, ``ufd``) are never used without the owner's thread
lock and are closed at once.

*Pairing*: the page records the inode of its FIFO (:data:`W_FIFO`, 0 on a fresh page), so a
FIFO that was removed and made again is never taken for the one the page's counts refer to. A
page can also be marked dead (:data:`W_MOVED`): its users must move to whatever page its path
names now. The caller owns every other word of the page.

After ``fork()`` a child holds its parent's open file descriptions, and so shares its flock
ownership: :meth:`Files.after_fork` gives the child descriptions of its own for the same files
(``/proc/self/fd``, which works even for files unlinked meanwhile; elsewhere by path, checked
against the inode) without waiting for any lock, and closes the inherited ones.
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

__all__ = [
    "PAGE_SIZE",
    "W_FIFO",
    "W_MOVED",
    "Files",
    "names_same_file",
    "paths",
    "prefix",
    "segment_dir",
]

PAGE_SIZE = 4096
W_FIFO = PAGE_SIZE // 8 - 1  #: inode of the FIFO paired with the page; 0: none yet
W_MOVED = PAGE_SIZE // 8 - 2  #: nonzero: the page is dead, its users move to the path's page
_SAFE_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_flock = fcntl.flock
_EX, _SH, _UN, _NB = fcntl.LOCK_EX, fcntl.LOCK_SH, fcntl.LOCK_UN, fcntl.LOCK_NB
# No symlinks: the directory is shared with other users. Descriptors are close-on-exec.
_OPEN_FLAGS = os.O_RDWR | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
_F_GETPIPE_SZ: int | None = getattr(fcntl, "F_GETPIPE_SZ", None)  # Linux only
_F_SETPIPE_SZ: int | None = getattr(fcntl, "F_SETPIPE_SZ", None)
#: The smallest FIFO asked for: two pages, so that a writer finding the tail page used up (a
#: pipe appends only after the data already in a page) still has a whole page to go on.
_MIN_PIPE_BYTES = 2 * PAGE_SIZE
_dead_lock = threading.Lock()
_dead: list[int] = []


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
    return base_paths(os.path.join(segment_dir(), prefix() + key))


def base_paths(base: str) -> tuple[str, str, str]:
    return base + ".rl", base + ".users", base + ".pool"


def names_same_file(fd: int, path: str) -> bool:
    """Whether ``path`` still names the file open as ``fd``."""
    try:
        st = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (st.st_ino, st.st_dev) == (mine.st_ino, mine.st_dev)


def check_owner(fd: int, path: str) -> None:
    if os.fstat(fd).st_uid != os.getuid():
        raise PermissionError(f"{path} belongs to another user; refusing to share it")


def _dead_pipe() -> int:
    """A descriptor whose reads return end-of-file at once: what a released ``pipe`` becomes."""
    with _dead_lock:
        if not _dead:
            r, w = os.pipe()
            os.close(w)
            os.set_inheritable(r, False)
            _dead.append(r)
        return _dead[0]


def _pipe_bytes(pool_max: int) -> int:
    """What a FIFO must hold for a pool of at most ``pool_max`` bytes (the kernel rounds up to a
    power of two pages)."""
    return max(_MIN_PIPE_BYTES, -(-pool_max // PAGE_SIZE) * PAGE_SIZE)


def size_fifo(pipe: int, pool_max: int) -> None:
    """Ask the kernel for a FIFO that holds the pool, no larger (pipe memory is a per-user
    budget); a refusal is fine: a smaller pipe only makes takes go through the lock sooner."""
    if _F_GETPIPE_SZ is None or _F_SETPIPE_SZ is None:
        return  # elsewhere the pipe keeps its default size
    want = _pipe_bytes(pool_max)
    with contextlib.suppress(OSError):  # EPERM over a limit, EBUSY holding more than that
        if fcntl.fcntl(pipe, _F_GETPIPE_SZ) != want:
            fcntl.fcntl(pipe, _F_SETPIPE_SZ, want)


class Files:
    """One user's hold on a page's files. Every field starts at -1 (or absent) and is set by the
    statement that opens it; :meth:`release` gives up the locks and the FIFO at once, and the
    last descriptor number and the mapping go with the object."""

    __slots__ = ("fd", "ino", "mm", "mv", "pipe", "ufd")

    fd: int
    ufd: int
    pipe: int
    ino: int
    mm: mmap.mmap
    mv: memoryview

    def __init__(self) -> None:
        self.fd = self.ufd = self.pipe = -1
        self.ino = 0

    def map(self) -> None:
        """Map the page (under its lock: a new one is sized first)."""
        if os.fstat(self.fd).st_size < PAGE_SIZE:
            if hasattr(os, "posix_fallocate"):  # a full tmpfs fails here, not as SIGBUS
                os.posix_fallocate(self.fd, 0, PAGE_SIZE)
            else:
                os.ftruncate(self.fd, PAGE_SIZE)
        self.mm = mmap.mmap(self.fd, PAGE_SIZE)
        self.mv = memoryview(self.mm).cast("q")
        self.ino = os.fstat(self.fd).st_ino

    def open_fifo(self, path: str, pool_max: int, *, fresh: bool) -> bool:
        """Open the FIFO at ``path`` as ``pipe`` (a fresh one, replacing any there, if
        ``fresh``); False if there is none (and not ``fresh``). Refuses anything but a FIFO of
        this user's."""
        if fresh:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            with contextlib.suppress(FileExistsError):  # another opener's, made just now
                os.mkfifo(path, 0o600)
        try:
            self.pipe = os.open(path, _OPEN_FLAGS | os.O_NONBLOCK)
        except FileNotFoundError:
            return False
        if not stat.S_ISFIFO(os.fstat(self.pipe).st_mode):
            raise OSError(f"{path} is not a FIFO; refusing to use it")
        check_owner(self.pipe, path)
        size_fifo(self.pipe, pool_max)
        return True

    def fifo_ino(self) -> int:
        return os.fstat(self.pipe).st_ino

    def release(self) -> None:
        """Give up the users registration and the page lock's descriptor, and point ``pipe``
        at a dead pipe. Idempotent; each descriptor is marked closed before it is closed, so
        an interrupt can at worst leave one open for :meth:`__del__`."""
        try:
            if self.pipe >= 0:
                os.dup2(_dead_pipe(), self.pipe, inheritable=False)
        finally:
            try:
                fd, self.fd = self.fd, -1
                if fd >= 0:
                    os.close(fd)
            finally:
                ufd, self.ufd = self.ufd, -1
                if ufd >= 0:
                    os.close(ufd)

    def __del__(self) -> None:
        for name in ("pipe", "fd", "ufd"):
            fd = getattr(self, name, -1)
            if fd >= 0:
                setattr(self, name, -1)
                try:  # noqa: SIM105 (contextlib may be gone at shutdown)
                    os.close(fd)
                except Exception:  # also at interpreter shutdown, when modules are gone
                    pass

    def after_fork(self, users_path: str, data_path: str) -> None:
        """In a child after ``fork()``: own descriptions of the page and users file (the
        inherited ones are the parent's, and so are their locks), taken without waiting: the
        inherited users description still holds LOCK_SH, so nobody holds LOCK_EX on it now.
        A field left at -1 means that file could not be reached again (its owner then moves to
        the page its path names). The pipe and the mapping are shared as they are."""
        old_fd, old_ufd = self.fd, self.ufd
        self.fd = self.ufd = -1
        try:
            if old_ufd >= 0:
                self.ufd = _reopen(old_ufd, users_path)
                try:
                    _flock(self.ufd, _SH | _NB)
                except BlockingIOError:  # a closer of the parent's is the last user
                    ufd, self.ufd = self.ufd, -1
                    os.close(ufd)
            if old_fd >= 0:
                self.fd = _reopen(old_fd, data_path)
        finally:
            for fd in (old_fd, old_ufd):
                if fd >= 0:
                    os.close(fd)


def _after_fork_in_child() -> None:
    global _dead_lock
    _dead_lock = threading.Lock()  # a parent thread may have held it at the fork


os.register_at_fork(after_in_child=_after_fork_in_child)


def _reopen(fd: int, path: str) -> int:
    """A new open file description of the file open as ``fd``, or -1 if it cannot be had."""
    try:
        return os.open(f"/proc/self/fd/{fd}", _OPEN_FLAGS)
    except OSError:
        pass
    try:
        new = os.open(path, _OPEN_FLAGS)
    except OSError:
        return -1
    if names_same_file(new, path) and os.fstat(new).st_ino == os.fstat(fd).st_ino:
        return new
    os.close(new)
    return -1


def register(f: Files, users_path: str) -> None:
    """Open the users file as ``f.ufd`` and hold LOCK_SH on it, making it if needed; retry
    while a closer unlinks it under us (it checks that the path still names what it locked)."""
    while True:
        f.ufd = os.open(users_path, _OPEN_FLAGS | os.O_CREAT, 0o600)
        check_owner(f.ufd, users_path)
        _flock(f.ufd, _SH)
        if names_same_file(f.ufd, users_path):
            return
        ufd, f.ufd = f.ufd, -1
        os.close(ufd)


def is_last(ufd: int, users_path: str) -> bool:
    """Take LOCK_EX on the users file if nobody else holds it (it is then held until ``ufd``
    closes, so nobody joins meanwhile); whether that made us its last user at its path."""
    try:
        _flock(ufd, _EX | _NB)
    except BlockingIOError:
        return False
    return names_same_file(ufd, users_path)


def unlink_set(f: Files, data_path: str, users_path: str, pool_path: str) -> None:
    """Unlink the files ``f`` holds, each only if its path still names it; the users file last,
    so that a crash in between leaves something the sweep finds."""
    for fd, path in ((f.fd, data_path), (f.pipe, pool_path), (f.ufd, users_path)):
        if fd >= 0 and names_same_file(fd, path):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
