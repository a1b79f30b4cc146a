"""API-key checks: whether a presented key grants the permission a path needs (gateway/http/endpoints.py).

Keys are compared as SHA-256 digests with ``hmac.compare_digest`` against every configured key (no
early exit), so neither the position of a wrong character nor which key matched shows in the timing.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from gateway.config.auth import AuthConfig
from gateway.http.endpoints import ANY, ENDPOINTS, PUBLIC, EndpointTable
from gateway.http.errors import PermissionDenied, Unauthorized


@dataclass(frozen=True)
class Identity:
    """A configured key, as the request path knows its caller (the scope's ``IDENTITY_KEY``)."""

    name: str
    permissions: frozenset[str]
    priority: int = 0  # the key's default and highest request priority (gateway/proxy/claim.py)

    def grants(self, permission: str) -> bool:
        return permission == ANY or "all" in self.permissions or permission in self.permissions


class KeyRing:
    def __init__(self, config: AuthConfig) -> None:
        self._keys = [
            (hashlib.sha256(k.secret().encode()).digest(), Identity(k.name, frozenset(k.permissions), k.priority))
            for k in config.api_keys
        ]
        self.metrics_public = config.metrics_public

    @property
    def open(self) -> bool:
        return not self._keys

    def identify(self, authorization: bytes | None, api_key: bytes | None = None) -> Identity | None:
        """Who ``Authorization: Bearer <key>`` names, else ``x-api-key: <key>`` (Anthropic's clients)."""
        if authorization and authorization[:7].lower() == b"bearer ":
            presented = authorization[7:].strip()
        elif api_key:
            presented = api_key.strip()
        else:
            return None
        digest = hashlib.sha256(presented).digest()
        found = None
        for known, identity in self._keys:
            if hmac.compare_digest(known, digest):
                found = identity
        return found

    def check(
        self,
        path: str,
        authorization: bytes | None,
        endpoints: EndpointTable = ENDPOINTS,
        *,
        api_key: bytes | None = None,
    ) -> Identity | None:
        """Raise 401/403 as ``path``'s row in ``endpoints`` requires; return who is calling (None when open or
        public). The key comes as ``Authorization: Bearer`` or as ``x-api-key``."""
        if self.open:
            return None
        needed = endpoints.permission(path, metrics_public=self.metrics_public)
        if needed == PUBLIC:
            return None
        identity = self.identify(authorization, api_key)
        if identity is None:
            raise Unauthorized("Invalid or missing API key. Send it as 'Authorization: Bearer <key>' or 'x-api-key'.")
        if not identity.grants(needed):
            raise PermissionDenied(f"This API key does not have the '{needed}' permission.")
        return identity
