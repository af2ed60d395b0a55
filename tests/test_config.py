import pytest

from diffmoe_dist.config import ConfigError, config_from_dict, load_config, save_config


@pytest.mark.parametrize(
    "override, field",
    [
        ("model.size=XXL", "model.size"),
        ("model.num_heads=5", "model.num_heads"),
        ("model.patch_size=3", "model.patch_size"),
        ("moe.router=switch", "moe.router"),
        ("moe.pool=node", "moe.pool"),
        ("moe.capacity=0", "moe.capacity"),
        ("moe.gamma=1.5", "moe.gamma"),
        ("optim.lr=-1", "optim.lr"),
        ("train.precision=fp8", "train.precision"),
        ("train.ema_decay=1.0", "train.ema_decay"),
        ("data.global_batch_size=130", "data.global_batch_size"),
        ("parallel.expert_parallel_size=3", "parallel.expert_parallel_size"),
        ("logging.wandb=maybe", "logging.wandb"),
        ("optim.adamw_impl=apex", "optim.adamw_impl"),
    ],
)
def test_validate_names_field_value_and_fix_on_one_line(override, field):
    cfg = load_config("configs/local/diffmoe-tiny.yaml", [override])
    with pytest.raises(ConfigError) as err:
        cfg.validate(world_size=4)
    msg = str(err.value)
    assert msg.startswith(field) and "\n" not in msg
    assert override.split("=", 1)[1] in msg


def test_override_type_errors_are_reported_before_validation():
    with pytest.raises(ConfigError, match="optim.lr"):
        load_config("configs/local/dense-tiny.yaml", ["optim.lr=fast"])
    with pytest.raises(ConfigError, match="model.depth"):
        load_config("configs/local/dense-tiny.yaml", ["model.depth=2.5"])
    with pytest.raises(ConfigError, match="not a config field"):
        load_config("configs/local/dense-tiny.yaml", ["optim.learning_rate=1"])
    with pytest.raises(ConfigError, match="malformed"):
        load_config("configs/local/dense-tiny.yaml", ["lr=1"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("configs/local/nope.yaml")


def test_overrides_apply_and_round_trip_through_saved_yaml(tmp_path):
    cfg = load_config("configs/local/diffmoe-tiny.yaml", ["model.depth=4", "optim.lr=3e-4", "moe.pool=ep"])
    assert cfg.model.resolved() == (4, 192, 6) and cfg.optim.lr == 3e-4 and cfg.moe.pool == "ep"
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg == config_from_dict(cfg.to_dict())


def test_every_shipped_config_validates():
    import glob

    paths = sorted(glob.glob("configs/**/*.yaml", recursive=True))
    assert len(paths) >= 20
    for path in paths:
        cfg = load_config(path)
        cfg.validate(world_size=cfg.parallel.expert_parallel_size * 2)
