"""Shared loading and aggregation for the reporting scripts (make_table, plot, wandb_to_csv, the notebook).

A run becomes one flat *record* (dict): identity (dataset, model with its width, method, seed, setting,
series), status and error, the reported numbers (NaN when a run does not have them), and whether it reached
its target (`collapsed`, `on_target`: see `reached`). Records come from run directories (`load_runs`) or
from wandb runs (`wandb_to_csv.record_from_wandb`), both through `make_record`; the table (`aggregate`,
`write_table`) and the figures only read records. docs/metrics.md defines every column.
"""
from __future__ import annotations

import csv
import json
import math
import os
import shlex
import sys
from pathlib import Path

import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parents[1]  # the repository


def repo_path(value: str | None, default: str) -> Path:
    """A folder given by the user (an environment variable such as WGSEF_RUNS, or `default` when unset):
    as given when absolute, else relative to the repository root, wherever the caller runs."""
    path = Path(value or default).expanduser()
    return path if path.is_absolute() else ROOT / path


# Reported numbers, record column -> key in summary.json (looked up in summary["final"] first, then at
# the top level, so the flat summary of a wandb run works too). Accuracies and sparsities are fractions.
METRICS = {
    "test_acc": "best_val_test_acc",  # test accuracy at the best validation epoch: the model-selection number
    "final_test_acc": "test_acc",     # test accuracy of the final (finalized, compacted) model
    "group_sparsity": "group_sparsity",
    "weight_sparsity": "weight_sparsity",
    "params_reduction": "params_reduction",
    "flops_reduction": "flops_reduction",
    "flops_sparse_reduction": "flops_sparse_reduction",  # if kernels skipped every zero weight (N:M, unstructured)
    "speedup_cpu_b1": "speedup_cpu_b1",
    "speedup_cpu_b64": "speedup_cpu_b64",
    "speedup_cuda_b1": "speedup_cuda_b1",
    "speedup_cuda_b64": "speedup_cuda_b64",
    "speedup_ort_cpu_b1": "speedup_ort_cpu_b1",  # the same models exported to ONNX, in onnxruntime (CPU)
    "speedup_ort_cpu_b64": "speedup_ort_cpu_b64",
    "latency_ms_cpu_b64": "latency_ms_cpu_b64_compact",  # the final (compacted) model's own latency
    "latency_ms_ort_cpu_b64": "latency_ms_ort_cpu_b64_compact",
    "mean_width": "mean_width",  # GBLR: mean width of its layers (fraction of full rank)
    "train_time_s": "wall_time_s",  # the run's training time: its epochs, over every resume (measurement excluded)
}
KEYS = ["dataset", "model", "method", "setting"]
# Config entries that never define a different experiment: they are not part of a run's `setting`.
# Reached its target or not (docs/metrics.md, "on_target"): a run is *collapsed* when its final test accuracy
# is at most COLLAPSE_FACTOR x chance (1 / classes); it is *off target* when its kept fraction (1 - group
# sparsity; GBLR: mean width) is farther than TARGET_TOLERANCE from the target its config sets
# (regularizer.k as a fraction in (0, 1); GBLR: regularizer.target_width). on_target = neither.
COLLAPSE_FACTOR = 2.0
TARGET_TOLERANCE = 0.05
PLACE_TOLERANCE = 0.125  # a run without a target is shown at the target nearest its kept fraction within this
CLASSES = {"digits": 10, "fashion_mnist": 10, "cifar10": 10, "cifar100": 100}  # runs from before num_classes
NOT_SETTING = ("seed", "name", "method", "resume", "paths.", "logger.", "hydra.", "dataset.name", "model.name",
               "trainer.device", "trainer.progress", "trainer.num_workers")


def flatten(d: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists become strings so that values are hashable."""
    out = {}
    for k, v in (d or {}).items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = str(v) if isinstance(v, (list, tuple)) else v
    return out


def _number(x) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


def _onnx_notes(get) -> str:
    """What a reader of the table must know about the ONNX model: why it was not exported or timed, or
    that onnxruntime runs its N:M / unstructured zeros dense."""
    status, timing = get("onnx") or "", get("onnxruntime_latency") or ""
    timing_reason = timing.removeprefix("skipped ")
    notes = [status if status != "exported" else "",
             f"onnxruntime latency {timing}" if timing not in ("", "done") and timing_reason not in status else "",
             get("onnx_note") or ""]
    return "; ".join(n for n in notes if n)


def target_kept(cfg: dict) -> float:
    """The kept fraction a run's config aims at: regularizer.k when a fraction in (0, 1), GBLR's
    regularizer.target_width; NaN for a method without one (dense, lambda-only methods, k as a count)."""
    k = _number(cfg.get("regularizer.k"))
    if 0 < k < 1:
        return k
    return _number(cfg.get("regularizer.target_width"))


def reached(record: dict) -> dict:
    """kept, target_kept, collapsed and on_target of one record (the definitions above)."""
    gblr = not math.isnan(record["mean_width"])
    kept = record["mean_width"] if gblr else 1 - record["group_sparsity"]
    target = target_kept(record["config"])
    classes = _number(record.get("num_classes"))
    collapsed = bool(record["final_test_acc"] <= COLLAPSE_FACTOR / classes)  # False when either is NaN
    off = bool(abs(kept - target) > TARGET_TOLERANCE)  # False without a target or a kept fraction
    return {"kept": kept, "target_kept": target, "collapsed": collapsed, "on_target": not (collapsed or off)}


def make_record(run: str, config: dict, summary: dict | None, incomplete_reason: str = "",
                method: str = "") -> dict:
    """One run as a flat record. `summary` is summary.json's content (or a wandb run's flat summary);
    None means the run never finished writing one. `method` names the method when the summary does not
    (a member that failed before training)."""
    from wgsef.run import model_label

    summary = summary or {}
    final, cfg = summary.get("final") or {}, flatten(config)

    def get(key):
        return final.get(key, summary.get(key))

    status = summary.get("status") or "incomplete"
    error = summary.get("error") or (incomplete_reason if status == "incomplete" else "")
    best = get("best_val_test_acc")
    record = {
        "run": run, "status": status, "error": error or "",
        "dataset": summary.get("dataset") or cfg.get("dataset.name") or "?",
        "model": model_label(summary.get("model") or cfg.get("model.name") or "?", cfg.get("model.width")),
        "method": summary.get("method") or method or cfg.get("method") or "?",
        "seed": summary.get("seed", cfg.get("seed")),
        **{col: _number(get(key)) for col, key in METRICS.items()},
        "num_classes": summary.get("num_classes") or CLASSES.get(summary.get("dataset") or cfg.get("dataset.name")),
        "flops_only": ", ".join(get("flops_only") or []),
        "onnx": _onnx_notes(get),
        "config": cfg,
    }
    if best is None:  # older summaries: only best_val {epoch, val_acc, test_acc}
        record["test_acc"] = _number((summary.get("best_val") or {}).get("test_acc"))
    return {**record, **reached(record)}


def find_run_dirs(paths) -> list[Path]:
    """Run directories under `paths` (each a run directory or a parent): folders holding summary.json,
    config.yaml, metrics.csv or Hydra's .hydra/. Not searched inside a run (its .hydra/, wandb/ folders)."""
    found = []
    for top in map(Path, paths):
        if not top.is_dir():
            raise ValueError(f"{top} is not a directory; pass run directories or folders that contain them")
        for root, dirs, files in os.walk(top):
            if {"summary.json", "config.yaml", "metrics.csv"} & set(files) or ".hydra" in dirs:
                found.append(Path(root))
                dirs.clear()
            else:
                dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "wandb")
    return sorted(set(found))


def load_metrics(run_dir) -> pd.DataFrame | None:
    path = Path(run_dir) / "metrics.csv"
    return pd.read_csv(path) if path.exists() and path.stat().st_size else None


def _resolved(config: dict) -> dict:
    """Hydra's unresolved .hydra/config.yaml resolved as the run resolved it into config.yaml (a member that
    failed before writing config.yaml must get the same `setting` as its siblings); as written if it
    cannot be resolved outside the run."""
    from omegaconf import OmegaConf
    from wgsef.run import register_resolvers

    register_resolvers()
    try:
        return OmegaConf.to_container(OmegaConf.create(config), resolve=True)
    except Exception:  # an interpolation only the run itself could resolve
        return config


def _method_from_hydra(run_dir: Path, config: dict) -> str:
    """The method label a run would have written, from its config's `label` or .hydra/hydra.yaml choices."""
    path = run_dir / ".hydra" / "hydra.yaml"
    if config.get("label") or not path.exists():
        return config.get("label") or ""
    from wgsef.run import method_label

    choices = ((yaml.safe_load(path.read_text()) or {}).get("hydra") or {}).get("runtime", {}).get("choices", {})
    return method_label(choices) if choices.get("regularizer") else ""


def load_run(run_dir) -> dict:
    run_dir = Path(run_dir)
    config = {}
    if (run_dir / "config.yaml").exists():
        config = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    elif (run_dir / ".hydra" / "config.yaml").exists():
        config = _resolved(yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text()) or {})
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else None
    reason = ""
    if summary is None:
        metrics = load_metrics(run_dir)
        done = 0 if metrics is None else len(metrics)
        reason = f"no summary.json: killed or still running (metrics.csv has {done} epochs)"
    method = "" if summary and summary.get("method") else _method_from_hydra(run_dir, config)
    return make_record(str(run_dir), config, summary, reason, method)


def add_settings(records: pd.DataFrame) -> pd.DataFrame:
    """Fill `setting`: the config entries (lambda, k, epochs, ...) that differ between the runs of one
    (dataset, model, method), as "k=0.5, lam=0.001"; runs differing only in seed share a setting."""
    records = records.copy()
    records["setting"] = ""
    for _, idx in records.groupby(KEYS[:3]).groups.items():
        configs = [records.at[i, "config"] for i in idx]
        keys = sorted({k for c in configs for k in c if not k.startswith(NOT_SETTING)})
        varying = [k for k in keys if len({str(c.get(k)) for c in configs}) > 1]
        short = {k: k.rsplit(".", 1)[-1] for k in varying}
        if len(set(short.values())) < len(short):  # ambiguous last components: keep the full names
            short = {k: k for k in varying}
        for i, c in zip(idx, configs):
            records.at[i, "setting"] = ", ".join(f"{short[k]}={c.get(k)}" for k in varying)
    return records


def load_runs(paths) -> pd.DataFrame:
    """Records of every run directory found under `paths`, with their `setting` filled."""
    dirs = find_run_dirs(paths)
    if not dirs:
        raise ValueError(f"no run directories found under {', '.join(map(str, paths))}")
    return records_frame([load_run(d) for d in dirs])


def add_series(records: pd.DataFrame) -> pd.DataFrame:
    """Fill `series`: the method's name, except for a lambda characterisation (runs of a method whose k varies,
    at a lambda other than its main one: the lambda found at the most values of k, then in the most runs),
    which is `<method> lambda sweep (k=...)` and is drawn as its own series, not on the method's k curve."""
    records = records.copy()
    records["series"] = records["method"].astype(str)
    lam = records["config"].map(lambda c: str(c.get("regularizer.lam")))
    k = records["config"].map(lambda c: str(c.get("regularizer.k")))
    for _, idx in records.groupby(KEYS[:3]).groups.items():
        if k[idx].nunique() < 2 or lam[idx].nunique() < 2:
            continue
        spread = pd.DataFrame({"lam": lam[idx], "k": k[idx]}).groupby("lam")["k"].agg(["nunique", "size"])
        main = spread.sort_values(["nunique", "size"], ascending=False).index[0]
        for i in idx:
            if lam[i] != main:
                records.at[i, "series"] = f"{records.at[i, 'method']} lambda sweep (k={k[i]})"
    return records


def records_frame(records: list[dict]) -> pd.DataFrame:
    return add_series(add_settings(pd.DataFrame(records)))


def target_note(rows: pd.DataFrame) -> str:
    """Why the runs of one table row did not all reach their target; "" when they did."""
    n, notes = len(rows), []
    if rows["collapsed"].any():
        notes.append(f"collapsed in {rows['collapsed'].sum()} of {n} runs (final test acc <= "
                     f"{COLLAPSE_FACTOR:g} x chance)")
    off = rows[~rows["on_target"] & ~rows["collapsed"]]
    if not off.empty:
        notes.append(f"kept {off['kept'].mean():.2f} against a target of {off['target_kept'].iloc[0]:g} in "
                     f"{len(off)} of {n} runs (tolerance {TARGET_TOLERANCE:g})")
    return "; ".join(notes)


def aggregate(records: pd.DataFrame) -> pd.DataFrame:
    """One row per (dataset, model, method, setting) over the completed runs: its series, n_runs, n_seeds
    (distinct seeds), mean and sample std (ddof=1; NaN for one run) of every metric and of the kept fraction,
    the target, n_collapsed (its collapsed runs), on_target (every run on target) with a target_note saying
    why not, and the flops_only structures."""
    done = records[records["status"] == "completed"]
    notes = ["flops_only", "onnx"]
    stat_cols = [*METRICS, "kept"]
    columns = [*KEYS, "series", "n_runs", "n_seeds", *(f"{m}_{s}" for m in stat_cols for s in ("mean", "std")),
               "target_kept", "n_collapsed", "on_target", "target_note", *notes]
    if done.empty:
        return pd.DataFrame(columns=columns)
    groups = done.groupby(KEYS, sort=True)
    table = groups.agg(series=("series", "first"), n_runs=("run", "size"), n_seeds=("seed", "nunique"),
                       target_kept=("target_kept", "first"), n_collapsed=("collapsed", "sum"),
                       on_target=("on_target", "all"))
    stats = groups[stat_cols].agg(["mean", "std"])
    stats.columns = [f"{m}_{s}" for m, s in stats.columns]
    table["target_note"] = groups[["collapsed", "on_target", "kept", "target_kept"]].apply(target_note)
    distinct = groups[notes].agg(lambda s: ", ".join(sorted({x for v in s for x in v.split(", ") if x})))
    return table.join(stats).join(distinct).reset_index()[columns]


def problems(records: pd.DataFrame) -> pd.DataFrame:
    """The runs left out of the table: failed, diverged or incomplete."""
    return records[records["status"] != "completed"][["run", "status", "error", *KEYS, "seed"]]


# -- writing -------------------------------------------------------------------------------------------
DEFAULT_OUT = Path("reports")  # not tracked; the committed results/ only from the make targets (explicit --out)


def add_output_arguments(parser, default: Path) -> None:
    parser.add_argument("--out", default=None,
                        help=f"output folder (default: {default}, which refuses to replace files without --force; "
                             "an explicit --out replaces the files it names)")
    parser.add_argument("--force", action="store_true", help="replace files already in the default folder")


def output_folder(parser, args, default: Path, names: list[str]) -> Path:
    """The folder to write `names` into: --out as given (its files are replaced: the user named it), else
    `default`, where existing files are kept unless --force: one line naming them, exit code 2, nothing
    written."""
    if args.out is not None:
        return Path(args.out)
    existing = [default / n for n in names if (default / n).exists()]
    if existing and not args.force:
        more = f" and {len(existing) - 1} more" if len(existing) > 1 else ""
        parser.exit(2, f"error: {existing[0]}{more} already exist(s); pass --force to replace them, or --out DIR\n")
    return default


def parse_runs(parser, script: str, argv: list[str] | None = None):
    """Parse a report script's arguments (plus the run `paths`) and load the runs; no run found is a
    one-line error with exit code 2. Returns (args, records, the command line for output headers)."""
    parser.add_argument("paths", nargs="+", help="run directories or folders that contain them")
    args = parser.parse_args(argv)
    try:
        records = load_runs(args.paths)
    except ValueError as e:
        parser.exit(2, f"error: {e}\n")
    return args, records, command_line(script, argv)


def command_line(script: str, argv: list[str] | None = None) -> str:
    """The command that is running, for the header of what it writes; `argv` as given to main(argv)."""
    return shlex.join(["python", *(sys.argv if argv is None else [script, *argv])])


MD_COLUMNS = {  # metric -> (header, format of a value); shown as mean ± std over seeds
    "test_acc": ("test acc (%)", lambda x: f"{100 * x:.2f}"),
    "final_test_acc": ("final test acc (%)", lambda x: f"{100 * x:.2f}"),
    "group_sparsity": ("group sparsity (%)", lambda x: f"{100 * x:.1f}"),
    "weight_sparsity": ("weight sparsity (%)", lambda x: f"{100 * x:.1f}"),
    **{m: (f"{label} (×)", lambda x: f"{x:.2f}") for m, label in [
        ("params_reduction", "params reduction"), ("flops_reduction", "FLOPs reduction"),
        ("flops_sparse_reduction", "FLOPs reduction, zero-skipping kernels"),
        ("speedup_cpu_b1", "CPU speedup b1"), ("speedup_cpu_b64", "CPU speedup b64"),
        ("speedup_cuda_b1", "GPU speedup b1"), ("speedup_cuda_b64", "GPU speedup b64"),
        ("speedup_ort_cpu_b1", "ONNX Runtime CPU speedup b1"),
        ("speedup_ort_cpu_b64", "ONNX Runtime CPU speedup b64")]},
    "latency_ms_cpu_b64": ("CPU latency b64 (ms)", lambda x: f"{x:.2f}"),
    "latency_ms_ort_cpu_b64": ("ONNX Runtime CPU latency b64 (ms)", lambda x: f"{x:.2f}"),
    "mean_width": ("GBLR mean width", lambda x: f"{x:.3f}"),
    "train_time_s": ("training time (min)", lambda x: f"{x / 60:.1f}"),
}
ONLY_WHEN_PRESENT = ("speedup_cuda_b1", "speedup_cuda_b64", "speedup_ort_cpu_b1", "speedup_ort_cpu_b64",
                     "latency_ms_cpu_b64", "latency_ms_ort_cpu_b64", "mean_width", "train_time_s")


def _mean_std(row, metric: str, fmt) -> str:
    mean, std = row[f"{metric}_mean"], row[f"{metric}_std"]
    if pd.isna(mean):
        return "n/a"
    return fmt(mean) if pd.isna(std) else f"{fmt(mean)} ± {fmt(std)}"


def _cell(x) -> str:
    return str(x).replace("|", "\\|").replace("\n", " ")


def table_lines(head: list[str], rows: list[list]) -> list[str]:
    """A markdown table: header, rule, one line per row of cells (each cell escaped by _cell)."""
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
            *("| " + " | ".join(map(_cell, cells)) + " |" for cells in rows)]


def markdown(table: pd.DataFrame, bad: pd.DataFrame, command: str) -> str:
    metrics = [m for m in MD_COLUMNS if m not in ONLY_WHEN_PRESENT or table[f"{m}_mean"].notna().any()]
    extra = ["flops-only structures"] if table["flops_only"].astype(bool).any() else []
    head = ["dataset", "model", "method", "setting", "seeds", *(MD_COLUMNS[m][0] for m in metrics), *extra]
    lines = [f"<!-- command: {command} -->", "",
             "Mean ± sample std over seeds; test acc is the test accuracy at the best-validation epoch, final "
             "test acc that of the final model (the one sparsity, reductions and speedups describe).", "",
             *table_lines(head, [[row["dataset"], row["model"], row["method"], row["setting"] or "-", row["n_seeds"],
                                  *(_mean_std(row, m, MD_COLUMNS[m][1]) for m in metrics),
                                  *([row["flops_only"]] if extra else [])] for _, row in table.iterrows()])]
    dup = table[table["n_runs"] != table["n_seeds"]]
    for _, row in dup.iterrows():
        lines += ["", f"Note: {row['method']} {row['setting']} has {row['n_runs']} runs but only "
                      f"{row['n_seeds']} distinct seeds."]
    off = table[~table["on_target"].astype(bool)]
    if not off.empty:
        lines += ["", "Did not reach the target (hollow markers in the figures, not joined into curves; "
                      "docs/metrics.md defines on_target):", ""]
        lines += [f"- {_cell(r.method)} {_cell(r.setting) or '-'}: {_cell(r.target_note)}" for r in off.itertuples()]
    onnx = table[table["onnx"].astype(bool)]
    if not onnx.empty:
        lines += ["", "ONNX export and onnxruntime latency:", ""]
        lines += [f"- {_cell(r.method)} {_cell(r.setting) or '-'}: {_cell(r.onnx)}" for r in onnx.itertuples()]
    if table.empty:
        lines += ["", "No run completed: the table is empty."]
    elif (timed := table[table["train_time_s_mean"].notna()]).size:
        total = (timed["train_time_s_mean"] * timed["n_runs"]).sum() / 3600
        lines += ["", f"Training time of the {timed['n_runs'].sum()} completed runs that record it, summed: "
                      f"{total:.2f} h (runs that ran side by side overlap in wall-clock time; measurement excluded)."]
    lines += ["", f"## Runs not in the table ({len(bad)})", ""]
    lines += [f"- `{r.run}` ({r.method} {r.setting} seed {r.seed}): **{r.status}**: "
              f"{_cell(r.error) or 'no error recorded'}"
              for r in bad.itertuples()] or ["None: every run completed."]
    return "\n".join(lines) + "\n"


TABLE_FILES = ("{}.csv", "{}.md", "{}_runs.csv")


def write_table(records: pd.DataFrame, stem, command: str) -> tuple[Path, Path, Path]:
    """Write `<stem>.csv` (first line `# command: ...`; read back with pd.read_csv(path, comment="#")),
    `<stem>.md` and `<stem>_runs.csv` (one row per run: the seeds that compare_at_k pairs); returns the paths."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    table, bad = aggregate(records), problems(records)
    csv_path, md_path, runs_path = (stem.with_name(f.format(stem.name)) for f in TABLE_FILES)
    with open(csv_path, "w", newline="") as f:
        f.write(f"# command: {command}\n")
        table.to_csv(f, index=False, quoting=csv.QUOTE_NONNUMERIC)  # quoted: a '#' in a cell is no comment
    md_path.write_text(markdown(table, bad, command))
    with open(runs_path, "w", newline="") as f:
        f.write(f"# command: {command}\n")
        records.drop(columns=["config"]).sort_values(["method", "setting", "seed"]).to_csv(f, index=False)
    return csv_path, md_path, runs_path
