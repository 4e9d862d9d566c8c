"""Agent identity: every token failure has its own 401 code; keys, algorithms and RFC 8693 delegation."""

from __future__ import annotations

import base64
import json
import time

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from proxy.config import IdentityConfig
from proxy.errors import AuthError
from proxy.policy.identity import TokenVerifier, mint_token
from tests.conftest import SECRET, base_rules


def _hs(claims: dict, secret: str = SECRET, alg: str = "HS256", headers: dict | None = None) -> str:
    return jwt.encode(claims, secret, algorithm=alg, headers=headers)


def _claims(**kw) -> dict:
    now = int(time.time())
    c = {"sub": "bot", "iss": "tether", "aud": "tether", "iat": now, "exp": now + 600}
    c.update(kw)
    return {k: v for k, v in c.items() if v is not None}


def _b64(d: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(d).encode()).rstrip(b"=").decode()


@pytest.mark.parametrize("make_token, code", [
    (lambda: None, "token_missing"),
    (lambda: "not-a-jwt", "token_malformed"),
    (lambda: _hs(_claims(exp=int(time.time()) - 100)), "token_expired"),
    (lambda: _hs(_claims(nbf=int(time.time()) + 600)), "token_not_yet_valid"),
    (lambda: _hs(_claims(aud="someone-else")), "token_audience_mismatch"),
    (lambda: _hs(_claims(iss="evil")), "token_issuer_mismatch"),
    (lambda: _hs(_claims(), secret="wrong-secret-wrong-secret-wrong-secret-xx"), "token_invalid_signature"),
    (lambda: _hs(_claims(exp=None)), "token_missing_claim"),
    (lambda: _hs(_claims(sub=None)), "token_missing_claim"),
    (lambda: _hs(_claims(), alg="HS512"), "token_algorithm_not_allowed"),
    (lambda: f"{_b64({'alg': 'none', 'typ': 'JWT'})}.{_b64(_claims())}.", "token_algorithm_not_allowed"),
    (lambda: _hs(_claims(act="not-an-object")), "token_missing_claim"),
])
async def test_each_token_failure_has_its_own_401(gateway, upstream, make_token, code):
    token = make_token()
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with gateway.session.get(f"{gateway.upstream_url('crm')}/api/contacts/1", headers=headers) as r:
        assert r.status == 401
        body = await r.json()
        assert body["error"]["code"] == code
        assert "WWW-Authenticate" in r.headers
        assert r.headers["WWW-Authenticate"].startswith('Bearer realm="tether"')
    assert upstream.received == []


async def test_basic_scheme_is_not_a_token(gateway):
    async with gateway.session.get(f"{gateway.upstream_url('crm')}/api/contacts/1",
                                   headers={"Authorization": "Basic Ym90OnB3"}) as r:
        assert r.status == 401
        assert (await r.json())["error"]["code"] == "token_missing"


def test_rfc8693_act_claim_makes_two_dimensional_identity():
    cfg = IdentityConfig(hs_secret={"value": SECRET})
    v = TokenVerifier(cfg)
    ident = v.authenticate("Bearer " + mint_token(cfg, "ae:jane@acme", actor="renewal-bot-v2"))
    assert ident.agent == "renewal-bot-v2" and ident.on_behalf_of == "ae:jane@acme"
    ident = v.authenticate("Bearer " + mint_token(cfg, "renewal-bot-v2"))
    assert ident.agent == "renewal-bot-v2" and ident.on_behalf_of is None


def _rsa_pair(tmp_path, name="rsa"):
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    priv = tmp_path / f"{name}.key"
    pub = tmp_path / f"{name}.pub"
    priv.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo))
    return key, priv, pub


def test_rs256_with_pem_public_key(tmp_path):
    key, priv, pub = _rsa_pair(tmp_path)
    cfg = IdentityConfig(algorithms=["RS256"], public_key_file=pub, private_key_file=priv)
    v = TokenVerifier(cfg)
    assert v.authenticate("Bearer " + mint_token(cfg, "bot")).agent == "bot"
    other, _, _ = _rsa_pair(tmp_path, "other")
    bad = jwt.encode(_claims(), other, algorithm="RS256")
    with pytest.raises(AuthError) as e:
        v.verify(bad)
    assert e.value.code == "token_invalid_signature"


def test_hs_token_signed_with_the_public_key_is_refused(tmp_path):
    """Algorithm confusion: an attacker signs HS256 with the (public) PEM as the secret."""
    _, priv, pub = _rsa_pair(tmp_path)
    cfg = IdentityConfig(algorithms=["RS256"], public_key_file=pub)
    v = TokenVerifier(cfg)
    import hashlib
    import hmac

    header = _b64({"alg": "HS256", "typ": "JWT"})
    payload = _b64(_claims())
    sig = hmac.new(pub.read_bytes(), f"{header}.{payload}".encode(), hashlib.sha256).digest()
    forged = f"{header}.{payload}.{base64.urlsafe_b64encode(sig).rstrip(b'=').decode()}"
    with pytest.raises(AuthError) as e:
        v.verify(forged)
    assert e.value.code == "token_algorithm_not_allowed"


def test_mixing_hmac_and_public_key_algorithms_is_a_config_error(tmp_path):
    _, _, pub = _rsa_pair(tmp_path)
    with pytest.raises(ValueError, match="algorithm-confusion"):
        IdentityConfig(algorithms=["HS256", "RS256"], hs_secret={"value": SECRET}, public_key_file=pub)


def test_jwks_selects_key_by_kid(tmp_path):
    k1 = ec.generate_private_key(ec.SECP256R1())
    k2 = ec.generate_private_key(ec.SECP256R1())
    jwks = {"keys": []}
    for kid, k in (("one", k1), ("two", k2)):
        jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(k.public_key()))
        jwk.update({"kid": kid, "alg": "ES256", "use": "sig"})
        jwks["keys"].append(jwk)
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(jwks))
    cfg = IdentityConfig(algorithms=["ES256"], jwks_file=path)
    v = TokenVerifier(cfg)
    t2 = jwt.encode(_claims(), k2, algorithm="ES256", headers={"kid": "two"})
    assert v.verify(t2)["sub"] == "bot"
    wrong = jwt.encode(_claims(), k2, algorithm="ES256", headers={"kid": "one"})
    with pytest.raises(AuthError) as e:
        v.verify(wrong)
    assert e.value.code == "token_invalid_signature"
    unknown = jwt.encode(_claims(), k2, algorithm="ES256", headers={"kid": "three"})
    with pytest.raises(AuthError) as e:
        v.verify(unknown)
    assert e.value.code == "token_unknown_key"


def test_cached_token_still_expires():
    cfg = IdentityConfig(hs_secret={"value": SECRET}, leeway=0)
    v = TokenVerifier(cfg)
    tok = _hs(_claims(exp=int(time.time()) + 1))
    assert v.verify(tok)["sub"] == "bot"
    time.sleep(1.6)
    with pytest.raises(AuthError) as e:
        v.verify(tok)
    assert e.value.code == "token_expired"


def test_rotated_secret_file_is_picked_up(tmp_path):
    f = tmp_path / "secret"
    f.write_text(SECRET)
    cfg = IdentityConfig(hs_secret={"file": str(f)})
    v = TokenVerifier(cfg)
    old = _hs(_claims())
    assert v.verify(old)
    new_secret = "rotated-secret-0123456789abcdef0123456789"
    f.write_text(new_secret)
    import os

    os.utime(f, (time.time() + 5, time.time() + 5))
    v._secret._checked = 0  # skip the 1 s re-check interval for the test
    with pytest.raises(AuthError):
        v.verify(old)
    assert v.verify(_hs(_claims(), secret=new_secret))["sub"] == "bot"


async def test_reviewer_token_is_an_identity_too(make_gateway, upstream, tmp_path):
    gw = await make_gateway(base_rules(upstream.url, str(tmp_path / "t.db")))
    v = gw.gw.state.verifier
    assert v.is_reviewer(v.authenticate("Bearer " + gw.reviewer_token("rita")))
    assert not v.is_reviewer(v.authenticate("Bearer " + gw.token("bot")))
