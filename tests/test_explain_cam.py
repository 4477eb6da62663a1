"""Class-activation maps on models whose answer is known: a classifier that reads only the
top-left corner of one stage's features. HiResCAM's mass must lie on that corner of the
image; Grad-CAM, which averages the gradient over the map, spreads it (why HiResCAM is the
default)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from matplotlib import cbook
from PIL import Image
from torch import nn

import moat
from moat.explain.cam import class_activation_maps, class_score, stage_layers, to_input_size
from moat.models.moat import ENDPOINTS

SIZE = 64


class CornerClassifier(nn.Module):
    """Logits from the mean of the top-left 2x2 cells of one endpoint, nothing else (no
    bias: a logit is the sum of the cells' contributions)."""

    def __init__(self, stage: str) -> None:
        super().__init__()
        self.net = moat.create_model("tiny_moat_0", num_classes=0, window_size=[
            None, None, (3, 3), None])
        self.stage = stage
        channels = self.net.feature_info[ENDPOINTS.index(stage)]["num_chs"]
        self.head = nn.Linear(channels, 3, bias=False)

    def forward(self, x):
        features = self.net.forward_endpoints(x)[self.stage]
        return self.head(features[:, :, :2, :2].mean((2, 3)))


@pytest.fixture(scope="module")
def photo() -> torch.Tensor:
    """A real photograph (shipped with matplotlib), 64x64, roughly normalised."""
    with cbook.get_sample_data("grace_hopper.jpg") as f:
        rgb = Image.open(f).convert("RGB").resize((SIZE, SIZE), Image.BILINEAR)
    x = torch.from_numpy(np.array(rgb)).permute(2, 0, 1).float() / 255
    return ((x - 0.5) / 0.25)[None]


def corner_share(cam: torch.Tensor, pixels: int) -> float:
    return float(cam[..., :pixels, :pixels].sum() / cam.sum())


@pytest.mark.parametrize("stage, stride", [("stage2", 4), ("stage4", 16), ("stage5", 32)])
def test_hirescam_mass_lies_on_the_corner_the_model_reads(photo, stage, stride):
    torch.manual_seed(0)
    model = CornerClassifier(stage).eval()
    layers = {stage: stage_layers(model)[stage]}
    with torch.no_grad():  # make one logit clearly positive: its map has positive mass
        logits = model(photo)[0]
        predicted = int(logits.abs().argmax())
        model.head.weight[predicted] *= logits[predicted].sign()
    maps = class_activation_maps(model, photo, class_score(predicted), layers)
    cam = to_input_size(maps[stage], (SIZE, SIZE))
    assert cam.shape == (1, SIZE, SIZE)
    assert cam.sum() > 0
    corner = 2 * stride  # the 2x2 cells read by the head, in pixels
    assert corner_share(cam, corner) == pytest.approx(1.0)  # and nothing elsewhere
    gradcam = to_input_size(class_activation_maps(model, photo, class_score(predicted),
                                                  layers, method="gradcam")[stage], (SIZE, SIZE))
    if stride < 32:  # stage 5 is 2x2 at 64 px: everything is "the corner"
        assert corner_share(gradcam, corner) < 0.6


def test_stage_maps_follow_the_chosen_class_and_cover_every_stage(photo):
    torch.manual_seed(0)
    model = moat.create_model("tiny_moat_0", num_classes=4).eval()
    maps = class_activation_maps(model, photo.repeat(2, 1, 1, 1), class_score(torch.tensor([0, 3])))
    assert list(maps) == list(ENDPOINTS)
    assert [tuple(m.shape) for m in maps.values()] == [(2, 32, 32), (2, 16, 16), (2, 8, 8),
                                                       (2, 4, 4), (2, 2, 2)]
    # same image, different classes: different maps; each equals the single-class map
    assert not torch.allclose(maps["stage4"][0], maps["stage4"][1])
    one = class_activation_maps(model, photo, class_score(3))
    torch.testing.assert_close(one["stage4"][0], maps["stage4"][1], rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="unknown method"):
        class_activation_maps(model, photo, class_score(0), method="magic")


def test_to_input_size_keeps_cells_in_place():
    cells = torch.zeros(1, 3, 4)
    cells[0, 2, 3] = 1.0  # bottom-right cell of a stride-16 map over a 40x60 input
    up = to_input_size(cells, (40, 60))
    assert up.shape == (1, 40, 60)
    peak = np.unravel_index(int(up[0].argmax()), (40, 60))
    assert 32 <= peak[0] < 40 and 48 <= peak[1] < 60
