"""What the Redis backplane stores: its keys, its stream entries and its publish script.

This module holds the layout of redis.py's docstring (the contract): every key
under one prefix; a message is the entry "<seq>-0" of its topic's stream with
the fields seq, p (priority) and body, plus k and f for a keyed publish; and
PUBLISH_LUA numbers and stores a message in one atomic step. No I/O here.
"""

from __future__ import annotations

from typing import Any

from tether.message import Message, Prepared, Priority, stamp

# INCR + XADD in one atomic step. If the counter is gone but the stream is not
# (the key was deleted or evicted), continue after the stream's last id instead
# of failing on an id that is not increasing.
# KEYS: seq:<topic>, log:<topic>[, idem:<key>]
# ARGV: stream cap, priority, body[, key, fingerprint, window ms, topic]
# Returns {seq}, or {0, "<seq> <fingerprint> <topic>"} for a key already used.
PUBLISH_LUA = """
local idem = KEYS[3]
if idem then
  local seen = redis.call('GET', idem)
  if seen then
    return {0, seen}
  end
end
local seq = redis.call('INCR', KEYS[1])
if seq == 1 and redis.call('EXISTS', KEYS[2]) == 1 then
  local info = redis.call('XINFO', 'STREAM', KEYS[2])
  for i = 1, #info, 2 do
    if info[i] == 'last-generated-id' then
      local last = tonumber(string.match(info[i + 1], '^(%d+)'))
      if last >= seq then
        seq = last + 1
        redis.call('SET', KEYS[1], seq)
      end
    end
  end
end
local id = string.format('%d-0', seq)
if idem then
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[1], id, 'seq', seq, 'p', ARGV[2],
             'body', ARGV[3], 'k', ARGV[4], 'f', ARGV[5])
  redis.call('SET', idem, string.format('%d %s %s', seq, ARGV[5], ARGV[7]), 'PX', ARGV[6])
else
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[1], id, 'seq', seq, 'p', ARGV[2],
             'body', ARGV[3])
end
return {seq}
"""


class Layout:
    """The names of tether's keys under one prefix, as seen by one node."""

    def __init__(self, prefix: str, node: str) -> None:
        self.prefix = prefix
        self.epoch = prefix + "epoch"
        self.wake = f"{prefix}wake:{node}"

    def seq(self, topic: str) -> str:
        """The topic's counter: the last seq assigned."""
        return f"{self.prefix}seq:{topic}"

    def log(self, topic: str) -> str:
        """The topic's stream."""
        return f"{self.prefix}log:{topic}"

    def idem(self, key: str) -> str:
        """What a publish with this idempotency key was numbered, for the window."""
        return f"{self.prefix}idem:{key}"


def text(value: Any) -> str:
    """A value from a Redis reply as text (redis-py answers bytes)."""
    return value.decode() if isinstance(value, bytes) else str(value)


def entry_message(topic: str, fields: dict[bytes, bytes]) -> Message:
    """The message a stream entry holds, stamped with its topic and seq."""
    prepared = Prepared(topic, Priority(int(fields[b"p"])), fields[b"body"])
    return stamp(prepared, int(fields[b"seq"]))
