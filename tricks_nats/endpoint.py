"""Where NATS is and how to log in, parsed from a URL; no NATS client needed to read one."""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit, urlunsplit

from tricks_nats.errors import UsageError


@dataclass(frozen=True)
class Endpoint:
    """Where NATS is and how to log in; `url` never carries the password."""

    url: str
    user: str | None = None
    password: str | None = field(default=None, repr=False)

    @classmethod
    def from_url(cls, url: str, *, option: str = "--nats-url") -> Endpoint:
        """`nats://user:pass@host:port` (scheme and port optional) -> an endpoint whose url
        has no secrets; a UsageError naming `option` if it is not one."""
        if "://" not in url:
            url = f"nats://{url}"
        parts = urlsplit(url)
        if parts.scheme not in ("nats", "tls") or not parts.hostname:
            raise UsageError(f"{option}: expected nats://[user:password@]host[:port], got {url!r}")
        try:
            port = parts.port or 4222
        except ValueError as exc:
            raise UsageError(f"{option}: bad port in {url!r}") from exc
        host = parts.hostname
        if ":" in host:  # IPv6
            host = f"[{host}]"
        return cls(
            urlunsplit((parts.scheme, f"{host}:{port}", "", "", "")),
            unquote(parts.username) if parts.username else None,
            unquote(parts.password) if parts.password else None,
        )

    def with_login_of(self, other: Endpoint) -> Endpoint:
        """This address with `other`'s credentials when it has none of its own."""
        if self.user:
            return self
        return Endpoint(self.url, other.user, other.password)

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or ""

    @property
    def port(self) -> int:
        return urlsplit(self.url).port or 4222


class Secret(str):
    """A password that does not show itself in a repr (nats-py keeps its options)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "'***'"

    __str__ = __repr__
