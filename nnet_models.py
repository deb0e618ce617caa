"""One training run (data, noise, models, train/evaluate): a `TrainConfig` in, a flat dict of results out.

Batches index uint8 tensors decoded once per process: no per-sample Python, no DataLoader (docs/performance.md)."""
from __future__ import annotations

import contextlib
import gzip
import hashlib
import math
import random
import time
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import nn
from torch.optim.adam import adam
from torch.optim.sgd import sgd

import losses
import registry
from metrics import calibration_bins, classification_metrics, memorisation_metrics
from registry import ACTIVATIONS, MODEL_TYPES, NOISE_TYPES, NUM_CLASSES, OPTIMIZERS, PRECISIONS, TrainConfig

MEMORISATION_SAMPLE = 10_000  # training examples checked for memorisation after each epoch
EVAL_BATCH_SIZE = 256  # docs/performance.md: evaluation batch size
MAX_CONDITION = 1e4  # of T, for forward correction: beyond, its inverse amplifies round-off into the model

IDX_FILES = {"train_images": "train-images-idx3-ubyte.gz", "train_labels": "train-labels-idx1-ubyte.gz",
             "test_images": "t10k-images-idx3-ubyte.gz", "test_labels": "t10k-labels-idx1-ubyte.gz"}
_DATASET_CACHE: dict[tuple[str, str], Dataset] = {}  # load_dataset's, by (dataset, resolved data_dir)


def stream_seed(seed: int, stream: str) -> int:
    """A 63-bit seed for one named random stream of a run: with separate streams, repeat r shares its
    initial weights and batch order across every p and noise type (common random numbers)."""
    digest = hashlib.sha256(f"{seed}/{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def make_generator(seed: int, stream: str, device: torch.device | str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(stream_seed(seed, stream))


def seed_everything(seed: int) -> None:
    """Seed the global generators too, so that no state leaks in from an earlier run in this process."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(stream_seed(seed, "init"))


class DataNotFoundError(FileNotFoundError):
    """The IDX files of a dataset are missing and could not be downloaded."""


class Dataset(NamedTuple):
    """A dataset in memory: images uint8 of shape (N, 1, 28, 28), labels int64."""
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor


def _find_idx_file(directory: Path, filename: str) -> Path | None:
    candidates = (directory / filename, directory / filename.removesuffix(".gz"))
    return next((candidate for candidate in candidates if candidate.is_file()), None)


def torchvision_dir(dataset: str, data_dir: str | Path) -> Path:
    """Where torchvision's layout keeps the dataset's files under data_dir, and where a download puts them."""
    return Path(data_dir).expanduser() / registry.DATASETS[dataset].folder / "raw"


def find_raw_dir(dataset: str, data_dir: str | Path) -> Path | None:
    """The directory holding all four IDX files (gzipped or not), or None."""
    candidates = (torchvision_dir(dataset, data_dir), Path(data_dir).expanduser())
    return next((d for d in candidates if all(_find_idx_file(d, name) for name in IDX_FILES.values())), None)


def ensure_dataset(dataset: str, data_dir: str | Path, download: bool = True) -> Path:
    """The directory of the dataset's IDX files, downloaded if missing and allowed, else DataNotFoundError."""
    raw = torchvision_dir(dataset, data_dir)
    reason = "download not attempted"
    if find_raw_dir(dataset, data_dir) is None and download:
        created = next((d for d in (*reversed(raw.parents), raw) if not d.exists()), None)  # by the download
        try:
            from torchvision import datasets as tv_datasets

            for train in (True, False):
                getattr(tv_datasets, registry.DATASETS[dataset].folder)(str(data_dir), train=train, download=True)
        except Exception as exc:  # not installed, offline, proxy, checksum: all mean "not here"
            reason = f"download failed: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
        if created is not None and find_raw_dir(dataset, data_dir) is None:  # no empty folders left behind
            import shutil
            shutil.rmtree(created, ignore_errors=True)
    found = find_raw_dir(dataset, data_dir)
    if found is None:
        raise DataNotFoundError(f"{dataset} data not found under data_dir={str(data_dir)!r} ({reason}). "
                                f"Put the four files {', '.join(IDX_FILES.values())} into {raw.resolve()}/ "
                                f"or set data_dir to a directory that holds them directly.")
    return found


class DataFileError(ValueError):
    """An IDX file is truncated, corrupt or not the file it should be."""


def read_idx(path: Path) -> np.ndarray:
    """Decode one IDX file (gzipped or plain) into a uint8 array, checking its header and size."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as exc:
        raise DataFileError(f"{path} cannot be decoded ({type(exc).__name__}: {exc}); download it again") from exc
    magic = int.from_bytes(data[0:4], "big")
    offset = 4 + 4 * (magic & 0xFF)  # the low byte is the number of dimensions, each a 4-byte size
    if len(data) < offset or magic >> 8 != 0x08:  # 0x08 = unsigned byte
        raise DataFileError(f"{path} is not an IDX file of unsigned bytes (magic number {magic:#x})")
    shape = tuple(int.from_bytes(data[i : i + 4], "big") for i in range(4, offset, 4))
    if len(data) - offset != np.prod(shape):
        raise DataFileError(f"{path} holds {len(data) - offset} bytes of data but its header announces shape "
                            f"{shape}: the file is truncated or corrupt; download it again")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(shape)


def split_tensors(paths: dict[str, Path], arrays: dict[str, np.ndarray], split: str) -> list[torch.Tensor]:
    """The split as tensors, once checked: N > 0 images of 28 x 28, as many labels, every label a class."""
    images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise DataFileError(f"{paths[f'{split}_images']} holds shape {images.shape}, not N x 28 x 28 images")
    if not len(images):
        raise DataFileError(f"{paths[f'{split}_images']} holds no images; download it again")
    if labels.shape != (len(images),):
        raise DataFileError(f"{paths[f'{split}_labels']} holds shape {labels.shape}, "
                            f"not one label for each of the {len(images)} images")
    if labels.max(initial=0) >= NUM_CLASSES:
        raise DataFileError(f"{paths[f'{split}_labels']} has label {labels.max()}; labels must be 0-{NUM_CLASSES - 1}")
    return [torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))]


def load_dataset(dataset: str, data_dir: str | Path, download: bool = True) -> Dataset:
    """The dataset decoded into tensors and checked, once per process (forked workers share the copy)."""
    key = (dataset, str(Path(data_dir).expanduser().resolve()))
    if key not in _DATASET_CACHE:
        raw_dir = ensure_dataset(dataset, data_dir, download)
        paths = {name: _find_idx_file(raw_dir, f) for name, f in IDX_FILES.items()}
        arrays = {name: read_idx(path) for name, path in paths.items()}
        if (found := identified_dataset(arrays["train_labels"])) not in (None, dataset):
            raise DataFileError(f"{raw_dir} holds {found}, not {dataset}: to train on {found}, name it in datasets; "
                                f"for {dataset}, put its four files into {torchvision_dir(dataset, data_dir)}/ "
                                "(with several datasets, each in its own folder there), or set data_dir to where "
                                "they are")
        _DATASET_CACHE[key] = Dataset(*split_tensors(paths, arrays, "train"), *split_tensors(paths, arrays, "test"))
    return _DATASET_CACHE[key]


def identified_dataset(train_labels: np.ndarray) -> str | None:
    """The registered dataset whose training labels these are, or None (other data)."""
    digest = hashlib.sha256(np.ascontiguousarray(train_labels)).hexdigest()
    return next((name for name, source in registry.DATASETS.items() if source.train_labels_sha256 == digest), None)


def transition_matrix(cfg: TrainConfig, device: torch.device | str = "cpu") -> torch.Tensor:
    """The run's T (float32), T[i, j] = P(noisy label j | true label i): the identity without label noise."""
    return torch.from_numpy(registry.transition_matrix(cfg.noise_type, cfg.p, cfg.noise_matrix)).float().to(device)


def corrupt_labels(labels: torch.Tensor, p: float, relabel: torch.Tensor,
                   generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy labels, and the bool mask of the examples given a new label: exactly round(p*N) of them, each redrawn
    from row y of `relabel` (M). The examples and their draws come in an order that does not depend on p, so a
    smaller p corrupts a subset of the same seed's examples, with the same new labels."""
    n, device = len(labels), labels.device
    order = torch.randperm(n, generator=generator, device=device)
    new_labels = torch.multinomial(relabel.to(device)[labels[order]], 1, replacement=True, generator=generator)
    chosen = order[: round(p * n)]
    noisy = labels.index_put((chosen,), new_labels[: len(chosen), 0])
    return noisy, torch.zeros(n, dtype=torch.bool, device=device).index_fill_(0, chosen, True)


def pixel_intensity_cdf(images_uint8: torch.Tensor) -> torch.Tensor:
    """Cumulative distribution of the 256 grey levels over all pixels of `images_uint8`."""
    counts = torch.bincount(images_uint8.flatten(), minlength=256).double()
    return (counts.cumsum(0) / counts.sum()).float()


def grey_level_quantiles(cdf: torch.Tensor, size: int = 2**16) -> torch.Tensor:
    """For inverse-cdf sampling: entry j is the grey level in [0, 1] at cumulative probability (j + 0.5) / size,
    exact up to 1 / size (docs/performance.md: a table lookup is faster than a search per pixel)."""
    cells = (torch.arange(size, dtype=torch.float64, device=cdf.device) + 0.5) / size
    return torch.searchsorted(cdf.double(), cells, right=True).clamp_(max=255).float() / 255.0


def corrupt_pixels(images: torch.Tensor, p: float, generator: torch.Generator,
                   quantiles: torch.Tensor | None = None, white: float = 1.0) -> torch.Tensor:
    """A copy of float `images`, each pixel replaced with probability p by a draw from U[0, white) or `quantiles`.
    One uniform u per pixel decides both: replaced if u < p, and then u / p is the replacement's U[0, 1)."""
    if p == 0:
        return images.clone()
    u = torch.rand(images.shape, generator=generator, device=images.device)
    replaced = torch.lt(u, p, out=torch.empty_like(u))  # 1.0 or 0.0: a float mask (docs/performance.md)
    if quantiles is None:
        values = u.mul_(white / p)
    else:
        cells = u.mul_(len(quantiles) / p).long().clamp_(max=len(quantiles) - 1)
        values = quantiles[cells].mul_(white)
    return torch.lerp(images, values, replaced, out=values)


def make_activation(name: str) -> nn.Module:
    factories = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid,
                 "leaky_relu": lambda: nn.LeakyReLU(0.1), "gelu": nn.GELU}
    if name not in factories:
        raise ValueError(f"unknown activation {name!r}; allowed: {', '.join(ACTIVATIONS)}")
    return factories[name]()


class MLP(nn.Sequential):
    """784 -> hidden_sizes -> 10, the activation after every hidden layer."""

    def __init__(self, activation: str, hidden_sizes: tuple[int, ...] = (256, 128)):
        widths = [28 * 28, *hidden_sizes]
        layers = [nn.Flatten()]
        for width_in, width_out in zip(widths, widths[1:]):
            layers += [nn.Linear(width_in, width_out), make_activation(activation)]
        super().__init__(*layers, nn.Linear(widths[-1], NUM_CLASSES))


def conv_block(in_channels: int, out_channels: int, activation: str) -> list[nn.Module]:
    """3x3 convolution, activation, 2x2 max-pooling. As max(f(a), f(b)) = f(max(a, b)) for a non-decreasing f,
    pooling first applies f to a quarter of the values (docs/performance.md); gelu keeps the textbook order."""
    conv, act, pool = nn.Conv2d(in_channels, out_channels, 3, padding=1), make_activation(activation), nn.MaxPool2d(2)
    return [conv, act, pool] if activation == "gelu" else [conv, pool, act]


class SimpleCNN(nn.Sequential):
    """Two conv blocks (32 and 64 channels), a 128-unit dense layer, 10 outputs."""

    def __init__(self, activation: str):
        super().__init__(*conv_block(1, 32, activation), *conv_block(32, 64, activation), nn.Flatten(),
                         nn.Linear(64 * 7 * 7, 128), make_activation(activation), nn.Linear(128, NUM_CLASSES))


def build_model(model_type: str, activation: str, hidden_sizes: tuple[int, ...] = (256, 128)) -> nn.Module:
    if model_type == "mlp":
        return MLP(activation, tuple(hidden_sizes))
    if model_type == "cnn":
        return SimpleCNN(activation).to(memory_format=torch.channels_last)  # docs/performance.md
    raise ValueError(f"unknown model_type {model_type!r}; allowed: {', '.join(MODEL_TYPES)}")


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class Optimizer:
    """Adam (fused kernel) or SGD with momentum 0.9: torch.optim's update kernels, called without the slower
    torch.optim.Optimizer class around them (docs/performance.md)."""

    def __init__(self, model: nn.Module, cfg: TrainConfig):
        if cfg.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {cfg.optimizer!r}; allowed: {', '.join(OPTIMIZERS)}")
        self.cfg, self.params = cfg, list(model.parameters())
        if cfg.optimizer == "adam":
            self.exp_avgs, self.exp_avg_sqs = ([torch.zeros_like(p) for p in self.params] for _ in range(2))
            self.steps = [torch.zeros((), device=p.device) for p in self.params]
        else:
            self.momentum_buffers = [None] * len(self.params)  # sgd creates them at the first step

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        grads, cfg = [p.grad for p in self.params], self.cfg
        if cfg.optimizer == "adam":
            adam(self.params, grads, self.exp_avgs, self.exp_avg_sqs, [], self.steps, fused=True, amsgrad=False,
                 beta1=0.9, beta2=0.999, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, eps=1e-8,
                 maximize=False)
        else:
            sgd(self.params, grads, self.momentum_buffers, weight_decay=cfg.weight_decay, momentum=0.9,
                lr=cfg.learning_rate, dampening=0.0, nesterov=False, maximize=False)


def seeded_model(cfg: TrainConfig, device: torch.device) -> tuple[nn.Module, Optimizer, torch.Generator]:
    """The run's model with its seed's initial weights, its optimizer, and the generator of its batch order."""
    seed_everything(cfg.seed)
    model = build_model(cfg.model_type, cfg.activation, cfg.hidden_sizes).to(device)
    return model, Optimizer(model, cfg), make_generator(cfg.seed, "data_order", device)


class BatchSource:
    """Turns indices into batches: gather the uint8 images, add pixel noise, standardize."""

    def __init__(self, cfg: TrainConfig, images_uint8: torch.Tensor, device: torch.device,
                 stream: str = "pixel_noise", cdf: torch.Tensor | None = None):
        self.images, self.p, self.pixel_noise = images_uint8, cfg.p, cfg.draws_pixel_noise
        self.cdf = None
        if NOISE_TYPES[cfg.noise_type].replacement == "empirical":  # the noise looks like these images
            self.cdf = pixel_intensity_cdf(images_uint8) if cdf is None else cdf
        self.quantiles = None if self.cdf is None else grey_level_quantiles(self.cdf)
        self.generator = make_generator(cfg.seed, stream, device)
        source = registry.DATASETS[cfg.dataset]
        self.mean, self.std = (source.mean, source.std) if cfg.normalize else (0.0, 1.0)

    def batch(self, indices: torch.Tensor) -> torch.Tensor:
        grey_levels = self.images.index_select(0, indices).float()
        if self.pixel_noise:
            grey_levels = corrupt_pixels(grey_levels, self.p, self.generator, self.quantiles, white=255.0)
        return grey_levels.mul_(1.0 / (255.0 * self.std)).sub_(self.mean / self.std)


def forward_correction_problem(cfg: TrainConfig) -> str | None:
    """Why forward correction cannot recover this run's clean posterior, or None. With T singular (label_flip at
    p = (K-1)/K, label_uniform at p = 1, label_pairflip at 1/2) or badly conditioned, the noisy labels do not
    identify the clean ones: the run is not trained at all rather than reported as a meaningless model."""
    if cfg.loss == "forward":
        condition = np.linalg.cond(registry.transition_matrix(cfg.noise_type, cfg.p, cfg.noise_matrix))
        if condition > MAX_CONDITION:
            return (f"T of {cfg.noise_type} at p={cfg.p:g} has condition number {condition:.3g} (above "
                    f"{MAX_CONDITION:g}): the clean labels are not identifiable, so forward correction is not run")
    return None


def training_loss(cfg: TrainConfig, run: RunData, device: torch.device) -> tuple:
    """loss(logits, labels) of the run (losses.LOSSES), and what the record keeps of it: for forward_estimated,
    the estimated T and its mean and largest absolute error against the true T."""
    true_transition = transition_matrix(cfg, device)
    if cfg.loss != "forward_estimated":
        return losses.loss_function(cfg.loss, dict(cfg.loss_settings), true_transition), {}
    estimate = estimated_transition(cfg, run, device)
    error = (estimate - true_transition.double()).abs()
    fields = {"estimated_transition": estimate.cpu().tolist(), "transition_error_mean": error.mean().item(),
              "transition_error_max": error.max().item()}
    return losses.loss_function(cfg.loss, dict(cfg.loss_settings), estimate.float()), fields


def estimated_transition(cfg: TrainConfig, run: RunData, device: torch.device) -> torch.Tensor:
    """forward_estimated's first stage: a model trained with cross-entropy for estimate_epochs, whose softmax
    outputs on the training images give T by Patrini's anchor rule (docs/losses.md)."""
    model, optimizer, order_generator = seeded_model(cfg, device)
    for _ in range(first_stage_epochs(cfg)):
        train_one_epoch(model, optimizer, run.source, run.labels, cfg.batch_size, order_generator, run.train_indices,
                        precision=cfg.precision)
    probabilities = torch.softmax(predict(model, run.source, run.train_indices).float(), 1)
    return losses.estimate_transition(probabilities, dict(cfg.loss_settings)["percentile"])


def first_stage_epochs(cfg: TrainConfig) -> int:
    """The epochs forward_estimated trains its first model for, before the run's own training (0 for the others)."""
    return int(dict(cfg.loss_settings)["estimate_epochs"]) if cfg.loss == "forward_estimated" else 0


def training_precision(precision: str, device: torch.device):
    """The context of the training forward passes: under "bfloat16", autocast runs matrix products and
    convolutions (and their gradients) in bfloat16; weights, gradients and optimizer state stay float32."""
    if precision == "float32":
        return contextlib.nullcontext()
    if precision == "bfloat16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    raise ValueError(f"unknown precision {precision!r}; allowed: {', '.join(PRECISIONS)}")


class DivergedError(ArithmeticError):
    """The training loss became NaN or infinite."""

    def __init__(self, step: int, loss: float, epoch: int | None = None):
        super().__init__(step, loss)
        self.step, self.loss, self.epoch = step, loss, epoch

    def __str__(self) -> str:
        of_epoch = f" of epoch {self.epoch}" if self.epoch else ""
        return f"training loss became {self.loss} at step {self.step}{of_epoch}"


def train_one_epoch(model, optimizer, source: BatchSource, labels, batch_size, order_generator,
                    indices: torch.Tensor | None = None, loss_fn=nn.functional.cross_entropy,
                    precision: str = "float32", epoch: int | None = None) -> float:
    """One pass over `indices` (default all) in random order: the mean float32 loss; DivergedError if not finite."""
    model.train()
    n = len(labels) if indices is None else len(indices)
    order = torch.randperm(n, generator=order_generator, device=labels.device)
    if indices is not None:
        order = indices[order]
    total_loss, autocast = 0.0, training_precision(precision, labels.device)
    for start in range(0, n, batch_size):
        batch = order[start : start + batch_size]
        with autocast:
            logits = model(source.batch(batch))
        loss = loss_fn(logits.float(), labels[batch])
        if not math.isfinite(batch_loss := loss.item()):
            raise DivergedError(start // batch_size + 1, batch_loss, epoch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        total_loss += batch_loss * len(batch)
    return total_loss / n


def predict(model: nn.Module, source: BatchSource, indices: torch.Tensor) -> torch.Tensor:
    """Logits for the images `indices` of `source`, in large batches without autograd."""
    model.eval()
    with torch.inference_mode():
        return torch.cat([model(source.batch(indices[i : i + EVAL_BATCH_SIZE]))
                          for i in range(0, len(indices), EVAL_BATCH_SIZE)])


def fits_tiny_subset(cfg: TrainConfig, data: Dataset, n: int = 100, steps: int = 150) -> tuple[float, float]:
    """(training accuracy, final loss) after `steps` full-batch steps on the first n clean
    training examples: a set-up that cannot fit them will not learn the real task either."""
    torch.set_num_threads(max(1, cfg.cpu_threads))
    clean = TrainConfig(dataset=cfg.dataset, normalize=cfg.normalize, seed=cfg.seed)
    source, labels = BatchSource(clean, data.train_images[:n], torch.device("cpu")), data.train_labels[:n]
    model, optimizer, order = seeded_model(cfg, torch.device("cpu"))
    try:
        for _ in range(steps):
            loss = train_one_epoch(model, optimizer, source, labels, n, order)
    except DivergedError as exc:
        return 0.0, exc.loss
    accuracy = (predict(model, source, torch.arange(n)).argmax(1) == labels).double().mean().item()
    return accuracy, loss


class RunData(NamedTuple):
    """The tensors of one run, on its device."""
    source: BatchSource            # noisy training batches
    clean_source: BatchSource      # the same images without noise, for evaluation
    labels: torch.Tensor           # training labels as trained on (noisy for label noise)
    clean_labels: torch.Tensor
    train_indices: torch.Tensor
    validation_indices: torch.Tensor | None
    memorisation_indices: torch.Tensor
    test_source: BatchSource       # clean test images
    test_labels: torch.Tensor


def split_validation(cfg: TrainConfig, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(training indices, held-out validation indices or None): a random split of the run."""
    n_validation = round(cfg.validation_fraction * n)
    if n_validation >= n:
        raise ValueError(f"validation_fraction={cfg.validation_fraction} leaves no training examples out of {n}")
    if n_validation == 0:
        return torch.arange(n, device=device), None
    order = torch.randperm(n, generator=make_generator(cfg.seed, "validation_split", device), device=device)
    return order[n_validation:].sort().values, order[:n_validation].sort().values


def prepare_run(cfg: TrainConfig, data: Dataset, device: torch.device) -> RunData:
    """The run's training images and (noisy) labels, its splits, and the clean test set."""
    limit = min(cfg.max_train_samples or len(data.train_labels), len(data.train_labels))
    images, clean_labels = data.train_images[:limit].to(device), data.train_labels[:limit].to(device)
    labels = clean_labels
    if NOISE_TYPES[cfg.noise_type].kind == "label":
        relabel = torch.from_numpy(registry.relabel_matrix(cfg.noise_type, cfg.noise_matrix))
        labels, _ = corrupt_labels(clean_labels, cfg.p, relabel, make_generator(cfg.seed, "label_noise", device))
    train_indices, validation_indices = split_validation(cfg, limit, device)
    shuffled = torch.randperm(len(train_indices), generator=make_generator(cfg.seed, "memorisation", device),
                              device=device)
    clean = TrainConfig(dataset=cfg.dataset, normalize=cfg.normalize, seed=cfg.seed)
    return RunData(BatchSource(cfg, images, device), BatchSource(clean, images, device), labels, clean_labels,
                   train_indices, validation_indices, train_indices[shuffled[:MEMORISATION_SAMPLE]],
                   BatchSource(clean, data.test_images.to(device), device), data.test_labels.to(device))


def evaluate_epoch(model: nn.Module, cfg: TrainConfig, run: RunData, loss_fn) -> tuple[dict, torch.Tensor]:
    """The metrics recorded after each epoch, and the test logits."""
    test_logits = predict(model, run.test_source, torch.arange(len(run.test_labels), device=run.test_labels.device))
    metrics = classification_metrics(test_logits, run.test_labels)
    if NOISE_TYPES[cfg.noise_type].kind != "pixel":
        sample = run.memorisation_indices
        predictions = predict(model, run.clean_source, sample).argmax(1)
        metrics.update(memorisation_metrics(predictions, run.labels[sample], run.clean_labels[sample]))
    if run.validation_indices is not None:  # the same pixel noise every epoch
        validation = BatchSource(cfg, run.source.images, run.labels.device, "validation_noise", run.source.cdf)
        logits = predict(model, validation, run.validation_indices)
        metrics["validation_loss"] = loss_fn(logits, run.labels[run.validation_indices]).item()
    return metrics, test_logits


def results_at(model: nn.Module, cfg: TrainConfig, run: RunData, history: dict[str, list[float]],
               test_logits: torch.Tensor) -> dict:
    """A run's results after the epochs in `history`: the last value of every metric, the reliability bins, the
    test on equally noisy images and, with a validation loss, the test metrics of the epoch where it was lowest
    (`selected_*`: the test set never chooses)."""
    results = {name: values[-1] for name, values in history.items()}
    if "validation_loss" in history:
        best = int(np.argmin(history["validation_loss"]))
        results.update(selected_epoch=best + 1, selected_test_accuracy=history["test_accuracy"][best],
                       selected_test_loss=history["test_loss"][best])
    noisy = results  # without pixel noise: the clean test
    if cfg.draws_pixel_noise:
        source = BatchSource(cfg, run.test_source.images, run.test_labels.device, "test_noise", run.source.cdf)
        indices = torch.arange(len(run.test_labels), device=run.test_labels.device)
        noisy = classification_metrics(predict(model, source, indices), run.test_labels)
    probabilities = torch.softmax(test_logits.float().cpu(), 1)
    return {**results, "noisy_test_accuracy": noisy["test_accuracy"], "noisy_test_loss": noisy["test_loss"],
            "reliability": calibration_bins(probabilities, run.test_labels.cpu())}


def train_and_evaluate(cfg: TrainConfig, data: Dataset | None = None) -> dict:
    """Train one model on (possibly corrupted) training data and evaluate it on the clean test set: a flat dict of
    every config field, the final metrics, `n_params`, the `history_<metric>` lists, the reliability bins, and
    in `reported` the results after each of `cfg.reported_epochs` (with a constant learning rate, what a
    shorter run of the same seed gives, bit for bit)."""
    started = time.perf_counter()
    torch.set_num_threads(max(1, cfg.cpu_threads))
    torch.set_flush_denormal(True)  # docs/performance.md: subnormal Adam moments
    if cfg.use_cuda and not torch.cuda.is_available():
        raise RuntimeError("use_cuda=True but no CUDA device is available")
    device = torch.device("cuda" if cfg.use_cuda else "cpu")
    run = prepare_run(cfg, data or load_dataset(cfg.dataset, cfg.data_dir), device)
    loss_fn, loss_fields = training_loss(cfg, run, device)
    model, optimizer, order_generator = seeded_model(cfg, device)
    history, reported, train_seconds = defaultdict(list), {}, 0.0
    for epoch in range(1, cfg.epochs + 1):
        epoch_started = time.perf_counter()
        train_loss = train_one_epoch(model, optimizer, run.source, run.labels, cfg.batch_size, order_generator,
                                     run.train_indices, loss_fn, cfg.precision, epoch)
        train_seconds += time.perf_counter() - epoch_started
        metrics, test_logits = evaluate_epoch(model, cfg, run, loss_fn)
        for name, value in {**metrics, "train_loss": train_loss}.items():
            history[name].append(value)
        if epoch in cfg.reported_epochs or epoch == cfg.epochs:
            reported[epoch] = {**results_at(model, cfg, run, history, test_logits), "train_seconds": train_seconds,
                               "seconds": time.perf_counter() - started}
    return {**asdict(cfg), **reported.pop(cfg.epochs), **loss_fields, "n_params": count_parameters(model),
            **{f"history_{name}": values for name, values in history.items()},
            "reported": {str(epoch): results for epoch, results in reported.items()}}
