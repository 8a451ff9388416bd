"""The package's pictures: confusion matrix, ROC / PR curves, reliability diagram, learning curves.

Each function returns a matplotlib `Figure` of its own (no pyplot state, nothing
left open): a notebook shows it as a cell's value or with `display(fig)` once
`%matplotlib inline` has run, `fig.savefig(path)` writes it, and
`figure_image(fig)` gives the pixels (TensorBoard's confusion-matrix image).
`EvaluationReport.save` writes the report's pictures with these.
"""

import numpy as np


def _figure(width, height, **kwargs):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained", **kwargs)


def figure_image(fig):
    """The figure's pixels, `uint8` `(height, width, 3)`."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def plot_confusion_matrix(confusion, class_names, title=""):
    """A confusion matrix, rows coloured by their share of the true class.

    The figure grows with the number of classes (about 0.2 inch a class) and
    its labels shrink, so 60 classes stay readable; up to 15 classes each
    cell shows its count.

    Args:
        confusion: `(classes, classes)` counts, rows true, columns predicted.
        class_names: names of the classes (long names are cut to 24 characters).
        title: title above the matrix.

    Example:

    >>> fig = plot_confusion_matrix([[3, 1], [0, 4]], ["cat", "dog"], "pets")
    >>> fig.axes[0].get_title()
    'pets'
    """
    confusion = np.asarray(confusion)
    n = len(confusion)
    shares = confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1)
    size = min(max(3.5 + 0.2 * n, 5.0), 24.0)
    fontsize = max(7.0, min(10.0, 420.0 / max(n, 1)))
    fig = _figure(size + 1.0, size)
    ax = fig.add_subplot()
    shown = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    fig.colorbar(shown, ax=ax, shrink=0.6, label="share of the true class")
    labels = [name if len(name) <= 24 else name[:23] + "\u2026" for name in map(str, class_names)]
    ax.set_xticks(range(n), labels, rotation=90, fontsize=fontsize)
    ax.set_yticks(range(n), labels, fontsize=fontsize)
    ax.set(xlabel="predicted", ylabel="true")
    ax.set_title(title, fontsize=max(fontsize, 9))
    if n <= 15:
        for (i, j), count in np.ndenumerate(confusion):
            if count:
                ax.text(j, i, str(count), ha="center", va="center", fontsize=8,
                        color="white" if shares[i, j] > 0.5 else "black")
    return fig


def plot_curves(report, kind="roc"):
    """One-vs-rest ROC (`kind="roc"`) or precision-recall (`"pr"`) curves of a report."""
    fig = _figure(7, 6)
    ax = fig.add_subplot()
    for name, (x, y) in report.curves[kind].items():
        if kind == "pr":
            ax.step(x, y, where="post", lw=1, alpha=0.8, label=name)
        else:
            ax.plot(x, y, lw=1, alpha=0.8, label=name)
    if kind == "roc":
        ax.plot([0, 1], [0, 1], "k--", lw=0.8)
        ax.set(xlabel="false positive rate", ylabel="true positive rate",
               title=f"ROC, one vs rest (macro AUC {report.roc_auc:.3f})")
    else:
        ax.set(xlabel="recall", ylabel="precision",
               title=f"Precision-recall, one vs rest (macro AP {report.pr_auc:.3f})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    if len(report.curves[kind]) <= 12:
        ax.legend(fontsize=7, loc="lower right" if kind == "roc" else "lower left")
    return fig


def plot_reliability(report):
    """The reliability diagram of an `EvaluationReport`: accuracy against confidence per bin.

    A calibrated model's bars follow the diagonal; bars below it mean
    over-confidence. The bars' shading is their share of the samples.

    Example:

    >>> from keras_mmtl.evaluation import classification_report
    >>> report = classification_report([0, 1, 1], [[.9, .1], [.2, .8], [.6, .4]], ["a", "b"])
    >>> plot_reliability(report).axes[0].get_xlabel()
    'confidence (top probability)'
    """
    bins = report.reliability
    edges = np.linspace(0, 1, len(bins["count"]) + 1)
    shares = np.asarray(bins["count"]) / max(sum(bins["count"]), 1)
    fig = _figure(5.5, 5)
    ax = fig.add_subplot()
    ax.bar(edges[:-1], bins["accuracy"], width=np.diff(edges), align="edge", edgecolor="black",
           lw=0.5, color=[(0.13, 0.4, 0.7, 0.25 + 0.75 * s / max(shares.max(), 1e-12))
                          for s in shares], label="accuracy")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8, label="calibrated")
    calibrated = "" if report.ece_uncalibrated is None else f", T={report.temperature:.2f}"
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence (top probability)", ylabel="accuracy",
           title=f"Reliability (ECE {report.ece:.3f}{calibrated})")
    ax.legend(loc="upper left", fontsize=8)
    return fig


def plot_history(history, metrics=("loss", "macro_f1")):
    """Learning curves of `keras_mmtl.train`'s history: each metric per epoch, train and val.

    A dotted line marks where fine-tuning (phase 2) starts.

    Args:
        history: the dict `train` returns (or `run_experiment(...).history`):
            metric name -> per-epoch values, `val_` for validation, and
            `phase`.
        metrics: metrics to draw, one panel each (those missing are skipped).

    Example:

    >>> history = {"loss": [1.2, 0.8, 0.5], "val_loss": [1.1, 0.9, 0.7], "phase": [1, 1, 2]}
    >>> [ax.get_title() for ax in plot_history(history).axes]
    ['loss']
    """
    shown = [name for name in metrics if name in history or f"val_{name}" in history]
    fig = _figure(4.5 * max(len(shown), 1), 3.6)
    for i, name in enumerate(shown):
        ax = fig.add_subplot(1, len(shown), i + 1)
        for key, label in ((name, "train"), (f"val_{name}", "val")):
            if key in history:
                ax.plot(range(1, len(history[key]) + 1), history[key], marker="o", ms=3,
                        label=label)
        phases = list(history.get("phase", []))
        if 2 in phases:
            ax.axvline(phases.index(2) + 0.5, color="gray", ls=":", lw=1, label="fine-tuning")
        ax.set(title=name, xlabel="epoch")
        ax.legend(fontsize=8)
    return fig
