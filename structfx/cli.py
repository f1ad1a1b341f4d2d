"""The ``structfx`` command: user errors exit with code 2 and one line, never a traceback."""

from __future__ import annotations

import functools
import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Annotated

import typer

from structfx import registry
from structfx.errors import StructfxError

app = typer.Typer(help="Structured replacements for PyTorch layers, compiled with TVM.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
TARGETS = "'llvm' (this CPU), 'cuda' (this machine's GPU) or 'cuda -arch=sm_90' (any machine)"
RULES = ("NAME[:FIELD=VALUE...] by commas, e.g. 'btt:rank=1,maxplus:k=2'; NAME one of "
         + ", ".join(spec.name for spec in registry.specs()))


def user_errors(command):
    """Turn a StructfxError into one line on stderr and exit code 2."""

    @functools.wraps(command)
    def run(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except StructfxError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from None

    return run


@app.callback()
def main() -> None:
    """structfx: swap dense layers, activations and pools for structured ones; compile; deploy."""


@app.command()
@user_errors
def demo(
    out: Annotated[Path, typer.Option(help="where the plot and the compiled artifact go")] = Path("out"),
    epochs: Annotated[int, typer.Option(min=1, help="training epochs per model")] = 30,
) -> None:
    """Train digits classifiers with dense and structured layers, compress one, compile and deploy it."""
    missing = [name for name in ("sklearn", "matplotlib") if importlib.util.find_spec(name) is None]
    if missing:
        raise StructfxError(f"structfx demo needs {' and '.join(missing)}: pip install 'structfx[demo]'")
    from structfx import demo as job

    job.run(out, epochs=epochs)


def load_builder(spec: str):
    """``path/to/module.py:build`` -> what ``build()`` returns: (model, example_inputs)."""
    path, sep, name = spec.rpartition(":")
    if not sep or not path.endswith(".py"):
        raise StructfxError(f"{spec!r} is not MODULE.py:FUNCTION, e.g. examples/models.py:build")
    if not Path(path).is_file():
        raise StructfxError(f"{path} does not exist")
    module_spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:  # the user's code: any failure is reported as theirs, cause chained
        raise StructfxError(f"importing {path} failed: {type(e).__name__}: {e}") from e
    build = getattr(module, name, None)
    if not callable(build):
        raise StructfxError(f"{path} has no function {name!r}")
    try:
        built = build()
    except Exception as e:  # as above
        raise StructfxError(f"the builder {spec} raised {type(e).__name__}: {e}") from e
    if not (isinstance(built, tuple) and len(built) == 2):
        raise StructfxError(f"{spec} must return (model, example_inputs), got {type(built).__name__}")
    return built


@app.command("compile")
@user_errors
def compile_command(
    builder: Annotated[str, typer.Argument(help="MODULE.py:FUNCTION returning (model, example_inputs)")],
    out: Annotated[Path, typer.Option(help="artifact directory to write")],
    rules: Annotated[str, typer.Option(help=f"{RULES}; '' compiles the model as it is")] = "",
    target: Annotated[str, typer.Option(help=TARGETS)] = "llvm",
    database: Annotated[Path | None, typer.Option(help="a tuning database from 'structfx tune'")] = None,
    overwrite: Annotated[bool, typer.Option(help="replace an existing artifact directory")] = False,
) -> None:
    """Transform (optional), compile and save a model as a deployable artifact."""
    import structfx as sfx
    from structfx.passes.rules.spec import parse_rules

    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise StructfxError(f"{out} exists and is not empty; choose another --out or pass --overwrite")
    if database is not None and not database.is_dir():
        raise StructfxError(f"--database {database} does not exist; make one with 'structfx tune'")
    parsed = parse_rules(rules) if rules else None
    model, example = load_builder(builder)
    if parsed:
        model = sfx.transform(model, parsed, example_inputs=example)
        typer.echo(sfx.report(model).to_markdown())
    compiled = sfx.compile(model, example, target=target, database=database)
    typer.echo(f"saved {compiled.save(out, overwrite=overwrite)}")


@app.command()
@user_errors
def tune(
    builder: Annotated[str, typer.Argument(help="MODULE.py:FUNCTION returning (model, example_inputs)")],
    database: Annotated[Path, typer.Option(help="tuning database directory (made, or continued)")],
    trials: Annotated[int, typer.Option(min=1, help="measurements per kernel, the hand schedule's included")] = 64,
    target: Annotated[str, typer.Option(help=TARGETS)] = "llvm",
    rules: Annotated[str, typer.Option(help=f"transform first: {RULES}")] = "",
    rpc: Annotated[str | None, typer.Option(help="TVM RPC tracker HOST:PORT to measure on")] = None,
    key: Annotated[str | None, typer.Option(help="the RPC servers' key at the tracker")] = None,
) -> None:
    """Tune the model's kernels with MetaSchedule; run it again to continue, Ctrl-C keeps what was measured."""
    import structfx as sfx
    from structfx.passes.rules.spec import parse_rules

    parsed = parse_rules(rules) if rules else None
    model, example = load_builder(builder)
    if parsed:
        model = sfx.transform(model, parsed, example_inputs=example)
    try:
        sfx.tune(model, example, target=target, trials=trials, database=database, rpc=rpc, key=key)
    except KeyboardInterrupt:
        typer.echo(f"interrupted: every finished measurement is kept in {database}; run again to continue", err=True)
        raise typer.Exit(130) from None
    typer.echo(f"tuned: compile with --database {database}")


@app.command()
@user_errors
def inspect(directory: Annotated[Path, typer.Argument(help="an artifact directory")]) -> None:
    """Show an artifact's manifest: versions, target, signature, kernels, files and sizes."""
    from structfx.runtime.artifact import read_verified_manifest
    from structfx.runtime.signature import Mutations, TensorSpec

    manifest = read_verified_manifest(directory)
    target = manifest["target"]
    typer.echo(f"format {manifest['format_version']}, structfx {manifest['structfx_version']}, "
               f"tvm {manifest['tvm_version']}")
    typer.echo("target: " + json.dumps({k: v for k, v in target.items() if k not in ("tag", "keys")}))
    for kind in ("inputs", "outputs"):
        for spec in manifest[kind]:
            typer.echo(f"{kind[:-1]}: {TensorSpec.from_dict(spec).describe()}")
    mutations = Mutations.from_dict(manifest["mutations"])
    for index, _ in mutations.inputs:
        typer.echo(f"writes: input {manifest['inputs'][index]['name']} in place (its new value after each call)")
    for name, _ in mutations.state:
        typer.echo(f"state: {name} (updated by every call, from its value when saved)")
    typer.echo(f"kernels: {', '.join(manifest['kernels']) or '(TVM defaults only)'}")
    for name in manifest["files"]:
        typer.echo(f"file: {name} {Path(directory, name).stat().st_size:,} bytes (sha256 ok)")


@app.command()
@user_errors
def run(
    directory: Annotated[Path, typer.Argument(help="an artifact directory")],
    input: Annotated[list[Path], typer.Option(help="a .npy file per model input, in order")],
    output: Annotated[Path | None, typer.Option(help="where to save the (first) output as .npy")] = None,
) -> None:
    """Run an artifact on .npy inputs with the TVM runtime alone."""
    import numpy as np

    from structfx.runtime import load

    arrays = []
    for path in input:
        if not path.is_file():
            raise StructfxError(f"input {path} does not exist")
        arrays.append(np.load(path, allow_pickle=False))
    result = load(directory)(*arrays)
    outputs = result if isinstance(result, tuple) else (result,)
    for i, value in enumerate(outputs):
        typer.echo(f"output{i}: shape {tuple(value.shape)} {value.dtype}, mean {float(value.mean()):.6g}")
    if output is not None:
        np.save(output, outputs[0])
        typer.echo(f"saved {output}")


@app.command()
@user_errors
def bench(
    name: Annotated[str, typer.Argument(help="which benchmark: layers or compile")] = "layers",
    extra: Annotated[list[str] | None, typer.Argument(help="arguments passed on to the script")] = None,
) -> None:
    """Run one of benchmarks/ and print its tables (results for this machine: benchmarks/README.md)."""
    folder = benchmarks_folder()
    script = folder / f"bench_{name}.py"
    if not script.is_file():
        available = sorted(p.stem.removeprefix("bench_") for p in folder.glob("bench_*.py"))
        raise StructfxError(f"no benchmark {name!r} in {folder}; available: {', '.join(available) or 'none'}")
    code = subprocess.run([sys.executable, str(script), *(extra or [])]).returncode
    if code:
        raise typer.Exit(code)


def benchmarks_folder() -> Path:
    """benchmarks/, installed as the package structfx.benchmarks (setup.py); in a source checkout run
    from PYTHONPATH, the repository's own."""
    spec = importlib.util.find_spec("structfx.benchmarks")
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return Path(__file__).resolve().parent.parent / "benchmarks"
