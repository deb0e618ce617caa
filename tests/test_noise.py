"""Noise functions: label noise, pixel noise, grey-level sampling and the named random streams.

All draws come from seeded generators, so these tests are deterministic; the statistical
tolerances are still several standard deviations wide so a change of seed would not flake.
"""
import numpy as np
import pytest
import torch
from scipy import stats

import nnet_models as nm
from nnet_models import corrupt_labels, corrupt_pixels, make_generator, pixel_intensity_cdf

K = nm.NUM_CLASSES


def gen(seed: int = 0, stream: str = "test") -> torch.Generator:
    return make_generator(seed, stream)


def random_labels(n: int, seed: int = 123) -> torch.Tensor:
    return torch.randint(0, K, (n,), generator=gen(seed, "true_labels"))


# The label noise types that corrupt exactly round(p*N) examples, with draws that do not depend
# on p; label_matrix instead draws every example's label from a row of T (tested apart, in
# test_noise_extensions.py).
EXACT_COUNT_TYPES = ("label_uniform", "label_flip", "label_pairflip")
# A K x K row-stochastic M for label_matrix: half the mass stays, half goes to the next class.
HALF_NEXT = tuple(tuple(0.5 if j in (i, (i + 1) % K) else 0.0 for j in range(K)) for i in range(K))


def test_every_label_noise_type_is_covered():
    assert set(EXACT_COUNT_TYPES) | {"label_matrix"} == set(nm.LABEL_NOISE_TYPES)
    assert len(nm.LABEL_NOISE_TYPES) == 4


@pytest.fixture(scope="module")
def mnist_train_images(mnist_dir) -> torch.Tensor:
    return nm.load_dataset("mnist", mnist_dir, download=False).train_images


# ---------------------------------------------------------------- label noise: counts and masks


@pytest.mark.parametrize("noise_type", EXACT_COUNT_TYPES)
@pytest.mark.parametrize("n", [1000, 997, 7])
@pytest.mark.parametrize("p", [0.0, 0.1, 0.25, 0.333, 0.5, 0.9, 1.0])
def test_exactly_round_pN_examples_are_corrupted(noise_type, n, p):
    labels = random_labels(n)
    noisy, mask = corrupt_labels(labels, p, noise_type, gen())
    assert mask.dtype == torch.bool and mask.shape == (n,)
    assert int(mask.sum()) == round(p * n)
    assert noisy.shape == labels.shape and noisy.dtype == labels.dtype
    # outside the mask nothing changes
    assert torch.equal(noisy[~mask], labels[~mask])
    assert int(noisy.min()) >= 0 and int(noisy.max()) < K


def test_non_integer_pN_uses_round():
    # 997 * 0.25 = 249.25 -> 249 ; 997 * 0.333 = 331.999 -> 332
    labels = random_labels(997)
    assert int(corrupt_labels(labels, 0.25, "label_uniform", gen())[1].sum()) == 249
    assert int(corrupt_labels(labels, 0.333, "label_flip", gen())[1].sum()) == 332


@pytest.mark.parametrize("noise_type", nm.LABEL_NOISE_TYPES)
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
    t, y = labels[mask].numpy(), noisy[mask].numpy()
    table = np.zeros((K, K), dtype=np.int64)
    np.add.at(table, (t, y), 1)
    assert np.all(np.diag(table) == 0)
    for i in range(K):
        others = np.delete(table[i], i)  # K-1 cells, each ~ 1/(K-1) of the row
        assert stats.chisquare(others).pvalue > 1e-4, f"row {i}: {others}"
        freq = others / others.sum()
        assert np.abs(freq - 1 / (K - 1)).max() < 0.035  # sd ~0.0077


def _confusion(true: torch.Tensor, noisy: torch.Tensor) -> np.ndarray:
    table = np.zeros((K, K), dtype=np.int64)
    np.add.at(table, (true.numpy(), noisy.numpy()), 1)
    return table


def test_label_flip_at_p_K_minus_1_over_K_makes_labels_uninformative():
    labels = random_labels(100_000)
    p = (K - 1) / K
    noisy, mask = corrupt_labels(labels, p, "label_flip", gen(5))
    table = _confusion(labels, noisy)
    rows = table / table.sum(1, keepdims=True)
    # every row of true -> noisy ~ uniform 1/K (each cell ~1000 counts, sd of freq ~0.003)
    assert np.abs(rows - 1 / K).max() < 0.02
    assert stats.chi2_contingency(table).pvalue > 1e-4  # independence not rejected
    # sanity of the test itself: at p = 0.5 the labels clearly still carry information
    table_half = _confusion(labels, corrupt_labels(labels, 0.5, "label_flip", gen(5))[0])
    assert stats.chi2_contingency(table_half).pvalue < 1e-12


@pytest.mark.parametrize("noise_type", EXACT_COUNT_TYPES)
def test_corrupted_sets_are_nested_in_p(noise_type):
    labels = random_labels(5_000)
    ps = [0.0, 0.05, 0.2, 0.3, 0.6, 0.9, 1.0]
    results = [corrupt_labels(labels, p, noise_type, gen(6)) for p in ps]
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


def test_unknown_label_noise_type_raises_naming_allowed():
    with pytest.raises(ValueError) as info:
        corrupt_labels(random_labels(10), 0.5, "label_gaussian", gen())
    msg = str(info.value)
    assert "label_gaussian" in msg
    for allowed in nm.LABEL_NOISE_TYPES:
        assert allowed in msg


# ---------------------------------------------------------------- pixel noise


def sentinel_images(n: int = 100) -> torch.Tensor:
    # -1 is a value no replacement (U[0,1] or a grey level k/255) can produce
    return torch.full((n, 1, 28, 28), -1.0)


@pytest.mark.parametrize("p", [0.05, 0.3, 0.7])
@pytest.mark.parametrize("kind", ["uniform", "empirical"])
def test_fraction_of_replaced_pixels_is_p(p, kind, mnist_train_images):
    cdf = pixel_intensity_cdf(mnist_train_images) if kind == "empirical" else None
    images = sentinel_images(200)  # 156,800 pixels
    out = corrupt_pixels(images, p, gen(10), cdf)
    replaced = (out != -1.0).double().mean().item()
    sd = np.sqrt(p * (1 - p) / images.numel())  # <= 0.0013
    assert abs(replaced - p) < 7 * sd
    assert torch.equal(images, sentinel_images(200)), "input must not be modified in place"


@pytest.mark.parametrize("kind", ["uniform", "empirical"])
def test_p_zero_leaves_images_unchanged_and_p_one_replaces_all(kind, mnist_train_images):
    cdf = pixel_intensity_cdf(mnist_train_images) if kind == "empirical" else None
    images = mnist_train_images[:50].float() / 255
    assert torch.equal(corrupt_pixels(images, 0.0, gen(11), cdf), images)
    assert (corrupt_pixels(sentinel_images(20), 1.0, gen(11), cdf) != -1.0).all()


@pytest.mark.parametrize("kind", ["uniform", "empirical"])
def test_fresh_noise_on_every_call(kind, mnist_train_images):
    cdf = pixel_intensity_cdf(mnist_train_images) if kind == "empirical" else None
    g = gen(12)
    first = corrupt_pixels(sentinel_images(10), 0.3, g, cdf)
    second = corrupt_pixels(sentinel_images(10), 0.3, g, cdf)
    assert not torch.equal(first != -1.0, second != -1.0)
    # ...yet the same seed reproduces the same sequence
    g2 = gen(12)
    assert torch.equal(corrupt_pixels(sentinel_images(10), 0.3, g2, cdf), first)
    assert torch.equal(corrupt_pixels(sentinel_images(10), 0.3, g2, cdf), second)


@pytest.mark.parametrize("kind", ["uniform", "empirical"])
def test_values_stay_in_unit_interval(kind, mnist_train_images):
    cdf = pixel_intensity_cdf(mnist_train_images) if kind == "empirical" else None
    images = mnist_train_images[:200].float() / 255
    out = corrupt_pixels(images, 0.5, gen(13), cdf)
    assert out.dtype == torch.float32 and out.shape == images.shape
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert not torch.equal(out, images)


def test_uniform_replacement_values_are_uniform():
    out = corrupt_pixels(sentinel_images(200), 0.5, gen(14))
    values = out[out != -1.0].double().numpy()  # ~78,400 values
    assert abs(values.mean() - 0.5) < 0.01  # sd ~0.001
    assert abs(values.var() - 1 / 12) < 0.005
    assert stats.kstest(values, "uniform").pvalue > 1e-4


def test_empirical_replacement_values_follow_the_data_histogram(mnist_train_images):
    cdf = pixel_intensity_cdf(mnist_train_images)
    out = corrupt_pixels(sentinel_images(300), 0.8, gen(15), cdf)
    values = out[out != -1.0]  # ~188,000 values
    n = values.numel()
    levels = torch.round(values * 255).long()
    # replacements are exact grey levels k/255
    assert torch.allclose(levels.float() / 255, values, atol=0, rtol=0)

    data_counts = torch.bincount(mnist_train_images.flatten(), minlength=256).double().numpy()
    data_freq = data_counts / data_counts.sum()
    sample_counts = torch.bincount(levels, minlength=256).double().numpy()

    # the most important bin: ~81% of MNIST pixels are 0
    zero_frac = sample_counts[0] / n
    assert 0.75 < data_freq[0] < 0.85
    assert abs(zero_frac - data_freq[0]) < 7 * np.sqrt(data_freq[0] * (1 - data_freq[0]) / n)
    # far from U[0,1], whose zero fraction would be ~1/256
    assert zero_frac > 0.5
    # levels that never occur in the data are never drawn
    assert sample_counts[data_counts == 0].sum() == 0

    # KS on the discrete cdf (conservative for discrete data): alpha ~1e-6 critical value
    sample_cdf = np.cumsum(sample_counts) / n
    assert np.abs(sample_cdf - cdf.double().numpy()).max() < 2.7 / np.sqrt(n)

    # chi-square on coarse bins (every expected count large)
    edges = [0, 1, 64, 128, 192, 253, 256]
    obs = np.array([sample_counts[a:b].sum() for a, b in zip(edges, edges[1:])])
    exp = np.array([data_freq[a:b].sum() for a, b in zip(edges, edges[1:])]) * n
    assert stats.chisquare(obs, exp * obs.sum() / exp.sum()).pvalue > 1e-4


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


def test_pixel_intensity_cdf_of_mnist_is_a_cdf(mnist_train_images):
    cdf = pixel_intensity_cdf(mnist_train_images)
    assert cdf.shape == (256,)
    assert torch.all(cdf[1:] >= cdf[:-1])
    assert abs(cdf[-1].item() - 1.0) < 1e-6
    assert 0.75 < cdf[0].item() < 0.85


def sample_from_cdf(cdf, shape, generator):
    """Grey levels drawn from `cdf`: corrupt_pixels at p = 1 replaces every pixel."""
    return corrupt_pixels(torch.full(shape, -1.0), 1.0, generator, cdf)


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
    uniq = set(torch.round(values * 255).long().unique().tolist())
    assert uniq == {10, 200}
    frac_10 = (values == 10 / 255).double().mean().item()
    assert abs(frac_10 - 0.25) < 0.015  # sd ~0.0022


def test_sample_from_cdf_shape():
    cdf = pixel_intensity_cdf(torch.arange(256, dtype=torch.uint8))
    out = sample_from_cdf(cdf, torch.Size((3, 1, 5, 7)), gen(18))
    assert out.shape == (3, 1, 5, 7) and out.dtype == torch.float32


# ---------------------------------------------------------------- named random streams


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
    # the documented stream names used by a run are distinct streams
    assert nm.stream_seed(0, "label_noise") != nm.stream_seed(0, "pixel_noise")


@pytest.mark.parametrize("kind", ["uniform", "empirical"])
def test_in_place_replacement_matches_corrupt_pixels(kind, mnist_train_images):
    """The training loop replaces pixels in place (`replace_pixels`); it must draw the same noise."""
    cdf = pixel_intensity_cdf(mnist_train_images) if kind == "empirical" else None
    quantiles = None if cdf is None else nm.grey_level_quantiles(cdf)
    images = mnist_train_images[:64].float() / 255
    expected = corrupt_pixels(images, 0.4, gen(19), cdf)
    work = images.clone()
    out = nm.replace_pixels(work, 0.4, gen(19), quantiles, in_place=True)
    assert out.data_ptr() == work.data_ptr()
    assert torch.equal(out, expected)
    assert not torch.equal(out, images)


@pytest.mark.parametrize("kind", ["uniform", "empirical"])
def test_training_batches_carry_the_noise_of_corrupt_pixels(kind, mnist_train_images):
    """Batches are noised on the grey-level scale (0-255) and standardized; that must be the
    same noise as corrupt_pixels on [0, 1] images, from the run's pixel_noise stream."""
    cfg = nm.TrainConfig(noise_type=f"pixel_{kind}", p=0.4, seed=5)
    source = nm.BatchSource(cfg, mnist_train_images, torch.device("cpu"))
    indices = torch.tensor([5, 0, 17, 3, 59_999])
    cdf = pixel_intensity_cdf(mnist_train_images) if kind == "empirical" else None
    clean = mnist_train_images[indices].float() / 255
    expected = corrupt_pixels(clean, 0.4, make_generator(5, "pixel_noise"), cdf)
    mean, std = nm.NORMALIZATION["mnist"]
    batch = source.batch(indices)
    assert torch.allclose(batch, (expected - mean) / std, rtol=0, atol=1e-5)
    assert not torch.allclose(batch, (clean - mean) / std, rtol=0, atol=1e-3)


@pytest.mark.parametrize("kind", ["uniform", "empirical"])
def test_training_batches_at_p_zero_are_clean_and_draw_no_noise(kind, mnist_train_images):
    """At p = 0 no pixel noise is drawn (it would replace nothing): the batches are those of a
    run without pixel noise, bit for bit, and the pixel-noise stream is left untouched."""
    noisy = nm.BatchSource(nm.TrainConfig(noise_type=f"pixel_{kind}", p=0.0, seed=5), mnist_train_images,
                           torch.device("cpu"))
    clean = nm.BatchSource(nm.TrainConfig(noise_type="label_uniform", p=0.0, seed=5), mnist_train_images,
                           torch.device("cpu"))
    state = noisy.generator.get_state()
    indices = torch.tensor([5, 0, 17, 3, 59_999])
    assert torch.equal(noisy.batch(indices), clean.batch(indices))
    assert torch.equal(noisy.generator.get_state(), state)
    assert nm.TrainConfig(noise_type=f"pixel_{kind}", p=0.01).draws_pixel_noise
    assert not nm.TrainConfig(noise_type="label_flip", p=0.5).draws_pixel_noise


@pytest.mark.parametrize("n", [1, 7, 100_001])
def test_uniform_floats_have_the_distribution_of_torch_rand(n):
    """24-bit uniforms on [0, 1), two per 64-bit draw: uniform, on the 2**-24 grid, and the
    two halves of a draw independent of each other."""
    u = nm.uniform_floats(torch.Size([n]), gen(21), torch.device("cpu"))
    assert u.shape == (n,) and u.dtype == torch.float32
    assert float(u.min()) >= 0.0 and float(u.max()) < 1.0
    assert torch.equal(u * 2**24, torch.round(u * 2**24))
    if n < 1000:
        return
    values = u.double().numpy()
    assert stats.kstest(values, "uniform").pvalue > 1e-4
    first, second = values[0:-1:2], values[1::2]  # the low and high halves of each 64-bit draw
    assert abs(np.corrcoef(first, second)[0, 1]) < 0.02  # sd ~0.0045
    counts, _, _ = np.histogram2d(first, second, bins=8, range=[[0, 1], [0, 1]])
    assert stats.chisquare(counts.ravel()).pvalue > 1e-4
    assert not torch.equal(u, nm.uniform_floats(torch.Size([n]), gen(22), torch.device("cpu")))
