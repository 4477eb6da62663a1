"""The models a benchmark compares, built the same way for every benchmark, and their size:
MOAT variants (by name, tag or saved folder) and timm's peers, with the parameters and
multiply-adds (convolutions, linear layers and attention matmuls: the timm/fvcore
convention) of one image."""

from __future__ import annotations

import torch
from torch import nn

from moat.errors import InvalidInputError

# timm models of the same size class, compared in the MOAT paper.
PEERS = ("coatnet_0_rw_224", "maxvit_tiny_tf_224", "convnext_tiny")


def is_moat(name: str) -> bool:
    """Whether `name` is a MOAT variant, tag or saved folder (else a timm model)."""
    from moat.models.config import MODEL_CONFIGS
    from moat.weights.catalogue import split_name
    from moat.weights.hub import is_hub_name

    if is_hub_name(name):  # a saved MOAT folder
        return True
    try:
        return split_name(name)[0] in MODEL_CONFIGS
    except ValueError:  # a dotted timm tag, e.g. convnext_tiny.fb_in1k
        return False


def create(name: str, img_size: tuple[int, int], drop_path_rate: float,
           preset: str | None = None, pretrained: bool = False) -> nn.Module:
    """MOAT (with a dense task's attention layout `preset`) or a timm model, by name."""
    if is_moat(name):
        import moat

        layout = {}
        if preset:
            from moat.tasks.backbone import PRESETS

            if preset not in PRESETS:
                raise InvalidInputError(f"unknown preset {preset!r}; choose one of {list(PRESETS)}")
            layout = PRESETS[preset].model_args()
        return moat.create_model(name, drop_path_rate=drop_path_rate,
                                 pretrained=pretrained or None, **layout)
    if preset:
        raise InvalidInputError(f"--preset applies to MOAT models only, not {name!r}")
    import timm

    if not timm.is_model(name.split(".")[0]):
        raise InvalidInputError(f"unknown model {name!r}: neither a MOAT variant (moat models) nor "
                                "a timm model (timm.list_models())")
    return create_peer(name, img_size, pretrained=pretrained, drop_path_rate=drop_path_rate)


def create_peer(name: str, img_size: tuple[int, int], **kwargs) -> nn.Module:
    """A timm peer for `img_size` (every benchmark builds its peers here)."""
    import timm

    if name.startswith(("coatnet", "maxvit", "maxxvit")):  # window layout fixed at build
        kwargs["img_size"] = img_size
    return timm.create_model(name, **kwargs)


def count_macs(name: str, img_size: tuple[int, int], preset: str | None = None) -> int:
    """Multiply-adds of one image (convolutions, linear layers, attention matmuls)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):  # free: no memory, no compute
        model = create(name, img_size, 0.0, preset).eval()
    if is_moat(name):
        import moat

        return moat.count_flops(model, img_size, method="macs")
    from moat.models.flops import CPU_ATTENTION_FLOPS

    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as counter, \
            torch.no_grad():
        model(torch.zeros(1, 3, *img_size, device="meta"))
    return counter.get_total_flops() // 2


def count_params(name: str) -> int:
    with torch.device("meta"):
        model = create(name, (224, 224), 0.0)
    return sum(p.numel() for p in model.parameters())
