"""The inputs the sweep files in ``benchmarks/sweeps/`` name, made once: the real ViT-S/14 in ONNX and two disjoint
folders of links into the shared ImageNet samples.

``work/heldout200``: 200 images (the seed-0 split of :func:`run.split_imagenet`) on which every trial's output error
is measured. ``work/calib_pool``: the other 800, from which each trial's calibration seed chooses its 128
(``calib_size``), so that the seeds of a sweep calibrate on different images and never on a held-out one.

    python benchmarks/sweep_data.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import IMAGENET, WORK, export_model, link_folder, split_imagenet  # noqa: E402

HELD_OUT = 200


def main() -> None:
    export_model(WORK / "vit_s14_dinov2_cifar10.onnx")
    held = split_imagenet(128, HELD_OUT, 0)[1]
    pool = sorted(set(IMAGENET.glob("*.JPEG")) - set(held))
    link_folder(held, WORK / "heldout200")
    link_folder(pool, WORK / "calib_pool")
    print(f"{WORK / 'heldout200'}: {len(held)} images; {WORK / 'calib_pool'}: {len(pool)} images")


if __name__ == "__main__":
    main()
