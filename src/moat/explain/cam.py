"""Class-activation maps per stage, computed with captum.

Default method: HiResCAM (Draelos & Carin, 2020): the map at position p is
sum_c dS/dA[c, p] * A[c, p] (captum's `LayerGradientXActivation`, summed over channels),
the first-order share of the score S that the features at p carry. Grad-CAM (Selvaraju et
al., 2017; captum's `LayerGradCam`) first averages the gradient over the whole map, so a
position whose features cannot change S still lights up when its activations are large;
for maps of the inner stages, where gradients are far from uniform, this puts mass where the
model does not look (tests/test_explain_cam.py shows it on a model that reads one corner).
Both keep the positive part (ReLU), as both papers do.

A *score* maps the model's output to one number per image ([B]); `class_score`,
`mask_score` and `box_score` build the usual ones for classification, segmentation and
detection.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moat.errors import InvalidInputError
from moat.models.moat import ENDPOINTS, MoatNet

METHODS = ("hirescam", "gradcam")
Score = Callable[[Any], Tensor]


def find_moatnet(model: nn.Module) -> MoatNet:
    """The MoatNet inside `model` (the model itself, a segmentation or detection backbone)."""
    net = next((m for m in model.modules() if isinstance(m, MoatNet)), None)
    if net is None:
        raise InvalidInputError(f"{type(model).__name__} contains no MoatNet: explanations need a "
                                "MOAT model (not an optimized or exported copy)")
    return net


def stage_layers(model: nn.Module) -> dict[str, nn.Module]:
    """{'stage1': stem, 'stage2': last block of stages[0], ..., 'stage5': last block of
    stages[3]} of the MoatNet in `model`: the modules whose outputs are the official
    endpoints (only those it runs; the stages run block by block, so hooks go on blocks)."""
    net = find_moatnet(model)
    last = max(net.out_indices) if net.features_only else len(ENDPOINTS) - 1
    modules = [net.stem, *(stage[-1] for stage in net.stages)]
    return {ENDPOINTS[i]: modules[i] for i in range(last + 1)}


def class_score(index: int | Tensor) -> Score:
    """Logit of class `index` (one int, or one per image) of a classifier's [B, classes]."""
    def score(logits: Tensor) -> Tensor:
        idx = torch.as_tensor(index, device=logits.device).expand(logits.shape[0])
        return logits.gather(1, idx[:, None])[:, 0]
    return score


def mask_score(index: int, mask: Tensor | None = None) -> Score:
    """Sum of class `index`'s logits over `mask` [B, H, W] (default: the pixels predicted as
    that class) of a segmenter's [B, classes, H, W]."""
    def score(logits: Tensor) -> Tensor:
        where = logits.argmax(1) == index if mask is None else mask.to(logits.device)
        return (logits[:, index] * where).sum((-2, -1))
    return score


def box_score(box: Tensor, label: int, iou: float = 0.5) -> Score:
    """Score of the detection of `label` that overlaps `box` [4] (x1, y1, x2, y2) most, if
    its IoU reaches `iou`, else 0: for torchvision-style detectors returning
    [{"boxes", "labels", "scores"}] (one image)."""
    from torchvision.ops import box_iou

    def score(outputs: list[dict[str, Tensor]]) -> Tensor:
        out = outputs[0]
        same = out["labels"] == label
        if not same.any():
            return out["scores"].sum()[None] * 0
        overlaps = box_iou(box[None].to(out["boxes"]), out["boxes"][same])[0]
        best = overlaps.argmax()
        hit = out["scores"][same][best] * (overlaps[best] >= iou)
        return hit[None]
    return score


def class_activation_maps(model: nn.Module, x: Tensor | list[Tensor], score: Score,
                          layers: Mapping[str, nn.Module] | None = None,
                          method: str = "hirescam") -> dict[str, Tensor]:
    """{layer name: map [B, h, w]} at each layer's own resolution, non-negative.

    `x`: the model's input, a batch tensor or (detection) a list of images; `score(output)`
    -> [B]; `layers` default to `stage_layers(model)`. The model must be in eval mode.
    """
    from captum.attr import LayerGradCam, LayerGradientXActivation

    if method not in METHODS:
        raise InvalidInputError(f"unknown method {method!r}: use one of {METHODS}")
    layers = dict(layers or stage_layers(model))
    is_list = isinstance(x, (list, tuple))
    inputs = torch.stack(list(x)) if is_list else x

    def forward(batch: Tensor) -> Tensor:
        return score(model(list(batch)) if is_list else model(batch))

    with torch.enable_grad():
        if method == "hirescam":
            found = LayerGradientXActivation(forward, list(layers.values())).attribute(inputs)
            maps = [a.sum(1) for a in found]
        else:
            maps = [LayerGradCam(forward, layer).attribute(inputs)[:, 0]
                    for layer in layers.values()]
    return {name: m.detach().float().relu() for name, m in zip(layers, maps)}


def to_input_size(maps: Tensor, size: tuple[int, int], mode: str = "nearest") -> Tensor:
    """Feature maps [..., h, w] -> [..., H, W] on the input's pixels: cell (i, j) of a
    stride-s map covers pixels [i*s, (i+1)*s) x [j*s, (j+1)*s) (TF 'SAME' layouts, as in
    MOAT), so the map is upsampled to (h*s, w*s) and cropped to the input. "nearest" keeps
    each cell's value on exactly its pixels; "bilinear" is smoother for display."""
    h, w = maps.shape[-2:]
    stride = 2 ** round(math.log2(size[0] / h)) if size[0] >= h else 1
    up = F.interpolate(maps.reshape(-1, 1, h, w).float(), size=(h * stride, w * stride),
                       mode=mode)[..., :size[0], :size[1]]
    if tuple(up.shape[-2:]) != tuple(size):  # not a power-of-two stride: plain resize
        up = F.interpolate(up, size=tuple(size), mode=mode)
    return up.reshape(*maps.shape[:-2], *size)
