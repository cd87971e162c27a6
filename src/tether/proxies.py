"""The client's address behind trusted reverse proxies (`TRUSTED_PROXIES`, X-Forwarded-For).

Pure: strings in, a string out; no aiohttp. The server calls `client_address`
with the TCP peer's address and the request's X-Forwarded-For values.

The rule is the standard right-to-left walk. Each proxy appends the address it
received the connection from, so tether sees `client, proxy1` from the peer
`proxy2`, and only the entries written by proxies we trust can be believed:
everything left of the first untrusted hop was written by someone we do not
trust (a client may send any X-Forwarded-For it likes, and nginx's
`$proxy_add_x_forwarded_for` keeps it). So:

* the peer is not a trusted proxy (or no proxy is trusted) → the peer's address,
  and the header is ignored whatever it says;
* otherwise walk the entries from the right, skipping trusted proxies; the first
  untrusted address is the client;
* an entry that is not an IP address (empty, `unknown`, a name) stops the walk:
  a trusted proxy never writes one, so it and what lies left of it cannot be
  vouched for, and the answer is the nearest hop we trust (the entry right of
  it, or the peer);
* every entry trusted → the leftmost (a client inside a trusted network).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def parse_trusted(raw: str) -> tuple[Network, ...]:
    """The networks of a `TRUSTED_PROXIES` value: a comma list of IP addresses or CIDRs.

    Raises ValueError naming the bad item. A network with host bits set
    (`10.0.0.5/24`) is refused rather than guessed at.
    """
    networks: list[Network] = []
    for item in raw.split(","):
        item = item.strip()
        if not item:
            continue
        try:
            networks.append(ipaddress.ip_network(item, strict=True))
        except ValueError as exc:
            raise ValueError(
                f"each item must be an IP address or a CIDR network, got {item!r} ({exc})"
            ) from None
    return tuple(networks)


def parse_address(text: str) -> Address | None:
    """One X-Forwarded-For entry or peer address as an IP, or None when it is not one.

    Accepts what proxies write: `192.0.2.1`, `2001:db8::1`, and the forms with a
    port some add (`192.0.2.1:5000`, `[2001:db8::1]:5000`, `[2001:db8::1]`).
    An IPv4-mapped IPv6 address (`::ffff:192.0.2.1`, what a dual-stack socket
    reports) is read as the IPv4 address it carries.
    """
    text = text.strip()
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or (end + 1 < len(text) and not _is_port(text[end + 1 :])):
            return None
        text = text[1:end]
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
        if not _is_port(":" + port):
            return None
        text = host
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _is_port(text: str) -> bool:
    return text.startswith(":") and text[1:].isascii() and text[1:].isdigit() and len(text) <= 6


def is_trusted(address: Address, trusted: tuple[Network, ...]) -> bool:
    """True when `address` lies in one of the `trusted` networks."""
    return any(address.version == net.version and address in net for net in trusted)


def client_address(
    peer: str | None, forwarded_for: Iterable[str], trusted: tuple[Network, ...]
) -> str | None:
    """The client's address: the peer's, or from X-Forwarded-For when the peer is trusted.

    `forwarded_for` holds the header's values in the order received (several
    header lines are one comma list, RFC 9110 §5.3). The result is the peer as
    given, or a normalised IP address string.
    """
    if not trusted or peer is None:
        return peer
    peer_ip = parse_address(peer)
    if peer_ip is None or not is_trusted(peer_ip, trusted):
        return peer
    entries = [e for value in forwarded_for for e in value.split(",")]
    nearest = peer_ip  # the nearest hop a trusted proxy vouches for
    for entry in reversed(entries):
        address = parse_address(entry)  # an empty entry (`a,,b`) is not an address either
        if address is None:
            break
        if not is_trusted(address, trusted):
            return str(address)
        nearest = address
    return str(nearest) if nearest is not peer_ip else peer
