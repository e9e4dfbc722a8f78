"""The report's figures. Each `*_figure` function returns a matplotlib Figure (the tests inspect
those objects); `write_plots` saves them under `<grid workdir>/plots/`.

All accuracies are in percent and epochs are integers, as in summary.md.
"""

import os
from typing import Any, Dict, List, Optional, Tuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from absl import logging  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from cifar_jax import models, workdir as workdir_lib  # noqa: E402

BEST_STYLE = dict(color="black", lw=2.8, marker="o", zorder=5)


def curve(workdir: str, row) -> Tuple[List[int], List[float]]:
    """(epochs, validation accuracy in percent) of one trial."""
    records = workdir_lib.read_jsonl(os.path.join(workdir, row["trial"].relpath,
                                                  "metrics.jsonl"))
    records = [r for r in records if "val_accuracy" in r]
    return [r["epoch"] for r in records], [100 * r["val_accuracy"] for r in records]


def _finish_axes(ax, title: str) -> None:
    ax.set(title=title, xlabel="epoch", ylabel="validation accuracy (%)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)


def val_curves_figure(workdir: str, rows, model: str, best_name: Optional[str]):
    """Every trial of `model`, one panel per optimizer, each line named in its legend."""
    mine = [r for r in rows if r["model"] == model]
    optimizers = sorted({r["optimizer"] for r in mine})
    fig, axes = plt.subplots(len(optimizers), 1, figsize=(11, 3.6 * len(optimizers)),
                             sharex=True, squeeze=False)
    colours = plt.get_cmap("tab20").colors
    for ax, opt in zip(axes[:, 0], optimizers):
        panel = [r for r in mine if r["optimizer"] == opt]
        for i, r in enumerate(panel):
            x, y = curve(workdir, r)
            if not x:
                continue
            label = r["name"][len(opt) + 1:] or r["name"]
            if r["trial"].config_name == best_name:
                ax.plot(x, y, label=f"best: {label}", **BEST_STYLE)
            else:
                ax.plot(x, y, color=colours[i % len(colours)], lw=1.2, marker=".",
                        ls="-" if i < len(colours) else "--", label=label)
        _finish_axes(ax, f"{model}, {opt}: validation accuracy per epoch ({len(panel)} trials)")
        if ax.get_lines():
            ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7,
                      ncol=1 if len(panel) <= 16 else 2, frameon=False)
    fig.tight_layout()
    return fig


def baseline_row(rows, model: str, default_trial: str):
    """The grid's untuned baseline trial of `model` (seed 0), or None if not in the grid."""
    candidates = [r for r in rows if r["model"] == model and r["seed"] in (0, None)
                  and (r["trial"].config_name == default_trial
                       or r["trial"].config_name.startswith(default_trial + "_"))]
    default_dropout = models.dropout_rate(model)
    candidates.sort(key=lambda r: r.get("dropout_rate") not in (None, default_dropout))
    return candidates[0] if candidates else None


def baseline_figure(workdir: str, rows, model: str, best_row, default_trial: str):
    """The untuned baseline against the best configuration; says so when either is missing."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    base = baseline_row(rows, model, default_trial)
    notice = None
    if base is None:
        notice = (f"The untuned baseline {default_trial} is not in this grid: only the best "
                  "trial is drawn.")
    elif base["trial"].config_name == best_row["trial"].config_name:
        notice = f"The untuned baseline {default_trial} is the best configuration."
    for r, label, style in ((best_row, "best", BEST_STYLE),
                            (base, "untuned baseline", dict(color="C0", marker="s"))):
        if r is not None and not (label != "best" and r is best_row):
            x, y = curve(workdir, r)
            ax.plot(x, y, label=f"{label}: {r['name']}", **style)
    _finish_axes(ax, f"{model}: before and after tuning")
    if notice:
        ax.text(0.5, 0.03, notice, transform=ax.transAxes, ha="center", va="bottom",
                fontsize=8, wrap=True, bbox=dict(facecolor="lightyellow", edgecolor="0.6"))
        logging.info("%s: %s", model, notice)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    return fig


def comparison_figure(selected: Dict[str, List[Dict[str, Any]]]):
    """Test accuracy (mean over seeds) of each model's selected configuration against its size
    and its training throughput."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((axes[0], "num_params", "parameters (millions)"),
                           (axes[1], "images_per_sec", "training images/s per trial")):
        for model, rows in selected.items():
            tests = [r["test_accuracy"] for r in rows if r.get("test_accuracy") is not None]
            xs = [r[key] for r in rows if r.get(key) is not None]
            if not tests or not xs:
                continue
            x = sum(xs) / len(xs) / (1e6 if key == "num_params" else 1)
            y = 100 * sum(tests) / len(tests)
            ax.scatter(x, y, s=60)
            ax.annotate(model, (x, y), textcoords="offset points", xytext=(5, 5))
        ax.set(xlabel=label, ylabel="test accuracy (%)")
        ax.grid(alpha=0.3)
    fig.suptitle("Selected configuration per model: test accuracy vs size and speed")
    fig.tight_layout()
    return fig


def write_plots(workdir: str, rows, best, selected, default_trial: str,
                dataset: str = "CIFAR-10") -> None:
    """The report's figures, each naming the data set (`dataset`: its title) in a corner."""
    out = os.path.join(workdir, "plots")
    os.makedirs(out, exist_ok=True)

    def save(fig, name):
        fig.text(0.995, 0.005, dataset, ha="right", va="bottom", fontsize=8, color="0.35")
        tmp = os.path.join(out, f".{name}.tmp.png")
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
        plt.close(fig)
        os.replace(tmp, os.path.join(out, name))

    for model in dict.fromkeys(r["model"] for r in rows):
        config = best.get(model)
        save(val_curves_figure(workdir, rows, model, config.name if config else None),
             f"{model}_val_curves.png")
        if config is not None and default_trial:
            save(baseline_figure(workdir, rows, model, config.rows[0], default_trial),
                 f"{model}_default_vs_best.png")
    if any(r.get("test_accuracy") is not None for rs in selected.values() for r in rs):
        save(comparison_figure(selected), "model_comparison.png")
