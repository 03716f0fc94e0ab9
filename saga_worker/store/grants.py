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
from sqlalchemy.exc import DBAPIError

from ..errors import ConfigurationError, GrantRefused
from .migrate import VERSION_TABLE

#: Per table, exactly what the run-time processes do with it. A new table in a migration
#: needs its line here (tests/unit/test_grants.py fails until it has one).
RUNTIME_GRANTS: dict[str, tuple[str, ...]] = {
    "saga_checkpoints": ("SELECT", "INSERT", "UPDATE"),
    "saga_audit_logs": ("SELECT", "INSERT"),
    # `audit anchor` (CLI or beat) appends; nothing rewrites an anchor.
    "saga_audit_anchors": ("SELECT", "INSERT"),
    # The shared signing key (or its fingerprint): read, and created once by the first process.
    "saga_settings": ("SELECT", "INSERT"),
    # Each worker keeps its own row (heartbeat) and deletes it when it stops.
    "saga_workers": ("SELECT", "INSERT", "UPDATE", "DELETE"),
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


@dataclass(frozen=True)
class _Table:
    name: str  # as asked for: `table` or `schema.table`
    schema: str
    relname: str
    owner: str
    qualified: str  # quoted schema.relname
    oid: int


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
    `app_tables` (`table` or `schema.table`) get APP_TABLE_GRANTS.
    """
    if engine.dialect.name != "postgresql":
        raise ConfigurationError(
            "db grant needs PostgreSQL: SAGA_DATABASE_URL points at "
            f"{engine.dialect.name}, which has no roles"
        )
    with engine.begin() as conn:
        # Every table resolved (and a saga table refused) before any role is touched.
        found = _tables(conn, RUNTIME_GRANTS)
        found.update(_app_tables(conn, app_tables, found))
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
        _check_attributes(conn, role)
        wanted = dict(RUNTIME_GRANTS)
        wanted.update({table: APP_TABLE_GRANTS for table in found if table not in RUNTIME_GRANTS})
        for table in found.values():
            _check_roles(conn, role, table)
        if password is not None and not created:
            _login_role(conn, "ALTER", role, password)
        me = _quote(conn, role)
        schemas = sorted({t.schema for t in found.values()})
        for schema in schemas:
            conn.execute(text(f"GRANT USAGE ON SCHEMA {_quote(conn, schema)} TO {me}"))
        sequences: list[str] = []
        granted: dict[str, tuple[str, ...]] = {}
        for name, table in found.items():
            privileges = wanted[name]
            conn.execute(text(f"REVOKE ALL ON TABLE {table.qualified} FROM {me}"))
            conn.execute(text(f"GRANT {', '.join(privileges)} ON TABLE {table.qualified} TO {me}"))
            granted[f"{table.schema}.{table.relname}"] = privileges
            for seq_schema, sequence in _owned_sequences(conn, table.qualified):
                seq = _qualified(conn, seq_schema, sequence)
                conn.execute(text(f"REVOKE ALL ON SEQUENCE {seq} FROM {me}"))
                if "INSERT" in privileges:
                    conn.execute(text(f"GRANT USAGE ON SEQUENCE {seq} TO {me}"))
                    sequences.append(sequence)
        excess = _verify(conn, role, schemas, found, wanted)
    main_schema = found["saga_checkpoints"].schema
    return GrantReport(role, main_schema, granted, tuple(sequences), excess, created)


def _login_role(conn: Connection, verb: str, role: str, password: str | None) -> None:
    # The server quotes name and password (format %I / %L), so any password is safe.
    template = f"{verb} ROLE %I WITH LOGIN" + (" PASSWORD %L" if password is not None else "")
    statement = conn.execute(
        text(
            "SELECT format(CAST(:template AS text), CAST(:role AS text), CAST(:password AS text))"
        ),
        {"template": template, "role": role, "password": password},
    ).scalar_one()
    # Not text(): a password may hold ':name', which text() would take for a parameter.
    conn.exec_driver_sql(str(statement))


def _tables(conn: Connection, wanted: dict[str, tuple[str, ...]]) -> dict[str, _Table]:
    """The saga tables (as the search path resolves them); the version table may be missing."""
    found: dict[str, _Table] = {}
    for name in wanted:
        table = _resolve(conn, name, _quote(conn, name))
        if table is not None:
            found[name] = table
        elif name != VERSION_TABLE:
            raise GrantRefused(
                f"the database has no table {name}: run `saga-worker db upgrade` first"
            )
    return found


def _app_tables(
    conn: Connection, names: tuple[str, ...], saga: dict[str, _Table]
) -> dict[str, _Table]:
    """Each --table resolved to the table it names, refused when it is missing or is a saga
    table in any spelling (`"public"."saga_checkpoints"`) or schema: its privileges are fixed,
    and DELETE there would let the run-time role erase checkpoints or the audit trail."""
    saga_oids = {table.oid for table in saga.values()}
    found: dict[str, _Table] = {}
    for name in names:
        # The exact name (`MyTable`, `shop.orders`, as before), else SQL syntax (quotes, case).
        parts = name.split(".", 1)
        table = _resolve(conn, name, ".".join(_quote(conn, part) for part in parts))
        if table is None:
            table = _resolve(conn, name, name)
        if table is None:
            raise GrantRefused(
                f"the database has no table {name!r}: create it first (as its owner), then "
                "grant (`--examples` creates the example tables)"
            )
        if table.oid in saga_oids or table.relname in RUNTIME_GRANTS:
            raise GrantRefused(
                f"--table {name}: {table.schema}.{table.relname} is a saga table, whose run-time "
                "privileges are fixed; --table is for your application's tables only"
            )
        found[name] = table
    return found


def _resolve(conn: Connection, name: str, regclass: str) -> _Table | None:
    """The table (or partitioned table) `regclass` names, None when there is none or the
    text is not a valid name (in a savepoint: a syntax error must not end the transaction)."""
    try:
        with conn.begin_nested():
            row = conn.execute(
                text(
                    "SELECT c.oid, n.nspname, c.relname, pg_get_userbyid(c.relowner) "
                    "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                    "WHERE c.oid = to_regclass(:t) AND c.relkind IN ('r', 'p')"
                ),
                {"t": regclass},
            ).first()
    except DBAPIError:
        return None
    if row is None:
        return None
    oid, schema, relname, owner = int(row[0]), str(row[1]), str(row[2]), str(row[3])
    return _Table(name, schema, relname, owner, _qualified(conn, schema, relname), oid)


#: Role attributes that let a role climb above the run-time privileges: CREATEROLE can grant
#: itself the owner's role (PostgreSQL 15 and earlier, owner not a superuser); REPLICATION
#: reads every table through the replication protocol; BYPASSRLS ignores row security.
CLIMBING_ATTRIBUTES = {
    "rolsuper": "SUPERUSER",
    "rolcreaterole": "CREATEROLE",
    "rolreplication": "REPLICATION",
    "rolbypassrls": "BYPASSRLS",
}


def _check_attributes(conn: Connection, role: str) -> None:
    """Refuse a role that has, or is a member of a role that has, a CLIMBING_ATTRIBUTES one
    (a member can SET ROLE to it)."""
    columns = ", ".join(CLIMBING_ATTRIBUTES)
    rows = conn.execute(
        text(
            f"SELECT rolname, {columns} FROM pg_roles "
            "WHERE pg_has_role(:role, oid, 'MEMBER') ORDER BY rolname <> :role, rolname"
        ),
        {"role": role},
    ).all()
    for row in rows:
        holder = str(row[0])
        granted = [
            attribute
            for attribute, flag in zip(CLIMBING_ATTRIBUTES.values(), row[1:], strict=True)
            if flag
        ]
        if not granted:
            continue
        names = ", ".join(granted)
        if holder == role:
            removes = " ".join(f"NO{attribute}" for attribute in granted)
            raise GrantRefused(
                f"role {role!r} has {names}, with which it could gain more than the run-time "
                f"privileges: ALTER ROLE {_quote(conn, role)} {removes}, or give the "
                "processes another role"
            )
        raise GrantRefused(
            f"role {role!r} is a member of {holder!r}, which has {names}, so it could SET ROLE "
            f"to it: REVOKE {_quote(conn, holder)} FROM {_quote(conn, role)}, or give the "
            "processes another role"
        )


def _check_roles(conn: Connection, role: str, table: _Table) -> None:
    where = f"{table.schema}.{table.relname}"
    if conn.execute(
        text("SELECT pg_has_role(:role, :owner, 'MEMBER')"), {"role": role, "owner": table.owner}
    ).scalar():
        raise GrantRefused(
            f"role {role!r} owns {where} (or is a member of its owner {table.owner!r}), so it "
            "could disable the audit table's triggers: run the processes as a separate role "
            "that owns nothing"
        )
    if not conn.execute(
        text("SELECT pg_has_role(current_user, :owner, 'USAGE')"), {"owner": table.owner}
    ).scalar():
        me = conn.execute(text("SELECT current_user")).scalar()
        raise GrantRefused(
            f"connected as {me!r}, which cannot grant on {where} (owned by {table.owner!r}): "
            "run `saga-worker db grant` with the owner's SAGA_DATABASE_URL (the one migrations use)"
        )


def _owned_sequences(conn: Connection, qualified: str) -> list[tuple[str, str]]:
    """(schema, name) of the sequences behind serial or identity columns of the table."""
    rows = conn.execute(
        text(
            "SELECT n.nspname, s.relname FROM pg_class s "
            "JOIN pg_namespace n ON n.oid = s.relnamespace "
            "JOIN pg_depend d ON d.objid = s.oid "
            "WHERE s.relkind = 'S' AND d.deptype IN ('a', 'i') "
            "AND d.refobjid = to_regclass(:t) ORDER BY s.relname"
        ),
        {"t": qualified},
    )
    return [(str(r[0]), str(r[1])) for r in rows]


def _verify(
    conn: Connection,
    role: str,
    schemas: list[str],
    found: dict[str, _Table],
    wanted: dict[str, tuple[str, ...]],
) -> list[str]:
    """Check what the role can do now: a missing grant is an error (the GRANT warned and did
    nothing), an extra privilege from PUBLIC or a membership is reported with its fix."""
    excess: list[str] = []
    for name, table in found.items():
        for privilege in TABLE_PRIVILEGES:
            has = conn.execute(
                text("SELECT has_table_privilege(:role, to_regclass(:t), :p)"),
                {"role": role, "t": table.qualified, "p": privilege},
            ).scalar()
            if privilege in wanted[name] and not has:
                raise GrantRefused(
                    f"granting {privilege} on {table.qualified} to {role!r} had no effect: run "
                    "`saga-worker db grant` as the owner of the tables"
                )
            if privilege not in wanted[name] and has:
                excess.append(
                    f"{privilege} on {table.qualified} (from PUBLIC or a role {role!r} is a "
                    f"member of: REVOKE {privilege} ON {table.qualified} FROM PUBLIC, or from "
                    "that role)"
                )
    for schema in schemas:
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
