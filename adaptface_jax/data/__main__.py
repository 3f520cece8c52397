"""Face data tools: `python -m adaptface_jax.data {info,folder2rec,pairs2bin,synth} ...`.

  info PATH [--json]       what a .rec (or its folder), a .bin or an image folder holds; decodes every image
  folder2rec ROOT OUT_DIR  image folder -> InsightFace train.rec/train.idx/property
  pairs2bin PAIRS ROOT OUT pairs list (`path_a path_b 1|0`) -> verification .bin
  synth                    generate (or reuse) the synthetic face world
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from adaptface_jax import cli
from adaptface_jax.data import binfile, folders, recordio

_PROGRESS_MIN_ITEMS = 2000  # below this a full decode takes about a second: no progress bar
_LISTED_CORRUPT = 10


def _progress(items: Iterable, total: int, description: str) -> Iterable:
  return tqdm(items, total=total, desc=description, unit="img", file=sys.stderr, disable=total < _PROGRESS_MIN_ITEMS)


def _decode_survey(items: Iterable, total: int, description: str,
                   read: Callable[[object], bytes]) -> dict:
  """Decodes every item: counts unreadable/corrupt ones and the image sizes seen."""
  corrupt = []
  sizes: collections.Counter = collections.Counter()
  for item in _progress(items, total, description):
    try:
      image = recordio.decode_image(read(item))
    except Exception:  # any failure to read or decode counts as corrupt; the survey must see every item
      corrupt.append(item)
      continue
    sizes[(image.shape[0], image.shape[1])] += 1
  result = {"corrupt": len(corrupt), "corrupt_items": [str(item) for item in corrupt[:_LISTED_CORRUPT]],
            "image_size": list(next(iter(sizes))) if sizes else None}
  if len(sizes) > 1:
    result["image_sizes"] = {f"{height}x{width}": count for (height, width), count in sizes.most_common()}
  return result


def _per_identity(counts: Sequence[int]) -> dict:
  counts = np.asarray(counts)
  return {"min": int(counts.min()), "mean": round(float(counts.mean()), 2), "max": int(counts.max())}


def info_rec(path: Path) -> dict:
  record = recordio.InsightFaceRecord(path)
  labels = np.zeros(record.num_images, dtype=np.int64)
  label_read = np.zeros(record.num_images, dtype=bool)
  position_of = {int(key): position for position, key in enumerate(record.image_keys)}

  def read(key) -> bytes:
    header, image_bytes = recordio.unpack_image_record(record.reader.read(int(key)))
    position = position_of[int(key)]
    labels[position] = recordio.label_to_int(header.label, f"key {key}")
    label_read[position] = True
    return image_bytes

  survey = _decode_survey(record.image_keys.tolist(), record.num_images, "decoding records", read)
  read_labels = labels[label_read]
  if record.layout == "insightface":
    identities = record.num_classes
  else:
    identities = int(np.unique(read_labels).size)
  valid = (read_labels >= 0) & (read_labels < identities)
  bad_labels = int(np.count_nonzero(~valid))
  corrupt_keys = survey.pop("corrupt_items")
  info = {"path": str(record.rec_path), "layout": record.layout, "images": record.num_images,
          "identities": identities, **survey, "corrupt_keys": corrupt_keys, "bad_labels": bad_labels}
  if valid.any():
    info["images_per_identity"] = _per_identity(np.bincount(read_labels[valid], minlength=identities))
  if record.property_path is not None:
    info["property"] = record.property_path.read_text().strip()
  record.close()
  return info


def info_bin(path: Path) -> dict:
  images, issame = binfile.read_bin(path)
  survey = _decode_survey(range(len(images)), len(images), "decoding pairs", lambda index: images[index])
  same = int(issame.sum())
  corrupt_images = survey.pop("corrupt_items")
  return {"path": str(path), "layout": "bin", "pairs": int(issame.size), "same": same,
          "different": int(issame.size) - same, "images": len(images), **survey, "corrupt_images": corrupt_images}


def info_folder(path: Path) -> dict:
  identities = folders.scan_image_folder(path)
  paths = [image for images in identities.values() for image in images]
  survey = _decode_survey(paths, len(paths), "decoding images", lambda image_path: image_path.read_bytes())
  corrupt_files = survey.pop("corrupt_items")
  return {"path": str(path), "layout": "folder", "images": len(paths), "identities": len(identities), **survey,
          "corrupt_files": corrupt_files,
          "images_per_identity": _per_identity([len(images) for images in identities.values()])}


def info(path: str | Path) -> dict:
  """Summary of a .rec (or a folder holding one), a .bin, or an image folder; decodes every image."""
  path = Path(path)
  if not path.exists():
    raise FileNotFoundError(f"{path}: no such file or directory")
  if path.is_dir():
    if (path / "train.rec").exists() or any(path.glob("*.rec")):
      return info_rec(path)
    return info_folder(path)
  if path.suffix == ".rec":
    return info_rec(path)
  if path.suffix == ".bin":
    return info_bin(path)
  raise ValueError(f"{path}: expected a .rec file, a .bin file, or a directory (InsightFace package or image folder)")


def _print_human(summary: dict) -> None:
  for name, value in summary.items():
    if isinstance(value, list) and name == "image_size" and value:
      value = f"{value[0]}x{value[1]}"
    print(f"{name}: {value}")


def _build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="python -m adaptface_jax.data", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--debug", action="store_true", help="on an error in the input, show the full traceback")
  commands = parser.add_subparsers(dest="command", required=True)

  info_parser = commands.add_parser("info", help="describe a .rec, a .bin or an image folder")
  info_parser.add_argument("path", help=".rec file or its directory, .bin file, or image folder")
  info_parser.add_argument("--json", action="store_true", help="print one JSON object")

  folder_parser = commands.add_parser("folder2rec", help="image folder -> train.rec/train.idx/property")
  folder_parser.add_argument("root")
  folder_parser.add_argument("out_dir")
  folder_parser.add_argument("--num-identities", type=int, default=None, help="keep N identities (default: all)")
  folder_parser.add_argument("--mode", choices=("first", "most"), default="first",
                             help="first N in sorted order, or the N with the most images")
  folder_parser.add_argument("--image-format", choices=("jpg", "png"), default="jpg")

  pairs_parser = commands.add_parser("pairs2bin", help="pairs list -> verification .bin")
  pairs_parser.add_argument("pairs", help="text file, lines 'path_a path_b 1|0' relative to ROOT")
  pairs_parser.add_argument("root")
  pairs_parser.add_argument("out", help="output .bin path")

  synth_parser = commands.add_parser("synth", help="generate (or reuse) the synthetic face world")
  synth_parser.add_argument("--cache-dir", default=None, help="default: $ADAPTFACE_CACHE or ~/.cache/adaptface_jax")
  synth_parser.add_argument("--train-identities", type=int, default=None)
  synth_parser.add_argument("--images-per-identity", type=int, default=None)
  synth_parser.add_argument("--seed", type=int, default=None)
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  """Runs one command; bad input (missing files, malformed data) prints `error: ...` and returns 1 (see
  adaptface_jax.cli)."""
  args = _build_parser().parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
  try:
    _run(args)
  except (*cli.USER_ERRORS, KeyError) as error:
    if args.debug:
      raise
    print(f"error: {error}", file=sys.stderr)
    return 1
  return 0


def _run(args: argparse.Namespace) -> None:
  if args.command == "info":
    summary = info(args.path)
    if args.json:
      print(json.dumps(summary))
    else:
      _print_human(summary)
  elif args.command == "folder2rec":
    result = folders.folder_to_record(args.root, args.out_dir, num_identities=args.num_identities, mode=args.mode,
                                      image_format=args.image_format)
    result.pop("identity_names")
    _print_human(result)
  elif args.command == "pairs2bin":
    _print_human(folders.pairs_to_bin(args.pairs, args.root, args.out))
  elif args.command == "synth":
    from adaptface_jax.data import synthetic  # imported here: it is only needed by this command

    options = {"seed": args.seed, "num_train_identities": args.train_identities,
               "images_per_identity": args.images_per_identity}
    world = synthetic.build_world(args.cache_dir, **{name: value for name, value in options.items()
                                                     if value is not None})
    _print_human(world)


if __name__ == "__main__":
  sys.exit(main())
