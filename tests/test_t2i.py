"""Specifications of text-to-image: captions, the text-conditioned DiT, shards for both paths, configs,
and a tiny end-to-end run (train, checkpoint, `diffmoe-sample --prompt`, `diffmoe-eval`)."""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import conftest
import numpy as np
import pytest
import torch

from diffmoe_dist.config import ConfigError, load_config
from diffmoe_dist.data.captions import (
    HELDOUT_TEMPLATES,
    TRAIN_TEMPLATES,
    assign_captions,
    captions_for,
    heldout_prompts,
)
from diffmoe_dist.data.digits import load_digits_split
from diffmoe_dist.data.shards import load_indexed
from diffmoe_dist.model.build import build_model
from diffmoe_dist.model.moe.layer import moe_layers

REPO_ROOT = Path(__file__).resolve().parents[1]
MAKE_SHARDS = str(REPO_ROOT / "tools" / "make_shards.py")
TINY_T2I = "configs/local/t2i-diffmoe-tiny.yaml"


def _model(router="dense", **kw):
    over = [f"moe.router={router}", *conftest.TINY_MODEL, "moe.num_experts=4"]
    over += [f"{k}={v}" for k, v in kw.items()]
    cfg = load_config(TINY_T2I, over)
    return build_model(cfg.model, cfg.moe), cfg


def _randomise(model):
    """Leave the adaLN-Zero start (which makes every output zero) so conditioning is visible."""
    torch.manual_seed(0)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return model.eval()


def _inputs(B=3, T=16, E=384, lengths=(4, 9, 16)):
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(B, 1, 16, 16, generator=g), torch.rand(B, generator=g)
    text = torch.randn(B, T, E, generator=g)
    mask = torch.arange(T)[None] < torch.tensor(lengths)[:, None]
    return x, t, text * mask[..., None], mask


@pytest.fixture(scope="module")
def encoder():
    from diffmoe_dist.data.text_encoders import build_text_encoder

    return build_text_encoder("minilm", max_length=16)


# ---- captions --------------------------------------------------------------------------------------
def test_held_out_phrasings_never_occur_in_training():
    assert not set(TRAIN_TEMPLATES) & set(HELDOUT_TEMPLATES)
    for d in range(10):
        assert not set(captions_for("train", d)) & set(captions_for("heldout", d))
    assert captions_for("heldout", 7)[:2] == ["a drawing of the number 7", "seven written by hand"]


def test_caption_assignment_is_deterministic_and_every_digit_meets_every_phrasing():
    _, labels = load_digits_split("train")
    a = assign_captions("train", labels.tolist())
    assert a == assign_captions("train", labels.tolist())
    for d in range(10):
        used = {c[0] for c, y in zip(a, labels.tolist()) if y == d}
        assert used == set(captions_for("train", d))
    two = assign_captions("train", labels.tolist(), copies=2)
    assert all(len(set(c)) == 2 for c in two)


def test_eval_prompts_cycle_digits_in_held_out_phrasings():
    captions, digits = heldout_prompts(40)
    assert digits.tolist() == [i % 10 for i in range(40)]
    assert set(captions) == {c for d in range(10) for c in captions_for("heldout", d)}


# ---- the model -------------------------------------------------------------------------------------
def test_t2i_model_starts_at_zero_output_like_adaln_zero_dit():
    model, _ = _model("expert_choice_global")
    for block in model.blocks:
        assert torch.count_nonzero(block.cross_attn.proj.weight) == 0
        assert torch.count_nonzero(block.adaLN_modulation[-1].weight) == 0
    assert torch.count_nonzero(model(*_inputs())) == 0
    assert (model.in_channels, model.image_size) == (1, 16)
    assert len(moe_layers(model)) == 1  # block 1 of 2: the same FFN slot as class-conditional DiT


def test_cross_attention_and_pooling_ignore_padding_tokens():
    for router in ("dense", "expert_choice_global"):
        model = _randomise(_model(router)[0])
        x, t, text, mask = _inputs()
        noisy = text + 100.0 * torch.randn(text.shape) * (~mask)[..., None]
        assert torch.equal(model(x, t, text, mask), model(x, t, noisy, mask))
        longer = mask.clone()
        longer[0, 4] = True  # one more visible token changes sample 0
        assert not torch.allclose(model(x, t, noisy, longer)[0], model(x, t, noisy, mask)[0])


def test_caption_dropout_swaps_in_the_learned_null_caption_only_in_training():
    model, _ = _model(**{"model.class_dropout": 0.5})
    emb = model.text_embedder
    text, mask = torch.randn(1000, 16, 384), torch.ones(1000, 16, dtype=torch.bool)
    emb.train()
    tokens, _, _ = emb(text, mask)
    null_tokens = emb.token_proj(emb.null_text_TE)
    dropped = torch.isclose(tokens, null_tokens.expand_as(tokens)).all(dim=(1, 2)).float().mean()
    assert 0.4 < dropped < 0.6
    emb.eval()
    assert torch.equal(emb(text, mask)[0], emb.token_proj(text))
    assert emb.null_text_TE.requires_grad  # learned, not zeroed


def test_cfg_scale_one_equals_conditional_and_guidance_extrapolates():
    model = _randomise(_model()[0])
    x, t, text, mask = _inputs()
    B = len(t)
    cond = model(x, t, text, mask)
    null = model._forward(x, t, text, mask, torch.ones(B, dtype=torch.bool))
    assert torch.allclose(model.forward_with_cfg(x, t, text, mask, 1.0), cond)
    assert torch.allclose(model.forward_with_cfg(x, t, text, mask, 3.0), null + 3.0 * (cond - null), atol=1e-5)
    assert not torch.allclose(cond, null, atol=1e-3)


def test_cfg_runs_conditional_and_null_halves_through_one_moe_pool():
    model = _randomise(_model("expert_choice_global")[0])
    seen = []
    moe_layers(model)[0].register_forward_hook(lambda m, inp, out: seen.append(inp[0].shape[0]))
    x, t, text, mask = _inputs()
    model.forward_with_cfg(x, t, text, mask, 4.0)
    assert seen == [2 * len(t)]


def test_text_of_the_wrong_shape_is_refused_with_the_config_fields():
    model, _ = _model()
    x, t, text, mask = _inputs(E=512)
    with pytest.raises(ValueError, match=r"model.text_len=16, model.text_dim=384"):
        model(x, t, text, mask)


# ---- configs ---------------------------------------------------------------------------------------
def test_t2i_configs_validate_and_diffmoe_params_reports_their_totals(capsys):
    from diffmoe_dist.model.params import main as params_main

    load_config(TINY_T2I).validate(world_size=4)
    big = load_config("configs/t2i/diffmoe-e16-256gpu.yaml").validate(world_size=256)
    assert big.model.task == "t2i" and big.parallel.expert_parallel_size == 8 and big.moe.pool == "dp"
    assert big.model.text_dim == 4096 and (big.model.image_size, big.model.in_channels) == (32, 4)
    assert params_main(["--config", "configs/t2i/diffmoe-e16-256gpu.yaml"]) == 0
    counts = json.loads(capsys.readouterr().out)
    assert 1.15e9 < counts["active"] < 1.35e9 and 4.4e9 < counts["total"] < 4.9e9
    with pytest.raises(ConfigError, match=r"^model.task='video' is invalid: use one of c2i, t2i$"):
        load_config(TINY_T2I, ["model.task=video"]).validate(world_size=2)


# ---- shards ----------------------------------------------------------------------------------------
def test_digits_t2i_shards_round_trip_with_held_out_phrasings(digits_t2i, encoder):
    info = json.loads((digits_t2i / "text_encoder.json").read_text())
    assert info == {"text_encoder": "minilm", "max_length": 16, "dim": 384}
    for split, templates in (("train", TRAIN_TEMPLATES), ("heldout", HELDOUT_TEMPLATES)):
        data = load_indexed(digits_t2i / split)
        images, labels = load_digits_split(split)
        assert torch.equal(data["latent"], images) and torch.equal(data["cls"], labels)
        assert data["text"].shape == (len(labels), 16, 384) and data["text"].dtype == torch.float16
        assert data["mask"].dtype == torch.bool
        allowed = {d: set(captions_for(split, d)) for d in range(10)}
        assert all(c in allowed[int(y)] for c, y in zip(data["caption"], labels))
        assert len(set(data["caption"])) == 10 * len(templates)
        text, mask = encoder.encode(data["caption"][:5])
        assert torch.equal(data["mask"][:5], mask)
        assert torch.allclose(data["text"][:5].float(), text, atol=2e-3, rtol=1e-3)  # float16 storage


def test_training_refuses_embeddings_of_another_shape_or_encoder(tmp_path):
    from diffmoe_dist.data.captions import text_tensors, write_text_encoder_info

    cfg = load_config(TINY_T2I)
    data = {"text": torch.zeros(2, 16, 384, dtype=torch.float16), "mask": torch.ones(2, 16, dtype=torch.bool)}
    write_text_encoder_info(tmp_path, "minilm", 16, 384)
    batch = text_tensors(data, cfg, str(tmp_path))
    assert batch["text"].dtype == torch.float32 and batch["text_mask"].dtype == torch.bool
    with pytest.raises(ValueError, match=r"model.text_len=16, model.text_dim=512: set those, or re-make the shards"):
        text_tensors(data, load_config(TINY_T2I, ["model.text_dim=512"]), str(tmp_path))
    with pytest.raises(ValueError, match=r"data.text_encoder='/models/t5' but .* set data.text_encoder=minilm"):
        text_tensors(data, load_config(TINY_T2I, ["data.text_encoder=/models/t5"]), str(tmp_path))
    with pytest.raises(ValueError, match=r"no caption embeddings.*tools/make_shards.py digits-t2i"):
        text_tensors({"latent": torch.zeros(2, 1, 16, 16)}, cfg, str(tmp_path))


def _image_folder(root: Path, n: int) -> list[Path]:
    from PIL import Image

    root.mkdir()
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        h, w = int(rng.integers(12, 40)), int(rng.integers(12, 40))
        path = root / f"img_{i}.png"
        Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def _expected_latents(vae, paths, size=16):
    from PIL import Image, ImageOps

    pixels = [
        np.asarray(ImageOps.fit(Image.open(p).convert("RGB"), (size, size), Image.Resampling.BICUBIC)) for p in paths
    ]
    x = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    with torch.no_grad():
        return vae.encode(x).latent_dist.mean * vae.config.scaling_factor


def test_image_folder_with_sidecar_captions_becomes_vae_latent_shards(tmp_path, encoder):
    vae = conftest.tiny_vae(tmp_path / "vae")
    paths = _image_folder(tmp_path / "src", 7)
    for i, p in enumerate(paths):
        p.with_suffix(".txt").write_text(f"random picture number {i}\n")
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        MAKE_SHARDS,
        "images",
        "--src",
        str(tmp_path / "src"),
        "--vae",
        str(tmp_path / "vae"),
        "--out",
        str(out),
        "--image-size",
        "16",
        "--max-length",
        "16",
        "--batch-size",
        "3",
        "--workers",
        "2",
        "--samples-per-shard",
        "4",
        "--text-dtype",
        "float32",
    ]
    subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    data = load_indexed(out / "train")
    assert data["latent"].shape == (7, 4, 8, 8)  # two VAE blocks: 16 px -> 8 latent
    assert torch.allclose(data["latent"], _expected_latents(vae, paths), atol=1e-5)
    assert data["caption"] == [f"random picture number {i}" for i in range(7)]
    assert data["file"] == [p.name for p in paths] and data["cls"].tolist() == [-1] * 7
    text, mask = encoder.encode(data["caption"])
    assert torch.allclose(data["text"], text, atol=1e-5) and torch.equal(data["mask"], mask)


def test_image_folder_with_a_jsonl_of_captions_keeps_its_order_and_classes(tmp_path):
    vae = conftest.tiny_vae(tmp_path / "vae")
    paths = _image_folder(tmp_path / "src", 3)[::-1]
    jsonl = tmp_path / "captions.jsonl"
    jsonl.write_text(
        "".join(json.dumps({"file": p.name, "caption": f"c{i}", "cls": i}) + "\n" for i, p in enumerate(paths))
    )
    make_shards = runpy.run_path(MAKE_SHARDS)
    args = [
        "images",
        "--src",
        str(tmp_path / "src"),
        "--captions",
        str(jsonl),
        "--vae",
        str(tmp_path / "vae"),
        "--out",
        str(tmp_path / "out"),
        "--split",
        "heldout",
        "--image-size",
        "16",
        "--workers",
        "0",
    ]
    assert make_shards["main"](args) == 0
    data = load_indexed(tmp_path / "out" / "heldout")
    assert data["file"] == [p.name for p in paths] and data["cls"].tolist() == [0, 1, 2]
    assert torch.allclose(data["latent"], _expected_latents(vae, paths), atol=1e-5)
    assert data["text"].shape == (3, 120, 384)  # --max-length defaults to 120 (T5-style captions)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"file": "missing.png", "caption": "x"}\n')
    args[args.index(str(jsonl))] = str(bad)
    assert make_shards["main"](args) == 2


# ---- end to end ------------------------------------------------------------------------------------
TINY_RUN = [*conftest.TINY, "parallel.expert_parallel_size=1", "train.threads=1"]


@pytest.mark.slow
def test_tiny_t2i_run_trains_checkpoints_and_samples_from_prompts(digits_t2i, tmp_path):
    from diffmoe_dist.train.trainer import Trainer

    run = tmp_path / "run"
    cfg = load_config(TINY_T2I, [*TINY_RUN, f"data.path={digits_t2i}", f"train.run_dir={run}", "train.steps=3"])
    trainer = Trainer(cfg.validate(world_size=1), None, torch.device("cpu"))
    assert set(trainer.loader.next_batch()) == {"x", "text", "text_mask"}
    result = trainer.fit()
    assert result["step"] == 3 and np.isfinite(result["final"]["loss"])
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_0000003"
    assert (run / "samples" / "step_0000003.png").stat().st_size > 0
    columns = (run / "samples" / "step_0000003.txt").read_text().splitlines()
    assert [c.split(": ", 1)[1] in captions_for("heldout", d) for d, c in enumerate(columns)] == [True] * 10

    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "DIFFMOE_CACHE_DIR": os.environ.get("DIFFMOE_CACHE_DIR", str(tmp_path)),
    }
    cli = [sys.executable, "-c", "from diffmoe_dist.eval.cli import sample_main; raise SystemExit(sample_main())"]
    out = subprocess.run(
        [
            *cli,
            "--ckpt",
            str(run),
            "--prompt",
            "a handwritten three",
            "--prompt",
            "seven written by hand",
            "--per-class",
            "2",
            "--steps",
            "2",
            "--cfg-scale",
            "3",
            "--routing",
            "static",
            "--out",
            str(tmp_path / "g.png"),
        ],
        check=True,
        capture_output=True,
        text=True,
        env=env,
    )
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["num_images"] == 4 and report["capacity_avg"] == pytest.approx(1.0)
    from PIL import Image

    assert Image.open(tmp_path / "g.png").size == ((2 * 17 + 1) * 4,) * 2  # 2 prompts x 2 images, 16 px x4
    refused = subprocess.run(
        [*cli, "--ckpt", str(run), "--out", str(tmp_path / "x.png")], capture_output=True, text=True, env=env
    )
    assert refused.returncode == 2 and "pass --prompt" in refused.stderr

    evaluated = subprocess.run(
        [
            sys.executable,
            "-c",
            "from diffmoe_dist.eval.cli import eval_main; raise SystemExit(eval_main())",
            "--ckpt",
            str(run),
            "--num-samples",
            "20",
            "--steps",
            "2",
        ],
        check=True,
        capture_output=True,
        text=True,
        env=env,
    )
    metrics = json.loads(evaluated.stdout.strip().splitlines()[-1])
    assert 0.0 <= metrics["prompt_accuracy"] <= 1.0 and metrics["digits_fid"] > 0
    assert "class_accuracy" not in metrics
