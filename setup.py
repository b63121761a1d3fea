"""Builds mlxllm's CPU kernels (mlxllm/kernels/cpu) with CMake against the installed MLX.

The build is optional: without a C++20 compiler, or on a platform it fails on, mlxllm
installs and runs on MLX's own CPU ops (slower; `mlxllm bench` says which). The metadata
lives in pyproject.toml.
"""

import sys

from mlx.extension import CMakeBuild, CMakeExtension
from setuptools import setup


class OptionalCMakeBuild(CMakeBuild):
    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as e:  # noqa: BLE001  (any failure: install without the kernels)
            print(f"warning: mlxllm's CPU kernels were not built ({e}); MLX's own ops will be used",
                  file=sys.stderr)


setup(
    ext_modules=[CMakeExtension("mlxllm.kernels.cpu._cpu", sourcedir="mlxllm/kernels/cpu")],
    cmdclass={"build_ext": OptionalCMakeBuild},
)
