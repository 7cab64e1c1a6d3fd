"""`ansible-playbook deploy.yml` on a fresh Debian 12 systemd host, sqlite backend.

One host is deployed per module and reused. Every test leaves it as a run of the role leaves it
(converged, serving), and needs nothing another test made: they pass in any order.
"""

from __future__ import annotations

import secrets
import subprocess
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests
from trackgate.backup import MANIFEST, SQLITE_MEMBER
from urllib3.exceptions import InsecureRequestWarning

from tests.infra.systemd_host import restart

from . import checks
from .harness import ALICE, BOB, Deployment, PlaybookRun, deployment

pytestmark = pytest.mark.deploy

HTPASSWD_TASK = "Ensure each user exists with the given password."


BACKUP_DIR = "/var/backups/trackgate"
OFFSITE_COPY = "/var/tmp/trackgate-offsite/latest.tar"
# Scheduled backups as an operator would set them: not the defaults, so the test sees them used.
BACKUP_VARS = {
    "trackgate_backup_schedule": "*-*-* 03:30:00",
    "trackgate_backup_keep": 2,
    "trackgate_backup_copy_command": f'install -D -m 0600 "$1" {OFFSITE_COPY}',
}


MONITORING_VARS = {"trackgate_monitoring_scrape_interval": "1s",
                   "trackgate_monitoring_down_for": "3s"}


@pytest.fixture(scope="module")
def deployed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Deployment, PlaybookRun]]:
    with deployment("tg-deploy-sqlite", tmp_path_factory.mktemp("deploy-sqlite")) as target:
        target.extra_vars.update(BACKUP_VARS)
        # Prometheus on the same host, with short intervals (issue 17).
        target.monitoring = True
        target.extra_vars.update(MONITORING_VARS)
        first = target.playbook()
        yield target, first


@pytest.fixture(scope="module")
def host(deployed: tuple[Deployment, PlaybookRun]) -> Deployment:
    target, first = deployed
    first.assert_ok()
    return target


def test_first_deploy_succeeds_and_passes_its_own_smoke_check(
    deployed: tuple[Deployment, PlaybookRun],
) -> None:
    target, first = deployed
    first.assert_ok()
    ran = [name for name, result in first.tasks if not result.get("skipped")]
    for smoke in ("Check that /health answers without credentials.",
                  "Check that the API refuses a request without credentials.",
                  "Read the run back through the proxy.",
                  "Check that the run holds the logged metric."):
        assert smoke in ran
    assert target.ca.is_file(), "the local CA certificate was not fetched to the controller"
    print(f"first deploy: {first.seconds:.0f}s")


@pytest.mark.parametrize(
    "check",
    [checks.services_running, checks.only_nginx_listens_publicly,
     checks.internal_servers_only_reachable_by_nginx, checks.files_have_strict_modes,
     checks.nginx_config_valid, checks.certificate_names_host, checks.units_hardened,
     checks.auth_enforced],
    ids=["services-enabled-and-running", "only-nginx-listens-on-tcp",
         "internal-servers-only-reachable-by-nginx",
         "secrets-and-settings-have-strict-owners-and-modes",
         "nginx-config-valid-and-rendered-from-the-templates",
         "certificate-names-the-host-and-chains-to-the-fetched-ca",
         "units-hardened-and-processes-unprivileged", "health-open-and-api-needs-a-login"],
)
def test_deployed_host(host: Deployment, check: Callable[[Deployment], None]) -> None:
    check(host)


@pytest.mark.parametrize("host_header", ["127.0.0.1", "evil.example"])
def test_other_host_names_get_no_answer(host: Deployment, host_header: str) -> None:
    session = host.session(ALICE)
    session.verify = False  # the Host check comes after TLS; only the Host header differs
    url = f"https://127.0.0.1:{host.ports['https']}/health"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InsecureRequestWarning)
        assert session.get(url, headers={"Host": "localhost"}, timeout=10).status_code == 200
        with pytest.raises(requests.ConnectionError):  # nginx closes the connection (444)
            session.get(url, headers={"Host": host_header}, timeout=10)


def test_mlflow_client_logs_a_run_with_an_artifact_through_the_proxy(host: Deployment) -> None:
    checks.log_and_read_back(host)  # asserts params, metrics and the artifact's bytes


def test_second_run_changes_nothing(host: Deployment) -> None:
    second = host.playbook().assert_ok()
    assert second.changed_tasks == [], second.changed_tasks
    assert second.stats["changed"] == 0
    print(f"second run: {second.seconds:.0f}s")


def test_check_mode_runs_and_reports_nothing_to_change(host: Deployment) -> None:
    check = host.playbook("--check").assert_ok()
    assert check.changed_tasks == [], check.changed_tasks


def _main_pids(host: Deployment) -> dict[str, str]:
    h = checks.host(host)
    return {name: h.check_output(f"systemctl show -p MainPID --value {name}")
            for name in ("trackgate-tracking", "trackgate-gateway", "nginx")}


def test_password_change_rewrites_only_htpasswd_and_restarts_nothing(host: Deployment) -> None:
    pids = _main_pids(host)
    old = host.passwords[BOB]
    host.passwords[BOB] = secrets.token_urlsafe(18)
    run = host.playbook().assert_ok()
    assert run.changed_tasks == [HTPASSWD_TASK], run.changed_tasks
    assert _main_pids(host) == pids
    api = f"{host.url}/api/2.0/mlflow/experiments/search?max_results=1"
    assert host.session(BOB).get(api, timeout=10).status_code == 200
    stale = host.session()
    stale.auth = (BOB, old)
    assert stale.get(api, timeout=10).status_code == 401


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"trackgate_backend": "oracle"}, "trackgate_backend is \"oracle\""),
        ({"trackgate_tls_cert_file": "/nonexistent/cert.pem",
          "trackgate_tls_key_file": "/nonexistent/key.pem"}, "must both name readable PEM files"),
        # 37 characters but 74 bytes: the limit is bytes, as bcrypt counts them.
        ({"trackgate_users": [{"name": "carol", "password": "é" * 37}]},
         "carol's password is 74 bytes"),
        ({"trackgate_workers": 4}, "trackgate_workers: set these in trackgate_settings"),
        ({"trackgate_settings": {"data_dir": "/srv/mlflow"}}, "which the role decides"),
        ({"trackgate_backup_keep": 0}, "trackgate_backup_keep is 0"),
    ],
    ids=["unknown-backend", "missing-certificate", "password-over-72-bytes",
         "retired-role-variable", "setting-the-role-decides", "backup-keeping-nothing"],
)
def test_bad_variables_fail_before_touching_the_host(
    host: Deployment, override: dict[str, object], message: str
) -> None:
    run = host.playbook(**override)
    assert run.returncode != 0
    assert message in run.failure(), run.failure()
    assert "é" not in run.log.read_text(), "a password leaked into the output"
    ran = [name for name, result in run.tasks if not result.get("skipped")]
    assert "Gather facts about the host." not in ran, ran
    assert not any(result.get("changed") for _, result in run.tasks)


def test_services_come_back_after_a_host_restart_with_the_run_kept(host: Deployment) -> None:
    logged_run = checks.log_and_read_back(host)
    restart(host.name)
    host.wait_healthy()
    checks.services_running(host)
    read = checks.mlflow_client(host, "read", logged_run)
    assert read["metrics"] == {"rmse": 0.25}



def _archives(host: Deployment) -> list[str]:
    """The backup directory's archives, oldest first (their names carry the time)."""
    return sorted(checks.host(host).check_output(f"ls -1 {BACKUP_DIR}").split())


def _back_up_now(host: Deployment) -> str:
    """Start the timer's service by hand (a oneshot: returns when done); the new archive's name."""
    before = set(_archives(host))
    time.sleep(1.1)  # archive names carry the second
    checks.host(host).run_expect([0], "systemctl start trackgate-backup.service")
    new = sorted(set(_archives(host)) - before)
    assert len(new) == 1, (before, new)
    return new[0]


def test_the_backup_timer_is_enabled_with_the_configured_schedule(host: Deployment) -> None:
    h = checks.host(host)
    timer = h.service("trackgate-backup.timer")
    assert timer.is_enabled and timer.is_running
    calendar = h.check_output("systemctl show -p TimersCalendar --value trackgate-backup.timer")
    assert "*-*-* 03:30:00" in calendar, calendar
    assert h.check_output("systemctl show -p NextElapseUSecRealtime --value "
                          "trackgate-backup.timer"), "the timer has no next run"
    directory = h.file(BACKUP_DIR)
    assert (directory.user, directory.group, directory.mode) == ("root", "root", 0o700)


def test_a_backup_started_by_hand_is_root_only_keeps_the_newest_and_is_copied(
    host: Deployment,
) -> None:
    h = checks.host(host)
    made = [_back_up_now(host) for _ in range(3)]
    assert _archives(host) == made[-2:], "retention did not keep the newest trackgate_backup_keep"
    for name in made[-2:]:
        archive = h.file(f"{BACKUP_DIR}/{name}")
        assert (archive.user, archive.group, archive.mode) == ("root", "root", 0o600), name
    members = h.check_output(f"tar tf {BACKUP_DIR}/{made[-1]}").split()
    assert MANIFEST in members and SQLITE_MEMBER in members, members
    # trackgate_backup_copy_command ran with the newest archive as $1.
    newest = h.check_output(f"sha256sum < {BACKUP_DIR}/{made[-1]}")
    assert h.check_output(f"sha256sum < {OFFSITE_COPY}") == newest
    assert h.file(OFFSITE_COPY).mode == 0o600


def test_restore_playbook_brings_back_the_backup_and_drops_what_came_after(
    host: Deployment, tmp_path: Path
) -> None:
    kept = checks.log_and_read_back(host)
    name = _back_up_now(host)
    later = checks.mlflow_client(host, "log")["run_id"]
    archive = tmp_path / name
    subprocess.run(["docker", "cp", f"{host.name}:{BACKUP_DIR}/{name}", str(archive)],
                   check=True, capture_output=True, timeout=120)

    started = time.monotonic()
    run = host.playbook("-e", f"trackgate_restore_archive={archive}",
                        playbook="restore.yml").assert_ok()
    print(f"restore.yml: {time.monotonic() - started:.0f}s")
    ran = [task for task, result in run.tasks if not result.get("skipped")]
    assert "Restore the archive into the data directory." in ran, ran
    assert "Check that the run holds the logged metric." in ran, ran  # the role's smoke check
    checks.services_running(host)
    checks.files_have_strict_modes(host)  # owners and modes as the role leaves them

    read = checks.mlflow_client(host, "read", kept)  # params, metrics and the artifact's bytes
    assert read["metrics"] == {"rmse": 0.25} and read["params"] == {"alpha": "0.5"}
    api = f"{host.url}/api/2.0/mlflow"
    gone = host.session(ALICE).get(f"{api}/runs/get", params={"run_id": later}, timeout=10)
    assert gone.status_code == 404 and "RESOURCE_DOES_NOT_EXIST" in gone.text, gone.text
    for user in (ALICE, BOB):  # the archive's htpasswd: the same passwords still log in
        assert host.session(user).get(f"{api}/experiments/search?max_results=1",
                                      timeout=10).status_code == 200, user
    h = checks.host(host)
    assert not h.file(f"{BACKUP_DIR}/restoring-{name}").exists, "the copied archive was left"


def test_restore_playbook_without_an_archive_says_what_to_pass(host: Deployment) -> None:
    run = host.playbook(playbook="restore.yml")
    assert run.returncode != 0
    assert "Name the archive to restore" in run.failure(), run.failure()
    assert not any(result.get("changed") for _, result in run.tasks)


def test_prometheus_of_group_trackgate_monitoring_sees_every_target_and_a_stopped_tracking_server(
    host: Deployment,
) -> None:
    from ..prometheus_api import JOBS, inside, wait_for_alert, wait_until_every_target_is_up

    h = checks.host(host)
    get = inside(h)
    assert wait_until_every_target_is_up(get) == dict.fromkeys(JOBS, 1.0)
    assert not wait_for_alert(get, "TrackgateDown", "trackgate-tracking", timeout=0)
    h.run_expect([0], "systemctl stop trackgate-tracking.service")
    try:
        alerts = wait_for_alert(get, "TrackgateDown", "trackgate-tracking")
        assert alerts, "stopping the tracking server fired no TrackgateDown"
        assert alerts[0]["labels"]["trackgate_host"] == "localhost"
    finally:
        h.run_expect([0], "systemctl start trackgate-tracking.service")
        host.wait_healthy()
    assert wait_until_every_target_is_up(get) == dict.fromkeys(JOBS, 1.0)
