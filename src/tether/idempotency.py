"""Publishing that a retry cannot double: the `Idempotency-Key` and the keys a node keeps.

A publisher that sends a key (`Idempotency-Key` on `POST /event`, `key=` in the
Python API) may repeat the publish as often as it likes within the window: the
first one is published, every repeat is answered with the original topic and
seq and delivers nothing. The key's scope is the whole hub (every topic, every
node sharing the backplane), as in draft-ietf-httpapi-idempotency-key-header.

A repeat must carry the same event: its fingerprint (a hash of the topic and
the serialized body) is kept with the key, and a key reused for a different
event is refused with 422, as the draft says (§2.7), instead of being answered
with another event's seq.

Pure: `KeyMemory` takes `now` from its caller and imports no I/O.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

from tether.errors import PublishError, Refusal
from tether.message import Prepared

MAX_KEY_LENGTH = 200
DEFAULT_WINDOW_MS = 3_600_000  # one hour: longer than any retry loop, short enough to keep
# Keys one node keeps in memory at most: about 20 MB with UUID keys. Beyond it the
# oldest are forgotten first, so a flood of keys cannot exhaust memory.
MAX_KEYS = 100_000

MISMATCH = "Idempotency-Key was already used for a different event"


def check_key(raw: str) -> str:
    """An idempotency key: 1 to 200 printable ASCII characters; else PublishError (400)."""
    if not 1 <= len(raw) <= MAX_KEY_LENGTH or not all(" " <= c <= "~" for c in raw):
        raise PublishError(
            Refusal.INVALID,
            f"Idempotency-Key must be 1 to {MAX_KEY_LENGTH} printable ASCII characters",
        )
    return raw


def fingerprint(prepared: Prepared) -> str:
    """What identifies an event for a repeat: its topic and its serialized body."""
    digest = hashlib.blake2b(prepared.topic.encode() + b"\0" + prepared.body, digest_size=16)
    return digest.hexdigest()


@dataclass(frozen=True, slots=True)
class Seen:
    """What a key was first published as."""

    topic: str
    seq: int
    fingerprint: str


class KeyMemory:
    """Keys seen within `window` seconds, at most `max_keys` of them, oldest forgotten first."""

    def __init__(self, window: float, max_keys: int = MAX_KEYS) -> None:
        if window <= 0 or max_keys < 1:
            raise ValueError("need window > 0 and max_keys >= 1")
        self.window = window
        self.max_keys = max_keys
        # Inserted in time order with one window, so also in expiry order.
        self._keys: OrderedDict[str, tuple[float, Seen]] = OrderedDict()
        self.evicted = 0  # forgotten before their window ended, for the bound

    def __len__(self) -> int:
        return len(self._keys)

    def _expire(self, now: float) -> None:
        keys = self._keys
        while keys:
            expires, _ = next(iter(keys.values()))
            if expires > now:
                break
            keys.popitem(last=False)

    def get(self, key: str, now: float) -> Seen | None:
        """What `key` was published as, if it was within the window."""
        self._expire(now)
        entry = self._keys.get(key)
        return entry[1] if entry is not None else None

    def put(self, key: str, seen: Seen, now: float) -> None:
        """Remember `key`; a key already known keeps what it was first published as."""
        self._expire(now)
        if key in self._keys:
            return
        while len(self._keys) >= self.max_keys:
            self._keys.popitem(last=False)
            self.evicted += 1
        self._keys[key] = (now + self.window, seen)


def check_repeat(seen: Seen, fingerprint: str) -> None:
    """A repeat of a key must carry the event it was first used for (else 422)."""
    if seen.fingerprint != fingerprint:
        raise PublishError(Refusal.KEY_REUSED, MISMATCH)
