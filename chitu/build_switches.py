"""The manual's build switches for platforms this build of Chitu does not support: refused by name when building
(setup.py) and when starting (platform.py), never ignored. Standard library only: setup.py imports it."""
from __future__ import annotations

import os

OTHER_PLATFORMS = {"CHITU_ASCEND_BUILD": "Huawei Ascend NPU", "CHITU_HYGON_BUILD": "Hygon DCU",
                   "CHITU_MUXI_BUILD": "MetaX (Muxi) GPU"}


def switched_on(variable: str) -> bool:
    return os.environ.get(variable, "").strip().lower() not in ("", "0", "false", "no", "off")


def platform_switches_on() -> list[tuple[str, str]]:
    """(variable, platform) of each other-platform switch that is set."""
    return [(variable, platform) for variable, platform in OTHER_PLATFORMS.items() if switched_on(variable)]
