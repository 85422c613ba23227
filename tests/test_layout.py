"""The package layout: the old `wgsef.penalties` path still resolves (older run configs name it in their
`_target_`), and the lower layers never import the training loop above them."""
import ast
from pathlib import Path

import pytest

from hydra.utils import get_class

WGSEF = Path(__file__).resolve().parents[1] / "wgsef"


def test_old_penalties_path_resolves_to_the_regularizers():
    from wgsef.regularizers.gblr.deploy import to_dense
    from wgsef.regularizers.wgsef import WGSEF as Current

    with pytest.warns(DeprecationWarning):
        import wgsef.penalties  # noqa: F401
    assert get_class("wgsef.penalties.wgsef.WGSEF") is Current
    from wgsef.penalties.gblr_infer import to_dense as old
    assert old is to_dense


@pytest.mark.parametrize("module", ["errors.py", "measure.py", "deploy.py", "data.py", "schema.py", "compress.py",
                                    "functional.py"])
def test_lower_layers_do_not_import_the_training_loop(module):
    tree = ast.parse((WGSEF / module).read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module} | {
        a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert not imported & {"wgsef.train", "wgsef.run"}, f"{module} imports {imported & {'wgsef.train', 'wgsef.run'}}"
