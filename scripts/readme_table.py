"""Copy a generated markdown table into README.md between its marker comments.

    python scripts/readme_table.py results/demo.md README.md [block]

The block is the name in the markers `<!-- NAME:start -->` / `<!-- NAME:end -->` (default: demo-table).

The README then shows exactly what the table script wrote; nothing in it is typed by hand.
"""
import sys
from pathlib import Path


def splice(readme: str, table: str, block: str = "demo-table") -> str:
    start, end = f"<!-- {block}:start -->", f"<!-- {block}:end -->"
    head, found, rest = readme.partition(start)
    _, found_end, tail = rest.partition(end)
    if not (found and found_end):
        raise SystemExit(f"README has no {start} ... {end} block to fill")
    return f"{head}{start}\n{table.strip()}\n{end}{tail}"


def main(table_path: str, readme_path: str, block: str = "demo-table") -> None:
    readme = Path(readme_path)
    readme.write_text(splice(readme.read_text(), Path(table_path).read_text(), block))
    print(f"{readme_path}: table from {table_path}")


if __name__ == "__main__":
    if len(sys.argv) not in (3, 4):
        raise SystemExit("usage: python scripts/readme_table.py <table.md> <README.md> [block]")
    main(*sys.argv[1:])
