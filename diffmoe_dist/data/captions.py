"""Captions for text-to-image: digit phrasings, and the caption embeddings that shards carry.

Digit phrasings come in one set to train on and a disjoint set to evaluate with.

Prompt accuracy is only a test of text conditioning if the evaluation prompts were never seen in
training, otherwise the model could memorise ten caption embeddings as if they were class labels.
So `HELDOUT_TEMPLATES` share no phrasing with `TRAIN_TEMPLATES` (a test checks that no caption of one
set equals one of the other); both say the digit as a word ("seven") or a numeral ("7").
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from diffmoe_dist.data.digits import DIGIT_WORDS

# Written by tools/make_shards.py beside train/ and heldout/: which encoder made the embeddings.
TEXT_ENCODER_FILE = "text_encoder.json"

TRAIN_TEMPLATES: tuple[str, ...] = (
    "a handwritten {word}",
    "the digit {numeral}",
    "number {word}, thick strokes",
    "a picture of the numeral {numeral}",
    "{word}",
    "the number {word} written in ink",
    "a scanned digit: {numeral}",
    "digit {word}, small and blurry",
)

HELDOUT_TEMPLATES: tuple[str, ...] = (
    "a drawing of the number {numeral}",
    "{word} written by hand",
    "an image showing a {word}",
    "handwriting of the digit {word}",
)

_TEMPLATES = {"train": TRAIN_TEMPLATES, "heldout": HELDOUT_TEMPLATES}


def digit_caption(digit: int, template: str) -> str:
    if not 0 <= digit < len(DIGIT_WORDS):
        raise ValueError(f"digit={digit} is not a digit: use 0..{len(DIGIT_WORDS) - 1}")
    return template.format(word=DIGIT_WORDS[digit], numeral=str(digit))


def captions_for(split: str, digit: int) -> list[str]:
    """Every phrasing of `digit` in the split's set ("train" or "heldout")."""
    if split not in _TEMPLATES:
        raise ValueError(f"split={split!r} is not known; use 'train' or 'heldout'")
    return [digit_caption(digit, t) for t in _TEMPLATES[split]]


def assign_captions(split: str, labels: list[int], copies: int = 1) -> list[list[str]]:
    """`copies` captions per image, chosen deterministically and balanced within each digit.

    The k-th image of digit d (in split order) gets phrasings (k * copies + d + j) mod T, j < copies:
    each digit cycles through every phrasing. A plain `i mod T` over the split would not, because
    the digits dataset lists its labels nearly cyclically (0, 1, ..., 9, 0, 1, ...): with T = 8,
    digit d would only ever meet the phrasings of d's parity.
    """
    templates = _TEMPLATES.get(split)
    if templates is None:
        raise ValueError(f"split={split!r} is not known; use 'train' or 'heldout'")
    if not 1 <= copies <= len(templates):
        raise ValueError(f"copies={copies} must lie in 1..{len(templates)} (the {split} phrasings)")
    seen: dict[int, int] = {}
    out = []
    for label in labels:
        k = seen.get(label, 0)
        seen[label] = k + 1
        start = k * copies + label
        phrasings = captions_for(split, label)
        out.append([phrasings[(start + j) % len(phrasings)] for j in range(copies)])
    return out


def heldout_prompts(num_samples: int) -> tuple[list[str], torch.Tensor]:
    """Evaluation prompts: sample i asks for digit i mod 10 in held-out phrasing (i // 10) mod T."""
    digits = [i % len(DIGIT_WORDS) for i in range(num_samples)]
    captions = [
        digit_caption(d, HELDOUT_TEMPLATES[(i // len(DIGIT_WORDS)) % len(HELDOUT_TEMPLATES)])
        for i, d in enumerate(digits)
    ]
    return captions, torch.tensor(digits, dtype=torch.long)


# ---- caption embeddings in shards ----------------------------------------------------------------
def write_text_encoder_info(out_dir: str | Path, name: str, max_length: int, dim: int) -> None:
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    info = {"text_encoder": name, "max_length": max_length, "dim": dim}
    (Path(out_dir) / TEXT_ENCODER_FILE).write_text(json.dumps(info, indent=2) + "\n")


def text_tensors(data: dict, cfg, data_path: str) -> dict[str, torch.Tensor]:
    """The batch tensors of a text-to-image run, from `load_indexed` output: {"text" float32
    (N, T, E), "text_mask" bool (N, T)}, checked against model.text_len / model.text_dim and against
    the encoder that made them (data.text_encoder: prompts at sampling time use the same one)."""
    if "text" not in data or "mask" not in data:
        raise ValueError(
            f"{data_path}/train has no caption embeddings (text.npy, mask.npy): model.task=t2i needs shards "
            "from `python tools/make_shards.py digits-t2i --out DIR` (or `images`)"
        )
    text, mask = data["text"].float(), data["mask"].bool()
    m = cfg.model
    if tuple(text.shape[1:]) != (m.text_len, m.text_dim):
        raise ValueError(
            f"{data_path}: caption embeddings are (tokens, width) = {tuple(text.shape[1:])} but "
            f"model.text_len={m.text_len}, model.text_dim={m.text_dim}: set those, or re-make the shards"
        )
    info_path = Path(data_path) / TEXT_ENCODER_FILE
    if info_path.is_file():
        from diffmoe_dist.data.text_encoders import same_encoder

        made_by = json.loads(info_path.read_text())["text_encoder"]
        if not same_encoder(made_by, cfg.data.text_encoder):
            raise ValueError(
                f"data.text_encoder={cfg.data.text_encoder!r} but {data_path} was encoded with {made_by!r}: "
                f"set data.text_encoder={made_by} so sampling encodes prompts the same way"
            )
    return {"text": text, "text_mask": mask}


def grid_prompts(data_path: str, count: int) -> dict:
    """Prompts for training-time sample grids, without running an encoder: from the first shard of
    the held-out split (else train), the first caption of each class 0..count-1 (or, for data
    without classes, cls = -1, the first `count` captions). Returns text, mask, caption, cls.
    Reads the first shard's class labels and then only the picked samples (data/stream.py): a
    shard of T5-XXL features is ~1 GB, and every rank draws a grid."""
    from diffmoe_dist.data.shards import MANIFEST
    from diffmoe_dist.data.stream import ShardSamples

    root = Path(data_path)
    split_dir = root / "heldout" if (root / "heldout" / MANIFEST).is_file() else root / "train"
    labels = ShardSamples(split_dir, {"cls": "cls"})
    first_shard = range(int(labels.ends[0]))  # samples in key order (make_shards writes them so)
    by_class: dict[int, int] = {}
    for i in first_shard:
        by_class.setdefault(int(labels[i]["cls"]), i)
    labels.close()
    picked = [by_class[c] for c in range(count) if c in by_class] or list(first_shard)[:count]
    rows = ShardSamples(split_dir, {"text": "text.npy", "mask": "mask.npy", "caption": "caption.txt", "cls": "cls"})
    samples = [rows[i] for i in picked]
    rows.close()
    return {
        "text": torch.stack([r["text"] for r in samples]).float(),
        "mask": torch.stack([r["mask"] for r in samples]).bool(),
        "caption": [r["caption"] for r in samples],
        "cls": [int(r["cls"]) for r in samples],
    }
