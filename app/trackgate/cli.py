"""The `trackgate` command: thin wrappers around the plain functions of the other modules."""

from __future__ import annotations

import functools
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from pydantic import ValidationError

from . import accounts, client, database, nginx, provision, tls
from .groups import GroupsStore, groups_path
from .local import stack
from .roles import DEFAULT_ROLE, ROLES, RolesStore, roles_path
from .server import objectstore, proxyauth
from .settings import ENV_PREFIX, Settings, SettingsFileError, load_settings
from .tokens import TokenStore, parse_expires
from .users import (
    HtpasswdStore,
    UserError,
    lookalike_warnings,
    normalize_username,
    read_password,
    validate_username,
)

F = Callable[..., Any]


def _fail(message: str, code: int = 1) -> None:
    click.echo(f"trackgate: error: {message}", err=True)
    sys.exit(code)


def _default_text(name: str) -> str:
    field = Settings.model_fields[name]
    if field.default_factory is not None:
        return {
            "data_dir": "~/.local/share/trackgate; root: /var/lib/trackgate",
            "bcrypt_concurrency": "CPU count - 1",
            "extra_hostnames": "none",
            "trusted_proxies": "none",
            "served_models": "none",
        }[name]
    return "derived" if field.default is None else str(field.default)


def setting_options(*names: str) -> Callable[[F], F]:
    """Click options for settings fields: a flag beats TRACKGATE_<NAME>, which beats the default."""

    def decorate(func: F) -> F:
        for name in reversed(names):
            field = Settings.model_fields[name]
            annotation = field.annotation
            kind: Any = (
                int
                if annotation is int
                else (click.Path(path_type=Path) if "Path" in str(annotation) else str)
            )
            func = click.option(
                "--" + name.replace("_", "-"),
                name,
                type=kind,
                default=None,
                help=f"{field.description} [env {ENV_PREFIX}{name.upper()}; "
                f"default {_default_text(name)}]",
            )(func)
        return func

    return decorate


STACK_OPTIONS = ("data_dir", "hostname", "http_port", "https_port")


def _settings(values: dict[str, Any]) -> Settings:
    try:
        return load_settings(**values)
    except ValidationError as exc:
        problems = "; ".join(
            f"{ENV_PREFIX}{'.'.join(map(str, e['loc'])).upper()}: {e['msg']}" for e in exc.errors()
        )
        _fail(f"invalid settings: {problems}", code=2)
        raise  # unreachable
    except SettingsFileError as exc:
        _fail(str(exc), code=2)
        raise  # unreachable


def _guard(func: F) -> F:
    """Turn our own errors into one clear line and exit code 1, never a traceback."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (
            UserError,
            stack.StackError,
            tls.TLSError,
            client.ClientError,
            database.DatabaseError,
            nginx.NginxError,
            accounts.AccountError,
            objectstore.ObjectStoreError,
            proxyauth.ProxySecretError,
        ) as exc:
            _fail(str(exc))
        except PermissionError as exc:
            _fail(f"permission denied: {exc.filename} (run as the user that owns it, or root)")

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="trackgate")
def cli() -> None:
    """trackgate: a private, password-protected MLflow server (nginx + TLS + bcrypt)."""


# --- the stack on this machine -------------------------------------------------------------


@cli.command()
@setting_options(*STACK_OPTIONS)
@_guard
def up(**values: Any) -> None:
    """Start MLflow, the auth gateway and nginx in the background (sqlite + local artifacts by
    default); on first start create user 'admin' and print its password once."""
    settings = _settings(values)
    click.echo(f"Starting trackgate in {settings.data_dir} ...", err=True)
    result = stack.up(settings)
    if result.already_running:
        click.echo(f"trackgate is already running at {result.url}")
        return
    if result.cleaned:
        click.echo(f"stopped {result.cleaned} process(es) a killed supervisor had left", err=True)
    click.echo(f"trackgate is running at {result.url}")
    if result.admin_password:
        click.echo(f"\nCreated user '{provision.ADMIN}' with password: {result.admin_password}")
        click.echo("It is shown only this once (only its bcrypt hash is stored).")
    click.echo("\nBefore running a training script:")
    for line in stack.export_lines(settings, provision.ADMIN, result.admin_password):
        click.echo(f"  {line}")
    if settings.uses_local_ca:
        click.echo(f"\nBrowsers: trust {settings.ca_cert} (or accept the warning) and log in.")
    click.echo("Add users: trackgate users add NAME   Stop: trackgate down")


@cli.command()
@setting_options("data_dir")
@_guard
def down(**values: Any) -> None:
    """Stop the stack started by `trackgate up`; nothing is left running."""
    settings = _settings(values)
    click.echo("stopped" if stack.down(settings) else "trackgate was not running")


@cli.command()
@setting_options(*STACK_OPTIONS)
@_guard
def status(**values: Any) -> None:
    """Say whether the stack runs and how each component is: tracking and gateway by their own
    health checks, nginx by /health through it. Exit 0 if all are up, 1 if one is down, 3 if
    the stack is not running."""
    settings = stack.recorded_settings(_settings(values))
    state = stack.status(settings)
    if not state.running:
        click.echo("trackgate is not running (start it with `trackgate up`)")
        if state.leftovers:
            click.echo(f"  {state.health}")
        sys.exit(3)
    click.echo(f"trackgate is running at {settings.public_url} (supervisor pid {state.pid})")
    for name, problem in state.components.items():
        info = state.children.get(name, {})
        click.echo(f"  {name:9} pid {info.get('pid')}  restarts {info.get('restarts')}  "
                   f"{'ok' if problem is None else 'DOWN: ' + problem}")
    click.echo(f"  health    {state.health}")
    if not state.healthy:
        sys.exit(1)


# --- users ----------------------------------------------------------------------------------


@cli.group()
def users() -> None:
    """Manage the users in the htpasswd file (changes apply on the next request, no restart)."""


def _store(values: dict[str, Any]) -> HtpasswdStore:
    settings = _settings(values)
    return HtpasswdStore(settings.htpasswd, settings.bcrypt_rounds)


USER_OPTIONS = ("data_dir", "htpasswd_path", "bcrypt_rounds")
password_stdin_option = click.option(
    "--password-stdin", is_flag=True, help="Read the password from one line of standard input."
)


def _roles(values: dict[str, Any]) -> RolesStore:
    return RolesStore(roles_path(_settings(values)))


role_option = click.option(
    "--role",
    type=click.Choice(ROLES),
    default=DEFAULT_ROLE,
    show_default=True,
    help="viewer reads only; editor creates and logs, and changes what they own; admin all.",
)


@users.command("add")
@click.argument("name")
@password_stdin_option
@role_option
@setting_options(*USER_OPTIONS)
@_guard
def users_add(name: str, password_stdin: bool, role: str, **values: Any) -> None:
    """Add user NAME with ROLE (password from a double prompt or --password-stdin)."""
    store = _store(values)
    name = validate_username(normalize_username(name))
    _warn_lookalike(store, name)
    store.add(name, read_password(from_stdin=password_stdin, new=True))
    _roles(values).set(name, role)
    click.echo(f"added {name}")


@users.command("set-role")
@click.argument("name")
@click.argument("role", type=click.Choice(ROLES))
@setting_options(*USER_OPTIONS)
@_guard
def users_set_role(name: str, role: str, **values: Any) -> None:
    """Give NAME the ROLE viewer, editor or admin (applies on their next request)."""
    entry = _store(values).find(name)
    if entry is None:
        raise UserError(f"no user {name!r}; use `trackgate users add {name} --role {role}`")
    roles = _roles(values)
    if roles.read().get(entry.name) == role:
        click.echo(f"unchanged: {entry.name} is {role}")
        return
    roles.set(entry.name, role)
    click.echo(f"changed: {entry.name} is now {role}")


def _warn_lookalike(store: HtpasswdStore, name: str) -> None:
    """Warn (stderr) when NAME could be mistaken for another account; it is still created."""
    for warning in lookalike_warnings(name, store.list()):
        click.echo(f"trackgate: warning: {warning}", err=True)


@users.command("passwd")
@click.argument("name")
@password_stdin_option
@setting_options(*USER_OPTIONS)
@_guard
def users_passwd(name: str, password_stdin: bool, **values: Any) -> None:
    """Change NAME's password; the old one stops working on the next request."""
    store = _store(values)
    if store.find(name) is None:
        raise UserError(f"no user {name!r}; use `trackgate users add {name}`")
    store.set_password(name, read_password(from_stdin=password_stdin, new=True))
    click.echo(f"changed password of {name}")


@users.command("set")
@click.argument("name")
@password_stdin_option
@setting_options(*USER_OPTIONS)
@_guard
def users_set(name: str, password_stdin: bool, **values: Any) -> None:
    """Create NAME or set its password; prints 'unchanged' if it already had that password."""
    store = _store(values)
    name = validate_username(normalize_username(name))
    if store.find(name) is None:
        _warn_lookalike(store, name)
    changed = store.ensure(name, read_password(from_stdin=password_stdin, new=True))
    click.echo(f"changed: {name}" if changed else f"unchanged: {name}")


@users.command("remove")
@click.argument("name")
@setting_options(*USER_OPTIONS)
@_guard
def users_remove(name: str, **values: Any) -> None:
    """Remove user NAME and revoke their API tokens; their next request is refused (browser
    sessions included)."""
    _store(values).remove(name)
    _roles(values).remove(name)
    # A later user of the same name must not inherit them.
    revoked = _tokens(values).revoke_user(name)
    click.echo(f"removed {name}" + (f" and revoked {revoked} token(s)" if revoked else ""))


@users.command("list")
@setting_options(*USER_OPTIONS)
@_guard
def users_list(**values: Any) -> None:
    """List the users and their roles; accounts without a bcrypt hash are marked disabled."""
    store = _store(values)
    roles = _roles(values)
    for entry in sorted(store.entries(), key=lambda e: e.name):
        role = roles.role_of(entry.name)
        if entry.enabled:
            click.echo(f"{entry.name}  {role}")
            continue
        click.echo(f"{entry.name}  {role} (disabled)")
        click.echo(
            f"trackgate: warning: {store.path} line {entry.line} ({entry.name}): not a bcrypt "
            f"hash, so the account is disabled; `trackgate users passwd {entry.name}` enables it",
            err=True,
        )


@users.command("verify")
@click.argument("name")
@password_stdin_option
@setting_options(*USER_OPTIONS)
@_guard
def users_verify(name: str, password_stdin: bool, **values: Any) -> None:
    """Check NAME's password against the file (exit 0 if right, 1 if not)."""
    store = _store(values)
    entry = store.find(name)
    if entry is not None and not entry.enabled:
        _fail(
            f"user {entry.name!r} is disabled: {store.path} line {entry.line} is not a bcrypt "
            "hash (only bcrypt logs in)"
        )
    if not store.verify(name, read_password(from_stdin=password_stdin, new=False)):
        _fail(f"wrong password or no user {name!r}")
    click.echo("ok")


# --- API tokens -----------------------------------------------------------------------------


@cli.group()
def tokens() -> None:
    """API tokens for scripts and CI: clients set MLFLOW_TRACKING_TOKEN (sent as Bearer) instead
    of a person's password. Stored as sha256 only; changes apply on the next request."""


def _tokens(values: dict[str, Any]) -> TokenStore:
    return TokenStore(_settings(values).tokens_file)


@tokens.command("create")
@click.option("--user", "user", required=True, help="The user the token acts as.")
@click.option("--name", "name", required=True, help="A name for it (shown in the audit log).")
@click.option("--expires", default="90d", show_default=True,
              help="How long it works: 12h, 90d, 2w, 1y, or never.")
@click.option("--role", type=click.Choice(ROLES), default=None,
              help="At most this role (never more than the user's own; default: the user's).")
@setting_options(*USER_OPTIONS)
@_guard
def tokens_create(user: str, name: str, expires: str, role: str | None, **values: Any) -> None:
    """Create a token for USER and print it once (stdout; nothing else can show it again)."""
    entry = _store(values).find(user)
    if entry is None:
        raise UserError(f"no user {user!r}; use `trackgate users add {user}`")
    token = _tokens(values).add(entry.name, name, parse_expires(expires), role)
    click.echo(f"token {name!r} for {entry.name}, expires {_when(parse_expires(expires))}; "
               "it is shown only now:", err=True)
    click.echo(token)


@tokens.command("list")
@click.option("--user", "user", default=None, help="Only this user's tokens.")
@setting_options(*USER_OPTIONS)
@_guard
def tokens_list(user: str | None, **values: Any) -> None:
    """List tokens: user, name, role limit, created, expires (never the token)."""
    wanted = normalize_username(user) if user else None
    for token in _tokens(values).tokens():
        if wanted is not None and token.user != wanted:
            continue
        expires = "never" if not token.expires else _date(token.expires)
        state = " (expired)" if token.expired() else ""
        click.echo(f"{token.user}  {token.name}  role<={token.role or 'user'}  "
                   f"created {_date(token.created)}  expires {expires}{state}")


@tokens.command("revoke")
@click.option("--user", "user", required=True)
@click.option("--name", "name", required=True)
@setting_options(*USER_OPTIONS)
@_guard
def tokens_revoke(user: str, name: str, **values: Any) -> None:
    """Revoke USER's token NAME: its next request gets 401."""
    if not _tokens(values).revoke(user, name):
        raise UserError(f"{user} has no token named {name!r} (`trackgate tokens list`)")
    click.echo(f"revoked {name} of {normalize_username(user)}")


def _date(epoch: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(epoch))


def _when(seconds: int) -> str:
    return "never" if not seconds else _date(int(time.time()) + seconds)


# --- groups ---------------------------------------------------------------------------------


@cli.group()
def groups() -> None:
    """Manage groups: a grant tag `trackgate.grant.group:GROUP` gives its level to every member
    (changes apply on the next request, no restart)."""


def _groups(values: dict[str, Any]) -> GroupsStore:
    return GroupsStore(groups_path(_settings(values)))


@groups.command("add")
@click.argument("group")
@click.argument("users", nargs=-1, required=True)
@setting_options(*USER_OPTIONS)
@_guard
def groups_add(group: str, users: tuple[str, ...], **values: Any) -> None:
    """Put USERS into GROUP (created if new)."""
    known = _store(values).read()
    for user in users:
        if normalize_username(user) not in known:
            click.echo(f"trackgate: warning: no user {user!r} (yet)", err=True)
    _groups(values).add(group, list(users))
    click.echo(f"{group}: added {' '.join(users)}")


@groups.command("remove")
@click.argument("group")
@click.argument("users", nargs=-1, required=True)
@setting_options(*USER_OPTIONS)
@_guard
def groups_remove(group: str, users: tuple[str, ...], **values: Any) -> None:
    """Take USERS out of GROUP (a group left empty is removed); applies on their next request."""
    _groups(values).remove(group, list(users))
    click.echo(f"{group}: removed {' '.join(users)}")


@groups.command("list")
@setting_options(*USER_OPTIONS)
@_guard
def groups_list(**values: Any) -> None:
    """List the groups and their members, one group per line."""
    for group, members in sorted(_groups(values).read().items()):
        click.echo(f"{group}  {' '.join(members)}")


# --- audit log ------------------------------------------------------------------------------


@cli.command("audit")
@click.option("--user", "-u", "user", help="Only this user's lines.")
@click.option("--since", help="Only lines since this time: 30m, 2h, 7d ago or an ISO time (UTC).")
@click.option("--action", help="Only actions containing this text (create_run, alias, login...).")
@click.option("--json", "as_json", is_flag=True, help="Print the JSON lines as stored.")
@setting_options("data_dir")
@_guard
def audit_cmd(
    user: str | None, since: str | None, action: str | None, as_json: bool, **values: Any
) -> None:
    """Read the audit log: every write and every password check, one line each."""
    from . import audit

    settings = _settings(values)
    path = audit.audit_path(settings)
    if path is None:
        raise UserError("logs go to stderr (TRACKGATE_LOG_DIR=-): read the audit lines there")
    try:
        moment = audit.parse_since(since) if since else None
    except ValueError as exc:
        raise UserError(str(exc)) from None
    user = normalize_username(user) if user else None
    for event in audit.read_events(path, user=user, since=moment, action=action):
        if as_json:
            click.echo(json.dumps(event, ensure_ascii=False))
            continue
        ids = " ".join(
            f"{key}={event[key]}"
            for key in ("experiment_id", "run_id", "model", "version")
            if key in event
        )
        click.echo(
            f"{event.get('time', '?')}  {event.get('user') or '-'} ({event.get('role') or '-'})  "
            f"{event.get('action', '?')}  {event.get('status', '?')}  "
            f"{event.get('method') or ''} {event.get('path') or ''}  "
            f"ip={event.get('client_ip') or '-'}  {ids}".rstrip()
        )


# --- client side ----------------------------------------------------------------------------


@cli.command()
@click.argument("url")
@click.option("--username", "-u", prompt=True, help="Your trackgate user name.")
@password_stdin_option
@click.option(
    "--ca-cert",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="The server's CA certificate, if it uses trackgate's local CA.",
)
@click.option(
    "--env-file",
    type=click.Path(path_type=Path),
    default=client.USER_ENV_FILE,
    show_default=True,
    help="Where to save the credentials (mode 0600).",
)
@_guard
def login(
    url: str, username: str, password_stdin: bool, ca_cert: Path | None, env_file: Path
) -> None:
    """Check credentials against the server at URL and save them for training scripts."""
    password = read_password(from_stdin=password_stdin, new=False)
    config = client.TrackingConfig(
        url.rstrip("/"), username, password, str(ca_cert) if ca_cert else None
    )
    result = client.check(config)
    if not result.ok:
        _fail(result.message)
    path = client.write_env_file(env_file, config)
    click.echo(f"{result.message}; saved to {path}")


@cli.command("check")
@click.option(
    "--env-file",
    type=click.Path(path_type=Path),
    default=Path(".env"),
    show_default=True,
    help="A .env file to read after the environment.",
)
@_guard
def check_cmd(env_file: Path) -> None:
    """Report which server and user the current environment would use, and whether it works."""
    config = client.resolve(env_file)
    click.echo(f"tracking URI: {config.uri or '(not set)'}")
    click.echo(f"username:     {config.username or '(not set)'}")
    click.echo(f"password:     {'(set)' if config.password else '(not set)'}")
    if config.cert_path:
        click.echo(f"CA cert:      {config.cert_path}")
    result = client.check(config)
    click.echo(result.message)
    if not result.ok:
        sys.exit(1)


# --- building blocks for systemd units, containers and Ansible --------------------------------


@cli.command("serve")
@click.argument("server", type=click.Choice(["tracking", "gateway"]))
@setting_options(*STACK_OPTIONS)
@_guard
def serve_cmd(server: str, **values: Any) -> None:
    """Run one server in the foreground (used by systemd units and containers)."""
    from .server import gateway, tracking

    settings = _settings(values)
    (tracking.run if server == "tracking" else gateway.run)(settings)


@cli.command("serve-model")
@click.argument("model_uri")
@click.option(
    "--name",
    required=True,
    help="Publish at /serving/NAME/invocations (letters, digits, '.', '_', '-').",
)
@click.option(
    "--workers", type=int, default=1, show_default=True, help="Scoring server worker processes."
)
@click.option(
    "--address",
    help="Listen on unix:/absolute/path or a private host:port (never a public IP) instead of "
    "a socket in a private temporary dir: for nginx on another host or in another container.",
)
@click.option(
    "--publish/--no-publish",
    default=True,
    show_default=True,
    help="Add the nginx location and reload nginx. --no-publish: nginx elsewhere publishes "
    "NAME=ADDRESS of its TRACKGATE_SERVED_MODELS (compose, Ansible).",
)
@click.option(
    "--connect-to",
    metavar="HOST",
    help="Reach the tracking URI's server at HOST, keeping its name for TLS and Host "
    "(compose: nginx's service name).",
)
@setting_options("data_dir")
@_guard
def serve_model_cmd(model_uri: str, name: str, workers: int, address: str | None,
                    publish: bool, connect_to: str | None, **values: Any) -> None:
    """Serve MODEL_URI (e.g. models:/NAME@champion) with the MLflow scoring server and publish
    it through nginx behind the same login, until Ctrl-C. The model is downloaded through the
    proxy with the exported MLFLOW_TRACKING_* credentials; it then runs with none of them, on a
    Unix socket only nginx can reach, and (started by root) as TRACKGATE_MODEL_USER: a model is
    code from whoever registered it."""
    from .local import serving

    settings = stack.recorded_settings(_settings(values))

    def ready(published: serving.Published) -> None:
        if publish:
            click.echo(f"serving {model_uri} at {published.url} (Ctrl-C stops and unpublishes)")
        else:
            click.echo(f"serving {model_uri} on {published.upstream.removesuffix(':')} for "
                       f"{published.url} (published by TRACKGATE_SERVED_MODELS)")

    code = serving.serve_model(settings, model_uri, name, workers=workers, address=address,
                               publish_location=publish, connect_host=connect_to,
                               on_ready=ready)
    click.echo(f"stopped serving {name}" + (f"; /serving/{name}/ is unpublished"
                                            if publish else ""))
    sys.exit(code)


@cli.command("supervise", hidden=True)
@setting_options("data_dir")
@_guard
def supervise_cmd(**values: Any) -> None:
    """Run the local supervisor (started by `trackgate up`)."""
    from .local.supervisor import supervise

    sys.exit(supervise(_settings(values)))


@cli.group("logs")
def logs_group() -> None:
    """The logs of `trackgate up` (data_dir/logs)."""


@logs_group.command("rotate")
@setting_options("data_dir")
@_guard
def logs_rotate(**values: Any) -> None:
    """Rotate the logs now: each is renamed to NAME.1 (older copies shift, TRACKGATE_LOG_KEEP
    are kept) and every server reopens its file, so no line is lost. The supervisor also does
    this by itself when a log passes TRACKGATE_LOG_MAX_BYTES."""
    settings = stack.recorded_settings(_settings(values))
    stack.rotate_logs(settings)
    click.echo(f"rotated the logs in {settings.logs}")


@cli.command("prepare")
@setting_options(*STACK_OPTIONS)
@_guard
def prepare_cmd(**values: Any) -> None:
    """Create directories, certificates, the admin user and nginx.conf without starting
    anything (compose's init service; `trackgate up` does this first)."""
    settings = _settings(values)
    password = provision.prepare(settings)
    if password:
        click.echo(f"Created user '{provision.ADMIN}' with password: {password}")
        click.echo("It is shown only this once (only its bcrypt hash is stored).")
    click.echo(f"prepared {settings.data_dir}")


@cli.command("nginx-site")
@click.argument("path", type=click.Path(path_type=Path))
@setting_options(*STACK_OPTIONS)
@click.option("--check", is_flag=True, help="Change nothing; exit 0 if up to date, 3 if not.")
@_guard
def nginx_site_cmd(path: Path, check: bool, **values: Any) -> None:
    """Render only the nginx site (http context) to PATH, for a host whose own nginx.conf
    includes it (Ansible); prints 'changed' or 'unchanged'."""
    settings = _settings(values)
    changed = nginx.write_if_changed(path, nginx.render(settings, standalone=False), check=check)
    click.echo(f"{'changed' if changed else 'unchanged'}: {path}")
    sys.exit(3 if check and changed else 0)


@cli.command("config")
@setting_options(*STACK_OPTIONS)
@click.option("--json", "as_json", is_flag=True, help="Print JSON, for tools.")
@_guard
def config_cmd(as_json: bool, **values: Any) -> None:
    """Print the derived paths, ports and URLs of these settings (tools read them from here
    instead of deriving them again)."""
    layout = _settings(values).layout()
    if as_json:
        click.echo(json.dumps(layout, indent=2, sort_keys=True))
        return
    click.echo(f"public URL:  {layout['public_url']}")
    click.echo(f"database:    {layout['database_uri']}")
    click.echo(f"artifacts:   {layout['artifacts_uri']}")
    for name, port in layout["ports"].items():
        click.echo(f"port {name + ':':12} {port}")
    for name, path in layout["paths"].items():
        if path is not None:
            click.echo(f"{name + ':':20} {path}")


@cli.group()
def monitoring() -> None:
    """Prometheus for trackgate: scrape config and alert rules (see README, Monitoring)."""


@monitoring.command("render")
@click.option("--out-dir", type=click.Path(path_type=Path), required=True,
              help="Where prometheus.yml and trackgate-alerts.yml are written.")
@click.option("--url", "urls", multiple=True, metavar="COMPONENT=URL",
              help="Scrape this URL for tracking, gateway or nginx instead of the one "
              "`config --json` lists (e.g. a container's name); repeatable.")
@click.option("--scrape-interval", default="15s", show_default=True)
@click.option("--evaluation-interval", default="15s", show_default=True)
@click.option("--down-for", default="2m", show_default=True,
              help="How long a component is down before TrackgateDown fires.")
@setting_options(*STACK_OPTIONS)
@_guard
def monitoring_render(out_dir: Path, urls: tuple[str, ...], scrape_interval: str,
                      evaluation_interval: str, down_for: str, **values: Any) -> None:
    """Write a Prometheus config scraping this host's metrics URLs, and the alert rules."""
    from . import prometheus

    settings = _settings(values)
    if not settings.metrics:
        _fail("metrics are off (TRACKGATE_METRICS=false): nothing to scrape")
    found = dict(settings.metrics_urls)
    for item in urls:
        component, sep, url = item.partition("=")
        if not sep or component not in prometheus.COMPONENTS:
            _fail(f"--url {item!r}: give COMPONENT=URL, COMPONENT one of "
                  f"{', '.join(prometheus.COMPONENTS)}")
        found[component] = url
    out_dir.mkdir(parents=True, exist_ok=True)
    rules = out_dir / "trackgate-alerts.yml"
    try:
        config = prometheus.render_config(
            [{"name": settings.hostname, "metrics_urls": found}], str(rules.resolve()),
            scrape_interval=scrape_interval, evaluation_interval=evaluation_interval)
    except ValueError as exc:
        _fail(str(exc))
        return
    rules.write_text(prometheus.render_rules(down_for=down_for))
    (out_dir / "prometheus.yml").write_text(config)
    click.echo(f"wrote {out_dir / 'prometheus.yml'} and {rules}")


@cli.command("probe")
@click.argument("component", type=click.Choice(["tracking", "gateway"]))
@click.option("--timeout", type=float, default=4.0, show_default=True, help="Seconds to wait.")
@setting_options(*STACK_OPTIONS)
@_guard
def probe_cmd(component: str, timeout: float, **values: Any) -> None:
    """Health check of one server at the address the settings give it (container
    healthchecks, systemd): exit 0 if it answers 200, else 1 with the reason."""
    from .local.probe import health

    problem = health(_settings(values), component, timeout=timeout)
    if problem:
        _fail(f"{component}: {problem}")
    click.echo(f"{component}: ok")


@cli.command("tls")
@setting_options("data_dir", "hostname")
@_guard
def tls_cmd(**values: Any) -> None:
    """Issue the local CA and server certificate if missing, expiring or for other names
    (prints 'changed' or 'unchanged'); with TRACKGATE_TLS_CERT/KEY only checks the files."""
    settings = _settings(values)

    def new_ca(reason: str) -> None:
        click.echo(
            f"trackgate: new local CA ({reason}): clients and browsers must trust "
            f"{settings.ca_cert} again",
            err=True,
        )

    changed = tls.ensure_certificates(settings, on_new_ca=new_ca)
    click.echo(f"{'changed' if changed else 'unchanged'}: {settings.cert_file}")


@cli.group("db")
def db() -> None:
    """The MLflow database schema."""


@db.command("upgrade")
@setting_options("data_dir", "backend_store_uri")
@_guard
def db_upgrade(**values: Any) -> None:
    """Create or upgrade the schema to this MLflow version: the database is backed up first
    (data_dir/backups), and the upgrade runs under a lock, once (a second caller waits, then
    finds it current). `trackgate up` refuses an old schema until this has run."""
    settings = _settings(values)
    outcome = database.ensure_schema(settings, allow_upgrade=True)
    if outcome == "upgraded" and accounts.running_as_root():
        database.give_back(settings)
    click.echo(f"database schema {outcome}")


@db.command("backup")
@click.option(
    "--output",
    "-o",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Where to write it; default data_dir/backups/mlflow-backup-TIME.db|.pgdump.",
)
@setting_options("data_dir", "backend_store_uri")
@_guard
def db_backup(output: Path | None, **values: Any) -> None:
    """Copy the database consistently while clients keep writing (sqlite online backup API, or
    pg_dump for PostgreSQL); mode 0600. Prints the file written."""
    started = time.monotonic()
    path = database.backup(_settings(values), output)
    size = path.stat().st_size
    click.echo(f"{path}  ({size / 1e6:.1f} MB in {time.monotonic() - started:.1f} s)")


# --- backup and restore (see backup.py) -------------------------------------------------------

BACKUP_OPTIONS = ("data_dir", "backend_store_uri", "artifacts_destination", "htpasswd_path",
                  "s3_endpoint_url", "s3_credentials_file")


def _say(message: str) -> None:
    click.echo(message, err=True)


@cli.command("backup")
@click.option(
    "--output",
    "-o",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Archive to write; default data_dir/backups/trackgate-TIME.tar.",
)
@click.option(
    "--verify",
    "verify_archive",
    type=click.Path(path_type=Path),
    default=None,
    metavar="ARCHIVE",
    help="Instead of backing up: check ARCHIVE's checksums, restore it into a scratch dir, "
    "serve it on free ports and compare it with its manifest and the live server.",
)
@click.option(
    "--keep",
    type=click.IntRange(min=1),
    default=None,
    metavar="N",
    help="After a successful backup, delete all but the newest N trackgate-*.tar archives "
    "in the output's directory (retention for scheduled backups).",
)
@setting_options(*BACKUP_OPTIONS)
@_guard
def backup_cmd(
    output: Path | None, verify_archive: Path | None, keep: int | None, **values: Any
) -> None:
    """One archive of the database, artifacts (a local dir or every object under an s3://
    destination's prefix), users, TLS files, secrets and settings, consistent while clients keep
    writing (mode 0600), with a manifest of sha256 sums."""
    from . import backup

    settings = _settings(values)
    try:
        if verify_archive is not None:
            if output is not None:
                _fail("--output and --verify do not go together", code=2)
            if keep is not None:
                _fail("--keep and --verify do not go together", code=2)
            result = backup.verify(settings, verify_archive, say=_say)
            for line in result.differences:
                click.echo(f"  differs: {line}", err=True)
            click.echo(result.summary())
            sys.exit(0 if result.ok else 1)
        result = backup.backup(settings, output, say=_say)
        if keep is not None:
            for old in backup.prune(result.path.parent, keep):
                click.echo(f"deleted old archive {old}", err=True)
        click.echo(result.summary())
    except backup.BackupError as exc:
        _fail(str(exc))


@cli.command("restore")
@click.argument("archive", type=click.Path(path_type=Path))
@click.option(
    "--force",
    is_flag=True,
    help="Replace what a non-empty data dir holds (and every object under an s3:// prefix).",
)
@setting_options(*BACKUP_OPTIONS)
@_guard
def restore_cmd(archive: Path, force: bool, **values: Any) -> None:
    """Restore ARCHIVE into the (empty) data dir, database and artifact store (an s3://
    destination's prefix must hold no object): every checksum is checked before anything is
    written; then `trackgate up` serves it with the same users, CA and data."""
    from . import backup

    try:
        result = backup.restore(_settings(values), archive, force=force, say=_say)
    except backup.BackupError as exc:
        _fail(str(exc))
        return
    for note in result.notes:
        click.echo(f"note: {note}", err=True)
    click.echo(result.summary())


def main() -> None:
    cli(prog_name="trackgate")


if __name__ == "__main__":
    main()
