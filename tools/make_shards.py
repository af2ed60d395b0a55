"""Writes webdataset shards + manifest.json for training and evaluation.

    python tools/make_shards.py digits --out data/digits [--samples-per-shard 256] [--overwrite]
    python tools/make_shards.py digits-t2i --out data/digits-t2i [--text-encoder minilm] [--max-length 16]
    python tools/make_shards.py images --src DIR [--captions FILE.jsonl] --vae VAE_DIR --out OUT
        [--split train] [--image-size 256] [--text-encoder minilm|HF_DIR] [--max-length 120] [--workers 8]

`digits` writes the embedded digits train split to OUT/train/ and the held-out split to
OUT/heldout/; the "latents" are the 16x16 pixels themselves (1, 16, 16) in [-1, 1], with the class
label and its word as caption ("caption.txt"). `digits-t2i` writes the same images with generated
captions (training phrasings in train/, disjoint held-out phrasings in heldout/) and their text-encoder
embeddings ("text.npy" (L, D), "mask.npy" (L,)). `images` turns a folder of captioned images into
VAE latents (diffusers AutoencoderKL, scaled by its scaling_factor) plus caption embeddings.
Text-to-image outputs get OUT/text_encoder.json naming the encoder. Each subcommand is one
`add_<name>_parser` + one function returning samples.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

try:
    import diffmoe_dist  # noqa: F401
except ImportError:  # run as a script from a checkout that is not pip-installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from diffmoe_dist.data.shards import write_shards


def _with_progress(samples: Iterator[dict], total: int, description: str, progress: Progress) -> Iterator[dict]:
    task = progress.add_task(description, total=total)
    for sample in samples:
        yield sample
        progress.advance(task)


def run_digits(args: argparse.Namespace) -> None:
    from diffmoe_dist.data.digits import write_digits_shards

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()) as progress:
        manifests = write_digits_shards(
            args.out,
            samples_per_shard=args.samples_per_shard,
            overwrite=args.overwrite,
            wrap=lambda samples, total, split: _with_progress(samples, total, f"digits/{split}", progress),
        )
        for split, manifest in manifests.items():
            n, num_shards, shape = manifest["num_samples"], len(manifest["shards"]), manifest["latent_shape"]
            progress.console.print(f"{args.out / split}: {n} samples in {num_shards} shard(s), latent {shape}")


def add_digits_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("digits", help="the embedded 16x16 digits (train + heldout splits)")
    p.add_argument("--out", type=Path, required=True, help="output directory (gets train/ and heldout/)")
    p.add_argument("--samples-per-shard", type=int, default=256)
    p.add_argument("--overwrite", action="store_true", help="replace shards already in --out")
    p.set_defaults(func=run_digits)


# ---- text-to-image: shared pieces -------------------------------------------------------------------
def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())


def _text_encoder(args: argparse.Namespace):
    """Builds the encoder named by --text-encoder and records it in OUT/text_encoder.json (an OUT
    already encoded with another encoder is refused: its splits would not match)."""
    from diffmoe_dist.data.captions import TEXT_ENCODER_FILE, write_text_encoder_info
    from diffmoe_dist.data.text_encoders import build_text_encoder

    encoder = build_text_encoder(args.text_encoder, args.max_length, device=args.device)
    info_path = args.out / TEXT_ENCODER_FILE
    if info_path.is_file() and not args.overwrite:
        old = json.loads(info_path.read_text())
        new = {"text_encoder": encoder.name, "max_length": encoder.max_length, "dim": encoder.dim}
        if old != new:
            raise ValueError(f"{info_path} says {old} but this run uses {new}: pass --overwrite or another --out")
    write_text_encoder_info(args.out, encoder.name, encoder.max_length, encoder.dim)
    return encoder


def _text_fields(text_LD, mask_L, dtype: str) -> dict:
    if dtype == "bf16":  # numpy has no bfloat16: store the bit patterns (the manifest says so)
        import torch

        text = text_LD.to(torch.bfloat16).view(torch.int16).numpy().view("uint16")
    else:
        text = text_LD.numpy().astype(dtype)
    return {"text.npy": text, "mask.npy": mask_L.numpy().astype(bool)}


def _stored_dtypes(text_dtype: str) -> dict | None:
    return {"text.npy": "bfloat16"} if text_dtype == "bf16" else None


def _add_text_args(p: argparse.ArgumentParser, max_length: int) -> None:
    p.add_argument("--text-encoder", default="minilm", help="'minilm' (packaged all-MiniLM-L6-v2) or a local HF dir")
    p.add_argument("--max-length", type=int, default=max_length, help="caption tokens (= model.text_len)")
    p.add_argument(
        "--text-dtype",
        choices=["float16", "bf16", "float32"],
        default="float16",
        help="stored embeddings (bf16: T5's range)",
    )
    p.add_argument("--device", default="cpu", help="where the encoders (and the VAE) run, e.g. cuda")


# ---- digits-t2i ----------------------------------------------------------------------------------
def digits_t2i_samples(split: str, encoder, copies: int, text_dtype: str) -> tuple[Iterator[dict], int]:
    from diffmoe_dist.data.captions import assign_captions
    from diffmoe_dist.data.digits import load_digits_split

    images_B1HW, labels_B = load_digits_split(split)
    captions = assign_captions(split, labels_B.tolist(), copies if split == "train" else 1)
    unique = sorted({c for per_image in captions for c in per_image})
    text_UTE, mask_UT = encoder.encode(unique)  # a few dozen distinct captions: encode each once
    row = {c: i for i, c in enumerate(unique)}

    def samples() -> Iterator[dict]:
        for i, (image, label) in enumerate(zip(images_B1HW.numpy(), labels_B.tolist(), strict=True)):
            for j, caption in enumerate(captions[i]):
                yield {
                    "__key__": f"{split}-{i:06d}" + (f"-{j}" if len(captions[i]) > 1 else ""),
                    "latent.npy": image.astype("float32"),
                    "cls": int(label),
                    "caption.txt": caption,
                    **_text_fields(text_UTE[row[caption]], mask_UT[row[caption]], text_dtype),
                }

    return samples(), sum(len(c) for c in captions)


def run_digits_t2i(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    encoder = _text_encoder(args)
    with _progress() as progress:
        for split in ("train", "heldout"):
            samples, total = digits_t2i_samples(split, encoder, args.copies, args.text_dtype)
            manifest = write_shards(
                args.out / split,
                _with_progress(samples, total, f"digits-t2i/{split}", progress),
                samples_per_shard=args.samples_per_shard,
                created_by=f"tools/make_shards.py digits-t2i (split={split}, text_encoder={encoder.name})",
                overwrite=args.overwrite,
                index=True,
                dtypes=_stored_dtypes(args.text_dtype),
            )
            progress.console.print(
                f"{args.out / split}: {manifest['num_samples']} samples in {len(manifest['shards'])} shard(s), "
                f"latent {manifest['latent_shape']}, text ({encoder.max_length}, {encoder.dim})"
            )
    print(f"digits-t2i: {time.perf_counter() - start:.1f}s")


def add_digits_t2i_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "digits-t2i", help="the digits with generated captions (held-out phrasings in heldout/) + embeddings"
    )
    p.add_argument("--out", type=Path, required=True, help="output directory (gets train/ and heldout/)")
    p.add_argument("--copies", type=int, default=1, help="captions (samples) per training image")
    p.add_argument("--samples-per-shard", type=int, default=1024)
    p.add_argument("--overwrite", action="store_true", help="replace shards already in --out")
    _add_text_args(p, max_length=16)
    p.set_defaults(func=run_digits_t2i)


# ---- images: a captioned image folder -> VAE latents ----------------------------------------------
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def list_captioned_images(src: Path, captions: Path | None) -> list[dict]:
    """[{"file": path relative to src, "caption", "cls"}] from a JSONL ({"file", "caption"[, "cls"]}
    per line) or, without one, from sidecar .txt files (photo.jpg + photo.txt), in file order."""
    if not src.is_dir():
        raise FileNotFoundError(f"--src {src} is not a directory of images")
    items = []
    if captions is not None:
        with open(captions) as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                    items.append({"file": rec["file"], "caption": str(rec["caption"]), "cls": int(rec.get("cls", -1))})
                except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                    raise ValueError(
                        f'{captions}:{n}: expected {{"file": ..., "caption": ...}}, got {line.strip()[:80]!r} ({exc})'
                    ) from exc
        missing = [it["file"] for it in items if not (src / it["file"]).is_file()]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} file(s) named in {captions} are not under {src}, e.g. {missing[0]}"
            )
        return items
    for path in sorted(p for p in src.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
        sidecar = path.with_suffix(".txt")
        if not sidecar.is_file():
            raise FileNotFoundError(f"image {path} has no caption: add {sidecar.name} or pass --captions FILE.jsonl")
        items.append({"file": str(path.relative_to(src)), "caption": sidecar.read_text().strip(), "cls": -1})
    if not items:
        raise FileNotFoundError(f"--src {src} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return items


def load_image(path: str, size: int):
    """Decode, RGB, resize the short side to `size` and centre-crop (ADM's crop): uint8 (H, W, 3).
    Runs in worker processes: it returns uint8, a quarter of the bytes of float32 through the pipe."""
    import numpy as np
    from PIL import Image, ImageOps

    with Image.open(path) as img:
        return np.asarray(ImageOps.fit(img.convert("RGB"), (size, size), method=Image.Resampling.BICUBIC))


def _decoded_windows(paths: list[str], size: int, workers: int, window: int) -> Iterator[list]:
    """Decoded images in windows of `window`, in order. With workers > 0 a process pool decodes
    window k+1 while the caller encodes window k: overlapped, and at most two windows in memory."""
    from functools import partial

    chunks = [paths[i : i + window] for i in range(0, len(paths), window)]
    load = partial(load_image, size=size)
    if workers == 0:
        for chunk in chunks:
            yield [load(p) for p in chunk]
        return
    # spawn, not fork: the parent holds torch (and its thread pools) by the time the pool starts.
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        pending = pool.map_async(load, chunks[0]) if chunks else None
        for k in range(len(chunks)):
            result = pending.get()
            pending = pool.map_async(load, chunks[k + 1]) if k + 1 < len(chunks) else None
            yield result


def image_samples(args: argparse.Namespace, encoder, items: list[dict], progress: Progress) -> Iterator[dict]:
    import numpy as np
    import torch
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(str(args.vae), local_files_only=True).to(args.device).eval()
    scale = float(vae.config.scaling_factor)
    shift = float(getattr(vae.config, "shift_factor", None) or 0.0)  # SD3/Flux VAEs also shift
    task = progress.add_task(f"images/{args.split}", total=len(items))
    paths = [str(args.src / it["file"]) for it in items]
    done = 0
    for window in _decoded_windows(paths, args.image_size, args.workers, args.batch_size * 4):
        for b in range(0, len(window), args.batch_size):
            batch = items[done : done + min(args.batch_size, len(window) - b)]
            pixels = torch.from_numpy(np.stack(window[b : b + len(batch)])).permute(0, 3, 1, 2)
            x_B3HW = (pixels.float() / 127.5 - 1.0).to(args.device)
            with torch.no_grad():
                # The posterior mean, not a sample: equal inputs give byte-identical shards.
                z_BCHW = vae.encode(x_B3HW).latent_dist.mean
            latents = ((z_BCHW - shift) * scale).float().cpu().numpy()
            text_BTE, mask_BT = encoder.encode([it["caption"] for it in batch])
            for i, item in enumerate(batch):
                yield {
                    "__key__": f"{done + i:08d}",  # file order (sorted, or the JSONL's)
                    "latent.npy": np.ascontiguousarray(latents[i]),
                    "cls": item["cls"],
                    "caption.txt": item["caption"],
                    "file.txt": item["file"],
                    **_text_fields(text_BTE[i], mask_BT[i], args.text_dtype),
                }
            done += len(batch)
            progress.advance(task, len(batch))


def run_images(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    items = list_captioned_images(args.src, args.captions)
    if not (args.vae / "config.json").is_file():
        raise FileNotFoundError(f"--vae {args.vae} has no config.json: pass a diffusers AutoencoderKL directory")
    encoder = _text_encoder(args)
    vae_config = json.loads((args.vae / "config.json").read_text())
    # Recorded so that sample grids, diffmoe-sample and diffmoe-eval decode latents through it.
    vae_meta = {
        "path": str(args.vae.resolve()),
        "scaling_factor": float(vae_config.get("scaling_factor", 1.0)),
        "shift_factor": float(vae_config.get("shift_factor") or 0.0),
    }
    with _progress() as progress:
        manifest = write_shards(
            args.out / args.split,
            image_samples(args, encoder, items, progress),
            samples_per_shard=args.samples_per_shard,
            created_by=f"tools/make_shards.py images (split={args.split}, vae={args.vae}, text_encoder={encoder.name})",
            overwrite=args.overwrite,
            index=True,
            dtypes=_stored_dtypes(args.text_dtype),
            meta={"vae": vae_meta},
        )
    print(
        f"{args.out / args.split}: {manifest['num_samples']} samples in {len(manifest['shards'])} shard(s), "
        f"latent {manifest['latent_shape']}, text ({encoder.max_length}, {encoder.dim}), "
        f"{time.perf_counter() - start:.1f}s"
    )


def add_images_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("images", help="a folder of captioned images -> VAE latents + caption embeddings")
    p.add_argument("--src", type=Path, required=True, help="image folder (captions as sidecar .txt or --captions)")
    p.add_argument("--captions", type=Path, default=None, help='JSONL: {"file": relative path, "caption": str}')
    p.add_argument("--vae", type=Path, required=True, help="diffusers AutoencoderKL directory (save_pretrained)")
    p.add_argument("--out", type=Path, required=True, help="output root; shards go to OUT/SPLIT")
    p.add_argument("--split", default="train", choices=["train", "heldout"])
    p.add_argument("--image-size", type=int, default=256, help="pixels; latents are this / the VAE's downsampling")
    p.add_argument("--batch-size", type=int, default=32, help="images per VAE / text-encoder batch")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="decoding processes (0: inline)")
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.add_argument("--overwrite", action="store_true", help="replace shards already in OUT/SPLIT")
    _add_text_args(p, max_length=120)
    p.set_defaults(func=run_images)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_digits_parser(subparsers)
    add_digits_t2i_parser(subparsers)
    add_images_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (FileExistsError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
