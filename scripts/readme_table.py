"""Copy a generated markdown table into a markdown page between its marker comments.

    python scripts/readme_table.py results/demo_pairs.md README.md demo-pairs
    python scripts/readme_table.py results/demo.md docs/results.md

The block is the name in the markers `<!-- NAME:start -->` / `<!-- NAME:end -->` (default: demo-table).
`make demo` and `make readme-table` run these (and the at-k table into docs/results.md, block demo-at-k).

The page then shows exactly what the table script wrote; nothing in it is typed by hand.
"""
import sys
from pathlib import Path


def splice(page: str, table: str, block: str = "demo-table") -> str:
    """`page` with the text between its `block` markers replaced by `table`."""
    start, end = f"<!-- {block}:start -->", f"<!-- {block}:end -->"
    head, found, rest = page.partition(start)
    _, found_end, tail = rest.partition(end)
    if not (found and found_end):
        raise ValueError(f"has no {start} ... {end} block to fill")
    return f"{head}{start}\n{table.strip()}\n{end}{tail}"


def main(table_path: str, page_path: str, block: str = "demo-table") -> None:
    page = Path(page_path)
    try:
        text = splice(page.read_text(), Path(table_path).read_text(), block)
    except ValueError as e:
        raise SystemExit(f"error: {page_path} {e}") from None
    page.write_text(text)
    print(f"{page_path}: table from {table_path}")


if __name__ == "__main__":
    if len(sys.argv) not in (3, 4):
        raise SystemExit("usage: python scripts/readme_table.py <table.md> <page.md> [block]")
    main(*sys.argv[1:])
