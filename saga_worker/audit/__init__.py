"""The audit trail: redaction, the per-saga hash chain, its verification, export files.

One concern per module, imported from the module that owns it (there is one way to import
each name; this package re-exports nothing, so that importing the pure parts never pulls in
the database):

- `redaction`: `Redactor`, `REDACTED`, log redaction;
- `chain`: the hash definition (`AUDIT_HASH_SPEC`, `row_hash`) and `build_rows`;
- `verify`: `ChainVerifier`, `ChainProblem` and its kinds, `verify_chain`;
- `export`: the JSON Lines / CSV export file format, written and read;
- `archive`: timeline, export with manifest, and verification of a database or a file.
"""
