"""The study's report: results table, best configuration per model, effects, plots.

  python -m cifar_jax.report --workdir runs/grid

Aggregates whatever trials have finished (any number of shards may have written them), evaluates
the test split for the selected trial of each model only (selection uses validation accuracy,
ties broken by lower validation loss), and writes results.csv, summary.md and plots/.
"""

import csv
import json
import math
import os
import statistics
from typing import Any, Dict, List, Optional

import ml_collections
from absl import app, flags, logging

from cifar_jax import grid, input_pipeline, metric_writing

PUBLISHED_BEST_VAL = {"resnet18": 0.88, "alexnet": 0.74, "mobilenetv2": 0.80}
HYPERPARAMETERS = ("optimizer", "learning_rate", "weight_decay", "augmentation", "dropout_rate")
CSV_COLUMNS = ("framework", "model", "name", "optimizer", "learning_rate", "weight_decay", "augmentation",
               "dropout_rate", "seed", "status", "best_val_accuracy", "best_epoch",
               "final_val_accuracy", "final_val_loss", "test_accuracy", "selected", "num_params",
               "train_time_s", "images_per_sec", "error")


def collect(workdir: str, trials: List[grid.Trial]) -> List[Dict[str, Any]]:
    rows = []
    for t in trials:
        result = metric_writing.read_json(os.path.join(workdir, t.relpath, "result.json")) or {}
        row = {**t.hyperparameters(), "name": t.name, "trial": t,
               "status": grid.trial_status(workdir, t)}
        for key in CSV_COLUMNS:
            if key not in row:
                row[key] = result.get(key)
        row["selected"] = bool(result.get("selected"))
        rows.append(row)
    return rows


def select_best(rows: List[Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
    """Per model: highest best val accuracy, ties broken by lower final val loss."""
    best: Dict[str, Dict[str, Any]] = {}
    for r in rows:
        if r["status"] != "completed" or r["best_val_accuracy"] is None:
            continue
        key = (r["best_val_accuracy"], -(r["final_val_loss"] if r["final_val_loss"] is not None
                                         else math.inf))
        cur = best.get(r["model"])
        if cur is None or key > (cur["best_val_accuracy"], -(cur["final_val_loss"] or math.inf)):
            best[r["model"]] = r
    return best


def _evaluate_selected(workdir, config, best, dataset):
    from cifar_jax import train

    for model, r in best.items():
        path = os.path.join(workdir, r["trial"].relpath, "result.json")
        result = metric_writing.read_json(path)
        if result.get("selected") and result.get("test_accuracy") is not None:
            r["test_accuracy"], r["selected"] = result["test_accuracy"], True
            continue
        if dataset is None:
            dataset = input_pipeline.load_dataset(config.data)
        tc = grid.trial_config(config, r["trial"])
        trial_dir = os.path.join(workdir, r["trial"].relpath)
        if tc.get("framework", "jax") == "torch":
            from cifar_jax.torch_twin import train as torch_train
            t = torch_train.evaluate_checkpoint(tc, trial_dir, dataset.test)
        else:
            t = train.evaluate_checkpoint(tc, trial_dir, dataset.test)
        result.update(selected=True, test_accuracy=t["accuracy"], test_loss=t["loss"])
        metric_writing.write_json_atomic(path, result)
        r["test_accuracy"], r["selected"] = t["accuracy"], True
        logging.info("Selected %s/%s: test accuracy %.2f%% (best checkpoint)", model,
                     r["name"], 100 * t["accuracy"])


def _unmark_stale(workdir, rows, best):
    """A trial selected by an earlier report (fewer trials had finished) loses the mark."""
    for r in rows:
        if r["selected"] and best.get(r["model"]) is not r:
            path = os.path.join(workdir, r["trial"].relpath, "result.json")
            result = metric_writing.read_json(path)
            result["selected"] = False
            metric_writing.write_json_atomic(path, result)
            r["selected"] = False
            r["test_accuracy"] = None


def _pct(x: Optional[float]) -> str:
    return "" if x is None else f"{100 * x:.2f}%"


def summary_markdown(rows, best) -> str:
    lines = ["# Summary of best hyperparameters", "",
             "| model | optimizer | lr | weight decay | augmentation | dropout | best val acc "
             "| test acc | published best val acc |",
             "| --- | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: |"]
    for model, r in best.items():
        lines.append(f"| {model} | {r['optimizer']} | {r['learning_rate']:g} | "
                     f"{r['weight_decay']:g} | {r['augmentation']} | "
                     f"{'' if r['dropout_rate'] is None else r['dropout_rate']} | "
                     f"{_pct(r['best_val_accuracy'])} | {_pct(r['test_accuracy'])} | "
                     f"{_pct(PUBLISHED_BEST_VAL.get(model))} |")
    counts = {s: sum(r["status"] == s for r in rows) for s in {r["status"] for r in rows}}
    lines += ["", "Trials: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())), "",
              "# Effect of each hyperparameter", "",
              "Mean best validation accuracy over the completed trials with each value "
              "(n = number of trials).", ""]
    for model in dict.fromkeys(r["model"] for r in rows):
        done = [r for r in rows if r["model"] == model and r["status"] == "completed"]
        if not done:
            continue
        lines += [f"## {model}", "", "| hyperparameter | value | mean best val acc | n |",
                  "| --- | --- | ---: | ---: |"]
        for hp in HYPERPARAMETERS:
            values = sorted({r[hp] for r in done if r[hp] is not None}, key=str)
            if len(values) < 2:
                continue
            for v in values:
                accs = [r["best_val_accuracy"] for r in done if r[hp] == v]
                lines.append(f"| {hp} | {v} | {_pct(statistics.mean(accs))} | {len(accs)} |")
        seeds = {}
        for r in done:
            seeds.setdefault(r["name"].rsplit("_seed", 1)[0], []).append(r["best_val_accuracy"])
        repeated = {k: v for k, v in seeds.items() if len(v) > 1}
        if repeated:
            lines += ["", "| configuration | seeds | mean best val acc | std |", "| --- | ---: | ---: | ---: |"]
            for k, v in repeated.items():
                lines.append(f"| {k} | {len(v)} | {_pct(statistics.mean(v))} | "
                             f"{100 * statistics.stdev(v):.2f} pp |")
        lines.append("")
    return "\n".join(lines) + "\n"


def _curve(workdir, trial):
    path = os.path.join(workdir, trial.relpath, "metrics.jsonl")
    if not os.path.exists(path):
        return [], []
    with open(path) as f:
        recs = [json.loads(line) for line in f if line.strip()]
    recs = [r for r in recs if "val_accuracy" in r]
    return [r["epoch"] for r in recs], [r["val_accuracy"] for r in recs]


def _save_epoch_plot(fig, ax, title: str, path: str):
    """Titles, labels and saves a validation-accuracy-per-epoch figure, then closes it."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    ax.set(title=title, xlabel="epoch", ylabel="val accuracy")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_plots(workdir: str, rows, best, default_trial: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = os.path.join(workdir, "plots")
    os.makedirs(out, exist_ok=True)
    for model in dict.fromkeys(r["model"] for r in rows):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        others = False
        for r in rows:
            if r["model"] != model:
                continue
            x, y = _curve(workdir, r["trial"])
            if not x:
                continue
            is_best = best.get(model) is r
            label = f"best: {r['name']}" if is_best else (None if others else "other trials")
            others = others or not is_best
            ax.plot(x, y, color="C3" if is_best else "0.55", lw=2.5 if is_best else 1,
                    alpha=1 if is_best else 0.7, zorder=3 if is_best else 1, label=label,
                    marker="o" if is_best else ".")
        _save_epoch_plot(fig, ax, f"{model}: validation accuracy per epoch, every trial",
                         os.path.join(out, f"{model}_val_curves.png"))

        default = next((r for r in rows if r["model"] == model
                        and r["name"].startswith(default_trial)), None)
        if best.get(model) is not None:
            fig, ax = plt.subplots(figsize=(6, 4))
            for r, label, color in ((default, "default", "C0"), (best[model], "best", "C3")):
                if r is None:
                    continue
                x, y = _curve(workdir, r["trial"])
                ax.plot(x, y, marker="o", color=color, label=f"{label}: {r['name']}")
            same = default is best[model]
            _save_epoch_plot(fig, ax, f"{model}: before and after tuning"
                             + (" (the default is the best)" if same else ""),
                             os.path.join(out, f"{model}_default_vs_best.png"))

    sel = [r for r in best.values() if r["test_accuracy"] is not None]
    if sel:
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for ax, key, label in ((axes[0], "num_params", "parameters (millions)"),
                               (axes[1], "images_per_sec", "training images/s")):
            for r in sel:
                x = r[key] / 1e6 if key == "num_params" else r[key]
                if x is None:
                    continue
                ax.scatter(x, 100 * r["test_accuracy"], s=60)
                ax.annotate(r["model"], (x, 100 * r["test_accuracy"]),
                            textcoords="offset points", xytext=(5, 5))
            ax.set(xlabel=label, ylabel="test accuracy (%)")
            ax.grid(alpha=0.3)
        fig.suptitle("Selected configuration per model: test accuracy vs size and speed")
        fig.tight_layout()
        fig.savefig(os.path.join(out, "model_comparison.png"), dpi=110)
        plt.close(fig)


def write_report(workdir: str, config: ml_collections.ConfigDict,
                 dataset: Optional[input_pipeline.Dataset] = None) -> Dict[str, Any]:
    trials = grid.expand(config)
    rows = collect(workdir, trials)
    best = select_best(rows)
    _unmark_stale(workdir, rows, best)
    _evaluate_selected(workdir, config, best, dataset)
    with open(os.path.join(workdir, "results.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in CSV_COLUMNS})
    summary = summary_markdown(rows, best)
    with open(os.path.join(workdir, "summary.md"), "w") as f:
        f.write(summary)
    write_plots(workdir, rows, best, config.grid.default_trial)
    logging.info("Report: %s/results.csv, summary.md, plots/", workdir)
    return {"rows": rows, "best": best}


def main(argv):
    del argv
    FLAGS = flags.FLAGS
    config_path = os.path.join(FLAGS.workdir, "grid_config.json")
    stored = metric_writing.read_json(config_path)
    if stored is None:
        raise app.UsageError(f"{config_path} not found: is {FLAGS.workdir!r} a grid workdir?")
    write_report(FLAGS.workdir, ml_collections.ConfigDict(stored))
    with open(os.path.join(FLAGS.workdir, "summary.md")) as f:
        print(f.read())


if __name__ == "__main__":
    # Flags only when run as a program: the grid imports this module beside main's flags.
    flags.DEFINE_string("workdir", None, "A grid's workdir (holds grid_config.json).")
    flags.mark_flag_as_required("workdir")
    app.run(main)
