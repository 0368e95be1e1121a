"""``vera_lambda_d`` / ``vera_lambda_b``: a VeraLinear's λ ParameterDicts, over its adapter bank (docs/DESIGN.md §2.6).

They answer as PEFT's ParameterDicts do: one Parameter per adapter, the same object every time it is asked for, seen
by ``named_parameters()``, optimizers, ``requires_grad_`` and ``load_state_dict``. Each Parameter is a view of the
adapter's row in the bank's table, and it is created the first time something asks for it (``store[name]``,
iterating ``items()``/``values()``, ``named_parameters()``, ``parameters()``, ``load_state_dict``), then kept.
Until then the adapter costs its row and nothing else: a Parameter object costs about 530 bytes (its TensorImpl,
autograd metadata and Python object), which, two per layer, would add 20-40% to the λ bytes of a small adapter.
So adding, activating, serving (by index, or by names without gradients), saving (``state_dict()``, which hands out
row views) and deleting thousands of adapters create no Parameters; training one creates its own.

An adapter's ``requires_grad`` before its Parameter exists is kept in ``trainable`` (the names whose Parameter
will require grad) and becomes the Parameter's flag when it is created; from then on the Parameter's flag is the
truth. :meth:`LambdaStore.requires_grad_of` and :meth:`LambdaStore.set_requires_grad` read and set it either way.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import Tensor, nn

__all__ = ["LambdaStore", "LambdaParameters", "named_parameters_besides_lambdas"]


class LambdaParameters(dict):
    """The ``_parameters`` of a :class:`LambdaStore`. Its keys are the layer's adapters (``ranks``, the layer's
    ``r`` dict); as a plain dict it holds only the Parameters created so far, and ``store[name]`` creates one on
    the first look. ``column``: "d" (λ_d, the first r entries of the row) or "b" (λ_b, the whole row)."""

    def __init__(self, bank, column: str, ranks: dict[str, int], trainable: Optional[set] = None):
        super().__init__()
        self.bank = bank
        self.column = column
        self.ranks = ranks
        self.trainable: set[str] = set() if trainable is None else trainable

    def row(self, name: str) -> Tensor:
        """Adapter ``name``'s λ: a plain view of its row (what its Parameter, if created, is a view of too)."""
        return self.bank.row(self.column, name, self.ranks[name])

    def created(self) -> dict[str, nn.Parameter]:
        """The Parameters that exist now (a copy)."""
        return dict(dict.items(self))

    def adopt(self, params: dict[str, nn.Parameter]) -> None:
        """Take ``params`` as the created Parameters of their names (after Module._apply replaced some)."""
        for name, param in params.items():
            dict.__setitem__(self, name, param)

    def drop(self, name: str) -> Optional[nn.Parameter]:
        """Forget ``name``'s Parameter (returned, or None) and its flag; the adapter's row stays."""
        self.trainable.discard(name)
        return dict.pop(self, name, None)

    # -- the mapping, over every adapter of the layer

    def __getitem__(self, name: str) -> nn.Parameter:
        param = dict.get(self, name)
        if param is None:
            if name not in self.ranks:
                raise KeyError(name)
            # (a Parameter made inside inference_mode would be an inference tensor, unusable for training later)
            with torch.inference_mode(False):
                param = nn.Parameter(self.row(name), requires_grad=name in self.trainable)
            dict.__setitem__(self, name, param)
            self.trainable.discard(name)  # (the Parameter holds the flag from now on)
        return param

    def get(self, name, default=None):
        return self[name] if name in self.ranks else default

    def __setitem__(self, name: str, tensor) -> None:
        # Module.register_parameter, load_state_dict(assign=True) (the layer relinks afterwards) and whatever swaps
        # tensors in _parameters (FSDP2's shards, torch.func.functional_call) come here: the tensor is taken as is.
        if name not in self.ranks:
            raise KeyError(
                f"{name!r} is not an adapter of this layer: a λ Parameter is added with the layer's update_layer() "
                f"(or the model's add_adapter()), not assigned"
            )
        if not isinstance(tensor, Tensor):
            raise TypeError(f"the λ of adapter {name!r} must be a Tensor, got {type(tensor).__name__}")
        dict.__setitem__(self, name, tensor)
        self.trainable.discard(name)

    def __delitem__(self, name: str) -> None:
        raise TypeError(f"adapter {name!r}'s λ cannot be deleted alone: remove the adapter with delete_adapter()")

    def __contains__(self, name) -> bool:
        return name in self.ranks

    def __iter__(self):
        return iter(self.ranks)

    def __len__(self) -> int:
        return len(self.ranks)

    def keys(self):
        return self.ranks.keys()

    def items(self):
        return [(name, self[name]) for name in self.ranks]

    def values(self):
        return [self[name] for name in self.ranks]

    def copy(self) -> dict:
        return dict(self.items())

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self)} adapters, {dict.__len__(self)} Parameters created)"

    def __reduce__(self):
        # (deepcopy and pickle: the bank, the ranks and the created Parameters; the layer relinks on the other side)
        return (_rebuild, (self.bank, self.column, self.ranks, self.trainable, self.created()))


def _rebuild(bank, column, ranks, trainable, created) -> LambdaParameters:
    params = LambdaParameters(bank, column, ranks, trainable)
    params.adopt(created)
    return params


class LambdaStore(nn.ParameterDict):
    """PEFT's ``vera_lambda_d`` / ``vera_lambda_b`` ParameterDict (module docstring): {adapter: Parameter}. Entries
    come and go with the layer's adapters (``update_layer`` / ``delete_adapter``), not by assignment or ``del``."""

    def __init__(self, bank, column: str, ranks: dict[str, int]):
        super().__init__()
        self.__dict__["_parameters"] = LambdaParameters(bank, column, ranks)

    @property
    def lambdas(self) -> LambdaParameters:
        return self.__dict__["_parameters"]

    def row(self, name: str) -> Tensor:
        """Adapter ``name``'s λ as a plain view of its bank row (creates no Parameter)."""
        return self.lambdas.row(name)

    def live(self, name: str) -> Tensor:
        """Adapter ``name``'s λ as it is used: its Parameter if created (normally a view of the row too), else the
        row. For reading and writing its values without creating a Parameter."""
        param = dict.get(self.lambdas, name)
        return param if param is not None else self.lambdas.row(name)

    def numel_of(self, name: str) -> int:
        """The number of entries of adapter ``name``'s λ (its rank for λ_d, out_features for λ_b)."""
        lambdas = self.lambdas
        return lambdas.ranks[name] if lambdas.column == "d" else lambdas.bank.out_features

    def requires_grad_of(self, name: str) -> bool:
        param = dict.get(self.lambdas, name)
        return param.requires_grad if param is not None else name in self.lambdas.trainable

    def set_requires_grad(self, names: Iterable[str], requires_grad: bool) -> None:
        """``requires_grad_(requires_grad)`` on the λ of ``names`` (this layer's adapters), created or not."""
        lambdas = self.lambdas
        for name in names:
            param = dict.get(lambdas, name)
            if param is not None:
                param.requires_grad_(requires_grad)
            elif requires_grad:
                lambdas.trainable.add(name)
            else:
                lambdas.trainable.discard(name)

    def require_grad_only(self, names: Iterable[str]) -> None:
        """Exactly the λ of ``names`` require grad (PEFT's set_adapter), in O(names + created Parameters)."""
        lambdas = self.lambdas
        wanted = {n for n in names if n in lambdas.ranks}
        lambdas.trainable = {n for n in wanted if not dict.__contains__(lambdas, n)}
        for name, param in dict.items(lambdas):
            param.requires_grad_(name in wanted)

    def grad_state(self) -> tuple:
        """Every adapter's requires_grad, to hand back to :meth:`restore_grad_state` (created ones by name)."""
        lambdas = self.lambdas
        return set(lambdas.trainable), {name: p.requires_grad for name, p in dict.items(lambdas)}

    def restore_grad_state(self, state: tuple) -> None:
        trainable, flags = state
        lambdas = self.lambdas
        lambdas.trainable = {n for n in trainable if n in lambdas.ranks and not dict.__contains__(lambdas, n)}
        for name, param in dict.items(lambdas):  # (one created since then had its flag in the set)
            param.requires_grad_(flags.get(name, name in trainable))

    def forget(self, name: str) -> None:
        """Drop ``name``'s Parameter, giving it its own copy of its values first: an optimizer still holding it
        cannot write into the adapter that reuses the row."""
        param = self.lambdas.drop(name)
        if param is not None:
            param.data = param.data.clone()

    # -- ParameterDict's mapping, over every adapter (reads create Parameters; rows are read with row())

    def __getitem__(self, key: str) -> nn.Parameter:
        return self.lambdas[key]

    def __setitem__(self, key: str, value) -> None:
        """``store[name] = p`` (a Parameter, or a tensor made one): ``p`` becomes adapter ``name``'s λ. Its values go
        into the row and it becomes a view of it, if it has the tables' dtype and device (else it stays its own, and
        the tables keep the old values: the mixed batches that read them are stale)."""
        if key not in self.lambdas:
            self.lambdas[key] = value  # (KeyError, naming the way to add an adapter)
        if isinstance(value, Tensor) and not isinstance(value, nn.Parameter):
            value = nn.Parameter(value)
        if not isinstance(value, nn.Parameter):
            raise TypeError(f"the λ of adapter {key!r} must be an nn.Parameter, got {type(value).__name__}")
        row = self.row(key)
        if value.shape != row.shape:
            raise ValueError(
                f"the λ_{self.lambdas.column} of adapter {key!r} must have shape {tuple(row.shape)}, got "
                f"{tuple(value.shape)}"
            )
        if value.dtype == row.dtype and value.device == row.device and value.data_ptr() != row.data_ptr():
            with torch.no_grad():
                row.copy_(value.detach())
            value.data = row
        self.lambdas[key] = value

    def __delitem__(self, key: str) -> None:
        del self.lambdas[key]

    def __contains__(self, key) -> bool:
        return key in self.lambdas

    def __iter__(self):
        return iter(self.lambdas)

    def __reversed__(self):
        return reversed(list(self.lambdas))

    def __len__(self) -> int:
        return len(self.lambdas)

    def keys(self):
        return self.lambdas.keys()

    def items(self):
        return self.lambdas.items()

    def values(self):
        return self.lambdas.values()

    def get(self, key: str, default=None):
        return self.lambdas.get(key, default)

    def copy(self) -> nn.ParameterDict:
        return nn.ParameterDict(self.lambdas.copy())

    def _refuse(self, *args, **kwargs):
        raise TypeError(
            "vera_lambda_d / vera_lambda_b follow the layer's adapters: add them with update_layer() or the "
            "model's add_adapter(), remove them with delete_adapter()"
        )

    pop = popitem = clear = setdefault = update = fromkeys = __ior__ = _refuse

    def extra_repr(self) -> str:
        # (ParameterDict's lines, from the rows: printing a model creates no Parameters)
        lines = []
        for name in self.lambdas:
            row = self.row(name)
            size = "x".join(str(s) for s in row.shape)
            device = f" ({row.device})" if row.device.type != "cpu" else ""
            lines.append(f"  ({name}): Parameter containing: [{torch.typename(row)} of size {size}{device}]")
        return "\n".join(lines)

    # -- Module machinery that would otherwise create every Parameter

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if keep_vars:  # (the Parameters themselves are asked for)
            return super()._save_to_state_dict(destination, prefix, keep_vars)
        lambdas = self.lambdas
        for name in lambdas.ranks:
            param = dict.get(lambdas, name)
            destination[prefix + name] = (param if param is not None else lambdas.row(name)).detach()
        return None

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args):
        # A plain load copies into each adapter's λ as it is used (its Parameter, or its row): PyTorch's own loader
        # runs over those tensors, so keys, shapes and messages are its own. Assigning or swapping tensors wants
        # the Parameters themselves, created for it.
        if (
            local_metadata.get("assign_to_params_buffers", False)
            or torch.__future__.get_swap_module_params_on_conversion()
        ):
            return super()._load_from_state_dict(state_dict, prefix, local_metadata, *args)
        lambdas = self.lambdas
        self.__dict__["_parameters"] = {name: self.live(name) for name in lambdas.ranks}
        try:
            return super()._load_from_state_dict(state_dict, prefix, local_metadata, *args)
        finally:
            self.__dict__["_parameters"] = lambdas

    def _apply(self, fn, recurse=True):
        # Only the Parameters that exist are converted here; the layer converts the bank's tables, and with them
        # every row (VeraLinear._apply).
        lambdas = self.lambdas
        created = lambdas.created()
        self.__dict__["_parameters"] = created
        try:
            super()._apply(fn, recurse)
        finally:
            self.__dict__["_parameters"] = lambdas
        lambdas.adopt(created)
        return self


def named_parameters_besides_lambdas(module: nn.Module):
    """``module.named_parameters()`` without the λ stores' Parameters (which it would create: module docstring);
    the λ are read through the stores (``requires_grad_of``, ``row``) instead."""
    seen = set()
    for prefix, sub in module.named_modules():
        if isinstance(sub, LambdaStore):
            continue
        for name, param in sub._parameters.items():
            if param is not None and id(param) not in seen:
                seen.add(id(param))
                yield (f"{prefix}.{name}" if prefix else name), param
