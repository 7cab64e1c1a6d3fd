"""Attacks 7 and 12 of issue 12 at the login itself: an htpasswd line `name:!` or `name:*` (the
usual way to disable an account) logged in with the password `!` / `*`, and legacy hashes
(des_crypt, apr1, plaintext) worked; names that look the same were different accounts. Only
bcrypt logs in now, a broken file locks everybody out instead of crashing, and a name is one
account however its accents are encoded."""

from __future__ import annotations

import base64
import os
import unicodedata
from collections.abc import Iterator
from pathlib import Path

import pytest
from passlib.hash import apr_md5_crypt, des_crypt, sha256_crypt
from trackgate.users import HtpasswdStore, UserError

from ..support import RunningStack, running_stack

pytestmark = pytest.mark.security


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    with running_stack(tmp_path_factory.mktemp("accounts-stack"), bcrypt_rounds=4) as running:
        yield running


def _basic(name: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{name}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


@pytest.mark.parametrize(
    "name, stored, password",
    [
        ("disabled-bang", "!", "!"),
        ("disabled-star", "*", "*"),
        ("legacy-des", des_crypt.hash("pw"), "pw"),
        ("legacy-apr1", apr_md5_crypt.hash("pw"), "pw"),
        ("legacy-sha256", sha256_crypt.hash("pw"), "pw"),
        ("plaintext", "pw", "pw"),
        ("bcrypt-like", "$2y$04$short", "pw"),
    ],
)
def test_only_bcrypt_lines_log_in(
    stack: RunningStack, name: str, stored: str, password: str
) -> None:
    with stack.users._editing() as users:  # an admin's hand edit, or an old htpasswd tool
        users[name] = stored
    assert stack.get("/version", headers=_basic(name, password)).status_code == 401


def test_a_bcrypt_line_next_to_them_still_logs_in(stack: RunningStack) -> None:
    user = stack.new_user("bcrypt")
    assert stack.get("/version", auth=user).status_code == 200


def test_nfc_and_nfd_spellings_are_one_account(stack: RunningStack) -> None:
    nfd = "rene\u0301-" + stack.new_user("x")[0][-6:]
    nfc = unicodedata.normalize("NFC", nfd)
    stack.users.add(nfd, "accent-pw")  # stored as NFC
    assert nfc in stack.users.read() and nfd not in stack.users.read()
    for spelling in (nfc, nfd):
        assert stack.get("/version", headers=_basic(spelling, "accent-pw")).status_code == 200
    with pytest.raises(UserError, match="exists"):
        stack.users.add(nfc, "other-pw")


def test_a_hash_leading_name_is_refused(stack: RunningStack) -> None:
    with pytest.raises(UserError, match="starts with '#'"):
        stack.users.add("#x", "pw")
    assert not any(name.startswith("#") for name in stack.users.list())


def _replace(path: Path, data: bytes) -> None:
    """Swap the file atomically, keeping owner and mode (the gateway's account must read it)."""
    st = path.stat()
    tmp = path.with_name(".replacing")
    tmp.write_bytes(data)
    os.chown(tmp, st.st_uid, st.st_gid)
    tmp.chmod(st.st_mode & 0o777)
    tmp.replace(path)


def test_invalid_utf8_in_htpasswd_refuses_everyone_then_recovers(stack: RunningStack) -> None:
    user = stack.new_user("utf8")
    assert stack.get("/version", auth=user).status_code == 200  # cached from now on
    path = stack.settings.htpasswd
    good = path.read_bytes()
    try:
        _replace(path, good + b"caf\xe9:!\n")
        with pytest.raises(UserError, match="line .* is not valid UTF-8"):
            HtpasswdStore(path).read()
        # The gateway fails closed (no user, not even a cached one), and /health says the
        # stack is not healthy instead of hiding it (issue 13).
        assert stack.get("/version", auth=user).status_code == 401
        assert stack.get("/health").status_code != 200
    finally:
        _replace(path, good)
    assert stack.get("/version", auth=user).status_code == 200
    assert stack.get("/health").status_code == 200
