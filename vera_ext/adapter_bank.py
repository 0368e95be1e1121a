"""The adapter bank (docs/DESIGN.md §2.6): every adapter's λ of a VeRA layer in two preallocated stacked tables.

``AdapterBank`` holds, per layer, ``lambda_d_table`` (capacity, R) and ``lambda_b_table`` (capacity, O) on the
layer's device. The layer's ``vera_lambda_d[name]`` / ``vera_lambda_b[name]`` Parameters are views of one row each
(``lambda_d_table[slot, :r]``, ``lambda_b_table[slot]``): leaves of their own, so state dicts, optimizers, training
and ``requires_grad_`` see the same Parameters as before, while every in-place change to them (an optimizer step,
``load_state_dict``, ``copy_``) is a change to the table. A mixed batch hands the tables and one int64 index of
slots to the ops, which read the rows by index; nothing is stacked per call.

``SlotRegistry`` gives each adapter name one slot, shared by every layer of a model (so one index tensor serves all
layers); a layer without that adapter has a zero row there (λ_b = 0: its adapter term is 0). A deleted name's slot
is reused (lowest first). Tables grow by ``GROWTH`` (at least ``GROWTH_ROWS`` rows) when a slot beyond their
capacity is needed (amortised O(1) adds): the tables' storage is resized in place, and the Parameters, views of it,
follow (the same objects, no step per adapter).

Whatever replaces a Parameter's data without the layer knowing breaks its link to the table: ``Module._apply``
(``to()``, ``half()``, ``to_empty()``), ``load_state_dict(assign=True)`` and unpickling/deepcopy are caught by the
layer, which rebuilds its tables from its Parameters (:meth:`AdapterBank.relink`); a direct ``p.data = ...`` or a
parameter swap (FSDP, ``torch.func.functional_call``) is not, and then only the tables' mixed batches are stale.
"""

from __future__ import annotations

import heapq
import math
from typing import Optional

import torch
from torch import Tensor, nn

__all__ = ["AdapterBank", "SlotRegistry", "GROWTH", "GROWTH_ROWS"]

#: Capacity growth of the tables: by GROWTH, and at least GROWTH_ROWS rows: amortised O(1) adds (each row is
#: copied about 1 / (GROWTH - 1) times over the life of the bank) and at most max(GROWTH - 1 of the rows,
#: GROWTH_ROWS rows) unused.
GROWTH = 1.1
GROWTH_ROWS = 64


class SlotRegistry:
    """name -> slot for the adapters of a model (or of a lone layer): the row every layer's bank keeps the adapter
    in. A name holds its slot while any layer holds the adapter (counted); a released slot is reused, lowest
    first. ``high_water``: one more than the highest slot ever handed out (every bank's capacity is at least it)."""

    def __init__(self) -> None:
        self.slots: dict[str, int] = {}
        self._holders: dict[str, int] = {}
        self._free: list[int] = []
        self.high_water = 0

    def acquire(self, name: str) -> int:
        slot = self.slots.get(name)
        if slot is None:
            slot = heapq.heappop(self._free) if self._free else self.high_water
            self.high_water = max(self.high_water, slot + 1)
            self.slots[name] = slot
        self._holders[name] = self._holders.get(name, 0) + 1
        return slot

    def free_slots(self) -> int:
        return len(self._free)

    def release(self, name: str) -> None:
        held = self._holders.get(name, 0) - 1
        if held > 0:
            self._holders[name] = held
            return
        self._holders.pop(name, None)
        slot = self.slots.pop(name, None)
        if slot is not None:
            heapq.heappush(self._free, slot)


class AdapterBank:
    """The λ tables of one layer (see the module docstring). ``width``: λ_d's row length (the projection's rank R:
    an adapter of rank r < R uses the first r columns, the rest stay 0)."""

    def __init__(self, width: int, out_features: int, device, registry: Optional[SlotRegistry] = None):
        self.width = int(width)
        self.out_features = int(out_features)
        self.registry = registry if registry is not None else SlotRegistry()
        self.slot_of: dict[str, int] = {}  # this layer's adapters and their slots
        self.lambda_d_table = torch.zeros(0, self.width, device=device)
        self.lambda_b_table = torch.zeros(0, self.out_features, device=device)

    @property
    def capacity(self) -> int:
        return self.lambda_d_table.shape[0]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.lambda_d_table, self.lambda_b_table))

    def reserve(self, rows: int) -> None:
        """Capacity for at least ``rows`` rows (grown by GROWTH at least); the Parameters stay views of their rows."""
        if rows <= self.capacity:
            return
        capacity = max(rows, self.capacity + GROWTH_ROWS, math.ceil(self.capacity * GROWTH))
        used = self.capacity
        with torch.no_grad():
            for table in (self.lambda_d_table, self.lambda_b_table):
                # The table's own storage grows (reallocated, the old rows copied by the allocator): the Parameters
                # are views of that storage, so they follow without being re-pointed one by one (a growth costs a
                # copy of the table, not a Python step per adapter). Rows keep their offsets: the table is
                # row-major from offset 0.
                storage = table.untyped_storage()
                storage.resize_(capacity * table.shape[1] * table.element_size())
                table.set_(storage, 0, (capacity, table.shape[1]))
                table[used:].zero_()

    def insert(self, name: str, r: int, stores: tuple[nn.ParameterDict, nn.ParameterDict]) -> tuple[Tensor, Tensor]:
        """Rows for adapter ``name`` (all zeros; its old Parameters, if any, detached from the table): returns the
        new (λ_d, λ_b) Parameters, views of its rows, for the caller to initialize and store."""
        slot = self.slot_of.get(name)
        if slot is None:  # (a free row is all zeros: zeroed when the table grew or its adapter was removed)
            slot = self.registry.acquire(name)
            self.slot_of[name] = slot
            self.reserve(max(slot + 1, self.registry.high_water))
        else:
            _detach(stores, name)
            with torch.no_grad():
                self.lambda_d_table[slot].zero_()
                self.lambda_b_table[slot].zero_()
        return (
            nn.Parameter(self.lambda_d_table[slot, :r]),
            nn.Parameter(self.lambda_b_table[slot]),
        )

    def remove(self, name: str, stores: tuple[nn.ParameterDict, nn.ParameterDict]) -> None:
        """Free ``name``'s rows (zeroed: a layer lacking an adapter adds nothing for it). Its Parameters, which the
        caller then drops from the stores, get their own copy: an optimizer still holding them cannot write into
        the adapter that reuses the slot."""
        slot = self.slot_of.pop(name)
        _detach(stores, name)
        with torch.no_grad():
            self.lambda_d_table[slot].zero_()
            self.lambda_b_table[slot].zero_()
        self.registry.release(name)

    def relink(self, stores: tuple[nn.ParameterDict, nn.ParameterDict]) -> None:
        """Rebuild the tables from the Parameters (after something replaced their data: ``to()``, ``to_empty()``,
        ``load_state_dict(assign=True)``, unpickling) on their device and dtype, and re-point them."""
        store_d, store_b = stores
        params = list(store_b.values())
        ref = params[0] if params else self.lambda_b_table
        capacity = max(self.capacity, self.registry.high_water)
        d = torch.zeros(capacity, self.width, device=ref.device, dtype=ref.dtype)
        b = torch.zeros(capacity, self.out_features, device=ref.device, dtype=ref.dtype)
        with torch.no_grad():
            for name, slot in self.slot_of.items():
                ld = store_d[name]
                d[slot, : ld.shape[0]] = ld.detach()
                b[slot] = store_b[name].detach()
        self.lambda_d_table, self.lambda_b_table = d, b
        self._point(stores, self.slot_of)

    def _point(self, stores, slots: dict[str, int]) -> None:
        store_d, store_b = stores
        d, b = self.lambda_d_table, self.lambda_b_table
        for name, slot in slots.items():
            ld = store_d._parameters.get(name)
            lb = store_b._parameters.get(name)
            if ld is None or lb is None:  # (insert() reserves before the new Parameters are stored)
                continue
            if ld.dtype != d.dtype or lb.dtype != b.dtype or ld.device != d.device or lb.device != b.device:
                continue  # (relink made the tables in their dtype; a Parameter of another dtype stays its own)
            ld.data = d[slot, : ld.shape[0]]
            lb.data = b[slot]

    def linked(self, stores) -> bool:
        """Whether every Parameter is a view of its row (O(adapters): for tests and checks, not the forward)."""
        store_d, store_b = stores
        d, b = self.lambda_d_table, self.lambda_b_table
        for name, slot in self.slot_of.items():
            if store_d[name].data_ptr() != d[slot].data_ptr() or store_b[name].data_ptr() != b[slot].data_ptr():
                return False
        return True


def _detach(stores, name: str) -> None:
    for store in stores:
        p = store._parameters.get(name)
        if p is not None:
            p.data = p.data.clone()
