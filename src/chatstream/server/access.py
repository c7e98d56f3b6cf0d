"""Client roles: which client may call which API (the original package's role model, validated up front).

A role is ``{role_name: {"apis": {"allow": "all" | [api names], "auth_method": ..., "use_session": bool,
"enable_dev_tool": bool, <credential>}}}``. Every request resolves to exactly one role:

1. a request carrying ``X-ChatStream-Auth-Header`` that matches a ``header_phrase[_sha256]`` role gets that role
   (for this request only);
2. a request with a session (a browser) gets the role stored in its session by a pass-phrase promotion, else the
   browser default role (``auth_method: "nothing"``, ``use_session: true``);
3. a request without a session (an agent, e.g. one sending ``X-FastSession-Skip: skip``) gets the agent default role
   (``"nothing"``, ``use_session: false``), or the browser default when none is defined;
4. in an app with no session middleware at all, a request may also call what the browser default allows, so that
   /chat_stream can answer that a session middleware is missing instead of a puzzling 403.

So a request never lacks a role, and the check never raises. Phrases and digests are compared in constant time and
never logged.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import hmac
import logging
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Concatenate, Final, ParamSpec, Protocol, TypeVar

from starlette.requests import HTTPConnection, Request
from starlette.responses import JSONResponse, Response

from chatstream.server.errors import role_denied_response
from chatstream.server.http import AUTH_HEADER
from chatstream.sessions.lookup import find_session
from chatstream.sessions.middleware import session_skipped

logger = logging.getLogger(__name__)

CONVERSATION_API_NAMES: Final = (
    "list_conversations",
    "create_conversation",
    "get_conversation",
    "update_conversation",
    "open_conversation",
    "delete_conversation",
    "export_conversation",
)
"""The conversations API (server/conversations.py): a browser user's list, create, open, rename, delete, export."""

API_NAMES: Final = (
    "chat_stream",
    "clear_context",
    "get_prompt",
    "set_generation_params",
    "get_generation_params",
    "set_feedback",
    "get_load",
    "get_resource_usage",
    "webui_index",
    "webui_js",
    "openai",
    "health",
    "metrics",
    *CONVERSATION_API_NAMES,
)
"""Every API name a role may allow (and ``append_apis`` may include or exclude)."""

OPEN_API_NAMES: Final = frozenset({"health", "metrics"})
"""Allowed to every role, unless some role names them in its allow list (then only roles allowing them get them)."""

SESSION_ROLE_KEY: Final = "chat_stream_client_role"
"""Where a promoted browser role is kept in the session (the original's key and value shape)."""

_SHA256_HEX = re.compile(r"^[0-9a-fA-F]{64}$")


class AuthMethod(enum.Enum):
    """How a client proves it may take a role."""

    NOTHING = "nothing"
    """The default role: no credential (one for browsers, at most one for agents)."""
    UI_PASS_PHRASE = "ui_pass_phrase"
    """A browser user types the phrase as a chat message; the role is kept in the session."""
    UI_PASS_PHRASE_SHA256 = "ui_pass_phrase_sha256"
    """Like UI_PASS_PHRASE, with the phrase's SHA-256 hex digest in the configuration."""
    HEADER_PHRASE = "header_phrase"
    """An agent sends the phrase in ``X-ChatStream-Auth-Header``, per request."""
    HEADER_PHRASE_SHA256 = "header_phrase_sha256"
    """Like HEADER_PHRASE, with the phrase's SHA-256 hex digest in the configuration."""

    @property
    def is_browser_phrase(self) -> bool:
        return self in (AuthMethod.UI_PASS_PHRASE, AuthMethod.UI_PASS_PHRASE_SHA256)

    @property
    def is_header_phrase(self) -> bool:
        return self in (AuthMethod.HEADER_PHRASE, AuthMethod.HEADER_PHRASE_SHA256)

    @property
    def hashed(self) -> bool:
        return self in (AuthMethod.UI_PASS_PHRASE_SHA256, AuthMethod.HEADER_PHRASE_SHA256)


@dataclass(frozen=True)
class RoleDef:
    """One validated role.

    Attributes:
        name: the role's key in the configuration.
        allow: the API names it may call; None means "all".
        auth_method: how it is obtained.
        use_session: True for browser roles (kept in the HTTP session).
        enable_dev_tool: the web UI may show its developer tools to this role.
        credential: the phrase, or its lower-case SHA-256 hex digest for the ``*_sha256`` methods.
    """

    name: str
    allow: frozenset[str] | None
    auth_method: AuthMethod
    use_session: bool
    enable_dev_tool: bool = False
    credential: str | None = None

    def allows(self, api_name: str) -> bool:
        return self.allow is None or api_name in self.allow

    def names(self, api_name: str) -> bool:
        """True when the allow list mentions ``api_name`` explicitly ("all" does not count)."""
        return self.allow is not None and api_name in self.allow

    def matches(self, phrase: str) -> bool:
        """Constant-time check of a phrase against this role's credential."""
        if self.credential is None:
            return False
        candidate = hashlib.sha256(phrase.encode()).hexdigest() if self.auth_method.hashed else phrase
        return hmac.compare_digest(candidate.encode(), self.credential.encode())

    def session_value(self) -> dict[str, Any]:
        """What is stored in the session on promotion (the original's shape)."""
        allowed: str | list[str] = "all" if self.allow is None else sorted(self.allow)
        return {"client_role_name": self.name, "allowed_apis": allowed, "enable_dev_tool": self.enable_dev_tool}


@dataclass(frozen=True)
class GrantedRole:
    """The outcome of a successful pass-phrase promotion."""

    name: str
    enable_dev_tool: bool


DEFAULT_BROWSER_APIS: Final = (
    "chat_stream",
    "clear_context",
    "set_feedback",
    "webui_index",
    "webui_js",
    *CONVERSATION_API_NAMES,
)
DEFAULT_AGENT_APIS: Final = ("get_load", "openai")


def default_roles_config() -> dict[str, Any]:
    """The roles used when ``client_roles`` is None (a fresh dict each call)."""
    return {
        "user": {"apis": {"allow": list(DEFAULT_BROWSER_APIS), "auth_method": "nothing", "use_session": True}},
        "agent": {"apis": {"allow": list(DEFAULT_AGENT_APIS), "auth_method": "nothing", "use_session": False}},
    }


class ClientRoles:
    """The validated role set of one ChatStream and the per-request checks."""

    def __init__(self, roles: Iterable[RoleDef]) -> None:
        self.roles: tuple[RoleDef, ...] = tuple(roles)
        self._by_name = {role.name: role for role in self.roles}
        browser_defaults = _defaults(self.roles, browser=True)
        if not browser_defaults:
            named = ", ".join(repr(r.name) for r in self.roles)
            raise ValueError(
                f"client_roles ({named}) define no default browser role: add one with auth_method 'nothing' and "
                "use_session true"
            )
        self.browser_default: RoleDef = browser_defaults[0]
        agent_defaults = _defaults(self.roles, browser=False)
        self.agent_default: RoleDef | None = agent_defaults[0] if agent_defaults else None
        self._browser_phrase_roles = tuple(r for r in self.roles if r.auth_method.is_browser_phrase)
        self._header_roles = tuple(r for r in self.roles if r.auth_method.is_header_phrase)
        self._governed_open_apis = frozenset(a for a in OPEN_API_NAMES if any(r.names(a) for r in self.roles))
        self._warned_sessionless = False

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | None) -> ClientRoles:
        """Validate the ``client_roles`` option (None → the defaults). Raises ValueError naming the bad role."""
        if config is None:
            config = default_roles_config()
        if not isinstance(config, Mapping):
            raise ValueError(f"client_roles must be a dict of role definitions, got {type(config).__name__}")
        if not config:
            raise ValueError("client_roles must define at least one role (a browser default role)")
        return cls(_parse_role(name, definition) for name, definition in config.items())

    def role(self, name: str) -> RoleDef | None:
        return self._by_name.get(name)

    # ----- per request -----

    def resolve(self, request: HTTPConnection, *, as_agent: bool = False) -> RoleDef:
        """The role of this request (see the module docstring). ``as_agent`` ignores the session (OpenAI API)."""
        header = request.headers.get(AUTH_HEADER)
        if header:
            for role in self._header_roles:
                if role.matches(header):
                    return role
        session = None if as_agent else _session_of(request)
        if session is not None:
            stored = self._stored_role(session)
            return stored if stored is not None else self.browser_default
        return self.agent_default or self.browser_default

    def is_allowed(self, request: HTTPConnection, api_name: str, *, as_agent: bool = False) -> bool:
        """True when this request's role may call ``api_name``."""
        if api_name not in API_NAMES:
            logger.error("role check for an unknown API name %r; denied", api_name)
            return False
        if api_name in OPEN_API_NAMES and api_name not in self._governed_open_apis:
            return True
        if self.resolve(request, as_agent=as_agent).allows(api_name):
            return True
        # No session middleware at all: we cannot tell a browser from an agent, so what the browser default may
        # call stays callable (and /chat_stream then answers that a session middleware is missing).
        return not as_agent and _no_session_middleware(request) and self.browser_default.allows(api_name)

    def deny_response(self, request: HTTPConnection, api_name: str, *, as_agent: bool = False) -> JSONResponse | None:
        """None when allowed, else the original's 403 ``{"success": false, "message": "Forbidden", ...}``."""
        if self.is_allowed(request, api_name, as_agent=as_agent):
            return None
        role = self.resolve(request, as_agent=as_agent)
        logger.info("API %r denied on the role layer (role %r)", api_name, role.name)
        if not self._warned_sessionless and _session_of(request) is None and self.browser_default.allows(api_name):
            self._warned_sessionless = True
            logger.warning(
                "a request without a session was denied %r, which browsers may call: if this app serves browsers, add "
                "a session middleware (chat_stream.append_middlewares(app) or fastsession's FastSessionMiddleware)",
                api_name,
            )
        return role_denied_response()

    def dev_tool_enabled(self, request: HTTPConnection) -> bool:
        """True when the request's role may use the web UI's developer tools."""
        return self.resolve(request).enable_dev_tool

    def try_promote(self, request: HTTPConnection, user_input: str | None) -> GrantedRole | None:
        """Grant a browser role when ``user_input`` is its pass phrase; the role is kept in the session.

        Returns None (and changes nothing) when the input is no pass phrase or the request has no session.
        """
        if not user_input or not isinstance(user_input, str) or not self._browser_phrase_roles:
            return None
        found = find_session(request)
        if found is None:
            return None
        matched = [role for role in self._browser_phrase_roles if role.matches(user_input)]  # check all: no early exit
        if not matched:
            return None
        role = matched[0]
        found.data[SESSION_ROLE_KEY] = role.session_value()
        found.save()
        return GrantedRole(name=role.name, enable_dev_tool=role.enable_dev_tool)

    def _stored_role(self, session: Mapping[str, Any]) -> RoleDef | None:
        stored = session.get(SESSION_ROLE_KEY)
        name = stored.get("client_role_name") if isinstance(stored, Mapping) else stored
        role = self._by_name.get(name) if isinstance(name, str) else None
        if role is None or not (role.use_session or role.auth_method.is_browser_phrase):
            return None  # unknown now (the configuration changed) or not a browser role: back to the default
        return role


class HasClientRoles(Protocol):
    """What a role-checked endpoint's first argument offers: the client roles to check against."""

    @property
    def roles(self) -> ClientRoles: ...


Owner = TypeVar("Owner", bound=HasClientRoles)
P = ParamSpec("P")
Endpoint = Callable[Concatenate[Owner, Request, P], Awaitable[Response]]


def role_checked(api_name: str) -> Callable[[Endpoint[Owner, P]], Endpoint[Owner, P]]:
    """Decorate an endpoint ``(owner, request, ...)`` so that it answers the role layer's 403 (the original's shape)
    unless the caller's role allows ``api_name``; ``owner.roles`` holds the client roles."""
    if api_name not in API_NAMES:
        raise ValueError(f"unknown API name {api_name!r}; known: {API_NAMES}")

    def decorate(endpoint: Endpoint[Owner, P]) -> Endpoint[Owner, P]:
        @functools.wraps(endpoint)
        async def checked(owner: Owner, request: Request, /, *args: P.args, **kwargs: P.kwargs) -> Response:
            denied = owner.roles.deny_response(request, api_name)
            if denied is not None:
                return denied
            return await endpoint(owner, request, *args, **kwargs)

        return checked

    return decorate


def _no_session_middleware(request: HTTPConnection) -> bool:
    return getattr(request.state, "session", None) is None and not session_skipped(request)


def _session_of(request: HTTPConnection) -> dict[str, Any] | None:
    """The session dict without creating a lazily made session (a role check alone leaves no session behind)."""
    found = find_session(request, materialize=False)
    return found.data if found is not None else None


def _parse_role(name: Any, definition: Any) -> RoleDef:
    if not isinstance(name, str) or not name:
        raise ValueError(f"client role name {name!r} must be a non-empty string")
    if not isinstance(definition, Mapping) or not isinstance(definition.get("apis"), Mapping):
        raise ValueError(f"client role {name!r} must be a dict with an 'apis' dict")
    apis = definition["apis"]
    method = _parse_auth_method(name, apis.get("auth_method"))
    use_session = _parse_bool(name, "use_session", apis.get("use_session"), default=method.is_browser_phrase)
    if method.is_browser_phrase and not use_session:
        raise ValueError(f"client role {name!r}: auth_method {method.value!r} needs use_session: true (a browser)")
    if method.is_header_phrase and use_session:
        raise ValueError(f"client role {name!r}: auth_method {method.value!r} is for agents; use use_session: false")
    return RoleDef(
        name=name,
        allow=_parse_allow(name, apis.get("allow")),
        auth_method=method,
        use_session=use_session,
        enable_dev_tool=_parse_bool(name, "enable_dev_tool", apis.get("enable_dev_tool"), default=False),
        credential=_parse_credential(name, method, apis),
    )


def _parse_auth_method(role: str, value: Any) -> AuthMethod:
    try:
        return AuthMethod(value)
    except ValueError:
        known = ", ".join(repr(m.value) for m in AuthMethod)
        raise ValueError(f"client role {role!r}: unknown auth_method {value!r}; use one of {known}") from None


def _parse_allow(role: str, allow: Any) -> frozenset[str] | None:
    if allow == "all":
        return None
    if not isinstance(allow, list | tuple | set | frozenset):
        raise ValueError(f"client role {role!r}: 'allow' must be \"all\" or a list of API names, got {allow!r}")
    for api_name in allow:
        if api_name not in API_NAMES:
            raise ValueError(f"client role {role!r}: unknown API name {api_name!r} in 'allow'; known: {API_NAMES}")
    return frozenset(allow)


def _parse_bool(role: str, key: str, value: Any, *, default: bool) -> bool:
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ValueError(f"client role {role!r}: {key!r} must be true or false, got {value!r}")
    return value


def _parse_credential(role: str, method: AuthMethod, apis: Mapping[str, Any]) -> str | None:
    if method is AuthMethod.NOTHING:
        return None
    value = apis.get(method.value)
    if value is None and method is AuthMethod.HEADER_PHRASE_SHA256:
        value = apis.get("header_phrase")  # the original read the digest from this key
    if not isinstance(value, str) or not value:
        raise ValueError(f"client role {role!r}: auth_method {method.value!r} needs a non-empty {method.value!r}")
    if method.hashed:
        if not _SHA256_HEX.match(value):
            raise ValueError(f"client role {role!r}: {method.value!r} must be a SHA-256 hex digest (64 hex digits)")
        return value.lower()
    return value


def _defaults(roles: tuple[RoleDef, ...], *, browser: bool) -> list[RoleDef]:
    defaults = [r for r in roles if r.auth_method is AuthMethod.NOTHING and r.use_session == browser]
    if len(defaults) > 1:
        kind = "browser (use_session: true)" if browser else "agent (use_session: false)"
        names = ", ".join(repr(r.name) for r in defaults)
        raise ValueError(f"client roles {names} are all default {kind} roles (auth_method 'nothing'); keep one")
    return defaults
