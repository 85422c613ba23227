"""The README and docs/ say only what the repository does: the library example runs as written, the demo
tables are spliced where `make demo` puts them, and every make target, script, config and link they name
exists."""
import re
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import readme_table  # noqa: E402

README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]


def readme_example() -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) == 1, f"README.md should hold one python example, found {len(blocks)}"
    return blocks[0]


def test_readme_example_runs_as_written(capsys):
    code = readme_example()
    assert code.count("epochs = 12\n") == 1, "the example's epoch count is the one line this test shortens"
    ns = {"__name__": "readme_example"}
    exec(compile(code.replace("epochs = 12\n", "epochs = 2\n"), "README.md", "exec"), ns)  # finish at epoch 1
    out = capsys.readouterr().out
    assert "test accuracy" in out and "FLOPs" in out
    metrics = ns["penalty"].metrics()
    assert metrics["nonzero_groups"] == metrics["k_groups"]  # the top-k finish left exactly k per layer
    model, small, data = ns["model"], ns["small"], ns["data"]
    x, _ = next(iter(data.test))
    with torch.no_grad():
        torch.testing.assert_close(small(x), model.eval()(x), atol=1e-4, rtol=1e-4)  # compaction is exact
    assert ns["count_flops"](small, ns["example"]) < ns["count_flops"](model, ns["example"])


# ----------------------------------------------------------------------------------- table splicing
def test_splice_replaces_only_the_block_and_is_idempotent():
    page = "intro\n<!-- t:start -->\nold\n<!-- t:end -->\nafter\n<!-- u:start -->\nkeep\n<!-- u:end -->\n"
    once = readme_table.splice(page, "| a |\n|---|\n", "t")
    assert once == page.replace("\nold\n", "\n| a |\n|---|\n")
    assert readme_table.splice(once, "| a |\n|---|\n", "t") == once


def test_splice_without_markers_names_the_page(tmp_path):
    page, table = tmp_path / "page.md", tmp_path / "table.md"
    page.write_text("no markers\n")
    table.write_text("| a |\n")
    with pytest.raises(SystemExit, match=r"page\.md has no <!-- demo-table:start -->"):
        readme_table.main(str(table), str(page))
    assert page.read_text() == "no markers\n"  # left as it was


def splice_commands() -> list[tuple[str, str, str]]:
    """(table, page, block) of every scripts/readme_table.py line of the Makefile."""
    lines = re.findall(r"scripts/readme_table\.py (\S+) (\S+)(?: (\S+))?", (ROOT / "Makefile").read_text())
    return sorted({(table, page, block or "demo-table") for table, page, block in lines})


def test_make_demo_splices_every_table_into_a_page_that_shows_it():
    commands = splice_commands()
    assert {(t, p) for t, p, _ in commands} == {("results/demo.md", "docs/results.md"),
                                                ("results/demo_at_k.md", "docs/results.md"),
                                                ("results/demo_pairs.md", "README.md"),
                                                ("results/demo_pairs.md", "docs/what_wgsef_adds.md"),
                                                ("results/models.md", "docs/models.md"),
                                                ("results/mnist_units.md", "docs/mnist.md"),
                                                ("results/mnist_at_k.md", "docs/mnist.md"),
                                                ("results/mnist_units.md", "README.md"),
                                                ("results/mnist_published.md", "README.md")}
    for table, page, block in commands:
        text = (ROOT / page).read_text()
        assert f"<!-- {block}:start -->" in text and f"<!-- {block}:end -->" in text, (page, block)
        # the committed page shows exactly the committed table (run `make readme-table` after a new demo)
        assert readme_table.splice(text, (ROOT / table).read_text(), block) == text, f"{page} is stale: {table}"


# ------------------------------------------------------------------------- what the pages name exists
def prose(page: Path) -> str:
    return re.sub(r"<!-- (\S+):start -->.*?<!-- \1:end -->", "", page.read_text(), flags=re.S)  # no tables


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_pages_name_only_existing_targets_scripts_and_presets(page):
    text = prose(page)
    targets = set(re.findall(r"^([a-zA-Z0-9_-]+):", (ROOT / "Makefile").read_text(), flags=re.M))
    for target, star in re.findall(r"(?:`|^)make ([a-z][a-z0-9-]*)(\*?)", text, flags=re.M):
        if star:  # make bench-* and the like: some target starts so
            assert any(t.startswith(target) for t in targets), f"{page.name}: no make {target}*"
        else:
            assert target in targets, f"{page.name}: make {target} is not a Makefile target"
    folders = "scripts|configs|wgsef|experiments|tests|results|notebooks"
    for path in re.findall(rf"\b((?:{folders})/[\w./{{}},*<>-]*[\w}}*>])", text):
        if not any(c in path for c in "*<{"):  # a pattern, not a path
            assert (ROOT / path).exists(), f"{page.name}: {path} does not exist"
    for group, name in re.findall(r"\b(method|experiment|model|dataset|scheduler|optimizer|logger)=(\w+)", text):
        assert (ROOT / "configs" / group / f"{name}.yaml").exists(), f"{page.name}: {group}={name} has no config"


def known_keys() -> dict[str, set[str]]:
    """The config keys a page may name: constructor parameters of every target of a group, and train.yaml's."""
    import inspect

    from omegaconf import OmegaConf

    from wgsef import data, logging, optim
    from wgsef.optim import hspg, prox_adamw, prox_sgd
    from wgsef.regularizers import gblr, group_lasso, srste, ssl, wgsef

    params = lambda *fns: {p for fn in fns for p in inspect.signature(fn).parameters}  # noqa: E731
    train = OmegaConf.load(ROOT / "configs" / "train.yaml")
    return {
        "regularizer": params(wgsef.WGSEF, group_lasso.GroupLasso, ssl.SSL, srste.SRSTE, gblr.GBLR),
        "optimizer": params(optim.sgd, prox_sgd.prox_sgd, prox_adamw.prox_adamw, hspg.hspg),
        "dataset": params(data.build_loaders),
        "logger": params(logging.WandbLogger),
        "trainer": set(train.trainer), "measure": set(train.measure),
    }


WRONG_ON_PURPOSE = {"trainer.epoch"}  # configs.md shows the error a misspelt key gets


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_pages_name_only_existing_config_keys(page):
    keys = known_keys()
    text = re.sub(r"```python\n.*?```", "", prose(page), flags=re.S)  # python variables, not config keys
    for group, key in re.findall(r"\b(regularizer|optimizer|dataset|logger|trainer|measure)\.([a-z_]+)\b", text):
        if f"{group}.{key}" not in WRONG_ON_PURPOSE and key != "py":  # measure.py is a file
            assert key in keys[group], f"{page.name}: {group}.{key} is not a config key"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_resolve(page):
    for target in re.findall(r"\]\(([^)#:\s]+)(?:#[^)]*)?\)", page.read_text()):
        path = (page.parent / target).resolve()
        assert path.exists(), f"{page.name}: link to {target} is broken"


def test_readme_is_a_landing_page():
    """At most 230 lines of prose: the generated tables spliced into it (which grow with the runs) aside."""
    assert len(prose(README).splitlines()) <= 230
