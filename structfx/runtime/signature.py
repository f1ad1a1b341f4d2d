"""A compiled model's inputs and outputs, and the checks every call makes before any kernel runs.

Torch-free: shared by the compiler's CompiledModel and the deployable runtime.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from structfx.errors import StructfxError


@dataclass(frozen=True)
class TensorSpec:
    """One input or output: name, shape (None for the symbolic batch), dtype name."""

    name: str
    shape: tuple[int | None, ...]
    dtype: str

    def describe(self) -> str:
        dims = ", ".join("batch" if d is None else str(d) for d in self.shape)
        return f"{self.name}: ({dims}) {self.dtype}"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TensorSpec:
        return cls(data["name"], tuple(data["shape"]), data["dtype"])


def check_inputs(specs: list[TensorSpec], values: list[tuple[tuple[int, ...], str] | None]) -> None:
    """Each value as (shape, dtype name), or None for something that is not an array at all."""
    expected = "; ".join(s.describe() for s in specs)
    if len(values) != len(specs):
        raise StructfxError(f"expected {len(specs)} input(s) ({expected}), got {len(values)}")
    for value, spec in zip(values, specs):
        if value is None:
            raise StructfxError(f"{spec.name} must be an array ({spec.describe()})")
        shape, dtype = value
        fits = len(shape) == len(spec.shape) and all(
            want is None or got == want for got, want in zip(shape, spec.shape)
        )
        if dtype != spec.dtype or not fits:
            raise StructfxError(
                f"{spec.name} got ({', '.join(map(str, shape))}) {dtype}, expected {spec.describe()}"
            )


def padded_rows(rows: int, multiple: int | None) -> int:
    """The batch a symbolic-batch build runs at: ``rows`` rounded up to ``multiple``."""
    if multiple is None or rows == 0:
        return rows
    return -(-rows // multiple) * multiple
