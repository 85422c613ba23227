"""The old name of `wgsef.regularizers` (renamed in 0.2): imports and the `_target_` of older run configs
(so that their runs still resume) resolve to the new modules, with a DeprecationWarning."""
import importlib
import sys
import warnings

warnings.warn("wgsef.penalties is now wgsef.regularizers", DeprecationWarning, stacklevel=2)

_MOVED = {"base": "base", "group_lasso": "group_lasso", "nm": "nm", "srste": "srste", "ssl": "ssl",
          "wgsef": "wgsef", "gblr": "gblr", "gblr_layers": "gblr.layers", "gblr_infer": "gblr.deploy"}
for _old, _new in _MOVED.items():
    sys.modules[f"{__name__}.{_old}"] = importlib.import_module(f"wgsef.regularizers.{_new}")
from wgsef.regularizers import GroupPenalty, Regularizer  # noqa: E402

__all__ = ["GroupPenalty", "Regularizer"]
