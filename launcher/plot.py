"""The loss curve: training and eval loss against optimizer steps, as a PNG."""

from __future__ import annotations

from pathlib import Path

from entrypoint.progress import Progress


def write_loss_png(progress: Progress, path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and in CI
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    if progress.train_loss:
        ax.plot(*zip(*progress.train_loss, strict=True), label="train loss", color="tab:blue")
    if progress.eval_loss:
        ax.plot(*zip(*progress.eval_loss, strict=True), label="eval loss", color="tab:orange", marker="o")
    if not progress.train_loss and not progress.eval_loss:
        ax.text(0.5, 0.5, "no loss logged yet", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if progress.train_loss or progress.eval_loss:
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    plt.close(fig)
    return path
