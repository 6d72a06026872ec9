import argparse

import pytest

from slm.config import Config, ModelConfig, TrainConfig, add_config_flags, flags_from_args, preset_names, resolve
from slm.errors import SlmError


def parse(argv):
    parser = argparse.ArgumentParser()
    add_config_flags(parser)
    return flags_from_args(parser.parse_args(argv))


def test_every_preset_loads_and_validates():
    assert {"tiny", "cpu", "seed"} <= set(preset_names())
    for name in preset_names():
        cfg = resolve(name)
        assert cfg.train.batch_size % cfg.train.micro_batch_size == 0


def test_seed_preset_is_the_reference_design():
    m = resolve("seed").model
    assert (m.n_embd, m.n_layer, m.n_head, m.block_size, m.dropout) == (768, 6, 12, 128, 0.1)


def test_later_layers_win_defaults_preset_toml_flags(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text("[model]\nn_layer = 3\nn_embd = 64\n[train]\nlearning_rate = 0.01\n")
    cfg = resolve("tiny", toml, parse(["--n-layer", "5"]))
    assert cfg.model.n_layer == 5            # flag over TOML
    assert cfg.model.n_embd == 64            # TOML over preset
    assert cfg.model.block_size == 32        # preset over default
    assert cfg.train.learning_rate == 0.01
    assert cfg.train.weight_decay == TrainConfig().weight_decay  # default


def test_only_given_flags_are_collected():
    assert parse([]) == {}
    assert parse(["--no-bias", "--dropout", "0.2"]) == {"model": {"bias": False, "dropout": 0.2}}


def test_toml_written_for_a_run_reads_back_to_the_same_config(tmp_path):
    cfg = resolve("cpu", flags={"train": {"seed": 7}, "model": {"bias": False}})
    path = tmp_path / "config.toml"
    path.write_text(cfg.to_toml())
    assert resolve(toml_path=path) == cfg
    assert Config.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("layer, message", [
    ({"model": {"n_embd": 30, "n_head": 4}}, "divisible by --n-head"),
    ({"model": {"n_layer": 0}}, "--n-layer must be positive"),
    ({"model": {"block_size": -1}}, "--block-size must be positive"),
    ({"model": {"dropout": 1.0}}, "--dropout"),
    ({"train": {"min_learning_rate": 1.0, "learning_rate": 0.1}}, "--min-learning-rate"),
    ({"train": {"batch_size": 10, "micro_batch_size": 4}}, "multiple of --micro-batch-size"),
    ({"train": {"device": "tpu"}}, "--device"),
    ({"train": {"max_minutes": -1.0}}, "--max-minutes"),
    ({"train": {"optimizer": "sgd"}}, "--optimizer must be one of adamw, muon"),
    ({"train": {"muon_learning_rate": 0.0}}, "--muon-learning-rate must be positive"),
    ({"train": {"muon_momentum": 1.0}}, "--muon-momentum must be in"),
    ({"model": {"n_layers": 2}}, "unknown field 'n_layers'"),
    ({"optim": {"lr": 1}}, "unknown section"),
    ({"model": {"n_layer": "two"}}, "must be a int"),
])
def test_invalid_settings_are_refused_with_the_flag_named(layer, message):
    with pytest.raises(SlmError, match=message):
        resolve(flags=layer)


def test_a_floor_learning_rate_above_the_peak_is_refused():
    with pytest.raises(SlmError, match="min-learning-rate"):
        TrainConfig(learning_rate=1e-4, min_learning_rate=1e-3)


def test_bad_toml_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\n")
    with pytest.raises(SlmError, match="not valid TOML"):
        resolve(toml_path=bad)
    with pytest.raises(SlmError, match="does not exist"):
        resolve(toml_path=tmp_path / "missing.toml")
    with pytest.raises(SlmError, match="unknown preset"):
        resolve("huge")


def test_head_dim_is_derived():
    assert ModelConfig(n_embd=64, n_head=4).head_dim == 16


def test_runs_saved_when_compile_was_a_bool_still_load():
    from slm.config import Config

    assert Config.from_dict({"train": {"compile": False}}).train.compile == "off"
    assert Config.from_dict({"train": {"compile": True}}).train.compile == "on"
    with pytest.raises(SlmError, match="--compile must be one of auto, on, off"):
        Config.from_dict({"train": {"compile": "sometimes"}})


def test_runs_saved_before_shuffled_windows_resume_with_the_random_windows_they_ran_with():
    from slm.config import Config

    assert Config().train.windows == "shuffled"
    assert Config.from_dict({"train": {"seed": 3}}).train.windows == "random"
    assert Config.from_dict({"model": {"n_layer": 2}}).train.windows == "random"
    assert Config.from_dict({"train": {"windows": "shuffled"}}).train.windows == "shuffled"
    with pytest.raises(SlmError, match="--windows must be one of random, shuffled"):
        Config.from_dict({"train": {"windows": "sequential"}})
