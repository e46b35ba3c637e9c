"""Do per-group sensitivities add up? The bit assignment's premise, measured on the real ViT-S/14.

    python benchmarks/mixed_additivity.py     # about 15 min on 2 cores; writes benchmarks/results/mixed_additivity.json

Mixed precision (:mod:`nq_onnx.search.mixed`) scores each group alone and assigns widths by a knapsack over the summed
scores, which is only right if the groups' effects on the output error add up. Here: NoisyQuant's uniform search
at 4, 5, 6 and 8 bits (128 calibration images, fitting on the first 8, as ``convert`` does), then one simulation
that gives each group the quantizers its width's search chose (:class:`nq_onnx.calibration.simulate.WidthSimulation`),
on the 8 fit images and on ``--held-out`` ImageNet images the calibration never saw (the methods benchmark's split):

- the output MSE of each uniform width;
- each group's change of the fit images' MSE when it alone leaves the uniform 6-bit model for width ``b`` (the
  ``searched`` sensitivity), summed over the groups, against the change with every group at ``b``;
- the knapsack's assignment at a 6.0-bit budget from those changes, over {4, 5, 6, 8} and over {5, 6, 8}: the MSE
  it predicts for the fit images, and the MSE it gets on the fit and the held-out images.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from run import RESULTS, WORK, export_model, image_arrays, link_folder, machine, split_imagenet  # noqa: E402

from nq_onnx.calibration.collect import TensorStats, collect_stats, float_values  # noqa: E402
from nq_onnx.calibration.data import Dataset, Preprocess, load_dataset  # noqa: E402
from nq_onnx.calibration.simulate import WidthSimulation, searched_feeds  # noqa: E402
from nq_onnx.core.config import QuantConfig  # noqa: E402
from nq_onnx.search.mixed import Module, assign_bits, average_bits  # noqa: E402
from nq_onnx.io.model_io import load_model  # noqa: E402
from nq_onnx.passes.base import import_graph  # noqa: E402
from nq_onnx.passes.find_layers import Layers  # noqa: E402
from nq_onnx.pipeline import canonicalize, discover  # noqa: E402
from nq_onnx.search.planner import SearchPlanner, float_weights, search_counts, unsigned_groups  # noqa: E402
from nq_onnx.techniques.mixed_precision import group_costs, uniform_searches  # noqa: E402

WIDTHS = (4, 5, 6, 8)
BASE = 6
BUDGET = 6.0


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calib-size", type=int, default=128)
    parser.add_argument("--held-out", type=int, default=64, help="held-out ImageNet images (default 64)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    WORK.mkdir(parents=True, exist_ok=True)
    run = Searched.run(args.calib_size, args.seed)
    sets = {"fit": next(run.calib.batches(run.fit)),
            "held_out": {run.input_name: image_arrays(run.held_files[: args.held_out], run.pre)}}
    sims = {k: WidthSimulation(run.model, run.layers, run.weights, v, run.unsigned, max(WIDTHS),
                               searched_feeds(run.layers, run.searched)) for k, v in sets.items()}
    uniform = {k: {b: sim.mse(sim.feeds(dict.fromkeys((g.name for g in run.layers.groups), b))) for b in WIDTHS}
               for k, sim in sims.items()}
    log(f"uniform MSE: {uniform}")
    start = time.perf_counter()
    change = sims["fit"].sensitivities(WIDTHS, BASE)
    log(f"single-group changes: {time.perf_counter() - start:.0f} s")

    cost = run.costs(sets["fit"])
    summed = {b: {"predicted": uniform["fit"][BASE] + sum(c[b] for c in change.values()),
                  "actual": uniform["fit"][b]} for b in WIDTHS if b != BASE}
    assignments = {"/".join(map(str, choices)): assignment(choices, change, cost, uniform["fit"][BASE], sims)
                   for choices in (WIDTHS, (5, 6, 8))}
    out = {"machine": machine(), "settings": vars(args) | {"fit_images": run.fit, "budget": BUDGET, "base": BASE},
           "uniform_mse": {k: {str(b): v for b, v in d.items()} for k, d in uniform.items()},
           "summed_single_changes": {str(b): v for b, v in summed.items()}, "assignments": assignments,
           "changes": change, "costs": cost}
    target = RESULTS / "mixed_additivity.json"
    target.write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
    log(f"wrote {target}")
    return 0


@dataclasses.dataclass(frozen=True)
class Searched:
    """The real ViT-S/14 canonicalized, its calibration statistics, and NoisyQuant's uniform search at every width
    of :data:`WIDTHS` (on the first ``fit`` calibration images, as ``convert`` fits)."""

    model: onnx.ModelProto
    layers: Layers
    stats: dict[str, TensorStats]
    calib: Dataset
    fit: int
    searched: dict[int, dict[str, np.ndarray]]
    weights: dict[str, np.ndarray]
    unsigned: frozenset[str]
    pre: Preprocess
    held_files: list[Path]

    @property
    def input_name(self) -> str:
        return self.model.graph.input[0].name

    @classmethod
    def run(cls, calib_size: int, seed: int) -> "Searched":
        path = export_model(WORK / "vit_s14_dinov2_cifar10.onnx")
        model, _ = load_model(path)
        pre = Preprocess.from_model(onnx.load(str(path), load_external_data=False))
        calib_files, held_files = split_imagenet(calib_size, 200, seed)
        config = QuantConfig(method="noisyquant", calib_size=calib_size, seed=seed)
        calib = load_dataset(link_folder(calib_files, WORK / f"calib{calib_size}"), model, limit=calib_size,
                             seed=seed)
        model = canonicalize(model)
        layers = discover(model, config)
        stats = collect_stats(model, [g.tensor for g in layers.groups], calib, config.batch_size, None)
        fit, held = search_counts(len(calib), config.search)
        planner = SearchPlanner(model, layers, stats, calib.head(fit + held), config)
        start = time.perf_counter()
        searched = uniform_searches(planner, WIDTHS)
        log(f"uniform searches at {WIDTHS} bits: {time.perf_counter() - start:.0f} s")
        weights = float_weights(import_graph(model), layers)
        return cls(model, layers, stats, calib, fit, searched, weights, unsigned_groups(layers, stats, config), pre,
                   held_files)

    def costs(self, fit_set: dict) -> dict[str, int]:
        """Each group's cost (weights plus activation values per image,
        :func:`nq_onnx.techniques.mixed_precision.group_costs`), its activations counted on the first fit image."""
        one = {self.input_name: fit_set[self.input_name][:1]}
        values = float_values(self.model, sorted({g.tensor for g in self.layers.groups}), one)
        return group_costs(self.layers, self.weights, values, 1)


def assignment(choices: tuple[int, ...], change: dict, cost: dict, base_mse: float, sims: dict) -> dict:
    """The knapsack's widths from ``choices`` at the budget, over the groups' searched sensitivities ``change``:
    the MSE their sum predicts (``base_mse``, the uniform 6-bit model's, plus each chosen change) and the MSE the
    assignment gets on the fit and the held-out images; logged."""
    modules = [Module(g, cost[g], {b: change[g][b] for b in choices}) for g in cost]
    bits = assign_bits(modules, BUDGET, choices)
    out = {
        "groups_per_width": {str(b): n for b, n in sorted(Counter(bits.values()).items())},
        "average_bits": average_bits(modules, bits),
        "predicted_fit_mse": base_mse + sum(change[g][b] for g, b in bits.items()),
        "fit_mse": sims["fit"].mse(sims["fit"].feeds(bits)),
        "held_out_mse": sims["held_out"].mse(sims["held_out"].feeds(bits)),
    }
    log(f"assignment over {choices}: {out}")
    return out


if __name__ == "__main__":
    sys.exit(main())
