"""Builds the compiled core (cext/_core.pyx -> choreo._core). CHOREO_DEBUG=1 builds with -O0 -g."""

import os

from Cython.Build import cythonize
from setuptools import Extension, setup

debug = os.environ.get("CHOREO_DEBUG") == "1"
extensions = [
    Extension(
        "choreo._core",
        ["cext/_core.pyx"],
        extra_compile_args=["-O0", "-g"] if debug else ["-O2"],
    )
]

setup(
    ext_modules=cythonize(
        extensions,
        language_level=3,
        compiler_directives={
            "boundscheck": debug,
            "wraparound": False,
            "cdivision": True,
            "initializedcheck": debug,
            "embedsignature": True,
        },
    )
)
