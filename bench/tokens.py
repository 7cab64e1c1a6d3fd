"""API tokens vs cached basic auth, side by side (issue 15): "as fast as cached basic auth".

    .venv/bin/python -m bench.tokens [--blocks 30] [--calls 30]

Two measurements, calls alternated variant by variant in blocks (the order flips each block),
ratio token/basic per block, median and spread of the blocks:

- **gateway**: the auth gateway's WSGI app called in this process (no nginx, no network): CPU
  time per `/auth` answer for `Authorization: Basic` (answered from the credential cache after
  the first bcrypt) and for `Authorization: Bearer <token>` (sha256 + dict lookup);
- **end to end**: one real stack (`trackgate up`: nginx + TLS + gateway + gunicorn/MLflow), one
  keep-alive HTTPS session per variant, `experiments/search` wall time per call.
"""

from __future__ import annotations

import argparse
import base64
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from trackgate.settings import Settings
from trackgate.tokens import TokenStore
from trackgate.users import HtpasswdStore

from tests.support import running_stack, session_from

USER, PASSWORD = "bench", "bench-password-123"


def _alternate(variants: dict[str, Callable[[], None]], blocks: int, calls: int,
               clock: Callable[[], float]) -> list[float]:
    """Ratios second/first variant per block (time per call by CLOCK)."""
    names = list(variants)
    ratios = []
    for block in range(blocks):
        order = names if block % 2 == 0 else names[::-1]
        per_call: dict[str, float] = {}
        for name in order:
            start = clock()
            for _ in range(calls):
                variants[name]()
            per_call[name] = (clock() - start) / calls
        ratios.append(per_call[names[1]] / per_call[names[0]])
        if block == 0:
            shown = ", ".join(f"{n} {v * 1e6:.0f} us" for n, v in per_call.items())
            print(f"  first block: {shown}")
    return ratios


def _summary(label: str, ratios: list[float]) -> str:
    q = statistics.quantiles(ratios, n=4)
    return (f"{label}: token/basic median {statistics.median(ratios):.3f} "
            f"(middle half {q[0]:.3f}-{q[2]:.3f}, extremes {min(ratios):.3f}-{max(ratios):.3f}, "
            f"{len(ratios)} blocks)")


def gateway(work: Path, blocks: int, calls: int) -> list[float]:
    from trackgate.server.gateway import create_app

    settings = Settings(data_dir=work, bcrypt_rounds=12)
    settings.logs.mkdir(parents=True, exist_ok=True)  # type: ignore[union-attr]
    HtpasswdStore(settings.htpasswd, settings.bcrypt_rounds).add(USER, PASSWORD)
    token = TokenStore(settings.tokens_file).add(USER, "bench", 3600)
    app = create_app(settings)
    basic = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()

    def call(header: str) -> Callable[[], None]:
        environ: dict[str, Any] = {"PATH_INFO": "/auth", "REQUEST_METHOD": "GET",
                                   "HTTP_X_REAL_IP": "127.0.0.1", "HTTP_AUTHORIZATION": header}

        def once() -> None:
            status: list[str] = []
            app(dict(environ), lambda s, h: status.append(s))
            assert status[0].startswith("204"), status

        return once

    call(basic)()  # the one bcrypt check; afterwards Basic is answered from the cache
    return _alternate({"basic": call(basic), "token": call(f"Bearer {token}")},
                      blocks, calls, time.process_time)


def end_to_end(work: Path, blocks: int, calls: int) -> list[float]:
    with running_stack(work) as stack:
        stack.users.add(USER, PASSWORD)
        token = TokenStore(stack.settings.tokens_file).add(USER, "bench", 3600)
        url = stack.url + "/api/2.0/mlflow/experiments/search?max_results=1"
        sessions = {"basic": session_from("127.0.0.1"), "token": session_from("127.0.0.1")}
        sessions["basic"].auth = (USER, PASSWORD)
        sessions["token"].headers["Authorization"] = f"Bearer {token}"

        def call(name: str) -> Callable[[], None]:
            def once() -> None:
                answer = sessions[name].get(url, verify=str(stack.ca), timeout=30)
                assert answer.status_code == 200, answer.text

            return once

        for name in sessions:
            call(name)()  # connect, and the one bcrypt check
        return _alternate({"basic": call("basic"), "token": call("token")},
                          blocks, calls, time.perf_counter)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=30)
    parser.add_argument("--calls", type=int, default=30)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="trackgate-bench-tokens-"))
    work.chmod(0o711)  # as root the stack runs as the service account, which must get in
    (work / "gateway").mkdir()
    print("gateway (/auth, CPU per answer, in process):")
    results = [_summary("gateway", gateway(work / "gateway", args.blocks, args.calls * 20))]
    print("end to end (nginx + TLS + gateway + MLflow, wall time per call):")
    results.append(_summary("end to end", end_to_end(work / "stack", args.blocks, args.calls)))
    print("\n".join(results))


if __name__ == "__main__":
    main()
