"""The schema module imports on every SQLAlchemy that pyproject.toml allows (>=2.0).

SQLAlchemy refuses a dialect keyword argument its dialect does not list, when the Table or
Index is built, so an option that only 2.1 knows makes `import saga_worker` fail on 2.0 (the
worker, the CLI, the harness). `postgresql_with` on a Table is such an option: 2.0.58's
PostgreSQL dialect accepts only the Table options below (its `construct_arguments`).
"""

from __future__ import annotations

from saga_worker.store.tables import metadata

#: SQLAlchemy 2.0.58, sqlalchemy/dialects/postgresql/base.py, PGDialect.construct_arguments.
SA20_POSTGRESQL = {
    "Table": {
        "ignore_search_path",
        "tablespace",
        "partition_by",
        "with_oids",
        "on_commit",
        "inherits",
        "using",
    },
    "Index": {
        "using",
        "include",
        "where",
        "ops",
        "concurrently",
        "with",
        "tablespace",
        "nulls_not_distinct",
    },
}


def _postgresql_options(kwargs: dict[str, object]) -> set[str]:
    return {k.removeprefix("postgresql_") for k in kwargs if k.startswith("postgresql_")}


def test_every_postgresql_option_of_the_schema_is_known_to_sqlalchemy_2_0() -> None:
    for table in metadata.tables.values():
        extra = _postgresql_options(dict(table.kwargs)) - SA20_POSTGRESQL["Table"]
        assert not extra, f"{table.name}: {extra} makes SQLAlchemy 2.0 refuse the table"
        for index in table.indexes:
            extra = _postgresql_options(dict(index.kwargs)) - SA20_POSTGRESQL["Index"]
            assert not extra, f"{index.name}: {extra} makes SQLAlchemy 2.0 refuse the index"
