"""The shipped alert rules and scrape config (monitoring/): valid for Prometheus
(`promtool check`), and each alert fires on the trouble it names (`promtool test rules`)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from trackgate import prometheus
from trackgate.settings import Settings

TESTS = Path(__file__).parent / "monitoring" / "alerts_test.yml"


def promtool(*args: str, cwd: Path) -> str:
    binary = shutil.which("promtool")
    assert binary, "promtool missing: bash scripts/install.sh --test (Debian package prometheus)"
    result = subprocess.run([binary, *args], capture_output=True, text=True, cwd=cwd,
                            timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.fixture
def rendered(tmp_path: Path) -> Path:
    (tmp_path / "trackgate-alerts.yml").write_text(prometheus.render_rules())
    shutil.copy(TESTS, tmp_path / TESTS.name)
    return tmp_path


def test_the_alert_rules_pass_promtool_check(rendered: Path) -> None:
    out = promtool("check", "rules", "trackgate-alerts.yml", cwd=rendered)
    assert "8 rules found" in out


def test_each_alert_fires_on_its_trouble_and_not_before(rendered: Path) -> None:
    promtool("test", "rules", TESTS.name, cwd=rendered)


def test_the_scrape_config_covers_every_component_of_every_host(rendered: Path) -> None:
    hosts = [
        {"name": f"h{i}", "metrics_urls": Settings(metrics_address=f"10.0.0.{i}").metrics_urls}
        for i in (1, 2)
    ]
    config = prometheus.render_config(hosts, str(rendered / "trackgate-alerts.yml"))
    (rendered / "prometheus.yml").write_text(config)
    promtool("check", "config", "prometheus.yml", cwd=rendered)
    for i in (1, 2):
        assert config.count(f'"10.0.0.{i}:9180"') == 2 and f'"10.0.0.{i}:9181"' in config
    for path in ("/metrics/tracking", "/metrics/gateway", "/metrics"):
        assert config.count(f'__metrics_path__: "{path}"') == 2


def test_a_bad_metrics_url_is_refused_clearly() -> None:
    with pytest.raises(ValueError, match="not a metrics URL"):
        prometheus.render_config([{"name": "h", "metrics_urls": {"tracking": "nginx:9180"}}],
                                 "rules.yml")
