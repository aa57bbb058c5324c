"""CIFAR-10 as uint8 arrays: from torchvision's download or from an ImageFolder tree.

The driver calls `load_cifar10` once; the arrays then travel to every trial
through Ray's object store, so no trial downloads or decodes anything.
Decoded ImageFolder trees are cached as .npy files so a second sweep starts
in seconds.

Every problem with the user's data is a `DataError` of one line that names the
bad path or value and what is allowed, raised before any trial starts and
before anything is written. What the ImageFolder scan ignores, because a user
would expect it to: hidden entries (names starting with "." such as .DS_Store,
macOS's ._x.jpg and .ipynb_checkpoints/), files without an image extension
(README.md, Thumbs.db, labels.csv) and folders beside train/ and test/.
`describe` and `check_same_data` let a resumed sweep refuse data other than
the data it started on.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .cluster import open_to_all, others_can_write, others_on_the_way
from .settings import NUM_CLASSES, home, listed_home, say
from .storage import brief, make_folders, shown

IMAGE_SIZE = 32
# Each file name ending taken, and the format PIL decodes it as: PIL picks a decoder by what a file holds, and
# would hand a ".png" holding PostScript to Ghostscript, an interpreter. Only these formats are ever decoded.
IMAGE_FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".ppm": "PPM", ".bmp": "BMP", ".pgm": "PPM",
                 ".tif": "TIFF", ".tiff": "TIFF", ".webp": "WEBP"}  # fmt: skip
IMG_EXTENSIONS = tuple(IMAGE_FORMATS)
TIFF_TILE_WIDTH, TIFF_TILE_LENGTH = 322, 323  # TIFF's tags: its decoder allocates a whole tile, 32x32 image or not
TILE_LIMIT = 1024  # pixels a side: writers tile by 256 at most, and a 1024x1024 tile is a few MB
CACHE_VERSION = 1
FINGERPRINT_VERSION = 1  # change it (and say so in the release notes) whenever `fingerprint` changes
SPLITS = ("train", "test")
LAYOUT = "a folder holding train/<class>/ and test/<class>/ images"
IMAGES = f"{IMAGE_SIZE}x{IMAGE_SIZE} images ({', '.join(IMG_EXTENSIONS)})"
ALLOW_CHANGE = "pass --allow-data-change to resume on purpose"
# PIL modes that convert("RGB") turns into RGB as they are: it clips 16-bit and float values to 255 (a white
# image) and turns LAB into other colours, silently
PIL_MODES = ("RGB", "RGBA", "RGBX", "RGBa", "L", "LA", "P", "PA", "1", "CMYK", "YCbCr", "HSV")
CLASS_NAME_LIMIT = 64  # characters of one class name: it goes into the tables, reports and model.json


class DataError(Exception):
    """A problem with the user's data, worded as one line for the command line."""

    def __init__(self, message: str):
        # One line whatever went into it: a library's multi-line text or a control character cannot split it.
        super().__init__(_printable(" ".join(str(message).splitlines())))


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
    own = home()  # (a relative one, blank space too, Ray takes for its token, refused there; not for a cache)
    own = own if own.is_absolute() else listed_home()
    return Path(os.environ.get("XDG_CACHE_HOME") or own / ".cache") / "tune-alexnet"


def load_cifar10(
    data_dir: str | os.PathLike | None = None,
    subset: int | None = None,
    download_root: str | os.PathLike | None = None,
    progress: bool = True,
) -> Cifar:
    """ImageFolder tree at `data_dir` if given, else torchvision's CIFAR-10 (downloaded once)."""
    data = _load_image_folder(Path(data_dir), progress) if data_dir is not None else _load_torchvision(download_root)
    check_classes(data)
    return data if subset is None else take_subset(data, subset)


def check_classes(data: Cifar) -> None:
    """The network has NUM_CLASSES outputs: refuse other class counts, and labels outside them, before any trial."""
    _check_class_count(data.classes, data.source, ("class", "classes"))
    for split, y in (("train", data.train_y), ("test", data.test_y)):
        if len(y) and (y.min() < 0 or y.max() >= len(data.classes)):
            raise DataError(
                f"{data.source}: {split} labels run {y.min()}..{y.max()}; allowed: 0..{len(data.classes) - 1}, "
                "one per class"
            )


def _check_class_count(names: tuple[str, ...], where: str, noun: tuple[str, str]) -> None:
    if len(names) != NUM_CLASSES:
        shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
        raise DataError(
            f"{where} has {len(names)} {noun[len(names) != 1]} ({shown}); "
            f"allowed: exactly {NUM_CLASSES}, one per output of the network"
        )


def take_subset(data: Cifar, per_class: int) -> Cifar:
    """The first `per_class` train images of each class, and the test set cut in the same proportion."""
    n_classes = len(data.classes)
    train_counts = np.bincount(data.train_y, minlength=n_classes)
    test_counts = np.bincount(data.test_y, minlength=n_classes)
    if per_class < 1:
        raise DataError(
            f"--subset {per_class} is invalid; allowed: a whole number of train images per class, at least 1"
        )
    if per_class > train_counts.min():
        raise DataError(
            f"--subset {per_class} is more than the {train_counts.min()} train images of the smallest class; "
            f"allowed: 1..{train_counts.min()}"
        )
    test_per_class = max(1, round(per_class * test_counts.min() / train_counts.min()))
    return Cifar(
        *_first_per_class(data.train_x, data.train_y, per_class, n_classes),
        *_first_per_class(data.test_x, data.test_y, test_per_class, n_classes),
        classes=data.classes,
        source=f"{data.source} (subset {per_class}/class)",
    )


def _first_per_class(x: np.ndarray, y: np.ndarray, k: int, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    keep = np.concatenate([np.flatnonzero(y == c)[:k] for c in range(n_classes)])
    keep.sort()
    return np.ascontiguousarray(x[keep]), np.ascontiguousarray(y[keep])


# --- what the sweep trained on ----------------------------------------------


def fingerprint(data: Cifar) -> str:
    """A short hash of the classes, the pixels and the labels: equal for the same data wherever it was loaded from.

    The source is left out on purpose, so that data moved to another folder (or node) still matches.
    """
    h = hashlib.sha256(f"tune-alexnet data v{FINGERPRINT_VERSION}\0".encode())
    h.update(json.dumps(list(data.classes)).encode())
    for name, array, dtype in (
        ("train_x", data.train_x, np.uint8),
        ("train_y", data.train_y, "<i8"),
        ("test_x", data.test_x, np.uint8),
        ("test_y", data.test_y, "<i8"),
    ):
        a = np.ascontiguousarray(array, dtype=dtype)  # labels as int64 whatever they were loaded as
        h.update(f"\0{name}{a.shape}\0".encode())
        h.update(memoryview(a).cast("B"))
    return h.hexdigest()[:16]


def describe(data: Cifar) -> dict:
    """What the experiment folder records about its data (JSON-ready), for `check_same_data` on resume."""
    return {
        "classes": list(data.classes),
        "train_images": len(data.train_y),
        "test_images": len(data.test_y),
        "fingerprint": fingerprint(data),
        "source": data.source,
    }


def check_record(recorded: object) -> dict:
    """A data record read back from an experiment folder, as `describe` writes it: a hand-edited or tampered one
    raises ValueError naming the field, since its text lands in reports and its numbers in comparisons."""

    def line(value: object, field: str, limit: int) -> str:
        if not isinstance(value, str) or len(value) > limit or not value.isprintable():
            raise ValueError(f"data.{field} is {shown(value)}; allowed: one line of text, at most {limit} characters")
        return value

    if not isinstance(recorded, Mapping):
        raise ValueError(f"data is {shown(recorded)}; allowed: a JSON object describing the data")
    classes = recorded.get("classes")
    if not isinstance(classes, list) or not 0 < len(classes) <= 1000:
        raise ValueError(f"data.classes is {shown(classes)}; allowed: a list of 1 to 1000 class names")
    out = {"classes": [line(c, "classes", 200) for c in classes]}
    for field in ("train_images", "test_images"):
        n = recorded.get(field)
        if type(n) is not int or not 0 <= n <= 10**9:
            raise ValueError(f"data.{field} is {shown(n)}; allowed: a whole number from 0 to 1000000000")
        out[field] = n
    out["fingerprint"] = line(recorded.get("fingerprint"), "fingerprint", 64)
    out["source"] = line(recorded.get("source", "unknown"), "source", 1000)
    return out


def check_same_data(recorded: Mapping, data: Cifar) -> None:
    """Refuse to resume a sweep on data other than the data it was trained on: a mix would mean nothing."""
    try:
        record = check_record(recorded)
    except ValueError as exc:  # hand-edited, or from another version
        raise DataError(f"the experiment's data record is damaged ({exc}); {ALLOW_CHANGE}") from None
    classes, recorded_fp, source = record["classes"], record["fingerprint"], record["source"]
    counts = (record["train_images"], record["test_images"])
    now_counts = (len(data.train_y), len(data.test_y))
    if classes != list(data.classes):
        only_then = [c for c in classes if c not in data.classes]
        only_now = [c for c in data.classes if c not in classes]
        detail = (
            f"only in the experiment {only_then}, only in this data {only_now}"
            if only_then or only_now
            else f"the same names in another order: experiment {classes}, this data {list(data.classes)}"
        )
        what = f"the classes differ ({detail})"
    elif counts != now_counts:
        what = (
            f"the image counts differ (experiment: {counts[0]} train + {counts[1]} test, "
            f"this data: {now_counts[0]} train + {now_counts[1]} test)"
        )
    elif recorded_fp != (now_fp := fingerprint(data)):
        what = (
            f"the contents differ (same classes and counts, other pixels or labels: "
            f"fingerprint {recorded_fp} then, {now_fp} now)"
        )
    else:
        return
    raise DataError(
        f"this data is not what the experiment was trained on: {what}; it was trained on {source}; {ALLOW_CHANGE}"
    )


# --- torchvision -----------------------------------------------------------


def _load_torchvision(root: str | os.PathLike | None) -> Cifar:
    from torchvision.datasets import CIFAR10

    root = Path(root or user_cache_dir() / "torchvision")
    if problem := _unpickled_from(root):
        raise DataError(f"--download-root {_show(root)}: {problem}; allowed: a folder only you can write")
    try:
        make_folders(root)
        train = CIFAR10(str(root), train=True, download=True)
        test = CIFAR10(str(root), train=False, download=True)
    except Exception as exc:  # network errors come in many types
        raise DataError(
            f"could not download CIFAR-10 into {_show(root)} ({type(exc).__name__}: {_reason(exc)}); "
            f"offline? pass --data-dir DIR holding train/<class>/ and test/<class>/ images"
        ) from None
    return Cifar(
        train.data,
        np.asarray(train.targets, np.int64),
        test.data,
        np.asarray(test.targets, np.int64),
        tuple(train.classes),
        f"torchvision CIFAR10 at {_show(root)}",
    )


def _unpickled_from(root: Path) -> str | None:
    """torchvision loads CIFAR-10's batches with pickle, which runs any code a batch file names: whoever could put
    a file there, or swap one after its checksum was taken, would run code as this user. So none may."""
    folder = root / "cifar-10-batches-py"
    if shared := open_to_all(folder):
        return f"{shared[0]}, so any user could put files there that loading them runs as code"
    if others := others_on_the_way(folder):
        return f"{_show(others[0])}, on the way, which {others[1]}, could put files there that loading runs as code"
    return None


# --- ImageFolder -----------------------------------------------------------


def tile_problem(im) -> str | None:
    """Tiles larger than TILE_LIMIT that a TIFF declares: libtiff allocates the tile, whatever the image's size."""
    tile = [getattr(im, "tag_v2", {}).get(tag) or 0 for tag in (TIFF_TILE_WIDTH, TIFF_TILE_LENGTH)]
    if not all(isinstance(side, int) for side in tile):  # text or bytes where a number is due: no TIFF
        return (f"declares tiles of {brief(tile[0])}x{brief(tile[1])} pixels, which are no numbers; allowed: tiles "
                f"of at most {TILE_LIMIT}x{TILE_LIMIT}")  # fmt: skip
    if max(tile) > TILE_LIMIT:
        return (f"declares tiles of {tile[0]}x{tile[1]} pixels; allowed: tiles of at most {TILE_LIMIT}x{TILE_LIMIT} "
                "(a 32x32 image needs one of 32x32)")  # fmt: skip
    return None


def scan_image_folder(root: Path) -> tuple[tuple[str, ...], dict[str, list[tuple[Path, int]]]]:
    """Check the layout and list (file, label) per split; every problem is a DataError naming it.

    Nothing is opened here but folders: a FIFO or a device named like an image would block or never end.
    """
    root = Path(root)
    _check_folder(root, f"data directory {_show(root)}", LAYOUT)
    for split in SPLITS:
        if not os.path.lexists(root / split):
            raise DataError(f"data directory {_show(root)} has no {split}/ folder; allowed: {LAYOUT}")
        _check_folder(root / split, _show(root / split), LAYOUT)
    classes = {split: _class_folders(root, split) for split in SPLITS}
    if classes["train"] != classes["test"]:
        only_train = sorted(set(classes["train"]) - set(classes["test"]))
        only_test = sorted(set(classes["test"]) - set(classes["train"]))
        raise DataError(
            f"class folders differ between train/ and test/ in {_show(root)}: only in train {only_train}, "
            f"only in test {only_test}; allowed: the same class folders in both"
        )
    names = tuple(classes["train"])
    _check_class_count(names, _show(root), ("class folder", "class folders"))
    files: dict[str, list[tuple[Path, int]]] = {}
    for split in SPLITS:
        files[split] = []
        for label, name in enumerate(names):
            files[split] += [(p, label) for p in _images_in(root / split / name, split)]
    return names, files


def _check_folder(path: Path, what: str, allowed: str) -> None:
    st = _stat(path, what, allowed)
    if not stat.S_ISDIR(st.st_mode):
        raise DataError(f"{what} is {_kind(st.st_mode)}, not a folder; allowed: {allowed}")


def _stat(path: Path, what: str, allowed: str) -> os.stat_result:
    """os.stat, following links; a link that leads nowhere is named with why."""
    try:
        return os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            why = "is a symbolic link loop"
        elif exc.errno == errno.ENOENT and os.path.islink(path):
            try:
                why = f"is a broken symbolic link (to {_show(os.readlink(path))})"
            except OSError:
                why = "is a broken symbolic link"
        elif exc.errno == errno.ENOENT:
            why = "does not exist"
        else:
            why = f"cannot be read ({_reason(exc)})"
        raise DataError(f"{what} {why}; allowed: {allowed}") from None


def _entries(folder: Path) -> list[str]:
    """The names in `folder` that are not hidden, sorted; .DS_Store, ._x.jpg and the like are never data."""
    try:
        with os.scandir(folder) as it:
            return sorted(e.name for e in it if not e.name.startswith("."))
    except OSError as exc:
        raise DataError(f"cannot list folder {_show(folder)} ({_reason(exc)}); allowed: a readable folder") from None


def _is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMG_EXTENSIONS


def _class_folders(root: Path, split: str) -> list[str]:
    """The class folders of one split; images lying loose in it are refused, other files ignored."""
    names = []
    allowed = f"class folders in {split}/ (links to folders are followed)"
    for name in _entries(root / split):
        path = root / split / name
        st = _stat(path, _show(path), allowed)
        if stat.S_ISDIR(st.st_mode):
            if _show(name) != name:
                raise DataError(
                    f"class folder {_show(path)} has a name that is not printable UTF-8; allowed: class names in "
                    "UTF-8 without control characters (they go into the experiment's tables)"
                )
            if len(name) > CLASS_NAME_LIMIT:  # else refused only when a finished sweep's checkpoint is loaded
                raise DataError(
                    f"class folder {_show(path)} has a name of {len(name)} characters; allowed: class names of at "
                    f"most {CLASS_NAME_LIMIT} characters (they go into the experiment's tables and model.json)"
                )
            names.append(name)
        elif _is_image_name(name):
            raise DataError(f"image {_show(path)} lies directly in {split}/; allowed: images inside {split}/<class>/")
    if not names:
        raise DataError(f"{_show(root / split)} holds no class folders; allowed: {split}/<class>/ folders of images")
    return names


def _images_in(folder: Path, split: str) -> list[Path]:
    """The image files of one class folder; a nested folder is refused rather than silently skipped."""
    found = []
    for name in _entries(folder):
        path = folder / name
        image = _is_image_name(name)
        try:
            st = os.stat(path)
        except OSError:
            if image:  # name it with the reason
                _stat(path, f"image {_show(path)}", IMAGES)
            continue  # a broken link named like no image is no image
        if stat.S_ISDIR(st.st_mode):
            raise DataError(
                f"{_show(path)} is a folder inside class folder {split}/{folder.name}/; "
                f"allowed: image files directly inside {split}/<class>/ (nested folders are not read)"
            )
        if not image:
            continue
        if not stat.S_ISREG(st.st_mode):
            raise DataError(f"image {_show(path)} is {_kind(st.st_mode)}, not a file; allowed: {IMAGES}")
        if st.st_size == 0:
            raise DataError(f"image {_show(path)} is empty (0 bytes); allowed: {IMAGES}")
        found.append(path)
    if not found:
        raise DataError(f"class folder {_show(folder)} holds no images; allowed: {IMAGES}")
    return found


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISREG(mode):
        return "a file"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "a special file"


def _show(path: str | os.PathLike) -> str:
    """A path as printable text: bytes that are not UTF-8 as \\xNN, control characters escaped."""
    return _printable(os.fsencode(path).decode("utf-8", "backslashreplace"))


def _printable(text: str) -> str:
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return " ".join(str(exc).split()) or type(exc).__name__


def _cache_key(root: Path, files: dict[str, list[tuple[Path, int]]]) -> str:
    h = hashlib.sha256(b"v%d:" % CACHE_VERSION + os.fsencode(os.path.realpath(root)))
    for split in SPLITS:
        for path, label in files[split]:
            st = _stat(path, f"image {_show(path)}", IMAGES)  # (gone since the scan: named, as there)
            h.update(
                b"%s/%s:%d:%d:%d\n"
                % (split.encode(), os.fsencode(path.relative_to(root)), label, st.st_size, st.st_mtime_ns)
            )
    return h.hexdigest()[:20]


def cache_dir_for(root: Path) -> Path:
    """Next to the data when the user may write there, else the user cache folder.

    Mode bits are checked as well as access(): root may write anywhere, yet a
    read-only data folder (a shared mount, a CI copy) should stay untouched. A
    cache folder there that is a link, or not this user's own folder, is passed
    over: the arrays would be written through it, or read from someone else's.
    """
    beside = root / ".tune-alexnet-cache"
    try:
        writable = os.access(root, os.W_OK) and bool(root.stat().st_mode & 0o200)
    except OSError:  # gone since the scan: the user's cache folder, and decoding says why
        writable = False
    if writable:
        try:
            st = os.lstat(beside)
        except FileNotFoundError:
            return beside
        except OSError:
            st = None
        if st is not None and stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid():
            return beside
    return user_cache_dir() / "arrays"


def _load_image_folder(root: Path, progress: bool) -> Cifar:
    names, files = scan_image_folder(root)
    key = _cache_key(root, files)
    source = f"image folder {_show(os.path.realpath(root))}"
    labels = [np.fromiter((label for _, label in files[split]), np.int64, len(files[split])) for split in SPLITS]
    caches = {cache: _shared_cache(cache) for cache in (cache_dir_for(root), user_cache_dir() / "arrays")}
    for cache, shared in caches.items():
        cached = None if shared else _read_cache(cache / f"cifar-{key}.npz", labels)
        if cached is not None:
            return Cifar(*cached, classes=names, source=source)
    arrays = []
    for split in SPLITS:
        arrays += list(_decode(files[split], f"decoding {split} images", progress))
    cache, shared = next(iter(caches.items()))  # where this data's cache goes (cache_dir_for)
    if not shared:
        _write_cache(cache / f"cifar-{key}.npz", arrays)
    return Cifar(*arrays, classes=names, source=source)


_said_shared: set[Path] = set()  # cache folders said to be passed over, once a process


def _shared_cache(folder: Path) -> bool:
    """Whether another user could swap the files in the cache `folder` (or a folder on the way to it): rename
    their arrays, or the user's own of other images, over the name of this data's, which would be trained on.
    Such a folder is neither read nor written, with one line once."""
    why = None
    if shared := open_to_all(folder):
        why = shared[0]
    elif others := others_on_the_way(folder):
        why = f"{_show(others[0])}, on the way, which {others[1]}"
    if why and folder not in _said_shared:
        _said_shared.add(folder)
        say(
            f"tune-alexnet: passed over the image cache in {_show(folder)}: {why}, so they could swap the cached "
            "images; decoding the images (set TUNE_ALEXNET_CACHE to a folder of yours to cache them)"
        )
    return why is not None


def _open_file(path: Path):
    """An image scanned as a file, opened again to decode it: whoever can write the data folder may have put a FIFO
    in its place meanwhile, whose open would wait for ever, or a link to a device. So it is checked again, before
    it is opened where the system allows."""
    if hasattr(os, "O_PATH") and os.path.isdir("/proc/self/fd"):  # found, not opened, checked: opening a device
        # may act (a watchdog's); then the file found is opened for reading, by its descriptor
        found = os.open(path, os.O_PATH)
        try:
            st = os.fstat(found)
            if stat.S_ISREG(st.st_mode):
                return os.fdopen(os.open(f"/proc/self/fd/{found}", os.O_RDONLY), "rb")
        finally:
            os.close(found)
    else:
        f = os.fdopen(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb")
        st = os.fstat(f.fileno())
        if stat.S_ISREG(st.st_mode):
            return f
        f.close()
    raise DataError(f"image {_show(path)} is {_kind(st.st_mode)}, not a file; allowed: {IMAGES}")


def _decode(items: list[tuple[Path, int]], desc: str, progress: bool) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image, UnidentifiedImageError

    x = np.empty((len(items), IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    y = np.fromiter((label for _, label in items), np.int64, len(items))
    bar = None
    if progress:  # tqdm only where a bar is shown: a bare machine decoding quietly needs no tqdm
        from tqdm import tqdm

        bar = tqdm(total=len(items), desc=desc, unit="img", file=sys.stderr, mininterval=0.5)
    try:
        for i, (path, _) in enumerate(items):
            try:
                with _open_file(path) as f, Image.open(f, formats=sorted(set(IMAGE_FORMATS.values()))) as im:
                    if im.size != (IMAGE_SIZE, IMAGE_SIZE):  # before decoding: a huge image is refused cheaply
                        raise DataError(
                            f"image {_show(path)} is {im.size[0]}x{im.size[1]}; "
                            f"allowed: {IMAGE_SIZE}x{IMAGE_SIZE} pixels"
                        )
                    if problem := tile_problem(im):
                        raise DataError(f"image {_show(path)} {problem}")
                    if im.mode not in PIL_MODES:
                        raise DataError(
                            f"image {_show(path)} is of mode {im.mode}, which PIL does not turn into RGB faithfully; "
                            f"allowed: {', '.join(PIL_MODES)} (convert it to 8-bit RGB first)"
                        )
                    x[i] = np.asarray(im.convert("RGB"))
            except Exception as exc:
                if bar is not None:
                    bar.leave = False  # the error line stands alone, without a half-drawn bar above it
                if isinstance(exc, DataError):
                    raise
                why = "not an image Pillow can read" if isinstance(exc, UnidentifiedImageError) else _reason(exc)
                raise DataError(f"cannot read image {_show(path)}: {why}; allowed: {IMAGES}") from None
            if bar is not None:
                bar.update()
    finally:
        if bar is not None:
            bar.close()
    return x, y


def _read_cache(path: Path, labels: list[np.ndarray]):
    """The cached arrays, if they are whole and match the scanned labels; a damaged cache is rebuilt, never trusted.
    So is one another user could have written (a cache folder in a shared place): its arrays would be trained on as
    the data. The file is checked through the descriptor it is read from, so no swap can slip in between."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)  # (a FIFO must not block the open)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None
        if st.st_uid not in (0, os.getuid()) or others_can_write(st) or st.st_nlink != 1:  # (or linked by another)
            say(
                f"tune-alexnet: passed over the cached images {_show(path)}: another user could have written them; "
                "decoding the images again"
            )
            return None
        try:
            with np.load(f) as z:
                arrays = z["train_x"], z["train_y"], z["test_x"], z["test_y"]
        except Exception:
            return None
    for x, y, want in ((arrays[0], arrays[1], labels[0]), (arrays[2], arrays[3], labels[1])):
        if x.dtype != np.uint8 or x.shape != (len(want), IMAGE_SIZE, IMAGE_SIZE, 3) or not np.array_equal(y, want):
            return None
    return arrays


def _write_cache(path: Path, arrays: list[np.ndarray]) -> None:
    """Whole or not at all: a temporary file renamed into place, removed on any failure (Ctrl-C included)."""
    tmp = None
    try:
        make_folders(path.parent)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **dict(zip(("train_x", "train_y", "test_x", "test_y"), arrays, strict=True)))
        os.replace(tmp, path)
        tmp = None
    except Exception as exc:  # no cache is slower, not wrong
        say(f"tune-alexnet: could not cache decoded images at {_show(path)}: {_reason(exc)}")
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
