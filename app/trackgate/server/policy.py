"""trackgate's policy layer: a WSGI wrapper in front of MLflow's Flask app.

MLflow lets any caller choose where the server reads and writes files: an experiment's
``artifact_location`` (``file:///etc``), a model version's ``source``, a workspace's artifact
root. The server then writes run artifacts there, or reads them back, as the account it runs
as. Here every request is matched with MLflow's own URL map (so ``/api/2.0``, ``/ajax-api``,
``/api/3.0`` and ``/graphql`` are the same endpoint, exactly as Flask dispatches them) and the
few endpoints in ``RULES`` get their body parsed and checked before MLflow sees it. Everything
else passes untouched: the log calls in the hot path pay one URL-map lookup (~7 us).

A refusal is a 400 in MLflow's own error format, which the MLflow client prints as is.

``RULES`` is keyed by MLflow's endpoint (handler) name, so later checks that belong in front of
MLflow (roles, stamping the verified author) go into the same table.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote, urlsplit

if TYPE_CHECKING:
    from .access import Access

StartResponse = Callable[..., Any]
USER_ENVIRON = "HTTP_X_TRACKGATE_USER"  # set by nginx from the gateway's answer, never a client
DEFAULT_ARTIFACT_ROOT = "mlflow-artifacts:/"
MAX_CHECKED_BODY = 4 * 1024 * 1024  # the bodies we parse are small JSON documents

# GraphQL mutation fields of this MLflow version that only read (see test_policy): any other
# mutation is refused until someone has looked at what it does.
READ_ONLY_GRAPHQL_MUTATIONS = frozenset(
    {"mlflowSearchRuns", "mlflowSearchDatasets", "testMutation", "__typename"}
)


class PolicyViolation(Exception):
    """A request the policy refuses; the message is shown to the client."""

    def __init__(
        self,
        message: str,
        status: str = "400 Bad Request",
        error_code: str = "INVALID_PARAMETER_VALUE",
    ) -> None:
        super().__init__(message)
        self.status = status
        self.error_code = error_code


@dataclass
class Call:
    """One request as a rule sees it: the endpoint, the verified user and the JSON body."""

    endpoint: str
    method: str
    user: str | None
    view_args: dict[str, Any]
    body: Any = None
    environ: dict[str, Any] = field(default_factory=dict, repr=False)


@dataclass(frozen=True)
class Rule:
    """What the policy does for one MLflow endpoint (handler name)."""

    check: Callable[[Call, Policy], None]
    parse_body: bool = True


# --- path checks ----------------------------------------------------------------------------

_UNSAFE_CHARS = re.compile(r"[%\\\x00-\x20\x7f]")
_UNSAFE_IN_NAMES = re.compile(r"[%\\\x00-\x1f\x7f]")  # registry names may hold spaces
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _clean_segments(path: str) -> list[str] | None:
    """The '/'-separated segments of PATH, or None if any is empty, '.' or '..'."""
    segments = path.split("/")
    if any(s in ("", ".", "..") for s in segments):
        return None
    return segments


def is_under_root(uri: str, root: str) -> bool:
    """True if URI is ROOT itself or a clean path below it: same scheme and host, no '..', '.',
    empty segments, percent-escapes, backslashes, whitespace, query, fragment or ';' params."""
    if not isinstance(uri, str) or _UNSAFE_CHARS.search(uri) or ";" in uri:
        return False
    if not root.endswith("/"):
        root += "/"
    if not uri.startswith(root):
        return False  # the root's scheme and host spelled exactly (no case or slash tricks)
    parts = urlsplit(uri)
    if parts.query or parts.fragment or "?" in uri or "#" in uri:
        return False
    if not urlsplit(root).netloc and uri.startswith(f"{parts.scheme}://"):
        return False  # mlflow-artifacts://host/... names another server
    rest = uri[len(root) :].rstrip("/")
    return rest == "" or _clean_segments(rest) is not None


def _is_clean_scheme_uri(uri: str, scheme: str) -> bool:
    """`runs:/ID/path` or `models:/NAME/VERSION` style: that scheme, no host, clean segments.
    The store resolves these itself; they never name a file."""
    if _UNSAFE_IN_NAMES.search(uri) or any(c in uri for c in "?#;"):
        return False
    prefix = f"{scheme}:/"
    if not uri.startswith(prefix) or uri.startswith(prefix + "/"):
        return False
    return _clean_segments(uri[len(prefix) :].rstrip("/")) is not None


# --- the rules ------------------------------------------------------------------------------


def _field_values(body: dict[str, Any], name: str) -> list[Any]:
    """Every value MLflow could take for a proto field: its name and its JSON (camelCase) name
    both parse into the same field."""
    head, *rest = name.split("_")
    camel = head + "".join(part.capitalize() for part in rest)
    return [body[key] for key in dict.fromkeys((name, camel)) if key in body]


def _require_object(call: Call) -> dict[str, Any]:
    body = call.body
    if body is None:
        return {}
    if not isinstance(body, dict):
        raise PolicyViolation("the request body must be a JSON object")
    return body


def _check_locations(call: Call, policy: Policy, *names: str) -> None:
    body = _require_object(call)
    for name in names:
        container, _, leaf = name.rpartition(".")
        scope: Any = body
        for part in filter(None, container.split(".")):
            values = _field_values(scope, part) if isinstance(scope, dict) else []
            scope = values[-1] if values else None
        if scope is None:
            continue
        if not isinstance(scope, dict):
            raise PolicyViolation(f"'{container}' must be a JSON object")
        for value in _field_values(scope, leaf):
            if value in (None, ""):
                continue  # omitted: the server's own default under the artifact root
            if not isinstance(value, str) or not is_under_root(value, policy.artifact_root):
                raise PolicyViolation(
                    f"'{name}' must be omitted or a location under this server's artifact "
                    f"root {policy.artifact_root!r} (for example "
                    f"'{policy.artifact_root.rstrip('/')}/team-a'); got {value!r}. Artifacts "
                    "are stored by the server, not at a path the client chooses."
                )


def _check_experiment(call: Call, policy: Policy) -> None:
    _check_locations(call, policy, "artifact_location")


def _check_workspace(call: Call, policy: Policy) -> None:
    _check_locations(call, policy, "default_artifact_root", "trace_archival_config.location")


def _check_model_version_source(call: Call, policy: Policy) -> None:
    from mlflow.prompt.constants import _PROMPT_SOURCE_PLACEHOLDERS

    body = _require_object(call)
    for source in _field_values(body, "source"):
        if source in (None, ""):
            continue  # MLflow refuses a missing source itself
        if not isinstance(source, str):
            raise PolicyViolation("'source' must be a string")
        if (
            source in _PROMPT_SOURCE_PLACEHOLDERS
            or _is_clean_scheme_uri(source, "runs")
            or _is_clean_scheme_uri(source, "models")
            or is_under_root(source, policy.artifact_root)
        ):
            continue
        raise PolicyViolation(
            f"a model version 'source' must be runs:/RUN_ID/PATH, models:/..., or a location "
            f"under this server's artifact root {policy.artifact_root!r}; got {source!r}. The "
            "server reads model files only from where it stored them."
        )


def _parse_graphql(query: str) -> Any:
    """QUERY's document; a query graphql-core cannot parse is refused with its message."""
    from graphql import parse
    from graphql.error import GraphQLError

    try:
        return parse(query)
    except GraphQLError as exc:
        raise PolicyViolation(f"invalid GraphQL query: {exc.message}") from None


def _graphql_mutation_fields(query: str) -> set[str]:
    """The top-level field names of every mutation in QUERY (fragments followed)."""
    from graphql.language import (
        FieldNode,
        FragmentDefinitionNode,
        FragmentSpreadNode,
        InlineFragmentNode,
        OperationDefinitionNode,
        OperationType,
    )

    document = _parse_graphql(query)
    fragments = {
        d.name.value: d for d in document.definitions if isinstance(d, FragmentDefinitionNode)
    }
    names: set[str] = set()

    def collect(selection_set: Any, seen: frozenset[str]) -> None:
        for node in selection_set.selections:
            if isinstance(node, FieldNode):
                names.add(node.name.value)
            elif isinstance(node, InlineFragmentNode):
                collect(node.selection_set, seen)
            elif isinstance(node, FragmentSpreadNode):
                fragment = fragments.get(node.name.value)
                if fragment is not None and node.name.value not in seen:
                    collect(fragment.selection_set, seen | {node.name.value})

    for definition in document.definitions:
        if (
            isinstance(definition, OperationDefinitionNode)
            and definition.operation == OperationType.MUTATION
        ):
            collect(definition.selection_set, frozenset())
    return names


def graphql_arguments(query: str, variables: Any) -> list[tuple[str, Any]]:
    """Every (name, value) of QUERY's arguments and input-object fields, at any depth, with
    $variables replaced by what VARIABLES gives them: the ids a GraphQL request names, however
    it spells them (inline, nested in `input: {...}`, or passed as variables)."""
    from graphql.language import (
        ArgumentNode,
        ListValueNode,
        ObjectFieldNode,
        ObjectValueNode,
        VariableNode,
        visit,
    )
    from graphql.language.visitor import Visitor

    document = _parse_graphql(query)
    given = variables if isinstance(variables, dict) else {}

    def value_of(node: Any) -> Any:
        if isinstance(node, VariableNode):
            return given.get(node.name.value)
        if isinstance(node, ListValueNode):
            return [value_of(item) for item in node.values]
        if isinstance(node, ObjectValueNode):
            return {f.name.value: value_of(f.value) for f in node.fields}
        return getattr(node, "value", None)

    found: list[tuple[str, Any]] = []

    class Arguments(Visitor):
        def enter_argument(self, node: ArgumentNode, *_: Any) -> None:
            found.append((node.name.value, value_of(node.value)))

        def enter_object_field(self, node: ObjectFieldNode, *_: Any) -> None:
            found.append((node.name.value, value_of(node.value)))

    visit(document, Arguments())
    # a variable that holds an object ({"input": {"experimentIds": [...]}}) names ids too
    for _, value in list(found):
        found += _nested_items(value)
    return found


def _nested_items(value: Any) -> list[tuple[str, Any]]:
    items: list[tuple[str, Any]] = []
    if isinstance(value, dict):
        for key, inner in value.items():
            items.append((str(key), inner))
            items += _nested_items(inner)
    elif isinstance(value, list):
        for inner in value:
            items += _nested_items(inner)
    return items


def _check_graphql(call: Call, policy: Policy) -> None:
    body = call.body
    if not isinstance(body, dict):
        return  # MLflow answers a body without a query with an error of its own
    query = body.get("query")
    if not isinstance(query, str) or "mutation" not in query:
        return  # no mutation without the keyword (GraphQL keywords cannot be escaped)
    unknown = sorted(_graphql_mutation_fields(query) - READ_ONLY_GRAPHQL_MUTATIONS)
    if unknown:
        raise PolicyViolation(
            f"GraphQL mutation {', '.join(unknown)} is not allowed through this server"
        )


RULES: dict[str, Rule] = {
    "_create_experiment": Rule(_check_experiment),
    "_create_model_version": Rule(_check_model_version_source),
    "_create_workspace_handler": Rule(_check_workspace),
    "_update_workspace_handler": Rule(_check_workspace),
    "_graphql": Rule(_check_graphql),
}


# --- the WSGI wrapper -----------------------------------------------------------------------


class Policy:
    """Wraps MLflow's Flask app (``Policy(app)``); ``url_map`` is the app's own."""

    def __init__(
        self,
        app: Any,
        *,
        url_map: Any = None,
        rules: dict[str, Rule] | None = None,
        artifact_root: str = DEFAULT_ARTIFACT_ROOT,
        access: Access | None = None,
    ) -> None:
        self.app = app
        self.url_map = url_map if url_map is not None else app.url_map
        self.rules = RULES if rules is None else rules
        self.artifact_root = artifact_root
        self.access = access  # roles, owners, stamping and audit (see access.py)

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        from werkzeug.exceptions import HTTPException
        from werkzeug.routing import RequestRedirect

        try:
            endpoint, view_args = self.url_map.bind_to_environ(environ).match()
        except (HTTPException, RequestRedirect):
            # 404/405/308: MLflow answers the same; a redirected client comes back here.
            return self.app(environ, start_response)
        except Exception:  # a request Flask could not route either: fail closed
            return _error(start_response, PolicyViolation("the request could not be routed"))
        try:
            _check_request_shape(endpoint, view_args, environ)
        except PolicyViolation as exc:
            return _error(start_response, exc)
        rule = self.rules.get(endpoint)
        if self.access is not None:
            return self.access.handle(self, endpoint, view_args, rule, environ, start_response)
        if rule is None:
            return self.app(environ, start_response)
        user = environ.get(USER_ENVIRON)
        call = Call(endpoint, environ.get("REQUEST_METHOD", ""), user, view_args, environ=environ)
        try:
            if rule.parse_body:
                call.body = _read_json_body(environ)
            rule.check(call, self)
        except PolicyViolation as exc:
            return _error(start_response, exc)
        return self.app(environ, start_response)


def _check_request_shape(endpoint: str, view_args: dict[str, Any],
                         environ: dict[str, Any]) -> None:
    """What the checks read must be what MLflow acts on.

    - A GET or HEAD carries no body: MLflow reads a GET's JSON body when it has no query
      string, where the owner and privacy checks (which read a GET's query) never look.
    - An artifact path is plain: MLflow decodes percent-escapes in it again, up to ten times
      (``%2535`` -> ``%35`` -> ``5``), so the path the checks saw would not be the one served.
    """
    method = environ.get("REQUEST_METHOD", "")
    if method in ("GET", "HEAD") and (
        environ.get("HTTP_TRANSFER_ENCODING")
        or (environ.get("CONTENT_LENGTH") or "0").strip() not in ("", "0")
    ):
        raise PolicyViolation(f"a {method} request carries no body: send the parameters in the "
                              "query string")
    paths = [str(view_args["artifact_path"])] if "artifact_path" in view_args else []
    if "artifact" in endpoint:
        paths += parse_qs(environ.get("QUERY_STRING", "")).get("path", [])
    for path in paths:
        if not is_plain_artifact_path(path):
            raise PolicyViolation(
                f"artifact path {path!r} is not plain: no percent-escapes, backslashes, "
                "control characters, or empty, '.' or '..' segments")


def is_plain_artifact_path(path: str) -> bool:
    """PATH names the same file before and after MLflow's own decoding and normalizing."""
    if path == "":
        return True  # the root of a listing
    if unquote(path) != path or "\\" in path or _CONTROL.search(path) or path[0] == "/":
        return False
    return _clean_segments(path.rstrip("/")) is not None


def _read_json_body(environ: dict[str, Any], limit: int = MAX_CHECKED_BODY) -> Any:
    """The body parsed as MLflow parses it (Flask's get_json, then once more if it was a JSON
    string); the stream is replaced so MLflow reads the very same bytes."""
    try:
        length = int(environ.get("CONTENT_LENGTH") or 0)
    except ValueError:
        raise PolicyViolation("invalid Content-Length") from None
    if length > limit:
        raise PolicyViolation("request body too large for this endpoint", "413 Content Too Large")
    stream = environ.get("wsgi.input")
    if stream is None:
        data = b""
    elif environ.get("wsgi.input_terminated"):  # gunicorn: reads end at the body's end
        data = stream.read(limit + 1)
    else:
        data = stream.read(length) if length > 0 else b""
    if len(data) > limit:
        raise PolicyViolation("request body too large for this endpoint", "413 Content Too Large")
    environ["wsgi.input"] = io.BytesIO(data)
    environ["CONTENT_LENGTH"] = str(len(data))
    environ.pop("wsgi.input_terminated", None)
    environ.pop("HTTP_TRANSFER_ENCODING", None)
    if not data.strip():
        return None
    try:
        body = json.loads(data)
        if isinstance(body, str):
            body = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise PolicyViolation("the request body is not valid JSON") from None
    return body


def _replace_json_body(environ: dict[str, Any], body: Any) -> None:
    """Hand MLflow BODY instead of what the client sent (server-stamped fields)."""
    data = json.dumps(body).encode()
    environ["wsgi.input"] = io.BytesIO(data)
    environ["CONTENT_LENGTH"] = str(len(data))
    environ["CONTENT_TYPE"] = "application/json"


def _error(start_response: StartResponse, exc: PolicyViolation) -> list[bytes]:
    body = json.dumps({"error_code": exc.error_code, "message": str(exc)}).encode()
    start_response(
        exc.status,
        [("Content-Type", "application/json"), ("Content-Length", str(len(body)))],
    )
    return [body]
