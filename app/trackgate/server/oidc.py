"""Single sign-on with an OpenID Connect provider: authorization code flow with PKCE, state and
nonce; the ID token's signature, `iss`, `aud` (required: an empty audience is refused), `exp`
and `nonce` verified; the provider's groups mapped to a trackgate role.

authlib exchanges the code (client_secret_basic, code_verifier); joserfc (authlib's JOSE
library) verifies the ID token against the provider's JWKS. The provider's metadata and keys
are fetched on first use and the keys again when a token names a key not seen yet (rotation).
"""

from __future__ import annotations

import hashlib
import logging
import threading
from dataclasses import dataclass
from typing import Any

import requests
from authlib.common.security import generate_token
from authlib.integrations.requests_client import OAuth2Session
from authlib.oauth2.rfc7636 import create_s256_code_challenge
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet

from ..roles import ROLES, validate_role
from ..settings import Settings
from ..users import UserError, normalize_username, validate_username

CALLBACK_PATH = "/login/oidc/callback"
# Asymmetric signatures only: never `none`, never HMAC (a secret the client shares).
ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512",
              "EdDSA")
START_PATH = "/login/oidc"
_log = logging.getLogger("trackgate.oidc")


class OIDCError(Exception):
    """Why a single sign-on failed; the message is shown on the login page."""


@dataclass(frozen=True)
class Identity:
    username: str
    role: str
    groups: frozenset[str]


def parse_role_map(text: str) -> dict[str, str]:
    """'ml-admins=admin, ml-team=editor' -> {group: role}; a clear error on bad input."""
    mapping: dict[str, str] = {}
    for part in text.split(","):
        if not part.strip():
            continue
        group, sep, role = part.rpartition("=")
        if not sep or not group.strip():
            raise UserError(f"oidc_roles: {part.strip()!r} is not group=role")
        mapping[group.strip()] = validate_role(role)
    return mapping


def role_for(groups: frozenset[str], mapping: dict[str, str], default: str | None) -> str | None:
    """The highest role any of GROUPS maps to, else DEFAULT (None: not let in)."""
    roles = [mapping[g] for g in groups if g in mapping]
    if roles:
        return max(roles, key=ROLES.index)
    return default


def verify_id_token(id_token: str, keys: KeySet, *, issuer: str, client_id: str,
                    nonce: str, leeway: int = 60) -> dict[str, Any]:
    """The ID token's claims if its signature, iss, aud, exp and nonce are right; else
    OIDCError. `aud` is essential: a token without one is refused (authlib's default lets an
    empty audience pass); with several audiences `azp` must be us."""
    try:
        token = jwt.decode(id_token, keys, algorithms=list(ALGORITHMS))
        jwt.JWTClaimsRegistry(
            leeway=leeway,
            iss={"essential": True, "value": issuer},
            aud={"essential": True, "value": client_id},
            sub={"essential": True},
            exp={"essential": True},
            nonce={"essential": True, "value": nonce},
        ).validate(token.claims)
    except (JoseError, ValueError) as exc:
        raise OIDCError(f"the provider's ID token was refused: {exc}") from None
    claims = dict(token.claims)
    audience = claims["aud"]
    if isinstance(audience, list) and len(audience) > 1 and claims.get("azp") != client_id:
        raise OIDCError("the provider's ID token was refused: it is for several clients and "
                        "not authorized for this one (azp)")
    return claims


class Provider:
    """One configured OpenID Connect provider (settings oidc_*)."""

    def __init__(self, settings: Settings) -> None:
        assert settings.oidc_issuer and settings.oidc_client_id
        self.issuer = settings.oidc_issuer  # compared exactly with the token's iss
        self.client_id = settings.oidc_client_id
        secret = settings.oidc_client_secret
        if secret is None and settings.oidc_client_secret_file is not None:
            secret = settings.oidc_client_secret_file.read_text().strip()
        self.client_secret = secret
        self.scopes = settings.oidc_scopes
        self.name = settings.oidc_provider_name
        self.username_claim = settings.oidc_username_claim
        self.groups_claim = settings.oidc_groups_claim
        self.role_map = parse_role_map(settings.oidc_roles)
        self.default_role = validate_role(settings.oidc_default_role) if (
            settings.oidc_default_role) else None
        self.redirect_uri = settings.public_url + CALLBACK_PATH
        # Sessions it started carry this: another provider, client or role map ends them.
        self.fingerprint = "oidc:" + hashlib.sha256("\0".join(
            (self.issuer, self.client_id, settings.oidc_roles, settings.oidc_default_role)
        ).encode()).hexdigest()
        self._metadata: dict[str, Any] | None = None
        self._keys: KeySet | None = None
        self._lock = threading.Lock()

    def metadata(self) -> dict[str, Any]:
        if self._metadata is None:
            url = self.issuer.rstrip("/") + "/.well-known/openid-configuration"
            try:
                answer = requests.get(url, timeout=10)
                answer.raise_for_status()
                metadata = answer.json()
            except (requests.RequestException, ValueError) as exc:
                raise OIDCError(f"the sign-on provider cannot be reached ({url}): {exc}") from None
            if metadata.get("issuer") != self.issuer:
                raise OIDCError(f"the provider at {url} calls itself {metadata.get('issuer')!r}, "
                                f"not {self.issuer!r} (TRACKGATE_OIDC_ISSUER)")
            self._metadata = metadata
        return self._metadata

    def keys(self, refresh: bool = False) -> KeySet:
        with self._lock:
            if self._keys is None or refresh:
                try:
                    answer = requests.get(self.metadata()["jwks_uri"], timeout=10)
                    answer.raise_for_status()
                    self._keys = KeySet.import_key_set(answer.json())
                except (requests.RequestException, ValueError, KeyError, JoseError) as exc:
                    raise OIDCError(f"the provider's signing keys cannot be read: {exc}") from None
            return self._keys

    def start(self) -> tuple[str, str, str, str]:
        """(URL to send the browser to, state, nonce, PKCE verifier)."""
        state, nonce, verifier = generate_token(32), generate_token(32), generate_token(48)
        client = OAuth2Session(self.client_id, scope=self.scopes, redirect_uri=self.redirect_uri)
        url, _ = client.create_authorization_url(
            self.metadata()["authorization_endpoint"], state=state, nonce=nonce,
            code_challenge=create_s256_code_challenge(verifier), code_challenge_method="S256")
        return url, state, nonce, verifier

    def finish(self, code: str, nonce: str, verifier: str) -> Identity:
        """Exchange the code (with the PKCE verifier), verify the ID token, map the role."""
        client = OAuth2Session(self.client_id, self.client_secret, scope=self.scopes,
                               redirect_uri=self.redirect_uri,
                               token_endpoint_auth_method="client_secret_basic")
        try:
            tokens = client.fetch_token(self.metadata()["token_endpoint"], code=code,
                                        code_verifier=verifier, timeout=10)
        except Exception as exc:  # authlib raises several kinds; all mean "no token"
            raise OIDCError(f"the provider refused the sign-on code: {exc}") from None
        id_token = tokens.get("id_token")
        if not id_token:
            raise OIDCError("the provider sent no ID token (is 'openid' in TRACKGATE_OIDC_SCOPES?)")
        try:
            claims = self.verify(id_token, nonce)
        except OIDCError:
            claims = self.verify(id_token, nonce, refresh=True)  # the keys may have rotated
        return self.identity(claims)

    def verify(self, id_token: str, nonce: str, refresh: bool = False) -> dict[str, Any]:
        return verify_id_token(id_token, self.keys(refresh), issuer=self.issuer,
                               client_id=self.client_id, nonce=nonce)

    def identity(self, claims: dict[str, Any]) -> Identity:
        raw = claims.get(self.username_claim)
        if not isinstance(raw, str) or not raw:
            raise OIDCError(f"the provider's ID token has no {self.username_claim!r} claim "
                            "(TRACKGATE_OIDC_USERNAME_CLAIM)")
        try:
            username = validate_username(normalize_username(raw))
        except UserError as exc:
            raise OIDCError(f"the provider's user name cannot be used: {exc}") from None
        value = claims.get(self.groups_claim) or []
        groups = frozenset(str(g) for g in (value if isinstance(value, list) else [value]))
        role = role_for(groups, self.role_map, self.default_role)
        if role is None:
            raise OIDCError(f"{username} signed in, but none of their groups has a role here "
                            "(ask an admin to map one in TRACKGATE_OIDC_ROLES)")
        return Identity(username, role, groups)
