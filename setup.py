"""Package discovery (everything else is in pyproject.toml): structfx's packages, and benchmarks/ installed
as ``structfx.benchmarks`` so that ``structfx bench`` finds its scripts in any install, not only editable."""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["structfx*"]), "structfx.benchmarks"],
    package_dir={"structfx.benchmarks": "benchmarks"},
)
