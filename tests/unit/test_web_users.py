"""The console's users file: only salted scrypt hashes, constant-cost checks, 0600."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from saga_worker.errors import ConfigurationError
from saga_worker.web.users import UsersFile, hash_password, password_matches


def test_only_a_salted_hash_is_stored_and_it_checks_the_password(tmp_path: Path) -> None:
    users = UsersFile(tmp_path / "users.json")
    assert users.add("olivia", "operator", "correct horse battery") is True
    text = (tmp_path / "users.json").read_text()
    assert "correct horse" not in text and "scrypt$" in text
    assert stat.S_IMODE((tmp_path / "users.json").stat().st_mode) == 0o600
    user = users.check("olivia", "correct horse battery")
    assert user is not None and user.role == "operator" and user.can_act
    assert users.check("olivia", "correct horse batterY") is None
    assert users.check("nobody", "correct horse battery") is None
    assert users.add("olivia", "viewer", "another long password") is False  # replaced
    assert users.lookup("olivia") is not None and not users.lookup("olivia").can_act  # type: ignore[union-attr]


def test_two_hashes_of_one_password_differ_and_a_mangled_hash_never_matches() -> None:
    first, second = hash_password("same password!"), hash_password("same password!")
    assert first != second
    assert password_matches("same password!", first) and password_matches("same password!", second)
    for broken in (
        "",
        "scrypt$x",
        first.replace("scrypt", "md5"),
        first[:-4] + "AAAA",
        "a$b$c$d$e$f",
    ):
        assert not password_matches("same password!", broken)


@pytest.mark.parametrize(
    ("name", "role", "password", "problem"),
    [
        ("bad name", "viewer", "long enough password", "user name"),
        ("ok", "admin", "long enough password", "role"),
        ("ok", "viewer", "short", "password"),
        ("x\x00", "viewer", "long enough password", "user name"),
    ],
)
def test_bad_users_are_refused_saying_what_to_fix(
    tmp_path: Path, name: str, role: str, password: str, problem: str
) -> None:
    with pytest.raises(ConfigurationError, match=problem):
        UsersFile(tmp_path / "u.json").add(name, role, password)


def test_an_unreadable_users_file_is_a_configuration_error(tmp_path: Path) -> None:
    path = tmp_path / "u.json"
    path.write_text("{not json")
    with pytest.raises(ConfigurationError, match="add-user"):
        UsersFile(path).check("olivia", "whatever password")
