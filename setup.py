"""Build-time checks; everything else is in pyproject.toml. The manual's build switches for other platforms
(and Cython) are refused by name here, so a build never silently ignores them."""
import os
import sys

from setuptools import setup

OTHER_PLATFORMS = {"CHITU_ASCEND_BUILD": "Huawei Ascend NPUs", "CHITU_HYGON_BUILD": "Hygon DCUs",
                   "CHITU_MUXI_BUILD": "MetaX (Muxi) GPUs"}


def switched_on(variable: str) -> bool:
    return os.environ.get(variable, "").strip().lower() not in ("", "0", "false", "no", "off")


def refuse_switches_not_built() -> None:
    for variable, platform in OTHER_PLATFORMS.items():
        if switched_on(variable):
            sys.exit(f"{variable}={os.environ[variable]}: {platform} are not supported by this build of Chitu "
                     f"(NVIDIA GPUs and CPUs); unset {variable} to build it")
    if switched_on("CHITU_WITH_CYTHON"):
        sys.exit(f"CHITU_WITH_CYTHON={os.environ['CHITU_WITH_CYTHON']}: the Cython build is not in this version of "
                 "Chitu yet; unset it for a source build")


refuse_switches_not_built()
setup()
