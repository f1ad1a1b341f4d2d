"""``python -m structfx``: the same command as ``structfx``."""

from structfx.cli import app

app(prog_name="structfx")
