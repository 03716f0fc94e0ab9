"""`saga-worker web`: run the console; `saga-worker web add-user`: manage its users."""

from __future__ import annotations

import sys

import click

from ._output import EXIT_CONFIG


def register(main: click.Group) -> None:
    main.add_command(web)


@click.group(invoke_without_command=True)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8090, show_default=True, type=int, help="Port to listen on.")
@click.pass_context
def web(ctx: click.Context, host: str, port: int) -> None:
    """Run the saga console (needs `pip install 'saga_worker[web]'`).

    It reads SAGA_DATABASE_URL and sends operator actions through SAGA_BROKER_URL, like the
    CLI; users come from SAGA_WEB_USERS_FILE (`saga-worker web add-user`). Put it behind
    TLS (and set SAGA_WEB_SECURE_COOKIES=1) anywhere but on loopback.
    """
    if ctx.invoked_subcommand is not None:
        return
    try:
        import uvicorn

        from ..web.app import create_app
    except ImportError as exc:
        click.echo(
            f"the console needs its extra: pip install 'saga_worker[web]' ({exc.name} is missing)",
            err=True,
        )
        raise click.exceptions.Exit(EXIT_CONFIG) from None
    from ..client import SagaClient
    from ..registry import import_modules

    client = SagaClient()
    import_modules(client.settings.imports)
    uvicorn.run(create_app(client), host=host, port=port, log_level="info", proxy_headers=False)


@web.command("add-user")
@click.argument("name")
@click.option(
    "--role",
    type=click.Choice(["viewer", "operator"]),
    required=True,
    help="viewer: read; operator: also retry, abort, approve, reject.",
)
@click.option(
    "--password-stdin",
    is_flag=True,
    help="Read the password from the first line of stdin instead of prompting.",
)
def add_user(name: str, role: str, password_stdin: bool) -> None:
    """Add (or replace) a console user in SAGA_WEB_USERS_FILE; only a salted scrypt hash of
    the password is stored."""
    from ..config import Settings
    from ..web.settings import WebSettings
    from ..web.users import UsersFile

    if password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = click.prompt("Password", hide_input=True, confirmation_prompt=True)
    web_settings = WebSettings.from_env(Settings.from_env())
    new = UsersFile(web_settings.users_file).add(name, role, password)
    verb = "added" if new else "replaced"
    click.echo(f"{verb} {name} ({role}) in {web_settings.users_file}")
