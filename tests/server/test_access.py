"""Client roles: validation at construction, resolution per request, promotion, the 403 shape."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import pytest
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from chatstream.server.access import (
    API_NAMES,
    SESSION_ROLE_KEY,
    ClientRoles,
    GrantedRole,
    default_roles_config,
    role_checked,
)
from chatstream.server.errors import ROLE_DENIED_BODY
from chatstream.sessions.middleware import SESSION_SKIPPED_STATE


class FakeSessionManager:
    """What FastSessionMiddleware and our SessionMiddleware put at request.state.session."""

    def __init__(self, session: dict[str, Any] | None = None) -> None:
        self.session: dict[str, Any] = {} if session is None else session
        self.saved = 0

    def get_session(self) -> dict[str, Any]:
        return self.session

    def save_session(self) -> None:
        self.saved += 1


def make_request(session: FakeSessionManager | None = None, headers: dict[str, str] | None = None) -> Request:
    raw_headers = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    scope: dict[str, Any] = {"type": "http", "method": "GET", "path": "/", "headers": raw_headers, "state": {}}
    if session is not None:
        scope["state"]["session"] = session
    else:  # an agent: the session middleware saw its skip header and gave it no session
        scope["state"][SESSION_SKIPPED_STATE] = True
    return Request(scope)


def test_an_app_without_session_middleware_may_call_what_browsers_and_agents_may() -> None:
    roles = ClientRoles.from_config(None)
    bare = Request({"type": "http", "method": "GET", "path": "/", "headers": [], "state": {}})
    assert roles.is_allowed(bare, "chat_stream") and roles.is_allowed(bare, "get_load")
    assert not roles.is_allowed(bare, "get_prompt")
    assert not roles.is_allowed(bare, "chat_stream", as_agent=True)


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


ROLES: dict[str, Any] = {
    "user": {"apis": {"allow": ["chat_stream", "webui_index"], "auth_method": "nothing", "use_session": True}},
    "agent": {"apis": {"allow": ["get_load"], "auth_method": "nothing", "use_session": False}},
    "developer": {
        "apis": {
            "allow": "all",
            "auth_method": "ui_pass_phrase",
            "ui_pass_phrase": "open sesame",
            "use_session": True,
            "enable_dev_tool": True,
        }
    },
    "reviewer": {
        "apis": {
            "allow": ["chat_stream", "get_prompt"],
            "auth_method": "ui_pass_phrase_sha256",
            "ui_pass_phrase_sha256": sha("let me review"),
            "use_session": True,
        }
    },
    "server": {
        "apis": {
            "allow": ["get_load", "get_resource_usage"],
            "auth_method": "header_phrase",
            "header_phrase": "agent-secret",
            "use_session": False,
        }
    },
    "monitor": {
        "apis": {
            "allow": ["get_resource_usage"],
            "auth_method": "header_phrase_sha256",
            "header_phrase_sha256": sha("monitor-secret"),
            "use_session": False,
        }
    },
}


# ----- validation -----


def test_defaults_allow_the_web_ui_for_browsers_and_load_for_agents() -> None:
    roles = ClientRoles.from_config(None)
    browser = make_request(FakeSessionManager())
    agent = make_request()
    for api in ("chat_stream", "clear_context", "set_feedback", "webui_index", "webui_js"):
        assert roles.is_allowed(browser, api), api
    assert not roles.is_allowed(browser, "get_prompt")
    assert roles.is_allowed(agent, "get_load")
    assert not roles.is_allowed(agent, "chat_stream")
    assert roles.browser_default.name == "user" and roles.agent_default is not None


def test_default_config_is_a_fresh_dict_each_time() -> None:
    first = default_roles_config()
    first["user"]["apis"]["allow"].append("get_prompt")
    assert "get_prompt" not in default_roles_config()["user"]["apis"]["allow"]


@pytest.mark.parametrize(
    ("config", "needle"),
    [
        ({"user": {"apis": {"allow": ["chat_stream", "nope"], "auth_method": "nothing", "use_session": True}}}, "nope"),
        ({"user": {"apis": {"allow": "all", "auth_method": "magic", "use_session": True}}}, "magic"),
        ({"user": {"apis": {"allow": "some", "auth_method": "nothing", "use_session": True}}}, "'user'"),
        ({"user": {"apis": {"allow": "all", "auth_method": "nothing", "use_session": "yes"}}}, "use_session"),
        ({"user": {"allow": "all"}}, "'user'"),
        ({"agent": {"apis": {"allow": "all", "auth_method": "nothing", "use_session": False}}}, "no default browser"),
        ({}, "at least one role"),
    ],
)
def test_invalid_configs_raise_value_errors_naming_the_problem(config: dict[str, Any], needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        ClientRoles.from_config(config)


def test_two_browser_defaults_are_rejected_with_both_names() -> None:
    config = {
        "a": {"apis": {"allow": "all", "auth_method": "nothing", "use_session": True}},
        "b": {"apis": {"allow": "all", "auth_method": "nothing", "use_session": True}},
    }
    with pytest.raises(ValueError, match="'a', 'b'"):
        ClientRoles.from_config(config)


def test_two_agent_defaults_are_rejected() -> None:
    config = dict(ROLES)
    config["agent2"] = {"apis": {"allow": [], "auth_method": "nothing", "use_session": False}}
    with pytest.raises(ValueError, match="'agent', 'agent2'"):
        ClientRoles.from_config(config)


@pytest.mark.parametrize(
    ("apis", "needle"),
    [
        ({"allow": "all", "auth_method": "ui_pass_phrase", "use_session": True}, "needs a non-empty"),
        ({"allow": "all", "auth_method": "ui_pass_phrase_sha256", "ui_pass_phrase_sha256": "abc"}, "SHA-256"),
        ({"allow": "all", "auth_method": "header_phrase", "header_phrase": "x", "use_session": True}, "agents"),
        ({"allow": "all", "auth_method": "ui_pass_phrase", "ui_pass_phrase": "x", "use_session": False}, "browser"),
    ],
)
def test_credential_errors_name_the_role(apis: dict[str, Any], needle: str) -> None:
    config = {"user": ROLES["user"], "special": {"apis": apis}}
    with pytest.raises(ValueError, match=needle) as info:
        ClientRoles.from_config(config)
    assert "'special'" in str(info.value)


def test_header_phrase_sha256_reads_the_original_key_too() -> None:
    config = {
        "user": ROLES["user"],
        "old": {"apis": {"allow": ["get_load"], "auth_method": "header_phrase_sha256", "header_phrase": sha("pw")}},
    }
    roles = ClientRoles.from_config(config)
    assert roles.resolve(make_request(headers={"X-ChatStream-Auth-Header": "pw"})).name == "old"


def test_every_api_name_is_checkable() -> None:
    roles = ClientRoles.from_config({"user": {"apis": {"allow": "all", "auth_method": "nothing", "use_session": True}}})
    request = make_request(FakeSessionManager())
    assert all(roles.is_allowed(request, api) for api in API_NAMES)
    assert not roles.is_allowed(request, "web_ui_js")  # the original's misspelt name is not an API


# ----- resolution -----


def test_a_request_without_session_or_role_gets_the_agent_default() -> None:
    roles = ClientRoles.from_config(ROLES)
    assert roles.resolve(make_request()).name == "agent"


def test_without_an_agent_default_agents_fall_back_to_the_browser_default() -> None:
    config = {k: v for k, v in ROLES.items() if k != "agent"}
    roles = ClientRoles.from_config(config)
    assert roles.resolve(make_request()).name == "user"
    assert roles.deny_response(make_request(), "get_load") is not None  # never an exception


def test_header_phrase_promotes_per_request() -> None:
    roles = ClientRoles.from_config(ROLES)
    promoted = make_request(headers={"X-ChatStream-Auth-Header": "agent-secret"})
    assert roles.resolve(promoted).name == "server"
    assert roles.is_allowed(promoted, "get_resource_usage")
    wrong = make_request(headers={"X-ChatStream-Auth-Header": "agent-secreT"})
    assert roles.resolve(wrong).name == "agent"
    assert not roles.is_allowed(wrong, "get_resource_usage")


def test_header_phrase_sha256_compares_the_digest() -> None:
    roles = ClientRoles.from_config(ROLES)
    assert roles.resolve(make_request(headers={"X-ChatStream-Auth-Header": "monitor-secret"})).name == "monitor"
    digest_itself = make_request(headers={"X-ChatStream-Auth-Header": sha("monitor-secret")})
    assert roles.resolve(digest_itself).name == "agent"


def test_a_stale_role_in_the_session_falls_back_to_the_default() -> None:
    roles = ClientRoles.from_config(ROLES)
    session = FakeSessionManager({SESSION_ROLE_KEY: {"client_role_name": "deleted-role", "allowed_apis": "all"}})
    assert roles.resolve(make_request(session)).name == "user"
    agent_role_in_session = FakeSessionManager({SESSION_ROLE_KEY: {"client_role_name": "server"}})
    assert roles.resolve(make_request(agent_role_in_session)).name == "user"


def test_a_session_that_cannot_be_read_is_treated_as_absent() -> None:
    class Broken:
        def get_session(self) -> dict[str, Any]:
            raise RuntimeError("store down")

    roles = ClientRoles.from_config(ROLES)
    request = Request({"type": "http", "headers": [], "state": {"session": Broken()}})
    assert roles.resolve(request).name == "agent"


# ----- promotion by pass phrase -----


def test_pass_phrase_promotes_and_is_kept_in_the_session() -> None:
    roles = ClientRoles.from_config(ROLES)
    manager = FakeSessionManager()
    request = make_request(manager)
    assert roles.try_promote(request, "open sesame") == GrantedRole(name="developer", enable_dev_tool=True)
    assert manager.session[SESSION_ROLE_KEY]["client_role_name"] == "developer"
    assert manager.saved == 1
    json.dumps(manager.session[SESSION_ROLE_KEY])  # stores that serialise sessions can keep it
    later = make_request(manager)
    assert roles.resolve(later).name == "developer"
    assert roles.dev_tool_enabled(later)
    assert roles.is_allowed(later, "get_resource_usage")


def test_sha256_pass_phrase() -> None:
    roles = ClientRoles.from_config(ROLES)
    manager = FakeSessionManager()
    granted = roles.try_promote(make_request(manager), "let me review")
    assert granted == GrantedRole(name="reviewer", enable_dev_tool=False)
    assert not roles.dev_tool_enabled(make_request(manager))


@pytest.mark.parametrize("text", ["", None, "open sesame ", "OPEN SESAME", sha("let me review")])
def test_other_input_promotes_nothing(text: str | None) -> None:
    roles = ClientRoles.from_config(ROLES)
    manager = FakeSessionManager()
    assert roles.try_promote(make_request(manager), text) is None
    assert SESSION_ROLE_KEY not in manager.session and manager.saved == 0


def test_no_promotion_without_a_session() -> None:
    roles = ClientRoles.from_config(ROLES)
    assert roles.try_promote(make_request(), "open sesame") is None


# ----- denial and open APIs -----


def test_denial_is_the_original_403_body() -> None:
    roles = ClientRoles.from_config(ROLES)
    response = roles.deny_response(make_request(FakeSessionManager()), "get_load")
    assert response is not None and response.status_code == 403
    assert json.loads(bytes(response.body)) == {
        "success": False,
        "message": "Forbidden",
        "detail": "Denied on role layer.",
    }
    assert roles.deny_response(make_request(FakeSessionManager()), "chat_stream") is None


def test_health_and_metrics_are_open_unless_a_role_names_them() -> None:
    roles = ClientRoles.from_config(ROLES)
    assert roles.is_allowed(make_request(), "health") and roles.is_allowed(make_request(), "metrics")
    governed = dict(ROLES)
    governed["server"] = {
        "apis": {"allow": ["metrics"], "auth_method": "header_phrase", "header_phrase": "p", "use_session": False}
    }
    roles = ClientRoles.from_config(governed)
    assert not roles.is_allowed(make_request(), "metrics")
    assert roles.is_allowed(make_request(), "health")
    assert roles.is_allowed(make_request(headers={"X-ChatStream-Auth-Header": "p"}), "metrics")


def test_unknown_api_name_is_denied_not_raised() -> None:
    roles = ClientRoles.from_config(None)
    response = roles.deny_response(make_request(FakeSessionManager()), "no_such_api")
    assert response is not None and response.status_code == 403


def test_as_agent_ignores_the_session() -> None:
    roles = ClientRoles.from_config(None)
    browser = make_request(FakeSessionManager())
    assert not roles.is_allowed(browser, "openai")
    assert roles.is_allowed(browser, "openai", as_agent=True)


def test_a_sessionless_denial_of_a_browser_api_hints_at_the_missing_middleware(
    caplog: pytest.LogCaptureFixture,
) -> None:
    roles = ClientRoles.from_config(None)
    with caplog.at_level("WARNING", logger="chatstream.server.access"):
        assert roles.deny_response(make_request(), "chat_stream") is not None
        assert roles.deny_response(make_request(), "chat_stream") is not None
    hints = [r for r in caplog.records if "session middleware" in r.getMessage()]
    assert len(hints) == 1


async def test_role_checked_endpoints_answer_the_role_layers_403() -> None:
    @dataclass(frozen=True)
    class Owner:
        roles: ClientRoles

    @role_checked("get_load")
    async def endpoint(owner: Owner, request: Request, extra: int = 0) -> Response:
        return JSONResponse({"extra": extra})

    owner = Owner(ClientRoles.from_config(None))  # browsers: chat and web UI; agents: get_load and openai
    allowed = await endpoint(owner, make_request(), extra=3)
    denied = await endpoint(owner, make_request(FakeSessionManager()))
    assert (allowed.status_code, json.loads(allowed.body)) == (200, {"extra": 3})
    assert (denied.status_code, json.loads(denied.body)) == (403, ROLE_DENIED_BODY)
    with pytest.raises(ValueError, match="no_such_api"):
        role_checked("no_such_api")
