"""A compiled model's inputs and outputs, and the checks every call makes before any kernel runs.

Torch-free: the one statement of the calling protocol, shared by the compiler's CompiledModel and the
deployable runtime. A symbolic dim (the batch, a sequence length) is named in the shape; every input
dim with the same name must have the same size, within that name's bounds. The compiled function takes
the inputs as they are: no padding, no extra arguments (the Relax VM reads each symbolic size from the
input dim that is that symbol alone).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from structfx.errors import StructfxError

Dim = int | str  # a static size, or the name of a symbolic one ("batch", "sequence")


@dataclass(frozen=True)
class TensorSpec:
    """One input or output: name, shape (ints, names of symbolic dims, or text of an expression of
    them for outputs), dtype name, each symbolic dim's (lower, upper or None) bounds, and for an integer
    input that indexes a table (an embedding's token ids) the (low, high) its values lie in, high
    excluded."""

    name: str
    shape: tuple[Dim, ...]
    dtype: str
    bounds: dict[str, tuple[int, int | None]] = field(default_factory=dict)
    values: tuple[int, int] | None = None

    def describe(self) -> str:
        return f"{self.name}: ({', '.join(map(str, self.shape))}) {self.dtype}"

    def to_dict(self) -> dict:
        data = {"name": self.name, "shape": list(self.shape), "dtype": self.dtype,
                "bounds": {k: list(v) for k, v in self.bounds.items()}}
        return data if self.values is None else {**data, "values": list(self.values)}

    @classmethod
    def from_dict(cls, data: dict) -> TensorSpec:
        bounds = {k: (v[0], v[1]) for k, v in data.get("bounds", {}).items()}
        values = tuple(data["values"]) if data.get("values") is not None else None
        return cls(data["name"], tuple(data["shape"]), data["dtype"], bounds, values)


def check_inputs(specs: list[TensorSpec], values: list[tuple[tuple[int, ...], str] | str], takes: str) -> None:
    """Each value as (shape, dtype name), or the type name of something the caller does not take;
    ``takes`` says what the caller takes ("a torch tensor"). Raises StructfxError naming the input, what
    it got and what is expected. Runs on every call: the messages are only built for a failure."""
    if len(values) != len(specs):
        expected = "; ".join(s.describe() for s in specs)
        raise StructfxError(f"expected {len(specs)} input(s) ({expected}), got {len(values)}")
    sizes: dict[str, tuple[int, str]] = {}
    for value, spec in zip(values, specs):
        if isinstance(value, str):
            raise StructfxError(f"{spec.name} is a {value}: pass {takes} ({spec.describe()})")
        shape, dtype = value
        if dtype != spec.dtype or len(shape) != len(spec.shape) or any(
            isinstance(want, int) and size != want for size, want in zip(shape, spec.shape)
        ):
            raise StructfxError(_got(spec, shape, dtype))
        if not spec.bounds:
            continue
        for size, want in zip(shape, spec.shape):
            if not isinstance(want, str) or want not in spec.bounds:
                continue
            lower, upper = spec.bounds[want]
            if size < lower or (upper is not None and size > upper):
                top = "" if upper is None else f" to {upper}"
                raise StructfxError(f"{_got(spec, shape, dtype)}: {want} must be from {lower}{top}")
            if want in sizes and sizes[want][0] != size:
                raise StructfxError(
                    f"{_got(spec, shape, dtype)}: {want} is {sizes[want][0]} in {sizes[want][1]}; they must match"
                )
            sizes[want] = (size, spec.name)


def check_values(specs: list[TensorSpec], arrays: list) -> None:
    """Raises StructfxError for an index input (``spec.values`` set) holding a value outside its table,
    as torch's ``IndexError: index out of range in self``: the compiled gather would read another row.
    ``arrays``: the inputs as numpy arrays or torch tensors (anything with ``min()`` and ``max()``)."""
    for spec, array in zip(specs, arrays):
        if spec.values is None or array is None or (array.numel() if hasattr(array, "numel") else array.size) == 0:
            continue
        low, high = spec.values
        smallest, largest = int(array.min()), int(array.max())
        if smallest < low or largest >= high:
            bad = smallest if smallest < low else largest
            raise StructfxError(
                f"{spec.name} holds {bad}, outside the tensor it indexes (torch takes values from {low} to "
                f"{high - 1} there: an embedding's rows, or a dim of {high}); pass indices within it"
            )


def _got(spec: TensorSpec, shape: tuple[int, ...], dtype: str) -> str:
    return f"{spec.name} got ({', '.join(map(str, shape))}) {dtype}, expected {spec.describe()}"


def type_name(value: object) -> str:
    """``value``'s type as an error message names it: ``list``, ``numpy.ndarray``."""
    kind = type(value)
    return kind.__name__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"


@dataclass(frozen=True)
class Mutations:
    """What a compiled forward updates in place, as extra outputs of the compiled function (torch.export's
    functionalised form: the new value of everything the forward wrote).

    ``inputs``: (user input index, output position) for each input the forward writes (``x.add_(1)``,
    ``x[0] = v``, an in-place op on a view of ``x``): the caller writes that output into the input after the
    call. ``state``: (buffer or parameter name, output position) for each one the forward updates; the
    compiled function takes their current values as inputs right after the user inputs, in this order, and
    the caller keeps the new values for the next call. The other outputs are the forward's own, in order."""

    inputs: tuple[tuple[int, int], ...] = ()
    state: tuple[tuple[str, int], ...] = ()

    def user_outputs(self, leaves: list) -> list:
        """``leaves`` (everything the compiled function returned) without the updates."""
        updates = {position for _, position in (*self.inputs, *self.state)}
        return [leaf for position, leaf in enumerate(leaves) if position not in updates]

    def to_dict(self) -> dict:
        return {"inputs": [list(pair) for pair in self.inputs], "state": [list(pair) for pair in self.state]}

    @classmethod
    def from_dict(cls, data: dict) -> Mutations:
        return cls(tuple((int(i), int(p)) for i, p in data["inputs"]),
                   tuple((str(n), int(p)) for n, p in data["state"]))


def check_written_alone(specs: list[TensorSpec], mutations: Mutations, inputs: list, shares) -> None:
    """Raises StructfxError where an input the compiled forward writes shares memory with another input:
    eager PyTorch lets the other see the write (``model(x, x)``, overlapping views of one tensor), the
    compiled function computes every output from the values on entry. ``shares(a, b)``: whether two of
    ``inputs`` have an element in common (views of one tensor that do not overlap are taken)."""
    for index, _ in mutations.inputs:
        for other, value in enumerate(inputs):
            if other != index and shares(inputs[index], value):
                raise StructfxError(
                    f"{specs[index].name} and {specs[other].name} share memory, and the model's forward writes "
                    f"{specs[index].name} in place: eager PyTorch would let {specs[other].name} see that write, "
                    f"the compiled model computes from the values on entry; pass separate tensors (e.g. "
                    f"{specs[other].name}.clone())"
                )
