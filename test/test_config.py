"""Configuration: defaults are the paper's, bad values are refused with the key named."""

from __future__ import annotations

import pytest

from esam_core.config import PARAMETERS, Config, ConfigError, load_config, read_parameter_file


def test_defaults_are_the_papers_optimum():
    cfg = Config()
    assert (cfg["mmg.theta_o"], cfg["mmg.gamma_o"], cfg["emr.delta"], cfg["emr.tau"],
            cfg["usr.rho"]) == (0.8, 0.6, 0.05, 0.1, 0.1)
    assert (cfg["mmg.points_per_side"], cfg["gallery.points_per_side"]) == (32, 64)
    assert cfg["modules.mmg"] and cfg["modules.emr"] and cfg["modules.usr"]


@pytest.mark.parametrize("key, value, words", [
    ("emr.delta", 1.5, ["emr.delta", "1.5", "[0.0, 1.0]"]),
    ("mmg.points_per_side", 2.5, ["mmg.points_per_side", "integer"]),
    ("mmg.nms_iou", "polygon", ["mmg.nms_iou", "polygon", "mask", "box"]),
    ("modules.usr", "yes", ["modules.usr", "true or false"]),
    ("usr.rho", "0.1", ["usr.rho", "number"]),
    ("emr.nonsense", 1, ["unknown", "emr.nonsense"]),
])
def test_invalid_values_name_key_value_and_range(key, value, words):
    with pytest.raises(ConfigError) as err:
        Config({key: value})
    for word in words:
        assert word in str(err.value)


def test_ros_params_file_and_bare_mapping(tmp_path):
    ros = tmp_path / "ros.yaml"
    ros.write_text("esam_node:\n  ros__parameters:\n    cameras: ['a']\n"
                   "    emr: {delta: 0.1}\n    mmg: {density: {mode: 'off'}}\n")
    flat = read_parameter_file(ros)
    assert flat == {"cameras": ["a"], "emr.delta": 0.1, "mmg.density.mode": "off"}
    cfg = load_config(ros)  # the node's own keys (cameras) are not E-SAM parameters
    assert cfg["emr.delta"] == 0.1 and cfg["mmg.density.mode"] == "off"
    bare = tmp_path / "bare.yaml"
    bare.write_text("usr: {rho: 0.3}\nmodel: {type: test_tiny}\n")
    assert load_config(bare)["usr.rho"] == 0.3
    wildcard = tmp_path / "wild.yaml"
    wildcard.write_text("/**:\n  ros__parameters:\n    emr: {top_k: 5}\n")
    assert load_config(wildcard)["emr.top_k"] == 5


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("emr: {delta: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(broken)
    other = tmp_path / "other.yaml"
    other.write_text("other_node:\n  ros__parameters: {x: 1}\n")
    with pytest.raises(ConfigError, match="esam_node"):
        load_config(other)


def test_updated_validates_and_copies():
    cfg = Config()
    new = cfg.updated({"emr.top_k": 4}).replace(usr__rho=0.3)
    assert (new["emr.top_k"], new["usr.rho"], cfg["emr.top_k"]) == (4, 0.3, 5)
    assert new != cfg and Config() == cfg
    with pytest.raises(ConfigError):
        cfg.updated({"emr.top_k": 0})


def test_every_parameter_has_description_and_valid_default():
    for key, p in PARAMETERS.items():
        assert p.description, key
        Config({key: p.default})
