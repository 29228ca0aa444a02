"""The C++ CPU kernels of this package, compiled for this machine (-march=native) the first time a
process needs them and cached by torch (TORCH_EXTENSIONS_DIR).

They compile from a copy of the sources named by their content: torch's cache takes a build command that
names other paths for a rebuild, so a checkout and an installed wheel (or two virtual environments) of the
same sources share one build instead of each undoing the other's."""
import hashlib
import logging
import os
from pathlib import Path
from types import ModuleType

from torch.utils.cpp_extension import get_default_build_root, load

from chitu.errors import UserError

logger = logging.getLogger(__name__)

SOURCES = Path(__file__).parent
FLAGS = ["-O3", "-march=native", "-fopenmp"]


class KernelBuildError(UserError):
    pass


def build(name: str, source: str) -> ModuleType:
    """The extension `name` built from `source` (a file beside this one); KernelBuildError where it cannot be."""
    logger.info("compiling the CPU kernels %s for this machine (once; cached by torch)", source)
    try:
        return load(name=name, sources=[str(staged_sources() / source)], extra_cflags=FLAGS,
                    extra_ldflags=["-fopenmp"])
    except (OSError, RuntimeError) as e:  # no compiler, no ninja, a failed build
        raise KernelBuildError(f"the CPU kernels {source} could not be built (a C++ compiler and ninja are "
                               f"needed): {e}") from e


def staged_sources() -> Path:
    """A directory holding a copy of the kernels' .cpp and .h files, named by their content."""
    files = sorted(p for p in SOURCES.iterdir() if p.suffix in (".cpp", ".h"))
    contents = {p.name: p.read_bytes() for p in files}
    digest = hashlib.sha256(b"".join(name.encode() + b"\0" + data for name, data in contents.items())).hexdigest()
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    staged = root / "chitu_sources" / digest[:16]
    staged.mkdir(parents=True, exist_ok=True)
    for file_name, data in contents.items():
        target = staged / file_name
        if not target.exists():  # written whole under another name, then renamed: ranks may stage at once
            partial = staged / f".{file_name}.{os.getpid()}"
            partial.write_bytes(data)
            os.replace(partial, target)
    return staged
