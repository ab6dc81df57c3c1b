"""Where the cluster keeps its state in Redis, and the Lua every cluster script starts with.

Every key starts with ``{prefix}cluster:`` (the store's ``--redis-prefix``):

- ``leases``: sorted set, node instance -> lease expiry (epoch ms by Redis's clock);
- ``node:{instance}``: hash ``node_id``, ``started``, ``renewed`` (epoch ms, Redis's clock);
- ``presence``: hash, device id -> ``node_id \\t instance \\t session_id \\t epoch \\t
  connected_ms``; an entry counts only while its instance holds a live lease;
- ``epochs``: hash, device id -> how many times the device was claimed (only grows);
- ``held:{instance}``: set of the devices an instance holds (what a reaper walks);
- ``outbox``: stream of the offline events of reaped devices, consumer group ``reapers``;
- ``reaped``: sorted set, instance -> when it was reaped (kept a day, tells a node that
  comes back after a partition that it was reaped rather than forgotten by Redis);
- pub/sub channel ``inbox:{instance}``: calls to a node and their answers.

An *instance* is one run of a node: ``{node_id}/{random}``. A node restarted with the same
``--node-id`` is a new instance, so entries of its previous run are reaped, never mistaken
for its own.
"""

from __future__ import annotations

import attrs

#: Lua shared by the cluster scripts: Redis's clock in ms, and a presence entry's fields.
LUA_PRELUDE = """
local function now_ms()
    local t = redis.call('TIME')
    return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function fields(value)
    local out = {}
    for field in (value .. '\\t'):gmatch('([^\\t]*)\\t') do out[#out + 1] = field end
    return out
end
local function ms(number)
    return string.format('%d', number)
end
"""


@attrs.frozen
class ClusterKeys:
    prefix: str = "elevgw:"

    @property
    def base(self) -> str:
        return self.prefix + "cluster:"

    @property
    def leases(self) -> str:
        return self.base + "leases"

    @property
    def presence(self) -> str:
        return self.base + "presence"

    @property
    def epochs(self) -> str:
        return self.base + "epochs"

    @property
    def outbox(self) -> str:
        return self.base + "outbox"

    @property
    def reaped(self) -> str:
        return self.base + "reaped"

    def node(self, instance: str) -> str:
        return self.base + "node:" + instance

    def held(self, instance: str) -> str:
        return self.base + "held:" + instance

    def inbox(self, instance: str) -> str:
        return self.base + "inbox:" + instance
