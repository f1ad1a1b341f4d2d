"""The one error type users catch: every message says what was wrong and how to fix it."""


class StructfxError(Exception):
    """A user-facing error raised by structfx (bad input, bad configuration, bad artifact)."""
