import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import CLASSES, make_image_folder

from tune_alexnet.data import IMAGES, Cifar, DataError, cache_dir_for, load_cifar10, take_subset


def test_image_folder_loads_as_uint8_arrays_in_class_order(synthetic_dir):
    data = load_cifar10(synthetic_dir, progress=False)
    assert data.classes == CLASSES
    assert data.train_x.shape == (200, 32, 32, 3) and data.train_x.dtype == np.uint8
    assert data.test_x.shape == (40, 32, 32, 3)
    assert np.bincount(data.train_y).tolist() == [20] * 10
    from PIL import Image

    first = np.asarray(Image.open(synthetic_dir / "train" / "airplane" / "0000.png"))
    assert np.array_equal(data.train_x[0], first)


def test_real_cifar_slice_loads(mini_dir):
    data = load_cifar10(mini_dir, progress=False)
    assert data.train_x.shape == (1000, 32, 32, 3) and data.test_x.shape == (200, 32, 32, 3)
    assert data.classes == CLASSES
    assert 60 < data.train_x.mean() < 200  # real photographs, not blank


def test_second_load_comes_from_the_cache_and_a_changed_file_invalidates_it(tmp_path):
    root = make_image_folder(tmp_path / "d", 3, 1)
    first = load_cifar10(root, progress=False)
    assert len(list(cache_dir_for(root).glob("cifar-*.npz"))) == 1
    image = root / "train" / "cat" / "0000.png"
    st = image.stat()
    image.write_bytes(b"x" * st.st_size)  # broken, but same size and time: only a decode would notice
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns))
    again = load_cifar10(root, progress=False)
    assert np.array_equal(again.train_x, first.train_x) and np.array_equal(again.test_y, first.test_y)
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(DataError, match="0000.png"):
        load_cifar10(root, progress=False)


def test_cache_goes_to_the_user_cache_when_the_data_folder_is_read_only(tmp_path):
    root = make_image_folder(tmp_path / "ro", 2, 1)
    os.chmod(root, 0o555)
    try:
        load_cifar10(root, progress=False)
        assert not (root / ".tune-alexnet-cache").exists()
        assert cache_dir_for(root) == Path(os.environ["TUNE_ALEXNET_CACHE"]) / "arrays"
        assert list(cache_dir_for(root).glob("cifar-*.npz"))
    finally:
        os.chmod(root, 0o755)


@pytest.mark.parametrize("planted", ["a link", "another user's folder"])
def test_a_cache_folder_planted_beside_the_data_is_neither_written_nor_read(tmp_path, planted):
    root, victim = make_image_folder(tmp_path / "d", 2, 1), tmp_path / "victim"
    victim.mkdir()
    if planted == "a link":
        (root / ".tune-alexnet-cache").symlink_to(victim)
    else:
        (root / ".tune-alexnet-cache").mkdir()
        os.chown(root / ".tune-alexnet-cache", 65534, 65534)
    load_cifar10(root, progress=False)
    assert list(victim.iterdir()) == [] and list((root / ".tune-alexnet-cache").iterdir()) == []
    assert cache_dir_for(root) == Path(os.environ["TUNE_ALEXNET_CACHE"]) / "arrays"


SHARED_CACHES = ["another user's file", "a file all may write", "a link", "a hard link", "a folder all may write"]


@pytest.mark.parametrize("planted", SHARED_CACHES)
def test_cached_images_another_user_could_have_written_are_not_trained_on(tmp_path, capfd, monkeypatch, planted):
    """The user cache may lie in a shared place (TUNE_ALEXNET_CACHE, XDG_CACHE_HOME): arrays planted there under
    the data's key were trained on as the data. In a folder all may write, the user's own arrays of other images
    could be renamed to this data's key; a hard link another user made counts as their file."""
    root = make_image_folder(tmp_path / "ro", 2, 1)
    monkeypatch.setenv("TUNE_ALEXNET_CACHE", str(tmp_path / "cache"))
    os.chmod(root, 0o555)  # the cache goes to the user cache
    try:
        real = load_cifar10(root, progress=False)
        (cached,) = cache_dir_for(root).glob("cifar-*.npz")
        black = {k: np.zeros_like(v) if k.endswith("_x") else v for k, v in np.load(cached).items()}
        target = tmp_path / "planted.npz" if planted == "a link" else cached
        np.savez(tmp_path / "black.npz", **black)
        shutil.move(tmp_path / "black.npz", target)
        if planted == "a link":
            cached.unlink()
            cached.symlink_to(target)
        elif planted == "another user's file":
            os.chown(cached, 65534, 65534)
        elif planted == "a hard link":
            os.link(cached, tmp_path / "theirs.npz")
        elif planted == "a folder all may write":
            cached.parent.chmod(0o777)
        else:
            cached.chmod(0o666)
        capfd.readouterr()
        again = load_cifar10(root, progress=False)
        assert np.array_equal(again.train_x, real.train_x) and again.train_x.max() > 0
        err = capfd.readouterr().err
        if planted == "a folder all may write":  # neither read nor written
            assert f"passed over the image cache in {cached.parent}: {cached.parent} can be written by every " in err
            assert np.load(cached)["train_x"].max() == 0 and len(list(cached.parent.iterdir())) == 1
        elif planted != "a link":  # a link is never made by the cache: passed over as a damaged file
            assert "passed over the cached images" in err
    finally:
        os.chmod(root, 0o755)


def test_subset_takes_n_per_class_and_cuts_test_in_proportion(synthetic_dir):
    data = take_subset(load_cifar10(synthetic_dir, progress=False), 10)
    assert np.bincount(data.train_y).tolist() == [10] * 10
    assert np.bincount(data.test_y).tolist() == [2] * 10  # 4 test per 20 train -> 2 per 10
    with pytest.raises(DataError, match="--subset 21"):
        take_subset(data, 21)


# --- bad input: one line naming the problem --------------------------------


def _one_line(exc_info) -> str:
    message = str(exc_info.value)
    assert "\n" not in message
    return message


def test_missing_data_directory(tmp_path):
    with pytest.raises(DataError) as e:
        load_cifar10(tmp_path / "nope")
    assert "nope does not exist" in _one_line(e)


@pytest.mark.parametrize("missing", ["train", "test"])
def test_missing_split_folder(tmp_path, missing):
    root = make_image_folder(tmp_path / "d", 1, 1)
    shutil.rmtree(root / missing)
    with pytest.raises(DataError) as e:
        load_cifar10(root)
    assert f"no {missing}/ folder" in _one_line(e)


def test_class_folders_that_differ_between_train_and_test(tmp_path):
    root = make_image_folder(tmp_path / "d", 1, 1)
    (root / "test" / "cat").rename(root / "test" / "kitten")
    with pytest.raises(DataError) as e:
        load_cifar10(root)
    msg = _one_line(e)
    assert "only in train ['cat']" in msg and "only in test ['kitten']" in msg


def test_corrupt_image_is_named(tmp_path):
    root = make_image_folder(tmp_path / "d", 2, 1)
    bad = root / "train" / "dog" / "0001.png"
    bad.write_bytes(b"\x89PNG truncated")
    with pytest.raises(DataError) as e:
        load_cifar10(root, progress=False)
    assert str(bad) in _one_line(e)
    assert not list(cache_dir_for(root).glob("cifar-*.npz"))  # nothing half-written


def test_wrong_image_size_is_named(tmp_path):
    from PIL import Image

    root = make_image_folder(tmp_path / "d", 1, 1)
    Image.new("RGB", (64, 48)).save(root / "test" / "ship" / "big.png")
    with pytest.raises(DataError) as e:
        load_cifar10(root, progress=False)
    assert "big.png is 64x48" in _one_line(e)


@pytest.mark.parametrize("mode", ["I;16", "I", "F"])
def test_an_image_pil_would_clip_is_refused_not_trained_on_white(tmp_path, mode):
    """PIL's convert("RGB") clips 16-bit and float pixels to 255: such a PNG or TIFF was trained on as white."""
    from PIL import Image

    root = make_image_folder(tmp_path / "d", 1, 1)
    Image.new(mode, (32, 32), 1000).save(root / "train" / "dog" / "deep.tiff")
    with pytest.raises(DataError) as e:
        load_cifar10(root, progress=False)
    assert f"deep.tiff is of mode {mode}, which PIL does not turn into RGB faithfully; allowed: RGB, " in _one_line(e)
    assert not list(cache_dir_for(root).glob("cifar-*.npz"))


# --- the adversary's data folders: each refused with one line naming it ----


def _png(path: Path, size=(32, 32), value: int = 0) -> Path:
    from PIL import Image

    Image.new("RGB", size, (value, value, value)).save(path, format="PNG")
    return path


def _jpeg_bytes() -> bytes:
    import io

    from PIL import Image

    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def _mkdir_bytes(parent: Path, name: bytes) -> bytes:
    path = os.path.join(os.fsencode(parent), name)
    os.mkdir(path)
    return path


def _non_utf8_class(root: Path) -> None:
    for split in ("train", "test"):
        folder = _mkdir_bytes(root / split, b"caf\xe9")
        _png(Path(os.fsdecode(os.path.join(folder, b"0.png"))))


def _add_class(root: Path, name: str) -> None:
    for split in ("train", "test"):
        (root / split / name).mkdir()
        _png(root / split / name / "0.png")


def _keep_one_class(root: Path) -> None:
    for split in ("train", "test"):
        for d in (root / split).iterdir():
            if d.name != "cat":
                shutil.rmtree(d)


def _empty_split(root: Path, split: str) -> None:
    shutil.rmtree(root / split)
    (root / split).mkdir()
    (root / split / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")


def _make_file(path: Path, data: bytes = b"not a folder") -> None:
    shutil.rmtree(path)
    path.write_bytes(data)


BAD_FOLDERS = [
    # id, what to break in a 10-class folder with one image per class and split, phrases the one line must hold
    (
        "image-symlink-loop",
        lambda r: os.symlink("loop.jpg", r / "train/cat/loop.jpg"),
        ["image {root}/train/cat/loop.jpg is a symbolic link loop", "allowed: 32x32 images (.jpg"],
    ),
    (
        "image-symlink-pair-loop",
        lambda r: (os.symlink("b.png", r / "test/dog/a.png"), os.symlink("a.png", r / "test/dog/b.png")),
        ["image {root}/test/dog/a.png is a symbolic link loop"],
    ),
    (
        "class-symlink-loop",
        lambda r: os.symlink("zebra", r / "train/zebra"),
        ["{root}/train/zebra is a symbolic link loop", "allowed: class folders in train/"],
    ),
    (
        "dangling-image-symlink",
        lambda r: os.symlink("/nowhere/x.png", r / "train/cat/gone.png"),
        ["image {root}/train/cat/gone.png is a broken symbolic link (to /nowhere/x.png)", "allowed: 32x32 images"],
    ),
    (
        "dangling-class-symlink",
        lambda r: os.symlink("../elsewhere", r / "test/ghost"),
        ["{root}/test/ghost is a broken symbolic link (to ../elsewhere)", "allowed: class folders in test/"],
    ),
    (
        "image-linked-to-a-device",
        lambda r: os.symlink("/dev/zero", r / "train/cat/zero.png"),
        ["image {root}/train/cat/zero.png is a device, not a file", "allowed: 32x32 images"],
    ),
    (
        "fifo-named-like-an-image",
        lambda r: os.mkfifo(r / "train/cat/pipe.jpg"),
        ["image {root}/train/cat/pipe.jpg is a FIFO (named pipe), not a file", "allowed: 32x32 images"],
    ),
    (
        "folder-named-like-an-image",
        lambda r: (r / "train/cat/x.jpg").mkdir(),
        [
            "{root}/train/cat/x.jpg is a folder inside class folder train/cat/",
            "allowed: image files directly inside train/<class>/ (nested folders are not read)",
        ],
    ),
    (
        "nested-folder-of-images",
        lambda r: (r / "test/ship/more").mkdir() or _png(r / "test/ship/more/1.png"),
        ["{root}/test/ship/more is a folder inside class folder test/ship/"],
    ),
    (
        "non-utf8-class-folder",
        _non_utf8_class,
        ["class folder {root}/train/caf\\xe9 has a name that is not printable UTF-8", "allowed: class names in UTF-8"],
    ),
    (
        "newline-in-class-folder",
        lambda r: _add_class(r, "two\nlines"),
        ["class folder {root}/train/two\\nlines has a name that is not printable UTF-8"],
    ),
    (
        "long-class-folder",
        lambda r: _add_class(r, "x" * 65),  # a sweep on it trained, then its record and checkpoints were refused
        ["class folder {root}/train/" + "x" * 65 + " has a name of 65 characters", "at most 64 characters"],
    ),
    (
        "empty-train",
        lambda r: _empty_split(r, "train"),
        ["{root}/train holds no class folders", "allowed: train/<class>/ folders of images"],
    ),
    ("empty-test", lambda r: _empty_split(r, "test"), ["{root}/test holds no class folders"]),
    (
        "empty-class-folder",
        lambda r: (r / "train/cat/0000.png").unlink(),
        ["class folder {root}/train/cat holds no images", "allowed: 32x32 images"],
    ),
    (
        "class-only-in-train",
        lambda r: (r / "train/zebra").mkdir() or _png(r / "train/zebra/0.png"),
        ["only in train ['zebra'], only in test []", "allowed: the same class folders in both"],
    ),
    (
        "eleven-classes",
        lambda r: _add_class(r, "zebra"),
        [
            "{root} has 11 class folders (airplane, automobile,",
            "zebra)",
            "allowed: exactly 10, one per output of the network",
        ],
    ),
    ("one-class", _keep_one_class, ["{root} has 1 class folder (cat); allowed: exactly 10"]),
    (
        "image-loose-in-split",
        lambda r: _png(r / "train/stray.png"),
        ["image {root}/train/stray.png lies directly in train/", "allowed: images inside train/<class>/"],
    ),
    (
        "data-dir-is-a-file",
        lambda r: shutil.rmtree(r) or r.write_text("x"),
        ["data directory {root} is a file, not a folder", "allowed: a folder holding train/<class>/"],
    ),
    ("split-is-a-file", lambda r: _make_file(r / "test"), ["{root}/test is a file, not a folder"]),
    (
        "wrong-size",
        lambda r: _png(r / "test/ship/big.png", (64, 48)),
        ["image {root}/test/ship/big.png is 64x48; allowed: 32x32 pixels"],
    ),
    (
        "huge-image-header",
        lambda r: _png(r / "test/ship/huge.png", (2000, 2000)),
        ["image {root}/test/ship/huge.png is 2000x2000; allowed: 32x32 pixels"],
    ),
    (
        "truncated-jpeg",
        lambda r: (r / "train/dog/cut.jpg").write_bytes(_jpeg_bytes()[:-2]),
        [
            "cannot read image {root}/train/dog/cut.jpg: image file is truncated",
            "allowed: 32x32 images",
        ],
    ),
    (
        "zero-byte-image",
        lambda r: (r / "train/dog/empty.png").write_bytes(b""),
        ["image {root}/train/dog/empty.png is empty (0 bytes); allowed: 32x32 images"],
    ),
    (
        "text-with-image-extension",
        lambda r: (r / "test/cat/notes.jpg").write_text("hello\nworld\n"),
        ["cannot read image {root}/test/cat/notes.jpg: not an image Pillow can read", "allowed: 32x32 images"],
    ),
]


def test_an_image_holding_postscript_never_reaches_ghostscript(tmp_path, monkeypatch):
    """PIL picks its decoder by a file's content: a ".png" holding PostScript went to Ghostscript, an interpreter
    (here a stand-in on PATH that notes its call)."""
    root = make_image_folder(tmp_path / "d", 1, 1)
    (root / "train/cat/evil.png").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 32 32\nshowpage\n")
    bin_dir, called = tmp_path / "bin", tmp_path / "gs-called"
    bin_dir.mkdir()
    (bin_dir / "gs").write_text(f'#!/bin/sh\necho "$@" >> {called}\necho 10.0\n')
    (bin_dir / "gs").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    with pytest.raises(DataError) as e:
        load_cifar10(root, progress=False)
    assert f"cannot read image {root}/train/cat/evil.png: not an image Pillow can read" in _one_line(e)
    assert not called.exists()


def _tiled_tiff(tile: int) -> bytes:
    """A 32x32 RGB TIFF of one deflated tile of `tile` x `tile` black pixels, as an attacker writes it by hand."""
    import struct
    import zlib

    raw = zlib.compress(bytes(tile * tile * 3))
    tags = [(256, 3, 32), (257, 3, 32), (258, 3, 0), (259, 3, 8), (262, 3, 2), (277, 3, 3), (284, 3, 1),
            (322, 4, tile), (323, 4, tile), (324, 4, 0), (325, 4, len(raw))]  # fmt: skip
    bits = 8 + 2 + len(tags) * 12 + 4  # where the three bits-per-sample values go, the tile after them
    out = b"II*\x00" + struct.pack("<IH", 8, len(tags))
    for tag, kind, value in tags:
        value = {258: bits, 324: bits + 6}.get(tag, value)
        count = 3 if tag == 258 else 1
        out += struct.pack(
            "<HHII" if kind == 4 or tag == 258 else "<HHIHH",
            tag,
            kind,
            count,
            value,
            *([0] * (kind == 3 and tag != 258)),
        )
    return out + b"\x00" * 4 + struct.pack("<HHH", 8, 8, 8) + raw


def test_a_tiff_declaring_a_huge_tile_is_refused_before_its_decoder_allocates_it(tmp_path):
    """libtiff allocates the tile a file declares: a 32x32 image of one 16384x16384 tile took 780 MB from 765 KB."""
    root = make_image_folder(tmp_path / "d", 1, 1)
    (root / "train/cat/tiled.tif").write_bytes(_tiled_tiff(32))
    assert len(load_cifar10(root, progress=False).train_x) == 11  # a tile of the image's size: an image like any
    (root / "train/cat/tiled.tif").write_bytes(_tiled_tiff(8192))
    with pytest.raises(DataError) as e:
        load_cifar10(root, progress=False)
    assert (
        f"image {root}/train/cat/tiled.tif declares tiles of 8192x8192 pixels; allowed: tiles of at most"
        in _one_line(e)
    )


@pytest.mark.parametrize("breaks, phrases", [case[1:] for case in BAD_FOLDERS], ids=[c[0] for c in BAD_FOLDERS])
def test_bad_data_folder_is_refused_with_one_line(tmp_path, breaks, phrases):
    root = make_image_folder(tmp_path / "d", 1, 1)
    breaks(root)
    with pytest.raises(DataError) as e:
        load_cifar10(root, progress=False)
    message = _one_line(e)
    assert message.isprintable()
    for phrase in phrases:
        assert phrase.format(root=root) in message
    assert not (tmp_path / "d" / ".tune-alexnet-cache").exists()  # nothing half-written
    assert not list(Path(os.environ["TUNE_ALEXNET_CACHE"]).rglob("*.tmp"))


def test_what_a_user_expects_ignored_is_ignored_and_links_are_followed(tmp_path):
    root = make_image_folder(tmp_path / "d", 2, 1)
    for junk in (
        "README.md",
        ".DS_Store",
        "train/.DS_Store",
        "train/labels.csv",
        "train/cat/.DS_Store",
        "train/cat/Thumbs.db",
        "train/cat/notes.txt",
        "test/dog/desktop.ini",
    ):
        (root / junk).write_bytes(b"\0junk")
    (root / "train/cat/._0000.png").write_bytes(b"\0\5\x16\7 AppleDouble")  # macOS resource fork, hidden
    (root / "train/cat/.ipynb_checkpoints").mkdir()  # a hidden folder inside a class folder
    _png(root / "train/cat/.ipynb_checkpoints/0000-checkpoint.png", (64, 64))
    (root / "val/cat").mkdir(parents=True)  # folders beside train/ and test/ are not read
    os.symlink(tmp_path / "nowhere", root / "train/cat/dangling.txt")  # a broken link not named like an image
    os.mkfifo(root / "train/cat/pipe")  # a FIFO not named like an image: never opened
    _png(tmp_path / "elsewhere.png", value=77)
    os.symlink(tmp_path / "elsewhere.png", root / "train/dog/linked.png")  # a link to an image is that image
    with open(os.path.join(os.fsencode(root / "train/bird"), b"caf\xe9.png"), "wb") as f:  # a non-UTF-8 file name
        _png(tmp_path / "latin1.png", value=200)
        f.write((tmp_path / "latin1.png").read_bytes())
    shutil.move(root / "test/truck", tmp_path / "trucks")
    os.symlink(tmp_path / "trucks", root / "test/truck")  # a link to a class folder is that folder
    data = load_cifar10(root, progress=False)
    assert np.bincount(data.train_y).tolist() == [2, 2, 3, 2, 2, 3, 2, 2, 2, 2]
    assert len(data.test_y) == 10
    assert any((img == 77).all() for img in data.train_x[data.train_y == 5])
    assert any((img == 200).all() for img in data.train_x[data.train_y == 2])


def test_an_image_swapped_for_a_fifo_after_the_scan_is_refused_not_waited_on(tmp_path):
    """Whoever can write a shared data folder could put a FIFO where a scanned image was: decoding opened it by
    name and waited for a writer for ever."""
    from tune_alexnet.data import _decode, scan_image_folder

    root = make_image_folder(tmp_path / "d", 2, 1)
    _, files = scan_image_folder(root)
    path = files["test"][-1][0]
    path.unlink()
    os.mkfifo(path)
    done: list = []

    def decode() -> None:
        with pytest.raises(DataError) as caught:
            _decode(files["test"], "decoding test images", False)
        done.append(str(caught.value))

    worker = threading.Thread(target=decode, daemon=True)
    worker.start()
    worker.join(30)
    if worker.is_alive():  # let the waiting open go before failing
        with open(path, "wb"):
            pass
        pytest.fail("decoding waited on a FIFO")
    assert done == [f"image {path} is a FIFO (named pipe), not a file; allowed: {IMAGES}"]


def test_an_image_gone_or_swapped_for_a_device_link_after_the_scan_is_named_in_one_line(tmp_path):
    """Between the scan and the cache's key an image renamed away gave a FileNotFoundError's traceback; one swapped
    for a link to a device was opened (which, for some devices, acts) before it was refused."""
    from tune_alexnet.data import _cache_key, _decode, scan_image_folder

    root = make_image_folder(tmp_path / "d", 2, 1)
    _, files = scan_image_folder(root)
    gone = files["train"][0][0]
    gone.rename(tmp_path / "away.png")
    with pytest.raises(DataError) as caught:
        _cache_key(root, files)
    assert str(caught.value) == f"image {gone} does not exist; allowed: {IMAGES}"
    device = files["test"][0][0]
    device.unlink()
    device.symlink_to("/dev/null")
    with pytest.raises(DataError) as caught:
        _decode(files["test"], "decoding test images", False)
    assert str(caught.value) == f"image {device} is a device, not a file; allowed: {IMAGES}"


@pytest.mark.parametrize("made_by", ["anyone", "another user"])
def test_a_download_root_another_user_could_write_is_refused_before_any_pickle_is_loaded(tmp_path, made_by):
    """torchvision unpickles the batches it finds in --download-root: a file put there runs as code."""
    shared = tmp_path / "shared"
    shared.mkdir()
    if made_by == "anyone":
        shared.chmod(0o777)
    else:
        os.chown(shared, 65534, 65534)
    (shared / "cifar-10-batches-py").mkdir()
    (shared / "cifar-10-batches-py" / "data_batch_1").write_bytes(b"cos\nsystem\n(S'touch /tmp/x'\ntR.")
    with pytest.raises(DataError) as caught:
        load_cifar10(download_root=shared, progress=False)
    problem = (
        f"{shared} can be written by every user and has no sticky bit (mode 0777), so any user could put files "
        if made_by == "anyone"
        else f"{shared}, on the way, which another user owns (uid 65534), could put files "
    )
    assert str(caught.value).startswith(f"--download-root {shared}: {problem}"), caught.value
    assert str(caught.value).endswith("; allowed: a folder only you can write")
    assert sorted(p.name for p in shared.rglob("*")) == ["cifar-10-batches-py", "data_batch_1"]


def test_the_data_folder_itself_a_symlink_loop_or_dangling(tmp_path):
    os.symlink("loop", tmp_path / "loop")
    with pytest.raises(DataError) as e:
        load_cifar10(tmp_path / "loop")
    assert f"data directory {tmp_path}/loop is a symbolic link loop; allowed: a folder holding" in _one_line(e)
    os.symlink(tmp_path / "gone", tmp_path / "dangling")
    with pytest.raises(DataError) as e:
        load_cifar10(tmp_path / "dangling")
    assert f"data directory {tmp_path}/dangling is a broken symbolic link (to {tmp_path}/gone)" in _one_line(e)


def test_a_folder_or_file_that_cannot_be_read_is_named(tmp_path, monkeypatch):
    """Root reads everything whatever its mode, so the refusal the kernel would give a user is made here."""
    root = make_image_folder(tmp_path / "d", 1, 1)
    locked = root / "test" / "frog"
    real_scandir, real_open = os.scandir, os.open

    def scandir(path="."):
        if Path(path) == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(DataError) as e:
        load_cifar10(root, progress=False)
    assert _one_line(e) == f"cannot list folder {locked} (Permission denied); allowed: a readable folder"
    monkeypatch.undo()

    def image_open(path, *args, **kwargs):
        if Path(os.fsdecode(path)).name == "0000.png" and Path(os.fsdecode(path)).parent.name == "horse":
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", image_open)
    with pytest.raises(DataError) as e:
        load_cifar10(root, progress=False)
    assert _one_line(e).startswith(f"cannot read image {root}/train/horse/0000.png: Permission denied; allowed: 32x32")


def test_the_command_line_gives_one_line_and_exit_2(tmp_path, capsys):
    from tune_alexnet.cli import main

    root = make_image_folder(tmp_path / "d", 1, 1)
    os.mkfifo(root / "train" / "cat" / "pipe.jpg")
    rc = main(["sweep", "--data-dir", str(root), "--storage", str(tmp_path / "runs"), "--name", "x", "--epochs", "1"])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.count("\n") == 0 and "Traceback" not in err
    assert err.startswith("tune-alexnet sweep: error: image ") and "pipe.jpg is a FIFO" in err


def test_labels_outside_the_classes_are_refused():
    from tune_alexnet.data import Cifar, check_classes

    x = np.zeros((10, 32, 32, 3), np.uint8)
    with pytest.raises(DataError) as e:
        check_classes(Cifar(x, np.arange(10) + 1, x, np.arange(10), CLASSES, "arrays"))
    assert _one_line(e) == "arrays: train labels run 1..10; allowed: 0..9, one per class"
    with pytest.raises(DataError) as e:
        check_classes(Cifar(x, np.arange(10), x, np.arange(10), CLASSES + ("zebra",), "arrays"))
    assert "arrays has 11 classes (" in _one_line(e) and "allowed: exactly 10" in _one_line(e)


# --- fingerprint, describe and the resume check ----------------------------


def test_fingerprint_is_the_same_for_the_same_data_decoded_twice_wherever_it_lies(tmp_path):
    from tune_alexnet.data import fingerprint

    root = make_image_folder(tmp_path / "a", 2, 1)
    first = load_cifar10(root, progress=False)
    copy = shutil.copytree(root, tmp_path / "b", ignore=shutil.ignore_patterns(".tune-alexnet-cache"))
    second = load_cifar10(copy, progress=False)  # decoded again, from another folder
    assert second.source != first.source
    assert fingerprint(first) == fingerprint(second) == fingerprint(load_cifar10(root, progress=False))  # and cached
    assert len(fingerprint(first)) == 16 and int(fingerprint(first), 16) >= 0


def test_fingerprint_changes_with_one_pixel_a_label_a_class_name_or_a_subset(tmp_path):
    from PIL import Image

    from tune_alexnet.data import fingerprint

    root = make_image_folder(tmp_path / "d", 2, 1)
    data = load_cifar10(root, progress=False)
    before = fingerprint(data)
    image = root / "test" / "frog" / "0000.png"
    pixels = np.asarray(Image.open(image)).copy()
    pixels[7, 9, 2] ^= 1
    Image.fromarray(pixels).save(image)
    assert fingerprint(load_cifar10(root, progress=False)) != before
    labels = data.train_y.copy()
    labels[[0, -1]] = labels[[-1, 0]]
    assert fingerprint(Cifar(data.train_x, labels, data.test_x, data.test_y, data.classes, data.source)) != before
    renamed = ("plane",) + data.classes[1:]
    assert fingerprint(Cifar(data.train_x, data.train_y, data.test_x, data.test_y, renamed, data.source)) != before
    assert fingerprint(take_subset(data, 1)) != before
    as_int32 = Cifar(data.train_x, data.train_y.astype(np.int32), data.test_x, data.test_y, data.classes, "elsewhere")
    assert fingerprint(as_int32) == before  # the same labels in another dtype are the same data


def test_fingerprint_is_stable_across_versions():
    """A resume compares against a fingerprint recorded by an earlier run: it must not drift."""
    from tune_alexnet.data import fingerprint

    x = np.arange(4 * 32 * 32 * 3, dtype=np.uint64).astype(np.uint8).reshape(4, 32, 32, 3)
    data = Cifar(x, np.array([0, 1, 2, 3]), x[:2], np.array([3, 2]), CLASSES, "golden")
    assert fingerprint(data) == "93d44b10b842d632"


def _arrays(n_train=20, n_test=10, seed=0, classes=CLASSES, source="arrays") -> Cifar:
    rng = np.random.default_rng(seed)
    return Cifar(
        rng.integers(0, 256, (n_train, 32, 32, 3), dtype=np.uint8),
        np.arange(n_train) % 10,
        rng.integers(0, 256, (n_test, 32, 32, 3), dtype=np.uint8),
        np.arange(n_test) % 10,
        classes,
        source,
    )


def test_describe_records_classes_counts_fingerprint_and_source_as_json():
    import json

    from tune_alexnet.data import check_same_data, describe, fingerprint

    data = _arrays()
    recorded = json.loads(json.dumps(describe(data)))
    assert recorded == {
        "classes": list(CLASSES),
        "train_images": 20,
        "test_images": 10,
        "fingerprint": fingerprint(data),
        "source": "arrays",
    }
    check_same_data(recorded, _arrays(source="moved elsewhere"))  # same data from another place: resume


@pytest.mark.parametrize(
    "other, phrases",
    [
        (
            lambda: _arrays(classes=("plane",) + CLASSES[1:]),
            ["the classes differ (only in the experiment ['airplane'], only in this data ['plane'])"],
        ),
        (lambda: _arrays(classes=CLASSES[::-1]), ["the classes differ (the same names in another order"]),
        (
            lambda: _arrays(n_train=10, n_test=5),
            ["the image counts differ (experiment: 20 train + 10 test, this data: 10 train + 5 test)"],
        ),
        (
            lambda: _arrays(seed=1),
            ["the contents differ (same classes and counts, other pixels or labels: fingerprint "],
        ),
    ],
    ids=["classes", "class-order", "counts", "contents"],
)
def test_resume_on_other_data_is_refused_with_what_differs_and_how_to_proceed(other, phrases):
    from tune_alexnet.data import check_same_data, describe

    with pytest.raises(DataError) as e:
        check_same_data(describe(_arrays()), other())
    message = _one_line(e)
    assert message.startswith("this data is not what the experiment was trained on: ")
    assert message.endswith("; it was trained on arrays; pass --allow-data-change to resume on purpose")
    for phrase in phrases:
        assert phrase in message


@pytest.mark.parametrize(
    "damage",
    [lambda r: r.pop("fingerprint"), lambda r: r.update(train_images="many"), lambda r: r.update(classes=None)],
    ids=["missing", "not-a-number", "null"],
)
def test_a_damaged_data_record_is_refused_with_how_to_proceed(damage):
    from tune_alexnet.data import check_same_data, describe

    recorded = describe(_arrays())
    damage(recorded)
    with pytest.raises(DataError) as e:
        check_same_data(recorded, _arrays())
    message = _one_line(e)
    assert message.startswith("the experiment's data record is damaged (")
    assert message.endswith("; pass --allow-data-change to resume on purpose")
