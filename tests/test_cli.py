"""The command line generated from the configuration fields' declarations: flags, groups, presets, configuration
files, the ignored-flag warnings, the evaluation options and the exit codes."""

from __future__ import annotations

import argparse
import dataclasses
import enum
import json
from pathlib import Path

import pytest

from nq_onnx import ConfigError, QuantConfig, SearchConfig

from nq_onnx.core import options
from nq_onnx.cli import EXIT_CODES, build_parser, main
from nq_onnx.cli.main import _config_from, _run_keywords
from nq_onnx.cli.options import ignored, resolve

# the paper's setting as the end-to-end tests and the studies' sweep files pin it, with their 8-bit weights
PAPER = dict(activations="symmetric", attention_probabilities=True, reparam=False, weight_rounding="nearest",
             bias_correction=False, w_bits=8, balance_channels=False)
# the most accurate row of the fast-and-accurate study: NoisyQuant-PTQ4ViT, the full stack, W8A8
ACCURATE = dict(method="noisyquant-ptq4vit", w_bits=8, activations="symmetric", attention_probabilities=True,
                reparam=True, reparam_attention=True, weight_rounding="gptq", bias_correction=True,
                balance_channels=False)
# every convert flag of the hand-written parser this one replaces
FLAGS = """-o --output --calib --calib-size --w-bits --a-bits --bits-budget --mixed-sensitivity --mixed-images --method
--noise --seed --exclude --attention-matmuls --no-attention-matmuls --attention-probabilities
--no-attention-probabilities --int16-bias --target --activations --weight-dtype --reparam --no-reparam
--reparam-attention --weight-rounding --bias-correction --no-bias-correction --batch-size --search-images
--search-tokens --read-token-share --screen-tokens --screen-keep --grid-stride --objective --ranking-loss
--holdout-images --no-sequential --input-size --mean --std --interpolation --crop-pct --save-plan --load-plan
--no-eval --report --report-dir --profile --external-data -f --force -q --quiet""".split()


def _subparser(name: str = "convert") -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def _config(*argv: str) -> QuantConfig:
    return _config_from(build_parser().parse_args(["convert", "m.onnx", "-o", "o.onnx", *argv]))


def _fails(capsys, argv, *needles, written=()):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert code == 2, captured.err
    assert len(lines) == 1 and lines[0].startswith("nq-onnx: error: "), captured.err
    for needle in needles:
        assert needle in lines[0], lines[0]
    for path in written:
        assert not Path(path).exists(), f"{path} was written"
    assert captured.out == ""
    return lines[0]


def test_every_flag_of_the_hand_written_parser_is_kept():
    strings = {s for action in _subparser()._actions for s in action.option_strings}
    assert set(FLAGS) <= strings, sorted(set(FLAGS) - strings)


def test_no_flag_gives_the_library_defaults():
    assert _config() == QuantConfig()


@pytest.mark.parametrize("argv, expected", [
    (["--w-bits", "6", "--a-bits", "6"], QuantConfig(w_bits=6, a_bits=6)),
    (["--method", "easyquant", "--noise", "shift"], QuantConfig(method="easyquant", noise="shift")),
    (["--exclude", "head", "--exclude", "blocks.0.*"], QuantConfig(exclude=("head", "blocks.0.*"))),
    (["--no-attention-matmuls", "--int16-bias"], QuantConfig(quantize_attention_matmuls=False, int16_bias=True)),
    (["--no-reparam", "--reparam-attention", "--no-bias-correction"],
     QuantConfig(reparam=False, reparam_attention=True, bias_correction=False)),
    (["--target", "x86-vnni", "--weight-dtype", "uint8", "--activations", "symmetric"],
     QuantConfig(target="x86-vnni", weight_dtype="uint8", activations="symmetric")),
    (["--bits-budget", "6.5", "--mixed-sensitivity", "nuclear", "--mixed-images", "2", "--w-bits", "8"],
     QuantConfig(bits_budget=6.5, mixed_sensitivity="nuclear", mixed_images=2, w_bits=8)),
    (["--seed", "3", "--calib-size", "32", "--batch-size", "4"], QuantConfig(seed=3, calib_size=32, batch_size=4)),
    (["--search-tokens", "64", "--no-sequential", "--objective", "pearson", "--ranking-loss", "0.1",
      "--read-token-share", "0", "--screen-tokens", "0", "--screen-keep", "2", "--grid-stride", "3",
      "--search-images", "2", "--holdout-images", "1"],
     QuantConfig(search=SearchConfig(tokens=64, sequential=False, objective="pearson", ranking_loss=0.1,
                                     read_token_share=0.0, screen_tokens=0, screen_keep=2, grid_stride=3,
                                     search_images=2, holdout_images=1))),
])
def test_each_flag_reaches_its_field(argv, expected):
    assert _config(*argv) == expected


def test_help_groups_in_order_and_defaults_from_the_dataclasses():
    parser = _subparser()
    titles = [g.title for g in parser._action_groups if g._group_actions]
    assert titles[-6:] == ["data", "method", "search", "target", "output", "run and logging"]
    where = {s: g.title for g in parser._action_groups for a in g._group_actions for s in a.option_strings}
    assert (where["--calib"], where["--method"], where["--search-tokens"], where["--w-bits"], where["--report"],
            where["--preset"], where["-v"]) == ("data", "method", "search", "target", "output", "run and logging",
                                                "run and logging")
    text = parser.format_help()
    assert "(default: 1024)" in text and "(default: gptq)" in text and "(default: paper+shift)" in text
    assert "--no-sequential" in text and "--no-int16-bias" in text


class Flavour(str, enum.Enum):
    PLAIN = "plain"
    SPICY = "spicy"


@dataclasses.dataclass(frozen=True)
class Toy:
    """A technique's own settings, registered from outside the CLI."""

    strength: float = dataclasses.field(default=0.5, metadata=options.option("how hard the toy pushes", "toy"))
    flavour: Flavour = dataclasses.field(default=Flavour.PLAIN, metadata=options.option("its flavour", "toy"))
    passes: int = 2  # a file-only setting: no flag


@pytest.fixture
def toy():
    options.register_group("toy", "toy technique", "settings of a technique registered by its own module")
    options.register_section("toy", Toy)
    yield Toy
    options.unregister("toy")


def test_a_registered_section_has_flags_a_help_group_and_its_config(toy, tmp_path, capsys):
    parser = _subparser()
    group = next(g for g in parser._action_groups if g.title == "toy technique")
    assert {s for a in group._group_actions for s in a.option_strings} == {"--strength", "--flavour"}
    assert "how hard the toy pushes (default: 0.5)" in " ".join(parser.format_help().split())
    args = build_parser().parse_args(["convert", "m", "-o", "o", "--strength", "0.75", "--flavour", "spicy"])
    resolved = resolve(args)
    assert resolved.configs["toy"] == Toy(strength=0.75, flavour=Flavour.SPICY)
    assert resolved.config == QuantConfig()
    path = tmp_path / "toy.toml"
    path.write_text('[toy]\nstrength = 0.25\npasses = 3\n')
    assert resolve(build_parser().parse_args(["convert", "--config", str(path)])).configs["toy"] == Toy(0.25,
                                                                                                          passes=3)
    assert main(["convert", "--config", str(path), "--flavour", "spicy", "--print-config"]) == 0
    assert '[toy]\nstrength = 0.25\nflavour = "spicy"\npasses = 3\n' in capsys.readouterr().out
    options.unregister("toy")
    assert "--strength" not in _subparser().format_help()


def test_presets_are_their_pinned_settings():
    assert QuantConfig.preset("fast") == QuantConfig() == _config("--preset", "fast")
    assert QuantConfig.preset("paper") == QuantConfig(**PAPER) == _config("--preset", "paper")
    assert QuantConfig.preset("accurate") == QuantConfig(**ACCURATE) == _config("--preset", "accurate")
    assert QuantConfig.preset("paper", w_bits=6, a_bits=6, search={"tokens": 64}) == QuantConfig(
        **{**PAPER, "w_bits": 6}, a_bits=6, search=SearchConfig(tokens=64))
    with pytest.raises(ConfigError, match="unknown preset 'fastest'; choose one of fast, accurate, paper"):
        QuantConfig.preset("fastest")


def test_preset_help_names_each_presets_flags():
    text = " ".join(_subparser().format_help().split()).replace("- ", "-")  # argparse wraps after a flag's hyphen
    assert ("paper: the NoisyQuant paper's setting at W8A8 (--method noisyquant --w-bits 8 --activations symmetric "
            "--attention-probabilities --no-reparam --weight-rounding nearest --no-bias-correction "
            "--no-balance-channels)") in text
    assert "accurate: the twin-uniform full stack at W8A8: a float select" in text and "--reparam-attention" in text


def test_precedence_defaults_preset_file_flags(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('method = "easyquant"\nreparam = true\nw_bits = 6\n[search]\ntokens = 128\n')
    config = _config("--preset", "paper", "--config", str(path), "--w-bits", "5", "--search-tokens", "96")
    assert config == QuantConfig(**{**PAPER, "method": "easyquant", "reparam": True, "w_bits": 5},
                                 search=SearchConfig(tokens=96))
    assert _config("--preset", "paper", "--reparam") == QuantConfig(**{**PAPER, "reparam": True})


@pytest.mark.parametrize("kind", ["toml", "json"])
def test_print_config_round_trip(tmp_path, capsys, kind):
    out = tmp_path / "never.onnx"
    argv = ["convert", "m.onnx", "-o", str(out), "--preset", "paper", "--target", "x86-vnni", "--exclude", "head",
            "--bits-budget", "6", "--w-bits", "8", "--screen-tokens", "0", "--print-config", kind]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert not out.exists()
    path = tmp_path / f"printed.{kind}"
    path.write_text(text)
    assert main(["convert", "--config", str(path), "--print-config", kind]) == 0
    assert capsys.readouterr().out == text
    expected = QuantConfig(**PAPER, target="x86-vnni", exclude=("head",), bits_budget=6.0,
                           search=SearchConfig(screen_tokens=0))
    assert _config("--config", str(path)) == expected == _config(*argv[4:-2])


def test_print_config_leaves_the_targets_choices_to_the_target(tmp_path, capsys):
    assert main(["convert", "--print-config"]) == 0
    text = capsys.readouterr().out
    assert '# w_bits = 8 (the target' in text and "\nw_bits" not in text
    path = tmp_path / "default.toml"
    path.write_text(text)
    assert _config("--config", str(path), "--target", "x86-vnni") == QuantConfig(target="x86-vnni")  # w_bits 8


@pytest.mark.parametrize("content, needles", [
    ('methd = "minmax"\n', ["c.toml", "unknown key 'methd'"]),
    ('[search]\ntokns = 3\n', ["c.toml", "unknown key 'search.tokns'"]),
    ('w_bits = "six"\n', ["c.toml", "w_bits must be an integer", '"six"']),
    ('reparam = 1\n', ["reparam must be true or false"]),
    ('[search]\nact_alphas = [0.3, 1.0]\n', ["search.act_alphas must be a list [number, number, integer]"]),
    ('method = "fastquant"\n', ["method must be one of", '"noisyquant"', '"fastquant"']),
    ('search = 3\n', ["search must be a table"]),
    ('w_bits = \n', ["c.toml is not valid TOML"]),
])
def test_bad_config_file_is_one_line_and_writes_nothing(tmp_path, capsys, content, needles):
    path = tmp_path / "c.toml"
    path.write_text(content)
    out = tmp_path / "out.onnx"
    _fails(capsys, ["convert", tmp_path / "missing-model.onnx", "-o", out, "--config", path], *needles, written=[out])


def test_bad_run_options_are_one_line_and_write_nothing(tmp_path, capsys):
    out = tmp_path / "out.onnx"
    common = ["convert", tmp_path / "m.onnx", "-o", out]
    _fails(capsys, [*common, "--preset", "nonsense"], "invalid choice: 'nonsense'", "'fast', 'accurate', 'paper'",
           written=[out])
    _fails(capsys, [*common, "--config", tmp_path / "absent.toml"], "config file", "absent.toml not found",
           written=[out])
    (tmp_path / "c.yaml").write_text("a: 1\n")
    _fails(capsys, [*common, "--config", tmp_path / "c.yaml"], "expected a .toml or .json file", written=[out])
    log = tmp_path / "no" / "such" / "run.log"
    _fails(capsys, [*common, "--log-file", log], f"folder {log.parent} does not exist", written=[out, log])
    _fails(capsys, [*common, "--eval-labels", tmp_path / "l.npy"], "--eval-labels needs --eval", written=[out])
    _fails(capsys, ["convert", "--preset", "paper"], "convert needs MODEL and -o OUTPUT")


def test_warnings_for_flags_that_will_do_nothing(tmp_path):
    def warnings(*argv, plan=False):
        return ignored(resolve(build_parser().parse_args(["convert", "m", "-o", "o", *argv])), plan)

    assert warnings("--method", "minmax", "--search-images", "4", "--weight-rounding", "nearest", "--noise",
                    "paper") == ["--noise ignored: method minmax adds no noise",
                                 "--weight-rounding, --search-images ignored: method minmax searches nothing"]
    assert warnings("--mixed-images", "2") == ["--mixed-images ignored: it applies under --bits-budget only"]
    assert warnings("--attention-probabilities", "--no-attention-matmuls") == [
        "--attention-probabilities ignored: --no-attention-matmuls keeps the attention matmuls in float"]
    assert warnings("--preset", "paper", "--method", "minmax") == []  # a preset's settings are not the user's flags
    path = tmp_path / "c.toml"
    path.write_text('target = "x86-vnni"\nseed = 2\n')
    assert warnings("--preset", "paper", "--config", str(path), "--w-bits", "6", "--target", "arm64", plan=True) == [
        "--w-bits, --config, --preset ignored: the loaded plan fixes these settings"]  # the target is not fixed
    assert warnings("--target", "arm64", "--weight-dtype", "int8", plan=True) == []


def test_evaluation_options_reach_convert_only_where_it_takes_them():
    args = build_parser().parse_args(["convert", "m", "-o", "o", "--eval", "held/", "--eval-labels", "l.npy",
                                      "--latency"])
    assert (args.eval, args.eval_labels, args.latency) == ("held/", "l.npy", True)

    def later(model, output, calib=None, config=None, *, eval_data=None, eval_labels=None, measure_latency=False,
              command=None):
        pass

    def today(model, output, calib=None, config=None, *, load_plan=None):
        pass

    argv = ["convert", "m", "-o", "o", "--eval", "held/", "--eval-labels", "l.npy", "--latency"]
    assert _run_keywords(later, args, argv) == {"eval_data": "held/", "eval_labels": "l.npy", "measure_latency": True,
                                                "command": "nq-onnx convert m -o o --eval held/ --eval-labels l.npy "
                                                           "--latency"}
    plain = build_parser().parse_args(["convert", "m", "-o", "o"])
    assert _run_keywords(today, plain, ["convert", "m", "-o", "o"]) == {}
    with pytest.raises(ConfigError, match="--eval is not available"):
        _run_keywords(today, args, argv)


def test_exit_codes_in_help_and_reference(capsys):
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    assert [code for code, _ in EXIT_CODES] == [0, 1, 2, 70, 130]
    for code, meaning in EXIT_CODES:
        assert f"  {code:<5}{meaning.split()[0]}" in text
    reference = Path(__file__).parents[1] / "docs" / "reference" / "cli.md"
    assert "<!-- cli-exit-codes -->" in reference.read_text()


def test_config_file_keys_are_the_fields(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"w-bits": 6, "search": {"search-images": 2}}))
    assert _config("--config", str(path)) == QuantConfig(w_bits=6, search=SearchConfig(search_images=2))


def test_the_choosing_guide_lists_each_presets_options():
    from nq_onnx.cli.options import _as_flags
    from nq_onnx.core.presets import PRESETS

    guide = (Path(__file__).parents[1] / "docs" / "guides" / "choosing.md").read_text()
    for name, preset in PRESETS.items():
        row = next(line for line in guide.splitlines() if line.startswith(f"| `{name}` |"))
        flags = " ".join(_as_flags(preset.values))
        assert row.endswith(f"| `{flags}` |" if flags else "| none |"), row


def test_the_conversion_takes_every_evaluation_keyword():
    import nq_onnx

    argv = ["convert", "m", "-o", "o", "--eval", "held/", "--eval-labels", "l.npy", "--latency"]
    keywords = _run_keywords(nq_onnx.convert, build_parser().parse_args(argv), argv)
    assert set(keywords) == {"eval_data", "eval_labels", "measure_latency", "command"}
