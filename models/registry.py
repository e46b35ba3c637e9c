"""Export recipes for timm families: what to build and what preprocessing to record.

A recipe holds nothing a user must know: the exporter settings that give the graph shape nq-onnx expects
(``MatMul(X, W^T) + Add(B)`` Linears, a ``Gemm`` head, decomposed attention), and the data config to store
in the ONNX metadata so ``convert`` prepares images without being told.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
from typing import Iterator


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


@contextlib.contextmanager
def unfused_attention(timm) -> Iterator[None]:
    """Build timm models with attention as explicit ``MatMul + Softmax`` (what the attention-matmul quantizer
    expects), not the fused SDPA, and give the process back timm's setting afterwards: a module reads the flag
    when it is built, so only the models built inside are affected."""
    config = timm.layers.config
    previous = config._USE_FUSED_ATTN
    timm.layers.set_fused_attn(False)
    try:
        yield
    finally:
        config._USE_FUSED_ATTN = previous
