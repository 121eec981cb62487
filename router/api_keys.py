"""``ApiKeys``: who may call the router, and which tenant each key belongs to.

Lifecycle: built once from the configured keys (``K2SERVE_API_KEYS`` / ``--api-key``, never from a
request); shared read-only by the HTTP guard and the gRPC interceptor. Keys are kept only as
SHA-256 digests and compared with ``hmac.compare_digest`` against every configured digest (no early
exit: the time does not depend on which key matched or how much of it). A key's tenant is a short
digest of it, used as the prefix-cache salt, so tenants never share cached blocks (a client's own
``cache_salt`` is never trusted). No keys configured = authentication off, one shared tenant.

Credentials: ``Authorization: Bearer <key>`` (scheme case-insensitive, key case-sensitive) or
``x-api-key: <key>`` (Anthropic clients); gRPC metadata uses the same two keys.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Mapping


class ApiKeys:
    def __init__(self, keys: Iterable[str] = ()) -> None:
        self._digests = tuple(_digest(k) for k in keys if k)

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def tenant(self, key: str | None) -> str | None:
        """The tenant of ``key`` ("" when auth is off), or None when the key is missing or wrong."""
        if not self.enabled:
            return ""
        if not key:
            return None
        digest = _digest(key)
        matched = b""
        for known in self._digests:  # compare against every key: constant work whatever matches
            if hmac.compare_digest(digest, known):
                matched = known
        return matched[:8].hex() if matched else None

    def tenant_of_headers(self, headers: Mapping[str, str]) -> str | None:
        """``headers`` with lower-case names (HTTP headers or gRPC metadata)."""
        return self.tenant(credential(headers))


def credential(headers: Mapping[str, str]) -> str | None:
    """The key a request presents: ``x-api-key``, else the token of ``authorization: Bearer``.

    Any other scheme (``Basic``, ``Token``, a bare key) presents no key at all (-> 401)."""
    key = (headers.get("x-api-key") or "").strip()
    if key:
        return key
    parts = (headers.get("authorization") or "").split(None, 1)
    if len(parts) == 2 and parts[0].lower() == "bearer" and parts[1].strip():
        return parts[1].strip()
    return None


def _digest(key: str) -> bytes:
    # surrogatepass: a key from gRPC metadata or a config file never raises while being hashed
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()
