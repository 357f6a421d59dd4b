"""SlotLRU: which loaded adapter sits in which of the `max_loras` device slots (pure Python).

Slots are numbered 1..max_loras (a row's slot 0 means "no adapter"). An adapter asked for in a step
keeps its slot if it has one; otherwise it takes a free slot, or evicts the least recently used
adapter that the step does not use (the step's own adapters are pinned). The scheduler admits no
more distinct adapters than slots among running sequences, so a step always fits.
"""
from __future__ import annotations

from collections import OrderedDict


class SlotLRU:
    def __init__(self, num_slots: int):
        self.num_slots = num_slots
        self._slot_of: OrderedDict[int, int] = OrderedDict()     # adapter key -> slot, least recent first
        self._free = list(range(num_slots, 0, -1))               # pop() hands out slot 1 first
        self.num_loads = 0                                       # adapters copied to the device (cumulative)
        self.num_evictions = 0

    def slot_of(self, key: int) -> int | None:
        return self._slot_of.get(key)

    def resident(self) -> list[int]:
        return list(self._slot_of)

    def acquire(self, key: int, pinned: set[int]) -> tuple[int, bool]:
        """(slot, must_load) for adapter `key` in a step using adapters `pinned`."""
        slot = self._slot_of.get(key)
        if slot is not None:
            self._slot_of.move_to_end(key)
            return slot, False
        if self._free:
            slot = self._free.pop()
        else:
            victim = next((k for k in self._slot_of if k not in pinned), None)
            if victim is None:
                raise RuntimeError(f"max_loras: a step uses more than {self.num_slots} distinct adapters")
            slot = self._slot_of.pop(victim)
            self.num_evictions += 1
        self._slot_of[key] = slot
        self.num_loads += 1
        return slot, True

    def release(self, key: int) -> None:
        """Frees the slot of an adapter that will never be asked for again (removed)."""
        slot = self._slot_of.pop(key, None)
        if slot is not None:
            self._free.append(slot)
