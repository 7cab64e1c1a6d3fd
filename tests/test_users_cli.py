"""`trackgate users`: clear errors on bad input, the file never corrupted, no lost updates."""

from __future__ import annotations

import os
import stat
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from trackgate.users import HtpasswdStore

from .support import trackgate


def cli(data_dir: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """`trackgate ARGS` on the users of data_dir (bcrypt cost 4: these tests hash a lot)."""
    return trackgate(*args, input=stdin, timeout=60,
                     env={"TRACKGATE_DATA_DIR": str(data_dir), "TRACKGATE_BCRYPT_ROUNDS": "4"})


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    result = cli(tmp_path, "users", "add", "alice", "--password-stdin", stdin="first-pw\n")
    assert result.returncode == 0, result.stderr
    return tmp_path


def _htpasswd(data_dir: Path) -> str:
    return (data_dir / "htpasswd").read_text()


@pytest.mark.parametrize(
    "name, password, message",
    [
        ("bob", "x" * 73 + "\n", "73 bytes"),
        ("bob", "é" * 37 + "\n", "74 bytes"),  # bytes, not characters, count
        ("bo:b", "pw\n", "contains ':'"),
        ("bo b", "pw\n", "whitespace"),
        ("bo\tb", "pw\n", "whitespace"),
        ("", "pw\n", "username is empty"),
        ("bob", "\n", "password is empty"),
        ("bob", "", "password is empty"),
        ("alice", "other\n", "exists"),
    ],
)
def test_bad_input_is_refused_clearly_and_leaves_the_file_as_it_was(
    data_dir: Path, name: str, password: str, message: str
) -> None:
    before = _htpasswd(data_dir)
    result = cli(data_dir, "users", "add", name, "--password-stdin", stdin=password)
    assert result.returncode == 1
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert _htpasswd(data_dir) == before


def test_password_of_exactly_72_bytes_is_accepted(data_dir: Path) -> None:
    result = cli(data_dir, "users", "add", "max", "--password-stdin", stdin="p" * 72 + "\n")
    assert result.returncode == 0, result.stderr
    assert HtpasswdStore(data_dir / "htpasswd").verify("max", "p" * 72)


def test_password_stdin_reads_exactly_one_line(data_dir: Path) -> None:
    result = cli(
        data_dir, "users", "add", "bob", "--password-stdin", stdin="one two\nthree\n"
    )
    assert result.returncode == 0, result.stderr
    store = HtpasswdStore(data_dir / "htpasswd")
    assert store.verify("bob", "one two")
    assert not store.verify("bob", "one two\nthree")


def test_passwd_remove_and_verify_change_what_the_file_accepts(data_dir: Path) -> None:
    assert (
        cli(
            data_dir, "users", "verify", "alice", "--password-stdin", stdin="first-pw\n"
        ).returncode
        == 0
    )
    assert (
        cli(
            data_dir, "users", "passwd", "alice", "--password-stdin", stdin="second-pw\n"
        ).returncode
        == 0
    )
    assert (
        cli(
            data_dir, "users", "verify", "alice", "--password-stdin", stdin="first-pw\n"
        ).returncode
        == 1
    )
    assert (
        cli(
            data_dir, "users", "verify", "alice", "--password-stdin", stdin="second-pw\n"
        ).returncode
        == 0
    )
    assert cli(data_dir, "users", "remove", "alice").returncode == 0
    assert cli(data_dir, "users", "list").stdout == ""


@pytest.mark.parametrize("command", [["passwd", "ghost", "--password-stdin"], ["remove", "ghost"]])
def test_unknown_user_is_a_clear_error(data_dir: Path, command: list[str]) -> None:
    result = cli(data_dir, "users", *command, stdin="pw\n")
    assert result.returncode == 1
    assert "no user 'ghost'" in result.stderr


def test_missing_data_directory_is_a_clear_error(tmp_path: Path) -> None:
    result = cli(
        tmp_path / "missing", "users", "add", "bob", "--password-stdin", stdin="pw\n"
    )
    assert result.returncode == 1
    assert "does not exist" in result.stderr
    assert "Traceback" not in result.stderr


def test_list_on_a_missing_file_is_empty_not_an_error(tmp_path: Path) -> None:
    result = cli(tmp_path, "users", "list")
    assert result.returncode == 0
    assert result.stdout == ""


def test_without_a_terminal_a_prompt_is_not_attempted(data_dir: Path) -> None:
    result = cli(data_dir, "users", "add", "bob", stdin="")
    assert result.returncode == 1
    assert "--password-stdin" in result.stderr


def test_writes_keep_the_file_mode_and_are_bcrypt(data_dir: Path) -> None:
    path = data_dir / "htpasswd"
    os.chmod(path, 0o600)
    assert (
        cli(data_dir, "users", "add", "bob", "--password-stdin", stdin="pw\n").returncode == 0
    )
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert all(
        line.split(":", 1)[1].startswith("$2y$") for line in _htpasswd(data_dir).splitlines()
    )


def test_concurrent_adds_lose_nothing(data_dir: Path) -> None:
    names = [f"user{i}" for i in range(16)]

    def add(name: str) -> int:
        return cli(
            data_dir, "users", "add", name, "--password-stdin", stdin=f"{name}-pw\n"
        ).returncode

    with ThreadPoolExecutor(max_workers=8) as pool:
        assert list(pool.map(add, names)) == [0] * len(names)
    store = HtpasswdStore(data_dir / "htpasswd")
    assert sorted(store.list()) == sorted(["alice", *names])
    assert all(store.verify(name, f"{name}-pw") for name in names)


def test_a_reader_never_sees_a_partial_file_while_users_change(data_dir: Path) -> None:
    store = HtpasswdStore(data_dir / "htpasswd", rounds=4)
    for i in range(30):
        store.add(f"bulk{i}", "pw")
    seen_bad = []

    def read_many() -> None:
        for _ in range(400):
            text = (data_dir / "htpasswd").read_text()
            if not text.endswith("\n") or "alice:" not in text:
                seen_bad.append(text)

    with ThreadPoolExecutor(max_workers=2) as pool:
        reader = pool.submit(read_many)
        for i in range(30):
            store.set_password(f"bulk{i}", "changed")
        reader.result()
    assert seen_bad == []


def test_set_is_idempotent_for_provisioning(data_dir: Path) -> None:
    first = cli(data_dir, "users", "set", "carol", "--password-stdin", stdin="pw1\n")
    again = cli(data_dir, "users", "set", "carol", "--password-stdin", stdin="pw1\n")
    changed = cli(data_dir, "users", "set", "carol", "--password-stdin", stdin="pw2\n")
    assert (first.stdout, again.stdout, changed.stdout) == (
        "changed: carol\n",
        "unchanged: carol\n",
        "changed: carol\n",
    )


# --- only bcrypt; names (issue 12, attacks 7 and 12) ----------------------------------------


def _legacy_lines() -> str:
    from passlib.hash import apr_md5_crypt, des_crypt

    return (
        f"bang:!\nstar:*\nlegacy:{des_crypt.hash('pw')}\napr:{apr_md5_crypt.hash('pw')}\nplain:pw\n"
    )


def test_non_bcrypt_lines_are_listed_as_disabled_with_their_line_numbers(data_dir: Path) -> None:
    with open(data_dir / "htpasswd", "a") as f:
        f.write(_legacy_lines())
    result = cli(data_dir, "users", "list")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "alice  editor",
        "apr  editor (disabled)",
        "bang  editor (disabled)",
        "legacy  editor (disabled)",
        "plain  editor (disabled)",
        "star  editor (disabled)",
    ]
    for number, name in [(2, "bang"), (3, "star"), (4, "legacy"), (5, "apr"), (6, "plain")]:
        assert f"line {number} ({name}): not a bcrypt hash" in result.stderr


@pytest.mark.parametrize(
    "name, password",
    [("bang", "!"), ("star", "*"), ("legacy", "pw"), ("apr", "pw"), ("plain", "pw")],
)
def test_verify_refuses_disabled_accounts(data_dir: Path, name: str, password: str) -> None:
    with open(data_dir / "htpasswd", "a") as f:
        f.write(_legacy_lines())
    result = cli(data_dir, "users", "verify", name, "--password-stdin", stdin=password + "\n")
    assert result.returncode == 1
    assert "is disabled" in result.stderr and "not a bcrypt hash" in result.stderr
    assert not HtpasswdStore(data_dir / "htpasswd").verify(name, password)


def test_passwd_turns_a_disabled_account_into_a_bcrypt_one(data_dir: Path) -> None:
    with open(data_dir / "htpasswd", "a") as f:
        f.write("bang:!\n")
    assert (
        cli(
            data_dir, "users", "passwd", "bang", "--password-stdin", stdin="new-pw\n"
        ).returncode
        == 0
    )
    assert HtpasswdStore(data_dir / "htpasswd").verify("bang", "new-pw")
    assert cli(data_dir, "users", "list").stdout.splitlines() == ["alice  editor", "bang  editor"]


@pytest.mark.parametrize(
    "command",
    [["list"], ["verify", "alice", "--password-stdin"], ["add", "bob", "--password-stdin"]],
)
def test_invalid_utf8_in_the_file_is_one_clear_line(data_dir: Path, command: list[str]) -> None:
    with open(data_dir / "htpasswd", "ab") as f:
        f.write(b"caf\xe9:!\n")
    result = cli(data_dir, "users", *command, stdin="first-pw\n")
    assert result.returncode == 1
    assert "line 2 is not valid UTF-8" in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_name_starting_with_hash_is_refused_not_written_as_a_comment(data_dir: Path) -> None:
    before = _htpasswd(data_dir)
    result = cli(data_dir, "users", "add", "#x", "--password-stdin", stdin="pw\n")
    assert result.returncode == 1
    assert "starts with '#'" in result.stderr
    assert _htpasswd(data_dir) == before


def test_nfc_and_nfd_spellings_are_one_account(data_dir: Path) -> None:
    nfc, nfd = "jos\u00e9", "jose\u0301"
    added = cli(data_dir, "users", "add", nfd, "--password-stdin", stdin="pw1\n")
    assert added.returncode == 0, added.stderr
    assert f"{nfc}:" in _htpasswd(data_dir) and nfd not in _htpasswd(data_dir)
    twin = cli(data_dir, "users", "add", nfc, "--password-stdin", stdin="pw2\n")
    assert twin.returncode == 1 and "exists" in twin.stderr
    assert (
        cli(data_dir, "users", "set", nfc, "--password-stdin", stdin="pw1\n").stdout
        == f"unchanged: {nfc}\n"
    )
    for name in (nfc, nfd):
        verify = cli(data_dir, "users", "verify", name, "--password-stdin", stdin="pw1\n")
        assert verify.returncode == 0, verify.stderr
    assert (
        cli(data_dir, "users", "passwd", nfd, "--password-stdin", stdin="pw3\n").returncode
        == 0
    )
    assert cli(data_dir, "users", "remove", nfd).returncode == 0
    assert cli(data_dir, "users", "list").stdout == "alice  editor\n"


def test_a_name_written_decomposed_by_hand_can_still_be_removed(data_dir: Path) -> None:
    with open(data_dir / "htpasswd", "a") as f:
        f.write("jose\u0301:!\n")
    assert cli(data_dir, "users", "remove", "jose\u0301").returncode == 0
    assert cli(data_dir, "users", "list").stdout == "alice  editor\n"


@pytest.mark.parametrize(
    "name, warning",
    [
        ("\u0430lice", "looks like the existing user 'alice'"),  # Cyrillic а
        ("\u0430dmin", "mixes scripts (CYRILLIC, LATIN)"),
        ("\u0441\u043e\u0435", "looks like the ASCII name 'coe'"),  # all Cyrillic
        ("Alice", "looks like the existing user 'alice'"),
        ("a1ice", "looks like the existing user 'alice'"),
    ],
)
def test_look_alike_names_are_warned_about(data_dir: Path, name: str, warning: str) -> None:
    result = cli(data_dir, "users", "add", name, "--password-stdin", stdin="pw\n")
    assert result.returncode == 0, result.stderr
    assert f"trackgate: warning: username {name!r} {warning}"[:60] in result.stderr
    assert warning in result.stderr
    assert result.stdout == f"added {name}\n"


def test_plain_names_get_no_warning(data_dir: Path) -> None:
    for name in ("bob", "zoë", "müller-2", "\u5f20\u4f1f"):
        result = cli(data_dir, "users", "add", name, "--password-stdin", stdin="pw\n")
        assert result.returncode == 0 and result.stderr == "", (name, result.stderr)
