"""Rewrite the configuration-key table of every docs/<language>/config.md, between its marker lines, from
the schema's keys, the defaults of serve_config.yaml with the default model and the meanings of
chitu/config/key_help.py (test/test_docs.py fails while a page's table is stale).

    python script/generate_config_docs.py
"""
from pathlib import Path

from chitu.config import compose_config
from chitu.config.key_help import key_table_markdown, with_key_table

DOCS = Path(__file__).resolve().parent.parent / "docs"


def main() -> None:
    table = key_table_markdown(compose_config())
    for page in sorted(DOCS.glob("*/config.md")):
        text = page.read_text()
        updated = with_key_table(text, table)
        if updated != text:
            page.write_text(updated)
        print(f"{page.relative_to(DOCS.parent)}: {'updated' if updated != text else 'up to date'}")


if __name__ == "__main__":
    main()
