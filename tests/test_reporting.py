"""Reporting scripts (scripts/make_table.py, plot.py, wandb_to_csv.py, notebooks/analysis.ipynb) on fake
run directories with the layout the training pipeline writes."""
import json
import math
import statistics
import sys
from pathlib import Path
from types import SimpleNamespace

import nbformat
import pandas as pd
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import _runs  # noqa: E402
import make_table  # noqa: E402
import plot  # noqa: E402
from wandb_to_csv import record_from_wandb  # noqa: E402

# (method, lam, seed) -> (best-val test acc, final test acc, group sparsity)
COMPLETED = {
    ("wgsef", 1e-3, 0): (0.90, 0.89, 0.48), ("wgsef", 1e-3, 1): (0.92, 0.90, 0.50),
    ("wgsef", 1e-3, 2): (0.94, 0.93, 0.52),
    ("wgsef", 1e-2, 0): (0.80, 0.80, 0.80), ("wgsef", 1e-2, 1): (0.84, 0.82, 0.70),
    ("group_lasso", 1e-3, 0): (0.91, 0.91, 0.30), ("group_lasso", 1e-3, 1): (0.93, 0.92, 0.20),
}


def config(method, lam, seed, epochs=3):
    return {"name": "digits-lenet5", "method": method, "seed": seed, "resume": False,
            "trainer": {"epochs": epochs, "batch_size": 64, "device": "auto", "num_workers": 0, "progress": False},
            "paths": {"data_dir": "data", "runs_dir": "runs"},
            "dataset": {"_target_": "wgsef.data.build_loaders", "name": "digits", "image_size": 16},
            "model": {"_target_": "wgsef.models.build", "name": "lenet5"},
            "regularizer": {"_target_": "wgsef.regularizers.x.X", "lam": lam, "layers": None, "block": [2, 2],
                            **({"k": 0.5} if method == "wgsef" else {})}}


def metrics_rows(epochs, sparsity, final_acc, lam=None):
    """Per-epoch rows of a run with 20 groups; with `lam`, also the WGSEF columns (k_groups, lam_eff,
    prox_zeroed_groups: the prox zeroes 2 groups per epoch)."""
    rows = [{"epoch": e, "train_loss": 1 / e, "train_acc": 0.5, "val_loss": 1 / e, "val_acc": 0.5 + e / 100,
             "test_acc": final_acc if e == epochs else 0.5, "lr": 0.05, "weight_sparsity": sparsity * e / epochs / 2,
             "time_s": 0.1, "group_sparsity": sparsity * e / epochs, "nonzero_groups": 20 * (1 - sparsity * e / epochs),
             "k": 5, "penalty": 0.1} for e in range(1, epochs + 1)]
    if lam is not None:
        for r in rows:
            r.update(k_groups=10, lam_eff=lam * r["epoch"], prox_zeroed_groups=2 * r["epoch"])
    return rows


def write_run(d: Path, cfg: dict | None, rows: list[dict] | None, summary: dict | None, hydra_only=False):
    (d / ".hydra").mkdir(parents=True)
    if cfg is not None:
        (d / (".hydra/config.yaml" if hydra_only else "config.yaml")).write_text(yaml.safe_dump(cfg))
    if rows:
        pd.DataFrame(rows).to_csv(d / "metrics.csv", index=False)
    if summary is not None:
        (d / "summary.json").write_text(json.dumps(summary))


def summary(method, seed, best, final_acc, sparsity, epochs=3, **extra):
    rows = metrics_rows(epochs, sparsity, final_acc)
    return {"status": "completed", "error": None, "method": method, "seed": seed, "dataset": "digits",
            "model": "lenet5", "epochs": epochs, "final": rows[-1],
            "best_val": {"epoch": 2, "val_acc": 0.6, "test_acc": best},
            "test_acc": final_acc, "best_val_test_acc": best, "wall_time_s": 1.0, "git_commit": "abc", **extra}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """A sweep under runs/multirun/<name>/<time>/<n>/ plus a dense run, a diverged, a failed and a killed one."""
    root = tmp_path_factory.mktemp("runs")
    sweep = root / "multirun" / "digits-lenet5" / "2024-01-01_00-00-00"
    for n, ((method, lam, seed), (best, final, sp)) in enumerate(COMPLETED.items()):
        extra = {"params_reduction": 1 / (1 - sp), "flops_reduction": 1 + 2 * sp, "speedup_cpu_b1": 1 + sp,
                 "speedup_cpu_b64": 1 + 1.5 * sp, "flops_only": ["shape"] if method == "group_lasso" else [],
                 "speedup_ort_cpu_b1": 1 + 0.5 * sp, "speedup_ort_cpu_b64": 1 + sp, "onnx": "exported",
                 "latency_ms_cpu_b64_compact": 10 - sp, "latency_ms_ort_cpu_b64_compact": 5 - sp,
                 **({"onnx_note": "ONNX Runtime runs N:M and unstructured zeros dense (7 zero weights computed)"}
                    if method == "group_lasso" else {})}
        d = sweep / str(n)
        write_run(d, config(method, lam, seed), metrics_rows(3, sp, final, lam if method == "wgsef" else None),
                  summary(method, seed, best, final, sp, **extra))
        (d / "wandb" / "run-1" / "files").mkdir(parents=True)  # must not be taken for a run directory
        (d / "wandb" / "run-1" / "files" / "config.yaml").write_text("a: 1\n")
        if method == "wgsef":
            (d / "compact.json").write_text(json.dumps({"conv1": [6, 6], "conv2": [16, 8 + n], "fc1": [120, 60]}))
    write_run(sweep / "90", config("wgsef", 1e-3, 3), metrics_rows(2, 0.1, 0.5),
              {**summary("wgsef", 3, 0.2, 0.1, 0.1), "status": "diverged",
               "error": "the training loss became nan at epoch 2, step 5"})
    write_run(sweep / "91", config("wgsef", 1e-3, 4), None,
              {"status": "failed", "error": "CUDA out of memory", "traceback": "..."}, hydra_only=True)
    write_run(sweep / "92", config("wgsef", 1e-3, 5), metrics_rows(3, 0.2, 0.5)[:2], None)  # killed
    dense = summary("dense", 0, 0.96, 0.95, 0.0)  # no method metrics, none of the newer keys
    rows = [{k: v for k, v in r.items() if k not in ("group_sparsity", "nonzero_groups", "k", "penalty")}
            for r in metrics_rows(3, 0.0, 0.95)]
    write_run(root / "dense" / "2024-01-02_00-00-00", config("dense", None, 0), rows, {**dense, "final": rows[-1]})
    return root


def test_find_run_dirs_skips_inside_runs(runs):
    dirs = _runs.find_run_dirs([runs])
    assert len(dirs) == len(COMPLETED) + 4
    assert not any("wandb" in d.parts or ".hydra" in d.parts for d in dirs)
    assert _runs.find_run_dirs([runs / "dense"]) == [runs / "dense" / "2024-01-02_00-00-00"]
    with pytest.raises(ValueError, match="not a directory"):
        _runs.find_run_dirs([runs / "nope"])


def test_setting_separates_sweep_points_not_seeds(runs):
    records = _runs.load_runs([runs])
    wg = records[(records["method"] == "wgsef") & (records["status"] == "completed")]
    assert set(wg["setting"]) == {"lam=0.001", "lam=0.01"}
    assert set(records.loc[records["method"] == "group_lasso", "setting"]) == {""}  # only the seed differs


@pytest.fixture(scope="module")
def table(runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("results")
    make_table.main([str(runs), "--name", "t1", "--out", str(out)])
    return out


def test_table_mean_std_over_seeds(table):
    df = pd.read_csv(table / "t1.csv", comment="#")
    assert len(df) == 4  # wgsef x 2 lambdas, group_lasso, dense
    per_run = pd.read_csv(table / "t1_runs.csv", comment="#")  # one row per run, for paired comparisons
    completed = per_run[per_run["status"] == "completed"]
    assert len(completed) == df["n_runs"].sum() and "config" not in per_run.columns
    for (method, lam) in [("wgsef", 1e-3), ("wgsef", 1e-2), ("group_lasso", 1e-3)]:
        vals = [v for (m, l, _), v in COMPLETED.items() if (m, l) == (method, lam)]
        setting = f"lam={lam}" if method == "wgsef" else ""
        row = df[(df["method"] == method) & (df["setting"].fillna("") == setting)].iloc[0]
        assert row["n_seeds"] == row["n_runs"] == len(vals)
        for i, col in enumerate(["test_acc", "final_test_acc", "group_sparsity"]):
            xs = [v[i] for v in vals]
            assert row[f"{col}_mean"] == pytest.approx(statistics.mean(xs))
            assert row[f"{col}_std"] == pytest.approx(statistics.stdev(xs))
        sp = [v[2] for v in vals]
        assert row["flops_reduction_mean"] == pytest.approx(statistics.mean(1 + 2 * s for s in sp))
        assert row["params_reduction_mean"] == pytest.approx(statistics.mean(1 / (1 - s) for s in sp))
        assert row["speedup_cpu_b64_mean"] == pytest.approx(statistics.mean(1 + 1.5 * s for s in sp))
    dense = df[df["method"] == "dense"].iloc[0]
    assert dense["n_seeds"] == 1 and dense["test_acc_mean"] == pytest.approx(0.96)
    assert math.isnan(dense["test_acc_std"]) and math.isnan(dense["flops_reduction_mean"])
    assert math.isnan(dense["speedup_cuda_b1_mean"])
    assert df.loc[df["method"] == "group_lasso", "flops_only"].iloc[0] == "shape"


def test_table_header_and_failures_listed(table, runs):
    csv_first = (table / "t1.csv").read_text().splitlines()[0]
    md = (table / "t1.md").read_text()
    first = md.splitlines()[0]
    assert csv_first.startswith("# command: python scripts/make_table.py ")
    assert first.startswith("<!-- command: python scripts/make_table.py ") and first.endswith("-->")
    assert "--name t1" in first and str(runs) in first
    # wgsef lam=1e-3: test acc 0.90, 0.92, 0.94; FLOPs reduction 1.96, 2, 2.04
    assert "| 92.00 ± 2.00 |" in md and "| 2.00 ± 0.04 |" in md
    # wgsef lam=1e-2 keeps 0.2 and 0.3 of its groups where k = 0.5 asks for 0.5
    assert "- wgsef lam=0.01: kept 0.25 against a target of 0.5 in 2 of 2 runs (tolerance 0.05)" in md
    assert md.count("\n- wgsef") == 1  # the only row that missed its target
    assert "| 96.00 |" in md  # one seed: no ± std
    assert "GPU speedup" not in md  # no run measured on a GPU
    assert "| ONNX Runtime CPU speedup b64 (×) |" in md and "| ONNX Runtime CPU latency b64 (ms) |" in md
    assert "- group_lasso -: ONNX Runtime runs N:M and unstructured zeros dense (7 zero weights computed)" in md
    bad = md.split("## Runs not in the table (3)")[1]
    assert "**diverged**: the training loss became nan at epoch 2, step 5" in bad
    assert "**failed**: CUDA out of memory" in bad
    assert "**incomplete**: no summary.json: killed or still running (metrics.csv has 2 epochs)" in bad
    assert "seed 4" in bad  # the failed run's identity comes from .hydra/config.yaml
    df = pd.read_csv(table / "t1.csv", comment="#")  # every run trained for 1 s (wall_time_s)
    assert (df["train_time_s_mean"] == 1.0).all() and "| training time (min) |" in md
    assert f"Training time of the {df['n_runs'].sum()} completed runs that record it, summed: 0.00 h" in md


def test_table_all_failed_and_no_runs(tmp_path, capsys):
    write_run(tmp_path / "r", config("wgsef", 1e-3, 0), None, {"status": "failed", "error": "boom"})
    make_table.main([str(tmp_path), "--name", "t", "--out", str(tmp_path / "out")])
    assert pd.read_csv(tmp_path / "out" / "t.csv", comment="#").empty
    assert "**failed**: boom" in (tmp_path / "out" / "t.md").read_text()
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as e:
        make_table.main([str(tmp_path / "empty"), "--name", "t"])
    assert e.value.code == 2 and "no run directories found" in capsys.readouterr().err


def test_csv_quotes_cells_with_hash(tmp_path):
    rec = _runs.make_record("r", config("wgsef", 1e-3, 0), summary("wgsef", 0, 0.9, 0.9, 0.5, flops_only=["a#b"]))
    csv_path, _, _ = _runs.write_table(_runs.records_frame([rec]), tmp_path / "t", "python x.py # y")
    df = pd.read_csv(csv_path, comment="#")
    assert df["flops_only"].iloc[0] == "a#b" and df["test_acc_mean"].iloc[0] == pytest.approx(0.9)


def test_a_cell_with_a_pipe_or_newline_stays_one_cell():
    """Every markdown table (make_table, compare_at_k, units_per_layer, mnist_vs_published) goes through
    table_lines, which escapes | and folds newlines, so one odd value cannot add columns or break a row."""
    lines = _runs.table_lines(["a", "b"], [["x|y", "two\nlines"], [1.5, None]])
    assert lines == ["| a | b |", "|---|---|", "| x\\|y | two lines |", "| 1.5 | None |"]


FIGURES = ["acc_vs_sparsity", "acc_vs_flops", "sparsity_over_epochs", "lambda_k", "speedup_vs_flops"]


def test_plot_writes_every_figure(runs, tmp_path, capsys):
    plot.main([str(runs), "--out", str(tmp_path), "--name", "p_"])
    names = {str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*.*")}
    for stem in [*FIGURES, "widths/p_digits_lenet5_wgsef_lam=0.001", "widths/p_digits_lenet5_wgsef_lam=0.01"]:
        for ext in ("png", "pdf"):
            stem_ = stem if "/" in stem else f"p_{stem}"
            assert f"{stem_}.{ext}" in names and (tmp_path / f"{stem_}.{ext}").stat().st_size > 1000
    assert len(names) == 14 and "skipped" not in capsys.readouterr().out
    from PIL import Image

    for stem in FIGURES:  # paper widths at 300 dpi: at most 7 in (cropped to their content, nothing cut off)
        width, height = Image.open(tmp_path / f"p_{stem}.png").size
        assert width <= 7 * 300 + 10 and height <= 9 * 300, (stem, width, height)


def test_redrawn_figures_are_byte_identical(runs, tmp_path):
    """No creation date in the PDFs: redrawing the same runs rewrites the same bytes (no churn in git)."""
    plot.main([str(runs), "--out", str(tmp_path)])
    first = {p: p.read_bytes() for p in tmp_path.rglob("*.pdf")}
    plot.main([str(runs), "--out", str(tmp_path)])
    assert first and all(b"/CreationDate" not in data for data in first.values())
    assert {p: p.read_bytes() for p in tmp_path.rglob("*.pdf")} == first


def test_legends_inside_the_image(runs):
    """Every figure's legend lies inside the figure it is saved with (none cut off at any edge)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    records = _runs.load_runs([runs])
    for name, fig in plot.figures(records).items():
        if fig is None:
            continue
        renderer = FigureCanvasAgg(fig).get_renderer()
        fig.draw(renderer)
        box = fig.bbox
        for legend in [*fig.legends, *(ax.get_legend() for ax in fig.axes if ax.get_legend())]:
            extent = legend.get_window_extent(renderer)
            assert box.x0 - 1 <= extent.x0 and extent.x1 <= box.x1 + 1, name
            assert box.y0 - 1 <= extent.y0 and extent.y1 <= box.y1 + 1, name
        axes = [ax.get_window_extent(renderer) for ax in fig.axes if ax.get_visible()]
        for legend in fig.legends:  # below the axes, not over them
            assert legend.get_window_extent(renderer).y1 <= min(a.y0 for a in axes), name


def test_plot_skips_absent_data(runs, tmp_path, capsys):
    plot.main([str(runs / "dense"), "--out", str(tmp_path)])
    out = capsys.readouterr().out
    for name in [*FIGURES, "widths"]:
        assert f"skipped {name}" in out
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


def test_plot_and_table_on_runs_without_a_completed_one(runs, tmp_path, capsys):
    """Only the failed, diverged and killed members: one line each, no traceback, no figure."""
    sweep = runs / "multirun" / "digits-lenet5" / "2024-01-01_00-00-00"
    paths = [str(sweep / n) for n in ("90", "91", "92")]
    plot.main([*paths, "--out", str(tmp_path / "fig")])
    out = capsys.readouterr().out
    assert out == "no completed run among 3 (1 diverged, 1 failed, 1 incomplete): no figure drawn\n"
    assert not (tmp_path / "fig").exists()
    make_table.main([*paths, "--name", "t", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "3 runs, 3 not completed (listed in the .md); no run completed: the table is empty" in out
    assert "No run completed: the table is empty." in (tmp_path / "t.md").read_text()


def test_plot_contents(runs):
    records = _runs.load_runs([runs])
    ax = plot.acc_vs_sparsity(_runs.aggregate(records)).axes[0]
    points = {(round(c.lines[0].get_xdata()[0], 6), c.lines[0].get_markerfacecolor() == "none") for c in ax.containers}
    # wgsef lam=1e-3 (mean 50%) on target; lam=1e-2 (mean 75%, k = 0.5 asks for 50%) hollow; group lasso 25%
    assert points == {(50, False), (75, True), (25, False)}
    dense = [line for line in ax.get_lines() if line.get_label() == "dense"]
    assert dense[0].get_ydata()[0] == pytest.approx(95) and dense[0].get_marker() == "*"
    assert dense[0].get_color() == "black"
    fig = plot.speedup_vs_flops(records)
    assert [a.get_title() for a in fig.axes] == ["PyTorch CPU, batch 1", "PyTorch CPU, batch 64",
                                                 "ONNX Runtime CPU, batch 1", "ONNX Runtime CPU, batch 64"]
    bars = plot.layer_widths(records.loc[records["method"] == "wgsef", "run"].iloc[0]).axes[0].patches
    assert [b.get_height() for b in bars] == [6, 16, 120, 6, 8, 60]


def test_sparsity_over_epochs_one_line_per_method_seeds_as_a_band(runs):
    records = _runs.load_runs([runs])
    styles = plot.Styles(records)
    fig = plot.sparsity_over_epochs(records, styles)
    # columns: target 0.5 (wgsef's k), no target (group lasso keeps 0.75: farther than 0.125 from 0.5);
    # rows: group sparsity, nonzero / k, lambda
    assert [ax.get_title() for ax in fig.axes[:2]] == ["target kept fraction 0.5", "no target"]
    sparsity = fig.axes[0]
    solid = [line for line in sparsity.get_lines() if line.get_linestyle() == "-"]
    (wgsef,) = solid  # one line for the 3 completed seeds at lam=1e-3 (diverged and killed runs left out)
    assert wgsef.get_color() == styles.colors["wgsef"]
    assert list(wgsef.get_ydata()) == pytest.approx([100 * 0.5 * e / 3 for e in (1, 2, 3)])  # mean of 48, 50, 52 %
    (band,) = sparsity.collections  # min-max over seeds
    ys = band.get_paths()[0].vertices[:, 1]
    assert ys.min() == pytest.approx(100 * 0.48 / 3) and ys.max() == pytest.approx(100 * 0.52)
    dotted = [line for line in sparsity.get_lines() if line.get_linestyle() == ":"]
    assert len(dotted) == 2  # the two lam=1e-2 runs that missed k, each on its own
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels == ["wgsef", "group_lasso", "dotted: a run that missed its target"]
    assert (styles.colors["wgsef"], styles.colors["group_lasso"], styles.colors["dense"]) == ("C1", "C0", "black")
    # nonzero groups / k: 20 groups, k_groups 10, sparsity 50% (mean) at the end at lam=1e-3 -> 1
    ratio = fig.axes[2]
    assert ratio.get_yscale() == "log" and ratio.get_lines()[0].get_ydata()[-1] == pytest.approx(1.0)
    lam = fig.axes[4]
    assert list(lam.get_lines()[0].get_ydata()) == pytest.approx([1e-3, 2e-3, 3e-3])  # lam=1e-3, mean of 3 seeds


def test_speedup_and_accuracy_vs_flops_are_log_scaled(runs):
    records = _runs.load_runs([runs])
    fig = plot.speedup_vs_flops(records)
    for ax in fig.axes:
        assert ax.get_xscale() == ax.get_yscale() == "log"
        diagonal = [line for line in ax.get_lines() if line.get_label() == "y = x"][0]
        assert list(diagonal.get_xdata()) == list(diagonal.get_ydata())
    markers = {c.get_label(): c.get_paths()[0].vertices.shape for c in fig.axes[0].collections}
    assert {"wgsef lam=0.001", "wgsef lam=0.01", "group_lasso"} <= set(markers)
    ax = plot.acc_vs_flops(_runs.aggregate(records)).axes[0]
    assert ax.get_xscale() == "log"
    bars = {round(c.lines[0].get_xdata()[0], 6): c for c in ax.containers}
    # wgsef lam=1e-3: FLOPs reduction 1 + 2 * sparsity over sparsities 0.48, 0.5, 0.52 -> mean 2.0, std 0.04
    xerr = bars[2.0].lines[2][0].get_segments()[0]
    assert [p[0] for p in xerr] == pytest.approx([1.96, 2.04])
    assert [line.get_label() for line in ax.get_lines() if line.get_label() == "dense"] == ["dense"]


def test_lambda_k_characterisation(runs):
    fig = plot.lambda_k(_runs.load_runs([runs]))
    acc, prox = fig.axes
    (curve,) = [c for c in acc.containers if c.get_label() == "k=0.5"]
    x, y = curve.lines[0].get_data()
    assert list(x) == [1e-3, 1e-2] and list(y) == pytest.approx([100 * (0.89 + 0.90 + 0.93) / 3, 81])
    # the prox zeroed 2 groups per epoch, 6 after 3 epochs, of 20 groups: 30%; k = 10 of 20 asks for 50%
    (curve,) = [c for c in prox.containers if c.get_label() == "k=0.5"]
    assert list(curve.lines[0].get_ydata()) == pytest.approx([30, 30])
    assert [line.get_ydata()[0] for line in prox.get_lines() if line.get_linestyle() == ":"] == pytest.approx([50])
    assert acc.get_xscale() == "log"


def test_failed_member_listed_with_method_and_setting(tmp_path):
    """A member that failed before writing config.yaml: its method comes from .hydra/hydra.yaml's choices and
    its setting from the resolved .hydra/config.yaml, so it matches its completed siblings."""
    for n, lam in enumerate((1e-3, 1e-2)):
        cfg = config("wgsef", lam, 0)
        cfg.pop("method")
        cfg["regularizer"]["finish_epoch"] = 2  # resolved ${epoch_at:0.75,${trainer.epochs}} of 3 epochs
        write_run(tmp_path / str(n), cfg, metrics_rows(3, 0.5, 0.9), summary("wgsef", 0, 0.9, 0.9, 0.5))
    failed = config("wgsef", 1e-2, 7)
    failed.pop("method")
    failed["regularizer"]["finish_epoch"] = "${epoch_at:0.75,${trainer.epochs}}"
    write_run(tmp_path / "2", failed, None, {"status": "failed", "error": "boom"}, hydra_only=True)
    choices = {"method": "wgsef", "regularizer": "wgsef", "optimizer": "prox_sgd", "model": "lenet5"}
    (tmp_path / "2" / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"runtime": {"choices": choices}}}))
    _, md, _ = _runs.write_table(_runs.load_runs([tmp_path]), tmp_path / "t", "cmd")
    assert f"- `{tmp_path / '2'}` (wgsef lam=0.01 seed 7): **failed**: boom" in md.read_text()


def test_record_from_wandb_matches_run_dir():
    cfg = config("wgsef", 1e-3, 1)
    full = summary("wgsef", 1, 0.92, 0.90, 0.5, flops_reduction=2.0, speedup_cpu_b1=1.4)
    # What WandbLogger leaves in a wandb summary: the scalars of summary.json plus the last logged row.
    flat = {**full["final"], **{k: v for k, v in full.items() if isinstance(v, (int, float, str, bool))}}
    run = SimpleNamespace(config=cfg, summary_metrics=flat, state="finished", url="https://wandb.ai/e/p/runs/x")
    got, want = record_from_wandb(run), _runs.make_record("d", cfg, full)
    for key in ["status", "dataset", "model", "method", "seed", *_runs.METRICS]:
        assert got[key] == want[key] or (math.isnan(got[key]) and math.isnan(want[key])), key
    assert got["test_acc"] == 0.92 and got["final_test_acc"] == 0.90 and got["group_sparsity"] == 0.5
    crashed = record_from_wandb(SimpleNamespace(config=cfg, summary_metrics={}, state="crashed", url="u"))
    assert crashed["status"] == "failed" and crashed["error"] == "wandb run crashed"
    running = record_from_wandb(SimpleNamespace(config=cfg, summary_metrics={"epoch": 2}, state="running", url="u"))
    assert running["status"] == "incomplete" and "running" in running["error"]


def test_notebook_executes_into_a_copy(runs, table, tmp_path, monkeypatch):
    """`make notebook` (scripts/run_notebook.py): relative WGSEF_RUNS / WGSEF_RESULTS from the repository root
    whatever the current folder, outputs in a copy, the tracked notebook untouched."""
    import run_notebook

    tracked = (ROOT / "notebooks" / "analysis.ipynb").read_bytes()
    monkeypatch.chdir(tmp_path)  # not the repository root: relative paths must not resolve from here
    env = {"WGSEF_RUNS": str(runs), "WGSEF_RESULTS": str(table)}
    out = run_notebook.main(["--out", str(tmp_path / "executed.ipynb")], environ=env)
    assert (ROOT / "notebooks" / "analysis.ipynb").read_bytes() == tracked
    nb = nbformat.read(out, as_version=4)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(str(o.get("data", {}).get("text/plain", "")) + o.get("text", "") for o in outputs)
    assert "t1.csv" in str(outputs) and "group_lasso" in text and "CUDA out of memory" in text
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 7  # (a)-(e), two width charts


def test_notebook_folders_resolve_from_the_repository_root(tmp_path, monkeypatch, capsys):
    """A relative WGSEF_RUNS is taken from the repository root, not from the current folder or notebooks/; a
    missing folder stops `make notebook` with one line and exit code 2 before any kernel starts."""
    import run_notebook

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()  # a folder of that name here must not be picked up
    assert _runs.repo_path("runs/multirun/x", "runs") == ROOT / "runs" / "multirun" / "x"
    assert _runs.repo_path(None, "results") == ROOT / "results"
    assert _runs.repo_path(str(tmp_path / "runs"), "runs") == tmp_path / "runs"
    with pytest.raises(SystemExit) as e:
        run_notebook.main(["--out", str(tmp_path / "x.ipynb")],
                          environ={"WGSEF_RUNS": "runs/no-such-sweep", "WGSEF_RESULTS": str(tmp_path)})
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    assert f"WGSEF_RUNS=runs/no-such-sweep resolves to {ROOT / 'runs' / 'no-such-sweep'}, which is not a dir" in err
    with pytest.raises(SystemExit) as e:
        run_notebook.main([], environ={"WGSEF_RUNS": str(tmp_path), "WGSEF_RESULTS": "nope"})
    assert e.value.code == 2 and f"WGSEF_RESULTS=nope resolves to {ROOT / 'nope'}" in capsys.readouterr().err
    assert not (tmp_path / "x.ipynb").exists()  # stopped before executing or writing anything


def test_compare_at_k_places_each_method_at_its_kept_fraction(tmp_path):
    """k-based rows sit at their k, lambda-based ones at the target nearest to 1 - group sparsity (when within
    the tolerance), SSL and dense are not compared, and means/stds are the table's."""
    import compare_at_k

    def row(method, setting, sparsity, acc, std=float("nan")):
        return {"dataset": "digits", "model": "vgg16", "method": method, "setting": setting, "n_runs": 3,
                "n_seeds": 3, "final_test_acc_mean": acc, "final_test_acc_std": std,
                "group_sparsity_mean": sparsity, "group_sparsity_std": 0.0, "flops_reduction_mean": 2.0,
                "flops_reduction_std": 0.1, "speedup_cpu_b64_mean": 1.5, "speedup_cpu_b64_std": float("nan"),
                "n_collapsed": int(acc <= 0.2)}
    rows = [row("dense", "", float("nan"), 0.97), row("wgsef", "k=0.25, lam=0.001", 0.75, 0.95, 0.01),
            row("magnitude", "k=0.5", 0.5, 0.96), row("group_lasso", "lam=0.01", 0.30, 0.93),
            row("group_lasso", "lam=0.1", 0.99, 0.10), row("ssl", "filter=0.02", 0.5, 0.97)]
    csv = tmp_path / "t.csv"
    pd.DataFrame(rows).to_csv(csv, index=False)
    compare_at_k.main([str(csv), "--out", str(tmp_path / "t.md")])
    body = [line.split(" | ") for line in (tmp_path / "t.md").read_text().splitlines() if line.startswith("| 0.")]
    placed = {(cells[1], cells[2]): cells[0].strip("| ") for cells in body if compare_at_k.MISSED not in cells[4]}
    assert placed == {("wgsef", "k=0.25, lam=0.001"): "0.25", ("magnitude", "k=0.5"): "0.50",
                      ("group_lasso", "lam=0.01"): "0.75"}  # lam=0.1 keeps 0.01: no target within 0.125
    misses = {(cells[0].strip("| "), cells[1]) for cells in body if compare_at_k.MISSED in cells[4]}
    assert misses == {("0.25", "group_lasso"), ("0.50", "group_lasso")}  # a lambda method tries every target
    assert "95.00 ± 1.00" in (tmp_path / "t.md").read_text() and "Dense reference" in (tmp_path / "t.md").read_text()
    rows[1]["n_collapsed"] = 1  # one collapsed run of three: the row is not placed, whatever its mean
    pd.DataFrame(rows).to_csv(csv, index=False)
    compare_at_k.main([str(csv), "--out", str(tmp_path / "t.md")])
    assert "| 0.25 | wgsef | - | - | did not reach the target (collapsed: k=0.25" in (tmp_path / "t.md").read_text()
    pd.DataFrame(rows).drop(columns="n_collapsed").to_csv(csv, index=False)
    with pytest.raises(SystemExit) as e:  # a table from before n_collapsed: one line saying what to do
        compare_at_k.main([str(csv), "--out", str(tmp_path / "t.md")])
    assert e.value.code == 2


def test_compare_at_k_on_a_table_with_only_dense(tmp_path):
    """The first finished run of a table is usually dense: nothing to place, no pair, no error."""
    import compare_at_k

    csv = tmp_path / "t.csv"
    pd.DataFrame([{"dataset": "mnist", "model": "lenet5_caffe", "method": "dense", "setting": None, "n_runs": 1,
                   "n_seeds": 1, "final_test_acc_mean": 0.99, "final_test_acc_std": float("nan"),
                   "group_sparsity_mean": float("nan"), "n_collapsed": 0}]).to_csv(csv, index=False)
    compare_at_k.main([str(csv), "--targets", "0.15", "0.3", "--out", str(tmp_path / "t.md")])
    text = (tmp_path / "t.md").read_text()
    assert "Dense reference (mnist / lenet5_caffe, seeds: 1): 99.00 %." in text
    assert "No per-run table" in text  # t_runs.csv was not written: said, not raised


def demo_records():
    """Records as the demo makes them (VGG16 x0.25 on digits, 10 classes): dense; wgsef at k = 0.25/0.5/0.75
    (lam 1e-3, 2 seeds) plus its lambda characterisation at k = 0.5 (one of them collapsed); group lasso over
    lambda; HSPG collapsed; GBLR short of its width target."""
    def rec(method, seed, acc, sparsity=None, lam=None, k=None, **extra):
        cfg = config(method, lam, seed)
        cfg["model"]["width"] = 0.25
        cfg["regularizer"] = {"lam": lam, **({"k": k} if k is not None else {}),
                              **({"target_width": extra.pop("target_width")} if "target_width" in extra else {})}
        s = summary(method, seed, acc, acc, sparsity or 0.0, num_classes=10, flops_reduction=1 / (1 - (sparsity or 0)))
        s["final"] = {"test_acc": acc, **({"group_sparsity": sparsity} if sparsity is not None else {}), **extra}
        s["model"] = "vgg16"
        return _runs.make_record(f"r/{method}/{lam}/{k}/{seed}", cfg, s)
    records = [rec("dense", s, 0.97) for s in (0, 1)]
    records += [rec("wgsef", s, 0.96 - k / 10, 1 - k, 1e-3, k) for k in (0.25, 0.5, 0.75) for s in (0, 1)]
    records += [rec("wgsef", 0, acc, 0.5, lam, 0.5) for lam, acc in ((1e-1, 0.9), (1.0, 0.15))]
    records += [rec("group_lasso", s, 0.93, sp, lam) for lam, sp in ((1e-2, 0.3), (2e-2, 0.5)) for s in (0, 1)]
    records += [rec("hspg", s, acc, 0.9, 5e-3) for s, acc in ((0, 0.197), (1, 0.5))]
    records += [rec("gblr", 0, 0.9, None, 0.1, target_width=0.25, mean_width=0.46)]
    return _runs.records_frame(records)


def test_on_target_collapsed_and_off_target():
    """collapsed: final test acc <= 2 x chance (0.2 with 10 classes); off target: kept fraction (1 - group
    sparsity; GBLR: mean width) farther than 0.05 from the config's target (k; GBLR: target_width)."""
    records = demo_records()
    got = {(r.method, str(r.config["regularizer.lam"]), r.seed): (r.collapsed, r.on_target)
           for r in records.itertuples()}
    assert got["wgsef", "1.0", 0] == (True, False)  # 15 %: collapsed
    assert got["wgsef", "0.1", 0] == (False, True) and got["wgsef", "0.001", 1] == (False, True)
    assert got["hspg", "0.005", 0] == (True, False) and got["hspg", "0.005", 1] == (False, True)  # 19.7 %, 50 %
    assert got["group_lasso", "0.02", 0] == (False, True)  # no target in its config: on target unless collapsed
    assert got["dense", "None", 0] == (False, True)
    gblr = records[records["method"] == "gblr"].iloc[0]
    assert (gblr["kept"], gblr["target_kept"], gblr["on_target"]) == (0.46, 0.25, False)
    run = {"mean_width": math.nan, "group_sparsity": 0.45, "config": {"regularizer.k": 0.5}, "num_classes": 100,
           "final_test_acc": 0.02}
    assert _runs.reached(run) == {"kept": 0.55, "target_kept": 0.5, "collapsed": True, "on_target": False}
    edge = _runs.reached({**run, "group_sparsity": 0.46, "final_test_acc": 0.021})  # 2.1 % > 2 x 1 %
    assert (edge["collapsed"], edge["on_target"]) == (False, True)  # kept 0.54: within 0.05 of 0.5
    assert not _runs.reached({**run, "group_sparsity": 0.44, "final_test_acc": 0.5})["on_target"]  # kept 0.56

    table = _runs.aggregate(records).set_index(["method", "setting"])
    assert set(table["model"]) == {"vgg16 x0.25"}
    assert not table.loc[("hspg", ""), "on_target"]
    assert table.loc[("hspg", ""), "target_note"] == "collapsed in 1 of 2 runs (final test acc <= 2 x chance)"
    assert table.loc[("gblr", ""), "target_note"] == ("kept 0.46 against a target of 0.25 in 1 of 1 runs "
                                                      "(tolerance 0.05)")
    assert table["on_target"].sum() == len(table) - 3  # hspg, gblr and wgsef at lam = 1


def test_lambda_characterisation_is_its_own_series():
    records = demo_records()
    series = dict(zip(zip(records["method"], records["setting"]), records["series"]))
    assert series["wgsef", "k=0.25, lam=0.001"] == series["wgsef", "k=0.5, lam=0.001"] == "wgsef"
    assert series["wgsef", "k=0.5, lam=0.1"] == series["wgsef", "k=0.5, lam=1.0"] == "wgsef lambda sweep (k=0.5)"
    assert set(records.loc[records["method"] == "group_lasso", "series"]) == {"group_lasso"}  # lambda is its axis
    ax = plot.acc_vs_sparsity(_runs.aggregate(records)).axes[0]
    lines = {line.get_label(): line for line in ax.get_lines() if not line.get_label().startswith("_")}
    # wgsef's k curve: k = 0.75, 0.5, 0.25 (sparsity 25, 50, 75 %); the lambda sweep is not joined into it
    assert list(lines["wgsef"].get_xdata()) == pytest.approx([25, 50, 75])
    assert list(lines["wgsef"].get_ydata()) == pytest.approx([100 * (0.96 - k / 10) for k in (0.75, 0.5, 0.25)])
    sweep = [c for c in ax.containers if c.get_label() == "wgsef lambda sweep (k=0.5)"]
    assert len(sweep) == 1 and sweep[0].lines[0].get_linestyle() == "None"  # markers only
    hollow = sorted(round(c.lines[0].get_ydata()[0], 6) for c in ax.containers
                    if c.lines[0].get_markerfacecolor() == "none")
    assert hollow == [15, round(100 * (0.197 + 0.5) / 2, 6)]  # wgsef at lam = 1, HSPG: marked, in no curve
    assert "hspg" not in lines  # its only row missed: no curve
    dense = [line for line in ax.get_lines() if line.get_label() == "dense"]
    assert dense[0].get_color() == "black" and dense[0].get_marker() == "*"


def test_default_output_folder_keeps_existing_files(runs, tmp_path, monkeypatch, capsys):
    """Without --out: reports/ (never results/), and a second run refuses to replace its files (one line,
    exit 2, nothing written) unless --force; an explicit --out replaces what it names."""
    monkeypatch.chdir(tmp_path)
    make_table.main([str(runs), "--name", "t"])
    assert (tmp_path / "reports" / "t.csv").exists() and (tmp_path / "reports" / "t.md").exists()
    (tmp_path / "reports" / "t.md").write_text("mine")
    with pytest.raises(SystemExit) as e:
        make_table.main([str(runs), "--name", "t"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "reports/t.csv and 2 more already exist" in err
    assert (tmp_path / "reports" / "t.md").read_text() == "mine"
    make_table.main([str(runs), "--name", "t", "--force"])
    assert (tmp_path / "reports" / "t.md").read_text() != "mine"
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "t.md").write_text("mine")
    make_table.main([str(runs), "--name", "t", "--out", "mine"])
    assert (tmp_path / "mine" / "t.md").read_text().startswith("<!-- command:")

    plot.main([str(runs / "multirun")])
    assert (tmp_path / "reports" / "figures" / "acc_vs_sparsity.png").exists()
    assert (tmp_path / "reports" / "figures" / "widths").is_dir()
    before = (tmp_path / "reports" / "figures" / "acc_vs_sparsity.png").stat().st_mtime_ns
    with pytest.raises(SystemExit) as e:
        plot.main([str(runs / "multirun")])
    assert e.value.code == 2 and "--force" in capsys.readouterr().err
    assert (tmp_path / "reports" / "figures" / "acc_vs_sparsity.png").stat().st_mtime_ns == before
    assert not (tmp_path / "results").exists()


def test_compare_at_k_paired_intervals_match_a_hand_computation(tmp_path):
    """Paired differences over seeds with the 95 % paired t interval, against a hand computation (t_{0.975,4}
    = 2.776445 from a t table); "ahead" only where the interval excludes 0; a collapsed lambda row is
    "did not reach the target", not a point."""
    import compare_at_k

    accs = {("dense", ""): [0.98] * 5, ("wgsef_cont", "k=0.25"): [0.97, 0.98, 0.96, 0.99, 0.97],
            ("gmp", "k=0.25"): [0.96, 0.96, 0.95, 0.97, 0.96],  # A - B = 1, 2, 1, 2, 1 pp
            ("magnitude", "k=0.25"): [0.94, 1.00, 0.95, 1.00, 0.97],  # A - B = 3, -2, 1, -1, 0 pp
            ("hspg", "lam=0.004"): [0.10] * 5}
    sparsity = {"dense": float("nan"), "hspg": 0.76}
    runs = pd.DataFrame([{"run": f"r{i}", "status": "completed", "dataset": "digits", "model": "vgg16",
                          "method": m, "setting": s, "seed": i, "final_test_acc": a}
                         for (m, s), values in accs.items() for i, a in enumerate(values)])
    table = runs.groupby(["dataset", "model", "method", "setting"])["final_test_acc"].agg(["mean", "std", "size"])
    table = table.reset_index().rename(columns={"mean": "final_test_acc_mean", "std": "final_test_acc_std",
                                                "size": "n_seeds"})
    table["group_sparsity_mean"] = table["method"].map(lambda m: sparsity.get(m, 0.75))
    table["n_collapsed"] = (table["method"] == "hspg") * 5  # 10 % on 10 classes: at most 2 x chance
    for col in ("flops_reduction", "speedup_cpu_b64"):
        table[f"{col}_mean"], table[f"{col}_std"] = 2.0, 0.1
    table.to_csv(tmp_path / "demo.csv", index=False)
    runs.to_csv(tmp_path / "demo_runs.csv", index=False)
    compare_at_k.main([str(tmp_path / "demo.csv"), "--out", str(tmp_path / "at_k.md")])
    text = (tmp_path / "at_k.md").read_text()
    pairs = {cells[1]: cells for cells in (line.strip("| ").split(" | ") for line in text.splitlines())
             if len(cells) == 6 and " − " in cells[1]}
    t = 2.776445
    for b, mean, sd, verdict in (("gmp", 1.4, math.sqrt(0.3), "wgsef_cont ahead"),
                                 ("magnitude", 0.2, math.sqrt(3.7), "no clear difference (interval contains 0)")):
        cells = pairs[f"wgsef_cont (k=0.25) − {b} (k=0.25)"]
        low, high = (float(x) for x in cells[4].strip("[]").split(", "))
        assert cells[2] == "5" and float(cells[3]) == pytest.approx(mean, abs=0.005)
        assert low == pytest.approx(mean - t * sd / math.sqrt(5), abs=0.006)
        assert high == pytest.approx(mean + t * sd / math.sqrt(5), abs=0.006)
        assert cells[5] == verdict
    control = pairs["gmp (k=0.25) − magnitude (k=0.25)"]  # the control against the one-shot cut: 2, -4, 0, -3, -1 pp
    assert control[2] == "5" and float(control[3]) == pytest.approx(-1.2, abs=0.005)
    assert compare_at_k.paired_interval([1.0, 2.0, 1.0, 2.0, 1.0])[1] == pytest.approx(1.4 - t * math.sqrt(0.3 / 5),
                                                                                       rel=1e-6)
    assert "| 0.25 | hspg | - | - | did not reach the target (collapsed: lam=0.004 keeps 0.24" in text
