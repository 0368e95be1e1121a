"""The adapter bank (docs/DESIGN.md §2.6): every adapter's λ of a VeRA layer in two preallocated stacked tables.

``AdapterBank`` holds, per layer, ``lambda_d_table`` (capacity, R) and ``lambda_b_table`` (capacity, O) on the
layer's device. The layer's ``vera_lambda_d`` / ``vera_lambda_b`` (:mod:`vera_ext.lambda_store`) hand out each
adapter's λ as a Parameter that is a view of its row (``lambda_d_table[slot, :r]``, ``lambda_b_table[slot]``),
created when first asked for: state dicts, optimizers, training and ``requires_grad_`` see Parameters as in PEFT,
while every in-place change to them (an optimizer step, ``load_state_dict``, ``copy_``) is a change to the table. A
mixed batch hands the tables and one int64 index of slots to the ops, which read the rows by index; nothing is
stacked per call.

``SlotRegistry`` gives each adapter name one slot, shared by every layer of a model (so one index tensor serves all
layers); a layer without that adapter has a zero row there (λ_b = 0: its adapter term is 0). A deleted name's slot
is reused (lowest first). Tables grow by ``GROWTH`` (at least ``GROWTH_ROWS`` rows) when a slot beyond their
capacity is needed (amortised O(1) adds): both tables move to one new allocation and the Parameters created so
far are pointed at their new rows.

Whatever replaces a Parameter's data without the layer knowing breaks its link to the table: ``Module._apply``
(``to()``, ``half()``, ``to_empty()``), ``load_state_dict(assign=True)`` and unpickling/deepcopy are caught by the
layer, which converts the tables and re-points the Parameters (:meth:`AdapterBank.relink`); a direct
``p.data = ...`` or a parameter swap (FSDP, ``torch.func.functional_call``) is not, and then only the tables'
mixed batches are stale.
"""

from __future__ import annotations

import heapq
import math
import mmap
from typing import Optional

import torch
from torch import Tensor

__all__ = ["AdapterBank", "SlotRegistry", "GROWTH", "GROWTH_ROWS"]

#: Capacity growth of the tables: by GROWTH, and at least GROWTH_ROWS rows: amortised O(1) adds (each row is
#: copied about 1 / (GROWTH - 1) times over the life of the bank) and at most max(GROWTH - 1 of the rows,
#: GROWTH_ROWS rows) unused.
GROWTH = 1.1
GROWTH_ROWS = 64
#: A CPU bank of at least this many bytes is an anonymous memory mapping of its own instead of a heap block: the heap
#: keeps the freed predecessors of a growing bank as holes it may never fill (the process grew by 1.64× the λ bytes
#: over 10,000 add_adapter calls, of which 1.05× was held), while a mapping goes back to the system whole when the
#: bank grows again, and its rows past the used ones are zero pages that take no memory until written. So a mapped
#: bank grows by MAPPED_GROWTH: its unused rows cost address space only, and each row is copied (and its pages
#: faulted in) about twice instead of ten times (a third of the time of 10,000 adds went to growing at 1.1).
MAPPED_BYTES = 1 << 20
MAPPED_GROWTH = 1.5


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
    an adapter of rank r < R uses the first r columns, the rest stay 0). Both tables are views of one allocation
    (``storage``), so a bank of thousands of adapters is one large block: the allocator maps it and unmaps the old
    one when it grows, instead of leaving freed tables behind in its heap. ``stores``: the layer's LambdaStores
    (set by the layer), whose created Parameters the bank keeps pointed at their rows."""

    def __init__(self, width: int, out_features: int, device, registry: Optional[SlotRegistry] = None):
        self.width = int(width)
        self.out_features = int(out_features)
        self.registry = registry if registry is not None else SlotRegistry()
        self.slot_of: dict[str, int] = {}  # this layer's adapters and their slots
        self.stores: tuple = ()
        self._hold(torch.zeros(0, device=device), 0)

    def _hold(self, storage: Tensor, capacity: int, mapped: bool = False) -> None:
        """Make ``storage`` (capacity * (width + out_features) elements) the tables: λ_d rows first, then λ_b.
        ``mapped``: it is a memory mapping of its own (:func:`_zeros`)."""
        split = capacity * self.width
        self.storage = storage
        # (a copy of a mapped bank, from deepcopy or unpickling, is an ordinary, resizable allocation)
        self.mapped = mapped and not storage.untyped_storage().resizable()
        self.lambda_d_table = storage[:split].view(capacity, self.width)
        self.lambda_b_table = storage[split:].view(capacity, self.out_features)

    @property
    def capacity(self) -> int:
        return self.lambda_d_table.shape[0]

    def nbytes(self) -> int:
        """Bytes allocated for the tables (on a mapped bank, address space: its unwritten rows take no memory)."""
        return self.storage.numel() * self.storage.element_size()

    def used_bytes(self) -> int:
        """Bytes of the rows handed out so far (every slot below the registry's high water, in every layer)."""
        rows = min(self.capacity, self.registry.high_water)
        return rows * (self.width + self.out_features) * self.storage.element_size()

    def reserve(self, rows: int) -> None:
        """Capacity for at least ``rows`` rows (grown by GROWTH, or MAPPED_GROWTH, at least): a new allocation, the
        rows copied, the created Parameters re-pointed (O(created), not O(adapters))."""
        if rows <= self.capacity:
            return
        growth = MAPPED_GROWTH if self.mapped else GROWTH
        capacity = max(rows, self.capacity + GROWTH_ROWS, math.ceil(self.capacity * growth))
        used, old_d, old_b = self.capacity, self.lambda_d_table, self.lambda_b_table
        storage, mapped = _zeros(capacity * (self.width + self.out_features), self.storage.dtype, self.storage.device)
        self._hold(storage, capacity, mapped)
        with torch.no_grad():
            self.lambda_d_table[:used].copy_(old_d)
            self.lambda_b_table[:used].copy_(old_b)
        self._point(copy_values=False)

    def insert(self, name: str) -> int:
        """A row for adapter ``name`` (all zeros), its slot returned. For a name already here the caller has
        dropped its old Parameters (LambdaStore.forget) first."""
        slot = self.slot_of.get(name)
        if slot is None:  # (a free row is all zeros: zeroed when the table grew or its adapter was removed)
            slot = self.registry.acquire(name)
            self.slot_of[name] = slot
            self.reserve(max(slot + 1, self.registry.high_water))
        else:
            with torch.no_grad():
                self.lambda_d_table[slot].zero_()
                self.lambda_b_table[slot].zero_()
        return slot

    def row(self, column: str, name: str, r: int) -> Tensor:
        """Adapter ``name``'s λ_d (``column`` "d": the first ``r`` entries of its row) or λ_b ("b"), a view."""
        slot = self.slot_of[name]
        return self.lambda_d_table[slot, :r] if column == "d" else self.lambda_b_table[slot]

    def remove(self, name: str) -> None:
        """Free ``name``'s rows (zeroed: a layer lacking an adapter adds nothing for it); the caller has dropped
        its Parameters (LambdaStore.forget, which gives them their own copy)."""
        slot = self.slot_of.pop(name)
        with torch.no_grad():
            self.lambda_d_table[slot].zero_()
            self.lambda_b_table[slot].zero_()
        self.registry.release(name)

    def relink(self, fn=None) -> None:
        """Make every created Parameter a view of its row again, after something gave it other data. With ``fn``
        (Module._apply's conversion: ``to()``, ``half()``, ``to_empty()``), the tables are converted by ``fn``
        first; without (deepcopy, unpickling, ``load_state_dict(assign=True)``), they move to the first created
        Parameter's device and dtype. Each created Parameter's values are copied into its row; one of another
        dtype or device stays its own."""
        storage = self.storage
        if fn is not None:
            storage = fn(storage)
        else:
            ref = next((p for store in self.stores for p in store.lambdas.created().values()), None)
            if ref is not None:
                storage = storage.to(ref.device, ref.dtype)
        storage = storage.contiguous()
        self._hold(storage, self.capacity, mapped=self.mapped and storage is self.storage)
        if self.capacity < self.registry.high_water:
            self.reserve(self.registry.high_water)
        self._point(copy_values=True)

    def _point(self, copy_values: bool) -> None:
        """Point every created Parameter (of the tables' dtype and device) at its row; ``copy_values``: its values
        are the adapter's (copied into the row first), else the row's are."""
        with torch.no_grad():
            for store in self.stores:
                lambdas = store.lambdas
                for name, param in lambdas.created().items():
                    row = lambdas.row(name)
                    if param.dtype != row.dtype or param.device != row.device or param.data_ptr() == row.data_ptr():
                        continue
                    if copy_values:
                        row.copy_(param.detach())
                    param.data = row

    def linked(self) -> bool:
        """Whether every created Parameter is a view of its row (O(created): for tests and checks)."""
        for store in self.stores:
            for name, param in store.lambdas.created().items():
                if param.data_ptr() != store.lambdas.row(name).data_ptr():
                    return False
        return True


def _zeros(numel: int, dtype: torch.dtype, device) -> tuple[Tensor, bool]:
    """(a zero 1-D tensor for a bank, whether it is mapped): a mapping of its own on the CPU from MAPPED_BYTES on
    (zero pages), else torch's allocation."""
    nbytes = numel * torch.empty(0, dtype=dtype).element_size()
    if torch.device(device).type == "cpu" and nbytes >= MAPPED_BYTES:
        # (the tensor keeps the mapping alive and unmaps it when its storage is freed)
        return torch.frombuffer(mmap.mmap(-1, nbytes), dtype=dtype), True
    return torch.zeros(numel, dtype=dtype, device=device), False
