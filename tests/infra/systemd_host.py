"""Throwaway "fresh Debian 12 server" containers that boot systemd, for the Ansible/testinfra tiers.

The image comes from ``tests/infra/docker-ready.sh`` (``trackgate/systemd-host:bookworm``:
systemd-host.Dockerfile on the local base image, with systemd, dbus, python3, python3-apt, sudo,
and the host's apt mirror configured). ``--privileged`` does not work on our machines; systemd
runs with ``--cap-add SYS_ADMIN``, tmpfs ``/run`` and a read-only ``/sys/fs/cgroup`` instead.

Networking: dockerd runs with ``--iptables=false``, so a container on the default bridge has no
outbound network (``apt-get update`` inside it hangs). Pass ``network="host"`` when the target must
reach the Debian mirror (e.g. a playbook that installs packages); its services then listen directly
on the host's ports. Otherwise publish ports, always on loopback only.

Example::

    from tests.infra.systemd_host import systemd_host, restart

    with systemd_host("tg-target", ports={443: 18443}) as name:
        # ansible -i f"{name}," -c community.docker.docker ...   /  testinfra: f"docker://{name}"
        restart(name)
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence

from .ready import SYSTEMD_IMAGE

DEFAULT_IMAGE = SYSTEMD_IMAGE
BOOT_TIMEOUT = 120.0
LABEL = "trackgate.test=systemd-host"

# What systemd needs to run as PID 1 in a container here (no --privileged). --tty gives systemd a
# console, so its boot status lines land in `docker logs` (the image masks console-getty).
SYSTEMD_RUN_ARGS: tuple[str, ...] = (
    "--tty",
    "--cap-add",
    "SYS_ADMIN",
    "--tmpfs",
    "/run",
    "--tmpfs",
    "/run/lock",
    "-v",
    "/sys/fs/cgroup:/sys/fs/cgroup:ro",
)


class SystemdHostError(RuntimeError):
    """The container did not start or systemd did not reach running/degraded in time."""


def _docker(
    *args: str, timeout: float = 60.0, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run ``docker ARGS`` and capture its output; raise SystemdHostError when ``check`` fails."""
    try:
        proc = subprocess.run(
            ["docker", *args], capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise SystemdHostError(f"docker {' '.join(args)}: timed out after {timeout:.0f}s") from exc
    if check and proc.returncode != 0:
        raise SystemdHostError(
            f"docker {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}"
        )
    return proc


def _is_running(name: str) -> bool:
    proc = _docker("inspect", "-f", "{{.State.Running}}", name, check=False, timeout=20)
    return proc.returncode == 0 and proc.stdout.strip() == "true"


def wait_for_systemd(name: str, timeout: float = BOOT_TIMEOUT) -> str:
    """Wait until ``systemctl is-system-running`` in container ``name`` is running or degraded.

    Returns that state. Raises SystemdHostError on timeout, on a failed boot (maintenance,
    stopping, ...) or when the container exits.
    """
    deadline = time.monotonic() + timeout
    last = ""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise SystemdHostError(f"{name}: systemd not up after {timeout:.0f}s (last: {last!r})")
        if not _is_running(name):
            raise SystemdHostError(f"{name}: container is not running (last: {last!r})")
        try:
            # --wait blocks until start-up finished; right after `docker run` the bus may not
            # exist yet ("Failed to connect to bus"), so retry until the deadline.
            proc = subprocess.run(
                ["docker", "exec", name, "systemctl", "is-system-running", "--wait"],
                capture_output=True,
                text=True,
                timeout=max(1.0, min(remaining, 30.0)),
                check=False,
            )
            output = proc.stdout.strip() or proc.stderr.strip()
            last = output.splitlines()[-1] if output else f"exit {proc.returncode}"
        except subprocess.TimeoutExpired:
            last = "timeout waiting for systemctl"
            continue
        if last in ("running", "degraded"):
            return last
        # "offline" (no manager answering yet) is also what a host reports in its first moments
        # under load: like the missing bus, it is retried until the deadline.
        if last in ("maintenance", "stopping"):
            raise SystemdHostError(f"{name}: systemd state {last!r}")
        time.sleep(0.5)


def restart(name: str, timeout: float = BOOT_TIMEOUT) -> str:
    """``docker restart`` the host (systemd gets SIGRTMIN+3, a clean shutdown) and wait for boot.

    Returns the systemd state after the restart (running or degraded). Ports published with
    host port 0 get a new host port on restart: look it up again with :func:`host_port`.
    """
    _docker("restart", "-t", "30", name, timeout=90)
    return wait_for_systemd(name, timeout)


def host_port(name: str, container_port: int, proto: str = "tcp") -> int:
    """The loopback host port published for ``container_port`` (useful with host port 0)."""
    out = _docker("port", name, f"{container_port}/{proto}", timeout=20).stdout
    for line in out.splitlines():
        addr, _, port = line.strip().rpartition(":")
        if addr == "127.0.0.1":
            return int(port)
    raise SystemdHostError(f"{name}: {container_port}/{proto} is not published on 127.0.0.1")


def _print_diagnostics(name: str, lines: int = 60) -> None:
    """Print the tail of ``docker logs``, failed units and the journal of ``name`` to stderr."""
    logs = _docker("logs", "--tail", str(lines), name, check=False, timeout=20)
    print(f"----- docker logs --tail {lines} {name} -----", file=sys.stderr)
    print((logs.stdout + logs.stderr).rstrip(), file=sys.stderr)
    if _is_running(name):
        failed = _docker(
            "exec", name, "systemctl", "--failed", "--no-pager", check=False, timeout=20
        )
        print(f"----- systemctl --failed ({name}) -----", file=sys.stderr)
        print((failed.stdout + failed.stderr).rstrip(), file=sys.stderr)
        journal = _docker(
            "exec", name, "journalctl", "-n", str(lines), "--no-pager", check=False, timeout=20
        )
        print(f"----- journalctl -n {lines} ({name}) -----", file=sys.stderr)
        print((journal.stdout + journal.stderr).rstrip(), file=sys.stderr)


@contextlib.contextmanager
def systemd_host(
    name: str,
    image: str = DEFAULT_IMAGE,
    ports: dict[int, int] | None = None,
    *,
    network: str | None = None,
    boot_timeout: float = BOOT_TIMEOUT,
    extra_args: Sequence[str] = (),
) -> Iterator[str]:
    """Run a systemd container named ``name``, wait for it to boot, yield the name, remove it.

    ``ports`` maps container port -> host port (like the docker SDK); each is published as
    ``-p 127.0.0.1:HOST:CONTAINER`` (loopback only; host port 0 lets docker choose, see
    :func:`host_port`). ``network="host"`` shares the host's network stack instead, which is the
    only way for the container to reach the apt mirror (no NAT here); it excludes ``ports``.
    ``extra_args`` go to ``docker run`` before the image (volumes, env, ...).

    An existing container with the same name (left over from a crashed run) is removed first.
    On any error, ``docker logs`` tail and failed units are printed; the container is always
    removed with ``docker rm -f``.
    """
    if network == "host" and ports:
        raise ValueError("ports cannot be published with network='host'")
    if _docker("image", "inspect", image, check=False, timeout=20).returncode != 0:
        raise SystemdHostError(f"image {image} missing: run tests/infra/docker-ready.sh")

    args: list[str] = ["run", "-d", "--name", name, "--label", LABEL, *SYSTEMD_RUN_ARGS]
    if network:
        args += ["--network", network]
    if network != "host":
        args += ["--hostname", name]
    for container_port, host in (ports or {}).items():
        args += ["-p", f"127.0.0.1:{host or ''}:{container_port}"]
    args += [*extra_args, image]

    _docker("rm", "-f", name, check=False, timeout=60)
    try:
        _docker(*args, timeout=60)
        wait_for_systemd(name, boot_timeout)
        yield name
    except GeneratorExit:
        raise
    except BaseException:  # also pytest.fail()/skip outcomes and KeyboardInterrupt
        _print_diagnostics(name)
        raise
    finally:
        # A loaded machine has taken over a minute to stop a systemd container.
        _docker("rm", "-f", "-v", name, check=False, timeout=300)
