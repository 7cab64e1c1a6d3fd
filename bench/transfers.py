"""Artifact transfers with curl, and revocation latency (issue 18).

- **download**: one large artifact through trackgate (TLS, auth, the tracking server decides,
  nginx sends the file) against nginx serving the same file over TLS with no auth at all
  (`static_nginx`, the practical limit: nginx pays ~1 CPU-s per GiB for TLS here), interleaved
  pair by pair; ratio per pair, median.
- **upload**: `curl -T` through trackgate against straight to bare gunicorn (no TLS, no proxy),
  interleaved; trackgate as shipped (a local store: nginx writes the body to a file beside the
  artifact root and the tracking server links it into place, server/uploads.py) and, when given,
  a second stack with `artifact_uploads=tracking` (nginx buffers the body and passes it to
  MLflow, whose reads of gunicorn's body come in 1 MiB pieces): the path of S3 stores and of
  nginx on another host or container.
- **revocation**: a client repeats a cached credential as fast as it can while
  `trackgate users passwd` runs; the latency is the time from the command's return to the
  start of the first refused request, and every request started after the return must be
  refused.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import requests
from trackgate import nginx as tg_nginx
from trackgate import tls
from trackgate.settings import Settings

from tests.support import clean_env, free_port

from . import targets as tg

_STATIC_CONF = """\
{user}worker_processes auto;
pid {run}/nginx.pid;
error_log {run}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log {run}/access.log;
    sendfile on;
    tcp_nopush on;
    client_body_temp_path {run}/client_body;
    proxy_temp_path {run}/proxy;
    fastcgi_temp_path {run}/fastcgi;
    uwsgi_temp_path {run}/uwsgi;
    scgi_temp_path {run}/scgi;
    server {{
        listen 127.0.0.1:{port} ssl;
        server_name localhost;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;
        output_buffers 4 1m;
        location / {{ root {root}; }}
    }}
}}
"""


@contextlib.contextmanager
def static_nginx(work: Path, root: Path) -> Iterator[tg.Target]:
    """nginx serving ROOT's files over TLS, no auth: the limit a download through trackgate
    is measured against (same nginx, same TLS policy defaults, same output_buffers)."""
    base = work / "static"
    run = base / "run"
    run.mkdir(parents=True, exist_ok=True)
    cert_settings = Settings(data_dir=base, hostname="localhost")
    tls.ensure_certificates(cert_settings)
    port = free_port()
    conf = run / "nginx.conf"
    conf.write_text(_STATIC_CONF.format(
        user="user root;\n" if os.geteuid() == 0 else "", run=run, port=port, root=root,
        cert=cert_settings.cert_file, key=cert_settings.key_file))
    binary = tg_nginx.find_binary(cert_settings)
    subprocess.run([binary, "-t", "-q", "-c", str(conf), "-p", str(run)], check=True)
    proc = subprocess.Popen([binary, "-c", str(conf), "-p", str(run), "-g", "daemon off;"],
                            env=clean_env(), stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        tg._wait_tls_up(port, proc, run / "error.log")  # type: ignore[arg-type]
        yield tg.Target("static", f"https://localhost:{port}", ca_file=cert_settings.ca_cert,
                        root_pid=proc.pid)
    finally:
        tg._stop(proc, signal.SIGQUIT)  # type: ignore[arg-type]


def _curl(argv: list[str]) -> tuple[float, int]:
    """(seconds, HTTP status) of one curl transfer."""
    out = subprocess.run(["curl", "-sS", "-o", "/dev/null", "-w", "%{time_total} %{http_code}",
                          *argv], capture_output=True, text=True, timeout=1800, check=True)
    seconds, status = out.stdout.split()
    return float(seconds), int(status)


def _auth(target: tg.Target) -> list[str]:
    args = ["--cacert", str(target.ca_file)] if target.ca_file else []
    if target.username:
        args += ["-u", f"{target.username}:{target.password}"]
    return args


ARTIFACTS = "/api/2.0/mlflow-artifacts/artifacts"


def upload(target: tg.Target, source: Path, name: str) -> float:
    seconds, status = _curl([*_auth(target), "-T", str(source),
                             f"{target.url}{ARTIFACTS}/bench/{name}"])
    if status != 200:
        raise RuntimeError(f"upload to {target.name}: HTTP {status}")
    return seconds


def download(target: tg.Target, path: str) -> float:
    seconds, status = _curl([*_auth(target), f"{target.url}{path}"])
    if status != 200:
        raise RuntimeError(f"download from {target.name} {path}: HTTP {status}")
    return seconds


def _remove(target: tg.Target, name: str) -> None:
    """Drop an uploaded file from the store (as root: the bench owns these stacks)."""
    assert target.stack is not None
    with contextlib.suppress(FileNotFoundError):
        (Path(target.stack.settings.artifacts_uri) / "bench" / name).unlink()


def measure(bare: tg.Target, trackgate: tg.Target, work: Path, size: int, rounds: int,
            through_mlflow: tg.Target | None = None) -> dict[str, Any]:
    """Uploads (direct, trackgate as shipped, and trackgate with the body through MLflow if
    given) and downloads (trackgate vs static nginx), interleaved round by round."""
    source = work / "transfer.bin"
    with open(source, "wb") as f:
        f.truncate(size)  # zeros, sparse: nothing on the path compresses them
    assert trackgate.stack is not None
    artifact_root = Path(trackgate.stack.settings.artifacts_uri)
    bare_root = work / "bare" / "artifacts"
    result: dict[str, Any] = {"bytes": size, "upload": {}, "download": {}}
    targets = {"direct": bare, "shipped": trackgate}
    if through_mlflow is not None:
        targets["mlflow"] = through_mlflow
    up: dict[str, list[float]] = {name: [] for name in targets}
    # The file to download: uploaded through trackgate, so it is the store's own file.
    upload(trackgate, source, "download.bin")
    with static_nginx(work, artifact_root) as static:
        down: dict[str, list[float]] = {"trackgate": [], "static": []}
        for _ in range(rounds):
            down["trackgate"].append(download(trackgate, f"{ARTIFACTS}/bench/download.bin"))
            down["static"].append(download(static, "/bench/download.bin"))
            print(f"  download trackgate {down['trackgate'][-1]:.2f} s, nginx static "
                  f"{down['static'][-1]:.2f} s", flush=True)
    names = list(targets)
    for round_no in range(rounds):
        shift = round_no % len(names)  # the order rotated each round
        for variant in names[shift:] + names[:shift]:
            target = targets[variant]
            name = f"up-{round_no}-{variant}.bin"
            up[variant].append(upload(target, source, name))
            if variant == "direct":
                with contextlib.suppress(FileNotFoundError):
                    (bare_root / "bench" / name).unlink()
            else:
                _remove(target, name)
        print("  upload " + ", ".join(f"{v} {up[v][-1]:.2f} s" for v in names)
              + f" (load {os.getloadavg()[0]:.1f})", flush=True)
    _remove(trackgate, "download.bin")
    source.unlink()
    result["download"] = {k: v for k, v in down.items()}
    result["download_ratios"] = [a / b for a, b in zip(down["trackgate"], down["static"],
                                                        strict=True)]
    result["upload"] = up
    for variant in names[1:]:
        result[f"upload_ratio_{variant}"] = [d / t for d, t in zip(up["direct"], up[variant],
                                                                   strict=True)]
    return result


def revocation(trackgate: tg.Target, seconds_after: float = 1.0) -> dict[str, Any]:
    """Time from `trackgate users passwd` returning to the first refusal of the old password,
    with a client repeating the old (cached) credential meanwhile."""
    assert trackgate.stack is not None
    stack = trackgate.stack
    name, old = stack.new_user("revoked")
    answers: list[tuple[float, int]] = []
    stop = threading.Event()

    def hammer() -> None:
        with requests.Session() as session:
            while not stop.is_set():
                began = time.monotonic()
                # verify per request: a REQUESTS_CA_BUNDLE in the environment beats session.verify
                answer = session.get(stack.url + "/version", auth=(name, old), timeout=30,
                                     verify=str(stack.ca))
                answers.append((began, answer.status_code))

    thread = threading.Thread(target=hammer, daemon=True)
    thread.start()
    time.sleep(1.0)  # cached and answered from memory by now
    new = secrets.token_urlsafe(12)
    cli = [sys.executable, "-m", "trackgate", "users", "passwd", name, "--password-stdin",
           "--data-dir", str(stack.settings.data_dir)]
    began = time.monotonic()
    subprocess.run(cli, input=new + "\n", text=True, capture_output=True, check=True,
                   env=clean_env(), cwd="/")
    returned = time.monotonic()
    time.sleep(seconds_after)
    stop.set()
    thread.join(60)
    if not answers:
        raise RuntimeError("the revocation client got no answer (see the traceback above)")
    before = [s for t, s in answers if t < returned]
    after = [(t, s) for t, s in answers if t >= returned]
    refused = [t for t, s in after if s != 200]
    first = (min(refused) - returned) if refused else float("nan")
    return {"command_s": returned - began, "before_ok": before.count(200),
            "after": len(after), "after_ok": sum(1 for _, s in after if s == 200),
            "first_refusal_ms": 1000 * first,
            # a request that started before the return may still see the old state: how late
            "last_ok_ms": 1000 * max((t - returned for t, s in answers if s == 200),
                                     default=float("nan"))}


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
