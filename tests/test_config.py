import pytest
from conftest import HANG_TIMEOUT

from diffmoe_dist.config import ConfigError, config_from_dict, load_config, save_config
from diffmoe_dist.data.check import check_files


@pytest.mark.parametrize(
    "override, field",
    [
        ("model.size=XXL", "model.size"),
        ("model.num_heads=5", "model.num_heads"),
        ("model.patch_size=3", "model.patch_size"),
        ("moe.router=switch", "moe.router"),
        ("moe.pool=node", "moe.pool"),
        ("moe.dispatch=fast", "moe.dispatch"),
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


# ---- every bad input: one line naming the field, before anything starts -------------------------
@pytest.mark.parametrize(
    "override, field",
    [
        ("optim.lr=nan", "optim.lr"),
        ("optim.beta1=1.5", "optim.beta1"),
        ("optim.beta2=-0.1", "optim.beta2"),
        ("optim.weight_decay=-1", "optim.weight_decay"),
        ("optim.eps=0", "optim.eps"),
        ("optim.grad_clip=inf", "optim.grad_clip"),
        ("model.image_size=0", "model.image_size"),
        ("model.mlp_ratio=0", "model.mlp_ratio"),
        ("model.num_classes=0", "model.num_classes"),
        ("model.depth=0", "model.depth"),
        ("model.hidden_size=0", "model.hidden_size"),
        ("moe.interleave=7", "moe.interleave"),  # depth 6: no MoE block left
        ("checkpoint.every=-2", "checkpoint.every"),
        ("sample.per_class=0", "sample.per_class"),
        ("sample.cfg_scale=nan", "sample.cfg_scale"),
        ("sample.every=-1", "sample.every"),
        ("logging.log_every=0", "logging.log_every"),
        ("moe.aux_loss_weight=-1", "moe.aux_loss_weight"),
        ("moe.num_shared_experts=-1", "moe.num_shared_experts"),
        ("moe.capacity_full_steps=10", "moe.capacity_decay_steps"),  # a stage I with no end
        ("moe.capacity_decay_steps=-5", "moe.capacity_decay_steps"),
        ("train.max_minutes=inf", "train.max_minutes"),
        ("train.seed=-3", "train.seed"),
        ("data.num_workers=-1", "data.num_workers"),
    ],
)
def test_every_field_is_range_and_finiteness_checked(override, field):
    cfg = load_config("configs/local/diffmoe-tiny.yaml", [override])
    with pytest.raises(ConfigError) as err:
        cfg.validate(world_size=2)
    msg = str(err.value)
    assert msg.startswith(field + "=") and "\n" not in msg


def test_explicit_zero_sizes_are_refused_not_replaced_by_the_size_defaults():
    cfg = load_config("configs/local/diffmoe-tiny.yaml", ["model.depth=0"])
    assert cfg.model.resolved()[0] == 0  # config.yaml records 0: the model must not silently get 6
    assert load_config("configs/local/diffmoe-tiny.yaml").model.resolved() == (6, 192, 6)


def test_interleave_up_to_depth_keeps_an_moe_block_and_dense_ignores_it():
    from diffmoe_dist.model.ffn import is_moe_block

    cfg = load_config("configs/local/diffmoe-tiny.yaml", ["moe.interleave=6"]).validate(world_size=2)
    depth = cfg.model.resolved()[0]
    assert depth == 6 and [i for i in range(depth) if is_moe_block(cfg.moe, i)] == [5]  # the last block
    with pytest.raises(ConfigError, match=r"moe.interleave=7 .*leaves no MoE block in model.depth=6"):
        load_config("configs/local/diffmoe-tiny.yaml", ["moe.interleave=7"]).validate(world_size=2)
    dense = load_config("configs/local/dense-tiny.yaml", ["moe.interleave=7"]).validate(world_size=2)
    assert not any(is_moe_block(dense.moe, i) for i in range(dense.model.resolved()[0]))


def test_yaml_syntax_error_and_python_tag_are_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  depth: 2\n   hidden_size: [\n")
    with pytest.raises(ConfigError, match=r"not valid YAML at line \d+") as err:
        load_config(bad)
    assert "\n" not in str(err.value)
    evil = tmp_path / "evil.yaml"
    evil.write_text("model: !!python/object/apply:os.system ['touch pwned']\n")
    with pytest.raises(ConfigError, match="python/object/apply:os.system.*refused") as err:
        load_config(evil)
    assert "\n" not in str(err.value) and not (tmp_path / "pwned").exists()
    with pytest.raises(ConfigError, match="optim.lr is not valid YAML"):
        load_config("configs/local/dense-tiny.yaml", ["optim.lr=["])
    listy = tmp_path / "list.yaml"
    listy.write_text("- model\n")
    with pytest.raises(ConfigError, match="not a YAML mapping"):
        load_config(listy)


def test_unknown_keys_say_which_was_meant(tmp_path):
    with pytest.raises(ConfigError, match=r"did you mean moe\.capacity\?"):
        load_config("configs/local/diffmoe-tiny.yaml", ["moe.capacty=1"])
    with pytest.raises(ConfigError, match=r"did you mean model\?"):
        load_config("configs/local/diffmoe-tiny.yaml", ["modle.depth=2"])
    typo = tmp_path / "typo.yaml"
    typo.write_text("optim:\n  learning_rat: 1e-3\n")
    with pytest.raises(ConfigError, match="not a config field: known are"):  # nothing close: the list
        load_config(typo)
    typo.write_text("optimm:\n  lr: 1e-3\n")
    with pytest.raises(ConfigError, match=r"did you mean optim\?"):
        load_config(typo)


def test_gradient_reduction_fields_default_to_fp32_overlapped_and_device_chosen_buckets():
    par = load_config("configs/local/diffmoe-tiny.yaml").validate(world_size=2).parallel
    assert (par.grad_reduce_dtype, par.overlap_grad_reduce, par.grad_bucket_mb) == ("fp32", True, 0.0)
    cfg = load_config(
        "configs/local/diffmoe-tiny.yaml",
        ["parallel.grad_reduce_dtype=bf16", "parallel.overlap_grad_reduce=false", "parallel.grad_bucket_mb=25"],
    ).validate(world_size=2)
    assert (cfg.parallel.grad_reduce_dtype, cfg.parallel.overlap_grad_reduce, cfg.parallel.grad_bucket_mb) == (
        "bf16",
        False,
        25.0,
    )
    with pytest.raises(ConfigError) as err:
        load_config("configs/local/diffmoe-tiny.yaml", ["parallel.grad_reduce_dtype=x"]).validate(world_size=2)
    assert str(err.value) == "parallel.grad_reduce_dtype='x' is invalid: use fp32 or bf16"
    with pytest.raises(ConfigError, match=r"^parallel.grad_bucket_mb=-1.0 is invalid"):
        load_config("configs/local/diffmoe-tiny.yaml", ["parallel.grad_bucket_mb=-1"]).validate(world_size=2)


@pytest.mark.parametrize("peak", ["measure", "off", "989", "0.5", "tools/clusters/h100_32x8.yaml"])
def test_mfu_peak_takes_measure_off_tflops_or_a_cluster_yaml(peak):
    cfg = load_config("configs/local/diffmoe-tiny.yaml", [f"logging.mfu_peak={peak}"]).validate(world_size=2)
    assert cfg.logging.mfu_peak == peak


def test_mfu_peak_number_in_a_yaml_file_is_kept_as_written(tmp_path):
    path = tmp_path / "peak.yaml"
    path.write_text("logging:\n  mfu_peak: 989\n")
    assert load_config(path).validate(world_size=1).logging.mfu_peak == "989"


@pytest.mark.parametrize(
    "peak, why",
    [
        ("fast", "not a known value"),
        ("-3", "positive number of TFLOPS"),
        ("0", "positive number of TFLOPS"),
        ("nan", "positive number of TFLOPS"),
        ("tools/clusters/nope.yaml", "does not exist"),
        ("configs/local/diffmoe-tiny.yaml", "no positive peak_flops for train.precision=fp32"),
    ],
)
def test_bad_mfu_peak_is_one_line_naming_the_field(peak, why):
    with pytest.raises(ConfigError) as err:
        load_config("configs/local/diffmoe-tiny.yaml", [f"logging.mfu_peak={peak}"]).validate(world_size=2)
    msg = str(err.value)
    assert msg.startswith(f"logging.mfu_peak={peak!r} is invalid") and why in msg and "\n" not in msg


def test_cluster_yaml_must_give_the_peak_for_the_runs_precision(tmp_path):
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text("peak_flops:\n  bf16: 989.0e12\n")
    over = [f"logging.mfu_peak={cluster}"]
    load_config("configs/local/diffmoe-tiny.yaml", over + ["train.precision=bf16"]).validate(world_size=2)
    with pytest.raises(ConfigError, match="no positive peak_flops for train.precision=fp32"):
        load_config("configs/local/diffmoe-tiny.yaml", over).validate(world_size=2)


def test_removed_fields_are_an_error_in_yaml_but_ignored_in_an_old_checkpoints_config(tmp_path):
    old_yaml = tmp_path / "old.yaml"
    old_yaml.write_text("data:\n  dataset: digits\n")
    with pytest.raises(ConfigError) as err:
        load_config(old_yaml)
    assert str(err.value).startswith("data.dataset (from ") and "no longer a config field" in str(err.value)
    with pytest.raises(ConfigError, match="data.shuffle_buffer .*no longer a config field.*delete it"):
        load_config("configs/local/diffmoe-tiny.yaml", ["data.shuffle_buffer=10"])
    # meta["config"] of a checkpoint written before the removal (and before the new fields existed)
    stored = load_config("configs/local/diffmoe-tiny.yaml").to_dict()
    stored["data"].update(dataset="digits", shuffle_buffer=1000)
    del stored["logging"]["mfu_peak"], stored["parallel"]["grad_reduce_dtype"]
    assert config_from_dict(stored) == load_config("configs/local/diffmoe-tiny.yaml")


def test_option_lists_are_declared_once_in_the_config_package():
    """No module of diffmoe_dist outside config/ spells out a config value list of its own."""
    import ast
    import pathlib

    from diffmoe_dist.config import options
    from diffmoe_dist.model.moe import routers

    assert routers.ROUTERS is options.ROUTERS and "dense" not in routers.ROUTERS  # an MoE layer's routers
    assert options.ROUTER_CHOICES == ("dense", *options.ROUTERS)
    lists = {
        name: frozenset(value)
        for name, value in vars(options).items()
        if name.isupper() and isinstance(value, tuple) and len(value) > 1 and all(isinstance(v, str) for v in value)
    }
    assert {"ROUTERS", "ROUTER_CHOICES", "POOLS", "INFERENCE_MODES", "SAMPLERS"} <= set(lists)
    copies = []
    for path in sorted(pathlib.Path("diffmoe_dist").glob("**/*.py")):
        if path.parts[1] == "config":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Tuple, ast.List, ast.Set)) and node.elts:
                if all(isinstance(e, ast.Constant) for e in node.elts):
                    values = frozenset(e.value for e in node.elts)
                    copies += [f"{path}:{node.lineno} {name}" for name, v in lists.items() if values == v]
    assert not copies, f"import these from diffmoe_dist.config: {copies}"


@pytest.mark.parametrize("router", ["token_choice", "expert_race", "expert_choice_global", "expert_choice_local"])
def test_padded_dispatch_only_for_routers_whose_rows_per_expert_have_a_host_bound(router):
    """Token choice and Expert Race let one expert take every token of a rank: refused on one line.
    The config's list and the router classes that define ``padded_rows`` are the same set, and a
    change of moe.dispatch on resume is not a training change (the same rows are computed)."""
    from diffmoe_dist.config import options
    from diffmoe_dist.model.moe.routing import ROUTER_TYPES, Router
    from diffmoe_dist.train.run_dir import compare_configs

    cfg = load_config("configs/local/diffmoe-tiny.yaml", [f"moe.router={router}", "moe.dispatch=padded"])
    if router in options.PADDED_ROUTERS:
        cfg.validate(world_size=4)
    else:
        with pytest.raises(ConfigError) as err:
            cfg.validate(world_size=4)
        assert str(err.value).startswith("moe.dispatch='padded'") and router in str(err.value)
        assert "\n" not in str(err.value)
    bounded = {name for name, cls in ROUTER_TYPES.items() if cls.padded_rows is not Router.padded_rows}
    assert bounded == set(options.PADDED_ROUTERS)
    assert compare_configs({"moe": {"dispatch": "exact"}}, {"moe": {"dispatch": "padded"}})[:2] == ([], [])


def test_moe_layer_refuses_the_dense_router_by_name():
    from diffmoe_dist.config import MoEConfig
    from diffmoe_dist.model.moe.layer import MoEFeedForward

    with pytest.raises(ValueError, match="moe.router='dense'.*expert_choice_global"):
        MoEFeedForward(8, 16, MoEConfig(router="dense", num_experts=4))


# ---- files the run reads: resume path, data path, manifest, each shard's size and first header ----------
def _files_error(tmp_path, *overrides) -> str:
    cfg = load_config("configs/local/diffmoe-tiny.yaml", list(overrides))
    with pytest.raises(ConfigError) as err:
        check_files(cfg.validate(world_size=2))
    assert "\n" not in str(err.value)
    return str(err.value)


def test_file_checks_pass_on_real_shards(digits):
    check_files(load_config("configs/local/diffmoe-tiny.yaml", [f"data.path={digits}"]).validate(world_size=2))


def test_missing_or_empty_data_and_missing_resume_path_are_one_line(digits, tmp_path):
    msg = _files_error(tmp_path, f"data.path={tmp_path}/nope")
    assert msg.startswith("data.path=") and "does not exist" in msg and "make_shards.py" in msg
    (tmp_path / "empty" / "train").mkdir(parents=True)
    assert "has no train/manifest.json" in _files_error(tmp_path, f"data.path={tmp_path}/empty")
    msg = _files_error(tmp_path, f"data.path={digits}", f"train.resume={tmp_path}/missing/path")
    assert msg.startswith("train.resume=") and "does not exist" in msg


def test_missing_data_names_the_recipe_of_the_configs_task(tmp_path):
    """A text-to-image config is pointed at the captioned recipes, never at the class-label digits."""
    cfg = load_config("configs/t2i/diffmoe-e16-256gpu.yaml", [f"data.path={tmp_path}/nope"])
    with pytest.raises(ConfigError) as err:
        check_files(cfg)
    msg = str(err.value)
    assert "make_shards.py images" in msg and "digits-t2i" in msg and "make_shards.py digits " not in msg
    assert "make_shards.py digits " in _files_error(tmp_path, f"data.path={tmp_path}/nope")


def _damaged_copy(digits, tmp_path, damage, shard: int = 2) -> str:
    import shutil

    out = tmp_path / "damaged"
    shutil.copytree(digits, out)
    damage(out / "train" / f"shard-{shard:06d}.tar")
    return str(out)


def test_a_shard_that_is_not_a_tar_is_named(digits, tmp_path):
    path = _damaged_copy(digits, tmp_path, lambda p: p.write_bytes(b"<html>not found</html>\n" * 100))
    msg = _files_error(tmp_path, f"data.path={path}")
    assert "shard-000002.tar is not a tar file" in msg


@pytest.mark.parametrize("cut", ["half", "before_end_blocks", "block_edge"])
def test_a_truncated_shard_is_named(digits, tmp_path, cut):
    import tarfile

    def truncate(p):
        data = p.read_bytes()
        last = tarfile.open(p).getmembers()[-1]
        end = last.offset_data + -(-last.size // 512) * 512  # where the end-of-archive blocks start
        keep = {"half": len(data) // 2, "before_end_blocks": end, "block_edge": 512 * 20}[cut]
        p.write_bytes(data[:keep])

    path = _damaged_copy(digits, tmp_path, truncate)
    assert "shard-000002.tar is truncated" in _files_error(tmp_path, f"data.path={path}")


def test_a_manifest_listing_no_samples_is_refused(digits, tmp_path):
    import json

    def empty(p):
        manifest = p.parent / "manifest.json"
        data = json.loads(manifest.read_text())
        manifest.write_text(json.dumps({**data, "shards": [], "num_samples": 0}))

    path = _damaged_copy(digits, tmp_path, empty)
    assert "lists no samples" in _files_error(tmp_path, f"data.path={path}")


@pytest.mark.parametrize("bad", ["optim.lr=nan", "damaged_shard", "model.depth=0"])
def test_train_cli_as_a_torchrun_rank_prints_one_line_and_exits_2_before_any_group(bad, digits, tmp_path):
    import os
    import subprocess
    import sys

    path = digits
    if bad == "damaged_shard":
        # shard 3 is rank 1's to check (shards r, r + W, ...); torchrun ends the peers of a rank that exits
        path = _damaged_copy(digits, tmp_path, lambda p: p.write_bytes(p.read_bytes()[:5000]), shard=3)
    # a torchrun rank whose master does not exist: building a process group would hang, not exit 2
    env = {**os.environ, "RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "9"}
    over = [f"data.path={path}"] + ([] if bad == "damaged_shard" else [bad])
    cmd = [sys.executable, "-m", "diffmoe_dist.train.cli", "--config", "configs/local/diffmoe-tiny.yaml", *over]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=HANG_TIMEOUT)
    assert res.returncode == 2, res.stderr[-2000:]
    assert res.stderr.count("\n") == 1 and res.stderr.startswith("diffmoe-train: error: "), res.stderr


def test_every_config_field_declares_what_its_change_means_on_resume():
    import dataclasses

    from diffmoe_dist.config import Config
    from diffmoe_dist.config.resume import RESUME_POLICIES, resume_policies

    sections = dataclasses.fields(Config)
    assert all(s.metadata.get("resume") in RESUME_POLICIES for s in sections)  # the default of its fields
    policies = resume_policies(Config)
    assert set(policies) == {f"{s.name}.{f.name}" for s in sections for f in dataclasses.fields(s.default_factory)}
    for key, policy in policies.items():
        assert policy.get("resume") in RESUME_POLICIES, key
        assert bool(policy.get("why")) == (policy["resume"] == "refuse"), key  # a refusal says what changed
    # the contract train/run_dir.py enforces (tests/test_run_dir.py resumes with these changed)
    assert policies["model.depth"] == {"resume": "refuse", "why": "model shape"}
    assert policies["train.seed"]["resume"] == "refuse" and policies["moe.router"]["resume"] == "refuse"
    assert policies["optim.lr"]["resume"] == policies["moe.capacity"]["resume"] == "warn"
    assert policies["parallel.expert_parallel_size"]["resume"] == policies["train.steps"]["resume"] == "free"
    assert policies["model.size"]["resume"] == "free"  # compared through the resolved depth / width / heads
