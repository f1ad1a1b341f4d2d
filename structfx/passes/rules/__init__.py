"""The rules of ``structfx.transform``: one frozen dataclass per file with its builder and its cost, each
tied to its op by the op's registration (``structfx.ops``)."""
