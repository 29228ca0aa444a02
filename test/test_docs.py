"""docs/: the manual in each language holds the same pages, its links stay inside docs/ and lead to files, and
the key table of every config.md is the one script/generate_config_docs.py writes now."""
import re

import pytest

from chitu.config import compose_config
from chitu.config.key_help import key_table_markdown, with_key_table
from test_readme import REPO

DOCS = REPO / "docs"
LANGUAGES = ("en", "zh")
PAGES = sorted(DOCS.glob("*/*.md"))


def link_targets(text: str) -> list[str]:
    """The targets of the page's Markdown links, `[text](target)`, without their `#anchor`."""
    return [target.split("#")[0] for target in re.findall(r"\]\(([^)\s]+)\)", text)]


def test_every_language_has_the_same_pages():
    names = {language: sorted(p.name for p in (DOCS / language).glob("*.md")) for language in LANGUAGES}
    assert names["en"] and all(pages == names["en"] for pages in names.values()), names


@pytest.mark.parametrize("language", LANGUAGES)
def test_the_key_table_is_the_generated_one(language):
    page = (DOCS / language / "config.md").read_text()
    assert with_key_table(page, key_table_markdown(compose_config())) == page, \
        "stale key table: regenerate it with python script/generate_config_docs.py"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(DOCS)))
def test_every_link_leads_to_a_file_inside_docs(page):
    targets = [t for t in link_targets(page.read_text()) if t]
    outside = [t for t in targets if "://" in t or t.startswith("mailto:")]
    assert not outside, outside
    paths = {t: (page.parent / t).resolve() for t in targets}
    missing = [t for t, path in paths.items() if not path.is_file() or DOCS not in path.parents]
    assert not missing, missing
