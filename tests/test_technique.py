"""A technique is one module: percentile clipping, written here and nowhere in the product, registers itself and is
then selectable from the API, the command line and configuration files, recorded in and reloaded from plans.

``PercentileClip`` sets the activation step of every group that follows one operator kind (GELU outputs by default)
from the ``p``-th percentile of the group's input magnitudes on the search's rows, in place of the searched step:
``s = minmax_scale(percentile(|X|, p))``. It uses one hook, :meth:`~nq_onnx.core.technique.Technique.plan_group`.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import ClassVar

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from nq_onnx import QuantConfig, SearchConfig, convert
from nq_onnx.cli import build_parser, main
from nq_onnx.core.errors import ConfigError, PlanError
from nq_onnx.export import export_timm
from nq_onnx.core.options import option
from nq_onnx.core import technique as techniques

ROOT = Path(__file__).resolve().parents[1]
SEEN: dict[str, np.ndarray] = {}  # group -> the rows the hook clipped on, to check its step against


# --8<-- [start:technique]
@dataclasses.dataclass(frozen=True)
class PercentileClip:
    VERSION: ClassVar[int] = 1

    percentile: float | None = dataclasses.field(default=None, metadata=option(
        "clip the activation range of every group after --clip-after at this percentile of its magnitudes", "clipping",
        flag="--percentile-clip", metavar="P"))
    after: str = dataclasses.field(default="gelu", metadata=option(
        "the operator whose outputs are clipped (gelu, softmax)", "clipping", flag="--clip-after"))

    def __post_init__(self) -> None:
        if self.percentile is not None and not 50 < self.percentile <= 100:
            raise ConfigError(f"percentile-clip must be in (50, 100], got {self.percentile:g}")

    @property
    def enabled(self) -> bool:
        return self.percentile is not None


class Percentile(techniques.Technique):
    name = "percentile"
    settings = PercentileClip
    group = "clipping"
    title = "percentile clipping"

    def plan_group(self, config, group, rows, planned):
        clip = self.settings_in(config)
        if group.after != clip.after or planned.twin is not None:
            return planned
        SEEN[group.name] = rows
        absmax = float(np.percentile(np.abs(rows), clip.percentile))
        return dataclasses.replace(planned, scale=planned.quantizer().minmax_scale(absmax))
# --8<-- [end:technique]


@pytest.fixture
def registered():
    techniques.register(Percentile)
    SEEN.clear()
    yield
    techniques.unregister(Percentile.name)


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    path = tmp_path_factory.mktemp("technique") / "vit.onnx"
    export_timm("vit_small_patch16_224", path, model_kwargs=dict(img_size=32, depth=2), num_classes=10)
    return path


SEARCH = SearchConfig(search_images=2, holdout_images=1, tokens=128, screen_tokens=0, rounds=1,
                      act_alphas=(0.3, 1.0, 8), weight_alphas=(0.5, 1.0, 6))


def _config(**techniques_on) -> QuantConfig:
    return QuantConfig(method="easyquant", calib_size=6, reparam=False, weight_rounding="nearest",
                       bias_correction=False, balance_channels=False, search=SEARCH, **techniques_on)


def _gelu_scales(model: Path) -> dict[str, float]:
    """The step of each QuantizeLinear on a GELU output's path into a linear layer, as the model stores it."""
    proto = onnx.load(str(model))
    consts = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    return {n.input[0]: float(consts[n.input[1]].reshape(-1)[0]) for n in proto.graph.node
            if n.op_type == "QuantizeLinear" and n.input[1] in consts and consts[n.input[1]].size == 1}


def test_the_technique_sets_the_steps_it_computes_and_nothing_else(registered, vit, photo_folder, tmp_path):
    plain = convert(vit, tmp_path / "plain.onnx", photo_folder, _config(), evaluate=False)
    clipped = convert(vit, tmp_path / "clip.onnx", photo_folder, _config(techniques=(PercentileClip(99.0),)),
                      save_plan=tmp_path / "plan.json", evaluate=False)
    gelu = {g.name for g in clipped.layers.groups if g.after == "gelu"}
    assert gelu and set(SEEN) == gelu
    for name in gelu:
        planned = clipped.plan.groups[name]
        expected = planned.quantizer().minmax_scale(float(np.percentile(np.abs(SEEN[name]), 99.0)))
        assert planned.scale == expected
        assert planned.scale < plain.plan.groups[name].scale  # a 99th percentile clips below the searched range
    first = min(clipped.layers.groups, key=lambda g: g.name).name  # the first block's qkv input: before any GELU
    assert clipped.plan.groups[first].scale == plain.plan.groups[first].scale
    stored = _gelu_scales(tmp_path / "clip.onnx")
    for name in gelu:
        assert stored[clipped.plan.groups[name].tensor] == pytest.approx(clipped.plan.groups[name].scale, rel=1e-7)


def test_plans_record_the_settings_and_reload_them(registered, vit, photo_folder, tmp_path):
    config = _config(techniques=(PercentileClip(99.0),))
    convert(vit, tmp_path / "a.onnx", photo_folder, config, save_plan=tmp_path / "plan.json", evaluate=False)
    recorded = json.loads((tmp_path / "plan.json").read_text())["config"]["techniques"]
    assert recorded == {"percentile": {"version": 1, "percentile": 99.0, "after": "gelu"}}
    again = convert(vit, tmp_path / "b.onnx", load_plan=tmp_path / "plan.json", evaluate=False)
    assert again.plan.config.techniques == (PercentileClip(99.0),)
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    metadata = {p.key: p.value for p in onnx.load(str(tmp_path / "a.onnx")).metadata_props}
    assert json.loads(metadata["nq_onnx.config"])["techniques"]["percentile"]["percentile"] == 99.0
    techniques.unregister(Percentile.name)
    with pytest.raises(PlanError, match="technique 'percentile', which is not registered"):
        convert(vit, tmp_path / "c.onnx", load_plan=tmp_path / "plan.json", evaluate=False)
    assert not (tmp_path / "c.onnx").exists()


@pytest.mark.parametrize("edit, message", [
    ({"version": 2}, "technique 'percentile' settings version 2 is newer than this one reads (1)"),
    ({"cutoff": 99.0}, "technique 'percentile': malformed settings"),
])
def test_a_plan_with_settings_this_version_cannot_read_is_refused_in_one_line(registered, vit, photo_folder,
                                                                              tmp_path, capsys, edit, message):
    convert(vit, tmp_path / "a.onnx", photo_folder, _config(techniques=(PercentileClip(99.0),)),
            save_plan=tmp_path / "plan.json", evaluate=False)
    doc = json.loads((tmp_path / "plan.json").read_text())
    doc["config"]["techniques"]["percentile"].update(edit)
    (tmp_path / "plan.json").write_text(json.dumps(doc))
    before = (tmp_path / "plan.json").read_bytes()
    capsys.readouterr()
    code = main(["convert", str(vit), "-o", str(tmp_path / "b.onnx"), "--load-plan", str(tmp_path / "plan.json")])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "b.onnx").exists() and (tmp_path / "plan.json").read_bytes() == before


def test_the_command_line_and_config_files_select_it(registered, vit, photo_folder, tmp_path, capsys):
    help_text = build_parser()._subparsers._group_actions[0].choices["convert"].format_help()
    assert re.search(r"percentile clipping:.*--percentile-clip P", help_text, re.S)
    api = convert(vit, tmp_path / "api.onnx", photo_folder, _config(techniques=(PercentileClip(99.5),)),
                  evaluate=False)
    flags = ["--method", "easyquant", "--calib-size", "6", "--no-reparam", "--no-balance-channels",
             "--weight-rounding", "nearest",
             "--no-bias-correction", "--search-images", "2", "--holdout-images", "1", "--search-tokens", "128",
             "--screen-tokens", "0", "--no-eval", "-q"]
    toml = tmp_path / "search.toml"
    toml.write_text("[search]\nrounds = 1\nact_alphas = [0.3, 1.0, 8]\nweight_alphas = [0.5, 1.0, 6]\n"
                    "[percentile]\npercentile = 99.5\n")
    assert main(["convert", str(vit), "-o", str(tmp_path / "cli.onnx"), "--calib", str(photo_folder),
                 "--config", str(toml), *flags]) == 0
    assert (tmp_path / "cli.onnx").read_bytes() == (tmp_path / "api.onnx").read_bytes()
    assert api.plan.config.techniques == (PercentileClip(99.5),)
    capsys.readouterr()
    assert main(["convert", "--percentile-clip", "99.5", "--print-config"]) == 0
    assert "[percentile]\npercentile = 99.5\nafter = \"gelu\"" in capsys.readouterr().out


def test_bad_settings_are_one_line_errors(registered, capsys, tmp_path):
    code = main(["convert", "m.onnx", "-o", str(tmp_path / "o.onnx"), "--calib", ".", "--percentile-clip", "20"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1 and "percentile-clip must be in (50, 100], got 20" in err[0]
    with pytest.raises(ConfigError, match="technique 'percentile' is given twice"):
        _config(techniques=(PercentileClip(99.0), PercentileClip(98.0)))
    with pytest.raises(ConfigError, match="not the settings of a registered technique"):
        _config(techniques=(SEARCH,))


def test_no_product_file_names_the_technique():
    """Adding it took this file alone."""
    product = [p for folder in ("nq_onnx", "passes", "calibration") for p in (ROOT / folder).rglob("*.py")]
    assert product and not [p for p in product if re.search(r"percentile.clip|PercentileClip", p.read_text())]


def test_sweeps_grid_its_settings_and_reproduce_them_on_the_command_line(registered, tmp_path):
    from nq_onnx.cli.main import _config_from
    from nq_onnx.sweep.report import command_line
    from nq_onnx.sweep.spec import load_spec

    (tmp_path / "m.onnx").write_bytes(b"")
    (tmp_path / "calib").mkdir()
    (tmp_path / "s.toml").write_text('model = "m.onnx"\ncalib = "calib"\nseeds = [0]\n[eval]\nheldout = "calib"\n'
                                     '[grid]\nmethod = "easyquant"\npercentile.percentile = ["none", 99.0, 99.9]\n')
    configs = [t.config for t in load_spec(tmp_path / "s.toml").trials()]
    assert [c.techniques for c in configs] == [(), (PercentileClip(99.0),), (PercentileClip(99.9),)]
    command = command_line("m.onnx", "calib", "o.onnx", configs[2])
    assert "--percentile-clip 99.9" in command and "--clip-after" not in command
    assert _config_from(build_parser().parse_args(command.split()[1:])) == configs[2]
    (tmp_path / "s.toml").write_text('model = "m.onnx"\ncalib = "calib"\n[eval]\nheldout = "calib"\n'
                                     '[grid]\npercentile.cutoff = [99.0]\n')
    with pytest.raises(ConfigError, match="unknown grid option 'percentile.cutoff'; technique 'percentile' has after, "
                                          "percentile"):
        load_spec(tmp_path / "s.toml")
    (tmp_path / "s.toml").write_text('model = "m.onnx"\ncalib = "calib"\n[eval]\nheldout = "calib"\n'
                                     '[grid]\nclipping.percentile = [99.0]\n')
    with pytest.raises(ConfigError, match="unknown grid option 'clipping.percentile': no registered technique "
                                          "'clipping' has settings \\(those that do: balance_values, percentile, split_softmax\\)"):
        load_spec(tmp_path / "s.toml")


def test_built_in_techniques_run_before_those_registered_later_whatever_ran_first():
    """The hook order is registration order; registering a technique first loads the built-ins, so a program that
    registers its own before converting runs the hooks in the same order as one that converts first."""
    import subprocess
    import sys

    code = ("from nq_onnx.core import technique as t\n"
            "class Mine(t.Technique):\n    name = 'mine'\n"
            "t.register(Mine)\n"
            "names = list(t.TECHNIQUES)\n"
            "assert names[-1] == 'mine' and names.index('gptq') < names.index('bias_correction'), names\n"
            "print(len(names))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert int(out) == 11  # the ten built-in techniques and this one
