"""`saga-worker web`: the saga console (issue 17).

Server-rendered pages (Starlette, Jinja2; no front-end build step) and a JSON API under
`/api/`, reading the checkpoint and audit tables and sending operator actions through the
engine, with the web user's identity in the audit trail. Install with
`pip install 'saga_worker[web]'`; see docs/console.md.
"""
