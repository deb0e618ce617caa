"""One training run: data loading, noise injection, models, and the train/evaluate loop.

Nothing here knows about grids, pools, CSVs or progress bars: `TrainConfig` goes in,
a flat dict of results comes out (`train_and_evaluate`).

Performance design: a dataset is decoded once per process into uint8 tensors
(`load_dataset` caches it, so forked pool workers share the parent's copy), batches are
built by indexing, pixel noise is drawn for a whole batch at once, and label noise once
per run. There is no per-sample Python and no DataLoader in the training loop.
"""
from __future__ import annotations

import contextlib
import gzip
import hashlib
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import nn
from torch.optim.adam import adam
from torch.optim.sgd import sgd

NUM_CLASSES = 10
DATASETS = ("mnist", "fashion_mnist")
MODEL_TYPES = ("mlp", "cnn")
ACTIVATIONS = ("relu", "tanh", "sigmoid", "leaky_relu", "gelu")
NON_DECREASING_ACTIVATIONS = ("relu", "tanh", "sigmoid", "leaky_relu")  # not gelu
LABEL_NOISE_TYPES = ("label_uniform", "label_flip", "label_pairflip", "label_matrix")
PIXEL_NOISE_TYPES = ("pixel_uniform", "pixel_empirical")
NOISE_TYPES = LABEL_NOISE_TYPES + PIXEL_NOISE_TYPES
OPTIMIZERS = ("adam", "sgd")
LOSS_CORRECTIONS = ("none", "forward")
PRECISIONS = ("float32", "bfloat16")  # of the training passes; weights, Adam and evaluation stay float32
ECE_BINS = 15
MEMORISATION_SAMPLE = 10_000  # training examples checked for memorisation after each epoch

# torchvision's folder name for each dataset, and the per-pixel mean/std of its training set.
TORCHVISION_NAMES = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}
NORMALIZATION = {"mnist": (0.1307, 0.3081), "fashion_mnist": (0.2860, 0.3530)}
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
# The CNN's first activations for 256 images (26 MB) stay below glibc's 32 MB mmap limit, so their memory
# is reused; at 1,000 every batch maps fresh pages and evaluating the CNN is ~1.6x slower.
EVAL_BATCH_SIZE = 256


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines one training run."""

    dataset: str = "mnist"
    model_type: str = "mlp"
    activation: str = "relu"
    hidden_sizes: tuple[int, ...] = (256, 128)
    noise_type: str = "label_uniform"
    p: float = 0.0
    epochs: int = 5
    batch_size: int = 128
    optimizer: str = "adam"
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    normalize: bool = True
    seed: int = 0
    cpu_threads: int = 1
    max_train_samples: int | None = None
    data_dir: str = "data"
    use_cuda: bool = False
    noise_matrix: tuple[tuple[float, ...], ...] | None = None  # M for label_matrix: T = (1-p) I + p M
    loss_correction: str = "none"      # "forward": train on -log((softmax(z) T)[noisy label])
    validation_fraction: float = 0.0   # > 0: hold out this much noisy training data to pick the epoch
    precision: str = "float32"         # "bfloat16": mixed-precision training passes (autocast)

    @property
    def draws_pixel_noise(self) -> bool:
        """Whether training batches get pixel noise. At p = 0 none is drawn: replacing no
        pixels would change nothing, so the result is the same bit for bit, only faster."""
        return self.noise_type in PIXEL_NOISE_TYPES and self.p > 0


# ---------------------------------------------------------------- randomness


def stream_seed(seed: int, stream: str) -> int:
    """A 63-bit seed for one named random stream of a run.

    Separate streams for init, data order, label noise and pixel noise mean that changing
    p or the noise type changes only the noise: repeat r shares its initial weights and
    batch order across every p (common random numbers).
    """
    digest = hashlib.sha256(f"{seed}/{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def make_generator(seed: int, stream: str, device: torch.device | str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(stream_seed(seed, stream))


# ---------------------------------------------------------------- data


class DataNotFoundError(FileNotFoundError):
    """The IDX files of a dataset are missing and could not be downloaded."""


class Dataset(NamedTuple):
    """A dataset held in memory: images are uint8 of shape (N, 1, 28, 28)."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor


def _candidate_dirs(dataset: str, data_dir: str | Path) -> list[Path]:
    root = Path(data_dir).expanduser()
    return [root / TORCHVISION_NAMES[dataset] / "raw", root]


def _find_idx_file(directory: Path, filename: str) -> Path | None:
    for candidate in (directory / filename, directory / filename.removesuffix(".gz")):
        if candidate.is_file():
            return candidate
    return None


def find_raw_dir(dataset: str, data_dir: str | Path) -> Path | None:
    """The directory holding all four IDX files (gzipped or not), or None."""
    for directory in _candidate_dirs(dataset, data_dir):
        if all(_find_idx_file(directory, name) for name in IDX_FILES.values()):
            return directory
    return None


def _download_with_torchvision(dataset: str, data_dir: str | Path) -> None:
    from torchvision import datasets as tv_datasets

    dataset_class = getattr(tv_datasets, TORCHVISION_NAMES[dataset])
    for train in (True, False):
        dataset_class(str(data_dir), train=train, download=True)


def ensure_dataset(dataset: str, data_dir: str | Path, download: bool = True) -> Path:
    """Return the directory of the dataset's IDX files, downloading them if allowed.

    Raises DataNotFoundError naming the four files and where they belong.
    """
    found = find_raw_dir(dataset, data_dir)
    if found is not None:
        return found
    reason = "download not attempted"
    if download:
        try:
            _download_with_torchvision(dataset, data_dir)
        except Exception as exc:  # offline, proxy, checksum...: all mean "not here"
            reason = f"download failed: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
        found = find_raw_dir(dataset, data_dir)
        if found is not None:
            return found
    expected = _candidate_dirs(dataset, data_dir)[0].resolve()
    raise DataNotFoundError(
        f"{dataset} data not found under data_dir={str(data_dir)!r} ({reason}). "
        f"Put the four files {', '.join(IDX_FILES.values())} into {expected}/ "
        f"or set data_dir to a directory that holds them directly."
    )


def read_idx(path: Path) -> np.ndarray:
    """Decode one IDX file (gzipped or plain) into a uint8 array."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    magic = int.from_bytes(data[0:4], "big")
    if magic >> 8 != 0x08:  # 0x08 = unsigned byte
        raise ValueError(f"{path} is not an IDX file of unsigned bytes (magic {magic:#x})")
    ndim = magic & 0xFF
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


_DATASET_CACHE: dict[tuple[str, str], Dataset] = {}


def load_dataset(dataset: str, data_dir: str | Path, download: bool = True) -> Dataset:
    """The dataset decoded into tensors, cached per process (forked workers share it)."""
    key = (dataset, str(Path(data_dir).expanduser().resolve()))
    if key not in _DATASET_CACHE:
        raw_dir = ensure_dataset(dataset, data_dir, download)
        arrays = {name: read_idx(_find_idx_file(raw_dir, f)) for name, f in IDX_FILES.items()}
        _DATASET_CACHE[key] = Dataset(
            train_images=torch.from_numpy(arrays["train_images"].copy()).unsqueeze(1),
            train_labels=torch.from_numpy(arrays["train_labels"].astype(np.int64)),
            test_images=torch.from_numpy(arrays["test_images"].copy()).unsqueeze(1),
            test_labels=torch.from_numpy(arrays["test_labels"].astype(np.int64)),
        )
    return _DATASET_CACHE[key]


def standardize_grey_levels(grey_levels: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """Float grey levels in [0, 255] -> (x / 255 - mean) / std, in place, in two passes."""
    return grey_levels.mul_(1.0 / (255.0 * std)).sub_(mean / std)


def pixel_intensity_cdf(images_uint8: torch.Tensor) -> torch.Tensor:
    """Cumulative distribution of the 256 grey levels over all pixels of `images_uint8`."""
    counts = torch.bincount(images_uint8.flatten(), minlength=256).double()
    return (counts.cumsum(0) / counts.sum()).float()


QUANTILE_TABLE_SIZE = 2**16


def grey_level_quantiles(cdf: torch.Tensor) -> torch.Tensor:
    """A lookup table for inverse-cdf sampling: entry j is the grey level (in [0, 1]) at
    cumulative probability (j + 0.5) / 2**16.

    Looking up floor(v * 2**16) for v ~ U[0, 1) then draws level k with probability
    cdf[k] - cdf[k-1] up to an error of at most 2**-16 ~ 1.5e-5: a table cell that straddles
    a step of the cdf goes wholly to one of the two neighbouring levels. Levels of
    probability 0 are never drawn and steps at multiples of 2**-16 (e.g. 1/4) are exact.
    For MNIST, 6e-4 of the replaced pixels get a neighbouring grey level instead of the
    exact draw. A gather from this 256 KiB table is over 10x faster than a binary search
    (searchsorted) per pixel.
    """
    cells = (torch.arange(QUANTILE_TABLE_SIZE, dtype=torch.float64, device=cdf.device) + 0.5)
    levels = torch.searchsorted(cdf.double(), cells / QUANTILE_TABLE_SIZE, right=True)
    return levels.clamp_(max=255).float().div_(255.0)


def lookup_quantiles(quantiles: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Grey levels for v in [0, 1] (values above 1 count as 1); consumes `v` in place."""
    cells = v.mul_(QUANTILE_TABLE_SIZE).clamp_(max=QUANTILE_TABLE_SIZE - 1).int()
    return quantiles.index_select(0, cells.view(-1)).view(v.shape)


# ---------------------------------------------------------------- noise


def check_noise_matrix(matrix, num_classes: int = NUM_CLASSES) -> torch.Tensor:
    """The matrix as a float64 tensor, if it is K x K, non-negative and row-stochastic."""
    try:
        tensor = torch.tensor(matrix, dtype=torch.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"noise_matrix must be a {num_classes}x{num_classes} list of lists of numbers: {exc}")
    if tensor.shape != (num_classes, num_classes):
        raise ValueError(f"noise_matrix must be {num_classes}x{num_classes}, got shape {tuple(tensor.shape)}")
    if (tensor < 0).any():
        raise ValueError("noise_matrix has negative entries; every T[i, j] must be >= 0")
    row_sums = tensor.sum(1)
    if not torch.allclose(row_sums, torch.ones_like(row_sums), atol=1e-6):
        bad = int((row_sums - 1).abs().argmax())
        raise ValueError(f"noise_matrix row {bad} sums to {row_sums[bad].item():.6g}; every row must sum to 1")
    return tensor


def transition_matrix(noise_type: str, p: float, noise_matrix=None, num_classes: int = NUM_CLASSES) -> torch.Tensor:
    """T[i, j] = P(noisy label j | true label i) of a label noise type at level p (identity for
    pixel noise). label_matrix mixes the user's matrix M in: T = (1 - p) I + p M."""
    k = num_classes
    identity = torch.eye(k, dtype=torch.float64)
    noise = {
        "label_uniform": lambda: torch.full((k, k), 1.0 / k, dtype=torch.float64),
        "label_flip": lambda: (1 - identity) / (k - 1),
        "label_pairflip": lambda: identity.roll(1, dims=1),
        "label_matrix": lambda: check_noise_matrix(noise_matrix, k),
    }
    if noise_type not in noise:
        return identity
    return (1 - p) * identity + p * noise[noise_type]()


def corrupt_labels(
    labels: torch.Tensor, p: float, noise_type: str, generator: torch.Generator,
    num_classes: int = NUM_CLASSES, noise_matrix=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy training labels and the bool mask of the examples that were given a new label
    (for label_matrix: of the examples whose label changed).

    `label_uniform`, `label_flip` and `label_pairflip` pick exactly round(p*N) examples at
    random; `label_uniform` draws their new label from all K classes (it may equal the true
    one), `label_flip` from the K-1 other classes, `label_pairflip` sets it to (y + 1) mod K.
    Draws do not depend on p, so the set at a smaller p is a subset of the one at a larger p
    for the same generator seed. `label_matrix` draws every example's label independently
    from row y of T = (1 - p) I + p M (`transition_matrix`).
    """
    n = len(labels)
    if noise_type == "label_matrix":
        rows = transition_matrix(noise_type, p, noise_matrix, num_classes).to(labels.device)[labels]
        noisy = torch.multinomial(rows, 1, generator=generator).squeeze(1)
        return noisy, noisy != labels
    order = torch.randperm(n, generator=generator, device=labels.device)
    if noise_type == "label_uniform":
        new_labels = torch.randint(0, num_classes, (n,), generator=generator, device=labels.device)
    elif noise_type == "label_flip":
        offsets = torch.randint(1, num_classes, (n,), generator=generator, device=labels.device)
        new_labels = (labels[order] + offsets) % num_classes
    elif noise_type == "label_pairflip":
        new_labels = (labels[order] + 1) % num_classes
    else:
        raise ValueError(f"unknown label noise type {noise_type!r}; allowed: {LABEL_NOISE_TYPES}")
    chosen = order[: round(p * n)]
    noisy = labels.clone()
    noisy[chosen] = new_labels[: len(chosen)]
    mask = torch.zeros(n, dtype=torch.bool, device=labels.device)
    mask[chosen] = True
    return noisy, mask


def corrupt_pixels(
    images: torch.Tensor, p: float, generator: torch.Generator, cdf: torch.Tensor | None = None,
) -> torch.Tensor:
    """Replace each pixel independently with probability p.

    Replacement values are U[0, 1], or, given `cdf`, drawn from that grey-level
    distribution. `images` are floats in [0, 1]; a new tensor is returned.
    """
    quantiles = None if cdf is None else grey_level_quantiles(cdf)
    return replace_pixels(images, p, generator, quantiles)


def replace_pixels(
    images: torch.Tensor, p: float, generator: torch.Generator,
    quantiles: torch.Tensor | None = None, in_place: bool = False, white: float = 1.0,
) -> torch.Tensor:
    """`corrupt_pixels` with the cdf already turned into a table (`grey_level_quantiles`).

    One uniform u per pixel decides both whether the pixel is replaced (u < p) and by
    what: given u < p, u / p is U[0, 1), so it serves as the replacement value (or as the
    uniform fed to the quantile table). This is exact, not an approximation: u is drawn
    independently of the images, the pixels' u are independent, and the value is used only
    when the pixel is replaced. (u has 24-bit resolution, as torch.rand, so u / p lives on a
    grid of spacing 2**-24 / p: 1.2e-7 at p = 0.5.) `white` is the value of a white pixel in
    `images` (1 for [0, 1], 255 for grey levels): uniform replacements are scaled to it, and
    `quantiles` must be on that scale. Returns a new tensor, or `images` modified in place
    if `in_place`.
    """
    u = uniform_floats(images.shape, generator, images.device).to(images.dtype)
    # 1.0 where replaced, 0.0 elsewhere: compared straight into a float tensor, as bool
    # tensors are slow on CPU; it is the weight of an exact select (lerp with weight 0/1).
    replace = torch.lt(u, p, out=torch.empty_like(u))
    p_or_1 = p if p > 0 else 1.0  # at p = 0 nothing is replaced; any finite value will do
    if quantiles is None:
        values = u.mul_(white / p_or_1)
    else:
        values = lookup_quantiles(quantiles.to(u.dtype), u.div_(p_or_1))
    return images.lerp_(values, replace) if in_place else torch.lerp(images, values, replace)


def uniform_floats(shape: torch.Size, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """float32 U[0, 1) on the grid of 2**-24, the distribution of torch.rand, at about three
    quarters of its cost on CPU: two 24-bit uniforms from each 64-bit draw (whose low 63 bits
    are random)."""
    n = math.prod(shape)
    bits = torch.empty((n + 1) // 2, dtype=torch.int64, device=device).random_(generator=generator)
    return bits.view(torch.int32)[:n].view(shape).bitwise_and_(2**24 - 1).float().mul_(2**-24)


# ---------------------------------------------------------------- models


def get_activation(name: str) -> nn.Module:
    factories = {
        "relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid,
        "leaky_relu": lambda: nn.LeakyReLU(0.1), "gelu": nn.GELU,
    }
    if name not in factories:
        raise ValueError(f"unknown activation {name!r}; allowed: {ACTIVATIONS}")
    return factories[name]()


class MLP(nn.Module):
    def __init__(self, activation: str, hidden_sizes: tuple[int, ...] = (256, 128)):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = 28 * 28
        for hidden in hidden_sizes:
            layers += [nn.Linear(width, hidden), get_activation(activation)]
            width = hidden
        layers.append(nn.Linear(width, NUM_CLASSES))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def conv_block(in_channels: int, out_channels: int, activation: str) -> list[nn.Module]:
    """3x3 convolution, activation, 2x2 max-pooling. For a non-decreasing activation f,
    max(f(a), f(b)) = f(max(a, b)): pooling first computes the same function, with f and
    its backward pass on a quarter of the values (CNN training steps ~1.4x faster on CPU)."""
    conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)
    act, pool = get_activation(activation), nn.MaxPool2d(2)
    return [conv, pool, act] if activation in NON_DECREASING_ACTIVATIONS else [conv, act, pool]


class SimpleCNN(nn.Module):
    def __init__(self, activation: str):
        super().__init__()
        self.features = nn.Sequential(*conv_block(1, 32, activation), *conv_block(32, 64, activation))
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(64 * 7 * 7, 128), get_activation(activation),
            nn.Linear(128, NUM_CLASSES),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def build_model(model_type: str, activation: str, hidden_sizes: tuple[int, ...] = (256, 128)) -> nn.Module:
    if model_type == "mlp":
        return MLP(activation, tuple(hidden_sizes))
    if model_type == "cnn":
        # channels-last activations: oneDNN's NHWC convolutions train ~1.3x faster on CPU here
        return SimpleCNN(activation).to(memory_format=torch.channels_last)
    raise ValueError(f"unknown model_type {model_type!r}; allowed: {MODEL_TYPES}")


class Optimizer:
    """Adam (fused: one kernel for all parameters, ~2x faster steps on CPU than the per-tensor
    loop) or SGD with momentum 0.9: the updates of torch.optim.Adam(fused=True) and
    torch.optim.SGD, through the same functional kernels, without torch.optim's Optimizer
    class, whose every step() imports torch._dynamo: about 1 s and 70 MiB of memory in each
    pool worker, for a compiler this product never uses."""

    def __init__(self, model: nn.Module, cfg: TrainConfig):
        if cfg.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {cfg.optimizer!r}; allowed: {OPTIMIZERS}")
        self.kind, self.lr, self.weight_decay = cfg.optimizer, cfg.learning_rate, cfg.weight_decay
        self.params = list(model.parameters())
        if self.kind == "adam":
            self.exp_avgs = [torch.zeros_like(p) for p in self.params]
            self.exp_avg_sqs = [torch.zeros_like(p) for p in self.params]
            self.steps = [torch.zeros((), device=p.device) for p in self.params]  # float32: the fused kernel's
        else:
            self.momentum_buffers: list[torch.Tensor | None] = [None] * len(self.params)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        grads = [p.grad for p in self.params]
        if self.kind == "adam":
            adam(self.params, grads, self.exp_avgs, self.exp_avg_sqs, [], self.steps, fused=True,
                 amsgrad=False, beta1=0.9, beta2=0.999, lr=self.lr, weight_decay=self.weight_decay,
                 eps=1e-8, maximize=False)
        else:
            sgd(self.params, grads, self.momentum_buffers, weight_decay=self.weight_decay, momentum=0.9,
                lr=self.lr, dampening=0.0, nesterov=False, maximize=False)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------- metrics


def macro_roc_auc(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean over classes of the one-vs-rest ROC-AUC (Mann-Whitney form, ties averaged)."""
    aucs = []
    for k in range(probs.shape[1]):
        positive = labels == k
        n_pos, n_neg = int(positive.sum()), int((~positive).sum())
        if n_pos == 0 or n_neg == 0:
            continue
        ranks = average_ranks(probs[:, k])
        aucs.append((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
    return float(np.mean(aucs))


def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of `values`, tied values sharing the mean of their ranks (scipy's
    rankdata; not imported for this, as scipy.stats adds ~0.5 s and ~50 MiB to every process)."""
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])  # first position of each tie group
    ends = np.r_[starts[1:], len(values)]
    ranks = np.empty(len(values))
    ranks[order] = np.repeat((starts + 1 + ends) / 2, ends - starts)  # mean of ranks starts+1 .. ends
    return ranks


def calibration_bins(probs: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> dict[str, list]:
    """Reliability diagram data: per equal-width confidence bin, the count, mean confidence
    (max softmax) and accuracy (NaN for an empty bin)."""
    confidence, predictions = probs.max(1)
    correct = (predictions == labels).double()
    which = (confidence.double() * bins).long().clamp_(max=bins - 1)
    counts = torch.bincount(which, minlength=bins).double()
    mean_of = lambda values: torch.bincount(which, weights=values, minlength=bins) / counts  # noqa: E731
    return {"count": counts.tolist(), "confidence": mean_of(confidence.double()).tolist(),
            "accuracy": mean_of(correct).tolist()}


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> float:
    """sum over bins of (bin size / N) * |accuracy - mean confidence|, equal-width bins."""
    reliability = calibration_bins(probs, labels, bins)
    counts = torch.tensor(reliability["count"])
    gaps = (torch.tensor(reliability["accuracy"]) - torch.tensor(reliability["confidence"])).abs()
    return float((counts * gaps.nan_to_num(0.0)).sum() / counts.sum())


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Cross-entropy, accuracy, macro precision/recall (0 for a never-predicted class), macro AUC,
    expected calibration error and mean confidence."""
    logits, labels = logits.float().cpu(), labels.cpu()
    probs = torch.softmax(logits, 1)
    predictions = logits.argmax(1)
    confusion = torch.bincount(labels * NUM_CLASSES + predictions, minlength=NUM_CLASSES**2)
    confusion = confusion.view(NUM_CLASSES, NUM_CLASSES).double()  # rows: true, cols: predicted
    true_positives = confusion.diag()
    precision = true_positives / confusion.sum(0).clamp(min=1)
    recall = true_positives / confusion.sum(1).clamp(min=1)
    return {
        "test_loss": nn.functional.cross_entropy(logits, labels).item(),
        "test_accuracy": (predictions == labels).double().mean().item(),
        "test_macro_precision": precision.mean().item(),
        "test_macro_recall": recall.mean().item(),
        "test_macro_roc_auc": macro_roc_auc(probs.numpy(), labels.numpy()),
        "test_ece": expected_calibration_error(probs, labels),
        "test_mean_confidence": probs.max(1).values.mean().item(),
    }


# ---------------------------------------------------------------- train / evaluate


class BatchSource:
    """Turns indices into training batches: gather, scale, add pixel noise, normalize."""

    def __init__(self, cfg: TrainConfig, images_uint8: torch.Tensor, device: torch.device,
                 stream: str = "pixel_noise", cdf: torch.Tensor | None = None):
        self.images = images_uint8
        self.pixel_noise = cfg.draws_pixel_noise
        self.p = cfg.p
        if cfg.noise_type == "pixel_empirical" and cdf is None:
            cdf = pixel_intensity_cdf(images_uint8)  # the noise looks like these images
        self.cdf = cdf if cfg.noise_type == "pixel_empirical" else None
        # built once per run, in grey levels (0-255): the scale batches are noised in
        self.quantiles = None if self.cdf is None else grey_level_quantiles(self.cdf).mul_(255.0)
        self.generator = make_generator(cfg.seed, stream, device)
        self.mean, self.std = NORMALIZATION[cfg.dataset] if cfg.normalize else (0.0, 1.0)

    def batch(self, indices: torch.Tensor) -> torch.Tensor:
        grey_levels = self.images.index_select(0, indices).float()  # index_select: ~30x faster than [] here
        if self.pixel_noise:
            replace_pixels(grey_levels, self.p, self.generator, self.quantiles, in_place=True, white=255.0)
        return standardize_grey_levels(grey_levels, self.mean, self.std)


def forward_corrected_loss(logits: torch.Tensor, noisy_labels: torch.Tensor, transition: torch.Tensor) -> torch.Tensor:
    """Forward loss correction (Patrini et al. 2017): the cross-entropy of the noisy labels
    under softmax(z) T, the model's clean posterior pushed through the noise."""
    noisy_probs = torch.softmax(logits, 1) @ transition
    return nn.functional.nll_loss(noisy_probs.clamp_min(1e-12).log(), noisy_labels)


def training_loss(cfg: TrainConfig, device: torch.device):
    """loss(logits, labels) of the run: cross-entropy, or forward-corrected with the run's true T."""
    if cfg.loss_correction == "forward":
        transition = transition_matrix(cfg.noise_type, cfg.p, cfg.noise_matrix).float().to(device)
        return lambda logits, labels: forward_corrected_loss(logits, labels, transition)
    if cfg.loss_correction == "none":
        return nn.functional.cross_entropy
    raise ValueError(f"unknown loss_correction {cfg.loss_correction!r}; allowed: {LOSS_CORRECTIONS}")


def training_precision(precision: str, device: torch.device):
    """A reusable context for the forward passes of training: under "bfloat16", autocast runs matrix
    products and convolutions in bfloat16 (and their backward passes with them), while the
    weights, their gradients and the optimizer state stay float32."""
    if precision == "float32":
        return contextlib.nullcontext()
    if precision == "bfloat16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    raise ValueError(f"unknown precision {precision!r}; allowed: {PRECISIONS}")


def batch_loss(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, loss_fn, autocast) -> torch.Tensor:
    """The training loss of one batch: the forward pass inside `autocast` (a
    `training_precision` context), the loss in float32 from the logits."""
    with autocast:
        logits = model(images)
    return loss_fn(logits.float(), labels)


def train_one_epoch(model, optimizer, source: BatchSource, labels, batch_size, order_generator,
                    indices: torch.Tensor | None = None, loss_fn=nn.functional.cross_entropy,
                    precision: str = "float32") -> float:
    """One pass over the training examples (`indices`, default all) in random order; returns
    the mean training loss (computed in float32 from the logits in any precision)."""
    model.train()
    n = len(labels) if indices is None else len(indices)
    order = torch.randperm(n, generator=order_generator, device=labels.device)
    if indices is not None:
        order = indices[order]
    total_loss = torch.zeros((), device=labels.device)
    autocast = training_precision(precision, labels.device)  # entered once per batch
    for start in range(0, n, batch_size):
        batch = order[start : start + batch_size]
        loss = batch_loss(model, source.batch(batch), labels[batch], loss_fn, autocast)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        total_loss += loss.detach() * len(batch)
    return total_loss.item() / n


def predict_logits(model: nn.Module, images_uint8: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """Logits for clean images, in large batches without autograd bookkeeping."""
    def batch_at(i: int) -> torch.Tensor:
        return standardize_grey_levels(images_uint8[i : i + EVAL_BATCH_SIZE].float(), mean, std)

    return predict_batches(model, batch_at, len(images_uint8))


def predict_batches(model: nn.Module, batch_at, n: int) -> torch.Tensor:
    """Logits of batch_at(0), batch_at(EVAL_BATCH_SIZE), ... covering n examples."""
    model.eval()
    with torch.inference_mode():
        chunks = [model(batch_at(i)) for i in range(0, n, EVAL_BATCH_SIZE)]
    return torch.cat(chunks)


def predict_noisy_logits(model: nn.Module, source: BatchSource, indices: torch.Tensor) -> torch.Tensor:
    """Logits for the images `indices` of `source`, with its pixel noise (one draw per call)."""
    return predict_batches(model, lambda i: source.batch(indices[i : i + EVAL_BATCH_SIZE]), len(indices))


def memorisation_metrics(predictions: torch.Tensor, noisy: torch.Tensor, clean: torch.Tensor) -> dict[str, float]:
    """How much the model follows the noisy labels of the training examples it saw.

    On the corrupted examples (noisy label != true label): the fraction predicted as their noisy
    label and as their true label; on the others, plain training accuracy. NaN where a subset
    is empty.
    """
    corrupted = noisy != clean
    fraction = lambda hits: hits.double().mean().item() if len(hits) else math.nan  # noqa: E731
    return {
        "memorised_fraction": fraction(predictions[corrupted] == noisy[corrupted]),
        "corrupted_true_fraction": fraction(predictions[corrupted] == clean[corrupted]),
        "clean_train_accuracy": fraction(predictions[~corrupted] == clean[~corrupted]),
    }


def split_validation(cfg: TrainConfig, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(training indices, held-out validation indices or None), a random split of the run."""
    order = torch.randperm(n, generator=make_generator(cfg.seed, "validation_split", device), device=device)
    n_validation = round(cfg.validation_fraction * n)
    if n_validation >= n:
        raise ValueError(f"validation_fraction={cfg.validation_fraction} leaves no training examples out of {n}")
    if n_validation == 0:
        return torch.arange(n, device=device), None
    return order[n_validation:].sort().values, order[:n_validation].sort().values


def select_device(use_cuda: bool) -> torch.device:
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("use_cuda=True but no CUDA device is available")
    return torch.device("cuda" if use_cuda else "cpu")


def seed_everything(seed: int) -> None:
    """Seed the global generators too, so no state leaks in from an earlier run in this process."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(stream_seed(seed, "init"))


def train_and_evaluate(cfg: TrainConfig, data: Dataset | None = None) -> dict:
    """Train one model on (possibly corrupted) training data and evaluate it on the clean test set.

    Returns a flat dict: every config field, the final metrics, `n_params`, `seconds` (of
    which `train_seconds` in the training passes, the rest set-up and evaluation), the
    per-epoch history as lists (`history_<metric>`) and the final reliability-diagram bins.
    With a validation split, `selected_*` are the test metrics of the epoch with the lowest
    loss on the held-out *noisy* validation data (never selected on the test set). For pixel
    noise, `noisy_test_*` are measured on test images carrying the same noise.
    """
    started = time.perf_counter()
    torch.set_num_threads(max(1, cfg.cpu_threads))
    # Adam's first moment of a weight whose gradient stays 0 (a dead ReLU unit) decays by 0.9 a
    # step into subnormal floats, which x86 CPUs process many times slower: flush them to zero
    # (MLP epochs 3-6 measured 4-14% faster with it). Per thread, and inherited by the threads
    # started after it: in a pool worker, all of torch's.
    torch.set_flush_denormal(True)
    device = select_device(cfg.use_cuda)
    if data is None:
        data = load_dataset(cfg.dataset, cfg.data_dir)
    limit = cfg.max_train_samples or len(data.train_labels)
    train_images = data.train_images[:limit].to(device)
    clean_labels = data.train_labels[:limit].to(device)
    test_images, test_labels = data.test_images.to(device), data.test_labels.to(device)

    train_labels = clean_labels
    if cfg.noise_type in LABEL_NOISE_TYPES:
        train_labels, _ = corrupt_labels(clean_labels, cfg.p, cfg.noise_type,
                                         make_generator(cfg.seed, "label_noise", device),
                                         noise_matrix=cfg.noise_matrix)
    train_indices, validation_indices = split_validation(cfg, limit, device)
    source = BatchSource(cfg, train_images, device)
    memorisation_indices = train_indices[torch.randperm(
        len(train_indices), generator=make_generator(cfg.seed, "memorisation", device), device=device
    )[:MEMORISATION_SAMPLE]]
    memorisation_images = train_images[memorisation_indices]  # gathered once, checked every epoch

    seed_everything(cfg.seed)
    model = build_model(cfg.model_type, cfg.activation, cfg.hidden_sizes).to(device)
    optimizer = Optimizer(model, cfg)
    loss_fn = training_loss(cfg, device)
    order_generator = make_generator(cfg.seed, "data_order", device)

    if validation_indices is not None:  # its pixel noise is drawn the same way every epoch
        validation_source = BatchSource(cfg, train_images, device, "validation_noise")
    history: dict[str, list[float]] = {}
    train_seconds = 0.0
    for _ in range(cfg.epochs):
        epoch_started = time.perf_counter()
        train_loss = train_one_epoch(model, optimizer, source, train_labels, cfg.batch_size,
                                     order_generator, train_indices, loss_fn, cfg.precision)
        train_seconds += time.perf_counter() - epoch_started
        test_logits = predict_logits(model, test_images, source.mean, source.std)
        epoch = classification_metrics(test_logits, test_labels)
        if cfg.noise_type in LABEL_NOISE_TYPES:
            predictions = predict_logits(model, memorisation_images, source.mean, source.std).argmax(1)
            epoch.update(memorisation_metrics(predictions, train_labels[memorisation_indices],
                                              clean_labels[memorisation_indices]))
        if validation_indices is not None:
            validation_source.generator.manual_seed(stream_seed(cfg.seed, "validation_noise"))
            validation_logits = predict_noisy_logits(model, validation_source, validation_indices)
            epoch["validation_loss"] = loss_fn(validation_logits, train_labels[validation_indices]).item()
        for name, value in epoch.items():
            history.setdefault(name, []).append(value)

    result = asdict(cfg)
    result.update(summarise_history(history))
    result.update(train_loss=train_loss, n_params=count_parameters(model),
                  reliability=calibration_bins(torch.softmax(test_logits.float().cpu(), 1), test_labels.cpu()))
    if cfg.draws_pixel_noise:
        noisy_test = BatchSource(cfg, test_images, device, "test_noise", cdf=source.cdf)  # the training noise
        result.update(noisy_test_metrics(model, noisy_test, test_labels))
    elif cfg.noise_type in PIXEL_NOISE_TYPES:  # at p = 0 the noisy test set is the clean one
        result.update(noisy_test_accuracy=result["test_accuracy"], noisy_test_loss=result["test_loss"])
    result.update(seconds=time.perf_counter() - started, train_seconds=train_seconds)
    return result


def summarise_history(history: dict[str, list[float]]) -> dict:
    """Final values, `history_<metric>` lists and, with a validation loss, the test metrics of
    the epoch where it was lowest (`selected_*`; the test set never chooses)."""
    summary = {name: values[-1] for name, values in history.items()}
    summary.update({f"history_{name}": values for name, values in history.items()})
    if "validation_loss" in history:
        best = min(range(len(history["validation_loss"])), key=history["validation_loss"].__getitem__)
        summary.update(selected_epoch=best + 1, selected_test_accuracy=history["test_accuracy"][best],
                       selected_test_loss=history["test_loss"][best])
    return summary


def noisy_test_metrics(model: nn.Module, noisy_test: BatchSource, test_labels: torch.Tensor) -> dict[str, float]:
    """Accuracy and cross-entropy on the test images with `noisy_test`'s pixel noise."""
    indices = torch.arange(len(test_labels), device=test_labels.device)
    metrics = classification_metrics(predict_noisy_logits(model, noisy_test, indices), test_labels)
    return {"noisy_test_accuracy": metrics["test_accuracy"], "noisy_test_loss": metrics["test_loss"]}
