"""What every command shares: the parser, option types, common options, devices."""

from __future__ import annotations

import argparse
import shlex
import sys

import torch

from logquant.config import FSR_METHODS
from logquant.errors import LogquantError

IMAGE_SIZE_MAX = 2048  # pixels per side: larger crops of a folder would exhaust memory


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad command line in one line, exit code 2, and takes options
    only by their full names (an abbreviation would change meaning when options are added)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        raise LogquantError(f"{self.prog}: {message}")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def image_size(text: str) -> int:
    value = positive_int(text)
    if value > IMAGE_SIZE_MAX:
        raise argparse.ArgumentTypeError(f"image sides up to {IMAGE_SIZE_MAX}, got {value}")
    return value


def seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer seed, got {text!r}") from None
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"a seed must be in 0 .. 2^63-1, got {text}")
    return value


def bit_list(text: str) -> tuple[int, ...]:
    try:
        bits = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected bit widths like 3,4,5, got {text!r}") from None
    if not bits or any(not 1 <= b <= 8 for b in bits):
        raise argparse.ArgumentTypeError(f"bit widths must be 1..8, got {text!r}")
    return bits


def fsr_method_or_int(text: str) -> str | int:
    if text in FSR_METHODS:
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected {', '.join(FSR_METHODS)} or an integer FSR, got {text!r}") from None


def add_common(p: argparse.ArgumentParser) -> None:
    """--model, --data-dir, --device, --batch-size, --image-size."""
    p.add_argument("--model", default="refcnn",
                   help="refcnn (bundled), a torchvision architecture, or package.module:factory")
    p.add_argument("--data-dir", default=None,
                   help="Fashion-MNIST IDX files or an image folder (train/, test/ of classes); "
                        "default $LOGQUANT_DATA_DIR or /usr/share/datasets/fashion-mnist")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--batch-size", type=positive_int, default=500, help="evaluation batch")
    p.add_argument("--image-size", type=image_size, default=None,
                   help="image-folder data only: side of the square crop (default 224)")


def load_data(args: argparse.Namespace):
    """The splits ``--data-dir`` names. ``--image-size`` applies to image folders only: with
    IDX files (fixed 28 x 28 images) it is refused rather than ignored."""
    from logquant.data import is_image_folder, load_splits, resolve_data_dir

    size = getattr(args, "image_size", None)
    directory = resolve_data_dir(args.data_dir)
    if size is not None and not is_image_folder(directory):
        raise LogquantError(f"--image-size applies to image folders; {directory} holds IDX "
                            "files (28 x 28 images): drop --image-size")
    return load_splits(directory, size or 224)


def refuse_device(args: argparse.Namespace, command: str) -> None:
    """Commands that compute on the CPU only refuse another ``--device`` instead of
    ignoring it."""
    try:
        kind = torch.device(args.device).type
    except RuntimeError:  # not a device name at all
        kind = None
    if kind != "cpu":
        raise LogquantError(f"--device {args.device}: {command} computes on the CPU; drop "
                            "--device")


def device(name: str) -> torch.device:
    """The device ``--device name`` names, if this machine has it."""
    try:
        value = torch.device(name)
    except RuntimeError:
        raise LogquantError(f"--device {name}: not a device name (cpu, cuda, cuda:0)") from None
    if value.type not in ("cpu", "cuda"):
        raise LogquantError(f"--device {name}: logquant runs on cpu or cuda devices")
    if value.type == "cuda" and not torch.cuda.is_available():
        raise LogquantError(f"--device {name}: CUDA is not available on this machine")
    return value


def command_line(argv: list[str]) -> str:
    """The command as typed, recorded in the outputs."""
    return "logquant " + shlex.join(argv)


def log(message: str) -> None:
    """A progress or coverage line: on stderr, so that stdout holds only the results."""
    print(message, file=sys.stderr)
