"""The typed schema of a training config, checked before any work (docs/configs.md).

`validate(cfg, hydra)` raises `ConfigError` (a ValueError: the command line prints its one line and exits 2)
naming the first bad key and the values it allows. Three layers:

- common keys (top level, trainer, measure, paths, dataset, model): explicit types and ranges in `RULES`;
  a key without a rule must keep the type of its default in configs/train.yaml, so keys others add there
  are typed too; a key added on the command line (`+trainer.epoch=5`) must exist in train.yaml;
- nodes with a `_target_` (dataset, model, regularizer, optimizer, scheduler, logger): every key must be a
  parameter of the target's signature and fit its type annotation, so the keys of new regularizers and
  optimizers are accepted and typed without a schema edit; their constructors check their own ranges;
- cross-key rules: every number finite, epoch keys (`*_epoch`, `n_p`) inside the run, the CPU clock on one
  thread, `init_from` an existing file.
"""
from __future__ import annotations

import difflib
import importlib
import inspect
import math
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path

from wgsef.errors import ConfigError, first_line

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TARGET_NODES = ("dataset", "model", "regularizer", "optimizer", "scheduler", "logger")
GROUPS = TARGET_NODES + ("method", "experiment", "hparams_search")
# the smallest channel count of each model at width 1: below 1/that, layers would be clamped to 1 channel
BASE_CHANNELS = {"lenet5": 6, "lenet5_caffe": 20, "vgg16": 64, "resnet18": 64, "mobilenetv1": 32,
                 "vit": 96}  # vit: embedding 768 over 8 heads (at model.dim 768, model.heads 8)
# the smallest input side of each model: below it more than the last stage of 3x3 convolutions would run on
# 1x1 maps (where only the centre tap sees the image); lenet5's 5x5 convs and pools need 12, lenet5_caffe's
# unpadded ones 16
MIN_IMAGE_SIZE = {"lenet5": 12, "lenet5_caffe": 16, "vgg16": 16, "resnet18": 8, "mobilenetv1": 16}


# -- value checks: each returns None when the value fits, else a description of what fits --------------
def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def integer(lo: int | None = None, hi: int | None = None):
    what = "an integer" + (f" >= {lo}" if lo is not None else "") + (f" <= {hi}" if hi is not None else "")
    return lambda v: None if is_int(v) and (lo is None or v >= lo) and (hi is None or v <= hi) else what


def number(above: float | None = None, below: float | None = None):
    what = "a number" + (f" in ({above}, {below})" if above is not None and below is not None
                         else f" > {above}" if above is not None else f" < {below}" if below is not None else "")
    return lambda v: None if is_number(v) and (above is None or v > above) and (below is None or v < below) \
        else what


def one_of(*allowed):
    what = "one of " + ", ".join("true" if a is True else "false" if a is False else str(a) for a in allowed)
    return lambda v: None if any(v is a if isinstance(a, bool) else (v == a and not isinstance(v, bool))
                                 for a in allowed) else what


def at_least(lo: float):
    return lambda v: None if is_number(v) and v >= lo else f"a number >= {lo}"


def compile_backend(v):
    """trainer.compile: true, false, or a backend torch.compile knows (torch._dynamo.list_backends)."""
    if isinstance(v, bool):
        return None
    if isinstance(v, str) and v:
        from torch._dynamo import list_backends

        backends = list_backends(exclude_tags=())
        if v in backends:
            return None
        return f"true, false or a torch.compile backend ({', '.join(b for b in list_backends())}, ...)"
    return "true, false or a torch.compile backend name"


def text(v):
    return None if isinstance(v, str) and v else "a non-empty string"


def optional(check):
    return lambda v: None if v is None else (None if check(v) is None else f"null or {check(v)}")


def list_of(check, what: str):
    return lambda v: None if isinstance(v, list) and v and all(check(x) is None for x in v) \
        else f"a non-empty list of {what}"


BOOL = one_of(True, False)
RULES = {
    "name": text, "label": optional(text), "seed": integer(0), "resume": BOOL, "overwrite": BOOL,
    "init_from": optional(text),
    "trainer.epochs": integer(1), "trainer.batch_size": integer(1), "trainer.num_workers": integer(0),
    "trainer.device": one_of("auto", "cpu", "cuda"), "trainer.progress": one_of(True, False, "auto"),
    "trainer.precision": one_of("fp32", "bf16"), "trainer.channels_last": BOOL,
    "trainer.compile": compile_backend,
    "measure.enabled": BOOL, "measure.batches": list_of(integer(1), "integers >= 1"), "measure.threads": integer(1),
    "measure.clock": one_of("cpu", "wall"), "measure.min_run_time": number(above=0),
    "measure.repeats": integer(1), "measure.round_to": integer(1),
    "paths.data_dir": text, "paths.runs_dir": text,
    "dataset.name": text, "dataset.image_size": integer(1), "dataset.root": text,
    "dataset.val_fraction": number(above=0, below=1), "dataset.split_seed": integer(0),
    "dataset.download": BOOL,
    "scheduler.milestones": list_of(integer(0), "epochs (integers >= 0)"), "scheduler.gamma": number(above=0),
    "scheduler.T_max": integer(1), "logger.mode": one_of("online", "offline", "disabled"),
    "optimizer.lr": number(above=0), "optimizer.momentum": at_least(0), "optimizer.weight_decay": at_least(0),
}


# -- type annotations of a target's parameters ----------------------------------------------------------
def fits(value, ann) -> bool:
    """Whether a config value (plain Python: from OmegaConf.to_container) fits a type annotation."""
    if ann in (inspect.Parameter.empty, typing.Any, object):
        return True
    if ann is None or ann is type(None):
        return value is None
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if origin in (typing.Union, types.UnionType):
        return any(fits(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if ann is bool:
        return isinstance(value, bool)
    if ann is int:
        return is_int(value)
    if ann is float:
        return is_number(value)
    if ann in (str, Path):
        return isinstance(value, str)
    container = origin or ann
    if isinstance(container, type) and issubclass(container, Mapping):
        return isinstance(value, dict)
    if isinstance(container, type) and issubclass(container, Iterable) and container is not str:
        return isinstance(value, list) and (not args or origin is tuple or all(fits(v, args[0]) for v in value))
    return True  # classes the config cannot spell (tensors, modules): the target checks them


def describe(ann) -> str:
    if ann is None or ann is type(None):
        return "null"
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(dict.fromkeys(describe(a) for a in args))
    if origin is typing.Literal:
        return "one of " + ", ".join(map(str, args))
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", Path: "a path"}
    if ann in names:
        return names[ann]
    container = origin or ann
    if isinstance(container, type) and issubclass(container, Mapping):
        return "a mapping"
    return f"a list of {describe(args[0]).removeprefix('an ').removeprefix('a ')}s" if args else "a list"


def target_parameters(node: dict, name: str) -> dict[str, typing.Any]:
    """name -> annotation of the parameters a node's `_target_` accepts; the key "**" when it takes **kwargs."""
    module, _, attr = node["_target_"].rpartition(".")
    try:
        target = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError, ValueError) as e:
        raise ConfigError(f"{name}._target_={node['_target_']} cannot be imported: {e}") from None
    params = signature(target)
    if node["_target_"] == "wgsef.models.build":  # the registry passes the rest on to the model
        from wgsef.models import MODELS
        params.pop("**", None)
        params.update(signature(MODELS[node["name"]]) if node.get("name") in MODELS else {"**": None})
    return params


def signature(target) -> dict[str, typing.Any]:
    inner = getattr(target, "func", target)  # a functools.partial: the annotations are the function's
    try:
        params = inspect.signature(target).parameters
    except (TypeError, ValueError):
        return {"**": None}
    try:
        hints = typing.get_type_hints(inner.__init__ if inspect.isclass(inner) else inner)
    except Exception:  # annotations that do not evaluate: names only
        hints = {}
    out = {k: hints.get(k, p.annotation) for k, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        out["**"] = None
    return out


# -- the checks ----------------------------------------------------------------------------------------
def fail(key: str, allowed: str, value) -> typing.NoReturn:
    shown = "'" + value + "'" if isinstance(value, str) else ("true" if value is True else "false" if value is False
                                                          else "null" if value is None else value)
    raise ConfigError(f"{key} must be {allowed}, got {shown}")


def walk(node, prefix: str = ""):
    """(dotted key, value) of every leaf of a plain container."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for k, v in items:
        key = f"{prefix}[{k}]" if isinstance(k, int) else f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, (dict, list)):
            yield from walk(v, key)
        else:
            yield key, v


def select(c: dict, key: str, default=None):
    for part in key.split("."):
        if not isinstance(c, dict) or part not in c:
            return default
        c = c[part]
    return c


def resolve(cfg) -> dict:
    """The task config as plain Python, every interpolation resolved; a failing one named by its key."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as e:
        raise ConfigError(f"{getattr(e, 'full_key', None) or 'config'}: {first_line(e)}") from None


def check_added_keys(overrides: list[str], c: dict) -> None:
    """`+key=value` may add a key only where a target's signature takes it (checked later) or train.yaml has it."""
    from omegaconf import OmegaConf

    reference = OmegaConf.to_container(OmegaConf.load(CONFIGS / "train.yaml"))
    for override in overrides:
        if not override.startswith("+"):
            continue
        key = override.lstrip("+").partition("=")[0]
        top = key.split(".")[0]
        if top in GROUPS or isinstance(c.get(top), dict) and "_target_" in c[top]:
            continue
        if select(reference, key, KeyError) is KeyError:
            raise ConfigError(unknown_key(key))


def group_keys(group: str) -> dict[str, dict]:
    """option -> its config (plain, unresolved) for each option of a config group."""
    from omegaconf import OmegaConf

    return {p.stem: OmegaConf.to_container(OmegaConf.load(p)) for p in sorted((CONFIGS / group).glob("*.yaml"))}


def methods_choosing(group: str, options: list[str]) -> list[str]:
    """The method presets (configs/method/) that choose one of `options` for `group`, directly or through the
    method they extend."""
    methods = group_keys("method")

    def choice(name: str):
        for entry in methods.get(name, {}).get("defaults", []):
            if isinstance(entry, dict) and f"override /{group}" in entry:
                return entry[f"override /{group}"]
            if isinstance(entry, str) and entry in methods:
                return choice(entry)
        return None
    return [m for m in methods if choice(m) in options]


def unknown_key(key: str) -> str:
    """One line for a key the composed config does not have: the close match (did you mean), what its parent
    has, and, for a config group's key, which options (and methods) take it."""
    from omegaconf import OmegaConf

    parent, _, leaf = key.rpartition(".")
    top, _, rest = key.partition(".")
    if top in TARGET_NODES and rest:
        options = group_keys(top)
        having = [o for o, node in options.items() if select(node, rest, KeyError) is not KeyError]
        if having:
            methods = methods_choosing(top, having)
            via = f" (method={', '.join(methods)})" if methods else ""
            return (f"{key} is not a key of the chosen {top}: it belongs to {top}={', '.join(having)}{via}; choose "
                    f"one of those, e.g. {'method=' + methods[0] if methods else top + '=' + having[0]} {key}=...")
        nodes = [select(node, rest.rpartition(".")[0]) if "." in rest else node for node in options.values()]
        known = list(dict.fromkeys(k for n in nodes if isinstance(n, dict) for k in n
                                   if not k.startswith("_") and k != "defaults"))
        add = f"; +{key}=<value> adds it where the {top}'s target takes it"
    else:
        reference = OmegaConf.to_container(OmegaConf.load(CONFIGS / "train.yaml"))
        known = list(select(reference, parent) or {}) if parent else [k for k in reference if k != "defaults"]
        add = ""
    close = difflib.get_close_matches(leaf, known, n=1)
    hint = f" (did you mean {parent + '.' if parent else ''}{close[0]}?)" if close else ""
    return f"unknown key {key}{hint}; {parent or 'the top level'} has: {', '.join(known)}{add}"


def check_target_node(name: str, node: dict) -> None:
    params = target_parameters(node, name)
    for key, value in node.items():
        if key.startswith("_") or f"{name}.{key}" in RULES:
            continue
        if key not in params and "**" not in params:
            known = [k for k in params if k != "**"]
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean {name}.{close[0]}?)" if close else ""
            raise ConfigError(f"unknown key {name}.{key}{hint}; {node['_target_']} takes: {', '.join(known)}")
        if key in params and not fits(value, params[key]):
            fail(f"{name}.{key}", describe(params[key]), value)


def check_typed_like_default(c: dict) -> None:
    """Common keys without a rule keep the type of their default in configs/train.yaml."""
    from omegaconf import OmegaConf

    reference = OmegaConf.load(CONFIGS / "train.yaml")
    for key, default in walk(OmegaConf.to_container(reference, resolve=False)):
        if key.startswith("defaults") or key in RULES or isinstance(default, str) and "${" in default:
            continue
        value = select(c, key, KeyError)
        if value is KeyError or default is None:
            continue
        kind = bool if isinstance(default, bool) else int if is_int(default) else float if is_number(default) \
            else str if isinstance(default, str) else None
        if kind is not None and not fits(value, kind):
            fail(key, describe(kind), value)


def of_model(table: dict, name: str):
    """The entry of `table` for model `name`: the longest key it starts with (lenet5_caffe has its own), or None."""
    return table.get(max((p for p in table if name.startswith(p)), key=len, default=None))


def check_model(m: dict, image_size=None) -> None:
    width, name = m.get("width"), str(m.get("name"))
    base = of_model(BASE_CHANNELS, name)
    if base and width is not None:
        if not is_number(width) or width < 1 / base:
            fail("model.width", f"a number >= 1/{base} = {1 / base:g} (below it {m['name']} layers would keep "
                                f"less than one channel)", width)
    side = of_model(MIN_IMAGE_SIZE, name)
    if side and is_int(image_size) and image_size < side:
        raise ConfigError(f"dataset.image_size={image_size} is too small for model {name}: it needs images of at least "
                          f"{side}x{side} pixels")


def finish_at_start(c: dict) -> str | None:
    """A warning when WGSEF's finish (hard top-k or closing step) comes at epoch 0, before any training."""
    reg = c.get("regularizer") or {}
    if str(reg.get("_target_", "")).endswith(".WGSEF") and reg.get("finish_epoch") == 0:
        return (f"regularizer.finish_epoch=0 (trainer.epochs={c['trainer']['epochs']}): WGSEF's {reg.get('finish')} "
                "finish comes at initialisation, before any training, so the run fine-tunes a random top-k; use "
                "trainer.epochs >= 2 or a later regularizer.finish_epoch")
    return None


def check_cross(c: dict, choices: Mapping) -> None:
    for key, value in walk(c):
        if isinstance(value, float) and not math.isfinite(value):
            fail(key, "a finite number", value)
    epochs = c["trainer"]["epochs"]
    milestones = select(c, "scheduler.milestones")
    if isinstance(milestones, list) and any(is_int(m) and m >= epochs for m in milestones):
        raise ConfigError(f"scheduler.milestones={milestones} reaches beyond the run (trainer.epochs={epochs}): a "
                          f"milestone m lowers the lr after epoch m, so use epochs below {epochs}")
    for name in ("regularizer", "optimizer"):
        for key, value in (c.get(name) or {}).items():
            if (key.endswith("_epoch") or key == "n_p") and is_int(value) and value >= epochs:
                raise ConfigError(f"{name}.{key}={value} is beyond the run (trainer.epochs={epochs}): it would "
                                  f"never happen; use an epoch in 0..{epochs - 1} or null")
    m = c.get("measure") or {}
    if m.get("clock") == "cpu" and m.get("threads") != 1:
        raise ConfigError(f"measure.threads={m.get('threads')} needs measure.clock=wall: the cpu clock counts "
                          "one thread's CPU time, so it needs measure.threads=1")
    root = (c.get("dataset") or {}).get("root")
    if isinstance(root, str) and Path(root).exists() and not Path(root).is_dir():
        raise ConfigError(f"dataset.root={root} is a file; it must be a directory (the datasets go inside it)")
    init = c.get("init_from")
    if init and not Path(init).is_file():
        if choices.get("method") == "ssl_from_dense":
            raise ConfigError(f"method=ssl_from_dense starts from the dense run of the same table, model and seed, "
                              f"and {init} does not exist: run the table's dense pass first (e.g. `python -m "
                              f"experiments.train -m experiment=table_fmnist method=dense`), or set "
                              f"init_from=<dense run dir>/checkpoints/last.pt")
        raise ConfigError(f"init_from={init} does not exist; give a run's checkpoints/last.pt or a state_dict file")


def validate(cfg, hydra=None) -> dict:
    """Check a composed config (with or without its `hydra` node; else pass HydraConfig.get()) and return the
    task config as plain, resolved Python."""
    from omegaconf import OmegaConf

    if "hydra" in cfg:  # `${hydra:...}` interpolations read the global HydraConfig
        from hydra.core.hydra_config import HydraConfig
        HydraConfig.instance().set_config(cfg)
    hydra = hydra if hydra is not None else cfg.get("hydra")
    task = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]) if "hydra" in cfg else cfg
    c = resolve(task)
    overrides = list(hydra.overrides.task) if hydra is not None else []
    choices = dict(hydra.runtime.choices) if hydra is not None else {}
    check_added_keys(overrides, c)
    for key, rule in RULES.items():
        value = select(c, key, KeyError)
        if value is not KeyError and rule(value) is not None:
            fail(key, rule(value), value)
    check_typed_like_default(c)
    check_model(c.get("model") or {}, select(c, "dataset.image_size"))
    for name in TARGET_NODES:
        if isinstance(c.get(name), dict) and "_target_" in c[name]:
            check_target_node(name, c[name])
    check_cross(c, choices)
    return c
