import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from tune_alexnet.data import DataError, cache_dir_for, load_cifar10, take_subset
from conftest import CLASSES, make_image_folder


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
