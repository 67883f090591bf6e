"""PNG plots a person would rather look at than read: loss curves, predicted vs true, confusion matrix."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers
import matplotlib.pyplot as plt  # noqa: E402


def loss_curves(history: list[dict], path: Path) -> None:
    epochs = [r["epoch"] for r in history]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(epochs, [r["train_loss"] for r in history], label="train")
    ax.plot(epochs, [r.get("val_loss") for r in history], label="validation")
    ax.set(xlabel="epoch", ylabel="loss", title="Loss per epoch", yscale="log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


MAX_PANELS = 4  # a regression with more targets shows its first four: one row of panels each


def predicted_vs_true(true, pred, output, path: Path, max_points: int = 5000) -> list[str]:
    """One row per target value of `output` (a t2d.Output; `true` and `pred` are (N, output.size)): left,
    predictions against the truth; right, the error, which the left panel is too coarse to show. Returns the
    x-axis label of each row."""
    true, pred = true[:max_points].reshape(len(true[:max_points]), -1), pred[:max_points].reshape(len(true[:max_points]), -1)
    columns = min(true.shape[1], MAX_PANELS)
    fig, axes = plt.subplots(columns, 2, figsize=(11, 5 * columns), squeeze=False)
    for c, (ax, ax_err) in enumerate(axes):
        t, p = true[:, c].tolist(), pred[:, c].tolist()
        name = output.name if true.shape[1] == 1 else f"{output.name}[{c}]"
        err = [a - b for a, b in zip(p, t, strict=True)]
        ax.scatter(t, p, s=3, alpha=0.4)
        lo, hi = min(t), max(t)
        ax.plot([lo, hi], [lo, hi], color="black", linewidth=1, label="y = x")
        ax.set(xlabel=f"true {name}", ylabel=f"predicted {name}",
               title=f"Test set: predicted vs true ({len(t)} points)")
        ax.legend()
        ax_err.scatter(t, err, s=3, alpha=0.4, color="tab:red")
        ax_err.axhline(0, color="black", linewidth=1)
        ax_err.set(xlabel=f"true {name}", ylabel="predicted - true", title="Error in raw units")
        for a in (ax, ax_err):
            a.grid(alpha=0.3)
    if true.shape[1] > columns:
        fig.suptitle(f"the first {columns} of {output.name}'s {true.shape[1]} values")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [row[0].get_xlabel() for row in axes]


def confusion_matrix(confusion: list[list[int]], classes: list[str], path: Path) -> None:
    n = len(confusion)
    fig, ax = plt.subplots(figsize=(7.5, 6.5))
    im = ax.imshow(confusion, cmap="Blues")
    ax.set_xticks(range(n), classes[:n], rotation=45, ha="right")
    ax.set_yticks(range(n), classes[:n])
    ax.set(xlabel="predicted", ylabel="true", title="Test set confusion matrix")
    top = max(max(row) for row in confusion) or 1
    for i in range(n):
        for j in range(n):
            ax.text(j, i, confusion[i][j], ha="center", va="center", fontsize=7,
                    color="white" if confusion[i][j] > top / 2 else "black")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
