"""Builds the cffi ring binding (API mode) during `pip install`; metadata lives in pyproject.toml."""

from setuptools import setup

setup(cffi_modules=["tcmu_py/_ffi_build.py:ffibuilder"])
