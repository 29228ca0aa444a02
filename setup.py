"""Build-time checks; everything else is in pyproject.toml. The manual's build switches for other platforms
(and Cython) are refused by name here, so a build never silently ignores them."""
import os
import sys
from pathlib import Path

from setuptools import setup

sys.path.insert(0, str(Path(__file__).resolve().parent))
from chitu.build_switches import platform_switches_on, switched_on  # noqa: E402 (the package's light first module)


def refuse_switches_not_built() -> None:
    for variable, platform in platform_switches_on():
        sys.exit(f"{variable}={os.environ[variable]}: {platform}s are not supported by this build of Chitu "
                 f"(NVIDIA GPUs and CPUs); unset {variable} to build it")
    if switched_on("CHITU_WITH_CYTHON"):
        sys.exit(f"CHITU_WITH_CYTHON={os.environ['CHITU_WITH_CYTHON']}: the Cython build is not in this version of "
                 "Chitu yet; unset it for a source build")


refuse_switches_not_built()
setup()
