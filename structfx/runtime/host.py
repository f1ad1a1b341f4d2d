"""What this CPU can run: read by the compiler (to pick a target) and the runtime (to check one)."""

from __future__ import annotations

#: Base x86 features whose absence must be told to LLVM: a CPU name alone (e.g. "znver4" on a virtual
#: machine that hides AVX-512) lets it emit instructions the host cannot run.
X86_FEATURES = ("avx512f", "avx2", "fma", "avx")


def cpu_flags() -> set[str]:
    """The CPU flags the OS reports (Linux), or the X86_FEATURES where it reports none."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set(X86_FEATURES)
