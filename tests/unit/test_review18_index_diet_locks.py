"""Migration 0008 builds its new audit indexes before it drops any old one.

`saga-worker db upgrade` runs every migration in one transaction. On PostgreSQL a plain
DROP INDEX takes an ACCESS EXCLUSIVE lock on the table, held until that transaction ends;
CREATE INDEX only a SHARE lock (writes wait, reads go on). Dropping first, as 0008 did,
blocked every read of saga_audit_logs (`audit show`, the console's timeline, the workers'
chain head reads) for the two index builds over the whole table, not only writes as its
docstring said. Checked on the SQL that `db upgrade --sql` prints (no server needed).
"""

from __future__ import annotations

import io
import re

from sqlalchemy import inspect

from saga_worker.store.migrate import upgrade, upgrade_sql
from saga_worker.store.tables import audit_logs


def statements(start: str, end: str) -> list[str]:
    out = io.StringIO()
    upgrade_sql("postgresql://user@host/db", out, f"{start}:{end}")
    return [s.strip() for s in out.getvalue().split(";") if s.strip()]


def test_every_create_index_on_the_audit_table_comes_before_its_first_drop() -> None:
    sql = statements("0007", "0008")
    creates = [i for i, s in enumerate(sql) if re.match(r"CREATE INDEX \S+ ON saga_audit_logs", s)]
    drops = [i for i, s in enumerate(sql) if s.startswith("DROP INDEX ix_saga_audit_logs_")]
    assert creates and drops
    assert max(creates) < min(drops), sql


def test_sqlite_upgrade_gives_the_schema_of_the_metadata(tmp_path: object) -> None:
    from sqlalchemy import create_engine

    engine = create_engine(f"sqlite:///{tmp_path}/db.sqlite")
    upgrade(engine)
    found = {i["name"]: i["column_names"] for i in inspect(engine).get_indexes(audit_logs.name)}
    assert found == {i.name: [c.name for c in i.columns] for i in audit_logs.indexes}
