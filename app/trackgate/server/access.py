"""Roles, owners, server-stamped authors and the audit log, in trackgate's policy layer.

The gateway vouches for the user (``X-Trackgate-User``) and their role (``X-Trackgate-Role``);
nginx drops any client copy of both. Here every request MLflow's URL map routes is classified
by its endpoint (handler) name and method:

- **reads**: GET, HEAD, OPTIONS, and the POST endpoints in ``READ_POSTS`` (searches and the
  like). Everyone may read; reads pass with one set lookup.
- **writes**: everything else, each with a kind in ``WRITE_KINDS``: ``editor`` (any editor),
  ``run``/``experiment``/``model``/``logged_model``/``artifact`` (an editor who owns the run,
  experiment, registered model or logged model, or was granted it), ``item`` (traces,
  assessments, datasets, scorers, label schemas, review queues, issues, jobs: an editor who owns
  or was granted EDIT on every experiment the item lives in, or is its recorded author; see
  ``_ITEM_FAMILIES``), ``admin``. The owner of an experiment passes for everything in it. An
  endpoint missing from the table (a new MLflow version) is admin-only until someone classifies it
  (tests/security/test_roles.py walks MLflow's list).

Grants: an experiment's or registered model's owner (or an admin, or a MANAGE grantee) tags it
``trackgate.grant.<user>`` = ``EDIT`` (log to its runs; add and tag model versions) or
``MANAGE`` (also rename, delete, tag, move aliases and stages), through MLflow's own API or UI;
``trackgate.grant.group:<group>`` grants the same to every member of a group (groups.py; the
gateway vouches for the user's groups, read here only when a resource carries such a tag).
An experiment tagged ``trackgate.private`` = ``true`` is readable only by its owner, admins and
users granted READ or more (PrivateExperiments; adding runs needs EDIT). A model version made
from one of its runs or logged models is hidden with it (refused by name, left out of lists).
While no experiment is private, reads keep their fast path. Ids are compared as MLflow reads
them: an experiment id named anywhere in a request (query, JSON body at any depth, GraphQL
arguments and variables) must be a plain decimal number, else a 400 (policy.py holds artifact
paths and GET requests to the same standard). A store that cannot say who owns something
answers 503 (LookupFailed), never "no such thing, pass".

Owners are recorded by the server itself: a run's ``user_id`` (stamped here from the verified
user, whatever the client sends), and a ``trackgate.owner`` tag that the server puts on every
new experiment and registered model. Model versions get a ``trackgate.author`` tag and their
``user_id`` column set to the verified user.

A refusal is a 403 in MLflow's error format (``PERMISSION_DENIED``) that names the user, the
role and the action. Every write, allowed or refused, is one JSON line in the audit log.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote

from ..audit import AuditLog
from ..roles import ADMIN, EDITOR, ROLES, VIEWER
from .policy import (
    USER_ENVIRON,
    Call,
    PolicyViolation,
    Rule,
    StartResponse,
    _error,
    _read_json_body,
    _replace_json_body,
)

if TYPE_CHECKING:
    from .policy import Policy

_log = logging.getLogger("trackgate.access")
ROLE_ENVIRON = "HTTP_X_TRACKGATE_ROLE"
REQUEST_ID_ENVIRON = "HTTP_X_REQUEST_ID"
OWNER_TAG = "trackgate.owner"
# Grants: the owner (or an admin, or a MANAGE grantee) tags an experiment or registered model
# with `trackgate.grant.<user>` = EDIT or MANAGE (READ is accepted and changes nothing yet: every
# user reads everything).
GRANT_PREFIX = "trackgate.grant."
# ... or `trackgate.grant.group:<group>`: every member of the group (a username holds no ':').
GROUP_GRANT_PREFIX = GRANT_PREFIX + "group:"
GROUPS_ENVIRON = "trackgate.groups"  # this request's user's groups, parsed at most once
GROUPS_HTTP_ENVIRON = "HTTP_X_TRACKGATE_GROUPS"
# An experiment tagged trackgate.private = true is seen only by its owner, admins and users
# granted READ or more: its id, runs, traces and logged models are refused to everyone else, and
# experiment searches leave it out. Every worker of this host sees a change before the write's
# answer is sent (PrivateExperiments.changed); tracking servers on other hosts within PRIVATE_TTL.
PRIVATE_TAG = "trackgate.private"
PRIVATE_TTL = 2.0
# Writes that can change who may read an experiment (its private, owner and grant tags).
STAMP_LIMIT = 4096  # bytes of the stamp file before it starts over
_PRIVACY_WRITES = frozenset({"_create_experiment", "_set_experiment_tag",
                             "_delete_experiment_tag", "_restore_experiment"})
LEVELS = {"READ": 1, "EDIT": 2, "MANAGE": 3}
# Model writes that EDIT allows; every other model write (aliases, stages, rename, delete,
# the model's tags) needs MANAGE.
_MODEL_EDITS = frozenset({"_create_model_version", "_update_model_version",
                          "_set_model_version_tag", "_delete_model_version_tag"})
AUTHOR_TAG = "trackgate.author"
USER_TAG = "mlflow.user"
READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# log-batch bodies can be large; nginx's JSON body cap (TRACKGATE_MAX_API_BODY) bounds them.
MAX_WRITE_BODY = 256 * 1024 * 1024

# POST endpoints that only read (MLflow 3.17). graphql's mutations are filtered by its own rule
# in policy.py (only read-only mutations pass); ui-telemetry stores no tracking data.
READ_POSTS = frozenset(
    {
        "_search_experiments",
        "_search_runs",
        "_search_logged_models",
        "_search_traces_v3",
        "_search_issues",
        "_search_prompt_optimization_jobs",
        "_search_evaluation_datasets_handler",
        "serve_search_datasets",
        "_get_latest_versions",
        "_create_presigned_download_url",
        "_batch_get_trace_infos",
        "_query_trace_metrics",
        "_calculate_trace_filter_correlation",
        "_not_implemented",
        "_graphql",
        "serve_post_ui_telemetry",
    }
)

_EDITOR = (
    # creating things (the server records the creator as owner or author); creating inside a
    # private experiment needs EDIT on it (_CREATES_IN_EXPERIMENT)
    "_create_experiment _create_run serve_create_promptlab_run _create_registered_model "
    "_start_trace_v3 _deprecated_start_trace_v2 _create_logged_model _create_issue "
    "_create_dataset_handler "
    "serve_gateway_proxy"
)
# Writes to things that live in experiments: traces and their assessments, evaluation datasets,
# scorers, label schemas, review queues, issues, evaluation and optimization jobs. An editor may
# do them when they may write the experiment (its owner or an EDIT grantee) or when they are the
# item's own author (a trace's trackgate.author, a dataset's created_by, an issue's or review
# queue's created_by). `_ITEM_FAMILY` says how each finds its item and experiments.
_ITEM_FAMILIES = {
    "trace": "_set_trace_tag _set_trace_tag_v3 _delete_trace_tag _delete_trace_tag_v3 "
             "_deprecated_end_trace_v2 _link_prompts_to_trace _create_assessment "
             "_update_assessment _delete_assessment",
    "dataset": "_delete_dataset_handler _set_dataset_tags_handler _delete_dataset_tag_handler "
               "_upsert_dataset_records_handler _delete_dataset_records_handler "
               "_add_dataset_to_experiments_handler _remove_dataset_from_experiments_handler",
    "review_queue": "_update_review_queue _delete_review_queue _add_items_to_review_queue "
                    "_remove_items_from_review_queue _set_review_queue_item_status",
    "label_schema": "_update_label_schema _delete_label_schema",
    "issue": "_update_issue",
    "prompt_job": "_cancel_prompt_optimization_job _delete_prompt_optimization_job",
    # configuration and jobs of an experiment, named by its id in the body
    "experiment": "_register_scorer _delete_scorer _invoke_scorer_handler "
                  "_invoke_genai_evaluate_handler _invoke_issue_detection_handler "
                  "_create_label_schema _create_review_queue _get_or_create_user_queue "
                  "_create_prompt_optimization_job",
}
_ITEM_FAMILY = {name: family for family, names in _ITEM_FAMILIES.items()
                for name in names.split()}
# Creating one of these in a private experiment takes EDIT on it (READ only shows it).
_CREATES_IN_EXPERIMENT = frozenset({
    "_create_run", "serve_create_promptlab_run", "_start_trace_v3", "_deprecated_start_trace_v2",
    "_create_logged_model", "_create_issue", "_create_dataset_handler",
    "_add_dataset_to_experiments_handler"})
_RUN = (
    "_update_run _delete_run _restore_run _log_metric _log_param _set_tag _delete_tag _log_batch "
    "_log_model _log_inputs _log_outputs _link_traces_to_run _create_presigned_upload_url "
    "serve_upload_artifact"
)
_EXPERIMENT = (
    "_delete_experiment _restore_experiment _update_experiment _set_experiment_tag "
    "_delete_experiment_tag _delete_traces"
)
# A logged model's owner is its trackgate.author tag (set by the server at creation).
_LOGGED_MODEL = (
    "_finalize_logged_model _delete_logged_model _set_logged_model_tags "
    "_delete_logged_model_tag _log_logged_model_params"
)
_MODEL = (
    "_rename_registered_model _update_registered_model _delete_registered_model "
    "_set_registered_model_tag _delete_registered_model_tag _set_registered_model_alias "
    "_delete_registered_model_alias _create_model_version _update_model_version "
    "_transition_stage _delete_model_version _set_model_version_tag _delete_model_version_tag"
)
_ARTIFACT = (
    "_upload_artifact _delete_artifact_mlflow_artifacts _create_multipart_upload_artifact "
    "_complete_multipart_upload_artifact _abort_multipart_upload_artifact"
)
# Server-wide configuration, secrets, outgoing calls, other users' jobs, demo data: admins.
_ADMIN = (
    "_create_workspace_handler _update_workspace_handler _delete_workspace_handler "
    "_create_webhook _update_webhook _delete_webhook _test_webhook "
    "_create_gateway_secret _update_gateway_secret _delete_gateway_secret "
    "_create_gateway_endpoint _update_gateway_endpoint _delete_gateway_endpoint "
    "_create_gateway_model_definition _update_gateway_model_definition "
    "_delete_gateway_model_definition _attach_model_to_gateway_endpoint "
    "_detach_model_from_gateway_endpoint _create_gateway_endpoint_binding "
    "_delete_gateway_endpoint_binding _set_gateway_endpoint_tag _delete_gateway_endpoint_tag "
    "_create_budget_policy _update_budget_policy _delete_budget_policy "
    "_create_gateway_guardrail _delete_gateway_guardrail _add_guardrail_to_endpoint "
    "_remove_guardrail_from_endpoint _update_endpoint_guardrail_config "
    "_upsert_online_scoring_config _cancel_job _generate_demo _delete_demo"
)
WRITE_KINDS: dict[str, str] = {
    **dict.fromkeys(_EDITOR.split(), "editor"),
    **dict.fromkeys(_RUN.split(), "run"),
    **dict.fromkeys(_EXPERIMENT.split(), "experiment"),
    **dict.fromkeys(_MODEL.split(), "model"),
    **dict.fromkeys(_LOGGED_MODEL.split(), "logged_model"),
    **dict.fromkeys(_ARTIFACT.split(), "artifact"),
    **dict.fromkeys(_ITEM_FAMILY, "item"),
    **dict.fromkeys(_ADMIN.split(), "admin"),
}
# Writes whose JSON body the access layer reads (owner ids, stamped fields).
_BODY_KINDS = frozenset({"run", "experiment", "model", "logged_model", "item"})
_STAMPED = frozenset({"_create_experiment", "_create_run", "serve_create_promptlab_run",
                      "_create_registered_model"})
# MLflow's own author fields, taken from the request body: the server sets them instead.
_AUTHOR_FIELDS = {
    **dict.fromkeys(("_create_issue", "_create_gateway_secret", "_create_gateway_endpoint",
                     "_create_gateway_model_definition", "_create_gateway_endpoint_binding",
                     "_create_budget_policy"), "created_by"),
    **dict.fromkeys(("_update_gateway_secret", "_update_gateway_endpoint",
                     "_update_gateway_model_definition", "_update_budget_policy"), "updated_by"),
}
# Traces and logged models record no author of their own: they get a trackgate.author tag.
_AUTHOR_TAGGED = frozenset({"_start_trace_v3", "_deprecated_start_trace_v2",
                            "_create_logged_model", "_create_dataset_handler"})
_NO_BODY = frozenset({"serve_upload_artifact"})  # the body is the file; ids in the query
_RUN_ID = re.compile(r"[0-9a-f]{32}")
_LOGGED_MODEL_ID = re.compile(r"m-[0-9a-f]{32}")
_TRACE_ID = re.compile(r"tr-[0-9a-f]{32}")


def is_write(endpoint: str, method: str) -> bool:
    return method not in READ_METHODS and endpoint not in READ_POSTS


def action_name(endpoint: str) -> str:
    """`_set_registered_model_alias` -> `set_registered_model_alias` (audit and messages)."""
    return endpoint.removeprefix("serve_").strip("_").removesuffix("_handler")


class LookupFailed(PolicyViolation):
    """The store could not say who owns something (database busy, connection lost): the
    request is refused, never let through unchecked. Clients retry a 503."""

    def __init__(self, what: str, exc: Exception) -> None:
        super().__init__(f"could not check access to {what} just now ({type(exc).__name__}): "
                         "try again", "503 Service Unavailable", "TEMPORARILY_UNAVAILABLE")


# What MLflow's stores raise for an id that names nothing (or cannot name anything).
_ABSENT_CODES = frozenset({"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"})


def _absent(exc: Exception, what: str) -> None:
    """Return if EXC says WHAT does not exist (MLflow then answers the request itself); raise
    LookupFailed for any other failure."""
    from mlflow.exceptions import MlflowException

    if isinstance(exc, MlflowException) and exc.error_code in _ABSENT_CODES:
        return
    raise LookupFailed(what, exc) from exc


class Owners:
    """Who owns a run, experiment or registered model, read from MLflow's own stores.

    Run owners (``user_id``) never change, so they are cached: the log calls of the hot path
    pay a dict lookup. Experiments and models are read each time (their owner tag can be
    changed by an admin) -- those writes are rare.
    """

    def __init__(self, cache_size: int = 20_000) -> None:
        self._runs: OrderedDict[str, tuple[str | None, str]] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    @staticmethod
    def _tracking() -> Any:
        from mlflow.server.handlers import _get_tracking_store

        return _get_tracking_store()

    @staticmethod
    def _registry() -> Any:
        from mlflow.server.handlers import _get_model_registry_store

        return _get_model_registry_store()

    def run(self, run_id: str) -> tuple[bool, str | None, str]:
        """(exists, owner, experiment id); both never change, so they are cached."""
        with self._lock:
            if run_id in self._runs:
                self._runs.move_to_end(run_id)
                return (True, *self._runs[run_id])
        try:
            info = self._tracking().get_run(run_id).info
        except Exception as exc:
            _absent(exc, f"run {run_id}")
            return False, None, ""
        entry = (info.user_id or None, str(info.experiment_id))
        with self._lock:
            self._runs[run_id] = entry
            if len(self._runs) > self._cache_size:
                self._runs.popitem(last=False)
        return (True, *entry)

    def experiment(self, experiment_id: str) -> tuple[bool, dict[str, str]]:
        """(exists, tags): the owner and grants are tags."""
        try:
            experiment = self._tracking().get_experiment(str(experiment_id))
        except Exception as exc:
            _absent(exc, f"experiment {experiment_id}")
            return False, {}
        return True, dict(experiment.tags or {})

    def logged_model(self, model_id: str) -> tuple[bool, str | None, str]:
        """(exists, author, experiment id)."""
        try:
            model = self._tracking().get_logged_model(model_id)
        except Exception as exc:
            _absent(exc, f"logged model {model_id}")
            return False, None, ""
        return True, (model.tags or {}).get(AUTHOR_TAG), str(model.experiment_id)

    def trace(self, trace_id: str) -> tuple[bool, str | None, list[str]]:
        """(exists, author, [experiment id]). Read each time: trace writes are not the hot
        path, and an admin may correct an author tag."""
        try:
            info = self._tracking().get_trace_info(trace_id)
        except Exception as exc:
            _absent(exc, f"trace {trace_id}")
            return False, None, []
        return True, (info.tags or {}).get(AUTHOR_TAG), [str(info.experiment_id)]

    def dataset(self, dataset_id: str) -> tuple[bool, str | None, list[str]]:
        """(exists, created_by (stamped by the server at creation), its experiment ids)."""
        store = self._tracking()
        try:
            created_by = store.get_dataset(dataset_id).created_by
            experiment_ids = store.get_dataset_experiment_ids(dataset_id)
        except Exception as exc:
            _absent(exc, f"dataset {dataset_id}")
            return False, None, []
        return True, created_by or None, [str(e) for e in experiment_ids or []]

    def review_queue(self, queue_id: str) -> tuple[bool, str | None, list[str]]:
        try:
            queue = self._tracking().get_review_queue(queue_id)
        except Exception as exc:
            _absent(exc, f"review queue {queue_id}")
            return False, None, []
        return True, queue.created_by or None, [str(queue.experiment_id)]

    def label_schema(self, schema_id: str) -> tuple[bool, str | None, list[str]]:
        try:
            schema = self._tracking().get_label_schema(schema_id)
        except Exception as exc:
            _absent(exc, f"label schema {schema_id}")
            return False, None, []
        return True, None, [str(schema.experiment_id)]

    def issue(self, issue_id: str) -> tuple[bool, str | None, list[str]]:
        try:
            issue = self._tracking().get_issue(issue_id)
        except Exception as exc:
            _absent(exc, f"issue {issue_id}")
            return False, None, []
        return True, issue.created_by or None, [str(issue.experiment_id)]

    def prompt_job(self, job_id: str) -> tuple[bool, str | None, list[str]]:
        """A prompt-optimization job's experiment, from the parameters MLflow stored."""
        try:
            from mlflow.server.handlers import _get_job_store

            params = json.loads(_get_job_store().get_job(job_id).params or "{}")
        except Exception as exc:
            _absent(exc, f"job {job_id}")
            return False, None, []
        experiment_id = params.get("experiment_id") if isinstance(params, dict) else None
        # a job that names no experiment is nobody's: only admins
        return True, None, [str(experiment_id)] if experiment_id else []

    def model_version(self, name: str, version: str | None = None,
                      alias: str | None = None) -> dict[str, Any] | None:
        """The run_id and source of a registered model's version (or alias), or None."""
        try:
            store = self._registry()
            found = (store.get_model_version(name, version) if version is not None
                     else store.get_model_version_by_alias(name, alias))
        except Exception as exc:
            _absent(exc, f"a version of model {name}")
            return None
        return {"version": str(found.version), "run_id": found.run_id or "",
                "source": found.source or ""}

    def model(self, name: str) -> tuple[bool, dict[str, str]]:
        try:
            model = self._registry().get_registered_model(name)
        except Exception as exc:
            _absent(exc, f"registered model {name}")
            return False, {}
        return True, dict(model.tags or {})

    def stamp_model_version(self, name: str, version: str, user: str) -> None:
        """Set the new version's user_id column (MLflow's store never sets it)."""
        store = self._registry()
        session_maker = getattr(store, "ManagedSessionMaker", None)
        if session_maker is None:
            return
        from mlflow.store.model_registry.dbmodels.models import SqlModelVersion

        with session_maker() as session:
            session.query(SqlModelVersion).filter(
                SqlModelVersion.name == name, SqlModelVersion.version == int(version)
            ).update({"user_id": user})


@dataclass(frozen=True)
class _Owned:
    what: str  # "run", "experiment", "registered model"
    ident: str
    owner: str | None
    grants: Callable[[], dict[str, str]]  # the tags that hold the grants
    granted_on: str  # where a grant for this resource is set, for the refusal


def granted(tags: dict[str, str], user: str | None,
            groups: Callable[[], frozenset[str]]) -> int:
    """The grant level (LEVELS) TAGS give USER, directly or through a group; 0 for none.
    GROUPS (the user's groups) is called only if a group is granted something here."""
    if not user:
        return 0
    level = LEVELS.get(tags.get(GRANT_PREFIX + user, ""), 0)
    named = [key for key in tags if key.startswith(GROUP_GRANT_PREFIX)]
    if named and level < LEVELS["MANAGE"]:
        mine = groups()
        for key in named:
            if key[len(GROUP_GRANT_PREFIX):] in mine:
                level = max(level, LEVELS.get(tags[key], 0))
    return level


def _no_groups() -> frozenset[str]:
    return frozenset()


def _forbidden(message: str) -> PolicyViolation:
    return PolicyViolation(message, "403 Forbidden", "PERMISSION_DENIED")


@functools.lru_cache(maxsize=256)
def _spellings(names: tuple[str, ...]) -> tuple[str, ...]:
    """Each proto field name and its JSON (camelCase) spelling, as MLflow accepts both."""
    spelled: list[str] = []
    for name in names:
        head, *rest = name.split("_")
        spelled += [name, head + "".join(part.capitalize() for part in rest)]
    return tuple(dict.fromkeys(spelled))


def _strings(body: Any, *names: str) -> list[str]:
    """The non-empty values BODY gives for any spelling of NAMES, as strings, once each."""
    if not isinstance(body, dict):
        return []
    values = [body[key] for key in _spellings(names) if key in body]
    return list(dict.fromkeys(str(v) for v in values if v not in (None, "")))


def _list_strings(body: Any, name: str) -> list[str]:
    """The string items of a list field, under either spelling of NAME."""
    if not isinstance(body, dict):
        return []
    found: list[str] = []
    for key in _spellings((name,)):
        values = body.get(key)
        if isinstance(values, list):
            found += [str(v) for v in values if v not in (None, "")]
    return list(dict.fromkeys(found))


def _tags(body: dict[str, Any]) -> list[Any]:
    tags = body.get("tags")
    return tags if isinstance(tags, list) else []


def _without_keys(tags: Iterable[Any], key: str) -> list[Any]:
    return [t for t in tags if not (isinstance(t, dict) and t.get("key") == key)]


_EXPERIMENT_REF = re.compile(
    r"experiment[_a-z]*[\"']?\s*[:=]\s*\[?\s*((?:[\"']?\d+[\"']?[\s,]*)+)", re.IGNORECASE)
_DIGITS = re.compile(r"\d+")
_RUN_TOKEN = re.compile(r"(?<![0-9a-f-])[0-9a-f]{32}(?![0-9a-f])")
_TRACE_TOKEN = re.compile(r"tr-[0-9a-f]{32}")
_MODEL_TOKEN = re.compile(r"m-[0-9a-f]{32}")
_EXPERIMENT_SEARCHES = frozenset({"_search_experiments"})
_DATASET_SEARCHES = frozenset({"_search_evaluation_datasets_handler"})
# Ids of things that live in an experiment, as requests name them (path, query or body), and the
# Owners method that finds their experiments: a private experiment's datasets, review queues,
# label schemas, issues and jobs are as private as it is.
_ITEM_IDS = {"dataset_id": "dataset", "queue_id": "review_queue", "schema_id": "label_schema",
             "issue_id": "issue", "job_id": "prompt_job"}


_EXPERIMENT_ID_KEYS = frozenset({"experiment_id", "experiment_ids", "experimentid",
                                  "experimentids"})
_CANONICAL_ID = re.compile(r"0|[1-9][0-9]*")


def _canonical_experiment_id(value: Any) -> str:
    """VALUE as the one spelling the checks compare; MLflow reads int(value), which also takes
    " 5", "+5", "05" and non-ASCII digits: those are refused rather than guessed at."""
    text = str(value) if isinstance(value, (str, int)) and not isinstance(value, bool) else ""
    if not _CANONICAL_ID.fullmatch(text):
        raise PolicyViolation(f"experiment id {value!r} is not a plain decimal number")
    return text


def _experiment_ids(endpoint: str, environ: dict[str, Any], body: Any) -> set[str]:
    """The experiment ids a request names in its query, anywhere in its JSON body, or in its
    GraphQL arguments and variables: each must be spelled plainly."""
    from .policy import _nested_items, graphql_arguments

    items = [(k, v) for k, values in parse_qs(environ.get("QUERY_STRING", "")).items()
             for v in values]
    items += _nested_items(body)
    if endpoint == "_graphql" and isinstance(body, dict) and isinstance(body.get("query"), str):
        items += graphql_arguments(body["query"], body.get("variables"))
    found: set[str] = set()
    for key, value in items:
        if key.lower() not in _EXPERIMENT_ID_KEYS or value in (None, ""):
            continue
        for item in value if isinstance(value, list) else [value]:
            found.add(_canonical_experiment_id(item))
    return found


def _without_experiments(answer: Any, hidden: frozenset[str]) -> Any:
    answer["experiments"] = [e for e in answer.get("experiments", [])
                             if str(e.get("experiment_id")) not in hidden]
    return answer
# Registry requests that name one model version (by name and version, or alias): refused if it
# was made from a run of a private experiment the user may not read.
_VERSION_NAMED = frozenset({
    "_get_model_version", "_get_model_version_download_uri", "serve_model_version_artifact",
    "_get_model_version_by_alias", "_update_model_version", "_delete_model_version",
    "_transition_stage", "_set_model_version_tag", "_delete_model_version_tag",
    "_set_registered_model_alias", "_delete_registered_model_alias"})
# ... and answers that list model versions leave those versions out.
_VERSION_LISTS = frozenset({"_search_model_versions", "_get_latest_versions",
                            "_search_registered_models", "_get_registered_model"})


def _is_version(node: Any) -> bool:
    return isinstance(node, dict) and "version" in node and any(
        k in node for k in ("run_id", "runId", "source"))


class PrivateExperiments:
    """The experiments tagged private, and their tags (owner, grants), cached per worker.

    Re-read when STAMP (a file the workers of this host share) changed, and at least every
    TTL seconds (other hosts' writes): the read fast path pays one stat while there are none.
    A worker that wrote a privacy tag appends to STAMP before its answer goes out, so no other
    worker here can serve the experiment from an older list once its creator has heard back.
    """

    def __init__(self, owners: Owners, ttl: float = PRIVATE_TTL,
                 stamp: Path | None = None) -> None:
        self.owners = owners
        self.ttl = ttl
        self.stamp = stamp
        self._stamp_seen: tuple[int, int] | None = None
        self._read_at = float("-inf")
        self._tags: dict[str, dict[str, str]] = {}
        self._lock = threading.Lock()
        self._traces: OrderedDict[str, str] = OrderedDict()

    def _stamp_now(self) -> tuple[int, int] | None:
        if self.stamp is None:
            return None
        try:
            found = os.stat(self.stamp)
        except OSError:
            return None
        return found.st_size, found.st_mtime_ns

    def changed(self) -> None:
        """A privacy tag was written: this worker and (through STAMP) every other one here
        read the list again before their next request. Appending makes every change visible
        (size), even two within one clock tick."""
        self._read_at = float("-inf")
        if self.stamp is None:
            return
        try:
            fd = os.open(self.stamp, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                if os.fstat(fd).st_size >= STAMP_LIMIT:
                    os.ftruncate(fd, 0)
                os.write(fd, b".")
            finally:
                os.close(fd)
        except OSError as exc:  # then the other workers follow only within TTL: say so
            _log.error("could not append to %s (%s): other workers may serve a changed "
                       "private experiment for up to %.0f s", self.stamp, exc.strerror, self.ttl)

    def all(self) -> dict[str, dict[str, str]]:
        stamp = self._stamp_now()
        if stamp != self._stamp_seen or time.monotonic() - self._read_at > self.ttl:
            with self._lock:
                stamp = self._stamp_now()
                if stamp != self._stamp_seen or time.monotonic() - self._read_at > self.ttl:
                    try:
                        self._tags = self._read()
                    except Exception as exc:
                        raise LookupFailed("private experiments", exc) from exc
                    # the stamp from before the read: a change during it is read next time
                    self._stamp_seen, self._read_at = stamp, time.monotonic()
        return self._tags

    def _read(self) -> dict[str, dict[str, str]]:
        from mlflow.entities import ViewType

        store = self.owners._tracking()
        found: dict[str, dict[str, str]] = {}
        token = None
        while True:
            page = store.search_experiments(
                view_type=ViewType.ALL, max_results=1000, page_token=token,
                filter_string=f"tags.`{PRIVATE_TAG}` = 'true'")
            for experiment in page:
                found[str(experiment.experiment_id)] = dict(experiment.tags or {})
            token = getattr(page, "token", None)
            if not token:
                return found

    def hidden_from(self, user: str | None, role: str,
                    groups: Callable[[], frozenset[str]] = _no_groups) -> frozenset[str]:
        """The private experiments USER (in GROUPS) may not read (empty for admins)."""
        private = self.all()
        if not private or role == ADMIN:
            return frozenset()
        return frozenset(
            eid for eid, tags in private.items()
            if user is None or (tags.get(OWNER_TAG) != user and granted(tags, user, groups) < 1)
        )

    def trace_experiment(self, trace_id: str) -> str | None:
        if trace_id in self._traces:
            return self._traces[trace_id]
        try:
            experiment = self.owners._tracking().get_trace_info(trace_id).experiment_id
        except Exception as exc:
            _absent(exc, f"trace {trace_id}")
            return None
        self._traces[trace_id] = str(experiment)
        if len(self._traces) > 20_000:
            self._traces.popitem(last=False)
        return str(experiment)


class Access:
    """The role and owner checks, author stamping and audit lines (see the module docstring)."""

    def __init__(self, audit: AuditLog, owners: Owners | None = None,
                 privacy_stamp: Path | None = None) -> None:
        self.audit = audit
        self.owners = owners or Owners()
        self.private = PrivateExperiments(self.owners, stamp=privacy_stamp)

    @staticmethod
    def _groups_of(environ: dict[str, Any], user: str | None) -> Callable[[], frozenset[str]]:
        """USER's groups, as the gateway vouched for them (nginx passes X-Trackgate-Groups and
        drops any client copy); parsed only if a grant check asks, at most once a request."""
        lazy = environ.get(GROUPS_ENVIRON)
        if lazy is None:
            found: list[frozenset[str]] = []

            def lazy() -> frozenset[str]:
                if not found:
                    header = environ.get(GROUPS_HTTP_ENVIRON, "") if user else ""
                    found.append(frozenset(unquote(g) for g in header.split(",") if g))
                return found[0]

            environ[GROUPS_ENVIRON] = lazy
        return lazy  # type: ignore[no-any-return]

    @staticmethod
    def install(app: Any) -> None:
        """Tell MLflow who the verified user is, where it asks its own auth plugin
        (``flask.g.mlflow_authenticated_user``): review queues' and jobs' owners and
        ``completed_by`` then record that user, not the client's claim."""
        from flask import g, request

        @app.before_request
        def _verified_user() -> None:
            user = request.environ.get(USER_ENVIRON)
            if user:
                g.mlflow_authenticated_user = unquote(user)

    def handle(
        self,
        policy: Policy,
        endpoint: str,
        view_args: dict[str, Any],
        rule: Rule | None,
        environ: dict[str, Any],
        start_response: StartResponse,
    ) -> Iterable[bytes]:
        try:
            return self._handle(policy, endpoint, view_args, rule, environ, start_response)
        except PolicyViolation as exc:  # before anything was answered: refuse, never pass
            return _error(start_response, exc)

    def _handle(
        self,
        policy: Policy,
        endpoint: str,
        view_args: dict[str, Any],
        rule: Rule | None,
        environ: dict[str, Any],
        start_response: StartResponse,
    ) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "")
        write = is_write(endpoint, method)
        if not write and rule is None and not self.private.all():
            return policy.app(environ, start_response)  # the read fast path
        user, role = _identity(environ)
        hidden = self.private.hidden_from(user, role, self._groups_of(environ, user))
        # READ on a private experiment is not enough to add runs (traces...) to it: EDIT is.
        creates = endpoint in _CREATES_IN_EXPERIMENT and role != ADMIN and \
            bool(self.private.all())
        # Writes to runs and their artifacts are already the owner's or an EDIT grantee's:
        # the log calls of the hot path are not scanned.
        scanned = not write or WRITE_KINDS.get(endpoint) not in ("run", "artifact")
        if (hidden or creates) and scanned and endpoint not in (
            "health", "version", "static", "serve", "serve_static_file"
        ):
            return self._private(policy, endpoint, view_args, rule, environ, start_response,
                                 write, user, role, hidden)
        if not write and rule is None:
            return policy.app(environ, start_response)
        return self.handle_checked(policy, endpoint, view_args, rule, environ, start_response)

    def handle_checked(
        self,
        policy: Policy,
        endpoint: str,
        view_args: dict[str, Any],
        rule: Rule | None,
        environ: dict[str, Any],
        start_response: StartResponse,
    ) -> Iterable[bytes]:
        """The policy's rule, the role and owner checks, stamping and the audit line."""
        method = environ.get("REQUEST_METHOD", "")
        write = is_write(endpoint, method)
        user, role = _identity(environ)
        call = Call(endpoint, method, user, view_args, environ=environ)
        kind = WRITE_KINDS.get(endpoint, "admin") if write else None
        try:
            needs_body = (rule is not None and rule.parse_body) or (
                write and endpoint not in _NO_BODY and (
                    kind in _BODY_KINDS or endpoint in _STAMPED or endpoint in _AUTHOR_FIELDS
                    or endpoint in _AUTHOR_TAGGED)
            )
            if needs_body:
                call.body = _read_json_body(environ, MAX_WRITE_BODY if rule is None else
                                            4 * 1024 * 1024)
            if rule is not None:
                rule.check(call, policy)
            if write:
                self._authorize(call, role, kind or "admin")
                self._stamp(call)
        except PolicyViolation as exc:
            if write or exc.status.startswith("403"):
                self._log(call, role, int(exc.status[:3]), refused=str(exc))
            return _error(start_response, exc)
        if not write:
            return policy.app(environ, start_response)

        def audited(status: str, headers: list[tuple[str, str]], *exc_info: Any) -> Any:
            code = int(status[:3])
            if endpoint in _PRIVACY_WRITES and code < 400:
                self.private.changed()  # written and committed; the answer not yet sent
            self._log(call, role, code)
            return start_response(status, headers, *exc_info)

        if endpoint == "_create_model_version" and user is not None:
            return self._stamped_version(policy, call, environ, audited)
        return policy.app(environ, audited)

    # --- private experiments ----------------------------------------------------------------

    def _private(
        self, policy: Policy, endpoint: str, view_args: dict[str, Any], rule: Rule | None,
        environ: dict[str, Any], start_response: StartResponse, write: bool, user: str | None,
        role: str, hidden: frozenset[str],
    ) -> Iterable[bytes]:
        """A request from a user who may not read some private experiments: refused if it
        names one of them (by id, name, or one of its runs, traces, logged models or artifact
        paths); experiment searches come back without them."""
        body: Any = None
        if environ.get("REQUEST_METHOD") not in ("GET", "HEAD") and endpoint not in (
            "serve_upload_artifact", "_upload_artifact"
        ):
            try:
                body = _read_json_body(environ, MAX_WRITE_BODY)
            except PolicyViolation:
                body = None  # not JSON (an upload): ids come from the path and query
        named = self._named_experiments(endpoint, view_args, environ, body)
        if endpoint in _CREATES_IN_EXPERIMENT and named:
            for experiment_id in named:
                tags = self.private.all().get(experiment_id)
                if tags is not None and role != ADMIN and tags.get(OWNER_TAG) != user and \
                        granted(tags, user, self._groups_of(environ, user)) < 2:
                    hidden = hidden | {experiment_id}  # READ only: no runs of one's own
        refused = sorted(named & hidden)
        if refused:
            exc = _forbidden(
                f"user {user!r} (role {role!r}) may not {action_name(endpoint)}: experiment "
                f"{', '.join(refused)} is private (its owner can grant READ or EDIT with the tag "
                f"'{GRANT_PREFIX}{user}')")
            self._log(Call(endpoint, environ.get("REQUEST_METHOD", ""), user, view_args,
                           body=body, environ=environ), role, 403, refused=str(exc))
            return _error(start_response, exc)
        if endpoint in _EXPERIMENT_SEARCHES:
            return self._filtered_search(policy, environ, start_response, hidden)
        if endpoint in _DATASET_SEARCHES:
            return self._filtered_search(policy, environ, start_response, hidden,
                                         leave_out=self._without_hidden_datasets)
        if endpoint in _VERSION_LISTS or (endpoint == "_graphql" and isinstance(body, dict)
                                          and "odelVersion" in str(body.get("query"))):
            # model versions made from runs of these experiments are left out of the answer
            def then(environ: dict[str, Any], start_response: StartResponse) -> Any:
                return self.handle_checked(policy, endpoint, view_args, rule, environ,
                                           start_response)

            return self._filtered_search(policy, environ, start_response, hidden, then,
                                         self._without_hidden_versions)
        if not write and rule is None:
            return policy.app(environ, start_response)
        return self.handle_checked(policy, endpoint, view_args, rule, environ, start_response)

    def _version_experiments(self, version: dict[str, Any]) -> set[str]:
        """The experiments a model version was made from: its run, or the run or logged model
        its source names."""
        text = " ".join(str(version.get(k) or "") for k in ("run_id", "runId", "source"))
        found: set[str] = set()
        for run_id in set(_RUN_TOKEN.findall(text)):
            exists, _, experiment_id = self.owners.run(run_id)
            if exists:
                found.add(experiment_id)
        for model_id in set(_MODEL_TOKEN.findall(text)):
            exists, _, experiment_id = self.owners.logged_model(model_id)
            if exists:
                found.add(experiment_id)
        return found

    def _without_hidden_datasets(self, answer: Any, hidden: frozenset[str]) -> Any:
        """An evaluation-dataset search without the datasets of HIDDEN experiments."""
        answer["datasets"] = [
            d for d in answer.get("datasets", [])
            if not set(self.owners.dataset(str(d.get("dataset_id")))[2]) & hidden]
        return answer

    def _without_hidden_versions(self, node: Any, hidden: frozenset[str]) -> Any:
        """NODE (a JSON answer) without the model versions made in a HIDDEN experiment."""
        if isinstance(node, list):
            return [self._without_hidden_versions(item, hidden) for item in node
                    if not (_is_version(item) and self._version_experiments(item) & hidden)]
        if isinstance(node, dict):
            return {key: self._without_hidden_versions(value, hidden)
                    for key, value in node.items()}
        return node

    def _named_experiments(
        self, endpoint: str, view_args: dict[str, Any], environ: dict[str, Any], body: Any
    ) -> set[str]:
        query = unquote(environ.get("QUERY_STRING", ""))
        text = " ".join((environ.get("PATH_INFO", ""), query,
                         json.dumps(body) if body is not None else "",
                         json.dumps({k: str(v) for k, v in view_args.items()})))
        named: set[str] = set()
        for match in _EXPERIMENT_REF.finditer(text):
            # int(): MLflow reads "05" (or other Unicode digits) as experiment 5
            named.update(str(int(d)) for d in _DIGITS.findall(match.group(1)))
        named.update(_experiment_ids(endpoint, environ, body))
        if endpoint == "_get_experiment_by_name":
            for name in parse_qs(environ.get("QUERY_STRING", "")).get("experiment_name", []):
                try:
                    experiment = self.owners._tracking().get_experiment_by_name(name)
                except Exception as exc:
                    _absent(exc, f"experiment {name!r}")
                    experiment = None
                if experiment is not None:
                    named.add(str(experiment.experiment_id))
        paths = [str(view_args.get("artifact_path", ""))]
        paths += parse_qs(environ.get("QUERY_STRING", "")).get("path", [])
        for path in paths:
            head = path.strip("/").split("/", 1)[0]
            if head.isdigit() and "artifact" in endpoint:
                named.add(head)
        for run_id in set(_RUN_TOKEN.findall(text)):
            exists, _, experiment_id = self.owners.run(run_id)
            if exists:
                named.add(experiment_id)
            else:  # MLflow 2's traces have plain hex ids too
                trace_experiment = self.private.trace_experiment(run_id)
                if trace_experiment:
                    named.add(trace_experiment)
        for trace_id in set(_TRACE_TOKEN.findall(text)):
            experiment_id = self.private.trace_experiment(trace_id)
            if experiment_id:
                named.add(experiment_id)
        for model_id in set(_MODEL_TOKEN.findall(text)):
            exists, _, experiment_id = self.owners.logged_model(model_id)
            if exists:
                named.add(experiment_id)
        params = parse_qs(environ.get("QUERY_STRING", ""))
        for key, family in _ITEM_IDS.items():
            idents = params.get(key, []) + _strings(body, key)
            if key in view_args:
                idents.append(str(view_args[key]))
            for ident in dict.fromkeys(idents):
                exists, _, experiment_ids = getattr(self.owners, family)(ident)
                if exists:
                    named.update(experiment_ids)
        if endpoint in _VERSION_NAMED:
            # a model version made from a run of a private experiment is as private as the run
            params = parse_qs(environ.get("QUERY_STRING", ""))
            names = params.get("name", []) + _strings(body, "name")
            versions = params.get("version", []) + _strings(body, "version")
            aliases = params.get("alias", []) + _strings(body, "alias")
            for name in names:
                found = [self.owners.model_version(name, version=v) for v in versions]
                found += [self.owners.model_version(name, alias=a) for a in aliases]
                for version in filter(None, found):
                    named |= self._version_experiments(version)
        return named

    def _filtered_search(
        self, policy: Policy, environ: dict[str, Any], start_response: StartResponse,
        hidden: frozenset[str], app: Callable[..., Any] | None = None,
        leave_out: Callable[[Any, frozenset[str]], Any] | None = None,
    ) -> Iterable[bytes]:
        """APP's JSON answer, passed through LEAVE_OUT (default: without the HIDDEN
        experiments). An answer that cannot be read is not sent."""
        captured: dict[str, Any] = {}

        def capture(status: str, headers: list[tuple[str, str]], *exc_info: Any) -> Any:
            captured["status"], captured["headers"] = status, headers
            return lambda data: None  # WSGI write(): MLflow (Flask) never uses it

        result = (app or policy.app)(environ, capture)
        try:
            data = b"".join(result)
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()
        headers = captured.get("headers", [])
        if captured.get("status", "").startswith("200"):
            try:
                answer = json.loads(data)
                data = json.dumps((leave_out or _without_experiments)(answer, hidden)).encode()
            except (ValueError, AttributeError, TypeError):
                return _error(start_response, PolicyViolation(
                    "the answer could not be checked for private experiments",
                    "500 Internal Server Error", "INTERNAL_ERROR"))
        headers = [(k, v) for k, v in headers if k.lower() != "content-length"]
        start_response(captured.get("status", "500 Internal Server Error"),
                       [*headers, ("Content-Length", str(len(data)))])
        return [data]

    # --- checks -----------------------------------------------------------------------------

    def _authorize(self, call: Call, role: str, kind: str) -> None:
        action = action_name(call.endpoint)
        where = f"{call.method} {call.environ.get('PATH_INFO', '')}"
        if call.user is None:
            raise _forbidden(f"{action} ({where}) needs a verified user")
        self._reserved_tags(call, role, action)
        if role == ADMIN:
            return
        if role != EDITOR:
            raise _forbidden(
                f"user {call.user!r} has the role {role!r}, which only reads: {action} ({where}) "
                "is a write. Ask an admin for the editor role (trackgate users set-role)."
            )
        if kind == "editor":
            return
        if kind == "admin":
            raise _forbidden(
                f"user {call.user!r} has the role 'editor': {action} ({where}) is for admins "
                "only."
            )
        for owned in self._owned(call, kind):
            if owned.owner == call.user:
                continue
            needed = "EDIT" if kind in ("run", "artifact", "logged_model", "item") \
                or call.endpoint in _MODEL_EDITS else "MANAGE"
            tags = owned.grants()
            if tags.get(OWNER_TAG) == call.user:
                continue  # the owner of the experiment (or model) it lives in
            if granted(tags, call.user,
                       self._groups_of(call.environ, call.user)) >= LEVELS[needed]:
                continue
            if owned.granted_on == "no experiment":
                whose = f"its author {owned.owner!r}" if owned.owner else \
                    "its author (none recorded)"
            elif owned.granted_on == "it":
                whose = f"its owner {owned.owner!r}" if owned.owner else \
                    "its owner (none recorded)"
            else:
                whose = (f"its author {owned.owner!r}" if owned.owner else
                         "its author (none recorded)") + f", the owner of {owned.granted_on}"
            raise _forbidden(
                f"user {call.user!r} (role 'editor') may not {action} on {owned.what} "
                f"{owned.ident!r}: only {whose}, a user granted {needed} on {owned.granted_on} "
                f"(tag '{GRANT_PREFIX}{call.user}' = {needed}, or a group of theirs: "
                f"'{GROUP_GRANT_PREFIX}GROUP') or an admin may."
            )

    def _owned(self, call: Call, kind: str) -> Iterable[_Owned]:
        """The existing runs, experiments, models or items CALL writes to (others: MLflow says
        404)."""
        found = False
        for owned in self._owned_directly(call, kind):
            found = True
            yield owned
        if kind == "artifact" and not found:
            yield from self._artifact_elsewhere(call)

    def _artifact_elsewhere(self, call: Call) -> Iterable[_Owned]:
        """An artifact path that names no run or logged model: a trace's files
        (EXPERIMENT/traces/TRACE_ID/...) follow the trace, anything else under an experiment's
        directory (EXPERIMENT/...) follows the experiment."""
        segments = str(call.view_args.get("artifact_path", "")).strip("/").split("/")
        found = False
        for segment in dict.fromkeys(segments):
            if _TRACE_ID.fullmatch(segment) or _RUN_ID.fullmatch(segment):
                exists, author, experiment_ids = self.owners.trace(segment)
                for experiment_id in experiment_ids if exists else []:
                    found = True
                    yield _Owned("trace", segment, author, self._experiment_tags(experiment_id),
                                 f"its experiment {experiment_id}")
        if not found and segments[0].isdigit():
            exists, tags = self.owners.experiment(segments[0])
            if exists:
                yield _Owned("experiment", segments[0], tags.get(OWNER_TAG),
                             lambda tags=tags: tags, "it")

    def _owned_directly(self, call: Call, kind: str) -> Iterable[_Owned]:
        body = call.body
        if kind in ("artifact", "logged_model"):
            if kind == "artifact":
                path = str(call.view_args.get("artifact_path", ""))
                model_ids = [s for s in dict.fromkeys(path.split("/"))
                             if _LOGGED_MODEL_ID.fullmatch(s)]
            else:
                model_ids = [str(call.view_args.get("model_id", ""))]
            for model_id in model_ids:
                exists, author, experiment_id = self.owners.logged_model(model_id)
                if exists:
                    yield _Owned("logged model", model_id, author,
                                 self._experiment_tags(experiment_id),
                                 f"its experiment {experiment_id}")
        if kind in ("run", "artifact"):
            if kind == "artifact":
                path = str(call.view_args.get("artifact_path", ""))
                ids = [s for s in dict.fromkeys(path.split("/")) if _RUN_ID.fullmatch(s)]
            elif call.endpoint == "serve_upload_artifact":
                ids = parse_qs(call.environ.get("QUERY_STRING", "")).get("run_uuid", [])
            else:
                ids = _strings(body, "run_id", "run_uuid")
            for run_id in ids:
                exists, owner, experiment_id = self.owners.run(run_id)
                if exists:
                    yield _Owned("run", run_id, owner, self._experiment_tags(experiment_id),
                                 f"its experiment {experiment_id}")
        if call.endpoint == "_link_traces_to_run":
            # linking traces to one's run changes those traces too
            for trace_id in _list_strings(body, "trace_ids"):
                exists, author, experiment_ids = self.owners.trace(trace_id)
                for experiment_id in experiment_ids if exists else []:
                    yield _Owned("trace", trace_id, author, self._experiment_tags(experiment_id),
                                 f"its experiment {experiment_id}")
        if kind == "item":
            yield from self._items(call)
        elif kind == "experiment":
            for experiment_id in _strings(body, "experiment_id"):
                exists, tags = self.owners.experiment(experiment_id)
                if exists:
                    yield _Owned("experiment", experiment_id, tags.get(OWNER_TAG),
                                 lambda tags=tags: tags, "it")
        elif kind == "model":
            for name in _strings(body, "name"):
                exists, tags = self.owners.model(name)
                if exists:
                    yield _Owned("registered model", name, tags.get(OWNER_TAG),
                                 lambda tags=tags: tags, "it")

    def _items(self, call: Call) -> Iterable[_Owned]:
        """The item an `item` write touches, once per experiment it lives in (all must allow
        the write, unless the user is its author). Items that do not exist: MLflow says 404."""
        family = _ITEM_FAMILY[call.endpoint]
        body, args = call.body, call.view_args
        if family == "experiment":
            for experiment_id in _strings(body, "experiment_id"):
                exists, tags = self.owners.experiment(experiment_id)
                if exists:
                    yield _Owned("experiment", experiment_id, tags.get(OWNER_TAG),
                                 lambda tags=tags: tags, "it")
            return
        if family == "trace":
            what, ids = "trace", [str(args[k]) for k in ("trace_id", "request_id") if k in args]
            ids = ids or _strings(body, "trace_id")
        elif family == "dataset":
            what, ids = "dataset", [str(args.get("dataset_id", ""))]
        elif family == "review_queue":
            what, ids = "review queue", _strings(body, "queue_id")
        elif family == "label_schema":
            what, ids = "label schema", _strings(body, "schema_id")
        elif family == "issue":
            what, ids = "issue", [str(args.get("issue_id", ""))]
        else:
            what, ids = "prompt optimization job", [str(args.get("job_id", ""))]
        lookup = getattr(self.owners, family)
        for ident in ids:
            exists, author, experiment_ids = lookup(ident)
            if not exists:
                continue
            if not experiment_ids:  # in no experiment: its author (or an admin) only
                yield _Owned(what, ident, author, dict, "no experiment")
            for experiment_id in experiment_ids:
                yield _Owned(what, ident, author, self._experiment_tags(experiment_id),
                             f"its experiment {experiment_id}")

    def _experiment_tags(self, experiment_id: str) -> Callable[[], dict[str, str]]:
        """Read lazily: only a write to someone else's run needs the experiment's grants."""
        return lambda: self.owners.experiment(experiment_id)[1]

    def _reserved_tags(self, call: Call, role: str, action: str) -> None:
        """Owner and author tags are the server's: only an admin changes them, and nobody
        removes a run's mlflow.user."""
        body = call.body if isinstance(call.body, dict) else {}
        keys = set(_strings(body, "key"))
        endpoint = call.endpoint
        who = f"user {call.user!r} (role {role!r}) may not {action}"
        if endpoint == "_delete_tag" and USER_TAG in keys:
            raise _forbidden(f"{who}: the tag {USER_TAG!r} is set by the server")
        reserved = {
            "_set_experiment_tag": OWNER_TAG,
            "_delete_experiment_tag": OWNER_TAG,
            "_set_registered_model_tag": OWNER_TAG,
            "_delete_registered_model_tag": OWNER_TAG,
            "_set_model_version_tag": AUTHOR_TAG,
            "_delete_model_version_tag": AUTHOR_TAG,
            "_set_logged_model_tags": AUTHOR_TAG,
            "_set_trace_tag": AUTHOR_TAG,
            "_set_trace_tag_v3": AUTHOR_TAG,
            "_delete_trace_tag": AUTHOR_TAG,
            "_delete_trace_tag_v3": AUTHOR_TAG,
            "_deprecated_end_trace_v2": AUTHOR_TAG,
        }.get(endpoint)
        if endpoint == "_deprecated_end_trace_v2":
            keys |= {str(t.get("key")) for t in _tags(body) if isinstance(t, dict)}
        if endpoint == "_set_logged_model_tags":
            keys |= {str(t.get("key")) for t in _tags(body) if isinstance(t, dict)}
        elif endpoint == "_delete_logged_model_tag":
            keys.add(str(call.view_args.get("tag_key", "")))
            reserved = AUTHOR_TAG
        if endpoint in ("_set_experiment_tag", "_set_registered_model_tag") and any(
            key.startswith(GRANT_PREFIX) for key in keys
        ):
            value = str(body.get("value", ""))
            if value not in LEVELS:
                raise PolicyViolation(
                    f"a grant tag's value is one of {', '.join(LEVELS)}; got {value!r}"
                )
        if reserved in keys and role != ADMIN:
            raise _forbidden(f"{who}: the tag {reserved!r} is recorded by the server; only an "
                             "admin may change it")

    # --- stamping the verified author ---------------------------------------------------------

    def _stamp(self, call: Call) -> None:
        body, user, endpoint = call.body, call.user, call.endpoint
        if user is None:
            return
        if body is None and endpoint in _STAMPED:
            body = {}
        if not isinstance(body, dict):
            return
        changed = True
        if endpoint in ("_create_run", "serve_create_promptlab_run"):
            body.pop("userId", None)
            body["user_id"] = user
            if endpoint == "_create_run":
                body["tags"] = [*_without_keys(_tags(body), USER_TAG),
                                {"key": USER_TAG, "value": user}]
        elif endpoint in ("_create_experiment", "_create_registered_model"):
            body["tags"] = [*_without_keys(_tags(body), OWNER_TAG),
                            {"key": OWNER_TAG, "value": user}]
        elif endpoint == "_create_model_version":
            body["tags"] = [*_without_keys(_tags(body), AUTHOR_TAG),
                            {"key": AUTHOR_TAG, "value": user}]
        elif endpoint == "_set_tag" and body.get("key") == USER_TAG:
            body["value"] = user
        elif endpoint == "_log_batch" and any(
            isinstance(t, dict) and t.get("key") == USER_TAG for t in _tags(body)
        ):
            body["tags"] = [
                {**t, "value": user} if isinstance(t, dict) and t.get("key") == USER_TAG else t
                for t in _tags(body)
            ]
        elif endpoint in _AUTHOR_FIELDS:
            field = _AUTHOR_FIELDS[endpoint]
            head, _, tail = field.partition("_")
            body.pop(head + tail.capitalize(), None)
            body[field] = user
        elif endpoint in ("_create_logged_model", "_deprecated_start_trace_v2"):
            body["tags"] = [*_without_keys(_tags(body), AUTHOR_TAG),
                            {"key": AUTHOR_TAG, "value": user}]
        elif endpoint == "_create_dataset_handler":
            # MLflow takes a dataset's created_by from its mlflow.user tag (a JSON string)
            try:
                tags = json.loads(body.get("tags") or "{}")
            except (TypeError, ValueError):
                return  # MLflow refuses it
            if not isinstance(tags, dict):
                return
            body["tags"] = json.dumps({**tags, USER_TAG: user})
        elif endpoint == "_upsert_dataset_records_handler":
            # ... a record's created_by (and the dataset's last_updated_by) from the record's
            # own mlflow.user tag
            try:
                records = json.loads(body.get("records") or "[]")
            except (TypeError, ValueError):
                return
            if not isinstance(records, list):
                return
            body["records"] = json.dumps([
                {**r, "tags": {**(r.get("tags") if isinstance(r.get("tags"), dict) else {}),
                               USER_TAG: user}} if isinstance(r, dict) else r
                for r in records])
        elif endpoint == "_create_assessment":
            # a person's feedback or expectation names them as its source: the verified user
            assessment = body.get("assessment")
            source = assessment.get("source") if isinstance(assessment, dict) else None
            if not isinstance(source, dict) or source.get("source_type", source.get(
                    "sourceType")) != "HUMAN":
                return
            source.pop("sourceId", None)
            source["source_id"] = user
        elif endpoint == "_start_trace_v3":
            trace = body.get("trace")
            info = (trace.get("trace_info") or trace.get("traceInfo")
                    if isinstance(trace, dict) else None)
            if not isinstance(info, dict):
                return  # MLflow refuses it
            tags = info.get("tags")
            info["tags"] = {**(tags if isinstance(tags, dict) else {}), AUTHOR_TAG: user}
        else:
            changed = False
        if changed:
            call.body = body
            _replace_json_body(call.environ, body)

    def _stamped_version(
        self, policy: Policy, call: Call, environ: dict[str, Any], start_response: Any
    ) -> Iterable[bytes]:
        """Run create-model-version, then set the new version's user_id to the verified user."""

        captured: dict[str, str] = {}

        def capture(status: str, headers: list[tuple[str, str]], *exc_info: Any) -> Any:
            captured["status"] = status
            return start_response(status, headers, *exc_info)

        result = policy.app(environ, capture)
        try:
            chunks = list(result)
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()
        if captured.get("status", "").startswith("200"):
            try:  # the version exists either way; only its user_id column stays empty
                version = json.loads(b"".join(chunks))["model_version"]
                self.owners.stamp_model_version(version["name"], version["version"], call.user
                                                or "")
            except Exception:
                _log.exception("could not record %r as the author of a new model version",
                               call.user)
        return chunks

    # --- audit --------------------------------------------------------------------------------

    def _log(self, call: Call, role: str, status: int, refused: str | None = None) -> None:
        environ = call.environ
        event: dict[str, Any] = {
            "event": "request",
            "user": call.user,
            "role": role,
            "client_ip": environ.get("HTTP_X_REAL_IP") or environ.get("REMOTE_ADDR"),
            "method": call.method,
            "path": environ.get("PATH_INFO", ""),
            "status": status,
            "action": action_name(call.endpoint),
            "request_id": environ.get(REQUEST_ID_ENVIRON),
        }
        body = call.body if isinstance(call.body, dict) else {}
        names_model = WRITE_KINDS.get(call.endpoint) == "model" or call.endpoint == (
            "_create_registered_model"
        )
        for field, names in (
            ("experiment_id", ("experiment_id",)),
            ("run_id", ("run_id", "run_uuid")),
            ("model", ("name",) if names_model else ()),
            ("version", ("version",)),
        ):
            values = _strings(body, *names)
            if values:
                event[field] = values[0] if len(values) == 1 else values
        if call.view_args:
            event["args"] = {k: str(v) for k, v in call.view_args.items()}
        if refused is not None:
            event["refused"] = refused
        via = environ.get("HTTP_X_TRACKGATE_VIA")  # basic, session, token:NAME (the gateway's)
        if via:
            event["via"] = via
        self.audit.write(event)


def _identity(environ: dict[str, Any]) -> tuple[str | None, str]:
    """The user and role the gateway vouched for (nginx passes them; clients cannot)."""
    user = unquote(environ.get(USER_ENVIRON) or "") or None
    role = environ.get(ROLE_ENVIRON, "")
    return user, role if role in ROLES else VIEWER  # no role vouched for: it only reads
