"""Evaluation pictures: precision-recall curves and the confusion matrix (PNG, matplotlib)."""
import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and in tests
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def save_pr_curves(recall, precision_per_class, class_names, path):
  """Per-class precision over recall (COCOeval's 101 points at IoU 0.5) and their mean over the
  classes that have ground truth; AP50 in the legend."""
  figure, axes = plt.subplots(figsize=(8, 6), dpi=100)
  present = [k for k in range(len(class_names)) if (precision_per_class[k] > -1).any()]
  show_legend_per_class = len(present) <= 20
  for k in present:
    precision = np.clip(precision_per_class[k], 0, None)
    axes.plot(recall, precision, linewidth=1,
              label=f"{class_names[k]} {precision.mean():.3f}" if show_legend_per_class else None)
  if present:
    mean = np.clip(precision_per_class[present], 0, None).mean(axis=0)
    axes.plot(recall, mean, color="blue", linewidth=3, label=f"all classes {mean.mean():.3f} AP50")
  axes.set(xlabel="Recall", ylabel="Precision", xlim=(0, 1), ylim=(0, 1.01),
           title="Precision-recall at IoU 0.5")
  axes.legend(loc="lower left", fontsize="small")
  figure.tight_layout()
  figure.savefig(path)
  plt.close(figure)
  return path


def save_confusion_matrix(matrix, class_names, path):
  """The (K + 1, K + 1) counts [predicted, true] with a background row and column, each true
  class's column normalised to 1 (what fraction of its objects went where)."""
  names = list(class_names) + ["background"]
  columns = matrix.sum(axis=0, keepdims=True)
  normalised = np.where(columns > 0, matrix / np.maximum(columns, 1), np.nan)
  size = max(6, 0.35 * len(names))
  figure, axes = plt.subplots(figsize=(size, size * 0.85), dpi=100)
  image = axes.imshow(normalised, cmap="Blues", vmin=0, vmax=1)
  figure.colorbar(image, ax=axes, fraction=0.046)
  if len(names) <= 30:
    ticks = np.arange(len(names))
    axes.set_xticks(ticks, names, rotation=90, fontsize="small")
    axes.set_yticks(ticks, names, fontsize="small")
    for (row, column), value in np.ndenumerate(normalised):
      if np.isfinite(value) and value >= 0.005:
        axes.text(column, row, f"{value:.2f}", ha="center", va="center", fontsize="x-small",
                  color="white" if value > 0.5 else "black")
  axes.set(xlabel="True", ylabel="Predicted", title="Confusion matrix (columns normalised)")
  figure.tight_layout()
  figure.savefig(path)
  plt.close(figure)
  return path
