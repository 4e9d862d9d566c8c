"""Secret values that never print and that follow a rotated Kubernetes secret mount.

A :class:`Secret` reads its value from an environment variable, a file or an inline value. File-backed
secrets are re-read when the file's modification time or size changes (checked at most once per
``recheck`` seconds, so the hot path costs one clock read), which is how a rotated Kubernetes Secret
reaches a running gateway without a restart. ``repr``/``str`` never show the value.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from .config import SecretRef


class SecretUnavailable(Exception):
    """The secret's source is missing (unset variable, unreadable file)."""


class Secret:
    __slots__ = ("_ref", "_where", "_value", "_stamp", "_checked", "_recheck", "version")

    def __init__(self, ref: SecretRef, where: str, recheck: float = 1.0) -> None:
        self._ref = ref
        self._where = where
        self._value: str | None = None
        self._stamp: tuple[float, int] | None = None
        self._checked = 0.0
        self._recheck = recheck
        self.version = 0

    def __repr__(self) -> str:
        src = f"env:{self._ref.env}" if self._ref.env else f"file:{self._ref.file}" if self._ref.file else "inline"
        return f"<Secret {self._where} from {src}>"

    __str__ = __repr__

    def describe_source(self) -> str:
        return repr(self)

    def get(self) -> str:
        """The current value. Raises SecretUnavailable if the source is missing."""
        ref = self._ref
        if ref.value is not None:
            return ref.value.get_secret_value()
        if ref.env is not None:
            v = os.environ.get(ref.env)
            if v is None:
                raise SecretUnavailable(f"{self._where}: environment variable {ref.env} is not set")
            if v != self._value:
                self._value = v
                self.version += 1
            return v
        assert ref.file is not None
        now = time.monotonic()
        if self._value is not None and now - self._checked < self._recheck:
            return self._value
        self._checked = now
        return self._reload(Path(ref.file))

    def _reload(self, path: Path) -> str:
        try:
            st = path.stat()
            stamp = (st.st_mtime, st.st_size)
            if stamp != self._stamp or self._value is None:
                value = path.read_text(encoding="utf-8").strip()
                self._value, self._stamp = value, stamp
                self.version += 1
        except OSError as exc:
            if self._value is not None:
                # Kubernetes swaps the ..data symlink atomically; a transient miss keeps the old value.
                return self._value
            raise SecretUnavailable(f"{self._where}: cannot read {path}: {exc.strerror}") from None
        return self._value
