"""Copy a generated markdown table into README.md between its marker comments.

    python scripts/readme_table.py results/demo.md README.md

The README then shows exactly what the table script wrote; nothing in it is typed by hand.
"""
import sys
from pathlib import Path

START, END = "<!-- demo-table:start -->", "<!-- demo-table:end -->"


def splice(readme: str, table: str) -> str:
    head, found, rest = readme.partition(START)
    _, found_end, tail = rest.partition(END)
    if not (found and found_end):
        raise SystemExit(f"README has no {START} ... {END} block to fill")
    return f"{head}{START}\n{table.strip()}\n{END}{tail}"


def main(table_path: str, readme_path: str) -> None:
    readme = Path(readme_path)
    readme.write_text(splice(readme.read_text(), Path(table_path).read_text()))
    print(f"{readme_path}: table from {table_path}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit("usage: python scripts/readme_table.py <table.md> <README.md>")
    main(*sys.argv[1:])
