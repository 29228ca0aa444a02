"""Build-time choices; everything else is in pyproject.toml. The manual's build switches for other platforms
are refused by name here, so a build never silently ignores them.

CHITU_WITH_CYTHON=1 compiles the package's modules with Cython into extension modules and leaves their sources
out of the (platform) wheel. What must stay Python stays: package `__init__`s and `__main__` (`python -m chitu`
runs its source), the Triton kernels (triton.jit reads their source), the API's pydantic models (pydantic takes
compiled methods for fields) and build_switches (read before the build)."""
import os
import shutil
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

sys.path.insert(0, str(Path(__file__).resolve().parent))
from chitu.build_switches import platform_switches_on, switched_on  # noqa: E402 (the package's light first module)

STAYS_PYTHON = ("__init__.py", "__main__.py", "build_switches.py")
STAYS_PYTHON_PATHS = ("chitu/ops/triton/", "chitu/serve/protocol.py")
CYTHON_BUILD_BASE = "build/cython-wheel"


def refuse_switches_not_built() -> None:
    for variable, platform in platform_switches_on():
        sys.exit(f"{variable}={os.environ[variable]}: {platform}s are not supported by this build of Chitu "
                 f"(NVIDIA GPUs and CPUs); unset {variable} to build it")


def compiled_modules() -> list[str]:
    """The package's modules Cython compiles, as paths relative to the repository."""
    return sorted(str(path) for path in Path("chitu").rglob("*.py")
                  if path.name not in STAYS_PYTHON and not str(path).startswith(STAYS_PYTHON_PATHS))


def cython_extensions() -> list:
    try:
        from Cython.Build import cythonize
    except ImportError:
        sys.exit("CHITU_WITH_CYTHON=1 needs Cython in this environment (pip install cython), since the build runs "
                 "without isolation (pip install --no-build-isolation .)")
    # Python semantics kept: annotations are not enforced as C types, functions stay introspectable (FastAPI)
    extensions = cythonize(compiled_modules(), build_dir="build/cython", nthreads=os.cpu_count() or 1, quiet=True,
                           compiler_directives={"language_level": 3, "binding": True, "embedsignature": True,
                                                "annotation_typing": False})
    for extension in extensions:
        extension.extra_compile_args.append("-g0")  # no debug info: a tenth of the size
    return extensions


class BuildPyWithoutCompiledSources(build_py):
    """Leaves out of the wheel the sources of the modules that are compiled into it."""

    def find_package_modules(self, package, package_dir):
        compiled = set(compiled_modules())
        return [(pkg, module, path) for pkg, module, path in super().find_package_modules(package, package_dir)
                if os.path.normpath(path) not in compiled]


def main() -> None:
    refuse_switches_not_built()
    if not switched_on("CHITU_WITH_CYTHON"):
        setup()
    elif "editable_wheel" in sys.argv:  # an editable install runs the sources in place
        print("CHITU_WITH_CYTHON=1 is ignored for an editable install (pip install -e): its modules stay Python",
              file=sys.stderr)
        setup()
    else:
        # a build directory of its own, its staged package emptied first: a source build's copies (or a module
        # since removed) must not reach the wheel; the C sources and objects of earlier builds are reused
        for staged in Path(CYTHON_BUILD_BASE).glob("lib*"):
            shutil.rmtree(staged)
        setup(ext_modules=cython_extensions(), cmdclass={"build_py": BuildPyWithoutCompiledSources},
              options={"build": {"build_base": CYTHON_BUILD_BASE}})


main()
