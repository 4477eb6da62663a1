"""MOAT configuration: one dataclass and the variant table, the only place numbers live.

Numbers come from the official deeplab2 `moat.py` (see docs/architecture.md §1).
"""

from __future__ import annotations

from dataclasses import dataclass

from moat.errors import InvalidInputError

BLOCK_TYPES = ("mbconv", "mbconv", "moat", "moat")
# MoatNet's keywords that change the attention layout (a dense task's backbone preset)
LAYOUT_ARGS = ("window_size", "global_attention_at_end", "pool_size")
# ... and every keyword that shapes the network beyond the variant's name: what a saved model
# records (config.json's model_args) to be rebuilt; num_classes is recorded on its own
ARCHITECTURE_ARGS = ("position_embedding", *LAYOUT_ARGS, "in_chans")


def check_model_args(*, pool_size: int | None = None, frozen_stages: int | None = None) -> None:
    """MoatNet's rules for these arguments; `TrainConfig` applies them before a run starts."""
    if pool_size is not None and pool_size < 1:
        raise InvalidInputError(f"pool_size must be a positive int (2 or 3), got {pool_size}")
    stages = len(BLOCK_TYPES)
    if frozen_stages is not None and not -1 <= frozen_stages <= stages:
        raise InvalidInputError(f"frozen_stages must be -1 (none), 0 (stem) .. {stages} (all), "
                         f"got {frozen_stages}")


@dataclass(frozen=True)
class MoatConfig:
    """Everything that defines a MOAT network's architecture.

    `survival_prob` is the official keep-probability of the *last* block (p_L); per-block
    probabilities follow the official linear schedule (see `drop_path_keep_probs`).
    """

    stem_size: tuple[int, int]
    num_blocks: tuple[int, int, int, int]
    hidden_size: tuple[int, int, int, int]
    survival_prob: float = 1.0
    native_resolution: int = 224
    block_type: tuple[str, ...] = BLOCK_TYPES
    stage_stride: tuple[int, int, int, int] = (2, 2, 2, 2)
    expansion_rate: int = 4
    se_ratio: float = 0.25
    head_size: int = 32
    # Side of the learned relative-position table per stage (None: MBConv stage).
    position_embedding_size: tuple[int | None, ...] = (None, None, 14, 7)
    bn_eps: float = 1e-3
    bn_momentum: float = 0.01  # Keras momentum 0.99 in PyTorch's convention
    ln_eps: float = 1e-5
    init_std: float = 0.02

    def num_heads(self, stage: int) -> int:
        return self.hidden_size[stage] // self.head_size

    @property
    def moat_stages(self) -> tuple[int, ...]:
        return tuple(i for i, t in enumerate(self.block_type) if t == "moat")

    def drop_path_keep_probs(self, drop_path_rate: float | None = None) -> list[float]:
        """Keep probability of every block, in order: p_i = 1 - (1 - p_L) * i / N.

        Official schedule: the first block is never dropped and the last is kept with
        `1 - (1 - p_L)(N - 1)/N`, not exactly p_L.
        """
        last = self.survival_prob if drop_path_rate is None else 1.0 - drop_path_rate
        if not 0.0 < last <= 1.0:
            raise InvalidInputError(f"drop_path_rate must be in [0, 1), got {1.0 - last:g}")
        total = sum(self.num_blocks)
        return [1.0 - (1.0 - last) * i / total for i in range(total)]


def _variant(stem: int, blocks, hidden, survival, resolution) -> MoatConfig:
    return MoatConfig(
        stem_size=(stem, stem), num_blocks=tuple(blocks), hidden_size=tuple(hidden),
        survival_prob=survival, native_resolution=resolution,
    )


# survival_prob: the keep-probability `get_model` attaches to each released checkpoint.
# native_resolution: the resolution of the released checkpoint.
MODEL_CONFIGS: dict[str, MoatConfig] = {
    "moat_0": _variant(64, (2, 3, 7, 2), (96, 192, 384, 768), 0.8, 224),
    "moat_1": _variant(64, (2, 6, 14, 2), (96, 192, 384, 768), 0.7, 224),
    "moat_2": _variant(128, (2, 6, 14, 2), (128, 256, 512, 1024), 0.7, 384),
    "moat_3": _variant(160, (2, 12, 28, 2), (160, 320, 640, 1280), 0.4, 512),
    "moat_4": _variant(256, (2, 12, 28, 2), (256, 512, 1024, 2048), 0.3, 512),
    "tiny_moat_0": _variant(32, (2, 3, 7, 2), (32, 64, 128, 256), 1.0, 256),
    "tiny_moat_1": _variant(40, (2, 3, 7, 2), (40, 80, 160, 320), 1.0, 256),
    "tiny_moat_2": _variant(56, (2, 3, 7, 2), (56, 112, 224, 448), 1.0, 256),
    "tiny_moat_3": _variant(80, (2, 3, 7, 2), (80, 160, 320, 640), 0.9, 256),
}

# Official names of the variants (`get_model` names), for messages and metadata.
OFFICIAL_NAMES: dict[str, str] = {
    "moat_0": "moat0_pretrain_224_1k",
    "moat_1": "moat1_pretrain_224_1k",
    "moat_2": "moat2_finetune_384_22k",
    "moat_3": "moat3_finetune_512_22k",
    "moat_4": "moat4_finetune_512_22k",
    "tiny_moat_0": "tiny_moat0_pretrain_256_1k",
    "tiny_moat_1": "tiny_moat1_pretrain_256_1k",
    "tiny_moat_2": "tiny_moat2_pretrain_256_1k",
    "tiny_moat_3": "tiny_moat3_pretrain_256_1k",
}
