"""ROC curve figures for IJB 1:1 verification (METHOD V2), drawn with matplotlib's Agg backend."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def pyplot():
    """matplotlib's pyplot on the Agg backend, imported on first use: a training process,
    which imports the evaluation code but never draws, does not pay matplotlib's import."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_roc(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: str | Path,
             title: str = "ROC") -> Path:
    """Write a log-FAR ROC plot of ``{label: (fpr, tpr)}`` to ``path`` (PNG); returns the path."""
    plt = pyplot()
    figure, axes = plt.subplots(figsize=(6, 4.5))
    for label, (fpr, tpr) in curves.items():
        positive = fpr > 0
        axes.plot(fpr[positive], tpr[positive], lw=1.2, label=label)
    axes.set_xscale("log")
    axes.set_xlim(1e-6, 1.0)
    axes.set_ylim(0.0, 1.0)
    axes.set_xlabel("False accept rate")
    axes.set_ylabel("True accept rate")
    axes.set_title(title)
    axes.grid(linestyle="--", linewidth=0.5)
    axes.legend(loc="lower right")
    figure.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return Path(path)
