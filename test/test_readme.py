"""The README is the manual a clone holds: it names nothing outside the repository."""
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()


def test_readme_refers_to_nothing_outside_the_repository():
    assert not re.findall(r"\.\./\S+", README)


def test_every_relative_link_of_the_readme_exists():
    targets = [t.split("#")[0] for t in re.findall(r"\]\(([^)\s]+)\)", README) if "://" not in t]
    assert all((REPO / target).exists() for target in targets if target), targets
