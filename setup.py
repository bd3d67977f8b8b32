"""Builds the cffi ring binding (API mode) at `pip install`; metadata lives in pyproject.toml."""

from setuptools import setup

setup(cffi_modules=["tcmu_py/_ffi_build.py:ffibuilder"])
