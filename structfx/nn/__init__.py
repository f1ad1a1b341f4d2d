"""The structured layers: plain trainable modules, each backed by one ``torch.ops.structfx`` custom op.

Every registered op's layers (``structfx.ops``) are attributes here, imported on first use.
"""

from structfx.nn.inplace import InPlace
from structfx.registry import export, public_names

__all__ = ["InPlace", *public_names("layers")]


def __getattr__(name: str):
    return export(__name__, name, "layers")


def __dir__() -> list[str]:
    return sorted(__all__)
