"""Builds zmqfork's native module with cffi; everything else is in pyproject.toml."""

from setuptools import setup

setup(cffi_modules=["csrc/build_native.py:ffibuilder"])
