"""Privileges of the run-time role on PostgreSQL (`saga-worker db grant ROLE`).

Migrations run as the owner of the tables. Workers, beat, console and CLI connect as a
separate role that holds only what they use, so that, connected as that role, nothing can
rewrite history: no UPDATE, DELETE or TRUNCATE on the audit table (the triggers refuse them
even for the owner), and no DDL. Only an owner can `ALTER TABLE ... DISABLE TRIGGER` or
`DROP TRIGGER`, which is why the run-time role must never own the tables nor be a member of
their owner's role.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy import Connection, Engine, text

from ..errors import ConfigurationError, GrantRefused
from .migrate import VERSION_TABLE

#: Per table, exactly what the run-time processes do with it. A new table in a migration
#: needs its line here (tests/unit/test_grants.py fails until it has one).
RUNTIME_GRANTS: dict[str, tuple[str, ...]] = {
    "saga_checkpoints": ("SELECT", "INSERT", "UPDATE"),
    "saga_audit_logs": ("SELECT", "INSERT"),
    # The shared signing key (or its fingerprint): read, and created once by the first process.
    "saga_settings": ("SELECT", "INSERT"),
    # Read only, so that `saga-worker db current` works as the run-time role.
    VERSION_TABLE: ("SELECT",),
}

#: Application tables that steps write (`--table`, `--examples`): what a step's effect and
#: its compensation need.
APP_TABLE_GRANTS = ("SELECT", "INSERT", "UPDATE", "DELETE")

TABLE_PRIVILEGES = ("SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE", "REFERENCES", "TRIGGER")


@dataclass(frozen=True)
class GrantReport:
    """What `grant_runtime` left the role with."""

    role: str
    schema: str
    tables: dict[str, tuple[str, ...]]
    sequences: tuple[str, ...]
    #: Privileges the role still has beyond `tables` through PUBLIC or another role it is a
    #: member of, each with the statement that removes it. Empty when the grant is exact.
    excess: list[str] = field(default_factory=list)
    created: bool = False

    def as_dict(self) -> dict[str, object]:
        return {
            "role": self.role,
            "schema": self.schema,
            "tables": {t: list(p) for t, p in self.tables.items()},
            "sequences": list(self.sequences),
            "excess": list(self.excess),
            "created": self.created,
        }


def grant_runtime(
    engine: Engine,
    role: str,
    app_tables: tuple[str, ...] = (),
    *,
    create: bool = False,
    password: str | None = None,
) -> GrantReport:
    """Give `role` exactly the run-time privileges, in one transaction; run it as the owner.

    Idempotent: everything the role held on these tables and their sequences is revoked first,
    then granted again, so running it twice (or after a new migration) converges. With
    `create`, a missing role is created (LOGIN, no other attribute; needs CREATEROLE); with
    `password`, its password is set, after the checks, so a refused role is left untouched.
    """
    if engine.dialect.name != "postgresql":
        raise ConfigurationError(
            "db grant needs PostgreSQL: SAGA_DATABASE_URL points at "
            f"{engine.dialect.name}, which has no roles"
        )
    with engine.begin() as conn:
        superuser = conn.execute(
            text("SELECT rolsuper FROM pg_roles WHERE rolname = :role"), {"role": role}
        ).scalar()
        created = superuser is None and create
        if created:
            _login_role(conn, "CREATE", role, password)
            superuser = False
        if superuser is None:
            raise GrantRefused(
                f"no PostgreSQL role {role!r}: create it first (CREATE ROLE {_quote(conn, role)} "
                "LOGIN PASSWORD '...'), then run `saga-worker db grant` again"
            )
        if superuser:
            raise GrantRefused(
                f"role {role!r} is a superuser, which bypasses every privilege and trigger: "
                "give the processes a role without SUPERUSER"
            )
        wanted = dict(RUNTIME_GRANTS)
        wanted.update({table: APP_TABLE_GRANTS for table in app_tables})
        found = _tables(conn, wanted)
        schema = found["saga_checkpoints"][0]
        for table, (table_schema, owner) in found.items():
            _check_roles(conn, role, table, table_schema, owner)
        if password is not None and not created:
            _login_role(conn, "ALTER", role, password)
        sequences: list[str] = []
        me = _quote(conn, role)
        conn.execute(text(f"GRANT USAGE ON SCHEMA {_quote(conn, schema)} TO {me}"))
        for table, privileges in wanted.items():
            if table not in found:
                continue
            qualified = _qualified(conn, found[table][0], table)
            conn.execute(text(f"REVOKE ALL ON TABLE {qualified} FROM {me}"))
            conn.execute(text(f"GRANT {', '.join(privileges)} ON TABLE {qualified} TO {me}"))
            for sequence in _owned_sequences(conn, qualified):
                seq = _qualified(conn, found[table][0], sequence)
                conn.execute(text(f"REVOKE ALL ON SEQUENCE {seq} FROM {me}"))
                if "INSERT" in privileges:
                    conn.execute(text(f"GRANT USAGE ON SEQUENCE {seq} TO {me}"))
                    sequences.append(sequence)
        granted = {t: p for t, p in wanted.items() if t in found}
        excess = _verify(conn, role, schema, granted, found)
    return GrantReport(role, schema, granted, tuple(sequences), excess, created)


def _login_role(conn: Connection, verb: str, role: str, password: str | None) -> None:
    # The server quotes name and password (format %I / %L), so any password is safe.
    template = f"{verb} ROLE %I WITH LOGIN" + (" PASSWORD %L" if password is not None else "")
    statement = conn.execute(
        text(
            "SELECT format(CAST(:template AS text), CAST(:role AS text), "
            "CAST(:password AS text))"
        ),
        {"template": template, "role": role, "password": password},
    ).scalar_one()
    # Not text(): a password may hold ':name', which text() would take for a parameter.
    conn.exec_driver_sql(str(statement))


def _tables(conn: Connection, wanted: dict[str, tuple[str, ...]]) -> dict[str, tuple[str, str]]:
    """schema and owner of each wanted table that exists (as the search path resolves it)."""
    found: dict[str, tuple[str, str]] = {}
    for table in wanted:
        row = conn.execute(
            text(
                "SELECT n.nspname, pg_get_userbyid(c.relowner) FROM pg_class c "
                "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = to_regclass(:t)"
            ),
            {"t": _quote(conn, table)},
        ).first()
        if row is not None:
            found[table] = (str(row[0]), str(row[1]))
        elif table in RUNTIME_GRANTS and table != VERSION_TABLE:
            raise GrantRefused(
                f"the database has no table {table}: run `saga-worker db upgrade` first"
            )
        elif table not in RUNTIME_GRANTS:
            raise GrantRefused(
                f"the database has no table {table!r}: create it first (as its owner), then "
                "grant (`--examples` creates the example tables)"
            )
    return found


def _check_roles(conn: Connection, role: str, table: str, schema: str, owner: str) -> None:
    if conn.execute(
        text("SELECT pg_has_role(:role, :owner, 'MEMBER')"), {"role": role, "owner": owner}
    ).scalar():
        raise GrantRefused(
            f"role {role!r} owns {schema}.{table} (or is a member of its owner {owner!r}), so it "
            "could disable the audit table's triggers: run the processes as a separate role "
            "that owns nothing"
        )
    if not conn.execute(
        text("SELECT pg_has_role(current_user, :owner, 'USAGE')"), {"owner": owner}
    ).scalar():
        me = conn.execute(text("SELECT current_user")).scalar()
        raise GrantRefused(
            f"connected as {me!r}, which cannot grant on {schema}.{table} (owned by {owner!r}): "
            "run `saga-worker db grant` with the owner's SAGA_DATABASE_URL (the one migrations use)"
        )


def _owned_sequences(conn: Connection, qualified: str) -> list[str]:
    """Sequences behind serial or identity columns of the table."""
    rows = conn.execute(
        text(
            "SELECT s.relname FROM pg_class s JOIN pg_depend d ON d.objid = s.oid "
            "WHERE s.relkind = 'S' AND d.deptype IN ('a', 'i') "
            "AND d.refobjid = to_regclass(:t) ORDER BY s.relname"
        ),
        {"t": qualified},
    )
    return [str(r[0]) for r in rows]


def _verify(
    conn: Connection,
    role: str,
    schema: str,
    granted: dict[str, tuple[str, ...]],
    found: dict[str, tuple[str, str]],
) -> list[str]:
    """Check what the role can do now: a missing grant is an error (the GRANT warned and did
    nothing), an extra privilege from PUBLIC or a membership is reported with its fix."""
    excess: list[str] = []
    for table, privileges in granted.items():
        qualified = _qualified(conn, found[table][0], table)
        for privilege in TABLE_PRIVILEGES:
            has = conn.execute(
                text("SELECT has_table_privilege(:role, to_regclass(:t), :p)"),
                {"role": role, "t": qualified, "p": privilege},
            ).scalar()
            if privilege in privileges and not has:
                raise GrantRefused(
                    f"granting {privilege} on {qualified} to {role!r} had no effect: run "
                    "`saga-worker db grant` as the owner of the tables"
                )
            if privilege not in privileges and has:
                excess.append(
                    f"{privilege} on {qualified} (from PUBLIC or a role {role!r} is a member "
                    f"of: REVOKE {privilege} ON {qualified} FROM PUBLIC, or from that role)"
                )
    if conn.execute(
        text("SELECT has_schema_privilege(:role, :s, 'CREATE')"), {"role": role, "s": schema}
    ).scalar():
        excess.append(
            f"CREATE on schema {schema} (REVOKE CREATE ON SCHEMA {_quote(conn, schema)} "
            "FROM PUBLIC; PostgreSQL 15 and later do this by default for schema public)"
        )
    return excess


def _quote(conn: Connection, name: str) -> str:
    return str(conn.dialect.identifier_preparer.quote(name))


def _qualified(conn: Connection, schema: str, name: str) -> str:
    return f"{_quote(conn, schema)}.{_quote(conn, name)}"
