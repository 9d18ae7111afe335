"""The safe-file rule for everything read from a dataset or a tool's export, and copies into an output.

A file read from an export must be a regular file (checked with `lstat`: a symbolic link is refused, even
one pointing inside) whose resolved path lies inside the resolved export folder. Reads open the file with
`O_NOFOLLOW` and check the open descriptor again, so a file swapped for a link between the check and the
read is refused as well. Output files are copies (a reflink where the file system offers one) unless a
hard link is asked for, so a later write to the output never reaches the source.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import stat
from pathlib import Path

FICLONE = 0x40049409  # linux/fs.h: _IOW(0x94, 9, int)
QUOTE_CHARS = 60


class UnsafeFile(ValueError):
    """A path that is not a regular file inside its folder (a link, a device, outside, missing)."""


def quote(token: object, limit: int = QUOTE_CHARS) -> str:
    """A short, printable rendering of a token from the input, for a problem message: `repr` (control
    characters escaped), cut to `limit` characters with the full length said."""
    text = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in repr(token))
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def regular_file(root: Path, path: Path) -> Path:
    """`path` (absolute, or relative to `root`) when it is a regular file, not a link, whose resolved path is
    inside the resolved `root`; UnsafeFile saying which rule it breaks otherwise."""
    path = path if path.is_absolute() else root / path
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        raise UnsafeFile("not found") from None
    except OSError as exc:
        raise UnsafeFile(f"cannot be read ({exc.strerror or exc})") from None
    if stat.S_ISLNK(info.st_mode):
        raise UnsafeFile("a symbolic link; an export's files must be regular files inside it")
    if not stat.S_ISREG(info.st_mode):
        raise UnsafeFile("not a regular file")
    if not path.resolve().is_relative_to(root.resolve()):
        raise UnsafeFile(f"outside the export folder {root} (through a linked folder)")
    return path


def open_regular(path: Path) -> int:
    """A read-only descriptor of `path`, refused (UnsafeFile) when it is a link or not a regular file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafeFile("a symbolic link; an export's files must be regular files inside it") from None
        if exc.errno == errno.ENOENT:
            raise UnsafeFile("not found") from None
        raise UnsafeFile(f"cannot be read ({exc.strerror or exc})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UnsafeFile("not a regular file")
    return fd


def read_regular(path: Path, limit: int) -> bytes:
    """The bytes of the regular file `path`, refused past `limit` bytes (from its size, before reading)."""
    fd = open_regular(path)
    with os.fdopen(fd, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size > limit:
            raise UnsafeFile(f"{size} bytes, above the limit of {limit} for this file")
        data = f.read(size + 1)  # the size read (a file growing meanwhile is cut at the limit, never read past it)
        return data[:limit]


def copy_out(src: Path, dst: Path, link: bool = False) -> None:
    """Copy the regular file `src` to the new file `dst` (which must not exist): a reflink where the file
    system offers one (copy-on-write, no bytes duplicated), else a byte copy; a hard link only when `link`."""
    fd = open_regular(src)
    try:
        if link:
            try:
                os.link(src, dst, follow_symlinks=False)
            except OSError:
                pass
            else:  # the link is of the file checked, or (swapped for a link meanwhile) refused
                if os.lstat(dst).st_ino == os.fstat(fd).st_ino:
                    return
                os.unlink(dst)
                raise UnsafeFile(f"{src} changed while it was linked")
        out = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        try:
            try:
                fcntl.ioctl(out, FICLONE, fd)
            except OSError:
                with os.fdopen(os.dup(fd), "rb") as r, os.fdopen(os.dup(out), "wb") as w:
                    shutil.copyfileobj(r, w, 1 << 20)
        finally:
            os.close(out)
    finally:
        os.close(fd)
