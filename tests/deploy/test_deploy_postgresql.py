"""`ansible-playbook deploy.yml` with the PostgreSQL backend on a second fresh systemd host.

Same host checks as the sqlite variant, plus: the runs really land in PostgreSQL, and a changed
trackgate/MLflow version leads to one pg_dump backup and one schema upgrade, then nothing.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from . import checks
from .harness import Deployment, deployment

pytestmark = pytest.mark.deploy

STAMP = "/var/lib/trackgate/.schema-stamp"


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    path = tmp_path_factory.mktemp("deploy-postgresql")
    with deployment("tg-deploy-postgresql", path, backend="postgresql") as target:
        first = target.playbook().assert_ok()
        print(f"first deploy (postgresql): {first.seconds:.0f}s")
        yield target


def test_services_and_postgresql_are_enabled_and_running(host: Deployment) -> None:
    checks.services_running(host, "postgresql")


def test_only_nginx_listens_beyond_loopback(host: Deployment) -> None:
    checks.only_nginx_listens_publicly(host, "postgres")
    assert (f"127.0.0.1:{host.ports['postgresql']}"
            in [address for address, _, _ in checks.listeners(host)])


def test_files_units_nginx_and_certificate_are_as_on_sqlite(host: Deployment) -> None:
    checks.files_have_strict_modes(host)
    checks.units_hardened(host)
    checks.nginx_config_valid(host)
    checks.certificate_names_host(host)
    checks.auth_enforced(host)


def test_mlflow_client_run_is_stored_in_postgresql(host: Deployment) -> None:
    run_id = checks.log_and_read_back(host)
    h = checks.host(host)
    query = f"SELECT count(*) FROM runs WHERE run_uuid = '{run_id}'"
    out = h.check_output(
        f"runuser -u postgres -- psql -p {host.ports['postgresql']} -d trackgate -tAc \"{query}\"")
    assert out.strip() == "1"
    env = h.file("/etc/trackgate/trackgate.env").content_string
    uri = [line for line in env.splitlines() if line.startswith("TRACKGATE_BACKEND_STORE_URI=")]
    assert len(uri) == 1 and uri[0].startswith('TRACKGATE_BACKEND_STORE_URI="postgresql://'), (
        "the env file names no PostgreSQL backend")


def test_version_change_backs_up_and_upgrades_once(host: Deployment) -> None:
    h = checks.host(host)
    current = h.file(STAMP).content_string.strip()
    # As if the host had been deployed with an older trackgate/MLflow.
    h.check_output(f"echo 'trackgate 0.0.1 mlflow 3.0.0' > {STAMP}")
    upgrade = host.playbook().assert_ok()
    assert upgrade.changed_tasks == [
        "Back up the database before the upgrade.",
        "Record the versions the database is now upgraded for.",
    ], upgrade.changed_tasks
    dumps = h.check_output("ls /var/lib/trackgate/backups").split()
    assert dumps == [f"mlflow-before-{current.replace(' ', '-')}.pgdump"], dumps
    assert h.file(STAMP).content_string.strip() == current
    again = host.playbook().assert_ok()
    assert again.changed_tasks == [], again.changed_tasks
