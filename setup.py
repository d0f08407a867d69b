"""Build script: cythonizes the compiled twins, or builds a pure package.

``RAPACE_NO_EXTENSIONS`` set to a non-empty value at build time skips the
extensions. A missing compiler (or a failed compile) degrades to the pure build
with a warning instead of a broken install: the pure twins are complete.
"""

from __future__ import annotations

import os
import sys
import warnings

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

EXTENSION_MODULES = ["rapace._frame", "rapace._demux", "rapace._postcard", "rapace._shm"]


class OptionalBuildExt(build_ext):
    """A build_ext whose failure leaves a working pure-Python package."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # no compiler at all, or no Python headers
            self._degrade(exc)

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except Exception as exc:  # this one module failed to compile
            self._degrade(exc)

    @staticmethod
    def _degrade(exc: BaseException) -> None:
        message = (
            f"rapace: building the compiled core failed ({exc!r}); "
            "installing the pure-Python twins instead (slower, same behaviour)"
        )
        warnings.warn(message, RuntimeWarning, stacklevel=1)
        print(f"WARNING: {message}", file=sys.stderr)


def extensions() -> list[Extension]:
    if os.environ.get("RAPACE_NO_EXTENSIONS"):
        print("rapace: RAPACE_NO_EXTENSIONS is set; building the pure package", file=sys.stderr)
        return []
    if sys.implementation.name != "cpython":
        return []
    try:
        from Cython.Build import cythonize  # noqa: PLC0415  (optional at build time)
    except ImportError:
        warnings.warn("rapace: Cython is not available; building the pure package", stacklevel=1)
        return []
    modules = [
        Extension(
            name,
            [name.replace(".", "/") + ".pyx"],
            extra_compile_args=["-O3"] if sys.platform != "win32" else [],
        )
        for name in EXTENSION_MODULES
        if os.path.exists(name.replace(".", "/") + ".pyx")
    ]
    return cythonize(
        modules,
        language_level=3,
        compiler_directives={
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "initializedcheck": False,
        },
    )


# Editable installs put the project directory on sys.path (a static .pth) instead of
# setuptools' default import hook: mypy and other static tools can then see the package
# (they never run import hooks), and running from the clone's parent directory still
# imports the package, not the clone's folder as a namespace package.
setup(
    ext_modules=extensions(),
    cmdclass={"build_ext": OptionalBuildExt},
    options={"editable_wheel": {"mode": "compat"}},
)
