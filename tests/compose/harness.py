"""Drive the compose/ stack with the real `docker compose`, under a project name of its own.

Every setting comes from an env file the test writes: compose reads it (`--env-file`) and so do
the containers (TRACKGATE_ENV_FILE names it to compose.yaml's `env_file`). The developer's shell
and compose/.env cannot leak in: the variables of the child process are cleaned first.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from trackgate.settings import Settings

from ..support import RunningStack, clean_env, free_port

COMPOSE_DIR = Path(__file__).resolve().parents[2] / "compose"
VARIANT_FILES = {
    "sqlite": ("compose.yaml",),
    "postgres": ("compose.yaml", "compose.postgres.yaml"),
    "scale": ("compose.yaml", "compose.postgres.yaml", "compose.scale.yaml"),
}
ADMIN_LINE = re.compile(r"Created user 'admin' with password: (\S+)")


class ComposeError(RuntimeError):
    """A `docker compose` command failed; the message holds its output."""


def docker_env() -> dict[str, str]:
    """The environment minus anything that would configure compose or trackgate behind our back."""
    return {k: v for k, v in clean_env().items()
            if not k.startswith(("COMPOSE_", "DOCKER_DEFAULT_PLATFORM", "TRACKGATE_"))}


def docker(*args: str, timeout: float = 60) -> str:
    result = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout,
                            env=docker_env())
    if result.returncode != 0:
        raise ComposeError(f"docker {' '.join(args)} failed:\n{result.stdout}{result.stderr}")
    return result.stdout


@dataclass
class ComposeProject:
    name: str
    files: tuple[str, ...]
    env_file: Path

    def run(self, *args: str, input: str | None = None, timeout: float = 600,
            check: bool = True) -> subprocess.CompletedProcess[str]:
        argv = ["docker", "compose", "--project-name", self.name, "--env-file", str(self.env_file)]
        for name in self.files:
            argv += ["-f", str(COMPOSE_DIR / name)]
        # The env file is both compose's (interpolation) and the containers' (env_file).
        env = {**docker_env(), "TRACKGATE_ENV_FILE": str(self.env_file)}
        result = subprocess.run([*argv, *args], input=input, capture_output=True, text=True,
                                timeout=timeout, env=env, cwd=COMPOSE_DIR)
        if check and result.returncode != 0:
            raise ComposeError(f"docker compose {' '.join(args)} exited {result.returncode}:\n"
                               f"{result.stdout[-3000:]}{result.stderr[-3000:]}")
        return result

    def up(self, *extra: str) -> None:
        self.run("up", "--detach", "--wait", "--wait-timeout", "300", "--no-build", *extra)

    def down(self, *, volumes: bool = False) -> None:
        self.run("down", "--timeout", "20", *(["--volumes"] if volumes else []), timeout=300)

    def logs(self, *services: str) -> str:
        return self.run("logs", "--no-color", "--no-log-prefix", *services, check=False).stdout

    def exec(self, service: str, *command: str, input: str | None = None,
             check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.run("exec", "-T", service, *command, input=input, timeout=120, check=check)

    def container(self, service: str) -> str:
        ids = self.run("ps", "--all", "--quiet", service).stdout.split()
        assert len(ids) == 1, f"expected one {service} container, got {ids}"
        return ids[0]

    def state(self, service: str) -> dict[str, object]:
        info = json.loads(docker("inspect", self.container(service)))[0]
        return {"restarts": info["RestartCount"], "pid": info["State"]["Pid"],
                "status": info["State"]["Status"],
                "health": (info["State"].get("Health") or {}).get("Status")}

    def crash(self, service: str, timeout: float = 180) -> None:
        """SIGKILL the service's main process from outside, as a crash or the OOM killer would
        (`docker kill` counts as a deliberate stop, which `restart: unless-stopped` respects);
        return once the restarted container is healthy again."""
        before = self.state(service)
        os.kill(int(before["pid"]), signal.SIGKILL)  # type: ignore[call-overload]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            now = self.state(service)
            if now["restarts"] > before["restarts"] and now["health"] == "healthy":  # type: ignore[operator]
                return
            time.sleep(1)
        raise ComposeError(f"{service} did not come back healthy in {timeout:.0f} s: {now}")


@dataclass
class ComposeStack(RunningStack):
    """A RunningStack (url, ca, get, client_env...) whose servers run in compose containers."""

    project: ComposeProject = field(kw_only=True)
    variant: str = field(kw_only=True)

    def new_user(self, prefix: str = "user") -> tuple[str, str]:
        name = f"{prefix}-{secrets.token_hex(3)}"
        password = secrets.token_urlsafe(12)
        self.project.exec("gateway", "trackgate", "users", "add", name, "--password-stdin",
                          input=password + "\n")
        return name, password

    def remove_user(self, name: str) -> None:
        self.project.exec("gateway", "trackgate", "users", "remove", name)


def image_tags() -> dict[str, str]:
    """Image names for this checkout: TRACKGATE_TEST_IMAGE_TAG (default `local`) keeps two
    checkouts testing on one Docker engine from building over each other's images."""
    tag = os.environ.get("TRACKGATE_TEST_IMAGE_TAG", "local")
    return {"TRACKGATE_IMAGE": f"trackgate/app:{tag}",
            "TRACKGATE_NGINX_IMAGE": f"trackgate/nginx:{tag}",
            "TRACKGATE_POSTGRES_IMAGE": f"trackgate/postgres:{tag}",
            "TRACKGATE_SEAWEEDFS_IMAGE": f"trackgate/seaweedfs:{tag}",
            "TRACKGATE_PROMETHEUS_IMAGE": f"trackgate/prometheus:{tag}"}


def write_env_file(path: Path, **settings: str) -> None:
    settings = {**image_tags(), **settings}
    path.write_text("".join(f"{k}={v}\n" for k, v in settings.items()), encoding="utf-8")


def start(variant: str, work: Path, *, extra_files: tuple[str, ...] = (),
          ca: Path | None = None, up_args: tuple[str, ...] = (), **settings: str
          ) -> ComposeStack:
    """`up --wait` a fresh project of this variant on free loopback ports (images prebuilt).

    `extra_files`: more compose files (overrides); `ca`: the CA clients trust, when it is not
    the stack's own local CA; `up_args`: more `up` options (`--scale tracking=3`);
    `settings`: more lines for the env file.
    """
    https_port, http_port = free_port(), free_port()
    env_file = work / "compose.env"
    write_env_file(
        env_file,
        TRACKGATE_HOSTNAME="localhost",
        TRACKGATE_PUBLISH_ADDRESS="127.0.0.1",
        TRACKGATE_HTTPS_PORT=str(https_port),
        TRACKGATE_HTTP_PORT=str(http_port),
        TRACKGATE_BCRYPT_ROUNDS="4",  # fast tests; the cost itself is tested elsewhere
        # Behind Docker's userland proxy every client has the same address: no throttling here.
        TRACKGATE_FAILURE_LIMIT="100000",
        **settings,
    )
    project = ComposeProject(f"tgtest-{variant}-{secrets.token_hex(3)}",
                             VARIANT_FILES[variant] + extra_files, env_file)
    try:
        project.up(*up_args)
    except BaseException:
        print(project.logs())
        project.down(volumes=True)
        raise
    match = ADMIN_LINE.search(project.logs("init"))
    assert match, "the init service prints the generated admin password on first start"
    client = Settings(data_dir=work / "client", hostname="localhost", https_port=https_port,
                      http_port=http_port, tls_cert=None, tls_key=None)
    client.tls_dir.mkdir(parents=True)
    # What a user does to trust the local CA: copy it out of the stack.
    trusted = ca.read_text() if ca else project.exec(
        "nginx", "cat", "/var/lib/trackgate/tls/ca.pem").stdout
    client.ca_cert.write_text(trusted, encoding="utf-8")
    return ComposeStack(client, match.group(1), project=project, variant=variant)
