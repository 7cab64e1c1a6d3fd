"""The README stays true to the code: every setting documented, the commands it names exist."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from click.testing import CliRunner
from trackgate.cli import cli
from trackgate.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


@pytest.mark.parametrize("field", sorted(Settings.model_fields))
def test_every_setting_is_in_the_readme_table_with_its_description(field: str) -> None:
    row = next(
        (line for line in README.splitlines() if line.startswith(f"| `TRACKGATE_{field.upper()}`")),
        "",
    )
    regenerate = "regenerate the table: python -m tests.test_docs"
    assert row, f"TRACKGATE_{field.upper()} is not in the README's settings table; {regenerate}"
    assert Settings.model_fields[field].description in row, regenerate


def _compose_variables() -> set[str]:
    """What compose files read from .env for compose itself (images, published ports...)."""
    text = "".join(p.read_text() for p in (ROOT / "compose").glob("*.yaml"))
    return set(re.findall(r"\$\{TRACKGATE_([A-Z0-9_]+)", text))


def test_the_readme_documents_no_setting_that_does_not_exist() -> None:
    documented = set(re.findall(r"`TRACKGATE_([A-Z0-9_]+)`", README))
    assert documented <= {f.upper() for f in Settings.model_fields} | _compose_variables()


def _commands_in_readme() -> set[str]:
    """`trackgate ...` in inline code, and command lines of ```bash blocks."""
    code = re.findall(r"`(?:\.venv/bin/)?trackgate ([^`]+)`", README)
    for block in re.findall(r"```bash\n(.*?)```", README, re.S):
        code += re.findall(r"(?m)(?:^|&& |\| )(?:\.venv/bin/)?trackgate ([^\n#]+)", block)
    return {" ".join(c.split()[:2]) for c in code}


@pytest.mark.parametrize("command", sorted(_commands_in_readme()))
def test_every_trackgate_command_in_the_readme_exists(command: str) -> None:
    words = [w for w in command.split() if not w.startswith("-")]
    group = cli
    for word in words:
        sub = getattr(group, "commands", {}).get(word)
        if sub is None:
            break  # an argument (e.g. a user name), not a subcommand
        group = sub
    assert group is not cli, f"`trackgate {command}` is not a command"


def test_readme_test_command_is_what_ci_runs() -> None:
    assert "bash scripts/test.sh\n" in README
    ci = (ROOT / ".ci" / "run").read_text()
    assert "exec bash scripts/test.sh\n" in ci


def test_help_names_the_environment_variable_and_default() -> None:
    result = CliRunner().invoke(cli, ["up", "--help"])
    assert "TRACKGATE_HTTPS_PORT" in result.output and "default 8443" in result.output


def _write_settings_table() -> None:
    """Rewrite the README's settings table from the Settings fields (their descriptions and
    the defaults `--help` shows)."""
    from trackgate.cli import _default_text

    lines = README.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| Variable | Default |"))
    end = start + 2
    while end < len(lines) and lines[end].startswith("| `TRACKGATE_"):
        end += 1
    lines[start + 2:end] = [f"| `TRACKGATE_{name.upper()}` | {_default_text(name)} | "
                            f"{field.description} |"
                            for name, field in Settings.model_fields.items()]
    (ROOT / "README.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    _write_settings_table()
