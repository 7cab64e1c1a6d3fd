"""Prometheus for trackgate: the scrape config and the alert rules, rendered from the one pair
of templates in monitoring/ that the Ansible role renders too (`trackgate monitoring render`
writes them for the compose profile "monitoring" and for any other Prometheus)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jinja2

from .shipped import shipped_dir

CONFIG_TEMPLATE = "prometheus.yml.j2"
RULES_TEMPLATE = "alerts.yml.j2"
COMPONENTS = ("tracking", "gateway", "nginx")


def template_dir() -> Path:
    return shipped_dir("monitoring", CONFIG_TEMPLATE)


def _render(name: str, **values: Any) -> str:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(template_dir()), trim_blocks=True, lstrip_blocks=True,
        keep_trailing_newline=True, autoescape=False,
    )
    return env.get_template(name).render(**values)


def render_config(hosts: list[dict[str, Any]], rules_file: str, *,
                  scrape_interval: str = "15s", evaluation_interval: str = "15s") -> str:
    """prometheus.yml: one job per component, one target per host. `hosts`: [{"name": ...,
    "metrics_urls": {component: url}}], the metrics_urls of each host's `config --json`."""
    for host in hosts:
        for component, url in host["metrics_urls"].items():
            if component not in COMPONENTS or not url.startswith(("http://", "https://")):
                raise ValueError(f"{host['name']}: {component}={url!r} is not a metrics URL "
                                 f"of {', '.join(COMPONENTS)}")
    return _render(CONFIG_TEMPLATE, trackgate_hosts=hosts, rules_file=rules_file,
                   scrape_interval=scrape_interval, evaluation_interval=evaluation_interval)


def render_rules(*, down_for: str = "2m") -> str:
    """The alert rules; `down_for` is how long a target must be down (tests shorten it)."""
    return _render(RULES_TEMPLATE, down_for=down_for)
