"""Where the CPU time goes during a measured window: per component of the server under test
(nginx, auth gateway, gunicorn/MLflow), the legit clients, the attacker, and everything else
running on the machine (other people's work on a shared host). Read from /proc only.
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path

_TICK = os.sysconf("SC_CLK_TCK")


def _read_stat(pid: int) -> tuple[int, float] | None:
    """(parent PID, CPU seconds used so far) of one process, or None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # the name may hold spaces and parentheses
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / _TICK


def _component(pid: int) -> str:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "other"
    line = b" ".join(argv)
    if b"nginx" in argv[0]:
        return "nginx"
    if b"serve gateway" in line:
        return "gateway"
    if b"serve tracking" in line or b"bench.mlflow_auth" in line or b"bench.bare_mlflow" in line:
        return "gunicorn"
    if b"supervise" in line:
        return "supervisor"
    return "other"


def _descendants(roots: list[int]) -> set[int]:
    children: dict[int, list[int]] = defaultdict(list)
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = _read_stat(int(entry.name))
            if stat is not None:
                children[stat[0]].append(int(entry.name))
    found: set[int] = set()
    todo = list(roots)
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo.extend(children.get(pid, []))
    return found


def machine_busy() -> float:
    """CPU seconds all CPUs spent busy since boot (everything but idle and iowait)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(values[:8]) - values[3] - values[4]) / _TICK


def snapshot(server_root: int | None, clients: list[int], attacker: int | None) -> dict[str, float]:
    """CPU seconds used so far, by component, plus the whole machine's busy time."""
    totals: dict[str, float] = defaultdict(float)
    if server_root is not None:
        for pid in _descendants([server_root]):
            stat = _read_stat(pid)
            if stat is not None:
                totals[_component(pid)] += stat[1]
    for label, pids in (("clients", clients), ("attacker", [attacker] if attacker else [])):
        for pid in pids:
            stat = _read_stat(pid)
            if stat is not None:
                totals[label] += stat[1]
    totals["machine"] = machine_busy()
    return totals


def delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """CPU seconds per component during the window; `elsewhere` = the rest of the machine."""
    used = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in set(before) | set(after)}
    machine = used.pop("machine", 0.0)
    used["elsewhere"] = max(0.0, machine - sum(used.values()))
    return {k: round(v, 3) for k, v in used.items() if v > 0.0005}
