"""Access tokens and role rights (CONTRACT §7): deny unless a rule allows."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable

import jwt
import pytest

from api.auth import Principal, bearer_token, create_token, verify_token
from ioc.errors import AuthError, ConfigurationError
from ioc.settings import Settings

COMMUNE = "16681"
OTHER = "16690"


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings(kafka_bootstrap="127.0.0.1:1", database_url="postgresql://nobody@127.0.0.1:1/none")


def test_operator_token_round_trips(settings: Settings) -> None:
    principal = verify_token(settings, create_token(settings, "operator", subject="alice"))
    assert principal.subject == "alice"
    assert principal.role == "operator"
    assert principal.commune is None


def test_token_header_names_the_key_id(settings: Settings) -> None:
    token = create_token(settings, "operator")
    assert jwt.get_unverified_header(token)["kid"] == settings.signing_key_id
    claims = jwt.decode(token, options={"verify_signature": False})
    assert {"sub", "role", "exp", "iat"} <= claims.keys()


def test_commune_token_carries_its_commune(settings: Settings) -> None:
    principal = verify_token(settings, create_token(settings, "commune", commune=COMMUNE))
    assert principal.commune == COMMUNE


@pytest.mark.parametrize("token", [None, ""])
def test_missing_token_is_refused(settings: Settings, token: str | None) -> None:
    with pytest.raises(AuthError, match="missing"):
        verify_token(settings, token)


@pytest.mark.parametrize("token", ["garbage", "a.b.c", "Bearer x"])
def test_malformed_token_is_refused(settings: Settings, token: str) -> None:
    with pytest.raises(AuthError):
        verify_token(settings, token)


def test_expired_token_is_refused(settings: Settings) -> None:
    token = create_token(settings, "operator", ttl=dt.timedelta(minutes=-5))
    with pytest.raises(AuthError, match="expired"):
        verify_token(settings, token)


def test_token_signed_with_another_key_is_refused(settings: Settings, make_settings: Callable[..., Settings]) -> None:
    other = make_settings(
        kafka_bootstrap="x:1",
        database_url="postgresql://x@127.0.0.1:1/x",
        signing_key="another-key-" + "x" * 40,
    )
    with pytest.raises(AuthError, match="signature"):
        verify_token(settings, create_token(other, "operator"))


def test_token_with_unknown_kid_is_refused(settings: Settings, make_settings: Callable[..., Settings]) -> None:
    rotated = make_settings(kafka_bootstrap="x:1", database_url="postgresql://x@127.0.0.1:1/x", signing_key_id="k9")
    with pytest.raises(AuthError, match="key id"):
        verify_token(settings, create_token(rotated, "operator"))


def test_token_with_algorithm_none_is_refused(settings: Settings) -> None:
    now = int(dt.datetime.now(dt.UTC).timestamp())
    token = jwt.encode(
        {"sub": "x", "role": "operator", "iat": now, "exp": now + 60},
        None,
        algorithm="none",
        headers={"kid": settings.signing_key_id},
    )
    with pytest.raises(AuthError):
        verify_token(settings, token)


def test_token_with_unknown_role_is_refused(settings: Settings) -> None:
    now = int(dt.datetime.now(dt.UTC).timestamp())
    token = jwt.encode(
        {"sub": "x", "role": "root", "iat": now, "exp": now + 60},
        settings.effective_signing_key(),
        algorithm="HS256",
        headers={"kid": settings.signing_key_id},
    )
    with pytest.raises(AuthError, match="role"):
        verify_token(settings, token)


def test_commune_token_without_a_known_commune_is_refused(settings: Settings) -> None:
    now = int(dt.datetime.now(dt.UTC).timestamp())
    for claims in ({}, {"commune": "99999"}):
        token = jwt.encode(
            {"sub": "x", "role": "commune", "iat": now, "exp": now + 60, **claims},
            settings.effective_signing_key(),
            algorithm="HS256",
            headers={"kid": settings.signing_key_id},
        )
        with pytest.raises(AuthError, match="commune"):
            verify_token(settings, token)


@pytest.mark.parametrize(("role", "commune"), [("commune", None), ("commune", "99999"), ("root", None)])
def test_create_token_refuses_bad_claims(settings: Settings, role: str, commune: str | None) -> None:
    with pytest.raises(ConfigurationError):
        create_token(settings, role, commune=commune)


OPERATOR = Principal("op", "operator")
ADMIN = Principal("ad", "admin")
SECURITY = Principal("sec", "security")
COMMUNE_USER = Principal("cm", "commune", COMMUNE)


@pytest.mark.parametrize(
    ("principal", "kpi", "scope", "visible"),
    [
        (OPERATOR, "dossier.received", "province", True),
        (OPERATOR, "env.aqi", "station:AIR-16681", True),
        (ADMIN, "dossier.received", f"commune:{OTHER}", True),
        (SECURITY, "cyber.open", "province", True),
        (SECURITY, "cyber.incidents.critical", "province", True),
        (SECURITY, "dossier.received", "province", False),
        (SECURITY, "cyber.open", f"commune:{COMMUNE}", False),
        (SECURITY, "cyber.open", "agency:000.00.16.H40", False),
        (COMMUNE_USER, "dossier.received", f"commune:{COMMUNE}", True),
        (COMMUNE_USER, "cyber.open", f"commune:{COMMUNE}", True),
        (COMMUNE_USER, "dossier.received", f"commune:{OTHER}", False),
        (COMMUNE_USER, "dossier.received", "province", False),
        (COMMUNE_USER, "env.aqi", "station:AIR-16681", False),
        (Principal("x", "stranger"), "dossier.received", "province", False),
    ],
)
def test_kpi_visibility_by_role(principal: Principal, kpi: str, scope: str, visible: bool) -> None:
    assert principal.can_see_kpi(kpi, scope) is visible


@pytest.mark.parametrize(
    ("principal", "channel", "allowed"),
    [
        (OPERATOR, "kpi:province", True),
        (OPERATOR, f"kpi:commune:{OTHER}", True),
        (OPERATOR, "alerts", True),
        (SECURITY, "kpi:province", True),
        (SECURITY, "alerts", True),
        (SECURITY, f"kpi:commune:{COMMUNE}", False),
        (COMMUNE_USER, f"kpi:commune:{COMMUNE}", True),
        (COMMUNE_USER, f"kpi:commune:{OTHER}", False),
        (COMMUNE_USER, "kpi:province", False),
        (COMMUNE_USER, "alerts", True),
        (OPERATOR, "something-else", False),
    ],
)
def test_channel_rights_by_role(principal: Principal, channel: str, allowed: bool) -> None:
    assert principal.can_subscribe(channel) is allowed


@pytest.mark.parametrize(
    ("principal", "alert", "visible"),
    [
        (SECURITY, {"kpi": "cyber.open", "scope": "province"}, True),
        (SECURITY, {"kpi": "water.alarm_level", "scope": "province"}, False),
        (COMMUNE_USER, {"kpi": "water.alarm_level", "scope": f"commune:{COMMUNE}"}, True),
        (COMMUNE_USER, {"kpi": "water.alarm_level", "scope": f"commune:{OTHER}"}, False),
        (COMMUNE_USER, {"kpi": "water.alarm_level", "scope": "province"}, False),
        (OPERATOR, {"kpi": "anything"}, True),
    ],
)
def test_alert_visibility_by_role(principal: Principal, alert: dict[str, str], visible: bool) -> None:
    assert principal.can_see_alert(alert) is visible


@pytest.mark.parametrize(
    ("header", "token"),
    [
        (None, None),
        ("", None),
        ("Basic abc", None),
        ("Bearer", None),
        ("Bearer abc", "abc"),
        ("bearer  abc ", "abc"),
    ],
)
def test_bearer_header_parsing(header: str | None, token: str | None) -> None:
    assert bearer_token(header) == token


# --- key rotation and production keys ----------------------------------------------------------

RETIRED_KEY = "retired-signing-key-" + "r" * 40


def test_token_of_a_retired_but_known_key_still_verifies(make_settings: Callable[..., Settings]) -> None:
    before = make_settings(
        kafka_bootstrap="x:1", database_url="postgresql://x@127.0.0.1:1/x", signing_key=RETIRED_KEY, signing_key_id="k0"
    )
    old_token = create_token(before, "commune", commune=COMMUNE)
    after = make_settings(
        kafka_bootstrap="x:1",
        database_url="postgresql://x@127.0.0.1:1/x",
        signing_key_id="k1",
        signing_keys_previous={"k0": RETIRED_KEY},
    )
    assert verify_token(after, old_token).commune == COMMUNE
    new_token = create_token(after, "operator")
    assert jwt.get_unverified_header(new_token)["kid"] == "k1"
    assert verify_token(after, new_token).role == "operator"
    with pytest.raises(AuthError, match="key id"):
        verify_token(before, new_token)


def test_retired_key_does_not_outlive_its_tokens(make_settings: Callable[..., Settings]) -> None:
    before = make_settings(
        kafka_bootstrap="x:1", database_url="postgresql://x@127.0.0.1:1/x", signing_key=RETIRED_KEY, signing_key_id="k0"
    )
    expired = create_token(before, "operator", ttl=dt.timedelta(minutes=-5))
    after = make_settings(
        kafka_bootstrap="x:1", database_url="postgresql://x@127.0.0.1:1/x", signing_keys_previous={"k0": RETIRED_KEY}
    )
    with pytest.raises(AuthError, match="expired"):
        verify_token(after, expired)


def test_token_claiming_a_retired_kid_but_signed_otherwise_is_refused(make_settings: Callable[..., Settings]) -> None:
    forger = make_settings(
        kafka_bootstrap="x:1",
        database_url="postgresql://x@127.0.0.1:1/x",
        signing_key="forged-" + "f" * 40,
        signing_key_id="k0",
    )
    after = make_settings(
        kafka_bootstrap="x:1", database_url="postgresql://x@127.0.0.1:1/x", signing_keys_previous={"k0": RETIRED_KEY}
    )
    with pytest.raises(AuthError, match="signature"):
        verify_token(after, create_token(forger, "operator"))


def test_token_without_kid_is_refused(settings: Settings) -> None:
    now = int(dt.datetime.now(dt.UTC).timestamp())
    token = jwt.encode(
        {"sub": "x", "role": "operator", "iat": now, "exp": now + 60},
        settings.effective_signing_key(),
        algorithm="HS256",
    )
    with pytest.raises(AuthError, match="key id"):
        verify_token(settings, token)


def test_previous_keys_are_secret_in_repr_and_read_from_json_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IOC_SIGNING_KEYS_PREVIOUS", json.dumps({"k0": RETIRED_KEY}))
    settings = Settings(_env_file=None, signing_key="current-" + "c" * 40)
    assert settings.signing_keys_previous["k0"].get_secret_value() == RETIRED_KEY
    assert RETIRED_KEY not in repr(settings) and RETIRED_KEY not in str(settings)


def test_previous_keys_may_not_reuse_the_current_kid() -> None:
    with pytest.raises(ValueError, match="current key id"):
        Settings(_env_file=None, signing_key_id="k1", signing_keys_previous={"k1": RETIRED_KEY})


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"signing_key": "dev:" + "d" * 40},
        {"signing_key": "too-short"},
        {"signing_key": "p" * 40, "signing_keys_previous": {"k0": "dev:" + "d" * 40}},
        {"signing_key": "p" * 40, "signing_keys_previous": {"k0": "short-retired"}},
    ],
)
def test_production_refuses_development_or_weak_keys_without_echoing_them(
    overrides: dict[str, object], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("IOC_SIGNING_KEY", "IOC_SIGNING_KEYS_PREVIOUS", "IOC_MODE"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValueError, match="production") as refused:
        Settings(_env_file=None, mode="production", **overrides)  # type: ignore[arg-type]
    for secret in ("dev:", "too-short", "short-retired"):
        assert secret not in str(refused.value)


def test_production_accepts_a_real_key_and_retired_keys() -> None:
    settings = Settings(
        _env_file=None, mode="production", signing_key="p" * 40, signing_keys_previous={"k0": RETIRED_KEY}
    )
    assert settings.effective_signing_key() == "p" * 40
