"""Pair-flip and matrix label noise, transition matrices, forward loss correction, memorisation,
calibration (ECE, reliability bins), validation-based epoch selection, the matched noisy test
for pixel noise, and how the store and run ids treat the fields added with them.

Random draws come from seeded generators, so these tests are deterministic; statistical
tolerances are still several standard deviations wide so that another seed would pass too.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import math
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import nnet_models as nm
import results_store as rs
import run_experiments as rx

K = nm.NUM_CLASSES
NEW_FIELDS = ("noise_matrix", "loss_correction", "validation_fraction", "precision")


def gen(seed: int = 0, stream: str = "test") -> torch.Generator:
    return nm.make_generator(seed, stream)


def random_labels(n: int, seed: int = 123) -> torch.Tensor:
    return torch.randint(0, K, (n,), generator=gen(seed, "true_labels"))


def as_tuples(matrix) -> tuple[tuple[float, ...], ...]:
    return tuple(tuple(float(x) for x in row) for row in matrix)


IDENTITY = [[1.0 if i == j else 0.0 for j in range(K)] for i in range(K)]
UNIFORM = [[1.0 / K] * K for _ in range(K)]
FLIP = [[0.0 if i == j else 1.0 / (K - 1) for j in range(K)] for i in range(K)]
NEXT = [[1.0 if j == (i + 1) % K else 0.0 for j in range(K)] for i in range(K)]  # k -> k+1 mod K
HALF_NEXT = [[0.5 if j in (i, (i + 1) % K) else 0.0 for j in range(K)] for i in range(K)]
# each type's own noise matrix: with it, label_matrix has the same T as the type
NOISE_MATRIX_OF = {"label_uniform": UNIFORM, "label_flip": FLIP, "label_pairflip": NEXT}


def confusion(true: torch.Tensor, noisy: torch.Tensor) -> np.ndarray:
    """Counts of (true label, noisy label)."""
    return torch.bincount(true * K + noisy, minlength=K * K).view(K, K).numpy().astype(np.float64)


def assert_rows_match(table: np.ndarray, expected: np.ndarray, sigmas: float = 6.0) -> None:
    """Each row of `table` (counts) normalised matches the row of `expected` within `sigmas`
    binomial standard deviations per cell."""
    n_row = table.sum(1, keepdims=True)
    freq = table / n_row
    sd = np.sqrt(expected * (1 - expected) / n_row)
    # cells that must be empty (probability 0) are exactly empty
    assert np.all(table[expected == 0] == 0)
    assert np.all(np.abs(freq - expected) <= sigmas * sd + 1e-12), np.abs(freq - expected).max()


# ================================================================ check_noise_matrix


def test_check_noise_matrix_accepts_row_stochastic_matrices():
    for matrix in (IDENTITY, UNIFORM, FLIP, NEXT, HALF_NEXT, as_tuples(HALF_NEXT)):
        checked = nm.check_noise_matrix(matrix)
        assert checked.dtype == torch.float64 and checked.shape == (K, K)
        assert torch.equal(checked, torch.tensor(matrix, dtype=torch.float64))
    # rounding in the last digits of a row sum is fine
    almost = [row[:] for row in UNIFORM]
    almost[0][0] += 1e-9
    nm.check_noise_matrix(almost)
    # another number of classes
    nm.check_noise_matrix([[0.5, 0.5], [0.0, 1.0]], num_classes=2)


@pytest.mark.parametrize("matrix, words", [
    ([[1.0 / 9] * 9 for _ in range(9)], ["10x10", "(9, 9)"]),
    ([[0.1] * 10 for _ in range(9)], ["10x10", "(9, 10)"]),
    ([[1.0 / 11] * 11 for _ in range(10)], ["10x10", "(10, 11)"]),
    ([0.1] * 10, ["10x10", "(10,)"]),
    ([[1.0] + [0.0] * 9] * 9 + [[1.0]], ["10x10", "list of lists of numbers"]),  # ragged
    ([["a"] * 10] * 10, ["10x10", "numbers"]),
])
def test_check_noise_matrix_rejects_wrong_shapes(matrix, words):
    with pytest.raises(ValueError) as info:
        nm.check_noise_matrix(matrix)
    for word in words:
        assert word in str(info.value), str(info.value)


def test_check_noise_matrix_rejects_negative_entries():
    matrix = [row[:] for row in IDENTITY]
    matrix[4][4], matrix[4][5] = 1.25, -0.25  # the row still sums to 1
    with pytest.raises(ValueError, match="negative"):
        nm.check_noise_matrix(matrix)


@pytest.mark.parametrize("row, total", [(3, "0.9"), (7, "1.1"), (0, "0")])
def test_check_noise_matrix_rejects_rows_not_summing_to_one(row, total):
    matrix = [r[:] for r in IDENTITY]
    matrix[row][row] = float(total)
    with pytest.raises(ValueError) as info:
        nm.check_noise_matrix(matrix)
    message = str(info.value)
    assert f"row {row}" in message and f"sums to {total}" in message and "sum to 1" in message


def test_label_matrix_needs_a_valid_matrix_when_used():
    labels = random_labels(100)
    with pytest.raises(ValueError, match="10x10"):
        nm.corrupt_labels(labels, 0.5, "label_matrix", gen())  # no matrix at all
    with pytest.raises(ValueError, match="negative"):
        nm.corrupt_labels(labels, 0.5, "label_matrix", gen(),
                          noise_matrix=[[2.0, -1.0] + [0.0] * 8] + IDENTITY[1:])
    with pytest.raises(ValueError, match="10x10"):
        nm.transition_matrix("label_matrix", 0.3, None)


# ================================================================ the campaign's --noise_matrix


def run_main(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = rx.main(argv)
    return code, out.getvalue(), err.getvalue()


def matrix_argv(mnist_dir, tmp_path, *extra: str) -> list[str]:
    return ["--smoke", "--noise_types", "label_matrix", "--data_dir", str(mnist_dir),
            "--output_dir", str(tmp_path / "out"), *extra]


def assert_rejected(argv, tmp_path, *expected: str) -> str:
    before = sorted(p.name for p in tmp_path.iterdir())
    code, out, err = run_main(argv)
    assert code == 2, out + err
    assert "invalid campaign configuration" in err
    for text in expected:
        assert text in err, f"{text!r} not in {err!r}"
    assert out == ""
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written anywhere
    return err


def write_json(tmp_path, name, matrix) -> str:
    path = tmp_path / name
    path.write_text(json.dumps(matrix))
    return str(path)


def test_label_matrix_without_noise_matrix_is_rejected(mnist_dir, tmp_path):
    assert_rejected(matrix_argv(mnist_dir, tmp_path), tmp_path, "label_matrix", "noise_matrix is None",
                    "row-stochastic")
    # without label_matrix in the grid, no matrix is needed
    assert rx.config_errors(rx.config_from_args(["--smoke"])[0]) == []


@pytest.mark.parametrize("bad, expected", [
    (HALF_NEXT[:9], ["noise_matrix", "10x10", "(9, 10)"]),
    ([[2.0, -1.0] + [0.0] * 8] + IDENTITY[1:], ["noise_matrix", "negative"]),
    ([[0.5] * 10] + IDENTITY[1:], ["noise_matrix", "row 0 sums to 5", "sum to 1"]),
])
@pytest.mark.parametrize("given_as", ["file", "text"])
def test_bad_noise_matrix_is_rejected_naming_the_problem(bad, expected, given_as, mnist_dir, tmp_path):
    if given_as == "file":
        value = write_json(tmp_path, "bad.json", bad)
    else:
        value = json.dumps(bad, separators=(",", ":")).replace(".0,", ",").replace(".0]", "]")
        assert len(value) < 255  # see test_long_noise_matrix_json_text_is_accepted
    assert_rejected(matrix_argv(mnist_dir, tmp_path, "--noise_matrix", value), tmp_path, *expected)


def test_noise_matrix_from_a_json_file_and_from_json_text(mnist_dir, tmp_path):
    path = write_json(tmp_path, "next.json", NEXT)
    text = json.dumps(NEXT, separators=(",", ":")).replace(".0,", ",").replace(".0]", "]")
    assert json.loads(text) == NEXT
    grids = []
    for value in (path, text):
        config = rx.config_from_args(matrix_argv(mnist_dir, tmp_path, "--noise_matrix", value,
                                                 "--loss_corrections", "none,forward"))[0]
        assert config["noise_matrix"] == value  # kept as given; parsed when the grid is built
        assert config["loss_corrections"] == ["none", "forward"]
        assert rx.config_errors(config) == []
        grids.append(rx.build_grid(config))
    from_file, from_text = grids
    assert len(from_file) == 2 * 2 * 1 * 2 * 2  # activations x ps x extra_ps(none) x repeats x corrections
    assert all(s.config.noise_matrix == as_tuples(NEXT) for s in from_file)
    # the same matrix, however given, is the same run
    assert [s.run_id for s in from_file] == [s.run_id for s in from_text]
    assert [s.config for s in from_file] == [s.config for s in from_text]
    # ...and another matrix is another run
    other = rx.build_grid({**rx.config_from_args(matrix_argv(mnist_dir, tmp_path))[0], "noise_matrix": HALF_NEXT})
    assert {s.run_id for s in other}.isdisjoint(s.run_id for s in from_file)


def test_long_noise_matrix_json_text_is_accepted(mnist_dir, tmp_path):
    text = json.dumps(HALF_NEXT)  # what json.dumps / a person writes: ~540 characters
    config = rx.config_from_args(matrix_argv(mnist_dir, tmp_path, "--noise_matrix", text))[0]
    assert rx.config_errors(config) == []


def test_missing_noise_matrix_file_is_named_in_the_error(mnist_dir, tmp_path):
    missing = str(tmp_path / "no_such_matrix.json")
    assert_rejected(matrix_argv(mnist_dir, tmp_path, "--noise_matrix", missing), tmp_path, "noise_matrix", missing)


def test_loss_corrections_stay_strings_on_the_command_line():
    assert rx.config_from_args(["--loss_corrections", "none"])[0]["loss_corrections"] == ["none"]
    assert rx.config_from_args(["--loss-corrections", " forward , none "])[0]["loss_corrections"] == ["forward", "none"]
    # numeric lists are still numbers
    assert rx.config_from_args(["--ps", "0,0.5"])[0]["ps"] == [0, 0.5]
    assert rx.config_from_args(["--hidden_sizes", "8"])[0]["hidden_sizes"] == [8]


def test_label_matrix_campaign_end_to_end(mnist_dir, tmp_path):
    """Two real runs (none / forward) of label_matrix with the matrix from a file."""
    path = write_json(tmp_path, "next.json", HALF_NEXT)
    out = tmp_path / "out"
    argv = ["--activations", "relu", "--noise_types", "label_matrix", "--noise_matrix", path,
            "--loss_corrections", "none,forward", "--ps", "0.6", "--extra_label_ps", "", "--repeats", "1",
            "--epochs", "1", "--max_train_samples", "300", "--hidden_sizes", "16", "--max_workers", "1",
            "--data_dir", str(mnist_dir), "--output_dir", str(out)]
    code, stdout, stderr = run_main(argv)
    assert code == 0, stdout + stderr
    assert "+forward" in stdout
    records = rs.RunStore(out).load()
    specs = rx.build_grid(rx.config_from_args(argv)[0])
    assert set(records) == {s.run_id for s in specs} and len(records) == 2
    assert {r["loss_correction"] for r in records.values()} == {"none", "forward"}
    for record in records.values():
        assert record["status"] == "ok"
        assert json.loads(record["noise_matrix"]) == HALF_NEXT  # stored as JSON
        assert 0 <= record["memorised_fraction"] <= 1
    per_run = pd.read_csv(out / "results_per_run.csv")
    assert sorted(per_run["loss_correction"]) == ["forward", "none"]
    summary = pd.read_csv(out / "results_summary.csv")
    assert len(summary) == 2 and (summary["n"] == 1).all()  # corrections are never pooled
    assert len(pd.read_csv(out / "results_reliability.csv")) == 2 * nm.ECE_BINS


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
    }
    assert set(expected) == set(nm.NOISE_TYPES)
    for noise_type, want in expected.items():
        got = nm.transition_matrix(noise_type, p, HALF_NEXT)
        assert got.dtype == torch.float64 and got.shape == (K, K)
        np.testing.assert_allclose(got.numpy(), want, atol=1e-12, err_msg=noise_type)
        np.testing.assert_allclose(got.sum(1).numpy(), 1.0, atol=1e-12)
    # pair flip: k -> k+1 mod K, 9 -> 0
    assert nm.transition_matrix("label_pairflip", 1.0)[9, 0] == 1.0
    # a type expressed through its own matrix M is label_matrix with that M
    for noise_type, matrix in NOISE_MATRIX_OF.items():
        assert torch.allclose(nm.transition_matrix(noise_type, p), nm.transition_matrix("label_matrix", p, matrix))


N_LABELS = 200_000


@pytest.mark.parametrize("noise_type, p", [("label_uniform", 0.6), ("label_flip", 0.6), ("label_pairflip", 0.3),
                                           ("label_uniform", 1.0), ("label_flip", 0.9)])
def test_label_noise_types_have_the_statistics_of_their_transition_matrix(noise_type, p):
    labels = random_labels(N_LABELS)
    expected = nm.transition_matrix(noise_type, p).numpy()
    exact, _ = nm.corrupt_labels(labels, p, noise_type, gen(21))
    as_matrix, _ = nm.corrupt_labels(labels, p, "label_matrix", gen(22), noise_matrix=NOISE_MATRIX_OF[noise_type])
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
    flipped, _ = nm.corrupt_labels(labels, 0.6, "label_flip", gen(21))
    with pytest.raises(AssertionError):
        assert_rows_match(confusion(labels, flipped), nm.transition_matrix("label_uniform", 0.6).numpy())


def test_label_matrix_with_an_asymmetric_matrix():
    labels = random_labels(N_LABELS)
    p = 0.6
    noisy, mask = nm.corrupt_labels(labels, p, "label_matrix", gen(23), noise_matrix=HALF_NEXT)
    assert noisy.dtype == labels.dtype and noisy.shape == labels.shape
    assert torch.equal(mask, noisy != labels)  # the mask marks the changed labels
    assert_rows_match(confusion(labels, noisy), nm.transition_matrix("label_matrix", p, HALF_NEXT).numpy())
    # every example independently: Binomial(N, p * 0.5) changed, not an exact count
    changed, rate = int(mask.sum()), p * 0.5
    assert abs(changed - N_LABELS * rate) < 6 * math.sqrt(N_LABELS * rate * (1 - rate))
    assert torch.equal(noisy[mask], (labels[mask] + 1) % K)  # only k -> k+1 has mass off the diagonal


def test_label_matrix_extremes_are_exact():
    labels = random_labels(5_000)
    for p, matrix in [(0.0, HALF_NEXT), (1.0, IDENTITY), (0.7, IDENTITY)]:
        noisy, mask = nm.corrupt_labels(labels, p, "label_matrix", gen(24), noise_matrix=matrix)
        assert torch.equal(noisy, labels) and not mask.any()
    noisy, mask = nm.corrupt_labels(labels, 1.0, "label_matrix", gen(24), noise_matrix=NEXT)
    assert torch.equal(noisy, (labels + 1) % K) and mask.all()
    # reproducible from the generator's seed, different for another seed
    a, _ = nm.corrupt_labels(labels, 0.5, "label_matrix", gen(25), noise_matrix=UNIFORM)
    b, _ = nm.corrupt_labels(labels, 0.5, "label_matrix", gen(25), noise_matrix=UNIFORM)
    c, _ = nm.corrupt_labels(labels, 0.5, "label_matrix", gen(26), noise_matrix=UNIFORM)
    assert torch.equal(a, b) and not torch.equal(a, c)


# ================================================================ pair flip


@pytest.mark.parametrize("n", [10_000, 997, 7])
@pytest.mark.parametrize("p", [0.0, 0.1, 0.333, 0.45, 0.5, 1.0])
def test_pairflip_changes_exactly_round_pN_labels_each_to_the_next_class(n, p):
    labels = random_labels(n)
    original = labels.clone()
    noisy, mask = nm.corrupt_labels(labels, p, "label_pairflip", gen(27))
    assert torch.equal(labels, original)
    assert int(mask.sum()) == round(p * n)
    assert torch.equal(mask, noisy != labels)  # every chosen label really changes
    assert torch.equal(noisy[mask], (labels[mask] + 1) % K)
    assert torch.equal(noisy[~mask], labels[~mask])


def test_pairflip_picks_examples_regardless_of_class():
    labels = random_labels(N_LABELS)
    noisy, mask = nm.corrupt_labels(labels, 0.45, "label_pairflip", gen(28))
    # the fraction flipped is ~p in every class (hypergeometric: sd <= sqrt(.25 / 20000) = 0.0035)
    for k in range(K):
        in_class = labels == k
        assert abs(mask[in_class].double().mean().item() - 0.45) < 0.025, k
    assert ((noisy == 0) & (labels == 9)).sum() == mask[labels == 9].sum()  # 9 wraps to 0


# ================================================================ forward loss correction


def test_forward_corrected_loss_by_hand():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]])
    transition = torch.tensor([[0.7, 0.3, 0.0], [0.0, 0.8, 0.2], [0.1, 0.0, 0.9]])
    labels = torch.tensor([1, 0])
    probs = torch.softmax(logits.double(), 1)
    noisy = probs @ transition.double()
    want = -(math.log(noisy[0, 1].item()) + math.log(noisy[1, 0].item())) / 2
    assert nm.forward_corrected_loss(logits, labels, transition).item() == pytest.approx(want, rel=1e-5)
    # with T = I it is the plain cross-entropy
    eye = torch.eye(3)
    assert nm.forward_corrected_loss(logits, labels, eye).item() == pytest.approx(
        nn.functional.cross_entropy(logits, labels).item(), rel=1e-5)


def test_training_loss_uses_the_runs_true_transition_matrix():
    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(64, K, generator=g), torch.randint(0, K, (64,), generator=g)
    for noise_type, p, matrix in [("label_pairflip", 0.45, None), ("label_flip", 0.6, None),
                                  ("label_matrix", 0.5, as_tuples(HALF_NEXT))]:
        cfg = nm.TrainConfig(noise_type=noise_type, p=p, noise_matrix=matrix, loss_correction="forward")
        loss = nm.training_loss(cfg, torch.device("cpu"))(logits, labels)
        want = nm.forward_corrected_loss(logits, labels, nm.transition_matrix(noise_type, p, matrix).float())
        assert loss.item() == pytest.approx(want.item(), rel=1e-6)
        assert loss.item() != pytest.approx(nn.functional.cross_entropy(logits, labels).item(), rel=1e-3)
    plain = nm.training_loss(nm.TrainConfig(noise_type="label_flip", p=0.6), torch.device("cpu"))
    assert plain(logits, labels).item() == nn.functional.cross_entropy(logits, labels).item()
    with pytest.raises(ValueError) as info:
        nm.training_loss(nm.TrainConfig(loss_correction="backward"), torch.device("cpu"))
    assert "backward" in str(info.value) and "none" in str(info.value) and "forward" in str(info.value)


@pytest.fixture(scope="module")
def mnist(mnist_dir):
    return nm.load_dataset("mnist", mnist_dir, download=False)


@pytest.fixture(scope="module")
def mnist_2k_test(mnist):
    """Full training set, the first 2000 test images (faster evaluation every epoch)."""
    return nm.Dataset(mnist.train_images, mnist.train_labels, mnist.test_images[:2000], mnist.test_labels[:2000])


def test_forward_correction_beats_plain_cross_entropy_under_pair_flip(mnist_dir, mnist_2k_test):
    """Pair flip at p = 0.45 (Patrini et al.'s hard case): plain cross-entropy learns the noise
    (~50% test accuracy here), forward correction with the true T recovers the classes (~88%)."""
    results = {}
    for correction in ("none", "forward"):
        results[correction] = [nm.train_and_evaluate(nm.TrainConfig(
            data_dir=str(mnist_dir), noise_type="label_pairflip", p=0.45, loss_correction=correction,
            max_train_samples=5000, epochs=5, hidden_sizes=(128,), seed=seed), mnist_2k_test) for seed in range(3)]
    accuracy = {c: np.array([r["test_accuracy"] for r in rs_]) for c, rs_ in results.items()}
    assert accuracy["forward"].mean() > accuracy["none"].mean() + 0.15, accuracy
    assert (accuracy["forward"] > accuracy["none"]).all(), accuracy  # paired: every seed
    assert accuracy["forward"].min() > 0.75, accuracy
    # plain CE memorises the flipped labels of its training examples; forward correction does not
    memorised = {c: np.mean([r["memorised_fraction"] for r in rs_]) for c, rs_ in results.items()}
    true_on_corrupted = {c: np.mean([r["corrupted_true_fraction"] for r in rs_]) for c, rs_ in results.items()}
    assert memorised["none"] > memorised["forward"] + 0.2, memorised
    assert true_on_corrupted["forward"] > true_on_corrupted["none"] + 0.2, true_on_corrupted
    assert all(r["loss_correction"] == c for c, rs_ in results.items() for r in rs_)


# ================================================================ calibration


def logits_with_confidence(confidence: torch.Tensor, predicted: torch.Tensor) -> torch.Tensor:
    """Logits whose softmax puts `confidence` on `predicted` and the rest evenly on the others."""
    n = len(confidence)
    rest = ((1 - confidence) / (K - 1)).clamp_min(1e-30)
    logits = rest.log().unsqueeze(1).repeat(1, K)
    logits[torch.arange(n), predicted] = confidence.log()
    return logits


def synthetic_predictor(n: int, seed: int, low: float, gap: float):
    """Confidences c ~ U[low, 1); the prediction is right with probability c - gap."""
    g = torch.Generator().manual_seed(seed)
    confidence = low + (1 - low) * torch.rand(n, generator=g, dtype=torch.float64)
    predicted = torch.randint(0, K, (n,), generator=g)
    right = torch.rand(n, generator=g, dtype=torch.float64) < confidence - gap
    wrong_label = (predicted + torch.randint(1, K, (n,), generator=g)) % K
    labels = torch.where(right, predicted, wrong_label)
    return logits_with_confidence(confidence, predicted).float(), labels, confidence


def test_perfectly_calibrated_predictor_has_ece_near_zero():
    logits, labels, confidence = synthetic_predictor(200_000, seed=0, low=0.15, gap=0.0)
    probs = torch.softmax(logits, 1)
    assert torch.allclose(probs.max(1).values.double(), confidence, atol=1e-5)  # the construction works
    ece = nm.expected_calibration_error(probs, labels)
    # per bin |accuracy - confidence| ~ |N(0, sd)| with sd <= sqrt(.25 / 13000) = 0.0044: mean ~0.0035
    assert 0 <= ece < 0.012
    metrics = nm.classification_metrics(logits, labels)
    assert metrics["test_ece"] == pytest.approx(ece, abs=1e-6)
    assert metrics["test_mean_confidence"] == pytest.approx(confidence.mean().item(), abs=1e-5)
    assert metrics["test_accuracy"] == pytest.approx(confidence.mean().item(), abs=0.005)


@pytest.mark.parametrize("gap", [0.1, 0.25])
def test_over_confident_predictor_has_ece_equal_to_its_gap(gap):
    logits, labels, confidence = synthetic_predictor(200_000, seed=1, low=0.3, gap=gap)
    ece = nm.classification_metrics(logits, labels)["test_ece"]
    assert ece == pytest.approx(gap, abs=0.012)
    # an under-confident one (right more often than it says) has the same gap
    g = torch.Generator().manual_seed(2)
    confidence = 0.15 + 0.5 * torch.rand(200_000, generator=g, dtype=torch.float64)
    predicted = torch.randint(0, K, (200_000,), generator=g)
    right = torch.rand(200_000, generator=g, dtype=torch.float64) < confidence + gap
    labels = torch.where(right, predicted, (predicted + 1) % K)
    under = nm.classification_metrics(logits_with_confidence(confidence, predicted).float(), labels)
    assert under["test_ece"] == pytest.approx(gap, abs=0.012)


def test_ece_and_reliability_bins_by_hand():
    def row(confidence, predicted):
        probs = torch.full((K,), (1 - confidence) / (K - 1), dtype=torch.float64)
        probs[predicted] = confidence
        return probs

    probs = torch.stack([row(0.95, 0), row(0.95, 1), row(0.5, 3), row(0.25, 4), row(1.0, 6)])
    labels = torch.tensor([0, 2, 3, 5, 6])
    # bins of width 1/15: 0.95 -> 14, 0.5 -> 7, 0.25 -> 3, 1.0 -> 14 (the last bin is closed)
    bins = nm.calibration_bins(probs, labels)
    assert set(bins) == {"count", "confidence", "accuracy"}
    assert all(len(v) == nm.ECE_BINS == 15 for v in bins.values())
    assert bins["count"] == [0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 3]
    assert bins["confidence"][14] == pytest.approx((0.95 + 0.95 + 1.0) / 3)
    assert bins["accuracy"][14] == pytest.approx(2 / 3)
    assert bins["accuracy"][7] == 1.0 and bins["accuracy"][3] == 0.0
    assert all(math.isnan(bins["accuracy"][b]) and math.isnan(bins["confidence"][b])
               for b in range(15) if bins["count"][b] == 0)
    gaps = 3 * abs(2 / 3 - 2.9 / 3) + abs(1 - 0.5) + abs(0 - 0.25)
    assert nm.expected_calibration_error(probs, labels) == pytest.approx(gaps / 5)


def test_calibration_bins_count_every_example():
    logits, labels, confidence = synthetic_predictor(50_000, seed=3, low=0.1, gap=0.05)
    probs = torch.softmax(logits, 1)
    bins = nm.calibration_bins(probs, labels)
    assert sum(bins["count"]) == 50_000
    edges = np.arange(16) / 15
    for b in range(15):
        if bins["count"][b]:
            assert edges[b] - 1e-6 <= bins["confidence"][b] <= edges[b + 1] + 1e-6
    # the reliability curve of this predictor sits `gap` below the diagonal
    full = [b for b in range(15) if bins["count"][b] > 2000]
    assert len(full) >= 10
    for b in full:
        assert bins["confidence"][b] - bins["accuracy"][b] == pytest.approx(0.05, abs=0.045)
    np.testing.assert_allclose(np.bincount(np.minimum((confidence.numpy() * 15).astype(int), 14), minlength=15),
                               bins["count"], atol=5)  # float32 softmax may move an edge case


# ================================================================ memorisation


def test_memorisation_metrics_by_hand():
    clean = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7])
    noisy = torch.tensor([0, 1, 2, 3, 5, 6, 7, 8])         # the last four are corrupted
    predictions = torch.tensor([0, 1, 9, 3, 5, 5, 7, 0])   # corrupted: noisy, true, noisy, neither
    m = nm.memorisation_metrics(predictions, noisy, clean)
    assert m == {"memorised_fraction": 2 / 4, "corrupted_true_fraction": 1 / 4, "clean_train_accuracy": 3 / 4}


def test_memorisation_metrics_empty_subsets_are_nan():
    labels = torch.tensor([1, 2, 3])
    m = nm.memorisation_metrics(torch.tensor([1, 0, 3]), labels, labels)  # nothing corrupted
    assert math.isnan(m["memorised_fraction"]) and math.isnan(m["corrupted_true_fraction"])
    assert m["clean_train_accuracy"] == pytest.approx(2 / 3)
    m = nm.memorisation_metrics(torch.tensor([2, 2, 2]), torch.tensor([2, 3, 4]), labels)  # all corrupted
    assert m["memorised_fraction"] == pytest.approx(1 / 3) and m["corrupted_true_fraction"] == pytest.approx(1 / 3)
    assert math.isnan(m["clean_train_accuracy"])


def tiny(mnist_dir, **overrides) -> nm.TrainConfig:
    base = dict(data_dir=str(mnist_dir), max_train_samples=1000, epochs=1, hidden_sizes=(32,), seed=0)
    return nm.TrainConfig(**{**base, **overrides})


def test_memorisation_history_only_for_label_noise(mnist_dir, mnist_2k_test):
    label = nm.train_and_evaluate(tiny(mnist_dir, noise_type="label_flip", p=0.5, epochs=2), mnist_2k_test)
    pixel = nm.train_and_evaluate(tiny(mnist_dir, noise_type="pixel_uniform", p=0.5, epochs=2), mnist_2k_test)
    for key in ("memorised_fraction", "corrupted_true_fraction", "clean_train_accuracy"):
        assert len(label[f"history_{key}"]) == 2 and 0 <= label[key] <= 1
        assert key not in pixel and f"history_{key}" not in pixel
    # label_flip: every corrupted example has a wrong label, so the two fractions cannot exceed 1
    assert label["memorised_fraction"] + label["corrupted_true_fraction"] <= 1


# ================================================================ validation split and early stopping


@pytest.mark.parametrize("n, fraction", [(1000, 0.1), (1001, 0.25), (7, 0.5), (60_000, 0.1)])
def test_split_validation_is_a_disjoint_random_split(n, fraction):
    cfg = nm.TrainConfig(validation_fraction=fraction, seed=3)
    train, validation = nm.split_validation(cfg, n, torch.device("cpu"))
    assert len(validation) == round(fraction * n) and len(train) == n - round(fraction * n)
    assert torch.equal(torch.cat([train, validation]).sort().values, torch.arange(n))  # disjoint, complete
    assert torch.equal(train, train.sort().values) and torch.equal(validation, validation.sort().values)
    again = nm.split_validation(cfg, n, torch.device("cpu"))
    assert torch.equal(again[0], train) and torch.equal(again[1], validation)
    if n >= 1000:  # random, not the last rows, and another seed gives another split
        assert validation.max() - validation.min() > n / 2
        other = nm.split_validation(dataclasses.replace(cfg, seed=4), n, torch.device("cpu"))[1]
        assert not torch.equal(other, validation)


def test_no_validation_fraction_means_no_split():
    train, validation = nm.split_validation(nm.TrainConfig(), 500, torch.device("cpu"))
    assert validation is None and torch.equal(train, torch.arange(500))


def test_early_stopping_selects_by_noisy_validation_loss(mnist_dir, mnist_2k_test, monkeypatch):
    trained_on = []
    real = nm.train_one_epoch

    def recording(*args, **kwargs):
        trained_on.append(args[6].clone())  # the indices of the examples trained on
        return real(*args, **kwargs)

    monkeypatch.setattr(nm, "train_one_epoch", recording)
    cfg = tiny(mnist_dir, noise_type="label_flip", p=0.4, epochs=4, validation_fraction=0.25, seed=1)
    result = nm.train_and_evaluate(cfg, mnist_2k_test)
    _, validation = nm.split_validation(cfg, 1000, torch.device("cpu"))
    assert len(trained_on) == 4
    for indices in trained_on:  # validation examples are never trained on
        assert len(indices) == 750 and not np.isin(indices.numpy(), validation.numpy()).any()
    losses = result["history_validation_loss"]
    assert len(losses) == 4 and all(np.isfinite(losses))
    assert result["selected_epoch"] in range(1, 5)
    assert result["selected_epoch"] == 1 + int(np.argmin(losses))
    best = result["selected_epoch"] - 1
    assert result["selected_test_accuracy"] == result["history_test_accuracy"][best]
    assert result["selected_test_loss"] == result["history_test_loss"][best]


def test_validation_loss_is_on_the_noisy_labels(mnist_dir, mnist_2k_test):
    """With every held-out label flipped, a model that learned anything has a validation loss
    far above its clean test loss: the selection never sees clean labels."""
    result = nm.train_and_evaluate(tiny(mnist_dir, noise_type="label_flip", p=1.0, epochs=2,
                                        validation_fraction=0.3), mnist_2k_test)
    clean = nm.train_and_evaluate(tiny(mnist_dir, noise_type="label_flip", p=0.0, epochs=2,
                                       validation_fraction=0.3), mnist_2k_test)
    assert result["history_validation_loss"][-1] > clean["history_validation_loss"][-1] + 0.5
    assert clean["history_validation_loss"][-1] == pytest.approx(clean["test_loss"], abs=0.5)


def test_without_validation_there_are_no_selected_metrics(mnist_dir, mnist_2k_test):
    result = nm.train_and_evaluate(tiny(mnist_dir, noise_type="label_uniform", p=0.3, epochs=2), mnist_2k_test)
    assert not any(k.startswith("selected_") for k in result)
    assert "validation_loss" not in result and "history_validation_loss" not in result


def test_validation_fraction_that_leaves_no_training_data_is_a_clear_error(mnist_dir, mnist_2k_test):
    with pytest.raises(ValueError, match="validation_fraction"):
        nm.train_and_evaluate(tiny(mnist_dir, max_train_samples=300, validation_fraction=0.999), mnist_2k_test)


# ================================================================ matched noisy test (pixel noise)


@pytest.mark.parametrize("noise_type", nm.PIXEL_NOISE_TYPES)
def test_noisy_test_metrics_for_pixel_noise(noise_type, mnist_dir, mnist_2k_test):
    cfg = tiny(mnist_dir, noise_type=noise_type, p=0.8, max_train_samples=2000, epochs=2, hidden_sizes=(64,))
    result = nm.train_and_evaluate(cfg, mnist_2k_test)
    # heavy noise on the test images too: clearly worse than on clean ones (over seeds 0-4:
    # 0.17-0.33 vs 0.29-0.61, at least 0.08 apart)
    assert result["noisy_test_accuracy"] < result["test_accuracy"] - 0.05
    assert result["noisy_test_loss"] > result["test_loss"]
    assert 0 < result["noisy_test_accuracy"] < 1
    again = nm.train_and_evaluate(cfg, mnist_2k_test)  # the test noise is seeded
    assert again["noisy_test_accuracy"] == result["noisy_test_accuracy"]


def test_noisy_test_metrics_only_for_pixel_noise(mnist_dir, mnist_2k_test):
    for noise_type in nm.LABEL_NOISE_TYPES:
        matrix = as_tuples(HALF_NEXT) if noise_type == "label_matrix" else None
        result = nm.train_and_evaluate(tiny(mnist_dir, noise_type=noise_type, p=0.5, noise_matrix=matrix,
                                            max_train_samples=300), mnist_2k_test)
        assert not any(k.startswith("noisy_test") for k in result), noise_type


# ================================================================ results store and run ids


def old_run_key(cfg: nm.TrainConfig) -> str:
    """run_key as it was before the new fields existed (commit dbca8b3)."""
    fields = {k: "-".join(str(x) for x in v) if isinstance(v, tuple) else v
              for k, v in dataclasses.asdict(cfg).items()
              if k not in ("cpu_threads", "data_dir") and k not in NEW_FIELDS}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


# run ids that the code before the new fields gave these configs (computed with commit dbca8b3)
OLD_IDS = [
    (nm.TrainConfig(), "816895760f7293f8"),
    (nm.TrainConfig(noise_type="pixel_empirical", p=0.3, seed=7, epochs=2, max_train_samples=1000,
                    hidden_sizes=(64, 32)), "1f5ec6a294b165a4"),
    (nm.TrainConfig(model_type="cnn", activation="tanh", noise_type="label_flip", p=0.95, optimizer="sgd",
                    learning_rate=0.05, hidden_sizes=()), "c1f2d21d1da2d8c4"),
]


@pytest.mark.parametrize("cfg, old_id", OLD_IDS)
def test_run_ids_of_old_configs_are_unchanged(cfg, old_id):
    assert old_run_key(cfg) == old_id  # the reference formula is the old code's
    assert rx.run_key(cfg) == old_id
    # explicitly at the defaults is the same config
    assert rx.run_key(dataclasses.replace(cfg, noise_matrix=None, loss_correction="none",
                                          validation_fraction=0.0, precision="float32")) == old_id


def test_new_fields_off_their_default_change_the_run_id():
    base = nm.TrainConfig(noise_type="label_matrix", p=0.4, noise_matrix=as_tuples(HALF_NEXT))
    variants = [base, dataclasses.replace(base, noise_matrix=as_tuples(NEXT)),
                dataclasses.replace(base, loss_correction="forward"),
                dataclasses.replace(base, validation_fraction=0.1),
                dataclasses.replace(base, validation_fraction=0.2),
                dataclasses.replace(base, precision="bfloat16"),
                dataclasses.replace(base, noise_matrix=None)]
    keys = [rx.run_key(c) for c in variants]
    assert len(set(keys)) == len(keys)
    assert rx.run_key(dataclasses.replace(base, validation_fraction=0)) == rx.run_key(base)  # 0 == 0.0


def old_format_record(spec: rx.RunSpec, accuracy: float = 0.9) -> dict:
    """A record as the code before the new fields stored it: no new config fields or metrics."""
    record = {"run_id": old_run_key(spec.config), "repeat": spec.repeat, "status": "ok", "error": "",
              "attempts": 1, "finished_at": "2024-01-01T00:00:00+00:00"}
    record.update({k: rs.csv_value(v) for k, v in dataclasses.asdict(spec.config).items() if k not in NEW_FIELDS})
    record.update(test_accuracy=accuracy, test_loss=0.3, test_macro_precision=accuracy, test_macro_recall=accuracy,
                  test_macro_roc_auc=0.99, train_loss=0.35, seconds=1.0, n_params=1000,
                  history_test_loss=[0.3] * spec.config.epochs, history_test_accuracy=[accuracy] * spec.config.epochs)
    return record


def test_old_records_load_with_defaults_and_are_not_rerun(tmp_path):
    config = rx.config_from_args(["--smoke", "--output_dir", str(tmp_path)])[0]
    specs = rx.build_grid(config)
    store = rs.RunStore(tmp_path)
    for spec in specs:
        store.save(old_format_record(spec))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "skipping unreadable run record"
        records = store.load()
    assert set(records) == {s.run_id for s in specs}  # every old run keeps its id
    assert rx.runs_to_do(specs, records, config) == []  # resuming reruns nothing
    assert rx.count_statuses(specs, records) == {"done": len(specs), "failed": 0, "pending": 0}
    per_run = pd.read_csv(rs.write_csvs(list(records.values()), tmp_path)["results_per_run.csv"])
    assert (per_run["loss_correction"] == "none").all() and (per_run["validation_fraction"] == 0.0).all()
    assert per_run["noise_matrix"].isna().all()  # the defaults fill in the fields old records lack
    # the file on disk is left as it was
    on_disk = json.loads((tmp_path / "runs" / f"{specs[0].run_id}.json").read_text())
    assert not set(NEW_FIELDS) & set(on_disk)


def test_csvs_from_old_and_new_records(tmp_path):
    config = rx.config_from_args(["--smoke", "--noise_types", "label_flip", "--activations", "relu",
                                  "--output_dir", str(tmp_path)])[0]
    specs = rx.build_grid(config)  # p in {0, 0.5} x 2 repeats
    store = rs.RunStore(tmp_path)
    old_spec, new_spec = specs[0], specs[1]  # same experiment, repeats 0 and 1
    assert (old_spec.config.p, new_spec.config.p) == (0.0, 0.0) and (old_spec.repeat, new_spec.repeat) == (0, 1)
    store.save(old_format_record(old_spec, accuracy=0.8))
    new = old_format_record(new_spec, accuracy=0.9)
    new.update({k: rs.csv_value(v) for k, v in dataclasses.asdict(new_spec.config).items()})
    new.update(test_ece=0.05, test_mean_confidence=0.93, memorised_fraction=math.nan, corrupted_true_fraction=math.nan,
               clean_train_accuracy=0.95, history_test_ece=[0.05], history_memorised_fraction=[math.nan],
               reliability={"count": [0.0] * 14 + [10_000.0], "confidence": [math.nan] * 14 + [0.93],
                            "accuracy": [math.nan] * 14 + [0.9]})
    store.save(new)
    forward = {**new, "run_id": "f" * 16, "loss_correction": "forward", "test_accuracy": 0.7}
    store.save(forward)
    records = list(store.load().values())
    paths = rs.write_csvs(records, tmp_path)
    assert set(paths) == {"results_per_run.csv", "results_summary.csv", "results_history.csv",
                          "results_reliability.csv"}
    per_run = pd.read_csv(paths["results_per_run.csv"])
    assert sorted(per_run["loss_correction"]) == ["forward", "none", "none"]
    assert (per_run["validation_fraction"] == 0.0).all() and per_run["noise_matrix"].isna().all()
    summary = pd.read_csv(paths["results_summary.csv"]).set_index("loss_correction")
    # the old record pools with the new one of the same experiment; forward is its own group
    assert summary.loc["none", "n"] == 2 and summary.loc["forward", "n"] == 1
    assert summary.loc["none", "test_accuracy_mean"] == pytest.approx(0.85)
    assert summary.loc["none", "test_ece_mean"] == pytest.approx(0.05)  # only the new record has it
    history = pd.read_csv(paths["results_history.csv"])
    assert len(history) == 3 and history["test_ece"].isna().sum() == 1
    reliability = pd.read_csv(paths["results_reliability.csv"])
    assert list(reliability.columns) == rs.RUN_KEYS + ["bin", "count", "confidence", "accuracy"]
    assert len(reliability) == 2 * nm.ECE_BINS  # the old record has no reliability bins
    assert set(reliability["run_id"]) == {new["run_id"], forward["run_id"]}
    assert reliability.groupby("run_id")["count"].sum().tolist() == [10_000, 10_000]


def test_summary_of_a_per_run_csv_without_the_new_columns():
    """A per-run table written before the new fields (plots and the notebook read old CSVs)."""
    old_columns = [c for c in rs.RUN_FIELDS + rs.CONFIG_FIELDS + ["n_params"]
                   if c not in NEW_FIELDS] + ["test_accuracy", "test_loss", "seconds"]
    rows = [{c: None for c in old_columns} for _ in range(3)]
    for i, row in enumerate(rows):
        row.update(run_id=f"{i:016x}", repeat=i, status="ok", dataset="mnist", model_type="mlp", activation="relu",
                   hidden_sizes="32", noise_type="label_flip", p=0.5, epochs=1, batch_size=128, optimizer="adam",
                   learning_rate=0.001, weight_decay=0.0, normalize=True, max_train_samples=300, use_cuda=False,
                   test_accuracy=0.5 + 0.1 * i, test_loss=1.0, seconds=1.0)
    summary = rs.summary_table(pd.DataFrame(rows, columns=old_columns))
    assert len(summary) == 1 and summary["n"].iloc[0] == 3
    assert summary["loss_correction"].iloc[0] == "none" and summary["validation_fraction"].iloc[0] == 0.0
    assert summary["test_accuracy_mean"].iloc[0] == pytest.approx(0.6)
    assert math.isnan(summary["test_ece_mean"].iloc[0])
