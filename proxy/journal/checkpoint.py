"""Signed checkpoints of the journal's chain head: tamper evidence that does not live in the database.

The hash chain shows an edit, a gap or a reordering — unless whoever edits also recomputes every hash
after the edit and moves the recorded head (anyone who can write the database can). A checkpoint closes
that: it is ``(seq, hash)`` of the chain head at some moment, signed with an Ed25519 key that is *not* in
the store (``server.journal.checkpoint_key``: a key file or an environment secret), and kept *outside*
the database — in the journal mirror (``server.journal.mirror_file``), in ``checkpoint_file``, in a log
pipeline, or fetched by a cron job (``tether journal checkpoint``, ``GET /api/journal/checkpoint``).
A rewritten-and-rechained history no longer has record ``seq`` with that ``hash``:
``tether journal verify --checkpoints FILE`` (or ``--expect-head HASH``) says so.

A checkpoint is one JSON object (one line in a file)::

    {"kind": "checkpoint", "v": 1, "ts": "2026-…Z", "seq": 1234, "hash": "<sha256 hex>",
     "key_id": "<16 hex: sha256 of the raw public key>", "sig": "<base64url Ed25519 signature>"}

The signature covers ``b"tether-journal-checkpoint\\n"`` followed by the canonical JSON (sorted keys) of
``{"v", "ts", "seq", "hash", "key_id"}``. Verifying needs only the public key
(``tether journal checkpoint --public-key`` prints it), so the verifying side never holds the key that
signs.

Keys: a PEM PKCS#8 Ed25519 private key (``openssl genpkey -algorithm ed25519``), or the raw 32-byte seed
as hex or base64. Public keys: PEM (SubjectPublicKeyInfo) or the raw 32 bytes as hex or base64.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import orjson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from ..chain import canonical

_DOMAIN = b"tether-journal-checkpoint\n"
_SIGNED = ("v", "ts", "seq", "hash", "key_id")


class CheckpointError(ValueError):
    """A key that cannot be read, or a checkpoint that is malformed."""


def _raw_bytes(text: str, size: int) -> bytes | None:
    t = text.strip()
    for decode in (bytes.fromhex, lambda s: base64.b64decode(s + "=" * (-len(s) % 4), altchars=b"-_", validate=False),
                   lambda s: base64.b64decode(s + "=" * (-len(s) % 4), validate=True)):
        try:
            raw = decode(t)
        except (ValueError, binascii.Error):
            continue
        if len(raw) == size:
            return raw
    return None


def load_private_key(material: str, where: str = "checkpoint key") -> Ed25519PrivateKey:
    text = material.strip()
    if "BEGIN" in text:
        try:
            key = serialization.load_pem_private_key(text.encode(), password=None)
        except (ValueError, TypeError) as exc:
            raise CheckpointError(f"{where}: not a readable PEM private key ({exc})") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise CheckpointError(f"{where}: the PEM key is not an Ed25519 key")
        return key
    raw = _raw_bytes(text, 32)
    if raw is None:
        raise CheckpointError(f"{where}: give an Ed25519 private key as PEM, or its 32-byte seed as hex or base64")
    return Ed25519PrivateKey.from_private_bytes(raw)


def load_public_key(material: str, where: str = "public key") -> Ed25519PublicKey:
    text = material.strip()
    if "BEGIN" in text:
        if "PRIVATE" in text:
            return load_private_key(text, where).public_key()
        try:
            key = serialization.load_pem_public_key(text.encode())
        except (ValueError, TypeError) as exc:
            raise CheckpointError(f"{where}: not a readable PEM public key ({exc})") from None
        if not isinstance(key, Ed25519PublicKey):
            raise CheckpointError(f"{where}: the PEM key is not an Ed25519 key")
        return key
    raw = _raw_bytes(text, 32)
    if raw is None:
        raise CheckpointError(f"{where}: give an Ed25519 public key as PEM, or its 32 raw bytes as hex or base64")
    return Ed25519PublicKey.from_public_bytes(raw)


def _raw_public(pub: Ed25519PublicKey) -> bytes:
    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(pub: Ed25519PublicKey) -> str:
    return hashlib.sha256(_raw_public(pub)).hexdigest()[:16]


def public_pem(pub: Ed25519PublicKey) -> str:
    return pub.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def _signed_bytes(cp: dict[str, Any]) -> bytes:
    return _DOMAIN + canonical({k: cp.get(k) for k in _SIGNED})


class Signer:
    """Signs checkpoints with one private key (built once; signing costs ~50 µs)."""

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key
        self.public_key = key.public_key()
        self.key_id = key_id(self.public_key)

    def sign(self, seq: int, head_hash: str, ts: str) -> dict[str, Any]:
        cp: dict[str, Any] = {"kind": "checkpoint", "v": 1, "ts": ts, "seq": seq, "hash": head_hash,
                              "key_id": self.key_id}
        cp["sig"] = base64.urlsafe_b64encode(self._key.sign(_signed_bytes(cp))).rstrip(b"=").decode()
        return cp


def signer_from_config(jc: Any, file: str = "<rules>") -> Signer | None:
    """The signer of ``server.journal.checkpoint_key``, or None when no key is configured. A key that is
    configured but cannot be read is a :class:`~proxy.config.ConfigError` (the gateway refuses to start
    rather than run unsigned)."""
    if jc.checkpoint_key is None:
        return None
    from ..config import ConfigError
    from ..secret import Secret, SecretUnavailable

    where = "server.journal.checkpoint_key"
    try:
        return Signer(load_private_key(Secret(jc.checkpoint_key, where).get(), where))
    except (SecretUnavailable, CheckpointError) as exc:
        raise ConfigError(file, [(where, str(exc).removeprefix(where + ": "))]) from None


def signature_problem(cp: dict[str, Any], keys: dict[str, Ed25519PublicKey]) -> str | None:
    """None when ``cp`` is well formed and signed by one of ``keys`` (by key id); else why not."""
    if cp.get("v") != 1 or not isinstance(cp.get("seq"), int) or not isinstance(cp.get("hash"), str):
        return "malformed checkpoint"
    pub = keys.get(str(cp.get("key_id")))
    if pub is None:
        return f"signed with key {cp.get('key_id')!r}, which is not the verifying key"
    try:
        sig = base64.urlsafe_b64decode(str(cp.get("sig", "")) + "=" * (-len(str(cp.get("sig", ""))) % 4))
        pub.verify(sig, _signed_bytes(cp))
    except (InvalidSignature, ValueError, binascii.Error):
        return "its signature does not verify"
    return None


def read_checkpoints(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The checkpoint lines of a JSON-lines file (a checkpoint file, or the journal mirror: its record
    lines are skipped)."""
    out = []
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                doc = orjson.loads(line)
            except orjson.JSONDecodeError:
                raise CheckpointError(f"{path}:{n}: not JSON") from None
            if isinstance(doc, dict) and doc.get("kind") == "checkpoint":
                doc["_line"] = n
                out.append(doc)
    return out


def append_line(path: str | os.PathLike[str], cp: dict[str, Any]) -> None:
    """Append one checkpoint and fsync it (a checkpoint is only evidence once it is on disk)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "ab") as f:
        f.write(orjson.dumps(cp) + b"\n")
        f.flush()
        os.fsync(f.fileno())


@dataclass
class CheckResult:
    ok: bool
    checked: int = 0           # checkpoints matched against the chain
    archived: int = 0          # checkpoints older than the store's anchor, not checked (no --archives)
    latest: int | None = None  # the newest checkpoint's seq
    problem: str | None = None


def check_chain(checkpoints: Iterable[dict[str, Any]], keys: dict[str, Ed25519PublicKey],
                hash_at: dict[int, str], *, anchor: tuple[int, str], head_seq: int,
                archived_hashes: dict[int, str] | None = None) -> CheckResult:
    """Every checkpoint must be validly signed, and the chain must still hold record ``seq`` with ``hash``.

    ``hash_at``: seq -> hash of the records in the store (only the checkpoints' seqs are needed);
    ``archived_hashes``: the same for archived records (``--archives``)."""
    res = CheckResult(True)
    for cp in checkpoints:
        where = f"checkpoint of record {cp.get('seq')} (line {cp.get('_line', '?')})"
        why = signature_problem(cp, keys)
        if why is not None:
            return CheckResult(False, res.checked, res.archived, res.latest, f"{where}: {why}")
        seq, want = cp["seq"], cp["hash"]
        res.latest = seq if res.latest is None else max(res.latest, seq)
        if seq > head_seq:
            return CheckResult(False, res.checked, res.archived, res.latest,
                               f"{where}: the journal ends at record {head_seq}, but record {seq} was signed "
                               "as existing: records were removed")
        if seq == anchor[0] and seq:
            got: str | None = anchor[1]
        elif seq < anchor[0] or seq == 0:
            if seq == 0:
                got = want if want == "0" * 64 else None
            elif archived_hashes is None:
                res.archived += 1
                continue
            else:
                got = archived_hashes.get(seq)
        else:
            got = hash_at.get(seq)
        if got != want:
            return CheckResult(False, res.checked, res.archived, res.latest,
                               f"{where}: the chain's record {seq} has hash {str(got)[:16]}…, the signed "
                               f"checkpoint says {want[:16]}…: the history was rewritten (and rechained)")
        res.checked += 1
    return res
