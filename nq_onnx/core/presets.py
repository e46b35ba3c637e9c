"""Named settings: ``nq-onnx convert --preset NAME`` and ``QuantConfig.preset(NAME, **overrides)``.

A preset holds configuration fields as a configuration file holds them (:class:`~nq_onnx.core.config.QuantConfig`'s
fields, and a ``search`` table of :class:`~nq_onnx.core.config.SearchConfig`'s); options given explicitly override them.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from nq_onnx.core.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Preset:
    """A named setting: what it is for, and the fields it sets."""

    summary: str
    values: dict[str, Any]


PRESETS = {
    "fast": Preset("the default setting, fast on integer kernels and exact on every CPU", {}),
    # PTQ4ViT's twin-uniform quantizers over the full stack: a float select over every attention map and GELU output
    # makes it about as slow as FP32 (docs/studies/fast-and-accurate.md measures it against the default)
    "accurate": Preset("the twin-uniform full stack at W8A8: a float select over every attention map and GELU "
                       "output, about FP32's speed",
                       {"method": "noisyquant-ptq4vit", "w_bits": 8, "activations": "symmetric",
                        "attention_probabilities": True, "reparam": True, "reparam_attention": True,
                        "weight_rounding": "gptq", "bias_correction": True, "balance_channels": False}),
    "paper": Preset("the NoisyQuant paper's setting at W8A8",
                    {"method": "noisyquant", "w_bits": 8, "activations": "symmetric", "attention_probabilities": True,
                     "reparam": False, "weight_rounding": "nearest", "bias_correction": False,
                     "balance_channels": False}),
}


def preset_values(name: str) -> dict[str, Any]:
    """The fields preset ``name`` sets, or a one-line ConfigError listing the presets."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name].values
