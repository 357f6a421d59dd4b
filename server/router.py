"""Which data-parallel replica serves a request: least outstanding work, counting a cached prefix as work saved.

A request's work is its prompt tokens plus the tokens it may generate (max_tokens x n). A replica's
outstanding work is the sum over the requests it holds. The router also remembers which replicas
were sent which prompt prefixes (chained hashes of full `block_size` blocks, the unit of the
engines' prefix cache), so a replica that already holds the first k blocks of a prompt need not
prefill them again: its cost for the request is `work + cost - k * block_size`. The replica with the
lowest cost wins; ties go round-robin, so an idle server spreads requests over all replicas.
Pure Python, no I/O: the DataParallelEngine calls it on the event loop thread only.
"""
from __future__ import annotations

from collections import OrderedDict

MAX_AFFINITY_BLOCKS = 64          # prefix blocks hashed per prompt (bounds the routing cost)
MAX_REMEMBERED_PREFIXES = 1 << 16  # LRU entries (block hashes)


def request_cost(num_prompt_tokens: int, params) -> int:
    """Tokens a request may cost: its prompt plus max_tokens for each of its n samples (or beams)."""
    max_tokens = getattr(params, "max_tokens", None) or 16
    width = max(int(getattr(params, "n", 1) or 1), int(getattr(params, "beam_width", 1) or 1))
    return int(num_prompt_tokens) + int(max_tokens) * width


def prefix_block_hashes(token_ids: list[int], block_size: int, limit: int = MAX_AFFINITY_BLOCKS) -> list[int]:
    """hashes[k] identifies token_ids[: (k + 1) * block_size] (full blocks only, chained like the engine's)."""
    hashes, parent = [], 0
    for k in range(min(len(token_ids) // block_size, limit)):
        parent = hash((parent, tuple(token_ids[k * block_size:(k + 1) * block_size])))
        hashes.append(parent)
    return hashes


class Router:
    def __init__(self, num_replicas: int, block_size: int):
        self.num_replicas = num_replicas
        self.block_size = block_size
        self.work = [0] * num_replicas          # outstanding tokens per replica
        self.num_requests = [0] * num_replicas  # requests held per replica
        self._next = 0                          # round-robin start for ties
        self._owners: OrderedDict[int, set[int]] = OrderedDict()   # block hash -> replicas sent that prefix

    def choose(self, prompt_ids, cost: int, alive: list[bool]) -> int:
        """The replica for a request (prompt_ids: token ids, or None when not known); alive[i]: may take one."""
        candidates = [r for r in range(self.num_replicas) if alive[r]]
        if not candidates:
            raise LookupError("no live replica")
        saved = self._cached_tokens(prompt_ids)
        n = self.num_replicas
        best = min(candidates, key=lambda r: (self.work[r] + cost - saved[r], (r - self._next) % n))
        self._next = (best + 1) % n
        return best

    def assign(self, replica: int, prompt_ids, cost: int) -> None:
        self.work[replica] += cost
        self.num_requests[replica] += 1
        if not isinstance(prompt_ids, list):
            return
        for h in prefix_block_hashes(prompt_ids, self.block_size):
            self._owners.setdefault(h, set()).add(replica)
            self._owners.move_to_end(h)
        while len(self._owners) > MAX_REMEMBERED_PREFIXES:
            self._owners.popitem(last=False)

    def release(self, replica: int, cost: int) -> None:
        self.work[replica] -= cost
        self.num_requests[replica] -= 1

    def _cached_tokens(self, prompt_ids) -> list[int]:
        """Per replica: prompt tokens it was sent before as a prefix (whole leading blocks)."""
        saved = [0] * self.num_replicas
        if not isinstance(prompt_ids, list):
            return saved
        for k, h in enumerate(prefix_block_hashes(prompt_ids, self.block_size)):
            owners = self._owners.get(h)
            if not owners:
                break
            for r in owners:
                if saved[r] == k * self.block_size:   # r holds every earlier block too
                    saved[r] = (k + 1) * self.block_size
        return saved
