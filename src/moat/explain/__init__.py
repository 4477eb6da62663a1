"""See what MOAT sees: class-activation maps per stage and the attention of every MOAT
block, on the image's pixels.

    from moat.explain import Explainer
    expl = Explainer.from_checkpoint("runs/demo").explain("cat.jpg")
    expl.cams["stage4"], expl.attention["stages.2.0"]   # numpy arrays [H, W], [heads, H, W]

Lower level: `record_attention(model)` (the raw probabilities, windows stitched) and
`class_activation_maps(model, x, score)` (captum).
"""

from moat.explain.attention import AttentionMap, record_attention
from moat.explain.cam import (box_score, class_activation_maps, class_score, mask_score,
                              stage_layers, to_input_size)
from moat.explain.explainer import Explainer, Explanation, NoDetectionError
from moat.explain.files import explain_files, write_explanation

__all__ = ["AttentionMap", "Explainer", "Explanation", "NoDetectionError", "box_score",
           "class_activation_maps", "class_score", "explain_files", "mask_score",
           "record_attention", "stage_layers", "to_input_size", "write_explanation"]
