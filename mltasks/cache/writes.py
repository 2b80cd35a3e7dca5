"""One command writes a cache batch: the L2 and L3 values with their TTLs, the L1 pushes
trimmed and expired, as one ``EVALSHA`` of a Lua script.

Per-key SET/LPUSH/LTRIM/EXPIRE cost the worker more CPU (redis-py packs each command in
Python) than the model does.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

from mltasks import keys

# ARGV: n_l2, n_l3, n_l1, ttl_l2, ttl_l3, ttl_l1, l1_len, then one value per key.
STORE_SCRIPT = """
local n2, n3, n1 = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local ttl2, ttl3, ttl1, keep = ARGV[4], ARGV[5], ARGV[6], tonumber(ARGV[7])
for i = 1, n2 do
  redis.call('SET', KEYS[i], ARGV[7 + i], 'EX', ttl2)
end
for i = n2 + 1, n2 + n3 do
  redis.call('SET', KEYS[i], ARGV[7 + i], 'EX', ttl3)
end
for i = n2 + n3 + 1, n2 + n3 + n1 do
  redis.call('LPUSH', KEYS[i], ARGV[7 + i])
end
for i = n2 + n3 + 1, n2 + n3 + n1 do
  redis.call('LTRIM', KEYS[i], 0, keep - 1)
  redis.call('EXPIRE', KEYS[i], ttl1)
end
return n2 + n3 + n1
"""


STORE_SHA = hashlib.sha1(STORE_SCRIPT.encode(), usedforsecurity=False).hexdigest()


@dataclass(slots=True)
class Writes:
    """What one cache write sends: (key, value) per layer, with the TTLs to use."""

    actions: list[tuple[str, str]] = field(default_factory=list)
    logits: list[tuple[str, bytes]] = field(default_factory=list)
    states: list[tuple[str, bytes]] = field(default_factory=list)
    action_ttl_s: int = 10
    logits_ttl_s: int = keys.LOGITS_TTL_S

    def __len__(self) -> int:
        return len(self.actions) + len(self.logits) + len(self.states)

    def call(self, client: Any, sha: str) -> int:
        """The one script call (EVALSHA ``sha``) on ``client``, a client or a pipeline;
        returns how many values it writes."""
        n = len(self)
        if not n:
            return 0
        pairs = [*self.actions, *self.logits, *self.states]
        client.evalsha(
            sha,
            n,
            *(k for k, _ in pairs),
            *(
                len(self.actions),
                len(self.logits),
                len(self.states),
                self.action_ttl_s,
                self.logits_ttl_s,
                keys.WORKING_MEMORY_TTL_S,
                keys.WORKING_MEMORY_LEN,
            ),
            *(v for _, v in pairs),
        )
        return n
