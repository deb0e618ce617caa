"""Noise: label noise of every type, noise and transition matrices, pixel noise, grey-level
sampling, the noise of training batches, and the named random streams.

All draws come from seeded generators, so these tests are deterministic; the statistical
tolerances are still several standard deviations wide so that another seed would pass too.
"""
import math

import numpy as np
import pytest
import torch
from scipy import stats

import nnet_models as nm
import registry
from nnet_models import corrupt_pixels, grey_level_quantiles, make_generator, pixel_intensity_cdf

K = registry.NUM_CLASSES
CPU = torch.device("cpu")
LABEL_TYPES = registry.of_kind("label")


def gen(seed: int = 0, stream: str = "test") -> torch.Generator:
    return make_generator(seed, stream)


def random_labels(n: int, seed: int = 123) -> torch.Tensor:
    return torch.randint(0, K, (n,), generator=gen(seed, "true_labels"))


def as_tuples(matrix) -> tuple[tuple[float, ...], ...]:
    return tuple(tuple(float(x) for x in row) for row in matrix)


def corrupt_labels(labels, p, noise_type, generator, noise_matrix=None):
    """nm.corrupt_labels with the noise type's M, as a run draws it (noise_matrix: label_matrix's M)."""
    relabel = torch.from_numpy(registry.relabel_matrix(noise_type, noise_matrix))
    return nm.corrupt_labels(labels, p, relabel, generator)


IDENTITY = [[1.0 if i == j else 0.0 for j in range(K)] for i in range(K)]
UNIFORM = [[1.0 / K] * K for _ in range(K)]
FLIP = [[0.0 if i == j else 1.0 / (K - 1) for j in range(K)] for i in range(K)]
NEXT = [[1.0 if j == (i + 1) % K else 0.0 for j in range(K)] for i in range(K)]  # k -> k+1 mod K
# half the mass stays, half goes to the next class
HALF_NEXT = [[0.5 if j in (i, (i + 1) % K) else 0.0 for j in range(K)] for i in range(K)]
# each named type's own noise matrix: with it, label_matrix has the same T as the type
NOISE_MATRIX_OF = {"label_uniform": UNIFORM, "label_flip": FLIP, "label_pairflip": NEXT}


@pytest.fixture(scope="module")
def mnist_train_images(mnist) -> torch.Tensor:
    return mnist.train_images


@pytest.fixture(scope="module")
def mnist_cdf(mnist_train_images) -> torch.Tensor:
    return pixel_intensity_cdf(mnist_train_images)


def confusion(true: torch.Tensor, noisy: torch.Tensor) -> np.ndarray:
    """Counts of (true label, noisy label)."""
    return torch.bincount(true * K + noisy, minlength=K * K).view(K, K).numpy().astype(np.float64)


def assert_rows_match(table: np.ndarray, expected: np.ndarray, sigmas: float = 6.0) -> None:
    """Each row of `table` (counts) normalised matches the row of `expected` within `sigmas`
    binomial standard deviations per cell; cells of probability 0 are exactly empty."""
    n_row = table.sum(1, keepdims=True)
    freq = table / n_row
    sd = np.sqrt(expected * (1 - expected) / n_row)
    assert np.all(table[expected == 0] == 0)
    assert np.all(np.abs(freq - expected) <= sigmas * sd + 1e-12), np.abs(freq - expected).max()


# ================================================================ label noise: counts and masks


def test_the_label_noise_types_are_the_registry_entries_of_kind_label():
    assert LABEL_TYPES == ("label_uniform", "label_flip", "label_pairflip", "label_matrix")
    assert registry.of_kind("pixel") == ("pixel_uniform", "pixel_empirical")
    assert registry.of_kind("none") == (registry.CLEAN,) and registry.CLEAN not in registry.noisy_types()


@pytest.mark.parametrize("noise_type", LABEL_TYPES)
@pytest.mark.parametrize("n", [1000, 997, 7])
@pytest.mark.parametrize("p", [0.0, 0.1, 0.25, 0.333, 0.5, 0.9, 1.0])
def test_exactly_round_pN_examples_are_redrawn(noise_type, n, p):
    """Every label noise type, label_matrix too, redraws exactly round(pN) labels from rows of its M."""
    labels = random_labels(n)
    noisy, mask = corrupt_labels(labels, p, noise_type, gen(), noise_matrix=HALF_NEXT)
    assert mask.dtype == torch.bool and mask.shape == (n,)
    assert int(mask.sum()) == round(p * n)
    assert noisy.shape == labels.shape and noisy.dtype == labels.dtype
    assert torch.equal(noisy[~mask], labels[~mask])  # outside the mask nothing changes
    assert int(noisy.min()) >= 0 and int(noisy.max()) < K


def test_non_integer_pN_uses_round():
    # 997 * 0.25 = 249.25 -> 249 ; 997 * 0.333 = 331.999 -> 332
    labels = random_labels(997)
    assert int(corrupt_labels(labels, 0.25, "label_uniform", gen())[1].sum()) == 249
    assert int(corrupt_labels(labels, 0.333, "label_flip", gen())[1].sum()) == 332
    assert int(corrupt_labels(labels, 0.333, "label_matrix", gen(), noise_matrix=HALF_NEXT)[1].sum()) == 332


@pytest.mark.parametrize("noise_type", LABEL_TYPES)
def test_p_zero_returns_labels_unchanged_and_input_is_not_modified(noise_type):
    labels = random_labels(500)
    original = labels.clone()
    noisy, mask = corrupt_labels(labels, 0.0, noise_type, gen(), noise_matrix=HALF_NEXT)
    assert torch.equal(noisy, original)
    assert not mask.any()
    noisy, _ = corrupt_labels(labels, 1.0, noise_type, gen(), noise_matrix=HALF_NEXT)
    assert torch.equal(labels, original), "corrupt_labels must not modify its input in place"
    assert noisy.data_ptr() != labels.data_ptr()


def test_label_flip_never_keeps_the_true_label():
    labels = random_labels(20_000)
    for p in (0.1, 0.5, 1.0):
        noisy, mask = corrupt_labels(labels, p, "label_flip", gen(1))
        assert (noisy[mask] != labels[mask]).all()


def test_label_uniform_keeps_true_label_about_one_in_k():
    n, p = 100_000, 0.5
    labels = random_labels(n)
    noisy, mask = corrupt_labels(labels, p, "label_uniform", gen(2))
    kept = (noisy[mask] == labels[mask]).double().mean().item()
    sd = np.sqrt((1 / K) * (1 - 1 / K) / mask.sum().item())  # ~0.0013
    assert abs(kept - 1 / K) < 7 * sd


def test_label_uniform_new_labels_are_uniform_over_classes():
    # skewed true labels: the new labels must still be uniform
    labels = torch.zeros(60_000, dtype=torch.long)
    labels[:10_000] = 3
    noisy, mask = corrupt_labels(labels, 0.8, "label_uniform", gen(3))
    counts = torch.bincount(noisy[mask], minlength=K).numpy()
    assert stats.chisquare(counts).pvalue > 1e-4
    freq = counts / counts.sum()
    assert np.abs(freq - 1 / K).max() < 0.01  # sd ~0.0014


def test_label_flip_targets_uniform_over_the_other_classes():
    labels = random_labels(100_000)
    noisy, mask = corrupt_labels(labels, 0.6, "label_flip", gen(4))
    table = confusion(labels[mask], noisy[mask])
    assert np.all(np.diag(table) == 0)
    for i in range(K):
        others = np.delete(table[i], i)  # K-1 cells, each ~ 1/(K-1) of the row
        assert stats.chisquare(others).pvalue > 1e-4, f"row {i}: {others}"
        freq = others / others.sum()
        assert np.abs(freq - 1 / (K - 1)).max() < 0.035  # sd ~0.0077


def test_label_flip_at_p_K_minus_1_over_K_makes_labels_uninformative():
    labels = random_labels(100_000)
    noisy, _ = corrupt_labels(labels, (K - 1) / K, "label_flip", gen(5))
    table = confusion(labels, noisy)
    rows = table / table.sum(1, keepdims=True)
    # every row of true -> noisy ~ uniform 1/K (each cell ~1000 counts, sd of freq ~0.003)
    assert np.abs(rows - 1 / K).max() < 0.02
    assert stats.chi2_contingency(table).pvalue > 1e-4  # independence not rejected
    # the check has power: at p = 0.5 the labels clearly still carry information
    table_half = confusion(labels, corrupt_labels(labels, 0.5, "label_flip", gen(5))[0])
    assert stats.chi2_contingency(table_half).pvalue < 1e-12


@pytest.mark.parametrize("noise_type", LABEL_TYPES)
def test_corrupted_sets_are_nested_in_p(noise_type):
    labels = random_labels(5_000)
    ps = [0.0, 0.05, 0.2, 0.3, 0.6, 0.9, 1.0]
    results = [corrupt_labels(labels, p, noise_type, gen(6), noise_matrix=HALF_NEXT) for p in ps]
    for (noisy_a, mask_a), (noisy_b, mask_b) in zip(results, results[1:]):
        assert not (mask_a & ~mask_b).any(), "smaller-p corrupted set must be a subset"
        # the draws do not depend on p: a shared corrupted example gets the same new label
        assert torch.equal(noisy_a[mask_a], noisy_b[mask_a])


def test_same_generator_seed_reproduces_label_noise_and_different_seed_does_not():
    labels = random_labels(2_000)
    a = corrupt_labels(labels, 0.4, "label_uniform", gen(7))
    b = corrupt_labels(labels, 0.4, "label_uniform", gen(7))
    c = corrupt_labels(labels, 0.4, "label_uniform", gen(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


def test_relabel_matrix_of_each_kind():
    assert registry.relabel_matrix("pixel_uniform") is None and registry.relabel_matrix(registry.CLEAN) is None
    np.testing.assert_array_equal(registry.relabel_matrix("label_flip"), FLIP)
    np.testing.assert_array_equal(registry.relabel_matrix("label_matrix", HALF_NEXT), HALF_NEXT)
    with pytest.raises(KeyError, match="label_gaussian"):
        registry.relabel_matrix("label_gaussian")


# ================================================================ pair flip


@pytest.mark.parametrize("n", [10_000, 997, 7])
@pytest.mark.parametrize("p", [0.0, 0.1, 0.333, 0.45, 0.5, 1.0])
def test_pairflip_changes_exactly_round_pN_labels_each_to_the_next_class(n, p):
    labels = random_labels(n)
    original = labels.clone()
    noisy, mask = corrupt_labels(labels, p, "label_pairflip", gen(27))
    assert torch.equal(labels, original)
    assert int(mask.sum()) == round(p * n)
    assert torch.equal(mask, noisy != labels)  # every chosen label really changes
    assert torch.equal(noisy[mask], (labels[mask] + 1) % K)
    assert torch.equal(noisy[~mask], labels[~mask])


N_LABELS = 200_000


def test_pairflip_picks_examples_regardless_of_class():
    labels = random_labels(N_LABELS)
    noisy, mask = corrupt_labels(labels, 0.45, "label_pairflip", gen(28))
    # the fraction flipped is ~p in every class (hypergeometric: sd <= sqrt(.25 / 20000) = 0.0035)
    for k in range(K):
        assert abs(mask[labels == k].double().mean().item() - 0.45) < 0.025, k
    assert ((noisy == 0) & (labels == 9)).sum() == mask[labels == 9].sum()  # 9 wraps to 0


# ================================================================ check_noise_matrix


def test_check_noise_matrix_accepts_row_stochastic_matrices():
    for matrix in (IDENTITY, UNIFORM, FLIP, NEXT, HALF_NEXT, as_tuples(HALF_NEXT)):
        checked = registry.check_noise_matrix(matrix)
        assert checked.dtype == np.float64 and checked.shape == (K, K)
        assert np.array_equal(checked, np.array(matrix, dtype=np.float64))
    # rounding in the last digits of a row sum is fine
    almost = [row[:] for row in UNIFORM]
    almost[0][0] += 1e-9
    registry.check_noise_matrix(almost)
    # another number of classes
    assert registry.check_noise_matrix([[0.5, 0.5], [0.0, 1.0]], num_classes=2).shape == (2, 2)


@pytest.mark.parametrize("matrix, words", [
    ([[1.0 / 9] * 9 for _ in range(9)], ["10x10", "(9, 9)"]),
    ([[0.1] * 10 for _ in range(9)], ["10x10", "(9, 10)"]),
    ([[1.0 / 11] * 11 for _ in range(10)], ["10x10", "(10, 11)"]),
    ([0.1] * 10, ["10x10", "(10,)"]),
    ([[1.0] + [0.0] * 9] * 9 + [[1.0]], ["10x10", "list of lists of numbers"]),  # ragged
    ([["a"] * 10] * 10, ["10x10", "numbers"]),
    (None, ["10x10", "()"]),
])
def test_check_noise_matrix_rejects_wrong_shapes(matrix, words):
    with pytest.raises(ValueError) as info:
        registry.check_noise_matrix(matrix)
    for word in words:
        assert word in str(info.value), str(info.value)


def test_check_noise_matrix_rejects_negative_entries():
    matrix = [row[:] for row in IDENTITY]
    matrix[4][4], matrix[4][5] = 1.25, -0.25  # the row still sums to 1
    with pytest.raises(ValueError, match="negative"):
        registry.check_noise_matrix(matrix)


@pytest.mark.parametrize("row, total", [(3, "0.9"), (7, "1.1"), (0, "0")])
def test_check_noise_matrix_rejects_rows_not_summing_to_one(row, total):
    matrix = [r[:] for r in IDENTITY]
    matrix[row][row] = float(total)
    with pytest.raises(ValueError) as info:
        registry.check_noise_matrix(matrix)
    message = str(info.value)
    assert f"row {row}" in message and f"sums to {total}" in message and "sum to 1" in message


def test_label_matrix_needs_a_valid_matrix_when_used():
    labels = random_labels(100)
    with pytest.raises(ValueError, match="10x10"):
        corrupt_labels(labels, 0.5, "label_matrix", gen())  # no matrix at all
    with pytest.raises(ValueError, match="negative"):
        corrupt_labels(labels, 0.5, "label_matrix", gen(), noise_matrix=[[2.0, -1.0] + [0.0] * 8] + IDENTITY[1:])
    with pytest.raises(ValueError, match="10x10"):
        registry.transition_matrix("label_matrix", 0.3, None)
    with pytest.raises(ValueError, match="10x10"):
        nm.transition_matrix(registry.TrainConfig(noise_type="label_matrix", p=0.3))


# ================================================================ transition matrices


@pytest.mark.parametrize("p", [0.0, 0.3, 0.45, 1.0])
def test_transition_matrix_of_each_type(p):
    eye = np.eye(K)
    expected = {
        "label_uniform": (1 - p) * eye + p / K,
        "label_flip": (1 - p) * eye + p * (1 - eye) / (K - 1),
        "label_pairflip": (1 - p) * eye + p * np.roll(eye, 1, axis=1),
        "label_matrix": (1 - p) * eye + p * np.array(HALF_NEXT),
        "pixel_uniform": eye,
        "pixel_empirical": eye,
        "none": eye,
    }
    assert set(expected) == set(registry.NOISE_TYPES)  # every type is checked by hand
    for noise_type, want in expected.items():
        got = registry.transition_matrix(noise_type, p, HALF_NEXT)
        assert got.dtype == np.float64 and got.shape == (K, K)
        np.testing.assert_allclose(got, want, atol=1e-12, err_msg=noise_type)
        np.testing.assert_allclose(got.sum(1), 1.0, atol=1e-12)
        # a run's T: the same matrix, as float32 for the loss
        cfg = registry.TrainConfig(noise_type=noise_type, p=p, noise_matrix=as_tuples(HALF_NEXT))
        assert nm.transition_matrix(cfg).dtype == torch.float32
        np.testing.assert_allclose(nm.transition_matrix(cfg).numpy(), want, atol=1e-7, err_msg=noise_type)
    assert registry.transition_matrix("label_pairflip", 1.0)[9, 0] == 1.0  # k -> k+1 mod K, 9 -> 0
    # a type expressed through its own matrix M is label_matrix with that M
    for noise_type, matrix in NOISE_MATRIX_OF.items():
        np.testing.assert_allclose(registry.transition_matrix(noise_type, p),
                                   registry.transition_matrix("label_matrix", p, matrix), atol=1e-12)


@pytest.mark.parametrize("noise_type, p", [("label_uniform", 0.6), ("label_flip", 0.6), ("label_pairflip", 0.3),
                                           ("label_uniform", 1.0), ("label_flip", 0.9)])
def test_label_noise_types_have_the_statistics_of_their_transition_matrix(noise_type, p):
    labels = random_labels(N_LABELS)
    expected = registry.transition_matrix(noise_type, p)
    exact, _ = corrupt_labels(labels, p, noise_type, gen(21))
    as_matrix, _ = corrupt_labels(labels, p, "label_matrix", gen(22), noise_matrix=NOISE_MATRIX_OF[noise_type])
    exact_table, matrix_table = confusion(labels, exact), confusion(labels, as_matrix)
    assert_rows_match(exact_table, expected)
    assert_rows_match(matrix_table, expected)
    # and directly against each other: the difference of two frequencies has twice the variance
    n_row = exact_table.sum(1, keepdims=True)
    sd = np.sqrt(2 * expected * (1 - expected) / n_row)
    assert np.all(np.abs(exact_table / n_row - matrix_table / n_row) <= 6 * sd + 1e-12)


def test_the_transition_statistics_check_has_power():
    """The comparison above tells label_uniform from label_flip at the same p (diagonal 0.46 vs 0.4)."""
    labels = random_labels(N_LABELS)
    flipped, _ = corrupt_labels(labels, 0.6, "label_flip", gen(21))
    with pytest.raises(AssertionError):
        assert_rows_match(confusion(labels, flipped), registry.transition_matrix("label_uniform", 0.6))


def test_label_matrix_with_an_asymmetric_matrix():
    labels = random_labels(N_LABELS)
    p = 0.6
    noisy, mask = corrupt_labels(labels, p, "label_matrix", gen(23), noise_matrix=HALF_NEXT)
    assert noisy.dtype == labels.dtype and noisy.shape == labels.shape
    assert_rows_match(confusion(labels, noisy), registry.transition_matrix("label_matrix", p, HALF_NEXT))
    # exactly round(pN) redrawn (the mask), each from M[y]: half of them keep their label, half go to y + 1
    changed = noisy != labels
    assert int(mask.sum()) == round(p * N_LABELS) and not (changed & ~mask).any()
    redrawn = int(mask.sum())
    assert abs(int(changed.sum()) - redrawn / 2) < 6 * math.sqrt(redrawn / 4)
    assert torch.equal(noisy[changed], (labels[changed] + 1) % K)  # only k -> k+1 has mass off the diagonal


def test_label_matrix_extremes_are_exact():
    labels = random_labels(5_000)
    noisy, mask = corrupt_labels(labels, 0.0, "label_matrix", gen(24), noise_matrix=HALF_NEXT)
    assert torch.equal(noisy, labels) and not mask.any()
    for p in (1.0, 0.7):  # M = I: labels redrawn, each to itself
        noisy, mask = corrupt_labels(labels, p, "label_matrix", gen(24), noise_matrix=IDENTITY)
        assert torch.equal(noisy, labels) and int(mask.sum()) == round(p * 5_000)
    noisy, mask = corrupt_labels(labels, 1.0, "label_matrix", gen(24), noise_matrix=NEXT)
    assert torch.equal(noisy, (labels + 1) % K) and mask.all()
    # reproducible from the generator's seed, different for another seed
    a, _ = corrupt_labels(labels, 0.5, "label_matrix", gen(25), noise_matrix=UNIFORM)
    b, _ = corrupt_labels(labels, 0.5, "label_matrix", gen(25), noise_matrix=UNIFORM)
    c, _ = corrupt_labels(labels, 0.5, "label_matrix", gen(26), noise_matrix=UNIFORM)
    assert torch.equal(a, b) and not torch.equal(a, c)


# ================================================================ grey-level distribution


def test_pixel_intensity_cdf_small_exact():
    images = torch.tensor([0, 0, 0, 255, 128, 128, 1, 0], dtype=torch.uint8).view(2, 1, 2, 2)
    cdf = pixel_intensity_cdf(images)
    assert cdf.shape == (256,)
    expected = np.zeros(256)
    expected[0:] += 4 / 8
    expected[1:] += 1 / 8
    expected[128:] += 2 / 8
    expected[255:] += 1 / 8
    np.testing.assert_allclose(cdf.numpy(), expected, atol=1e-7)


def test_pixel_intensity_cdf_of_mnist_is_a_cdf(mnist_cdf):
    cdf = mnist_cdf
    assert cdf.shape == (256,)
    assert torch.all(cdf[1:] >= cdf[:-1])
    assert abs(cdf[-1].item() - 1.0) < 1e-6
    assert 0.75 < cdf[0].item() < 0.85  # ~81% of MNIST pixels are black


def test_grey_level_quantiles_by_hand():
    # 1/4 of the pixels at level 10, 3/4 at level 200; cells at (j + 0.5) / 8
    cdf = pixel_intensity_cdf(torch.tensor([10, 200, 200, 200], dtype=torch.uint8))
    table = grey_level_quantiles(cdf, size=8)
    assert table.dtype == torch.float32
    assert torch.equal(table, torch.tensor([10, 10, 200, 200, 200, 200, 200, 200]) / 255.0)
    # a level of probability 0 is never in the table, whatever the size
    assert set((grey_level_quantiles(cdf) * 255).round().long().unique().tolist()) == {10, 200}
    # a cdf that ends just below 1 (rounding) still maps its last cells to white, not past it
    short = torch.linspace(0, 0.9999, 256)
    assert grey_level_quantiles(short, size=100_000).max().item() == 1.0


def test_grey_level_quantiles_of_mnist_draw_each_level_with_its_probability(mnist_cdf):
    """The table's own distribution: at every level its cdf is within one cell (1 / size) of
    the data's."""
    cdf = mnist_cdf.double()
    for size in (2**16, 1000):
        levels = (grey_level_quantiles(cdf.float(), size) * 255).round().long()
        assert len(levels) == size
        assert torch.all(levels[1:] >= levels[:-1])  # a quantile function is non-decreasing
        table_cdf = torch.bincount(levels, minlength=256).double().cumsum(0) / size
        assert (table_cdf - cdf).abs().max().item() <= 1 / size + 1e-6


# ================================================================ pixel noise


def sentinel_images(n: int = 100) -> torch.Tensor:
    # -1 is a value no replacement (U[0, 1) or a grey level k/255) can produce
    return torch.full((n, 1, 28, 28), -1.0)


def quantiles_of(kind: str, cdf: torch.Tensor) -> torch.Tensor | None:
    return grey_level_quantiles(cdf) if kind == "empirical" else None


@pytest.mark.parametrize("p", [0.05, 0.3, 0.7])
@pytest.mark.parametrize("kind", ["uniform", "empirical"])
def test_fraction_of_replaced_pixels_is_p(p, kind, mnist_cdf):
    images = sentinel_images(200)  # 156,800 pixels
    out = corrupt_pixels(images, p, gen(10), quantiles_of(kind, mnist_cdf))
    replaced = (out != -1.0).double().mean().item()
    sd = np.sqrt(p * (1 - p) / images.numel())  # <= 0.0013
    assert abs(replaced - p) < 7 * sd
    assert torch.equal(images, sentinel_images(200)), "input must not be modified in place"


@pytest.mark.parametrize("kind", ["uniform", "empirical"])
def test_p_zero_leaves_images_unchanged_and_p_one_replaces_all(kind, mnist_train_images, mnist_cdf):
    quantiles = quantiles_of(kind, mnist_cdf)
    images = mnist_train_images[:50].float() / 255
    unchanged = corrupt_pixels(images, 0.0, gen(11), quantiles)
    assert torch.equal(unchanged, images) and unchanged.data_ptr() != images.data_ptr()  # a copy
    assert (corrupt_pixels(sentinel_images(20), 1.0, gen(11), quantiles) != -1.0).all()


@pytest.mark.parametrize("kind", ["uniform", "empirical"])
def test_fresh_noise_on_every_call(kind, mnist_cdf):
    quantiles = quantiles_of(kind, mnist_cdf)
    g = gen(12)
    first = corrupt_pixels(sentinel_images(10), 0.3, g, quantiles)
    second = corrupt_pixels(sentinel_images(10), 0.3, g, quantiles)
    assert not torch.equal(first != -1.0, second != -1.0)
    # ...yet the same seed reproduces the same sequence
    g2 = gen(12)
    assert torch.equal(corrupt_pixels(sentinel_images(10), 0.3, g2, quantiles), first)
    assert torch.equal(corrupt_pixels(sentinel_images(10), 0.3, g2, quantiles), second)


@pytest.mark.parametrize("kind", ["uniform", "empirical"])
def test_values_stay_in_unit_interval(kind, mnist_train_images, mnist_cdf):
    images = mnist_train_images[:200].float() / 255
    out = corrupt_pixels(images, 0.5, gen(13), quantiles_of(kind, mnist_cdf))
    assert out.dtype == torch.float32 and out.shape == images.shape
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert not torch.equal(out, images)


@pytest.mark.parametrize("kind", ["uniform", "empirical"])
def test_replaced_pixels_are_nested_in_p(kind, mnist_cdf):
    """One uniform per pixel decides whether it is replaced (u < p): for one generator seed the
    pixels replaced at a smaller p are among those replaced at a larger p."""
    quantiles = quantiles_of(kind, mnist_cdf)
    masks = [corrupt_pixels(sentinel_images(20), p, gen(20), quantiles) != -1.0 for p in (0.1, 0.3, 0.6, 1.0)]
    for smaller, larger in zip(masks, masks[1:]):
        assert not (smaller & ~larger).any() and smaller.sum() < larger.sum()


@pytest.mark.parametrize("kind", ["uniform", "empirical"])
def test_white_sets_the_scale_of_the_replacements(kind, mnist_train_images, mnist_cdf):
    """Training batches are noised on the grey-level scale (white = 255): the same draws as on
    [0, 1] images, scaled."""
    quantiles = quantiles_of(kind, mnist_cdf)
    grey_levels = mnist_train_images[:64].float()
    on_unit = corrupt_pixels(grey_levels / 255, 0.4, gen(19), quantiles)
    on_grey_levels = corrupt_pixels(grey_levels, 0.4, gen(19), quantiles, white=255.0)
    assert torch.allclose(on_grey_levels, on_unit * 255, rtol=1e-5, atol=1e-3)
    assert float(on_grey_levels.max()) <= 255.0 and float(on_grey_levels.max()) > 1.0


@pytest.mark.parametrize("p", [0.05, 0.5])
def test_uniform_replacement_values_are_uniform(p):
    out = corrupt_pixels(sentinel_images(400), p, gen(14))
    values = out[out != -1.0].double().numpy()  # ~15,700 at p = 0.05, ~157,000 at p = 0.5
    sd_mean = np.sqrt(1 / 12 / len(values))  # <= 0.0023
    assert abs(values.mean() - 0.5) < 6 * sd_mean
    assert abs(values.var() - 1 / 12) < 0.005
    assert stats.kstest(values, "uniform").pvalue > 1e-4
    assert float(values.min()) >= 0.0 and float(values.max()) <= 1.0


def test_uniform_replacement_values_do_not_depend_on_the_image():
    """Replacements are U[0, 1) whatever the pixel held: dark and bright pixels get the same values."""
    images = torch.zeros(400, 1, 28, 28)
    images[:, :, :, 14:] = 1.0  # right half white
    out = corrupt_pixels(images, 0.5, gen(30))
    replaced = out != images  # a replacement equal to the pixel is impossible for 0 and has prob 0 for 1
    left, right = out[..., :14][replaced[..., :14]], out[..., 14:][replaced[..., 14:]]
    assert abs(left.numel() / right.numel() - 1) < 0.02
    assert stats.ks_2samp(left.double().numpy(), right.double().numpy()).pvalue > 1e-4


def test_empirical_replacement_values_follow_the_data_histogram(mnist_train_images, mnist_cdf):
    cdf = mnist_cdf
    out = corrupt_pixels(sentinel_images(300), 0.8, gen(15), grey_level_quantiles(cdf))
    values = out[out != -1.0]  # ~188,000 values
    n = values.numel()
    levels = torch.round(values * 255).long()
    assert torch.equal(levels.float() / 255, values)  # replacements are exact grey levels k/255

    data_counts = torch.bincount(mnist_train_images.flatten(), minlength=256).double().numpy()
    data_freq = data_counts / data_counts.sum()
    sample_counts = torch.bincount(levels, minlength=256).double().numpy()

    # the most important bin: ~81% of MNIST pixels are 0
    zero_frac = sample_counts[0] / n
    assert 0.75 < data_freq[0] < 0.85
    assert abs(zero_frac - data_freq[0]) < 7 * np.sqrt(data_freq[0] * (1 - data_freq[0]) / n)
    assert zero_frac > 0.5  # far from U[0, 1], whose zero fraction would be ~1/256
    assert sample_counts[data_counts == 0].sum() == 0  # levels absent from the data are never drawn

    # KS on the discrete cdf (conservative for discrete data): alpha ~1e-6 critical value
    sample_cdf = np.cumsum(sample_counts) / n
    assert np.abs(sample_cdf - cdf.double().numpy()).max() < 2.7 / np.sqrt(n)

    # chi-square on coarse bins (every expected count large)
    edges = [0, 1, 64, 128, 192, 253, 256]
    obs = np.array([sample_counts[a:b].sum() for a, b in zip(edges, edges[1:])])
    exp = np.array([data_freq[a:b].sum() for a, b in zip(edges, edges[1:])]) * n
    assert stats.chisquare(obs, exp * obs.sum() / exp.sum()).pvalue > 1e-4


def sample_from_cdf(cdf, shape, generator):
    """Grey levels drawn from `cdf`: corrupt_pixels at p = 1 replaces every pixel."""
    return corrupt_pixels(torch.full(shape, -1.0), 1.0, generator, grey_level_quantiles(cdf))


def test_sample_from_cdf_degenerate_and_two_point_distributions():
    shape = torch.Size((4000,))
    all_black = pixel_intensity_cdf(torch.zeros(10, dtype=torch.uint8))
    assert torch.equal(sample_from_cdf(all_black, shape, gen(16)), torch.zeros(shape))
    all_white = pixel_intensity_cdf(torch.full((10,), 255, dtype=torch.uint8))
    assert torch.equal(sample_from_cdf(all_white, shape, gen(16)), torch.ones(shape))
    only_100 = pixel_intensity_cdf(torch.full((10,), 100, dtype=torch.uint8))
    assert torch.equal(sample_from_cdf(only_100, shape, gen(16)), torch.full(shape, 100 / 255))

    # 1/4 at level 10, 3/4 at level 200
    two_point = pixel_intensity_cdf(torch.tensor([10, 200, 200, 200], dtype=torch.uint8))
    values = sample_from_cdf(two_point, torch.Size((40_000,)), gen(17))
    assert set(torch.round(values * 255).long().unique().tolist()) == {10, 200}
    frac_10 = (values == 10 / 255).double().mean().item()
    assert abs(frac_10 - 0.25) < 0.015  # sd ~0.0022


def test_sample_from_cdf_shape():
    cdf = pixel_intensity_cdf(torch.arange(256, dtype=torch.uint8))
    out = sample_from_cdf(cdf, torch.Size((3, 1, 5, 7)), gen(18))
    assert out.shape == (3, 1, 5, 7) and out.dtype == torch.float32


# ================================================================ the noise of training batches


INDICES = torch.tensor([5, 0, 17, 3, 59_999])


@pytest.mark.parametrize("kind", ["uniform", "empirical"])
def test_training_batches_carry_the_noise_of_corrupt_pixels(kind, mnist_train_images, mnist_cdf):
    """Batches are noised on the grey-level scale (0-255) and standardized; that must be the
    same noise as corrupt_pixels on [0, 1] images, from the run's pixel_noise stream, with the
    grey levels of the source's own images."""
    cfg = registry.TrainConfig(noise_type=f"pixel_{kind}", p=0.4, seed=5)
    source = nm.BatchSource(cfg, mnist_train_images, CPU)
    if kind == "empirical":
        assert torch.equal(source.cdf, mnist_cdf)
    clean = mnist_train_images[INDICES].float() / 255
    expected = corrupt_pixels(clean, 0.4, make_generator(5, "pixel_noise"), quantiles_of(kind, mnist_cdf))
    mean, std = registry.DATASETS["mnist"].mean, registry.DATASETS["mnist"].std
    batch = source.batch(INDICES)
    assert torch.allclose(batch, (expected - mean) / std, rtol=0, atol=1e-5)
    assert not torch.allclose(batch, (clean - mean) / std, rtol=0, atol=1e-3)


def test_batch_source_uses_a_given_cdf_and_its_own_stream(mnist_train_images):
    """The validation and noisy-test sources draw the training images' grey levels, from
    streams of their own."""
    cfg = registry.TrainConfig(noise_type="pixel_empirical", p=1.0, seed=2)
    only_100 = pixel_intensity_cdf(torch.full((10,), 100, dtype=torch.uint8))
    source = nm.BatchSource(cfg, mnist_train_images, CPU, "test_noise", only_100)
    assert torch.allclose(source.batch(INDICES), torch.full((5, 1, 28, 28), (100 / 255 - 0.1307) / 0.3081),
                          rtol=0, atol=1e-5)
    training = nm.BatchSource(cfg, mnist_train_images, CPU)
    other = nm.BatchSource(cfg, mnist_train_images, CPU, "validation_noise")
    assert not torch.equal(training.batch(INDICES), other.batch(INDICES))
    # without normalization the batches are grey levels / 255
    raw = nm.BatchSource(registry.TrainConfig(normalize=False), mnist_train_images, CPU)
    assert torch.allclose(raw.batch(INDICES), mnist_train_images[INDICES].float() / 255, rtol=1e-6, atol=0)


@pytest.mark.parametrize("kind", ["uniform", "empirical"])
def test_training_batches_at_p_zero_are_clean_and_draw_no_noise(kind, mnist_train_images):
    """At p = 0 no pixel noise is drawn (it would replace nothing): the batches are those of a
    run without pixel noise, bit for bit, and the pixel-noise stream is left untouched."""
    noisy = nm.BatchSource(registry.TrainConfig(noise_type=f"pixel_{kind}", p=0.0, seed=5), mnist_train_images, CPU)
    clean = nm.BatchSource(registry.TrainConfig(noise_type=registry.CLEAN, p=0.0, seed=5), mnist_train_images, CPU)
    state = noisy.generator.get_state()
    assert torch.equal(noisy.batch(INDICES), clean.batch(INDICES))
    assert torch.equal(noisy.generator.get_state(), state)
    assert registry.TrainConfig(noise_type=f"pixel_{kind}", p=0.01).draws_pixel_noise
    assert not registry.TrainConfig(noise_type="label_flip", p=0.5).draws_pixel_noise


# ================================================================ named random streams


def test_stream_seeds_differ_between_streams_and_reproduce():
    a1 = torch.rand(100, generator=make_generator(0, "a"))
    a2 = torch.rand(100, generator=make_generator(0, "a"))
    b = torch.rand(100, generator=make_generator(0, "b"))
    a_other_seed = torch.rand(100, generator=make_generator(1, "a"))
    assert torch.equal(a1, a2)
    assert not torch.equal(a1, b)
    assert not torch.equal(a1, a_other_seed)


def test_stream_seed_values():
    seeds = {nm.stream_seed(s, name) for s in range(5) for name in ("init", "data_order", "label_noise", "pixel_noise")}
    assert len(seeds) == 20
    assert all(0 <= s < 2**63 for s in seeds)
    assert nm.stream_seed(3, "init") == nm.stream_seed(3, "init")
    assert nm.stream_seed(0, "label_noise") != nm.stream_seed(0, "pixel_noise")
