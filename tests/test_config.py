"""Run configs: YAML/JSON in and out, clear errors, CLI overrides, and reproducible runs."""

import json

import pytest
import yaml

from keras_mmtl.cli import build_parser, main
from keras_mmtl.config import CONFIG_FILE, ConfigError, RunConfig, from_arguments


@pytest.mark.parametrize("name", ["run.yaml", "run.json"])
def test_round_trip_through_a_file(tmp_path, name):
    config = RunConfig.from_dict({"data": {"manifest": "p.csv", "split_column": "split"},
                                  "model": {"image_size": [64, 48]},
                                  "training": {"epochs": 2, "unfreeze_blocks": "all"}})
    path = config.save(str(tmp_path / name))
    assert RunConfig.from_file(path) == config
    loader = json.load if name.endswith(".json") else yaml.safe_load
    with open(path) as f:
        assert loader(f)["training"]["epochs"] == 2


@pytest.mark.parametrize("values, message", [
    ({"trainig": {}}, r"unknown sections \['trainig'\]"),
    ({"training": {"epoch": 3}}, r"unknown keys \['epoch'\] in section 'training'"),
    ({"training": {"epochs": "3"}}, r"training.epochs must be int; got '3'"),
    ({"training": {"learning_rate": True}}, r"training.learning_rate must be float"),
    ({"training": {"label_smoothing": "0.1"}}, r"training.label_smoothing must be float"),
    ([1, 2], "must be a mapping of sections"),
])
@pytest.mark.bad_input
def test_bad_configs_say_which_key(values, message):
    with pytest.raises(ConfigError, match=message):
        RunConfig.from_dict(values)


def test_a_file_that_does_not_parse_is_named(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("training: [epochs: 3\n")
    with pytest.raises(ConfigError, match=f"Cannot parse the config file {path}"):
        RunConfig.from_file(str(path))


def test_flags_given_override_the_file_and_others_do_not(tmp_path):
    base = RunConfig.from_dict({"data": {"manifest": "p.csv"},
                                "training": {"epochs": 7, "batch_size": 8}})
    args = build_parser().parse_args(["train", "--epochs", "2", "--image-size", "32x16",
                                      "--no-export", "--freeze", "fusion",
                                      "--label-smoothing", "0"])
    config = from_arguments(args, base)
    assert config.training.epochs == 2 and config.training.batch_size == 8
    assert config.training.label_smoothing == 0.0 and base.training.label_smoothing is None
    assert config.model.image_size == [32, 16] and config.output.export is False
    assert config.transfer.freeze == ["fusion"] and config.data.manifest == "p.csv"
    assert config.output_dir == "runs/p"


def test_defaults_are_those_of_the_cli_help():
    defaults = from_arguments(build_parser().parse_args(["train"]))
    assert defaults == RunConfig()
    assert defaults.training.epochs == 30 and defaults.model.fusion == "concat"


@pytest.mark.slow
def test_a_run_relaunched_from_its_written_config_gives_the_same_metrics(tmp_path, products):
    first = tmp_path / "first"
    config = RunConfig.from_dict({
        "data": {"manifest": products, "split_column": "split", "seed": 3},
        "model": {"image_backbone": "small_cnn", "image_weights": None, "image_size": [16, 16]},
        "training": {"epochs": 2, "batch_size": 4, "augment_images": True,
                     "augment_text": True, "label_smoothing": 0.1, "weight_decay": 1e-4},
        "output": {"run_dir": str(first), "export": False}})
    start = tmp_path / "start.yaml"
    config.save(str(start))
    assert main(["train", "--config", str(start)]) == 0
    written = first / CONFIG_FILE
    # Written back as run: with the preset "auto" resolved.
    assert RunConfig.from_file(str(written)) == config.replace(training={"preset": "medium"})
    again = tmp_path / "again"
    assert main(["train", "--config", str(written), "--run-dir", str(again)]) == 0
    # The fused model and its image expert (the medium preset), then their ensemble.
    for name in ("member1/state.json", "member1-image/state.json", "eval/report.json"):
        assert json.loads((again / name).read_text()) == json.loads((first / name).read_text())


def test_data_root_flag_keeps_image_paths_inside_it(tmp_path):
    from conftest import product_rows, write_manifest
    from keras_mmtl.data import DataValidationError

    rows = product_rows(str(tmp_path / "root"))
    rows[0]["image"] = "../elsewhere.jpg"
    manifest = write_manifest(str(tmp_path / "root"), rows)
    args = build_parser().parse_args(["train", "--manifest", manifest, "--split-column",
                                      "split", "--data-root", str(tmp_path / "root")])
    config = from_arguments(args)
    assert config.data.data_root == str(tmp_path / "root")
    with pytest.raises(DataValidationError, match="manifest.csv:2: field 'image': image path "):
        config.data.read()
