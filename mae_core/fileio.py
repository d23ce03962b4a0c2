"""Atomic file writes: a reader (or a kill -9) never sees a half-written file.

Every file is written to a temporary file *beside* its target (same folder, so the same file
system), flushed and fsynced, then renamed over the target with ``os.replace``, and the folder is
fsynced so the rename itself survives a crash. A temporary file is named
``.<target>.<pid>.<random>.tmp``: :func:`remove_stale_temp_files` can tell the leftovers of a
killed writer (its pid is gone) from a write in flight in another live process.
"""

from __future__ import annotations

import errno
import json
import os
import re
import stat
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable

from mae_core.process import pid_alive

TEMP_SUFFIX = ".tmp"
# A write that failed with less than this free on its disk failed because the disk is full:
# torch.save's writer says "enforce fail at inline_container.cc ... unexpected pos", not ENOSPC.
FULL_BELOW_BYTES = 2**20
# Nor with fewer free inodes than this: a write needs one for its temp file, and a disk out of
# inodes says ENOSPC, "No space left on device", with hundreds of MB free.
FULL_BELOW_INODES = 16
_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# .<name>.<pid>.<mkstemp's 8 characters>.tmp; the pid is absent in files of older versions, and
# in .tmpXXXXXX, safetensors' own temp file, which earlier versions' weights saves left when killed.
_TEMP_NAME = re.compile(
    r"^\.(?:(?P<name>.+?)(?:\.(?P<pid>\d+))?\.[A-Za-z0-9_]{8}\.tmp|tmp[A-Za-z0-9]{6})$")


def cache_home() -> Path:
    """This app's cache folder: ``$XDG_CACHE_HOME/mae_studio``, else ``~/.cache/mae_studio`` (the
    prepared data sets and the measured peak FLOP/s live under it)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mae_studio"


def atomic_write(path: str | Path, write: Callable[[str], None], make_dirs: bool = True) -> None:
    """Call ``write(tmp_path)`` on a temp file beside ``path``, fsync it, then rename over ``path``.

    If ``write`` raises, or the process dies, ``path`` keeps its previous content; an exception
    also removes the temp file (a kill leaves it for :func:`remove_stale_temp_files`).
    ``make_dirs=False`` writes only into a folder that exists (FileNotFoundError otherwise): a
    file written into a run directory deleted meanwhile brought the folder back, invisible.
    """
    path = Path(path)
    if make_dirs:
        path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.",
                                   suffix=TEMP_SUFFIX)
    except OSError as err:  # named as the file being written, not its temp file's odd name
        raise _about(err, path) from None
    os.close(fd)
    try:
        write(tmp)
        fsync_file(tmp)
        os.replace(tmp, path)
    except Exception as err:
        # Asked before the temp file goes: removing it frees the space that ran out.
        full = is_disk_full(err) or disk_nearly_full(path.parent)
        Path(tmp).unlink(missing_ok=True)
        if full:
            # In the C library's words too: a log reader (the app, after a rank that could not
            # write its status) knows it by them (:func:`says_disk_full`).
            raise DiskFullError(errno.ENOSPC, "No space left on device: the disk is full while "
                                "writing", str(path)) from err
        if isinstance(err, OSError) and err.filename == tmp:
            raise _about(err, path) from None
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def _about(err: OSError, path: Path) -> OSError:
    """``err`` (an errno error of the temp file) as an error of ``path``, the same type."""
    return type(err)(err.errno, err.strerror, str(path))


class DiskFullError(OSError):
    """A write found its disk full (ENOSPC, whatever the writer raised); the target kept its
    previous content."""


def free_bytes(path: str | Path) -> int | None:
    """Free bytes (for this user) on the file system that holds ``path``, or None if unknown.

    ``path`` need not exist yet (a run folder about to be made): its nearest existing folder is
    asked.
    """
    try:
        info = os.statvfs(existing_parent(path))
    except OSError:
        return None
    # Root may also write into the blocks ext4 reserves for it (5% by default).
    return (info.f_bfree if os.geteuid() == 0 else info.f_bavail) * info.f_frsize


def mounted_read_only(folder: str | Path) -> bool:
    """Whether ``folder`` is on a file system mounted read-only."""
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def free_inodes(path: str | Path) -> int | None:
    """Free inodes (files that can still be made, for this user) on the file system that holds
    ``path``, or None where it has no fixed number of them (btrfs and FAT report 0 of 0) or
    cannot say."""
    try:
        info = os.statvfs(existing_parent(path))
    except OSError:
        return None
    if info.f_files == 0:
        return None
    return info.f_ffree if os.geteuid() == 0 else info.f_favail


def out_of_inodes(path: str | Path) -> bool:
    """Whether the disk holding ``path`` has (nearly) no inodes left: no new file fits there,
    whatever its free bytes."""
    inodes = free_inodes(path)
    return inodes is not None and inodes < FULL_BELOW_INODES


def existing_parent(path: str | Path) -> Path:
    """``path`` itself if it exists, else its nearest existing parent folder."""
    folder = Path(path).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def disk_nearly_full(path: str | Path) -> bool:
    """Whether a write on the disk holding ``path`` can fail for want of room: bytes or inodes."""
    free = free_bytes(path)
    return (free is not None and free < FULL_BELOW_BYTES) or out_of_inodes(path)


def says_disk_full(text: str) -> bool:
    """Whether ``text`` (an error's message, a log's tail) reports ENOSPC in the C library's words."""
    return "no space left on device" in text.lower()


def is_disk_full(err: BaseException | None) -> bool:
    """Whether ``err``, or an exception it was raised from, is a write that found the disk full."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, DiskFullError) or (isinstance(err, OSError)
                                              and err.errno in _FULL_ERRNOS):
            return True
        if says_disk_full(str(err)):  # safetensors' Rust writer, LitData's worker tracebacks
            return True
        err = err.__cause__ or err.__context__
    return False


def fsync_file(path: str | Path) -> None:
    """Force ``path``'s data to the disk (a writer may have closed it without syncing)."""
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def fsync_dir(folder: str | Path) -> None:
    """Make the renames in ``folder`` durable; a no-op where the file system cannot sync folders."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: str | Path, text: str, make_dirs: bool = True) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text), make_dirs)


def atomic_write_json(path: str | Path, data: Any, make_dirs: bool = True) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, default=str), make_dirs)


def append_line(path: str | Path, line: str) -> None:
    """Append one line and flush it, so a reader (a live curve) sees it at once."""
    append_lines(path, [line])


def append_lines(path: str | Path, lines: list[str]) -> None:
    """Append whole lines in one write and flush them (a reader sees complete lines at once).
    A file that ends mid-line (a half line pasted or cut by hand, a copy cut short) gets its line
    ended first: the first line appended was glued to it, and that step's line was lost."""
    text = "".join(line.rstrip("\n") + "\n" for line in lines)
    with open_regular(path, append=True) as handle:
        if _ends_mid_line(path, os.fstat(handle.fileno()).st_size):
            text = "\n" + text
        handle.write(text.encode())
        handle.flush()


def _ends_mid_line(path: str | Path, size: int) -> bool:
    if size == 0:
        return False
    try:
        with open_regular(path) as handle:
            handle.seek(size - 1)
            return handle.read(1) not in (b"\n", b"")
    except OSError:
        return False


class NotRegularFileError(OSError):
    """A path that should hold a file holds something else (a link, a FIFO, a device, a
    folder)."""


def open_regular(path: str | Path, append: bool = False) -> BinaryIO:
    """``path`` opened for binary reading (or appending, created if missing);
    :class:`NotRegularFileError` unless it is a regular file, itself: not a link to one.

    A run folder's files can be replaced by hand: opening a FIFO blocks until someone writes to
    (or reads from) it, and a caller that holds a lock (the run manager launching a trainer with
    its output going to train.log) would hang the whole app. Opened non-blocking, checked, then
    used as usual (a regular file's reads and writes ignore the flag). A link in a run file's place
    is never followed: through one, the app showed (and served) a file from outside the runs
    folder, and a Resume appended the trainer's output to one. (A link to the run folder itself is
    a linked run, and is followed: only the last part of the path counts.)
    """
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT if append else os.O_RDONLY
    try:
        fd = os.open(path, flags | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOFOLLOW, 0o666)
    except OSError as err:
        if err.errno in (errno.ENXIO, errno.ELOOP):  # a FIFO no one reads (to write); a link
            raise NotRegularFileError(errno.EINVAL, "not a regular file", str(path)) from None
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise NotRegularFileError(errno.EINVAL, "not a regular file", str(path))
        os.set_blocking(fd, True)
        return os.fdopen(fd, "ab" if append else "rb")
    except BaseException:
        os.close(fd)
        raise


def wrong_kind(path: str | Path, folder: bool = False, appended: bool = False) -> str | None:
    """What stands in ``path``'s place where a writer cannot use it ("a folder", "a FIFO"...), or
    None (nothing there, or something it can write). A file written by :func:`atomic_write`
    replaces anything but a folder; one ``appended`` to (:func:`open_regular`) must be a regular
    file itself; a ``folder`` must be one (a link to one will do). Put there by hand, each failed
    a resumed trainer only at its first save or preview, the steps since its start lost."""
    try:
        mode = os.lstat(path).st_mode
    except OSError:  # missing (made when written), or not to be told from here
        return None
    if folder:
        usable = stat.S_ISDIR(mode) or (stat.S_ISLNK(mode) and os.path.isdir(path))
    else:
        usable = stat.S_ISREG(mode) or not (appended or stat.S_ISDIR(mode))
    if usable:
        return None
    kinds = ((stat.S_ISDIR, "a folder"), (stat.S_ISLNK, "a link"), (stat.S_ISFIFO, "a FIFO"),
             (stat.S_ISSOCK, "a socket"), (stat.S_ISREG, "a file"))
    return next((name for test, name in kinds if test(mode)), "a device")


def read_regular_bytes(path: str | Path) -> bytes:
    """The whole of the regular file ``path``; OSError if it is missing, unreadable or no file."""
    with open_regular(path) as handle:
        return handle.read()


def read_json(path: str | Path) -> dict[str, Any] | None:
    """The JSON object at ``path``, or None if it is missing, unreadable or not a regular file."""
    try:
        data = json.loads(read_regular_bytes(path))
    except (OSError, ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def is_temp_file(path: str | Path) -> bool:
    """Whether ``path`` is named like a temporary file of :func:`atomic_write`."""
    return _TEMP_NAME.match(Path(path).name) is not None


def remove_stale_temp_files(folder: str | Path) -> list[Path]:
    """Delete the temp files under ``folder`` whose writer is dead (a kill during a save).

    A temp file of a live process (the app writing ``status.json`` right now) is kept. Returns
    the files removed.
    """
    removed = []
    for dirpath, _dirnames, filenames in os.walk(folder):
        for name in filenames:
            match = _TEMP_NAME.match(name)
            if match is None:
                continue
            pid = match.group("pid")
            if pid is not None and (int(pid) == os.getpid() or pid_alive(int(pid))):
                continue
            path = Path(dirpath) / name
            try:
                path.unlink()
            except FileNotFoundError:  # its writer finished (or failed) meanwhile
                continue
            removed.append(path)
    return removed
