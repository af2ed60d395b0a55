"""Writes webdataset shards + manifest.json for training and evaluation.

    python tools/make_shards.py digits --out data/digits [--samples-per-shard 256] [--overwrite]

`digits` writes the embedded digits train split to OUT/train/ and the held-out split to
OUT/heldout/; the "latents" are the 16x16 pixels themselves (1, 16, 16) in [-1, 1], with the class
label and its word as caption ("caption.txt") for text-conditioned runs. Each subcommand is one
`add_<name>_parser` + one function returning samples, so others (e.g. `images`: folder + captions
-> VAE latents) slot in beside it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path

try:
    import diffmoe_dist  # noqa: F401
except ImportError:  # run as a script from a checkout that is not pip-installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from diffmoe_dist.data.shards import write_shards


def _with_progress(
    samples: Iterator[dict], total: int, description: str, progress: Progress
) -> Iterator[dict]:
    task = progress.add_task(description, total=total)
    for sample in samples:
        yield sample
        progress.advance(task)


def digits_samples(split: str) -> tuple[Iterator[dict], int]:
    from diffmoe_dist.data.digits import DIGIT_WORDS, load_digits_split

    images_B1HW, labels_B = load_digits_split(split)

    def samples() -> Iterator[dict]:
        for i, (image, label) in enumerate(zip(images_B1HW.numpy(), labels_B.tolist(), strict=True)):
            yield {
                "__key__": f"{split}-{i:06d}",  # zero-padded: key order == split order
                "latent.npy": image.astype("float32"),
                "cls": int(label),
                "caption.txt": DIGIT_WORDS[label],
            }

    return samples(), len(labels_B)


def run_digits(args: argparse.Namespace) -> None:
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()
    ) as progress:
        for split in ("train", "heldout"):
            samples, total = digits_samples(split)
            manifest = write_shards(
                args.out / split,
                _with_progress(samples, total, f"digits/{split}", progress),
                samples_per_shard=args.samples_per_shard,
                created_by=f"tools/make_shards.py digits (split={split})",
                overwrite=args.overwrite,
            )
            n, num_shards, shape = manifest["num_samples"], len(manifest["shards"]), manifest["latent_shape"]
            progress.console.print(
                f"{args.out / split}: {n} samples in {num_shards} shard(s), latent {shape}"
            )


def add_digits_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("digits", help="the embedded 16x16 digits (train + heldout splits)")
    p.add_argument("--out", type=Path, required=True, help="output directory (gets train/ and heldout/)")
    p.add_argument("--samples-per-shard", type=int, default=256)
    p.add_argument("--overwrite", action="store_true", help="replace shards already in --out")
    p.set_defaults(func=run_digits)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_digits_parser(subparsers)
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
