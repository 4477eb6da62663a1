"""What GELU's tanh approximation costs a model, measured on images, and the limit on it.

`optimize_for_inference(model, gelu="tanh")` (and `moat export onnx --gelu tanh`) replaces
the exact erf GELU by 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), which oneDNN and
ONNX Runtime (opset-20 Gelu, approximate="tanh") compute about twice as fast; it is not the model's function, so it
is offered only with its cost measured:

* the largest logit deviation from the exact model on the images;
* top-1 of both (labelled images: a trained run's validation set) and the share of images
  whose top-1 class changes. The option is refused when top-1 drops by more than
  `TOP1_LIMIT` points, or, without labels, when more than `TOP1_LIMIT` percent of the
  images change class (a bound on any labelling's top-1 change).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from moat.errors import InvalidInputError, MoatError
from moat.export.fused import optimize_for_inference

__all__ = ["TOP1_LIMIT", "GeluApproximationRefused", "check_gelu_cost", "format_gelu_cost",
           "gelu_cost"]

TOP1_LIMIT = 0.1  # points of top-1 (percent) the tanh GELU may cost


class GeluApproximationRefused(MoatError):
    """The tanh GELU moves the model's top-1 by more than TOP1_LIMIT points."""


def gelu_cost(model: nn.Module,
              batches: Iterable[tuple[Tensor, Tensor | None] | Tensor]) -> dict:
    """Exact against tanh GELU on `batches` of images ([B, 3, H, W], optionally with labels).

    Both forms run through `optimize_for_inference` (same folding, same kernels), so the
    difference is the GELU's alone. Returns images, max_logit_deviation, changed_top1
    (percent of images whose predicted class changes), and, for labelled batches,
    top1_exact and top1_tanh (percent).
    """
    exact = optimize_for_inference(model, gelu="exact")
    tanh = optimize_for_inference(model, gelu="tanh")
    count = changed = hits_exact = hits_tanh = labelled = 0
    deviation = 0.0
    with torch.inference_mode():
        for batch in batches:
            images, labels = batch if isinstance(batch, (tuple, list)) else (batch, None)
            images = torch.as_tensor(images).float()
            a, b = exact(images).float(), tanh(images).float()
            deviation = max(deviation, float((a - b).abs().max()))
            top_a, top_b = a.argmax(-1), b.argmax(-1)
            count += len(images)
            changed += int((top_a != top_b).sum())
            if labels is not None:
                labels = torch.as_tensor(labels).view(-1)
                labelled += len(labels)
                hits_exact += int((top_a == labels).sum())
                hits_tanh += int((top_b == labels).sum())
    if count == 0:
        raise InvalidInputError("no images to measure the tanh GELU on")
    cost = {"images": count, "max_logit_deviation": deviation,
            "changed_top1": 100.0 * changed / count, "top1_exact": None, "top1_tanh": None}
    if labelled:
        cost.update(top1_exact=100.0 * hits_exact / labelled,
                    top1_tanh=100.0 * hits_tanh / labelled)
    return cost


def format_gelu_cost(cost: dict) -> str:
    line = (f"tanh GELU vs exact on {cost['images']} images: largest logit deviation "
            f"{cost['max_logit_deviation']:.2e}, top-1 class changed on "
            f"{cost['changed_top1']:.2f}% of images")
    if cost["top1_exact"] is not None:
        line += (f", top-1 {cost['top1_exact']:.2f}% exact -> {cost['top1_tanh']:.2f}% tanh "
                 f"({cost['top1_tanh'] - cost['top1_exact']:+.2f} points)")
    return line


def check_gelu_cost(cost: dict) -> None:
    """Raise GeluApproximationRefused when the cost is over the limit (module docstring)."""
    if cost["top1_exact"] is not None:
        drop = cost["top1_exact"] - cost["top1_tanh"]
        if drop > TOP1_LIMIT:
            raise GeluApproximationRefused(
                f"--gelu tanh refused: top-1 drops by {drop:.2f} points (limit {TOP1_LIMIT}); "
                f"{format_gelu_cost(cost)}. Export with the exact GELU (the default)")
    elif cost["changed_top1"] > TOP1_LIMIT:
        raise GeluApproximationRefused(
            f"--gelu tanh refused: {format_gelu_cost(cost)} (limit {TOP1_LIMIT}%, which bounds "
            "the top-1 change without labels). Export with the exact GELU (the default), or "
            "measure on a labelled validation set (a training run's)")
