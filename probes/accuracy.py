"""Top-1 / top-5 accuracy of a classifier's logits: the one helper every probe family uses."""

from __future__ import annotations

from torch import Tensor

TOP_K = 5


def topk_hits(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample top-1 and top-5 hits (bool [B] each) of logits [B, K] against class labels [B].

    With fewer than 5 classes the second is top-K (every sample is a hit)."""
    top = logits.topk(min(TOP_K, logits.shape[1]), dim=-1).indices
    return top[:, 0] == labels, (top == labels[:, None]).any(-1)


def accuracy_figures(top1: Tensor, top5: Tensor, num_classes: int) -> dict[str, float]:
    """{"val/acc": top-1 accuracy, "val/acc_top5": top-5 accuracy} from the hits of a split.

    Top-5 is reported only with more than 5 classes (otherwise it is 1 by construction)."""
    figures = {"val/acc": float(top1.float().mean())}
    if num_classes > TOP_K:
        figures["val/acc_top5"] = float(top5.float().mean())
    return figures
