"""The files a deployment machine needs to run an artifact, gathered into one folder for ``sys.path``.

A machine that only runs artifacts needs TVM's runtime (``libtvm_runtime.so``, 3.4 MB, plus 0.45 MB for
CUDA), not its compiler (``libtvm_compiler.so``, 260 MB), which the apache-tvm wheel always carries. The
folder holds the tvm Python package without the compiler library and the packages only the compiler
imports, the apache-tvm-ffi package it stands on, and structfx's runtime. Without the compiler library,
``import tvm`` falls back to runtime-only mode by itself (as ``TVM_USE_RUNTIME_LIB=1`` asks for).
numpy, safetensors and typing_extensions come from the deployment machine's own installs (small wheels).

Torch-free: ``python -m structfx.runtime.bundle DEST`` works on a machine with the full wheel installed.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import shutil
import sys
from pathlib import Path

#: What ``import tvm`` never loads with the runtime alone (checked: tests/runtime/test_runtime_only.py).
TVM_COMPILER_ONLY = (
    "lib/libtvm_compiler.so", "relax", "s_tir", "topi", "contrib", "exec", "testing", "3rdparty", "include",
    "src", "web", "cmake", "lib64",
)
#: apache-tvm-ffi's headers, sources and build helpers (for compiling extensions, not for running them).
TVM_FFI_BUILD_ONLY = ("3rdparty", "include", "src", "cython", "stub", "share", "CMakeLists.txt")
STRUCTFX_RUNTIME = ("__init__.py", "errors.py", "runtime")


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {name} is not installed in this Python ({sys.executable})")
    return Path(next(iter(spec.submodule_search_locations)))


def _copy(source: Path, dest: Path, leave_out: tuple[str, ...] = ()) -> None:
    left_out = {source / p for p in leave_out}

    def ignore(directory: str, names: list[str]) -> list[str]:
        return [n for n in names if n == "__pycache__" or Path(directory, n) in left_out]

    shutil.copytree(source, dest, ignore=ignore)


def write_runtime_bundle(dest: str | Path) -> dict[str, int]:
    """Copy tvm (runtime only), tvm_ffi and structfx's runtime into ``dest/`` (which must not exist).
    Returns the bytes of each top-level package, for the README's table. Raises FileNotFoundError when
    tvm or tvm_ffi is not installed, FileExistsError when ``dest`` exists."""
    root = Path(dest)
    root.mkdir(parents=True)
    _copy(_package_dir("tvm"), root / "tvm", TVM_COMPILER_ONLY)
    _copy(_package_dir("tvm_ffi"), root / "tvm_ffi", TVM_FFI_BUILD_ONLY)
    # tvm_ffi finds its own library through its distribution's RECORD: without this one beside it, an
    # apache-tvm-ffi installed elsewhere on the machine would be loaded under the bundle's package
    record = next(f for f in importlib.metadata.distribution("apache-tvm-ffi").files if f.name == "RECORD")
    dist_info = Path(record.locate()).parent
    _copy(dist_info, root / dist_info.name)
    structfx = Path(__file__).resolve().parent.parent
    (root / "structfx").mkdir()
    for name in STRUCTFX_RUNTIME:
        if (structfx / name).is_dir():
            _copy(structfx / name, root / "structfx" / name)
        else:
            shutil.copy2(structfx / name, root / "structfx" / name)
    return {p.name: sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) for p in sorted(root.iterdir())}


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        raise SystemExit("usage: python -m structfx.runtime.bundle DEST  (DEST must not exist)")
    sizes = write_runtime_bundle(args[0])
    for name, size in sizes.items():
        print(f"{name}: {size / 2**20:.1f} MiB")
    print(f"total: {sum(sizes.values()) / 2**20:.1f} MiB in {args[0]}: put it on PYTHONPATH")


if __name__ == "__main__":
    main()
