"""Where a webhook may go: https to public addresses only, unless the operator allows private ones.

Checked when the admin sets the URL and again before every delivery (a
name's addresses can change); the delivery does not follow redirects, so a
public URL cannot bounce it to an internal one.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from urllib.parse import urlsplit


class TargetRefused(ValueError):
    """The webhook URL is not one the gateway may call; the message says why."""


def check_url_form(url: str, *, allow_private: bool) -> str:
    """The host of `url` when its form is acceptable (https, a host, no credentials)."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  (raises on a bad port)
    except ValueError:
        raise TargetRefused("webhook_url is not a valid URL") from None
    allowed = ("https", "http") if allow_private else ("https",)
    if parts.scheme not in allowed:
        raise TargetRefused("webhook_url must be an https:// URL")
    if not parts.hostname:
        raise TargetRefused("webhook_url needs a host")
    if parts.username or parts.password:
        raise TargetRefused("webhook_url must not carry credentials")
    if len(url) > 2000:
        raise TargetRefused("webhook_url is too long")
    return parts.hostname


# IPv6 ranges that carry an IPv4 address in their last 32 bits and reach it: NAT64's
# well-known prefix and the deprecated IPv4-compatible form (6to4 has `sixtofour`).
_EMBEDDING_IPV4 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("::/96"))


def _is_public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour
        if embedded is None and any(ip in net for net in _EMBEDDING_IPV4):
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            # 64:ff9b::7f00:1 or 2002:7f00:1:: is loopback by another name.
            ip = embedded
    return ip.is_global and not ip.is_multicast


async def check_target(url: str, *, allow_private: bool) -> None:
    """Raise TargetRefused unless every address `url`'s host resolves to is public."""
    host = check_url_form(url, allow_private=allow_private)
    if allow_private:
        return
    try:
        ipaddress.ip_address(host)
        addresses = [host]
    except ValueError:
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, 443, type=socket.SOCK_STREAM)
        except OSError:
            raise TargetRefused("webhook_url's host does not resolve") from None
        addresses = [str(info[4][0]) for info in infos]
    if not addresses or not all(_is_public(address) for address in addresses):
        raise TargetRefused("webhook_url must point to a public address")
