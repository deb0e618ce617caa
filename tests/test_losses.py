"""Training losses: each loss's value and gradient against its formula written out by hand, the limits that
tie the losses to cross-entropy, the estimator of T on synthetic posteriors, and the errors for bad names."""
import math
from pathlib import Path

import pytest
import torch

import losses
from losses import LOSSES, estimate_transition, loss_function

K = 10
N = 32
DOCS = Path(__file__).resolve().parents[1] / "docs" / "losses.md"


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_transition(seed: int, diagonal: float = 0.6) -> torch.Tensor:
    """A row-stochastic T whose diagonal entry is the largest of its column (the estimator's assumption)."""
    rows = torch.rand(K, K, generator=generator(seed), dtype=torch.float64)
    return diagonal * torch.eye(K, dtype=torch.float64) + (1 - diagonal) * rows / rows.sum(1, keepdim=True)


def softmax_by_hand(z):
    return z.exp() / z.exp().sum(1, keepdim=True)


def one_hot(labels):
    return (labels.unsqueeze(1) == torch.arange(K)).to(torch.float64)


def ce_by_hand(z, y):
    return -softmax_by_hand(z)[torch.arange(len(y)), y].log().mean()


# The formulas of docs/losses.md in plain arithmetic: f(logits, labels, T, **settings).
BY_HAND = {
    "ce": lambda z, y, T: ce_by_hand(z, y),
    "forward": lambda z, y, T: -(softmax_by_hand(z) @ T).clamp_min(1e-12)[torch.arange(len(y)), y].log().mean(),
    "forward_estimated": lambda z, y, T, percentile, estimate_epochs: BY_HAND["forward"](z, y, T),
    "gce": lambda z, y, T, q: ((1 - softmax_by_hand(z)[torch.arange(len(y)), y] ** q) / q).mean(),
    "sce": lambda z, y, T, alpha, beta, A: alpha * ce_by_hand(z, y) + beta * (
        -(softmax_by_hand(z) * torch.where(one_hot(y) > 0, 0.0, A)).sum(1)).mean(),
    "label_smoothing": lambda z, y, T, eps: -(
        ((1 - eps) * one_hot(y) + eps / K) * softmax_by_hand(z).log()).sum(1).mean(),
    "bootstrap": lambda z, y, T, beta: -(softmax_by_hand(z).log() * (
        beta * one_hot(y) + (1 - beta) * one_hot(z.detach().argmax(1)))).sum(1).mean(),
}
OTHER_SETTINGS = {"forward_estimated": {"percentile": 90}, "gce": {"q": 0.3},
                  "sce": {"alpha": 0.5, "beta": 0.2, "A": -6}, "label_smoothing": {"eps": 0.35},
                  "bootstrap": {"beta": 0.55}}
CASES = [(name, {}) for name in LOSSES] + list(OTHER_SETTINGS.items())


def batch(dtype=torch.float64):
    logits = 3 * torch.randn(N, K, generator=generator(0), dtype=dtype)
    labels = torch.randint(0, K, (N,), generator=generator(1))
    return logits, labels


def value_and_gradient(fn, logits, labels):
    logits = logits.clone().requires_grad_(True)
    value = fn(logits, labels)
    value.backward()
    return value.detach(), logits.grad


def test_every_loss_has_a_formula_here_and_a_section_in_the_docs():
    assert set(BY_HAND) == set(LOSSES)
    docs = DOCS.read_text()
    for name, loss in LOSSES.items():
        assert f"`{name}`" in docs and loss.description
        assert all(f"{setting} = {default:g}" in docs for setting, default in loss.settings.items()), name


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name, settings", CASES)
def test_value_and_gradient_match_the_formula(name, settings, dtype):
    logits, labels = batch(dtype)
    transition = random_transition(1)
    fn = loss_function(name, settings, transition.to(dtype))
    by_hand = BY_HAND[name]
    full_settings = {**LOSSES[name].settings, **settings}
    expected = value_and_gradient(lambda z, y: by_hand(z.double(), y, transition, **full_settings), logits, labels)
    actual = value_and_gradient(fn, logits, labels)
    assert actual[0].shape == () and actual[0].dtype == dtype
    tolerance = {} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-6}
    torch.testing.assert_close(actual[0].double(), expected[0], **tolerance)
    torch.testing.assert_close(actual[1].double(), expected[1].double(), **tolerance)
    assert actual[1].abs().sum() > 0


@pytest.mark.parametrize("name", [name for name in LOSSES if not LOSSES[name].needs_label_noise])
def test_under_bfloat16_autocast_the_loss_is_computed_in_float32(name):
    """The bfloat16 logits of mixed-precision training give the loss of their float32 copy, not a bfloat16 one."""
    layer = torch.nn.Linear(20, K)
    inputs, labels = torch.randn(N, 20, generator=generator(7)), batch()[1]
    fn = loss_function(name, {}, None)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = layer(inputs)
        value = fn(logits, labels)
    assert logits.dtype == torch.bfloat16 and value.dtype == torch.float32
    torch.testing.assert_close(value, fn(logits.float(), labels))


@pytest.mark.parametrize("name, settings", [("gce", {"q": 1e-6}), ("label_smoothing", {"eps": 0.0}),
                                            ("bootstrap", {"beta": 1.0}), ("sce", {"alpha": 1.0, "beta": 0.0}),
                                            ("forward", {})])
def test_limits_that_equal_cross_entropy(name, settings):
    logits, labels = batch()
    identity = torch.eye(K, dtype=torch.float64)
    expected = value_and_gradient(torch.nn.functional.cross_entropy, logits, labels)
    actual = value_and_gradient(loss_function(name, settings, identity), logits, labels)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_gce_approaches_cross_entropy_as_q_shrinks_and_differs_at_its_default():
    logits, labels = batch()
    ce = torch.nn.functional.cross_entropy(logits, labels).item()
    gaps = [abs(loss_function("gce", {"q": q}, None)(logits, labels).item() - ce) for q in (0.7, 0.1, 0.01, 1e-3)]
    assert gaps == sorted(gaps, reverse=True) and gaps[0] > 0.5 and gaps[-1] < 0.01 * ce


def test_sce_reverse_term_is_clipped_at_A():
    """log 0 := A bounds the reverse term by -A: 0 for a sure right answer, -A for a sure wrong one."""
    labels = torch.tensor([0, 1, 2])
    logits = torch.full((3, K), -50.0, dtype=torch.float64)
    logits[0, 0] = logits[1, 5] = 50.0  # sure right, sure wrong
    rce = {A: loss_function("sce", {"alpha": 0.0, "beta": 1.0, "A": A}, None) for A in (-4.0, -8.0)}
    per_example = [[fn(logits[i : i + 1], labels[i : i + 1]).item() for i in range(3)] for fn in rce.values()]
    assert per_example[0] == pytest.approx([0.0, 4.0, 4.0 * (1 - 1 / K)])
    assert per_example[1] == pytest.approx([0.0, 8.0, 8.0 * (1 - 1 / K)])
    assert math.isfinite(loss_function("sce", {}, None)(logits, labels).item())


def test_forward_clamps_vanishing_noisy_probabilities_at_1e_minus_12():
    logits = torch.zeros(2, K, dtype=torch.float64)
    logits[:, 3] = 1000.0  # p(3 | x) = 1, every other class 0
    labels = torch.tensor([3, 4])
    fn = loss_function("forward", {}, torch.eye(K, dtype=torch.float64))
    assert fn(logits[1:], labels[1:]).item() == pytest.approx(-math.log(1e-12))
    assert fn(logits, labels).item() == pytest.approx(-math.log(1e-12) / 2)


def test_bootstrap_target_is_the_predicted_class_without_gradient_through_the_choice():
    """With beta = 0 the target is the argmax: its loss is the cross-entropy with the predicted labels."""
    logits, labels = batch()
    predicted = logits.argmax(1)
    expected = value_and_gradient(torch.nn.functional.cross_entropy, logits, predicted)
    torch.testing.assert_close(value_and_gradient(loss_function("bootstrap", {"beta": 0.0}, None), logits, labels),
                               expected)


def noisy_posteriors(transition: torch.Tensor, n: int = 20_000, anchor_share: float = 0.05,
                     outliers: int = 0) -> torch.Tensor:
    """p(noisy | x) = p(clean | x) T for diffuse clean posteriors plus, per class, a share of near-certain
    anchors (within 0.01 of one-hot); `outliers` examples per class have a noisy posterior exactly one-hot."""
    g = generator(0)
    exponentials = -torch.rand(n, K, generator=g, dtype=torch.float64).log()
    diffuse = exponentials / exponentials.sum(1, keepdim=True)  # uniform on the simplex: Dirichlet(1, ..., 1)
    classes = torch.arange(K).repeat_interleave(int(anchor_share * n))
    mixing = 0.01 * torch.rand(len(classes), 1, generator=g, dtype=torch.float64)
    anchors = (1 - mixing) * one_hot(classes) + mixing * diffuse[: len(classes)]
    clean = torch.cat([anchors, diffuse[len(classes) :]])
    outlier_rows = one_hot(torch.arange(K).repeat_interleave(outliers))
    noisy = torch.cat([clean @ transition, outlier_rows])
    return noisy[torch.randperm(len(noisy), generator=g)].float()


@pytest.mark.parametrize("transition", [random_transition(1), random_transition(2, diagonal=0.45),
                                        0.5 * torch.eye(K, dtype=torch.float64) + 0.5 * torch.ones(K, K) / K],
                         ids=["random_0.6", "random_0.45", "uniform_0.5"])
def test_estimate_recovers_a_known_transition_within_0_02(transition):
    estimate = estimate_transition(noisy_posteriors(transition))
    assert estimate.dtype == torch.float64 and estimate.shape == (K, K)
    torch.testing.assert_close(estimate.sum(1), torch.ones(K, dtype=torch.float64))
    assert (estimate - transition).abs().max() < 0.02
    assert (torch.eye(K) - transition).abs().max() > 0.3  # far from I, so recovering it is the estimator's work


def test_the_percentile_ignores_a_few_overconfident_outliers_that_the_argmax_takes():
    transition = random_transition(3)
    probs = noisy_posteriors(transition, outliers=20)  # 0.1% of the examples, one-hot in their noisy label
    assert (estimate_transition(probs) - transition).abs().max() < 0.02
    torch.testing.assert_close(estimate_transition(probs, percentile=100), torch.eye(K, dtype=torch.float64))


def test_estimate_takes_the_example_at_the_percentile_rank():
    probs = torch.rand(101, K, generator=generator(5))
    probs = probs / probs.sum(1, keepdim=True)
    for percentile, rank in ((97, 97), (100, 100), (0, 0), (96.5, 97)):
        anchors = probs.argsort(0)[rank]
        expected = probs[anchors].double()
        torch.testing.assert_close(estimate_transition(probs, percentile), expected / expected.sum(1, keepdim=True))


@pytest.mark.parametrize("name, settings, transition, message", [
    ("focal", {}, None,
     r"unknown loss 'focal'; allowed: ce, forward, forward_estimated, gce, sce, label_smoothing, bootstrap$"),
    ("gce", {"Q": 0.5}, None, r"loss 'gce' has no setting 'Q'; its settings: q$"),
    ("ce", {"q": 0.5}, None, r"loss 'ce' has no setting 'q'; its settings: none$"),
    ("sce", {"alpha": "lots"}, None, r"loss 'sce' setting alpha='lots' is not a finite number"),
    ("sce", {"beta": math.inf}, None, r"loss 'sce' setting beta=inf is not a finite number"),
    ("gce", {"q": 0}, None, r"gce's q must be in \(0, 1\], got 0"),
    ("sce", {"A": 1}, None, r"sce's A \(the value of log 0\) must be < 0, got 1"),
    ("sce", {"beta": -1}, None, r"sce's alpha and beta must be >= 0"),
    ("label_smoothing", {"eps": 1.5}, None, r"label_smoothing's eps must be in \[0, 1\], got 1.5"),
    ("bootstrap", {"beta": -0.1}, None, r"bootstrap's beta must be in \[0, 1\], got -0.1"),
    ("forward_estimated", {"percentile": 120}, torch.eye(K), r"percentile must be in \[0, 100\], got 120"),
    ("forward", {}, None, r"forward correction needs the K x K transition matrix T, got None"),
])
def test_bad_names_and_settings_raise_one_clear_line(name, settings, transition, message):
    with pytest.raises(ValueError, match=message) as error:
        loss_function(name, settings, transition)
    assert "\n" not in str(error.value)


def test_estimate_rejects_a_percentile_outside_0_100():
    with pytest.raises(ValueError, match=r"percentile must be in \[0, 100\], got -1"):
        estimate_transition(torch.full((4, K), 1.0 / K), percentile=-1)


def test_settings_are_the_papers_defaults_filled_in_around_the_given_ones():
    assert losses.loss_settings("sce", {"beta": "0.5"}) == {"alpha": 0.01, "beta": 0.5, "A": -4.0}
    assert losses.loss_settings("forward_estimated", None) == {"percentile": 97.0, "estimate_epochs": 5.0}
    assert {name for name, loss in LOSSES.items() if loss.needs_label_noise} == {"forward", "forward_estimated"}
