"""Where a composite lands: OUT is only ever created, or (with overwrite) replaced, by a complete one.

The engine writes into `.<OUT>.partial-<id>` beside OUT and renames it into place at the end. Around
that, this module keeps the promises of docs/reliability.md ("Composing"):

* one compose at a time per OUT: an advisory lock `.<OUT>.lock` beside it (`fcntl.flock`, so a
  killed holder releases it and the next run takes the file over; it holds the holder's pid);
* nothing the run did not create is deleted or replaced unless overwrite was asked *and* OUT is
  still the object checked at the start (same device, inode, type and mtime), checked again just
  before the final rename;
* overwrite never touches a directory the compose reads: OUT may not be, contain or lie inside the
  base, a source or an adapters directory;
* partial directories (and `.old` leftovers) of killed runs into OUT are removed, under the lock, by
  the next run; an `.old` whose OUT is gone (a run killed mid-swap) is put back as OUT;
* SIGTERM unwinds like Ctrl-C (SystemExit(143) at the writer's next safe point, between two tensors),
  so the partial directory and the lock are removed.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import re
import shutil
import signal
import stat
import threading
import uuid
from typing import Callable, Iterable, Optional, Tuple

from mergekit_multimodal.errors import CompositionError

LOG = logging.getLogger(__name__)

try:  # POSIX; the lock is advisory and released by the kernel when its holder dies
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None


def lock_path(out: str) -> str:
    return os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.lock")


def partial_path(out: str) -> str:
    return os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.partial-{uuid.uuid4().hex[:8]}")


def _partial_pattern(out: str) -> "re.Pattern":
    return re.compile(rf"^\.{re.escape(os.path.basename(out))}\.partial-[0-9a-f]{{8}}(\.old)?$")


Identity = Optional[Tuple[int, int, int, int]]


def identity(path: str) -> Identity:
    """What is at `path` (not followed if a link): device, inode, type and mtime; None if nothing."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino, stat.S_IFMT(st.st_mode), st.st_mtime_ns


def _is_within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def refuse_inputs(out: str, inputs: Iterable[str]) -> None:
    """Overwrite may not replace a directory the compose reads, one that holds it, or one inside it."""
    real_out = os.path.realpath(out)
    for path in inputs:
        if not path or not os.path.exists(path):
            continue
        real = os.path.realpath(path)
        if _is_within(real_out, real) or _is_within(real, real_out):
            how = "is" if real == real_out else "lies inside" if _is_within(real_out, real) else "contains"
            raise CompositionError(
                f"{out}: refusing --overwrite: the output {how} the input directory {path}; "
                "choose an output path outside every base, source and adapters directory")


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def clean_stale(out: str) -> None:
    """Partial directories of killed runs into OUT (only called with OUT's lock held, so no live run owns one)."""
    parent, pattern = os.path.dirname(out), _partial_pattern(out)
    for entry in sorted(os.listdir(parent)):
        m = pattern.match(entry)
        if m is None:
            continue
        path = os.path.join(parent, entry)
        if m.group(1) and not os.path.lexists(out):
            os.rename(path, out)  # a run was killed between moving OUT aside and moving the new one in
            LOG.warning("%s: restored from %s, left by an interrupted --overwrite", out, path)
            continue
        _remove(path)
        LOG.warning("removed %s, left by an interrupted compose into %s", path, out)


class OutputLock:
    """`.<OUT>.lock` beside OUT, held (flock) for the whole write; a concurrent compose fails at once."""

    def __init__(self, out: str):
        self.out, self.path, self.fd = out, lock_path(out), None

    def __enter__(self) -> "OutputLock":
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise CompositionError(f"{os.path.dirname(self.out)}: cannot create the lock file "
                                       f"{os.path.basename(self.path)} there ({exc.strerror}); nothing was written") from None
            if fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                    os.close(fd)
                    raise CompositionError(
                        f"{self.out}: another compose (pid {holder}) is writing this output (lock {self.path}); "
                        "wait for it to finish or choose another output path") from None
            # the holder we waited on may have removed the file after we opened it: lock the one at the path
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        os.close(self.fd)


#: signals received while writing, acted on at the next safe point (`check_signals`)
_PENDING: list = []


@contextlib.contextmanager
def sigterm_unwinds():
    """While writing, SIGTERM makes the writer stop at its next safe point (between two tensors) with
    SystemExit(143), so cleanup runs as for Ctrl-C; the previous handler is restored after. The
    handler only records the signal: an exception raised at an arbitrary bytecode (inside a tensor
    read) can be swallowed or turned into another error by C code on the way. Signal handlers can
    only be set from the main thread: elsewhere this is a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _PENDING.clear()
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: _PENDING.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
        late, _PENDING[:] = list(_PENDING), []
        if late:  # arrived after the last safe point (the composite is in place): deliver it as it came
            signal.raise_signal(late[0])


def check_signals() -> None:
    """A safe point of the writer: a SIGTERM received since `sigterm_unwinds` began ends the run here."""
    if _PENDING:
        signum = _PENDING[0]
        _PENDING.clear()  # acted on here
        raise SystemExit(128 + signum)


def _libc_renameat2():
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn


_RENAMEAT2 = _libc_renameat2()
_AT_FDCWD, _RENAME_NOREPLACE = -100, 1


def rename_noreplace(src: str, dst: str) -> None:
    """Rename that fails if `dst` exists. By hand because Python has none: os.rename silently replaces an
    empty directory. Linux renameat2(RENAME_NOREPLACE) closes the gap; elsewhere check, then rename."""
    if _RENAMEAT2 is not None:
        if _RENAMEAT2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err == errno.EEXIST or err == errno.ENOTEMPTY:
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), dst)
        if err not in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
            raise OSError(err, os.strerror(err), src)
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), dst)
    os.rename(src, dst)


def land(tmp: str, out: str, before: Identity) -> None:
    """Move the complete composite `tmp` to `out`, if `out` is still what was there at the start
    (`before`: None when absent; else the object overwrite was asked to replace)."""
    changed = CompositionError(
        f"{out}: {'something appeared there' if before is None else 'it changed'} while composing; it was left "
        "untouched and the new composite was discarded. Run again (with --overwrite to replace it)")
    if identity(out) != before:
        raise changed
    if before is None:
        try:
            rename_noreplace(tmp, out)
        except FileExistsError:
            raise changed from None
        return
    trash = tmp + ".old"
    os.rename(out, trash)
    try:
        rename_noreplace(tmp, out)
    except BaseException:
        if not os.path.lexists(out):
            os.rename(trash, out)
        raise
    _remove(trash)


def write_aside(out_path: str, write: Callable[[str], None], inputs: Iterable[str] = (), overwrite: bool = False) -> str:
    """Run `write(tmp)` into a partial directory beside `out_path`, then land it there: with the lock
    held, stale partials removed, `out_path` refused if it exists (unless `overwrite`, which may not
    replace any of the `inputs` directories), SIGTERM unwinding; on any failure nothing is left."""
    out_path = os.path.abspath(out_path)
    if os.path.lexists(out_path) and not overwrite:
        raise CompositionError(f"{out_path}: output already exists; remove it or pass --overwrite")
    if overwrite:
        refuse_inputs(out_path, inputs)
    parent = os.path.dirname(out_path)
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as exc:
        raise CompositionError(f"{exc.filename or parent}: cannot create the output's directory ({exc.strerror})") from None
    with sigterm_unwinds(), OutputLock(out_path):
        clean_stale(out_path)
        before = identity(out_path)
        if before is not None and not overwrite:
            raise CompositionError(f"{out_path}: output already exists; remove it or pass --overwrite")
        tmp = partial_path(out_path)
        try:
            write(tmp)
            check_signals()
            land(tmp, out_path, before)
        except OSError as exc:  # a full disk, a read-only directory, a file that vanished
            shutil.rmtree(tmp, ignore_errors=True)
            raise CompositionError(f"{exc.filename or tmp}: {exc.strerror or exc} while writing {out_path}; "
                                   "nothing was written there") from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return out_path
