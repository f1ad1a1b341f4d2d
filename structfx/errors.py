"""The one error type users catch: every message says what was wrong and how to fix it."""


class StructfxError(Exception):
    """A user-facing error raised by structfx (bad input, bad configuration, bad artifact)."""


def module_place(path: str, type_name: str) -> str:
    """How a message names a module of the user's model: its path as ``model.get_submodule`` takes it,
    quoted, and its class, e.g. ``module 'features.0' (Linear)``; ``the model itself (Sequential)`` for
    the model (``path`` ""). A bare path reads badly for children of ``nn.Sequential`` ("in 0")."""
    return f"module '{path}' ({type_name})" if path else f"the model itself ({type_name})"


def require_module(model: object, entry: str) -> None:
    """Raise StructfxError unless ``model`` is an ``nn.Module``: ``entry`` (e.g. "compile") is the public
    function that was given it."""
    from torch import nn

    if not isinstance(model, nn.Module):
        raise StructfxError(
            f"{entry} takes an nn.Module, got {type(model).__name__}: wrap the function in a module's forward"
        )


def require_path(path: object, what: str) -> None:
    """Raise StructfxError unless ``path`` is a str or an ``os.PathLike``; ``what`` names the argument."""
    import os

    if not isinstance(path, (str, os.PathLike)):
        raise StructfxError(f"{what} must be a directory path (str or pathlib.Path), got {type(path).__name__}")
