"""The shared frozen VeRA projection: A (R, I_max) and B (O_max, R), one pair for every layer and adapter."""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

__all__ = ["VeraProjection", "generate_projection"]


def _kaiming_uniform_(tensor: Tensor, generator: torch.Generator) -> Tensor:
    # Kaiming-uniform, gain sqrt(2), fan_in = size(1). The bound is computed in the same floating-point steps as
    # PEFT's, so the draws are bit-identical to PEFT's for the same key.
    fan_in = tensor.shape[1]
    std = math.sqrt(2) / math.sqrt(fan_in)
    bound = math.sqrt(3.0) * std
    with torch.no_grad():
        return tensor.uniform_(-bound, bound, generator=generator)


def generate_projection(r: int, max_in_features: int, max_out_features: int, prng_key: int = 0):
    """A ``(r, max_in_features)`` and B ``(max_out_features, r)`` drawn exactly as PEFT's VeRA draws them: one CPU
    ``torch.Generator`` seeded with ``prng_key``, A first, then B, kaiming-uniform (bound ``sqrt(6 / fan_in)``)."""
    for name, value in (("r", r), ("max_in_features", max_in_features), ("max_out_features", max_out_features)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    generator = torch.Generator(device="cpu").manual_seed(prng_key)
    vera_A = _kaiming_uniform_(torch.empty(r, max_in_features), generator)
    vera_B = _kaiming_uniform_(torch.empty(max_out_features, r), generator)
    return vera_A, vera_B


def _capturing(device: torch.device) -> bool:
    """Whether a CUDA graph is being captured on ``device``'s current stream. A cast made then lives in the graph's
    private memory pool, which later replays overwrite: it is used for that call but never cached. (Checked only on
    a cache miss, so the forward of a captured model, warmed up first as graphs require, never pays for it.)"""
    return torch.device(device).type == "cuda" and torch.cuda.is_current_stream_capturing()


class VeraProjection(nn.Module):
    """Holds the shared buffers ``vera_A`` (R, I_max) and ``vera_B`` (O_max, R).

    Share one instance between every :class:`~vera_ext.VeraLinear` of a model: each layer reads the slices
    ``vera_A[:r, :in_features]`` and ``vera_B[:out_features, :r]`` as views. Casts to a compute dtype/device are
    made once and cached (refreshed when the buffers change), never on every forward.
    """

    def __init__(
        self,
        vera_A: Tensor,
        vera_B: Tensor,
        persistent: bool = True,
        prng_key: Optional[int] = None,
        round_through: Sequence[torch.dtype] = (),
    ):
        super().__init__()
        if vera_A.dim() != 2 or vera_B.dim() != 2:
            raise ValueError(
                f"vera_A must be (r, max_in_features) and vera_B (max_out_features, r); got shapes "
                f"{tuple(vera_A.shape)} and {tuple(vera_B.shape)}"
            )
        if vera_A.shape[0] != vera_B.shape[1]:
            raise ValueError(
                f"vera_A has {vera_A.shape[0]} rows but vera_B has {vera_B.shape[1]} columns; both must equal r"
            )
        if not (vera_A.is_floating_point() and vera_B.is_floating_point()):
            raise ValueError(f"vera_A and vera_B must be floating point, got {vera_A.dtype} and {vera_B.dtype}")
        self.register_buffer("vera_A", vera_A.detach(), persistent=persistent)
        self.register_buffer("vera_B", vera_B.detach(), persistent=persistent)
        self.prng_key = prng_key
        # dtypes the fresh fp32 draw passed through before it was stored (PEFT's low-precision quirk), replayed by
        # regenerate_() so a regenerated pair is bit-identical to the one built eagerly.
        self.round_through = tuple(round_through)
        self._cache: dict = {}
        self._stamp = None

    @classmethod
    def from_key(cls, r: int, max_in_features: int, max_out_features: int, prng_key: int = 0, persistent=True):
        """Generate the pair from a PRNG key, bit-identical to PEFT (see :func:`generate_projection`)."""
        vera_A, vera_B = generate_projection(r, max_in_features, max_out_features, prng_key)
        return cls(vera_A, vera_B, persistent=persistent, prng_key=prng_key)

    def regenerate_(self) -> "VeraProjection":
        """Overwrite ``vera_A``/``vera_B`` in place (keeping their dtype and device) with the pair drawn from
        ``prng_key``, as at construction: after ``to_empty()`` of a model built on the meta device the buffers
        hold garbage, and this restores them bit-identically. Returns ``self``.

        ValueError when the projection was built from given tensors (``prng_key`` is None; load A/B from the
        checkpoint that holds them instead) or when the buffers are still on the meta device (``to_empty`` first).
        """
        if self.prng_key is None:
            raise ValueError(
                "this VeraProjection was built from given tensors, not from a PRNG key, so it cannot be regenerated; "
                "load vera_A/vera_B from the checkpoint that holds them"
            )
        if self.vera_A.is_meta or self.vera_B.is_meta:
            raise ValueError(
                "vera_A/vera_B are on the meta device; allocate them first (module.to_empty(device=...)), then "
                "regenerate"
            )
        A, B = generate_projection(self.r, self.max_in_features, self.max_out_features, self.prng_key)
        for dtype in self.round_through:
            A, B = A.to(dtype), B.to(dtype)
        with torch.no_grad():
            self.vera_A.copy_(A)
            self.vera_B.copy_(B)
        return self

    @property
    def r(self) -> int:
        return self.vera_A.shape[0]

    @property
    def max_in_features(self) -> int:
        return self.vera_A.shape[1]

    @property
    def max_out_features(self) -> int:
        return self.vera_B.shape[0]

    def check_fits(self, r: int, in_features: int, out_features: int) -> None:
        """ValueError unless a layer of this shape and rank can slice this projection."""
        for what, need, have in (
            ("r", r, self.r),
            ("in_features", in_features, self.max_in_features),
            ("out_features", out_features, self.max_out_features),
        ):
            if need > have:
                raise ValueError(
                    f"{what}={need} does not fit the shared VeRA projection (vera_A {tuple(self.vera_A.shape)}, "
                    f"vera_B {tuple(self.vera_B.shape)}): it allows {what} <= {have}"
                )

    def _valid_cache(self) -> dict:
        """The cache of casts and slices, emptied whenever the buffers are replaced or modified in place."""
        A, B = self._buffers["vera_A"], self._buffers["vera_B"]  # (attribute access costs ~1 us per decode call)
        stamp = (A.data_ptr(), A._version, B.data_ptr(), B._version)
        if stamp != self._stamp:
            self._cache.clear()
            self._stamp = stamp
        return self._cache

    def cast(self, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
        """(A, B) in ``dtype`` on ``device``, cast once and cached (not while a CUDA graph is being captured: see
        ``_capturing``)."""
        A, B = self.vera_A, self.vera_B
        if A.dtype == dtype and A.device == device and B.dtype == dtype and B.device == device:
            return A, B
        if torch.compiler.is_compiling():
            return A.to(device, dtype), B.to(device, dtype)
        cache = self._valid_cache()
        key = (dtype, device)
        hit = cache.get(key)
        if hit is None:
            hit = (A.to(device, dtype), B.to(device, dtype))
            if not _capturing(device):
                cache[key] = hit
        return hit

    def sliced(self, r: int, in_features: int, out_features: int, dtype: torch.dtype, device: torch.device):
        """The layer's views ``A[:r, :in_features]`` and ``B[:out_features, :r]`` (no copies), cached: the
        forward of a layer costs no cast and no slicing."""
        if torch.compiler.is_compiling():
            A, B = self.cast(dtype, device)
            return A[:r, :in_features], B[:out_features, :r]
        cache = self._valid_cache()
        key = (r, in_features, out_features, dtype, device)
        hit = cache.get(key)
        if hit is None:
            A, B = self.cast(dtype, device)
            hit = (A[:r, :in_features], B[:out_features, :r])
            if not _capturing(device):
                cache[key] = hit
        return hit

    def cached_tensors(self) -> list[Tensor]:
        """The cached casts and slices (frozen data shared by every layer, not activations)."""
        return [t for entry in self._cache.values() for t in entry]

    def _apply(self, fn, recurse=True):
        self._cache.clear()
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return f"r={self.r}, max_in_features={self.max_in_features}, max_out_features={self.max_out_features}"
