"""Build driver: setuptools hands the one extension, ``vreason_kernels._C``, to CMake.

``CMakeLists.txt`` is the real build description (the vLLM pattern); this file only
points it at the installed torch and copies the result into the package.

The extension uses only libtorch's stable ABI and Python's limited API, so the wheel is
tagged ``cp310-abi3`` and runs under every torch >= 2.10 and CPython >= 3.10, whichever
torch >= 2.10 it was built against. It is built against the torch installed in the
building environment: ``pip install --no-build-isolation .``. Set
``VREASON_SKIP_EXTENSION=1`` to install the pure Python/Triton package.
"""

import importlib.metadata
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import SetupError

ROOT = Path(__file__).parent.resolve()
MIN_TORCH = (2, 10)  # the first torch with the stable-ABI calls the sources make


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[], py_limited_api=True)


class CMakeBuild(build_ext):
    def build_extension(self, ext: CMakeExtension) -> None:
        torch_dir = _installed_torch_dir()
        out_path = Path(self.get_ext_fullpath(ext.name)).resolve()
        # CMake names the module _C.abi3.so; setuptools must expect that same file.
        assert out_path.name == "_C.abi3.so", out_path
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        build_type = os.environ.get("CMAKE_BUILD_TYPE", "Release")
        configure = [
            "cmake", "-S", str(ROOT), "-B", str(build_dir),
            f"-DCMAKE_BUILD_TYPE={build_type}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DVREASON_TORCH_DIR={torch_dir}",
            f"-DVREASON_OUTPUT_DIR={out_path.parent}",
        ]
        if _has_ninja():
            configure += ["-G", "Ninja"]
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
        subprocess.check_call(configure)
        subprocess.check_call(["cmake", "--build", str(build_dir), "--target", "_C", "-j", jobs])


def _installed_torch_dir() -> str:
    """The package directory of the torch this build compiles against, or one clear error.

    Checked before CMake runs and without importing torch. pip's default build isolation
    hides the user's torch from the build, so this is where such a build stops.
    """
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        raise SetupError(
            "vreason-kernels: the C++ extension is compiled against the torch installed in the "
            "building environment, and this build sees none (pip's build isolation hides it). "
            "Install torch>=2.10 and cmake>=3.22 there, then run `pip install --no-build-isolation .` "
            "(or set VREASON_SKIP_EXTENSION=1 to install without the extension)."
        )
    version = importlib.metadata.version("torch")
    if tuple(int(p) for p in version.split("+")[0].split(".")[:2]) < MIN_TORCH:
        raise SetupError(
            f"vreason-kernels: the C++ extension is built on libtorch's stable ABI, which needs "
            f"torch>=2.10 to build; this environment has torch {version}. Upgrade torch, or set "
            "VREASON_SKIP_EXTENSION=1 to install without the extension."
        )
    return spec.submodule_search_locations[0]


def _has_ninja() -> bool:
    try:
        subprocess.check_call(["ninja", "--version"], stdout=subprocess.DEVNULL)
        return True
    except (OSError, subprocess.CalledProcessError):
        return False


if os.environ.get("VREASON_SKIP_EXTENSION") == "1":
    setup()
else:
    setup(
        ext_modules=[CMakeExtension("vreason_kernels._C")],
        cmdclass={"build_ext": CMakeBuild},
        options={"bdist_wheel": {"py_limited_api": "cp310"}},
    )
