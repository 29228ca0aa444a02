"""The C++ CPU kernels of this package, compiled for this machine (-march=native) the first time a
process needs them and cached by torch (TORCH_EXTENSIONS_DIR)."""
import logging
from pathlib import Path
from types import ModuleType

from torch.utils.cpp_extension import load

from chitu.errors import UserError

logger = logging.getLogger(__name__)


class KernelBuildError(UserError):
    pass


def build(name: str, source: str) -> ModuleType:
    """The extension `name` built from `source` (a file beside this one); KernelBuildError where it cannot be."""
    logger.info("compiling the CPU kernels %s for this machine (once; cached by torch)", source)
    try:
        return load(name=name, sources=[str(Path(__file__).with_name(source))],
                    extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"])
    except (OSError, RuntimeError) as e:  # no compiler, no ninja, a failed build
        raise KernelBuildError(f"the CPU kernels {source} could not be built (a C++ compiler and ninja are "
                               f"needed): {e}") from e
