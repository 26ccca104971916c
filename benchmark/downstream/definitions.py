"""Texts and tables of the downstream metrics that the metric registry needs without importing torch."""

from __future__ import annotations

CLS_POLICY = (
    "RVSA classifier input: shorter side resized to 256 (PIL bicubic; a 256 px tile is unchanged), centre crop "
    "224, ImageNet mean/std: the official evaluation transform (MAEPretrain_SceneClassification build_transform)."
)
SEG_POLICY = (
    "RVSA segmenter input: tile bilinearly upsampled to 512 px (the model's position embedding is fixed at "
    "32x32 tokens; the official test mode slides 512 px crops, here one crop covers the tile), ImageNet "
    "mean/std, softmax averaged with the horizontally flipped pass (official test_cfg flip=True), class "
    "probabilities resized back to the tile size (bilinear) before argmax."
)
# Class groups of map agreement, in terms of cmsrd.classes names (every class in exactly one group).
MAP_GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("land", ("land",)),
    ("building", ("building",)),
    ("transport", ("road", "major_road", "railway")),
    ("water", ("water",)),
    ("vegetation", ("forest", "wood", "park")),
    ("farmland", ("farmland",)),
)


def groups_text() -> str:
    return "; ".join(f"{g} = {'+'.join(names)}" for g, names in MAP_GROUPS)
