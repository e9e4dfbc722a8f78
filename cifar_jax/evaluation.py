"""A trained model's evaluation in depth, from its logits on a split: accuracy, per-class
precision and recall, calibration (expected calibration error, reliability), negative
log-likelihood, the confusion matrix and the most confident mistakes; written as

  <run>/evaluation/<split>/summary.md, per_class.csv, confusion_matrix.png, reliability.png,
                           mistakes.png

`python -m cifar_jax.evaluate` is the command; the grid's report calls `evaluate_split` for each
selected trial and takes its test accuracy from it, so the test split is evaluated once.
"""

import csv
import dataclasses
import io
import os
from typing import Any, Dict, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from cifar_jax import input_pipeline, workdir as workdir_lib  # noqa: E402

ECE_BINS = 15
MISTAKES = 36  # the most confident mistakes drawn (a 6 x 6 grid)


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """What a split's logits say about a model."""

    classes: Sequence[str]
    labels: np.ndarray  # [N]
    probs: np.ndarray  # [N, classes], softmax of the logits
    nll: float  # mean negative log-likelihood (the cross-entropy loss)

    @property
    def predicted(self) -> np.ndarray:
        return self.probs.argmax(1)

    @property
    def confidence(self) -> np.ndarray:
        return self.probs.max(1)

    @property
    def accuracy(self) -> float:
        return float(np.mean(self.predicted == self.labels))

    def confusion(self) -> np.ndarray:
        """[true class, predicted class] counts."""
        k = len(self.classes)
        return np.bincount(self.labels * k + self.predicted, minlength=k * k).reshape(k, k)

    def per_class(self) -> Dict[str, np.ndarray]:
        c = self.confusion()
        with np.errstate(invalid="ignore", divide="ignore"):
            return {"support": c.sum(1), "recall": np.diag(c) / c.sum(1),
                    "precision": np.diag(c) / c.sum(0)}

    def calibration(self, bins: int = ECE_BINS) -> Dict[str, np.ndarray]:
        """Per confidence bin (equal widths over [0, 1]): count, mean confidence, accuracy."""
        index = np.minimum((self.confidence * bins).astype(int), bins - 1)
        count = np.bincount(index, minlength=bins)
        with np.errstate(invalid="ignore", divide="ignore"):
            conf = np.bincount(index, self.confidence, bins) / count
            acc = np.bincount(index, self.predicted == self.labels, bins) / count
        return {"count": count, "confidence": conf, "accuracy": acc}

    def ece(self, bins: int = ECE_BINS) -> float:
        """Expected calibration error: the bins' |accuracy - confidence|, weighted by size."""
        c = self.calibration(bins)
        gaps = np.nan_to_num(np.abs(c["accuracy"] - c["confidence"]))
        return float(np.sum(c["count"] * gaps) / len(self.labels))


def log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = np.asarray(logits, np.float64)
    shifted = logits - logits.max(1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(1, keepdims=True))


def softmax(logits: np.ndarray) -> np.ndarray:
    return np.exp(log_softmax(logits))


def from_logits(logits: np.ndarray, labels: np.ndarray, classes: Sequence[str]) -> Evaluation:
    bad = int(np.sum(~np.all(np.isfinite(logits), axis=1)))
    if bad:  # e.g. BatchNorm statistics that overflowed while the training loss stayed finite
        raise ValueError(f"the model's logits are not finite for {bad} of {len(logits)} images "
                         "(its weights or BatchNorm statistics overflowed in training): an "
                         "evaluation of it would mean nothing.")
    log_probs = log_softmax(logits)
    nll = float(-np.mean(log_probs[np.arange(len(labels)), labels]))
    return Evaluation(tuple(classes), np.asarray(labels), np.exp(log_probs), nll)


# ----------------------------------------------------------------------------------------------
# Figures.


def confusion_figure(e: Evaluation):
    """Counts and row-normalised (recall per true class), class names on both axes; each cell
    holds its number where there are few classes (CIFAR-10), colour alone where there are
    many (CIFAR-100)."""
    c = e.confusion()
    rows = c / np.maximum(c.sum(1, keepdims=True), 1)
    few = len(e.classes) <= 20
    fig, axes = plt.subplots(1, 2, figsize=(16, 7) if few else (24, 12), constrained_layout=True)
    for ax, values, title, fmt in ((axes[0], c, "counts", "{:d}"),
                                   (axes[1], 100 * rows, "row-normalised (%)", "{:.0f}")):
        ax.imshow(values, cmap="Blues")
        ticks = range(len(e.classes))
        ax.set(xticks=ticks, yticks=ticks, xticklabels=e.classes, yticklabels=e.classes,
               xlabel="predicted class", ylabel="true class", title=f"Confusion matrix: {title}")
        ax.tick_params(axis="x", rotation=45 if few else 90)
        ax.tick_params(labelsize=None if few else 4)
        for i in ticks if few else ():
            for j in ticks:
                ax.text(j, i, fmt.format(values[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if values[i, j] > 0.6 * values.max() else "black")
    return fig


def reliability_figure(e: Evaluation):
    """Accuracy against confidence per bin, the diagonal of perfect calibration, the ECE."""
    c = e.calibration()
    centers = (np.arange(ECE_BINS) + 0.5) / ECE_BINS
    fig, ax = plt.subplots(figsize=(6, 6), constrained_layout=True)
    filled = c["count"] > 0
    ax.bar(centers[filled], c["accuracy"][filled], width=1 / ECE_BINS, edgecolor="black",
           alpha=0.7, label="accuracy in the bin")
    ax.plot([0, 1], [0, 1], "k--", label="perfect calibration")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence (top-1 probability)", ylabel="accuracy",
           title=f"Reliability ({ECE_BINS} bins): ECE {100 * e.ece():.2f}%")
    ax.legend(loc="upper left")
    return fig


def mistakes_figure(e: Evaluation, images: np.ndarray, count: int = MISTAKES):
    """The most confident mistakes, each titled true vs predicted (with the confidence)."""
    wrong = np.flatnonzero(e.predicted != e.labels)
    wrong = wrong[np.argsort(-e.confidence[wrong])][:count]
    side = int(np.ceil(np.sqrt(count)))
    fig, axes = plt.subplots(side, side, figsize=(2 * side, 2.2 * side), constrained_layout=True)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, wrong):
        ax.imshow(images[i], interpolation="nearest")
        ax.set_title(f"true {e.classes[e.labels[i]]}\npred {e.classes[e.predicted[i]]} "
                     f"({100 * e.confidence[i]:.0f}%)", fontsize=8)
    fig.suptitle(f"The {len(wrong)} most confident mistakes")
    return fig


# ----------------------------------------------------------------------------------------------
# Files.


def summary_markdown(e: Evaluation, title: str, about: str) -> str:
    pc = e.per_class()
    lines = [f"# {title}", "", about, "",
             f"- accuracy: {100 * e.accuracy:.2f}% ({len(e.labels)} images)",
             f"- negative log-likelihood: {e.nll:.4f}",
             f"- expected calibration error ({ECE_BINS} equal-width confidence bins): "
             f"{100 * e.ece():.2f}%", "",
             "| class | images | precision | recall (the class's accuracy) |",
             "| --- | ---: | ---: | ---: |"]
    for k, name in enumerate(e.classes):
        lines.append(f"| {name} | {pc['support'][k]} | {_pct(pc['precision'][k])} | "
                     f"{_pct(pc['recall'][k])} |")
    lines += ["", "Figures: [confusion matrix](confusion_matrix.png), "
              "[reliability diagram](reliability.png), [most confident mistakes](mistakes.png)."]
    return "\n".join(lines) + "\n"


def _pct(x: float) -> str:
    return "–" if not np.isfinite(x) else f"{100 * x:.2f}%"


def per_class_csv(e: Evaluation) -> str:
    pc = e.per_class()
    out = io.StringIO()
    w = csv.writer(out)
    w.writerow(["class", "images", "precision", "recall"])
    for k, name in enumerate(e.classes):
        w.writerow([name, int(pc["support"][k]), f"{pc['precision'][k]:.6f}",
                    f"{pc['recall'][k]:.6f}"])
    return out.getvalue()


def write(e: Evaluation, images: np.ndarray, directory: str, title: str, about: str) -> None:
    """summary.md, per_class.csv and the three figures in `directory`."""
    os.makedirs(directory, exist_ok=True)
    workdir_lib.write_text_atomic(os.path.join(directory, "summary.md"),
                                  summary_markdown(e, title, about))
    workdir_lib.write_text_atomic(os.path.join(directory, "per_class.csv"), per_class_csv(e))
    for name, figure in (("confusion_matrix.png", lambda: confusion_figure(e)),
                         ("reliability.png", lambda: reliability_figure(e)),
                         ("mistakes.png", lambda: mistakes_figure(e, images))):
        _save(figure(), os.path.join(directory, name))  # one open figure at a time


def _save(fig, path: str) -> None:
    tmp = path + ".tmp.png"
    try:
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, path)
    except OSError as e:
        raise workdir_lib.write_error(os.path.dirname(path), e, what=f"write {path}",
                                      then="run the command again") from e
    finally:
        plt.close(fig)


def evaluate_split(trained, split: input_pipeline.Split, name: str, predictor,
                   write_files: bool = True) -> Evaluation:
    """The evaluation of `trained` (an inference.TrainedModel) on `split` with its
    `predictor` (an inference.Predictor), written to <run>/evaluation/<name>/ unless
    `write_files` is False."""
    e = from_logits(predictor(split.images), split.labels, trained.classes)
    if write_files:
        about = (f"{trained.description}; {name} split; the weights the run's reported accuracy "
                 f"came from{', with flip test-time augmentation' if predictor.tta_flip else ''}.")
        write(e, split.images, os.path.join(trained.workdir, "evaluation", name),
              f"Evaluation on the {trained.info.title} {name} split", about)
    return e


def summary_fields(e: Evaluation) -> Dict[str, Any]:
    return {"accuracy": e.accuracy, "loss": e.nll, "ece": e.ece()}
