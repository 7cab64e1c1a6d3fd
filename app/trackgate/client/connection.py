"""Client side: point plain MLflow code at a trackgate server, and say precisely what is wrong.

`configure()` is the one call a training script makes: it maps the short `TRACKING_URI`,
`TRACKING_USERNAME`, `TRACKING_PASSWORD` (and `TRACKING_SERVER_CERT_PATH`) names, from the
environment or a `.env` file, onto MLflow's own `MLFLOW_TRACKING_*` variables.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import requests
import urllib3
from dotenv import dotenv_values, set_key

# MLflow's variable <- the shorter alias users may set instead.
ALIASES = {
    "MLFLOW_TRACKING_URI": "TRACKING_URI",
    "MLFLOW_TRACKING_USERNAME": "TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD": "TRACKING_PASSWORD",
    "MLFLOW_TRACKING_SERVER_CERT_PATH": "TRACKING_SERVER_CERT_PATH",
    "MLFLOW_TRACKING_INSECURE_TLS": "TRACKING_INSECURE_TLS",
    # An API token (`trackgate tokens create`), sent as Bearer instead of a password.
    "MLFLOW_TRACKING_TOKEN": "TRACKING_TOKEN",
}
USER_ENV_FILE = Path("~/.config/trackgate/credentials.env")


class ClientError(RuntimeError):
    """The tracking server cannot be used as configured; the message says how to fix it."""


@dataclass(frozen=True)
class TrackingConfig:
    uri: str | None
    username: str | None
    password: str | None = None
    cert_path: str | None = None
    insecure_tls: bool = False
    token: str | None = None

    def __repr__(self) -> str:  # never print the password or token
        shown = "***" if self.password else None
        return (
            f"TrackingConfig(uri={self.uri!r}, username={self.username!r}, "
            f"password={shown!r}, cert_path={self.cert_path!r}, "
            f"token={'***' if self.token else None!r})"
        )


def _sources(env_file: str | Path | None) -> list[dict[str, str | None]]:
    """Where values come from, first wins: the environment, ./.env, the user's login file."""
    sources: list[dict[str, str | None]] = [dict(os.environ)]
    for path in (env_file, USER_ENV_FILE):
        if path is not None and Path(path).expanduser().is_file():
            sources.append(dotenv_values(Path(path).expanduser()))
    return sources


def resolve(env_file: str | Path | None = ".env") -> TrackingConfig:
    """What MLflow would use, after aliases and env files, without changing anything."""
    values: dict[str, str] = {}
    for mlflow_name, alias in ALIASES.items():
        for source in _sources(env_file):
            value = source.get(mlflow_name) or source.get(alias)
            if value:
                values[mlflow_name] = value
                break
    return TrackingConfig(
        uri=values.get("MLFLOW_TRACKING_URI"),
        username=values.get("MLFLOW_TRACKING_USERNAME"),
        password=values.get("MLFLOW_TRACKING_PASSWORD"),
        cert_path=values.get("MLFLOW_TRACKING_SERVER_CERT_PATH"),
        insecure_tls=values.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() == "true",
        token=values.get("MLFLOW_TRACKING_TOKEN"),
    )


def configure(env_file: str | Path | None = ".env", *, require: bool = True) -> TrackingConfig:
    """Set MLflow's variables from the environment, aliases and env files; return them.

    Variables already set in the environment win over files. With `require`, a missing URI or
    a username without password raises ClientError instead of silently logging to ./mlruns.
    """
    config = resolve(env_file)
    for name, value in (
        ("MLFLOW_TRACKING_URI", config.uri),
        ("MLFLOW_TRACKING_USERNAME", config.username),
        ("MLFLOW_TRACKING_PASSWORD", config.password),
        ("MLFLOW_TRACKING_SERVER_CERT_PATH", config.cert_path),
        ("MLFLOW_TRACKING_INSECURE_TLS", "true" if config.insecure_tls else None),
        ("MLFLOW_TRACKING_TOKEN", config.token),
    ):
        if value:
            os.environ[name] = value
    if require:
        if not config.uri:
            raise ClientError(
                "no tracking server configured: export MLFLOW_TRACKING_URI (or TRACKING_URI), "
                "put it in .env, or run `trackgate login URL`"
            )
        if config.username and not config.password:
            raise ClientError(
                f"MLFLOW_TRACKING_USERNAME is {config.username!r} but no password is set: "
                "export MLFLOW_TRACKING_PASSWORD (or TRACKING_PASSWORD)"
            )
    return config


@dataclass
class CheckResult:
    ok: bool
    message: str


def check(config: TrackingConfig, timeout: float = 15.0) -> CheckResult:
    """Call the server as MLflow would and explain any failure precisely."""
    if not config.uri:
        return CheckResult(False, "no tracking URI: export MLFLOW_TRACKING_URI or TRACKING_URI")
    if not config.uri.startswith(("http://", "https://")):
        return CheckResult(False, f"{config.uri} is not an http(s) URL of a tracking server")
    url = config.uri.rstrip("/") + "/api/2.0/mlflow/experiments/search?max_results=1"
    auth = (config.username, config.password or "") if config.username else None
    headers = {"Authorization": f"Bearer {config.token}"} if config.token and not auth else {}
    verify: bool | str = False if config.insecure_tls else (config.cert_path or True)
    try:
        with warnings.catch_warnings():  # insecure TLS was asked for explicitly: no nagging
            warnings.simplefilter("ignore", urllib3.exceptions.InsecureRequestWarning)
            response = requests.get(
                url, auth=auth, headers=headers, verify=verify, timeout=timeout,
                allow_redirects=False,
            )
    except requests.exceptions.SSLError as exc:
        if "mismatch" in str(exc):  # OpenSSL: "Hostname mismatch" / "IP address mismatch"
            return CheckResult(
                False,
                (
                    f"TLS: the server's certificate is not for the host name in {config.uri} "
                    f"({_short(exc)}); use the host name the server was set up with"
                ),
            )
        return CheckResult(
            False,
            (
                f"TLS: the server's certificate is not trusted ({_short(exc)}). If it uses "
                "trackgate's local CA, export MLFLOW_TRACKING_SERVER_CERT_PATH=/path/to/ca.pem"
            ),
        )
    except requests.exceptions.ConnectionError as exc:
        text = str(exc)
        if "RemoteDisconnected" in text or "Connection aborted" in text:
            return CheckResult(
                False,
                (
                    "the server closed the connection without answering: it does not serve the "
                    f"host name in {config.uri} (nginx refuses unknown Host names); use the "
                    "configured host name"
                ),
            )
        return CheckResult(
            False,
            f"cannot connect to {config.uri}: {_short(exc)}; is the server up and the port right?",
        )
    except requests.exceptions.Timeout:
        return CheckResult(False, f"{config.uri} did not answer within {timeout:.0f} s")
    return _explain(response.status_code, response, config)


def _explain(status: int, response: requests.Response, config: TrackingConfig) -> CheckResult:
    if 200 <= status < 300:
        who = config.username or ("an API token" if config.token else "anonymous")
        return CheckResult(True, f"OK: {config.uri} accepts {who}")
    if status in (301, 302, 307, 308):
        return CheckResult(
            False,
            f"the server redirects to {response.headers.get('Location')}: "
            "use that URL (https) as MLFLOW_TRACKING_URI",
        )
    if status == 401:
        if config.token and not config.username:
            return CheckResult(
                False,
                "401: the API token (MLFLOW_TRACKING_TOKEN) is unknown, revoked or expired; "
                "ask an admin for a new one (`trackgate tokens create`)",
            )
        if not config.username:
            return CheckResult(
                False,
                "the server wants a login: export MLFLOW_TRACKING_USERNAME "
                "and MLFLOW_TRACKING_PASSWORD (or an API token as MLFLOW_TRACKING_TOKEN)",
            )
        return CheckResult(
            False,
            f"401: wrong username or password for {config.username!r}; "
            "check MLFLOW_TRACKING_USERNAME/PASSWORD or ask an admin to run "
            "`trackgate users passwd`",
        )
    if status == 403:
        if "Invalid Host header" in response.text:
            return CheckResult(
                False,
                "403 from MLflow: the Host name is not allowed; add it to "
                "TRACKGATE_EXTRA_HOSTNAMES on the server",
            )
        return CheckResult(False, f"403 Forbidden from the server: {response.text.strip()[:200]}")
    if status == 413:
        return CheckResult(
            False,
            "413: the upload is larger than the proxy allows; raise "
            "TRACKGATE_MAX_UPLOAD (nginx client_max_body_size) on the server",
        )
    if status == 429:
        wait = response.headers.get("Retry-After", "a few")
        return CheckResult(
            False, f"429: too many failed logins from here; wait {wait} s and check the password"
        )
    if status in (502, 503):
        return CheckResult(
            False,
            f"{status}: the proxy is up but the tracking server or auth "
            "gateway is not; run `trackgate status` on the server",
        )
    if status == 504:
        # The check is one tiny request: a timeout here means MLflow is stuck, not slow uploads.
        return CheckResult(
            False,
            "504: the proxy gave up waiting for the tracking server, which "
            "is hung or overloaded; run `trackgate status` on the server "
            "and restart it (if only long uploads fail, raise "
            "TRACKGATE_PROXY_TIMEOUT instead)",
        )
    if status == 500:
        return CheckResult(
            False,
            "500: the server failed (if every request fails, the auth "
            "gateway may be down: run `trackgate status` on the server)",
        )
    return CheckResult(False, f"unexpected HTTP {status}: {response.text.strip()[:200]}")


def _short(exc: Exception) -> str:
    text = str(exc)
    return text if len(text) < 160 else text[:157] + "..."


def write_env_file(path: Path, config: TrackingConfig) -> Path:
    """Write the credentials for later runs to a file only the user can read (0600)."""
    path = path.expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.close(fd)
    os.chmod(path, 0o600)
    values = {
        "MLFLOW_TRACKING_URI": config.uri,
        "MLFLOW_TRACKING_USERNAME": config.username,
        "MLFLOW_TRACKING_PASSWORD": config.password,
    }
    if config.cert_path:
        values["MLFLOW_TRACKING_SERVER_CERT_PATH"] = str(Path(config.cert_path).resolve())
    for name, value in values.items():  # python-dotenv quotes what the parser must read back
        set_key(path, name, value or "", quote_mode="always")
    return path
