"""The audit log: one JSON line per state-changing request (from the policy layer in front of
MLflow) and per login checked with bcrypt (from the gateway), in data_dir/logs/audit.log.

Lines are appended with one write() on an O_APPEND descriptor, so the tracking and gateway
workers never interleave inside a line; the file is reopened when it is renamed away (rotated
with the other logs), like logging's WatchedFileHandler. With no log directory (containers) the
lines go to stderr.
"""

from __future__ import annotations

import json
import os
import re
import sys
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from .settings import Settings


def audit_path(settings: Settings) -> Path | None:
    return settings.audit_log


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class AuditLog:
    """Append-only JSON lines; safe across threads and processes."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._fd: int | None = None
        self._stamp: tuple[int, int] | None = None
        self._lock = threading.Lock()

    def write(self, event: dict[str, Any]) -> None:
        line = json.dumps({"time": now_iso(), **event}, ensure_ascii=False, default=str) + "\n"
        data = line.encode("utf-8")
        if self.path is None:
            sys.stderr.write(line)
            sys.stderr.flush()
            return
        with self._lock:
            try:
                os.write(self._descriptor(), data)
            except OSError as exc:  # never fail the request because the log is unwritable
                sys.stderr.write(f"trackgate: audit log {self.path}: {exc}\n{line}")

    def _descriptor(self) -> int:
        assert self.path is not None
        try:
            st = os.stat(self.path)
            stamp: tuple[int, int] | None = (st.st_dev, st.st_ino)
        except FileNotFoundError:
            stamp = None
        if self._fd is None or stamp != self._stamp:  # first line, or rotated away
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            st = os.fstat(self._fd)
            self._stamp = (st.st_dev, st.st_ino)
        return self._fd


# --- reading it back (`trackgate audit`) ----------------------------------------------------

_RELATIVE = re.compile(r"(\d+)\s*([smhdw])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_since(text: str) -> datetime:
    """'2h', '30m', '7d' (ago) or an ISO date/time (UTC unless it says otherwise)."""
    match = _RELATIVE.fullmatch(text.strip())
    if match:
        seconds = int(match.group(1)) * _UNITS[match.group(2)]
        return datetime.now(UTC) - timedelta(seconds=seconds)
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(
            f"--since {text!r}: give a time ago (30m, 2h, 7d) or an ISO time "
            "(2026-12-01T09:00)"
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _event_time(event: dict[str, Any]) -> datetime | None:
    try:
        return datetime.fromisoformat(str(event.get("time", "")).replace("Z", "+00:00"))
    except ValueError:
        return None


def read_events(
    path: Path,
    *,
    user: str | None = None,
    since: datetime | None = None,
    action: str | None = None,
) -> Iterator[dict[str, Any]]:
    """The events of PATH (and its rotated copies PATH.1, PATH.2... oldest first) that match:
    exactly USER, at or after SINCE, ACTION a substring of the event's action."""
    rotated = sorted(
        (p for p in path.parent.glob(path.name + ".*") if p.name[len(path.name) + 1 :].isdigit()),
        key=lambda p: -int(p.name[len(path.name) + 1 :]),
    )
    for file in [*rotated, path]:
        try:
            handle = file.open(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            continue
        with handle:
            for line in handle:
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                if not isinstance(event, dict):
                    continue
                if user is not None and event.get("user") != user:
                    continue
                if action is not None and action not in str(event.get("action", "")):
                    continue
                if since is not None:
                    moment = _event_time(event)
                    if moment is None or moment < since:
                        continue
                yield event
