"""Export recipes for timm families: what to build and what preprocessing to record.

A recipe holds nothing a user must know: the exporter settings that give the graph shape nq-onnx expects
(``MatMul(X, W^T) + Add(B)`` Linears, a ``Gemm`` head, decomposed attention), and the data config to store
in the ONNX metadata so ``convert`` prepares images without being told.
"""

from __future__ import annotations

import dataclasses
import fnmatch


@dataclasses.dataclass(frozen=True)
class Recipe:
    family: str
    patterns: tuple[str, ...]
    fixed_size: bool = False  # the architecture's input size is baked in (window attention)


RECIPES = (
    Recipe("vit", ("vit_*",)),
    Recipe("deit", ("deit_*", "deit3_*")),
    Recipe("swin", ("swin_*", "swinv2_*"), fixed_size=True),
    Recipe("beit", ("beit*",)),
    Recipe("cait", ("cait_*",)),
    Recipe("eva", ("eva*",)),
    Recipe("pit", ("pit_*",)),
    Recipe("xcit", ("xcit_*",)),
)


def recipe_for(model_name: str) -> Recipe:
    """The recipe of a timm model name; unknown families get the generic recipe."""
    for recipe in RECIPES:
        if any(fnmatch.fnmatchcase(model_name, p) for p in recipe.patterns):
            return recipe
    return Recipe("generic", ("*",))
