"""CIFAR-10 as uint8 arrays: from torchvision's download or from an ImageFolder tree.

The driver calls `load_cifar10` once; the arrays then travel to every trial
through Ray's object store, so no trial downloads or decodes anything.
Decoded ImageFolder trees are cached as .npy files so a second sweep starts
in seconds.
"""
from __future__ import annotations

import hashlib
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

IMAGE_SIZE = 32
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
CACHE_VERSION = 1


class DataError(Exception):
    """A problem with the user's data, worded as one line for the command line."""


@dataclass(frozen=True)
class Cifar:
    train_x: np.ndarray  # (N, 32, 32, 3) uint8, RGB
    train_y: np.ndarray  # (N,) int64 class index
    test_x: np.ndarray  # (M, 32, 32, 3) uint8
    test_y: np.ndarray  # (M,) int64
    classes: tuple[str, ...]
    source: str  # where it came from, for logs and the experiment record


def user_cache_dir() -> Path:
    base = os.environ.get("TUNE_ALEXNET_CACHE")
    if base:
        return Path(base)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tune-alexnet"


def load_cifar10(data_dir: str | os.PathLike | None = None, subset: int | None = None,
                 download_root: str | os.PathLike | None = None, progress: bool = True) -> Cifar:
    """ImageFolder tree at `data_dir` if given, else torchvision's CIFAR-10 (downloaded once)."""
    data = _load_image_folder(Path(data_dir), progress) if data_dir is not None else _load_torchvision(download_root)
    return data if subset is None else take_subset(data, subset)


def take_subset(data: Cifar, per_class: int) -> Cifar:
    """The first `per_class` train images of each class, and the test set cut in the same proportion."""
    n_classes = len(data.classes)
    train_counts = np.bincount(data.train_y, minlength=n_classes)
    test_counts = np.bincount(data.test_y, minlength=n_classes)
    if per_class < 1:
        raise DataError(f"--subset {per_class} is invalid; allowed: a whole number of train images per class, at least 1")
    if per_class > train_counts.min():
        raise DataError(f"--subset {per_class} is more than the {train_counts.min()} train images of the smallest class; "
                        f"allowed: 1..{train_counts.min()}")
    test_per_class = max(1, round(per_class * test_counts.min() / train_counts.min()))
    return Cifar(
        *_first_per_class(data.train_x, data.train_y, per_class, n_classes),
        *_first_per_class(data.test_x, data.test_y, test_per_class, n_classes),
        classes=data.classes, source=f"{data.source} (subset {per_class}/class)",
    )


def _first_per_class(x: np.ndarray, y: np.ndarray, k: int, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    keep = np.concatenate([np.flatnonzero(y == c)[:k] for c in range(n_classes)])
    keep.sort()
    return np.ascontiguousarray(x[keep]), np.ascontiguousarray(y[keep])


# --- torchvision -----------------------------------------------------------

def _load_torchvision(root: str | os.PathLike | None) -> Cifar:
    from torchvision.datasets import CIFAR10

    root = Path(root or user_cache_dir() / "torchvision")
    try:
        root.mkdir(parents=True, exist_ok=True)
        train = CIFAR10(str(root), train=True, download=True)
        test = CIFAR10(str(root), train=False, download=True)
    except Exception as exc:  # network errors come in many types
        raise DataError(f"could not download CIFAR-10 into {root} ({type(exc).__name__}: {exc}); "
                        f"offline? pass --data-dir DIR holding train/<class>/ and test/<class>/ images") from None
    return Cifar(train.data, np.asarray(train.targets, np.int64), test.data, np.asarray(test.targets, np.int64),
                 tuple(train.classes), f"torchvision CIFAR10 at {root}")


# --- ImageFolder -----------------------------------------------------------

def scan_image_folder(root: Path) -> tuple[tuple[str, ...], dict[str, list[tuple[Path, int]]]]:
    """Check the layout and list (file, label) per split; every problem is a DataError naming it."""
    if not root.is_dir():
        raise DataError(f"data directory {root} does not exist; allowed: a folder holding train/<class>/ and test/<class>/ images")
    for split in ("train", "test"):
        if not (root / split).is_dir():
            raise DataError(f"data directory {root} has no {split}/ folder; allowed: a folder holding train/<class>/ and test/<class>/ images")
    classes = {s: sorted(d.name for d in (root / s).iterdir() if d.is_dir() and not d.name.startswith(".")) for s in ("train", "test")}
    if not classes["train"]:
        raise DataError(f"{root / 'train'} holds no class folders; allowed: train/<class>/*.jpg")
    if classes["train"] != classes["test"]:
        only_train = sorted(set(classes["train"]) - set(classes["test"]))
        only_test = sorted(set(classes["test"]) - set(classes["train"]))
        raise DataError(f"class folders differ between train/ and test/ in {root}: only in train {only_train}, only in test {only_test}")
    names = tuple(classes["train"])
    files: dict[str, list[tuple[Path, int]]] = {}
    for split in ("train", "test"):
        files[split] = []
        for label, name in enumerate(names):
            found = sorted(p for p in (root / split / name).iterdir() if p.suffix.lower() in IMG_EXTENSIONS)
            if not found:
                raise DataError(f"class folder {root / split / name} holds no images; allowed extensions: {', '.join(IMG_EXTENSIONS)}")
            files[split] += [(p, label) for p in found]
    return names, files


def _fingerprint(root: Path, files: dict[str, list[tuple[Path, int]]]) -> str:
    h = hashlib.sha256(f"v{CACHE_VERSION}:{root.resolve()}".encode())
    for split in ("train", "test"):
        for path, label in files[split]:
            st = path.stat()
            h.update(f"{split}/{path.relative_to(root)}:{label}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]


def cache_dir_for(root: Path) -> Path:
    """Next to the data when the user may write there, else the user cache folder.

    Mode bits are checked as well as access(): root may write anywhere, yet a
    read-only data folder (a shared mount, a CI copy) should stay untouched.
    """
    if os.access(root, os.W_OK) and root.stat().st_mode & 0o200:
        return root / ".tune-alexnet-cache"
    return user_cache_dir() / "arrays"


def _load_image_folder(root: Path, progress: bool) -> Cifar:
    names, files = scan_image_folder(root)
    key = _fingerprint(root, files)
    source = f"image folder {root.resolve()}"
    for cache in dict.fromkeys((cache_dir_for(root), user_cache_dir() / "arrays")):
        cached = _read_cache(cache / f"cifar-{key}.npz")
        if cached is not None:
            return Cifar(*cached, classes=names, source=source)
    arrays = []
    for split in ("train", "test"):
        arrays += list(_decode(files[split], f"decoding {split} images", progress))
    cache = cache_dir_for(root)
    _write_cache(cache / f"cifar-{key}.npz", arrays)
    return Cifar(*arrays, classes=names, source=source)


def _decode(items: list[tuple[Path, int]], desc: str, progress: bool) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image
    from tqdm import tqdm

    x = np.empty((len(items), IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    y = np.fromiter((label for _, label in items), np.int64, len(items))
    for i, (path, _) in enumerate(tqdm(items, desc=desc, unit="img", disable=not progress, file=sys.stderr, mininterval=0.5)):
        try:
            with Image.open(path) as im:
                im = im.convert("RGB")
                if im.size != (IMAGE_SIZE, IMAGE_SIZE):
                    raise DataError(f"image {path} is {im.size[0]}x{im.size[1]}; allowed: {IMAGE_SIZE}x{IMAGE_SIZE} pixels")
                x[i] = np.asarray(im)
        except DataError:
            raise
        except Exception as exc:
            raise DataError(f"cannot read image {path}: {exc}") from None
    return x, y


def _read_cache(path: Path):
    if not path.is_file():
        return None
    try:
        with np.load(path) as z:
            return z["train_x"], z["train_y"], z["test_x"], z["test_y"]
    except Exception:  # a damaged cache is rebuilt, never trusted
        return None


def _write_cache(path: Path, arrays: list[np.ndarray]) -> None:
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **dict(zip(("train_x", "train_y", "test_x", "test_y"), arrays)))
        os.replace(tmp, path)
    except OSError as exc:
        if tmp and os.path.exists(tmp):
            os.unlink(tmp)  # no cache is slower, not wrong
        print(f"tune-alexnet: could not cache decoded images at {path}: {exc}", file=sys.stderr)
