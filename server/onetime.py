"""knockd's One_Time_Sequences files: one sequence per line, each used once.

knockd marks a used line by overwriting its first byte with ``#`` (so
``3001,3002`` becomes ``#001,3002``) and aborts with a double free when the
last one is used. We comment the line out whole (``#`` prepended, nothing
destroyed), write the new file next to the old one, fsync it, and rename it
into place: after a crash the file is either the old one or the new one,
never half of each. The last sequence disables the door; nothing crashes.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

from spa.config import parse_one_time_sequences
from spa.errors import ConfigError
from spa.grant import PortSpec

log = logging.getLogger(__name__)


class OneTimeSequences:
    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self._entries: list[tuple[int, tuple[PortSpec, ...]]] = []
        self.reload()

    def reload(self) -> None:
        try:
            text = self.path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read one-time sequences file: {exc.strerror}", str(self.path)) from None
        self._entries = parse_one_time_sequences(text, str(self.path))

    @property
    def current(self) -> tuple[PortSpec, ...] | None:
        """The sequence in force, or None when every one is used."""
        return self._entries[0][1] if self._entries else None

    def __len__(self) -> int:
        return len(self._entries)

    def take(self) -> tuple[int, tuple[PortSpec, ...] | None]:
        """Retire the current sequence in memory: (its line number, the next sequence or None).

        Cheap, for the capture loop; ``mark_used`` then records it on disk.
        """
        if not self._entries:
            raise LookupError("no one-time sequence left")
        line_no, _ = self._entries.pop(0)
        return line_no, self.current

    def mark_used(self, line_no: int) -> None:
        """Comment out line ``line_no`` in the file, atomically and durably."""
        lines = self.path.read_text(encoding="utf-8").splitlines(keepends=True)
        if not lines[line_no - 1].lstrip().startswith("#"):
            lines[line_no - 1] = "#" + lines[line_no - 1]
            self._write("".join(lines))

    def consume(self) -> tuple[PortSpec, ...] | None:
        """Mark the current sequence used, durably; return the next one (None: exhausted)."""
        if not self._entries:
            return None
        line_no, nxt = self.take()
        self.mark_used(line_no)
        return nxt

    def _write(self, text: str) -> None:
        st = self.path.stat()
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, st.st_mode & 0o7777)
            try:
                os.chown(tmp, st.st_uid, st.st_gid)
            except PermissionError:
                pass
            os.replace(tmp, self.path)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
        dirfd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dirfd)
        finally:
            os.close(dirfd)
