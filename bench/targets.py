"""The four servers the benchmark compares, each started on free loopback ports and stopped by PID.

- bare: plain `mlflow.server:app` under trackgate's gunicorn options (bench/bare_mlflow.py), no
  proxy, no auth, no policy layer;
- trackgate: the full stack (`trackgate up`: nginx + TLS + auth gateway + the same gunicorn,
  with the policy layer: artifact roots, roles, owners, audit log);
- textbook: nginx `auth_basic` with a bcrypt-12 htpasswd and TLS in front of the *bare* gunicorn;
- tls-proxy: the same nginx and TLS with no auth at all: what any proxy costs here;
- mlflow-auth: MLflow's basic-auth app (`mlflow.server.auth:create_app`) with its credential cache
  on, under the same gunicorn options (see bench/mlflow_auth.py).
"""

from __future__ import annotations

import contextlib
import http.client
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from trackgate import tls
from trackgate.local.stack import running_pid
from trackgate.nginx import find_binary as find_nginx
from trackgate.settings import Settings
from trackgate.users import HtpasswdStore

from tests.support import RunningStack, clean_env, free_port, running_stack

from . import cpu

BCRYPT_ROUNDS = 12
START_TIMEOUT = 90.0
USER = "bench"


@dataclass
class Target:
    """One server as a client sees it: where it is and how to log in."""

    name: str
    url: str
    username: str | None = None
    password: str | None = None
    ca_file: Path | None = None
    htpasswd: Path | None = None  # where extra (flood-target) users go, for htpasswd servers
    root_pid: int | None = None  # the process tree serving it, for CPU accounting
    stack: RunningStack | None = None  # trackgate stacks: settings, users, CA

    @property
    def tls(self) -> bool:
        return self.url.startswith("https://")

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or "127.0.0.1"

    @property
    def port(self) -> int:
        return int(urlsplit(self.url).port or (443 if self.tls else 80))

    @property
    def needs_auth(self) -> bool:
        return self.username is not None

    def client_env(self) -> dict[str, str]:
        """What a user exports before running a training script against this server."""
        env = {"MLFLOW_TRACKING_URI": self.url}
        if self.username is not None and self.password is not None:
            env["MLFLOW_TRACKING_USERNAME"] = self.username
            env["MLFLOW_TRACKING_PASSWORD"] = self.password
        if self.ca_file is not None:
            env["MLFLOW_TRACKING_SERVER_CERT_PATH"] = str(self.ca_file)
        return env


def _wait_http_ok(port: int, proc: subprocess.Popen[bytes], what: str, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited ({proc.returncode}) at start; see {log}")
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        try:
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        finally:
            conn.close()
        time.sleep(0.3)
    raise RuntimeError(f"{what} not healthy after {START_TIMEOUT:.0f} s; see {log}")


def _stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 30.0) -> None:
    """Stop one process we started, by its PID; escalate to SIGKILL of its own session."""
    if proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # started with start_new_session: only its own group
        proc.wait(10)


def _spawn(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        return subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def tracking_settings(data_dir: Path, port: int) -> Settings:
    """Settings of a standalone tracking server: trackgate's defaults (workers, threads)."""
    return Settings(data_dir=data_dir, hostname="localhost", internal_transport="tcp",
                    internal_host="127.0.0.1", tracking_port=port, log_dir=data_dir / "logs")


@contextlib.contextmanager
def bare_gunicorn(work: Path) -> Iterator[Target]:
    """Plain MLflow under the gunicorn options the stack uses (bench/bare_mlflow.py), on a free
    port: no policy layer, no nginx, no TLS."""
    port = free_port()
    base = work / "bare"
    log = base / "serve.out"
    proc = _spawn([sys.executable, "-m", "bench.bare_mlflow", str(base), str(port)],
                  clean_env(), log)
    try:
        _wait_http_ok(port, proc, "bare gunicorn", log)
        yield Target("bare", f"http://127.0.0.1:{port}", root_pid=proc.pid)
    finally:
        _stop(proc)


@contextlib.contextmanager
def trackgate_stack(work: Path, name: str = "trackgate", **overrides: str) -> Iterator[Target]:
    """The real stack via `trackgate up`, with a bcrypt-12 user of its own; `overrides` are
    settings fields (e.g. gateway_server), for the variants compared side by side."""
    settings = {"bcrypt_rounds": BCRYPT_ROUNDS, **overrides}
    with running_stack(work / name, **settings) as stack:
        password = secrets.token_urlsafe(12)
        stack.users.add(USER, password)
        yield Target(name, stack.url, USER, password, stack.ca, stack.settings.htpasswd,
                     running_pid(stack.settings), stack=stack)


# A benchmark fixture, not product config: the minimal "nginx auth_basic + bcrypt" setup found in
# tutorials, plus what any real deployment needs anyway (TLS, upstream keepalive, no body limit),
# so that the only difference from trackgate is where and how often bcrypt runs.
_TEXTBOOK_CONF = """\
{user}worker_processes auto;
pid {run}/nginx.pid;
error_log {run}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log {run}/access.log;
    client_body_temp_path {run}/client_body;
    proxy_temp_path {run}/proxy;
    fastcgi_temp_path {run}/fastcgi;
    uwsgi_temp_path {run}/uwsgi;
    scgi_temp_path {run}/scgi;
    upstream mlflow {{ server {upstream}; keepalive 32; }}
    server {{
        listen 127.0.0.1:{port} ssl;
        server_name localhost;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;
        client_max_body_size 0;
        proxy_request_buffering off;
        proxy_read_timeout 900s;
        proxy_send_timeout 900s;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_set_header Host $http_host;
        location = /health {{ proxy_pass http://mlflow; }}
        location / {{
{auth}            proxy_pass http://mlflow;
        }}
    }}
}}
"""


@contextlib.contextmanager
def textbook_nginx(work: Path, upstream_port: int, auth: bool = True) -> Iterator[Target]:
    """nginx `auth_basic` (bcrypt-12 htpasswd, checked on every request) + TLS, in front of
    the bare gunicorn on `upstream_port`. Without `auth`: the same nginx and TLS with no auth
    at all ("tls-proxy"), the floor any authenticating proxy on this machine stands on."""
    name = "textbook" if auth else "tls-proxy"
    base = work / name
    run = base / "run"
    run.mkdir(parents=True, exist_ok=True)
    # Only the local-CA certificate helper is reused; the tracking port is never started here.
    cert_settings = Settings(data_dir=base, hostname="localhost")
    tls.ensure_certificates(cert_settings)
    password = secrets.token_urlsafe(12)
    store = HtpasswdStore(base / "htpasswd", BCRYPT_ROUNDS)
    store.add(USER, password)
    port = free_port()
    conf = run / "nginx.conf"
    conf.write_text(_TEXTBOOK_CONF.format(
        # Workers read the htpasswd file on every request: as root, let them run as root here
        # (a throwaway fixture) instead of opening the benchmark's temp dirs to www-data.
        user="user root;\n" if os.geteuid() == 0 else "",
        run=run, upstream=f"127.0.0.1:{upstream_port}", port=port,
        cert=cert_settings.cert_file, key=cert_settings.key_file,
        auth=(f'            auth_basic "MLflow";\n'
              f"            auth_basic_user_file {store.path};\n") if auth else "",
    ))
    nginx = find_nginx(cert_settings)
    subprocess.run([nginx, "-t", "-q", "-c", str(conf), "-p", str(run)], check=True)
    log = run / "nginx.out"
    proc = _spawn([nginx, "-c", str(conf), "-p", str(run), "-g", "daemon off;"], clean_env(), log)
    try:
        _wait_tls_up(port, proc, log)
        if auth:
            yield Target(name, f"https://localhost:{port}", USER, password,
                         cert_settings.ca_cert, store.path, proc.pid)
        else:
            yield Target(name, f"https://localhost:{port}", ca_file=cert_settings.ca_cert,
                         root_pid=proc.pid)
    finally:
        _stop(proc, signal.SIGQUIT)  # nginx's graceful stop


def _wait_tls_up(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    import socket

    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"textbook nginx exited ({proc.returncode}); see {log}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return
        time.sleep(0.2)
    raise RuntimeError(f"textbook nginx did not listen in {START_TIMEOUT:.0f} s; see {log}")


@contextlib.contextmanager
def mlflow_basic_auth(work: Path) -> Iterator[Target]:
    """MLflow's own basic-auth app with `auth_cache_ttl_seconds` on (it is off by default)."""
    base = work / "mlflow-auth"
    port = free_port()
    password = secrets.token_urlsafe(12)
    log = base / "serve.out"
    argv = [sys.executable, "-m", "bench.mlflow_auth", str(base), str(port)]
    env = clean_env(MLFLOW_AUTH_ADMIN_USERNAME=USER, MLFLOW_AUTH_ADMIN_PASSWORD=password,
                    MLFLOW_FLASK_SERVER_SECRET_KEY=secrets.token_hex(16))
    proc = _spawn(argv, env, log)
    try:
        _wait_http_ok(port, proc, "MLflow basic-auth app", log)
        yield Target("mlflow-auth", f"http://127.0.0.1:{port}", USER, password,
                     root_pid=proc.pid)
    finally:
        _stop(proc)


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def cache_auth_answers(target: Target) -> None:
    """Bench-only variant (b) of issue 18: nginx caches the gateway's 204 per Authorization
    value (the rendered config of a running stack patched, nginx reloaded). The raw header as
    key is an upper bound on speed: an HMAC of it (set-misc) costs nginx microseconds more.
    It is not shipped: a changed password would stay valid until the entry expires or a
    reload, and roles changes likewise."""
    assert target.stack is not None
    settings = target.stack.settings
    cache = settings.nginx_runtime_dir / "nginx-temp" / "bench-auth-cache"
    text = settings.nginx_conf.read_text()
    zone = (f"proxy_cache_path {cache} levels=1:2 keys_zone=bench_auth:10m max_size=50m "
            "inactive=15m;\n    upstream trackgate_tracking {")
    text = _replaced(text, "upstream trackgate_tracking {", zone)
    auth = ("location = /_trackgate/auth {\n            internal;\n"
            "            proxy_cache bench_auth;\n"
            "            proxy_cache_key $http_authorization;\n"
            "            proxy_cache_valid 204 15m;\n")
    text = _replaced(text, "location = /_trackgate/auth {\n            internal;\n", auth)
    _reload_with(target, text)


def skip_auth_hop(target: Target, role: str = "editor") -> None:
    """Bench-only: the stack with no auth subrequest at all; nginx names the bench user itself.
    The upper bound of any design that verifies credentials without a round trip to the
    gateway (in nginx, or inside the tracking server): TLS, the proxy, the metrics line and the
    tracking server's policy, roles and audit layers stay. Never a real configuration: anyone
    who reaches it is the bench user."""
    assert target.stack is not None
    text = _replaced(target.stack.settings.nginx_conf.read_text(),
                     "auth_request /_trackgate/auth;",
                     f'auth_request off; set $trackgate_user "{USER}"; '
                     f'set $trackgate_role "{role}"; set $trackgate_via "basic";', count=-1)
    _reload_with(target, text)


def _replaced(text: str, old: str, new: str, count: int = 1) -> str:
    if old not in text:
        raise RuntimeError(f"{old.strip()!r} was not found in the rendered nginx.conf")
    return text.replace(old, new, count)


def _reload_with(target: Target, text: str) -> None:
    """A running stack's nginx with its rendered config patched (bench-only variants)."""
    from trackgate import nginx as tg_nginx

    assert target.stack is not None
    target.stack.settings.nginx_conf.write_text(text)
    tg_nginx.reload(target.stack.settings)
    time.sleep(1.5)


def mlflow_clients(stacks: dict[str, RunningStack], work: Path, password: str) -> dict[str, Any]:
    """One MlflowClient per stack, with its own run; one CA bundle and user for all."""
    bundle = work / "ca-bundle.pem"
    bundle.write_text("".join(s.ca.read_text() for s in stacks.values()))
    for running in stacks.values():
        running.users.add(USER, password)
    os.environ.update(MLFLOW_TRACKING_USERNAME=USER, MLFLOW_TRACKING_PASSWORD=password,
                      MLFLOW_TRACKING_SERVER_CERT_PATH=str(bundle),
                      MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="60")
    from mlflow import MlflowClient

    clients = {}
    for name, running in stacks.items():
        client = MlflowClient(tracking_uri=running.url)
        experiment = client.create_experiment(f"bench-{name}")
        run_id = client.create_run(experiment).info.run_id
        for step in range(20):  # warm: the credential cache, connections, MLflow's caches
            client.log_metric(run_id, "warmup", 0.0, step=step)
        clients[name] = (client, run_id)
    return clients


def server_cpu(stacks: dict[str, RunningStack], name: str) -> float:
    pid = running_pid(stacks[name].settings)
    used = cpu.snapshot(pid, [], None)
    return sum(v for k, v in used.items() if k != "machine")


def measure_log_metric(stacks: dict[str, RunningStack], clients: dict[str, Any],
                       variants: tuple[str, ...], blocks: int, calls: int, max_seconds: float,
                       min_blocks: int = 20) -> dict[str, Any]:
    """log_metric through each stack in turn, block by block (the order rotating), at least
    min_blocks blocks, then until max_seconds: calls/s per block, server CPU, 1-min loads."""
    rates: dict[str, list[float]] = {name: [] for name in variants}
    cpu_s = dict.fromkeys(variants, 0.0)
    done = dict.fromkeys(variants, 0)
    loads = [os.getloadavg()[0]]
    deadline = time.monotonic() + max_seconds
    step = 0
    for block in range(max(blocks, min_blocks)):
        if block >= min_blocks and time.monotonic() > deadline:
            break
        order = variants[block % len(variants):] + variants[:block % len(variants)]
        for name in order:
            client, run_id = clients[name]
            before = server_cpu(stacks, name)
            began = time.perf_counter()
            for i in range(calls):
                client.log_metric(run_id, "loss", 1.0 / (step + i + 1), step=step + i)
            elapsed = time.perf_counter() - began
            cpu_s[name] += server_cpu(stacks, name) - before
            done[name] += calls
            rates[name].append(calls / elapsed)
        step += calls
        loads.append(os.getloadavg()[0])
    return {"rates": rates, "cpu_s": cpu_s, "calls": done, "loads": loads}
