"""Do per-group sensitivities add up? The bit assignment's premise, measured on the real ViT-S/14.

    python benchmarks/mixed_additivity.py     # about 15 min on 2 cores; writes benchmarks/results/mixed_additivity.json

Mixed precision (:mod:`nq_onnx.mixed`) scores each group alone and assigns widths by a knapsack over the summed
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
import json
import sys
import time
from collections import Counter
from pathlib import Path

import onnx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from run import RESULTS, WORK, export_model, image_arrays, link_folder, machine, split_imagenet  # noqa: E402

from nq_onnx.calibration.collect import collect_stats, float_values  # noqa: E402
from nq_onnx.calibration.data import Preprocess, load_dataset  # noqa: E402
from nq_onnx.calibration.simulate import WidthSimulation, searched_feeds  # noqa: E402
from nq_onnx.config import QuantConfig  # noqa: E402
from nq_onnx.mixed import Module, assign_bits, average_bits  # noqa: E402
from nq_onnx.model_io import load_model  # noqa: E402
from nq_onnx.passes.base import import_graph  # noqa: E402
from nq_onnx.pipeline import canonicalize, discover  # noqa: E402
from nq_onnx.planner import SearchPlanner, float_weights, group_costs, search_counts, unsigned_groups  # noqa: E402

WIDTHS = (4, 5, 6, 8)
BASE = 6
BUDGET = 6.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calib-size", type=int, default=128)
    parser.add_argument("--held-out", type=int, default=64, help="held-out ImageNet images (default 64)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    log = lambda msg: print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    WORK.mkdir(parents=True, exist_ok=True)
    path = export_model(WORK / "vit_s14_dinov2_cifar10.onnx")
    model, _ = load_model(path)
    pre = Preprocess.from_model(onnx.load(str(path), load_external_data=False))
    calib_files, held_files = split_imagenet(args.calib_size, 200, args.seed)
    config = QuantConfig(method="noisyquant", calib_size=args.calib_size, seed=args.seed)
    calib = load_dataset(link_folder(calib_files, WORK / f"calib{args.calib_size}"), model, limit=args.calib_size,
                         seed=args.seed)
    model = canonicalize(model)
    layers = discover(model, config)
    stats = collect_stats(model, [g.tensor for g in layers.groups], calib, config.batch_size, None)
    fit, held = search_counts(len(calib), config.search)
    planner = SearchPlanner(model, layers, stats, calib.head(fit + held), config)
    start = time.perf_counter()
    searched = planner.uniform_searches(WIDTHS)
    log(f"uniform searches at {WIDTHS} bits: {time.perf_counter() - start:.0f} s")

    weights = float_weights(import_graph(model), layers)
    unsigned = unsigned_groups(layers, stats, config)
    name = model.graph.input[0].name
    sets = {"fit": next(calib.batches(fit)),
            "held_out": {name: image_arrays(held_files[: args.held_out], pre)}}
    sims = {k: WidthSimulation(model, layers, weights, v, unsigned, max(WIDTHS), searched_feeds(layers, searched))
            for k, v in sets.items()}
    uniform = {k: {b: sim.mse(sim.feeds(dict.fromkeys((g.name for g in layers.groups), b))) for b in WIDTHS}
               for k, sim in sims.items()}
    log(f"uniform MSE: {uniform}")
    start = time.perf_counter()
    change = sims["fit"].sensitivities(WIDTHS, BASE)
    log(f"single-group changes: {time.perf_counter() - start:.0f} s")

    one = {name: sets["fit"][name][:1]}
    values = float_values(model, sorted({g.tensor for g in layers.groups}), one)
    cost = group_costs(layers, weights, values, 1)
    summed = {b: {"predicted": uniform["fit"][BASE] + sum(c[b] for c in change.values()),
                  "actual": uniform["fit"][b]} for b in WIDTHS if b != BASE}
    assignments = {}
    for choices in (WIDTHS, (5, 6, 8)):
        modules = [Module(g, cost[g], {b: change[g][b] for b in choices}) for g in cost]
        bits = assign_bits(modules, BUDGET, choices)
        assignments["/".join(map(str, choices))] = {
            "groups_per_width": {str(b): n for b, n in sorted(Counter(bits.values()).items())},
            "average_bits": average_bits(modules, bits),
            "predicted_fit_mse": uniform["fit"][BASE] + sum(change[g][b] for g, b in bits.items()),
            "fit_mse": sims["fit"].mse(sims["fit"].feeds(bits)),
            "held_out_mse": sims["held_out"].mse(sims["held_out"].feeds(bits)),
        }
        log(f"assignment over {choices}: {assignments['/'.join(map(str, choices))]}")
    out = {"machine": machine(), "settings": vars(args) | {"fit_images": fit, "budget": BUDGET, "base": BASE},
           "uniform_mse": {k: {str(b): v for b, v in d.items()} for k, d in uniform.items()},
           "summed_single_changes": {str(b): v for b, v in summed.items()}, "assignments": assignments,
           "changes": change, "costs": cost}
    target = RESULTS / "mixed_additivity.json"
    target.write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
    log(f"wrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
