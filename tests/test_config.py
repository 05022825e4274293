"""Strict configuration: unknown keys, wrong types and incompatible combinations fail at load time."""

import glob
import os

import pytest

from causvid.config import ConfigError, load_config, save_config

ROOT = os.path.join(os.path.dirname(__file__), "..")


def test_defaults_and_overrides(tmp_path):
    cfg = load_config(None, ["train.max_steps=7", "model.size=tiny", "schedule.denoising_step_list=[1000,500,0]"])
    assert cfg.train.max_steps == 7 and cfg.model.size == "tiny"
    assert list(cfg.schedule.denoising_step_list) == [1000, 500, 0]
    p = tmp_path / "run.yaml"
    p.write_text("train:\n  lr_typo: 1\n")
    with pytest.raises(ConfigError, match=r"train\.lr_typo"):
        load_config(str(p))


def test_unknown_key_names_key_and_valid_keys():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["model.sise=tiny"])
    assert "model.sise" in str(e.value) and "size" in str(e.value)


def test_wrong_type_names_key():
    with pytest.raises(ConfigError, match=r"train\.max_steps"):
        load_config(None, ["train.max_steps=abc"])


def test_bad_choice_names_valid_values():
    with pytest.raises(ConfigError, match=r"dmd\.teacher.*bidirectional"):
        load_config(None, ["dmd.teacher=bidirectionl"])
    with pytest.raises(ConfigError, match=r"model\.size"):
        load_config(None, ["model.size=huge"])


def test_yaml_boolean_spelling_of_a_choice():
    # `no` is YAML 1.1 for false; the choice "no" must still be accepted from the command line and files
    assert load_config(None, ["train.mixed_precision=no"]).train.mixed_precision == "no"
    assert load_config(None, ["train.mixed_precision=bf16"]).train.mixed_precision == "bf16"
    with pytest.raises(ConfigError, match=r"train\.mixed_precision"):
        load_config(None, ["train.mixed_precision=yes"])


@pytest.mark.parametrize("over,key", [
    (["model.chunk_size=2"], "model.chunk_size"),  # 9 latent frames, 2 does not divide
    (["data.num_frames=32"], "data.num_frames"),  # not 1 + 4n
    (["schedule.denoising_step_list=[1000,757,522]"], "denoising_step_list"),  # must end with 0
    (["schedule.denoising_step_list=[500,1000,0]"], "denoising_step_list"),  # must decrease
    (["train.keep_last=0"], "train.keep_last"),
])
def test_incompatible_combinations(over, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, over)


def test_independent_first_frame_changes_divisibility():
    load_config(None, ["model.independent_first_frame=true", "model.chunk_size=4"])  # 1 + 8 latent frames
    with pytest.raises(ConfigError):
        load_config(None, ["model.independent_first_frame=true", "model.chunk_size=3"])


def test_yaml_defaults_chain_and_save(tmp_path):
    (tmp_path / "base.yaml").write_text("train:\n  max_steps: 3\n")
    (tmp_path / "child.yaml").write_text("defaults: [base.yaml]\ntrain:\n  batch_size: 2\n")
    cfg = load_config(str(tmp_path / "child.yaml"))
    assert cfg.train.max_steps == 3 and cfg.train.batch_size == 2
    save_config(cfg, tmp_path / "resolved.yaml")
    again = load_config(str(tmp_path / "resolved.yaml"))
    assert again == cfg


def test_missing_file_is_clear():
    with pytest.raises(ConfigError, match="not found"):
        load_config("/nonexistent/x.yaml")


def test_every_shipped_config_validates():
    files = [f for f in glob.glob(os.path.join(ROOT, "configs", "**", "*.yaml"), recursive=True)
             if "accelerate" not in f]
    for f in files:
        load_config(f)
