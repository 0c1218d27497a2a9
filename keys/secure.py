"""Secret files on disk: written 0600 atomically, refused when others can read them.

Every private or shared key goes through here, so the rule is the same for
all of them (and the same as ssh's): a secret that group or others can read
is not used, and the message names the file and the command that fixes it.
"""

from __future__ import annotations

import os
import stat

from spa.errors import KeyFileError


def check_private(path: str) -> None:
    """Raise ``KeyFileError`` unless ``path`` is a regular file only its owner can read or write."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise KeyFileError("no such key file", path) from None
    except OSError as exc:
        raise KeyFileError(f"cannot read the key file: {exc.strerror or exc}", path) from None
    if not stat.S_ISREG(st.st_mode):
        raise KeyFileError("is not a regular file", path)
    if st.st_mode & 0o077:
        raise KeyFileError(
            f"is readable or writable by group or others (mode {stat.S_IMODE(st.st_mode):04o}); "
            f"a private key must be private: run 'chmod 600 {path}'",
            path,
        )


def read_private(path: str) -> str:
    """The text of a secret file, after ``check_private``."""
    check_private(path)
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError:
        raise KeyFileError("is not a text key file (not valid UTF-8)", path) from None
    except OSError as exc:
        raise KeyFileError(f"cannot read the key file: {exc.strerror or exc}", path) from None


def read_public(path: str) -> str:
    """The text of a public file (no permission rule: anyone may read a public key)."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        raise KeyFileError("no such file", path) from None
    except UnicodeDecodeError:
        raise KeyFileError("is not a text file (not valid UTF-8)", path) from None
    except OSError as exc:
        raise KeyFileError(f"cannot read the file: {exc.strerror or exc}", path) from None


def write_atomic(path: str, text: str, mode: int, *, force: bool = False) -> None:
    """Write ``text`` to ``path`` with ``mode``, all or nothing.

    The data goes to a temporary file created with ``mode`` from the start (a
    secret is never briefly world-readable), is fsync'd, then renamed over
    ``path``. Without ``force`` an existing ``path`` is refused.
    """
    if not force and os.path.lexists(path):
        raise KeyFileError("already exists; refusing to overwrite it (use --force)", path)
    directory = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)  # ~/.knock, /etc/spa: private from the start
    except OSError as exc:
        raise KeyFileError(f"cannot create its directory: {exc.strerror or exc}", path) from None
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    except OSError as exc:
        raise KeyFileError(f"cannot write: {exc.strerror or exc}", path) from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            os.fchmod(f.fileno(), mode)  # the umask may have narrowed or widened nothing; be exact
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:
        dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
