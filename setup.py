"""Builds the compiled core (cext/_core.pyx -> choreo._core), the transport's compiled reads
(choreo/_zmqio.pyx -> choreo._zmqio) and the lanes' C clock (choreo/_clock.pyx -> choreo._clock).
CHOREO_DEBUG=1 builds with -O0 -g.

The examples/ tree ships inside the wheel as the package ``choreo.examples``, so that
``choreo up examples/shop`` works after ``pip install`` (see choreo/bundled.py).
"""

import os

from Cython.Build import cythonize
from setuptools import Extension, find_packages, setup

debug = os.environ.get("CHOREO_DEBUG") == "1"
extensions = [
    Extension(name, [source], extra_compile_args=["-O0", "-g"] if debug else ["-O2"])
    for name, source in (("choreo._core", "cext/_core.pyx"), ("choreo._zmqio", "choreo/_zmqio.pyx"),
                           ("choreo._clock", "choreo/_clock.pyx"))
]

examples = ["choreo.examples", *(f"choreo.examples.{name}" for name in find_packages("examples"))]

setup(
    packages=[*find_packages(include=["choreo", "choreo.*"]), *examples],
    package_dir={"choreo.examples": "examples"},
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
