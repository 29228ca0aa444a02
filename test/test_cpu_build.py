"""ops/cpu/build.py: the kernels compile from a copy of their sources named by content, so that copies of the
package at other paths (an installed wheel, another venv) reuse one build and an edit makes a new one."""
import shutil
from pathlib import Path

from chitu.ops.cpu import build


def copy_of_the_sources(to: Path) -> Path:
    shutil.copytree(build.SOURCES, to, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    return to


def test_copies_of_the_sources_elsewhere_stage_to_one_directory_and_an_edit_to_another(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "extensions"))
    staged = []
    for name in ("checkout", "site-packages"):
        monkeypatch.setattr(build, "SOURCES", copy_of_the_sources(tmp_path / name))
        staged.append(build.staged_sources())
    assert staged[0] == staged[1] and staged[0].is_relative_to(tmp_path / "extensions")
    assert sorted(p.name for p in staged[0].iterdir()) == sorted(
        p.name for p in (tmp_path / "checkout").iterdir() if p.suffix in (".cpp", ".h"))
    header = tmp_path / "site-packages" / "vec.h"
    header.write_text(header.read_text() + "\n// edited\n")
    edited = build.staged_sources()
    assert edited != staged[0] and (edited / "vec.h").read_text() == header.read_text()
