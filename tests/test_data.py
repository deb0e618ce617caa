"""IDX decoding, dataset discovery (flat folder, torchvision layout, gzipped or plain), the
download fallback and the error when the data is missing."""
import gzip
import shutil
import socket
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

import nnet_models as nm
import registry

TRAIN_FIRST_LABELS = [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
TEST_FIRST_LABELS = [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
TRAIN_LABEL_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_LABEL_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@pytest.fixture(autouse=True)
def fresh_cache(monkeypatch):
    """Each test sees an empty per-process cache, so a tmp dir is really read from disk."""
    monkeypatch.setattr(nm, "_DATASET_CACHE", {})


@pytest.fixture(scope="module")
def reference(mnist_dir) -> nm.Dataset:
    """MNIST decoded straight from the files, without load_dataset."""
    arrays = {name: nm.read_idx(mnist_dir / f) for name, f in nm.IDX_FILES.items()}
    return nm.Dataset(
        torch.from_numpy(arrays["train_images"].copy()).unsqueeze(1),
        torch.from_numpy(arrays["train_labels"].astype(np.int64)),
        torch.from_numpy(arrays["test_images"].copy()).unsqueeze(1),
        torch.from_numpy(arrays["test_labels"].astype(np.int64)),
    )


def assert_same_dataset(a: nm.Dataset, b: nm.Dataset):
    for name, x, y in zip(nm.Dataset._fields, a, b):
        assert x.dtype == y.dtype and torch.equal(x, y), name


# ---------------------------------------------------------------- read_idx


def test_read_idx_real_mnist(mnist_dir):
    train_images = nm.read_idx(mnist_dir / "train-images-idx3-ubyte.gz")
    train_labels = nm.read_idx(mnist_dir / "train-labels-idx1-ubyte.gz")
    test_images = nm.read_idx(mnist_dir / "t10k-images-idx3-ubyte.gz")
    test_labels = nm.read_idx(mnist_dir / "t10k-labels-idx1-ubyte.gz")
    assert train_images.shape == (60000, 28, 28) and train_images.dtype == np.uint8
    assert test_images.shape == (10000, 28, 28) and test_images.dtype == np.uint8
    assert train_labels.shape == (60000,) and test_labels.shape == (10000,)
    assert train_labels[:10].tolist() == TRAIN_FIRST_LABELS
    assert test_labels[:10].tolist() == TEST_FIRST_LABELS
    assert np.bincount(train_labels, minlength=10).tolist() == TRAIN_LABEL_COUNTS
    assert np.bincount(test_labels, minlength=10).tolist() == TEST_LABEL_COUNTS
    assert train_images.min() == 0 and train_images.max() == 255
    # the first training image is a "5": some ink in the middle, blank corners
    assert train_images[0, 0, 0] == 0 and train_images[0, 10:18, 10:18].sum() > 0


def _write_idx(path, array: np.ndarray, compress: bool):
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    opener = gzip.open if compress else open
    with opener(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.mark.parametrize("compress", [True, False])
@pytest.mark.parametrize("shape", [(7,), (2, 3, 4), (3, 5)])
def test_read_idx_hand_built(tmp_path, shape, compress):
    array = (np.arange(np.prod(shape)) * 7 % 256).astype(np.uint8).reshape(shape)
    path = tmp_path / ("x.idx.gz" if compress else "x.idx")
    _write_idx(path, array, compress)
    out = nm.read_idx(path)
    assert out.shape == shape and out.dtype == np.uint8
    np.testing.assert_array_equal(out, array)


def test_read_idx_rejects_non_ubyte_magic(tmp_path):
    path = tmp_path / "floats.idx"
    # type code 0x0D = float32
    path.write_bytes(bytes([0, 0, 0x0D, 1]) + (2).to_bytes(4, "big") + np.zeros(2, np.float32).tobytes())
    with pytest.raises(ValueError):
        nm.read_idx(path)


# ---------------------------------------------------------------- load_dataset layouts


def test_load_dataset_flat_directory(mnist_dir, reference):
    data = nm.load_dataset("mnist", mnist_dir, download=False)
    assert data.train_images.shape == (60000, 1, 28, 28) and data.train_images.dtype == torch.uint8
    assert data.test_images.shape == (10000, 1, 28, 28) and data.test_images.dtype == torch.uint8
    assert data.train_labels.dtype == torch.int64 and data.test_labels.dtype == torch.int64
    assert data.train_labels[:10].tolist() == TRAIN_FIRST_LABELS
    assert data.test_labels[:10].tolist() == TEST_FIRST_LABELS
    assert torch.bincount(data.train_labels, minlength=10).tolist() == TRAIN_LABEL_COUNTS
    assert_same_dataset(data, reference)


def test_load_dataset_is_cached(mnist_dir):
    a = nm.load_dataset("mnist", mnist_dir, download=False)
    b = nm.load_dataset("mnist", str(mnist_dir) + "/", download=False)
    assert a is b


def _link_files(src_dir, dst_dir):
    dst_dir.mkdir(parents=True, exist_ok=True)
    for name in nm.IDX_FILES.values():
        (dst_dir / name).symlink_to(src_dir / name)


def test_load_dataset_flat_symlinked_directory(tmp_path, mnist_dir, reference):
    _link_files(mnist_dir, tmp_path)
    assert nm.find_raw_dir("mnist", tmp_path) == tmp_path
    assert_same_dataset(nm.load_dataset("mnist", tmp_path, download=False), reference)


def test_load_dataset_torchvision_layout(tmp_path, mnist_dir, reference):
    raw = tmp_path / "MNIST" / "raw"
    _link_files(mnist_dir, raw)
    assert nm.find_raw_dir("mnist", tmp_path) == raw
    assert_same_dataset(nm.load_dataset("mnist", tmp_path, download=False), reference)
    # data_dir may also be given as a string
    nm._DATASET_CACHE.clear()
    assert_same_dataset(nm.load_dataset("mnist", str(tmp_path), download=False), reference)


def test_load_dataset_copied_files(tmp_path, mnist_dir, reference):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in nm.IDX_FILES.values():
        shutil.copy(mnist_dir / name, raw / name)
    assert_same_dataset(nm.load_dataset("mnist", tmp_path, download=False), reference)


@pytest.mark.parametrize("layout", ["flat", "torchvision"])
def test_load_dataset_uncompressed_files(tmp_path, mnist_dir, reference, layout):
    target = tmp_path if layout == "flat" else tmp_path / "MNIST" / "raw"
    target.mkdir(parents=True, exist_ok=True)
    for name in nm.IDX_FILES.values():
        with gzip.open(mnist_dir / name, "rb") as src, open(target / name.removesuffix(".gz"), "wb") as dst:
            shutil.copyfileobj(src, dst)
    assert not list(target.glob("*.gz"))
    assert nm.find_raw_dir("mnist", tmp_path) == target
    assert_same_dataset(nm.load_dataset("mnist", tmp_path, download=False), reference)


def test_load_dataset_mixed_compressed_and_plain(tmp_path, mnist_dir, reference):
    for i, name in enumerate(nm.IDX_FILES.values()):
        if i % 2:
            (tmp_path / name).symlink_to(mnist_dir / name)
        else:
            with gzip.open(mnist_dir / name, "rb") as src, open(tmp_path / name.removesuffix(".gz"), "wb") as dst:
                shutil.copyfileobj(src, dst)
    assert_same_dataset(nm.load_dataset("mnist", tmp_path, download=False), reference)


# ---------------------------------------------------------------- missing data


def _assert_helpful_message(err: nm.DataNotFoundError, data_dir):
    msg = str(err)
    for name in nm.IDX_FILES.values():
        assert name in msg, f"{name} not named in {msg!r}"
    assert str((data_dir / "MNIST" / "raw").resolve()) in msg


def test_missing_dataset_raises_data_not_found(tmp_path):
    with pytest.raises(nm.DataNotFoundError) as info:
        nm.load_dataset("mnist", tmp_path, download=False)
    assert isinstance(info.value, FileNotFoundError)
    _assert_helpful_message(info.value, tmp_path)
    assert not (tmp_path / "MNIST").exists(), "download=False must not create anything"


def test_missing_data_dir_raises_data_not_found(tmp_path):
    missing = tmp_path / "does" / "not" / "exist"
    with pytest.raises(nm.DataNotFoundError) as info:
        nm.load_dataset("mnist", missing, download=False)
    _assert_helpful_message(info.value, missing)


@pytest.mark.parametrize("layout", ["flat", "torchvision"])
def test_incomplete_dataset_raises_data_not_found(tmp_path, mnist_dir, layout):
    target = tmp_path if layout == "flat" else tmp_path / "MNIST" / "raw"
    target.mkdir(parents=True, exist_ok=True)
    for name in list(nm.IDX_FILES.values())[:3]:  # t10k labels missing
        (target / name).symlink_to(mnist_dir / name)
    assert nm.find_raw_dir("mnist", tmp_path) is None
    with pytest.raises(nm.DataNotFoundError) as info:
        nm.load_dataset("mnist", tmp_path, download=False)
    _assert_helpful_message(info.value, tmp_path)


def test_files_split_across_layouts_are_not_combined(tmp_path, mnist_dir):
    # three files flat, the fourth in MNIST/raw: neither directory holds all four
    names = list(nm.IDX_FILES.values())
    for name in names[:3]:
        (tmp_path / name).symlink_to(mnist_dir / name)
    (tmp_path / "MNIST" / "raw").mkdir(parents=True)
    (tmp_path / "MNIST" / "raw" / names[3]).symlink_to(mnist_dir / names[3])
    with pytest.raises(nm.DataNotFoundError):
        nm.load_dataset("mnist", tmp_path, download=False)


def _online() -> bool:
    try:
        socket.getaddrinfo("ossci-datasets.s3.amazonaws.com", 443)
        return True
    except OSError:
        return False


def fake_torchvision(monkeypatch, on_construct) -> list:
    """Put a stand-in for torchvision into sys.modules whose dataset classes call
    on_construct(class name, root, train); returns the list of the constructions."""
    calls = []

    def dataset_class(name):
        def construct(root, train, download=False):
            calls.append((name, root, train, download))
            on_construct(name, root, train)
        return construct

    datasets = types.SimpleNamespace(**{name: dataset_class(name) for name in (source.folder for source in registry.DATASETS.values())})
    module = types.ModuleType("torchvision")
    module.datasets = datasets
    monkeypatch.setitem(sys.modules, "torchvision", module)
    monkeypatch.setitem(sys.modules, "torchvision.datasets", datasets)
    return calls


def test_failing_download_raises_data_not_found(tmp_path, monkeypatch):
    def broken_download(name, root, train):
        raise ConnectionError("no   network\nhere")

    fake_torchvision(monkeypatch, broken_download)
    with pytest.raises(nm.DataNotFoundError) as info:
        nm.load_dataset("mnist", tmp_path, download=True)
    _assert_helpful_message(info.value, tmp_path)
    assert "download failed: ConnectionError: no network here" in str(info.value)  # on one line


def test_download_without_torchvision_raises_data_not_found(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # import torchvision raises ImportError
    with pytest.raises(nm.DataNotFoundError) as info:
        nm.load_dataset("mnist", tmp_path, download=True)
    _assert_helpful_message(info.value, tmp_path)
    assert "download failed" in str(info.value) and "Error" in str(info.value)


@pytest.mark.parametrize("dataset", ["mnist", "fashion_mnist"])
def test_successful_download_is_used(tmp_path, monkeypatch, dataset):
    """torchvision's class of the dataset downloads both splits into data_dir/<Name>/raw (hand-built files stand
    in for the download)."""
    def fake_download(name, root, train):
        if train:
            small_dataset(Path(root) / name / "raw")

    calls = fake_torchvision(monkeypatch, fake_download)
    assert nm.load_dataset(dataset, tmp_path, download=True).test_labels.tolist() == [6, 7, 8, 9]
    name = registry.DATASETS[dataset].folder
    assert calls == [(name, str(tmp_path), True, True), (name, str(tmp_path), False, True)]
    assert nm.find_raw_dir(dataset, tmp_path) == tmp_path / name / "raw"


def test_no_download_when_the_files_are_there(tmp_path, mnist_dir, monkeypatch):
    _link_files(mnist_dir, tmp_path)
    calls = fake_torchvision(monkeypatch, lambda name, root, train: None)
    assert nm.ensure_dataset("mnist", tmp_path, download=True) == tmp_path
    assert calls == []


def test_download_offline_raises_data_not_found(tmp_path):
    """The machine is offline: torchvision's download fails and is reported as DataNotFoundError;
    the folders torchvision made for it are removed again."""
    if _online():
        pytest.skip("network reachable: this test checks the offline failure path")
    missing = tmp_path / "data"
    with pytest.raises(nm.DataNotFoundError) as info:
        nm.load_dataset("mnist", missing, download=True)
    _assert_helpful_message(info.value, missing)
    assert "download failed" in str(info.value)
    assert list(tmp_path.iterdir()) == []


def download_that_fails_halfway(name, root, train):
    """What torchvision does offline after a first file: make ROOT/<Name>/raw, leave a partial file, raise."""
    raw = Path(root) / name / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    (raw / "train-images-idx3-ubyte.gz").write_bytes(b"partial")
    raise ConnectionError("connection reset")


@pytest.mark.parametrize("data_dir", ["missing/nested", "."])
def test_a_failed_download_leaves_nothing_it_created(tmp_path, monkeypatch, data_dir):
    fake_torchvision(monkeypatch, download_that_fails_halfway)
    with pytest.raises(nm.DataNotFoundError, match="download failed: ConnectionError: connection reset"):
        nm.load_dataset("fashion_mnist", tmp_path / data_dir, download=True)
    assert list(tmp_path.iterdir()) == []


def test_a_failed_download_keeps_the_folders_that_were_there(tmp_path, monkeypatch):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    (raw / "notes.txt").write_text("mine")
    fake_torchvision(monkeypatch, download_that_fails_halfway)
    with pytest.raises(nm.DataNotFoundError):
        nm.load_dataset("mnist", tmp_path, download=True)
    assert (raw / "notes.txt").read_text() == "mine"


def test_ensure_dataset_returns_directory(tmp_path, mnist_dir):
    raw = tmp_path / "MNIST" / "raw"
    _link_files(mnist_dir, raw)
    assert nm.ensure_dataset("mnist", tmp_path, download=False) == raw
    assert nm.ensure_dataset("mnist", mnist_dir, download=False) == mnist_dir


def test_train_and_evaluate_reports_missing_data(tmp_path, monkeypatch):
    calls = fake_torchvision(monkeypatch, lambda name, root, train: None)
    cfg = nm.TrainConfig(data_dir=str(tmp_path), epochs=1, max_train_samples=10)
    # train_and_evaluate loads with the default download=True; a download that brings nothing
    # must still end in DataNotFoundError rather than some other exception
    with pytest.raises(nm.DataNotFoundError):
        nm.train_and_evaluate(cfg)
    assert len(calls) == 2  # the download was tried


# ---------------------------------------------------------------- broken files


def small_dataset(directory: Path, train_labels=None, test_images=None) -> Path:
    """Four hand-built IDX files: 6 training and 4 test images, gzipped, in `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    arrays = {"train_images": rng.integers(0, 256, (6, 28, 28)), "test_images": rng.integers(0, 256, (4, 28, 28)),
              "train_labels": np.array([0, 1, 2, 3, 4, 5]), "test_labels": np.array([6, 7, 8, 9])}
    arrays["train_labels"] = arrays["train_labels"] if train_labels is None else np.asarray(train_labels)
    arrays["test_images"] = arrays["test_images"] if test_images is None else test_images
    for name, filename in nm.IDX_FILES.items():
        _write_idx(directory / filename, arrays[name], compress=True)
    return directory


def test_a_small_valid_dataset_loads(tmp_path):
    data = nm.load_dataset("mnist", small_dataset(tmp_path))
    assert data.train_images.shape == (6, 1, 28, 28) and data.test_labels.tolist() == [6, 7, 8, 9]


def test_a_truncated_file_is_named_with_what_is_wrong(tmp_path):
    directory = small_dataset(tmp_path)
    path = directory / nm.IDX_FILES["train_images"]
    with gzip.open(path, "rb") as f:
        data = f.read()
    with gzip.open(path, "wb") as f:
        f.write(data[:-100])  # a download cut short
    with pytest.raises(nm.DataFileError) as info:
        nm.load_dataset("mnist", directory)
    assert str(path) in str(info.value) and "truncated or corrupt" in str(info.value)


def test_a_file_that_is_not_gzip_is_named(tmp_path):
    directory = small_dataset(tmp_path)
    path = directory / nm.IDX_FILES["test_labels"]
    path.write_bytes(b"<html>not found</html>")  # what a failed download often leaves
    with pytest.raises(nm.DataFileError) as info:
        nm.load_dataset("mnist", directory)
    assert str(path) in str(info.value) and "cannot be decoded" in str(info.value)


def test_image_and_label_counts_must_match(tmp_path):
    directory = small_dataset(tmp_path, train_labels=[0, 1, 2])
    with pytest.raises(nm.DataFileError) as info:
        nm.load_dataset("mnist", directory)
    assert str(directory / nm.IDX_FILES["train_labels"]) in str(info.value)
    assert "not one label for each of the 6 images" in str(info.value)


def test_labels_must_be_classes(tmp_path):
    directory = small_dataset(tmp_path, train_labels=[0, 1, 2, 3, 4, 12])
    with pytest.raises(nm.DataFileError) as info:
        nm.load_dataset("mnist", directory)
    assert "has label 12; labels must be 0-9" in str(info.value)


def test_images_must_be_28_by_28(tmp_path):
    directory = small_dataset(tmp_path, test_images=np.zeros((4, 14, 14)))
    with pytest.raises(nm.DataFileError) as info:
        nm.load_dataset("mnist", directory)
    assert str(directory / nm.IDX_FILES["test_images"]) in str(info.value) and "not N x 28 x 28" in str(info.value)


@pytest.mark.parametrize("split", ["train", "test"])
def test_a_file_without_images_is_rejected(tmp_path, split):
    directory = small_dataset(tmp_path)
    _write_idx(directory / nm.IDX_FILES[f"{split}_images"], np.zeros((0, 28, 28)), compress=True)
    _write_idx(directory / nm.IDX_FILES[f"{split}_labels"], np.zeros(0), compress=True)
    with pytest.raises(nm.DataFileError) as info:
        nm.load_dataset("mnist", directory)
    assert str(info.value) == f"{directory / nm.IDX_FILES[f'{split}_images']} holds no images; download it again"


def test_a_broken_file_stops_the_campaign_before_anything_is_written(tmp_path):
    from conftest import run_main

    directory = small_dataset(tmp_path / "data", train_labels=[0, 1, 2])
    out = tmp_path / "out"
    code, stdout, stderr = run_main(["--smoke", "--data_dir", str(directory), "--output_dir", str(out)])
    assert code == 2 and not out.exists()
    assert stderr.startswith("error: data_dir: ") and "Traceback" not in stderr
    assert str(directory / nm.IDX_FILES["train_labels"]) in stderr


# ---------------------------------------------------------------- which dataset the files hold
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")  # where its system package puts it
needs_fashion = pytest.mark.skipif(not FASHION_DIR.is_dir(), reason=f"Fashion-MNIST is not at {FASHION_DIR}")


def test_real_mnist_is_identified(mnist_dir):
    assert nm.identified_dataset(nm.read_idx(mnist_dir / nm.IDX_FILES["train_labels"])) == "mnist"
    assert nm.identified_dataset(np.zeros(60000, dtype=np.uint8)) is None  # other data is taken as it is


@needs_fashion
def test_fashion_mnist_is_identified_and_loads_beside_mnist(tmp_path, mnist_dir):
    """Each dataset in its own torchvision folder under one data_dir, as a campaign of both needs."""
    assert nm.identified_dataset(nm.read_idx(FASHION_DIR / nm.IDX_FILES["train_labels"])) == "fashion_mnist"
    _link_files(mnist_dir, tmp_path / "MNIST" / "raw")
    _link_files(FASHION_DIR, tmp_path / "FashionMNIST" / "raw")
    mnist, fashion = (nm.load_dataset(name, tmp_path, download=False) for name in ("mnist", "fashion_mnist"))
    assert mnist.train_labels[:10].tolist() == TRAIN_FIRST_LABELS
    assert fashion.train_labels[:10].tolist() == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]


def test_another_datasets_files_are_refused(tmp_path, mnist_dir):
    """MNIST's files, which have Fashion-MNIST's names, are never trained on as Fashion-MNIST."""
    _link_files(mnist_dir, tmp_path)
    with pytest.raises(nm.DataFileError) as info:
        nm.load_dataset("fashion_mnist", tmp_path, download=False)
    assert str(info.value).startswith(f"{tmp_path} holds mnist, not fashion_mnist: ")
    assert str(tmp_path / "FashionMNIST" / "raw") in str(info.value)


def test_a_campaign_of_both_datasets_in_one_flat_folder_stops_before_it_starts(tmp_path, mnist_dir):
    from conftest import run_main

    out = tmp_path / "out"
    code, _, stderr = run_main(["--smoke", "--datasets", "mnist,fashion_mnist", "--data_dir", str(mnist_dir),
                                "--output_dir", str(out)])
    assert code == 2 and not out.exists()
    assert stderr == (f"error: data_dir: {mnist_dir} holds mnist, not fashion_mnist: to train on mnist, name it in "
                      f"datasets; for fashion_mnist, put its four files into {mnist_dir / 'FashionMNIST' / 'raw'}/ "
                      "(with several datasets, each in its own folder there), or set data_dir to where they are\n")
