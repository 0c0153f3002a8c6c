"""Every dataset format: round trips (write, read, bit-exact) and files laid out as the originals are."""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from unpoison.data import FORMATS, ImageDataset, detect_format, load_dataset, make_synthetic, save_dataset
from unpoison.errors import UserError


def _same(a: ImageDataset, b: ImageDataset) -> None:
    assert a.x_train.dtype == b.x_train.dtype == np.uint8
    np.testing.assert_array_equal(a.x_train, b.x_train)
    np.testing.assert_array_equal(a.y_train, b.y_train)
    assert a.has_test and b.has_test
    np.testing.assert_array_equal(a.x_test, b.x_test)
    np.testing.assert_array_equal(a.y_test, b.y_test)


# name -> dataset it can hold (CIFAR/SVHN are 32x32 RGB; IDX is grayscale)
ROUND_TRIP = {
    "npz": dict(n=40, size=16, channels=3, classes=4),
    "npy": dict(n=40, size=16, channels=3, classes=4),
    "idx": dict(n=40, size=28, channels=1, classes=10),
    "cifar10": dict(n=50, size=32, channels=3, classes=10),
    "cifar100": dict(n=60, size=32, channels=3, classes=12),
    "svhn": dict(n=40, size=32, channels=3, classes=10),
    "imagefolder": dict(n=40, size=16, channels=3, classes=4),
    "imagenet": dict(n=6, size=224, channels=3, classes=2),
}


def test_every_registered_format_has_a_round_trip() -> None:
    assert set(FORMATS.names()) == set(ROUND_TRIP)


@pytest.mark.parametrize("fmt", sorted(ROUND_TRIP))
def test_round_trip_bit_exact(fmt: str, tmp_path: Path) -> None:
    ds = make_synthetic(seed=3, **ROUND_TRIP[fmt])
    out = save_dataset(ds, tmp_path / "data", fmt)
    back = load_dataset(f"{fmt}:{out}")
    _same(ds, back)
    assert back.format == fmt
    if fmt not in ("idx", "svhn"):  # these two formats have fixed class names (digits)
        assert back.classes == ds.classes
    # and detected without the prefix (imagenet is read as the plain image folder it is)
    assert detect_format(out).name == ("imagefolder" if fmt == "imagenet" else fmt)
    _same(ds, load_dataset(out))


def test_imagefolder_grayscale_and_unsafe_class_names(tmp_path: Path) -> None:
    ds = make_synthetic(n=30, size=12, channels=1, classes=3, seed=0)
    ds = ds.replace(classes=["T-shirt/top", "Trouser", "Bag"])  # not sorted, one with a slash
    save_dataset(ds, tmp_path / "f", "imagefolder")
    assert (tmp_path / "f" / "train" / "0_T-shirt_top").is_dir()
    back = load_dataset(tmp_path / "f")
    assert back.image_shape == (12, 12, 1)
    assert back.classes == ["T-shirt/top", "Trouser", "Bag"]
    _same(ds, back)


def _png(path: Path, arr: np.ndarray, fmt: str = "PNG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format=fmt)


def test_imagefolder_real_layout_modes_and_sorted_classes(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for cls in ("zebra", "ant"):
            for i in range(3):
                _png(tmp_path / "g" / split / cls / f"{cls}_{i}.png", rng.integers(0, 256, (8, 10), dtype=np.uint8))
    g = load_dataset(tmp_path / "g")
    assert g.format == "imagefolder" and g.classes == ["ant", "zebra"]
    assert g.x_train.shape == (6, 8, 10, 1)
    first = np.asarray(Image.open(tmp_path / "g" / "train" / "ant" / "ant_0.png"))
    np.testing.assert_array_equal(g.x_train[0, ..., 0], first)
    assert g.y_train.tolist() == [0, 0, 0, 1, 1, 1]
    # one RGB image among grayscale ones: the whole set becomes RGB, gray replicated
    _png(tmp_path / "g" / "train" / "ant" / "ant_9.png", rng.integers(0, 256, (8, 10, 3), dtype=np.uint8))
    m = load_dataset(tmp_path / "g")
    assert m.x_train.shape == (7, 8, 10, 3) and m.x_test.shape == (6, 8, 10, 3)
    np.testing.assert_array_equal(m.x_train[0, ..., 1], first)
    # JPEG is read too
    Image.fromarray(first).save(tmp_path / "g" / "train" / "zebra" / "z.jpg", quality=95)
    assert len(load_dataset(tmp_path / "g").x_train) == 8


def test_imagenet_resizes_shorter_side_and_center_crops(tmp_path: Path) -> None:
    # 448 x 224 (W x H): the centre 224 columns after a no-op resize are the central square
    wide = np.zeros((224, 448, 3), dtype=np.uint8)
    wide[:, 112:336] = 200
    tall = np.full((600, 300, 3), 50, dtype=np.uint8)  # 300 x 600: resized to 224 x 448, then cropped
    _png(tmp_path / "in" / "train" / "a" / "0.png", wide)
    _png(tmp_path / "in" / "train" / "b" / "1.jpg", tall, "JPEG")
    ds = load_dataset(f"imagenet:{tmp_path / 'in'}")
    assert ds.x_train.shape == (2, 224, 224, 3) and ds.format == "imagenet"
    assert (ds.x_train[0] == 200).all()
    assert abs(int(ds.x_train[1].astype(int).mean()) - 50) <= 2
    with pytest.raises(UserError, match="one size"):  # plain imagefolder refuses mixed sizes
        load_dataset(f"imagefolder:{tmp_path / 'in'}")


def _cifar_batch(x: np.ndarray, y: np.ndarray, key: bytes) -> dict[bytes, object]:
    return {b"batch_label": b"training batch", key: y.tolist(),
            b"data": x.transpose(0, 3, 1, 2).reshape(len(x), 3072).copy(),
            b"filenames": [b"f%d.png" % i for i in range(len(x))]}


def test_cifar10_original_layout(tmp_path: Path) -> None:
    ds = make_synthetic(n=50, size=32, channels=3, classes=10, seed=5)
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    for i, idx in enumerate(np.array_split(np.arange(50), 5)):
        with open(root / f"data_batch_{i + 1}", "wb") as f:
            pickle.dump(_cifar_batch(ds.x_train[idx], ds.y_train[idx], b"labels"), f, protocol=2)
    with open(root / "test_batch", "wb") as f:
        pickle.dump(_cifar_batch(ds.x_test, ds.y_test, b"labels"), f, protocol=2)
    with open(root / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [b"airplane"] + [b"c%d" % i for i in range(1, 10)],
                     b"num_cases_per_batch": 10, b"num_vis": 3072}, f, protocol=2)
    back = load_dataset(tmp_path)  # the parent folder, where the tarball was unpacked
    assert back.format == "cifar10" and back.classes[0] == "airplane"
    _same(ds, back)


def test_cifar100_original_layout_keeps_coarse_labels(tmp_path: Path) -> None:
    ds = make_synthetic(n=40, size=32, channels=3, classes=4, seed=6)
    coarse_of = np.array([1, 0, 1, 0])
    root = tmp_path / "cifar-100-python"
    root.mkdir()
    for split, x, y in (("train", ds.x_train, ds.y_train), ("test", ds.x_test, ds.y_test)):
        d = _cifar_batch(x, y, b"fine_labels")
        d[b"coarse_labels"] = coarse_of[y].tolist()
        with open(root / split, "wb") as f:
            pickle.dump(d, f, protocol=2)
    with open(root / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [b"apple", b"bee", b"cup", b"dog"],
                     b"coarse_label_names": [b"things", b"food"]}, f, protocol=2)
    back = load_dataset(f"cifar100:{root}")
    _same(ds, back)
    assert back.classes == ["apple", "bee", "cup", "dog"]
    out = save_dataset(back, tmp_path / "copy")
    # what we write reads like the originals with the usual loaders (bytes keys / latin1 str keys)
    with open(out / "train", "rb") as f:
        raw = pickle.load(f, encoding="bytes")  # our own file, written just above
    np.testing.assert_array_equal(raw[b"coarse_labels"], coarse_of[ds.y_train])
    with open(out / "train", "rb") as f:
        tv = pickle.load(f, encoding="latin1")
    np.testing.assert_array_equal(tv["data"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), ds.x_train)
    assert tv["fine_labels"] == ds.y_train.tolist()


def _idx(arr: np.ndarray) -> bytes:
    head = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return head + arr.astype(np.uint8).tobytes()


@pytest.mark.parametrize("gz", [True, False])
def test_idx_torchvision_layout(tmp_path: Path, gz: bool) -> None:
    ds = make_synthetic(n=30, size=28, channels=1, classes=10, seed=7)
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    files = {"train-images-idx3-ubyte": ds.x_train[..., 0], "train-labels-idx1-ubyte": ds.y_train,
             "t10k-images-idx3-ubyte": ds.x_test[..., 0], "t10k-labels-idx1-ubyte": ds.y_test}
    for stem, arr in files.items():
        if gz:
            with gzip.open(raw / f"{stem}.gz", "wb") as f:
                f.write(_idx(arr))
        else:
            (raw / stem).write_bytes(_idx(arr))
    back = load_dataset(tmp_path)
    assert back.format == "idx" and back.classes[0] == "T-shirt/top"  # "fashion" in the path
    _same(ds, back)


def test_idx_truncated_is_user_error(tmp_path: Path) -> None:
    x = np.zeros((4, 28, 28), np.uint8)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(_idx(x)[:-10])
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(_idx(np.zeros(4)))
    with pytest.raises(UserError, match="train-images-idx3-ubyte"):
        load_dataset(tmp_path)


def test_svhn_original_layout(tmp_path: Path) -> None:
    ds = make_synthetic(n=30, size=32, channels=3, classes=10, seed=8)
    for name, x, y in (("train_32x32.mat", ds.x_train, ds.y_train), ("test_32x32.mat", ds.x_test, ds.y_test)):
        scipy.io.savemat(str(tmp_path / name), {"X": x.transpose(1, 2, 3, 0),
                                                "y": np.where(y == 0, 10, y).astype(np.uint8)[:, None]})
    back = load_dataset(tmp_path)
    assert back.format == "svhn" and back.y_train.max() <= 9
    _same(ds, back)


def test_npy_memory_maps_and_writes_from_a_map(tmp_path: Path) -> None:
    ds = make_synthetic(n=40, size=16, channels=3, classes=4, seed=9)
    save_dataset(ds, tmp_path / "a", "npy")
    m = load_dataset(tmp_path / "a", mmap=True)
    assert isinstance(m.x_train, np.memmap) and isinstance(m.x_test, np.memmap)
    assert not isinstance(load_dataset(tmp_path / "a").x_train, np.memmap)
    save_dataset(m, tmp_path / "b")  # streamed from the map
    _same(ds, load_dataset(tmp_path / "b"))


def test_detection_uses_priority_not_names(tmp_path: Path) -> None:
    # a CIFAR folder that also has an image tree under train/ is still CIFAR
    ds = make_synthetic(n=50, size=32, channels=3, classes=10, seed=1)
    save_dataset(ds, tmp_path / "c", "cifar10")
    _png(tmp_path / "c" / "train" / "x" / "0.png", np.zeros((4, 4), np.uint8))
    assert detect_format(tmp_path / "c").name == "cifar10"
    # an npz without its suffix is found by its zip signature
    save_dataset(ds, tmp_path / "plain", "npz")
    assert detect_format(tmp_path / "plain").name == "npz"
    with pytest.raises(UserError, match="unknown dataset format"):
        detect_format(tmp_path)


def test_keras_style_npz_gets_a_channel_axis(tmp_path: Path) -> None:
    x = np.random.default_rng(0).integers(0, 256, (10, 28, 28), dtype=np.uint8)
    np.savez(tmp_path / "mnist.npz", x_train=x, y_train=np.arange(10) % 2)
    assert load_dataset(tmp_path / "mnist.npz").image_shape == (28, 28, 1)


def test_fashion_mnist_if_installed() -> None:
    if not Path("/usr/share/datasets/fashion-mnist").is_dir():
        pytest.skip("Debian's dataset-fashion-mnist is not installed")
    ds = load_dataset("fmnist")
    assert ds.x_train.shape == (60000, 28, 28, 1) and ds.x_test.shape == (10000, 28, 28, 1)
    assert ds.describe()["train"]["per_class"] == [6000] * 10
