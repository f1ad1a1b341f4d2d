"""One file per structured op: its TE compute, its Relax converter and its schedule rules, each named in the
op's registration (``structfx.ops``)."""
