"""Export recipes for timm families: how to build, export and describe a model so that nq-onnx reads it well.

A recipe holds what a user should not have to know:

- **the fused-attention switch**: timm builds attention as one fused ``scaled_dot_product_attention`` unless told
  otherwise; nq-onnx quantizes ``Q K^T`` and ``A V`` as two matmuls, so every recipe builds with timm's fused
  attention off (restored afterwards, :func:`unfused_attention`);
- **the exporter settings**: TorchScript export (``dynamo=False``: the graph keeps timm's module names, which become
  the layer names), constant folding (a ``Linear`` becomes ``MatMul(X, W^T) + Add(B)``, the head a ``Gemm``), a
  dynamic batch axis, input ``input`` and output ``logits``;
- **the preprocessing to record**: timm's data config, except that the input size is the one the model was built
  with (a pretrained config can name another: DINOv2-style ViT-S/14 reports 518 px for a model built at 224 px).

Families differ today only in name; a family that needs other settings gets them here, not in ``export``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
from pathlib import Path
from typing import Any, Iterator

from nq_onnx.calibration.data import Preprocess


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


@dataclasses.dataclass(frozen=True)
class Recipe:
    family: str
    patterns: tuple[str, ...]
    input_name: str = "input"
    output_name: str = "logits"
    constant_folding: bool = True

    def build(self, timm, model_name: str, pretrained: bool, checkpoint: str, **kwargs: Any):
        """The timm model in eval mode, attention unfused."""
        with unfused_attention(timm):
            model = timm.create_model(model_name, pretrained=pretrained, checkpoint_path=checkpoint, **kwargs)
        return model.eval()

    def preprocess(self, model, timm) -> Preprocess:
        """timm's data config, at the input size the model was built with."""
        config = timm.data.resolve_data_config({}, model=model)
        size = tuple(config["input_size"])
        img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
        if img_size is not None:  # the pretrained config may name another size than the model was built with
            size = (size[0], int(img_size[0]), int(img_size[1]))
        return Preprocess(
            input_size=size,
            mean=tuple(float(v) for v in config["mean"]),
            std=tuple(float(v) for v in config["std"]),
            interpolation=config.get("interpolation", "bicubic"),
            crop_pct=float(config.get("crop_pct", 1.0)),
            crop_mode=config.get("crop_mode", "center"),
        )

    def export(self, torch, model, example, path: Path, opset: int) -> None:
        """TorchScript ONNX export with a dynamic batch axis."""
        torch.onnx.export(
            model,
            (example,),
            str(path),
            opset_version=opset,
            input_names=[self.input_name],
            output_names=[self.output_name],
            dynamic_axes={self.input_name: {0: "batch"}, self.output_name: {0: "batch"}},
            do_constant_folding=self.constant_folding,
            dynamo=False,
        )


RECIPES = (
    Recipe("vit", ("vit_*",)),
    Recipe("deit", ("deit_*", "deit3_*")),
    Recipe("swin", ("swin_*", "swinv2_*")),
    Recipe("beit", ("beit*",)),
    Recipe("cait", ("cait_*",)),
    Recipe("eva", ("eva*",)),
    Recipe("pit", ("pit_*",)),
    Recipe("xcit", ("xcit_*",)),
)
GENERIC = Recipe("generic", ("*",))


def recipe_for(model_name: str) -> Recipe:
    """The recipe of a timm model name; unknown families get the generic recipe."""
    for recipe in RECIPES:
        if any(fnmatch.fnmatchcase(model_name, p) for p in recipe.patterns):
            return recipe
    return GENERIC
