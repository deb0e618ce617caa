"""What a run can be and what it measures: the run's settings, the noise types and the metrics, each in one
registry. Validation, --help, the CSV columns, the statistics and the figures all derive from these entries.

No torch here: the tables and figures (results_store, plots) need these registries without loading torch."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

NUM_CLASSES = 10
MODEL_TYPES = ("mlp", "cnn")
ACTIVATIONS = ("relu", "tanh", "sigmoid", "leaky_relu", "gelu")
OPTIMIZERS = ("adam", "sgd")
PRECISIONS = ("float32", "bfloat16")
ECE_BINS = 15  # equal-width confidence bins of the calibration error and reliability diagrams
CLEAN = "none"  # the noise type of a run at p = 0: one clean run serves every noise type of a grid


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines one training run."""
    dataset: str = "mnist"
    model_type: str = "mlp"
    activation: str = "relu"
    hidden_sizes: tuple[int, ...] = (256, 128)
    noise_type: str = CLEAN
    p: float = 0.0
    epochs: int = 5                    # the run trains this long ...
    reported_epochs: tuple[int, ...] = ()  # ... and also reports its results after these shorter lengths
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
    loss: str = "ce"                   # losses.LOSSES
    loss_settings: tuple[tuple[str, float], ...] = ()  # the loss's hyper-parameters, (name, value) sorted
    validation_fraction: float = 0.0   # > 0: hold out this much noisy training data to pick the epoch
    precision: str = "float32"         # "bfloat16": mixed-precision training passes (autocast)

    @property
    def draws_pixel_noise(self) -> bool:
        """Whether batches get pixel noise: none at p = 0, so that run is the noiseless one, bit for bit."""
        return NOISE_TYPES[self.noise_type].kind == "pixel" and self.p > 0


# ---------------------------------------------------------------- datasets
@dataclass(frozen=True)
class DataSource:
    """A dataset's four IDX files: torchvision's `folder` name (a download goes to DATA_DIR/folder/raw/), the
    training pixels' `mean` and `std` (normalize), and the sha256 of the decoded training labels, which tells the
    data sets apart (their files have the same names) however they are compressed."""
    folder: str
    mean: float
    std: float
    train_labels_sha256: str


DATASETS = {
    "mnist": DataSource("MNIST", 0.1307, 0.3081, "1feba77c54802fa5339a11837ea4b2866434b83314ec45192930f1df69120c13"),
    "fashion_mnist": DataSource("FashionMNIST", 0.2860, 0.3530,
                                "657fbd221bfc9f4198cc14b5619cc33ec57c58dd0e47af4d99d6650759e869a7"),
}


# ---------------------------------------------------------------- noise types
@dataclass(frozen=True)
class NoiseType:
    """kind "label": a share p of the training labels is redrawn from row y of `relabel` (M; `relabel` None: the
    config's noise_matrix), so T = (1 - p) I + p M. kind "pixel": each pixel is replaced with probability p by
    a draw from `replacement` ("uniform" grey levels, or "empirical": the data set's grey-level distribution)."""
    description: str
    color: str
    kind: str
    relabel: Callable[[int], np.ndarray] | None = None
    replacement: str | None = None


NOISE_TYPES = {
    "label_uniform": NoiseType("a share p of labels redrawn uniformly from all K classes", "tab:blue", "label",
                               relabel=lambda k: np.full((k, k), 1.0 / k)),
    "label_flip": NoiseType("a share p of labels changed to another class, uniformly", "tab:red", "label",
                            relabel=lambda k: (1 - np.eye(k)) / (k - 1)),
    "label_pairflip": NoiseType("a share p of labels changed to the next class, (y + 1) mod K", "tab:purple",
                                "label", relabel=lambda k: np.roll(np.eye(k), 1, axis=1)),
    "label_matrix": NoiseType("a share p of labels redrawn from row y of noise_matrix M", "tab:brown", "label"),
    "pixel_uniform": NoiseType("each pixel replaced with probability p by a uniform grey level", "tab:green",
                               "pixel", replacement="uniform"),
    "pixel_empirical": NoiseType("each pixel replaced with probability p by a grey level drawn from the data set's "
                                 "pixels", "tab:orange", "pixel", replacement="empirical"),
    CLEAN: NoiseType("no noise: the p = 0 run, shared by every noise type", "black", "none"),
}


def noisy_types() -> tuple[str, ...]:
    """What a grid's noise_types may hold."""
    return tuple(name for name in NOISE_TYPES if name != CLEAN)


def of_kind(kind: str) -> tuple[str, ...]:
    return tuple(name for name, noise in NOISE_TYPES.items() if noise.kind == kind)


def check_noise_matrix(matrix, num_classes: int = NUM_CLASSES) -> np.ndarray:
    """The matrix as a float64 array, if it is K x K, non-negative and row-stochastic."""
    try:
        array = np.array(matrix, dtype=np.float64)
    except (TypeError, ValueError, RecursionError) as exc:
        raise ValueError(f"noise_matrix must be a {num_classes}x{num_classes} list of lists of numbers: {exc}")
    if array.shape != (num_classes, num_classes):
        raise ValueError(f"noise_matrix must be {num_classes}x{num_classes}, got shape {array.shape}")
    if not np.isfinite(array).all() or (array < 0).any():
        raise ValueError("noise_matrix has negative or non-finite entries; every T[i, j] must be >= 0")
    row_sums = array.sum(1)
    if not np.allclose(row_sums, 1, atol=1e-6):
        bad = int(np.abs(row_sums - 1).argmax())
        raise ValueError(f"noise_matrix row {bad} sums to {row_sums[bad]:.6g}; every row must sum to 1")
    return array


def relabel_matrix(noise_type: str, noise_matrix=None, k: int = NUM_CLASSES) -> np.ndarray | None:
    """M of a label noise type (None for the other kinds)."""
    noise = NOISE_TYPES[noise_type]
    if noise.kind != "label":
        return None
    return noise.relabel(k) if noise.relabel else check_noise_matrix(noise_matrix, k)


def transition_matrix(noise_type: str, p: float, noise_matrix=None, k: int = NUM_CLASSES) -> np.ndarray:
    """T[i, j] = P(noisy label j | true label i) at level p: (1 - p) I + p M, the identity without label noise."""
    relabel = relabel_matrix(noise_type, noise_matrix, k)
    return np.eye(k) if relabel is None else (1 - p) * np.eye(k) + p * relabel


def information_limit(noise_type: str, noise_matrix=None) -> float | None:
    """The smallest p at which, for some class, the true label is no longer the most likely noisy label:
    1 - p + p M[i, i] = p max_j!=i M[i, j]. None without label noise."""
    relabel = relabel_matrix(noise_type, noise_matrix)
    if relabel is None:
        return None
    off_diagonal = np.where(np.eye(len(relabel), dtype=bool), -np.inf, relabel).max(1)
    with np.errstate(divide="ignore"):  # a class that keeps all its labels never reaches a limit
        return float(min(1.0, (1 / (1 - relabel.diagonal() + off_diagonal)).min()))


def posterior_model_loss(noise_type: str, p, noise_matrix=None):
    """Clean-test cross-entropy of a model that predicts the noisy-label posterior T[y] of each example's true
    class y (balanced classes): the mean over classes of -log T[y, y]."""
    relabel = relabel_matrix(noise_type, noise_matrix)
    p = np.asarray(p, dtype=float)
    return -np.log(1 - p[..., None] + p[..., None] * relabel.diagonal()).mean(-1)


# ---------------------------------------------------------------- metrics
@dataclass(frozen=True)
class Metric:
    """A result column. `bounded`: a fraction in [0, 1] (intervals clipped, axes from 0 to 1); `per_epoch`: also
    recorded after every epoch (results_history.csv); `compute(probs, labels)`: a metric of the clean test set's
    softmax outputs (numpy), evaluated wherever the training loop evaluates (None: the loop records it itself)."""
    label: str
    bounded: bool = True
    per_epoch: bool = False
    compute: Callable[[np.ndarray, np.ndarray], float] | None = field(default=None, compare=False)


METRICS = {
    "test_accuracy": Metric("test accuracy", per_epoch=True),
    "test_loss": Metric("test cross-entropy (nats)", bounded=False, per_epoch=True),
    "test_macro_precision": Metric("macro precision", per_epoch=True),
    "test_macro_recall": Metric("macro recall", per_epoch=True),
    "test_macro_roc_auc": Metric("macro ROC-AUC", per_epoch=True),
    "test_ece": Metric("test ECE", per_epoch=True),
    "test_mean_confidence": Metric("mean confidence", per_epoch=True),
    "memorised_fraction": Metric("corrupted: predicts noisy label", per_epoch=True),
    "corrupted_true_fraction": Metric("corrupted: predicts true label", per_epoch=True),
    "clean_train_accuracy": Metric("uncorrupted: train accuracy", per_epoch=True),
    "validation_loss": Metric("noisy-validation loss", bounded=False, per_epoch=True),
    "train_loss": Metric("training loss", bounded=False, per_epoch=True),
    "selected_epoch": Metric("selected epoch", bounded=False),
    "selected_test_accuracy": Metric("test accuracy at the selected epoch"),
    "selected_test_loss": Metric("test cross-entropy at the selected epoch", bounded=False),
    "noisy_test_accuracy": Metric("accuracy on equally noisy test images"),
    "noisy_test_loss": Metric("cross-entropy on equally noisy test images", bounded=False),
    "transition_error_mean": Metric("estimated T: mean absolute error"),
    "transition_error_max": Metric("estimated T: largest absolute error"),
    "seconds": Metric("seconds", bounded=False),
    "train_seconds": Metric("training seconds", bounded=False),
}


def per_epoch_metrics() -> list[str]:
    return [name for name, metric in METRICS.items() if metric.per_epoch]


def unbounded_metrics() -> set[str]:
    return {name for name, metric in METRICS.items() if not metric.bounded}
