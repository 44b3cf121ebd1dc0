"""Build driver: setuptools hands the one extension, ``vreason_kernels._C``, to CMake.

``CMakeLists.txt`` is the real build description (the vLLM pattern); this file only
configures it against the installed torch and copies the result into the package.
Set ``VREASON_SKIP_EXTENSION=1`` to install the pure Python/Triton package.
"""

import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: CMakeExtension) -> None:
        import torch  # the installed torch: that is why builds need --no-build-isolation

        out_dir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        build_type = os.environ.get("CMAKE_BUILD_TYPE", "Release")
        configure = [
            "cmake", "-S", str(ROOT), "-B", str(build_dir),
            f"-DCMAKE_BUILD_TYPE={build_type}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
            f"-DVREASON_OUTPUT_DIR={out_dir}",
        ]
        if _has_ninja():
            configure += ["-G", "Ninja"]
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
        subprocess.check_call(configure)
        subprocess.check_call(["cmake", "--build", str(build_dir), "--target", "_C", "-j", jobs])


def _has_ninja() -> bool:
    try:
        subprocess.check_call(["ninja", "--version"], stdout=subprocess.DEVNULL)
        return True
    except (OSError, subprocess.CalledProcessError):
        return False


ext_modules = [] if os.environ.get("VREASON_SKIP_EXTENSION") == "1" else [CMakeExtension("vreason_kernels._C")]
setup(ext_modules=ext_modules, cmdclass={"build_ext": CMakeBuild})
