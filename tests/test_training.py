"""One training run: models, the optimizer, losses and forward correction, mixed precision, the
training loop and prediction, the validation split and epoch selection, and train_and_evaluate
end to end (results, determinism, common random numbers, memorisation, the noisy test, CUDA).

Runs train tiny MLPs on a few hundred to a few thousand real MNIST examples; the one run on
full MNIST is marked slow.
"""
import dataclasses
import math

import numpy as np
import pytest
import torch
from torch import nn

import losses
import nnet_models as nm
import registry
from nnet_models import TrainConfig, build_model, make_activation
from registry import ECE_BINS

K = registry.NUM_CLASSES
LABEL_TYPES, PIXEL_TYPES = registry.of_kind("label"), registry.of_kind("pixel")
CPU = torch.device("cpu")
# A K x K row-stochastic M for label_matrix: half the mass stays, half goes to the next class.
HALF_NEXT = tuple(tuple(0.5 if j in (i, (i + 1) % K) else 0.0 for j in range(K)) for i in range(K))
MEMORISATION_KEYS = {"memorised_fraction", "corrupted_true_fraction", "clean_train_accuracy"}
NOISY_TEST_KEYS = {"noisy_test_accuracy", "noisy_test_loss"}
METRIC_KEYS = {"test_loss", "test_accuracy", "test_macro_precision", "test_macro_recall", "test_macro_roc_auc",
               "test_ece", "test_mean_confidence"}


@pytest.fixture(scope="module")
def mnist_2k_test(mnist) -> nm.Dataset:
    """The full training set and the first 2000 test images (faster evaluation every epoch)."""
    return nm.Dataset(mnist.train_images, mnist.train_labels, mnist.test_images[:2000], mnist.test_labels[:2000])


def tiny(mnist_dir, **overrides) -> TrainConfig:
    base = dict(data_dir=str(mnist_dir), max_train_samples=500, epochs=1, hidden_sizes=(32,), seed=0)
    return TrainConfig(**{**base, **overrides})


def noise_config(mnist_dir, noise_type: str, **overrides) -> TrainConfig:
    """`tiny` with this noise type; label_matrix gets a matrix."""
    return tiny(mnist_dir, noise_type=noise_type, noise_matrix=HALF_NEXT if noise_type == "label_matrix" else None,
                **overrides)


def without_time(result: dict) -> dict:
    return {k: v for k, v in result.items() if k not in ("seconds", "train_seconds")}


def same(a, b) -> bool:
    """Equality of results, where NaN equals NaN (empty reliability bins, memorisation at p=0)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and a == b


def test_same_helper_is_strict():
    nan = float("nan")
    assert same({"a": [nan, 1.0], "b": (1,)}, {"a": [float("nan"), 1.0], "b": (1,)})
    assert not same({"a": [nan, 1.0]}, {"a": [nan, 1.5]})
    assert not same({"a": 1.0}, {"a": nan})
    assert not same({"a": (1,)}, {"a": [1]})
    assert not same({"a": 1}, {"a": 1, "b": 2})


def assert_names_allowed(info, bad, allowed):
    msg = str(info.value)
    assert bad in msg
    for name in allowed:
        assert name in msg, f"{name!r} missing from {msg!r}"


# ================================================================ models


@pytest.mark.parametrize("activation", nm.ACTIVATIONS)
@pytest.mark.parametrize("model_type", nm.MODEL_TYPES)
def test_output_shape(model_type, activation):
    torch.manual_seed(0)
    out = build_model(model_type, activation)(torch.rand(5, 1, 28, 28))
    assert out.shape == (5, K)
    assert torch.isfinite(out).all()


def mlp_param_count(hidden_sizes) -> int:
    widths = [28 * 28, *hidden_sizes, K]
    return sum(a * b + b for a, b in zip(widths, widths[1:]))


@pytest.mark.parametrize("hidden_sizes", [(), (32,), (256, 128), (64, 32, 16), [100, 50]])
def test_mlp_parameter_count(hidden_sizes):
    model = build_model("mlp", "relu", hidden_sizes)
    assert nm.count_parameters(model) == mlp_param_count(hidden_sizes)
    assert [m.out_features for m in model.modules() if isinstance(m, nn.Linear)] == [*hidden_sizes, K]


def test_default_mlp_and_cnn_parameter_counts():
    assert nm.count_parameters(build_model("mlp", "relu")) == 784 * 256 + 256 + 256 * 128 + 128 + 128 * 10 + 10
    cnn = (1 * 32 * 9 + 32) + (32 * 64 * 9 + 64) + (64 * 7 * 7 * 128 + 128) + (128 * 10 + 10)
    assert nm.count_parameters(build_model("cnn", "relu")) == cnn == 421_642
    wider = build_model("mlp", "relu", (128,))
    assert nm.count_parameters(build_model("mlp", "relu", (64,))) != nm.count_parameters(wider)


def convolutions(model: nn.Module) -> list[nn.Conv2d]:
    return [m for m in model.modules() if isinstance(m, nn.Conv2d)]


def test_cnn_runs_channels_last_and_computes_the_same_function():
    """The CNN's convolutions run on channels-last (NHWC) tensors, for speed; the layout must
    not change what it computes, nor its gradients."""
    torch.manual_seed(0)
    model = build_model("cnn", "relu")
    conv = convolutions(model)[1]
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert not conv.weight.is_contiguous()
    nchw = nm.SimpleCNN("relu")
    nchw.load_state_dict(model.state_dict())
    assert convolutions(nchw)[1].weight.is_contiguous()
    x = torch.rand(16, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    labels = torch.arange(16) % K
    outputs = []
    for net in (model, nchw):
        logits = net(x)
        nn.functional.cross_entropy(logits, labels).backward()
        outputs.append((logits.detach(), convolutions(net)[1].weight.grad.contiguous()))
    assert torch.allclose(outputs[0][0], outputs[1][0], atol=1e-5)
    assert torch.allclose(outputs[0][1], outputs[1][1], atol=1e-5)


def is_non_decreasing(activation: str) -> bool:
    x = torch.linspace(-6, 6, 10_001)
    y = make_activation(activation)(x)
    return bool((y[1:] >= y[:-1]).all())


@pytest.mark.parametrize("activation", nm.ACTIVATIONS)
def test_cnn_pools_before_a_non_decreasing_activation_and_computes_the_textbook_function(activation):
    """conv -> activation -> max-pool is what the CNN computes; for a non-decreasing activation it
    pools first (faster), which must give the same outputs and gradients."""
    torch.manual_seed(0)
    model = nm.SimpleCNN(activation)
    assert type(model[1]) is (nn.MaxPool2d if is_non_decreasing(activation) else type(make_activation(activation)))
    conv1, conv2 = convolutions(model)
    linear1, linear2 = [m for m in model.modules() if isinstance(m, nn.Linear)]
    textbook = nn.Sequential(
        conv1, make_activation(activation), nn.MaxPool2d(2), conv2, make_activation(activation), nn.MaxPool2d(2),
        nn.Flatten(), linear1, make_activation(activation), linear2)
    x = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(1)) * 3
    labels = torch.arange(8) % K
    results = []
    for net in (model, textbook):
        net.zero_grad()
        logits = net(x)
        nn.functional.cross_entropy(logits, labels).backward()
        results.append([logits.detach()] + [p.grad.clone() for p in net.parameters()])
    assert len(results[0]) == len(results[1]) == 9  # logits and 8 parameter tensors
    for ours, theirs in zip(*results):
        assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name, cls", [("relu", nn.ReLU), ("tanh", nn.Tanh), ("sigmoid", nn.Sigmoid),
                                       ("leaky_relu", nn.LeakyReLU), ("gelu", nn.GELU)])
def test_make_activation_types(name, cls):
    assert isinstance(make_activation(name), cls)
    assert make_activation(name) is not make_activation(name)  # a fresh module every time


def test_leaky_relu_slope_is_0_1():
    act = make_activation("leaky_relu")
    assert act.negative_slope == pytest.approx(0.1)
    assert torch.allclose(act(torch.tensor([-2.0, -1.0, 0.0, 3.0])), torch.tensor([-0.2, -0.1, 0.0, 3.0]))
    for model_type in nm.MODEL_TYPES:  # and the models really use it
        slopes = {m.negative_slope for m in build_model(model_type, "leaky_relu").modules()
                  if isinstance(m, nn.LeakyReLU)}
        assert slopes == {0.1}


@pytest.mark.parametrize("model_type", nm.MODEL_TYPES)
def test_model_uses_the_requested_activation(model_type):
    kinds = {type(m) for m in build_model(model_type, "tanh").modules()}
    assert nn.Tanh in kinds and nn.ReLU not in kinds


def test_unknown_activation_raises():
    with pytest.raises(ValueError) as info:
        make_activation("swish")
    assert_names_allowed(info, "swish", nm.ACTIVATIONS)
    with pytest.raises(ValueError) as info:
        build_model("mlp", "swish")
    assert_names_allowed(info, "swish", nm.ACTIVATIONS)


def test_unknown_model_type_raises():
    with pytest.raises(ValueError) as info:
        build_model("resnet", "relu")
    assert_names_allowed(info, "resnet", nm.MODEL_TYPES)


# ================================================================ optimizer


@pytest.mark.parametrize("weight_decay", [0.0, 1e-2])
@pytest.mark.parametrize("name", ["adam", "sgd"])
def test_optimizer_updates_are_torch_optims_bit_for_bit(name, weight_decay):
    """The same parameters, step after step, as torch.optim.Adam(fused=True) or torch.optim.SGD
    with momentum 0.9, whose kernels it calls without the Optimizer class around them."""
    torch.manual_seed(0)
    ours, reference = build_model("mlp", "relu", (8,)), build_model("mlp", "relu", (8,))
    reference.load_state_dict(ours.state_dict())
    optimizer = nm.Optimizer(ours, TrainConfig(optimizer=name, learning_rate=0.01, weight_decay=weight_decay))
    if name == "adam":
        torch_optimizer = torch.optim.Adam(reference.parameters(), lr=0.01, weight_decay=weight_decay, fused=True)
    else:
        torch_optimizer = torch.optim.SGD(reference.parameters(), lr=0.01, momentum=0.9, weight_decay=weight_decay)
    images, labels = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    for _ in range(4):
        for model, opt in ((ours, optimizer), (reference, torch_optimizer)):
            opt.zero_grad()
            nn.functional.cross_entropy(model(images), labels).backward()
            opt.step()
        assert all(torch.equal(p, q) for p, q in zip(ours.parameters(), reference.parameters()))


def test_optimizer_steps_by_hand():
    """With a constant gradient of 1: SGD with momentum 0.9 moves by lr, then 1.9 lr; Adam's
    first step is lr (the gradient over its own magnitude)."""
    for name, moves in [("sgd", [0.1, 0.1 + 0.19]), ("adam", [0.1, 0.2])]:
        model = nn.Linear(3, 1)
        start = [p.detach().clone() for p in model.parameters()]
        optimizer = nm.Optimizer(model, TrainConfig(optimizer=name, learning_rate=0.1))
        for move in moves:
            optimizer.zero_grad()
            sum(p.sum() for p in model.parameters()).backward()  # gradient 1 for every weight
            optimizer.step()
            for p, p0 in zip(model.parameters(), start):
                assert torch.allclose(p.detach(), p0 - move, atol=1e-6), (name, move)


def test_unknown_optimizer_raises():
    with pytest.raises(ValueError) as info:
        nm.Optimizer(build_model("mlp", "relu", (8,)), TrainConfig(optimizer="rmsprop"))
    assert_names_allowed(info, "rmsprop", nm.OPTIMIZERS)


# ================================================================ losses and forward correction


@pytest.mark.parametrize("noise_type, p, identifiable", [
    ("label_flip", 0.9, False), ("label_flip", 0.89, True), ("label_flip", 0.95, True),
    ("label_uniform", 1.0, False), ("label_uniform", 0.99, True), ("label_pairflip", 0.5, False),
    ("label_pairflip", 0.4, True)])
def test_forward_correction_is_refused_where_the_transition_matrix_is_singular(noise_type, p, identifiable):
    cfg = TrainConfig(noise_type=noise_type, p=p, loss="forward")
    problem = nm.forward_correction_problem(cfg)
    assert (problem is None) == identifiable
    assert problem is None or f"T of {noise_type} at p={p:g} has condition number" in problem
    assert nm.forward_correction_problem(TrainConfig(noise_type=noise_type, p=p)) is None  # no correction
    # the estimated T is whatever the first model gives: not refused before training
    assert nm.forward_correction_problem(TrainConfig(noise_type=noise_type, p=p, loss="forward_estimated")) is None


def test_training_loss_uses_the_runs_true_transition_matrix():
    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(64, K, generator=g), torch.randint(0, K, (64,), generator=g)
    for noise_type, p, matrix in [("label_pairflip", 0.45, None), ("label_flip", 0.6, None),
                                  ("label_matrix", 0.5, HALF_NEXT)]:
        cfg = TrainConfig(noise_type=noise_type, p=p, noise_matrix=matrix, loss="forward")
        loss_fn, fields = nm.training_loss(cfg, None, CPU)
        transition = torch.from_numpy(registry.transition_matrix(noise_type, p, matrix)).float()
        want = losses.loss_function("forward", {}, transition)(logits, labels)
        assert fields == {} and loss_fn(logits, labels).item() == pytest.approx(want.item(), rel=1e-6)
        assert want.item() != pytest.approx(nn.functional.cross_entropy(logits, labels).item(), rel=1e-3)
    plain, _ = nm.training_loss(TrainConfig(noise_type="label_flip", p=0.6), None, CPU)
    assert plain(logits, labels).item() == nn.functional.cross_entropy(logits, labels).item()
    gce, _ = nm.training_loss(TrainConfig(loss="gce", loss_settings=(("q", 0.5),)), None, CPU)
    assert gce(logits, labels).item() == pytest.approx(losses.loss_function("gce", {"q": 0.5}, None)(logits, labels).item())
    with pytest.raises(ValueError) as info:
        nm.training_loss(TrainConfig(loss="backward"), None, CPU)
    assert_names_allowed(info, "backward", losses.LOSSES)


def test_forward_estimated_records_its_estimate_and_its_error(mnist_dir, mnist_2k_test):
    cfg = tiny(mnist_dir, noise_type="label_pairflip", p=0.3, max_train_samples=2000, loss="forward_estimated",
               loss_settings=(("estimate_epochs", 2.0), ("percentile", 97.0)))
    result = nm.train_and_evaluate(cfg, mnist_2k_test)
    estimate = np.array(result["estimated_transition"])
    assert estimate.shape == (K, K) and np.allclose(estimate.sum(1), 1.0) and (estimate >= 0).all()
    error = np.abs(estimate - registry.transition_matrix("label_pairflip", 0.3))
    assert result["transition_error_mean"] == pytest.approx(error.mean())
    assert result["transition_error_max"] == pytest.approx(error.max())
    assert result["transition_error_mean"] < 0.2  # a first model of 2 epochs already sees the pair structure
    plain = nm.train_and_evaluate(dataclasses.replace(cfg, loss="ce", loss_settings=()), mnist_2k_test)
    assert "transition_error_mean" not in plain and "estimated_transition" not in plain


def test_forward_correction_beats_plain_cross_entropy_under_pair_flip(mnist_dir, mnist_2k_test):
    """Pair flip at p = 0.45 (Patrini et al.'s hard case): plain cross-entropy learns the noise
    (~50% test accuracy here), forward correction with the true T recovers the classes (~88%)."""
    results = {}
    for correction in ("ce", "forward"):
        results[correction] = [nm.train_and_evaluate(TrainConfig(
            data_dir=str(mnist_dir), noise_type="label_pairflip", p=0.45, loss=correction,
            max_train_samples=5000, epochs=5, hidden_sizes=(128,), seed=seed), mnist_2k_test) for seed in range(3)]
    accuracy = {c: np.array([r["test_accuracy"] for r in runs]) for c, runs in results.items()}
    assert accuracy["forward"].mean() > accuracy["ce"].mean() + 0.15, accuracy
    assert (accuracy["forward"] > accuracy["ce"]).all(), accuracy  # paired: every seed
    assert accuracy["forward"].min() > 0.75, accuracy
    # plain CE memorises the flipped labels of its training examples; forward correction does not
    memorised = {c: np.mean([r["memorised_fraction"] for r in runs]) for c, runs in results.items()}
    true_on_corrupted = {c: np.mean([r["corrupted_true_fraction"] for r in runs]) for c, runs in results.items()}
    assert memorised["ce"] > memorised["forward"] + 0.2, memorised
    assert true_on_corrupted["forward"] > true_on_corrupted["ce"] + 0.2, true_on_corrupted
    assert all(r["loss"] == c for c, runs in results.items() for r in runs)


# ================================================================ training loop, precision, prediction


def test_unknown_precision_raises():
    with pytest.raises(ValueError) as info:
        nm.training_precision("float16", CPU)
    assert_names_allowed(info, "float16", nm.PRECISIONS)


@pytest.mark.parametrize("precision, compute_dtype", [("float32", torch.float32), ("bfloat16", torch.bfloat16)])
def test_training_passes_compute_in_the_precision_and_keep_float32_state(precision, compute_dtype):
    """Mixed precision: the layers' outputs in bfloat16; weights, gradients and Adam's moments
    in float32."""
    cfg = TrainConfig(noise_type="pixel_uniform", p=0.2, precision=precision)
    torch.manual_seed(0)
    model = build_model("mlp", "relu", (16,))
    seen = []
    model[1].register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))  # the first Linear
    optimizer = nm.Optimizer(model, cfg)
    images, labels = torch.randint(0, 256, (64, 784), dtype=torch.uint8), torch.randint(0, K, (64,))
    loss = nm.train_one_epoch(model, optimizer, nm.BatchSource(cfg, images, CPU), labels, 16,
                              torch.Generator().manual_seed(0), precision=precision)
    assert seen == [compute_dtype] * 4  # one forward pass per batch of 16
    assert math.isfinite(loss)
    moments = [*optimizer.exp_avgs, *optimizer.exp_avg_sqs]
    assert len(moments) == 2 * len(list(model.parameters()))
    state = [*model.parameters(), *(p.grad for p in model.parameters()), *moments]
    assert {t.dtype for t in state} == {torch.float32}


class RecordingSource:
    """A BatchSource that remembers the indices of every batch asked for."""

    def __init__(self, source):
        self.source, self.seen = source, []

    def batch(self, indices):
        self.seen.append(indices.clone())
        return self.source.batch(indices)


def test_train_one_epoch_visits_each_example_once_and_returns_the_mean_loss():
    cfg = TrainConfig()
    images, labels = torch.randint(0, 256, (100, 1, 28, 28), dtype=torch.uint8), torch.randint(0, K, (100,))
    torch.manual_seed(0)
    model = build_model("mlp", "relu", (8,))
    source = RecordingSource(nm.BatchSource(cfg, images, CPU))
    losses = []

    def recording_loss(logits, batch_labels):
        loss = nn.functional.cross_entropy(logits, batch_labels)
        losses.append((loss.item(), len(batch_labels)))
        return loss

    subset = torch.arange(3, 100, 2)  # 49 examples
    mean = nm.train_one_epoch(model, nm.Optimizer(model, cfg), source, labels, 16,
                              torch.Generator().manual_seed(0), subset, recording_loss)
    assert [len(b) for b in source.seen] == [16, 16, 16, 1]
    assert torch.equal(torch.cat(source.seen).sort().values, subset)
    assert not torch.equal(torch.cat(source.seen), subset)  # in random order
    assert mean == pytest.approx(sum(loss * n for loss, n in losses) / 49, rel=1e-6)
    # another epoch of the same generator: another order; without indices, every example
    again = RecordingSource(source.source)
    nm.train_one_epoch(model, nm.Optimizer(model, cfg), again, labels, 32, torch.Generator().manual_seed(1))
    assert torch.equal(torch.cat(again.seen).sort().values, torch.arange(100))


def test_predict_is_the_model_on_the_sources_batches(mnist):
    torch.manual_seed(0)
    model = build_model("mlp", "relu", (8,))
    model.train()
    indices = torch.arange(1000, 1600)  # over two evaluation batches, and a partial one
    clean = nm.BatchSource(TrainConfig(), mnist.train_images, CPU)
    logits = nm.predict(model, clean, indices)
    assert not model.training and not logits.requires_grad
    with torch.no_grad():
        assert torch.allclose(logits, model(clean.batch(indices)), atol=1e-5)
    # with pixel noise: one draw per call, the same again from a fresh source of the same stream
    cfg = TrainConfig(noise_type="pixel_uniform", p=0.5)
    noisy = nm.predict(model, nm.BatchSource(cfg, mnist.train_images, CPU, "validation_noise"), indices)
    again = nm.predict(model, nm.BatchSource(cfg, mnist.train_images, CPU, "validation_noise"), indices)
    assert torch.equal(noisy, again) and not torch.allclose(noisy, logits, atol=1e-3)


# ================================================================ validation split, preparing a run, history


@pytest.mark.parametrize("n, fraction", [(1000, 0.1), (1001, 0.25), (7, 0.5), (60_000, 0.1)])
def test_split_validation_is_a_disjoint_random_split(n, fraction):
    cfg = TrainConfig(validation_fraction=fraction, seed=3)
    train, validation = nm.split_validation(cfg, n, CPU)
    assert len(validation) == round(fraction * n) and len(train) == n - round(fraction * n)
    assert torch.equal(torch.cat([train, validation]).sort().values, torch.arange(n))  # disjoint, complete
    assert torch.equal(train, train.sort().values) and torch.equal(validation, validation.sort().values)
    again = nm.split_validation(cfg, n, CPU)
    assert torch.equal(again[0], train) and torch.equal(again[1], validation)
    if n >= 1000:  # random, not the last rows, and another seed gives another split
        assert validation.max() - validation.min() > n / 2
        other = nm.split_validation(dataclasses.replace(cfg, seed=4), n, CPU)[1]
        assert not torch.equal(other, validation)


def test_no_validation_fraction_means_no_split():
    train, validation = nm.split_validation(TrainConfig(), 500, CPU)
    assert validation is None and torch.equal(train, torch.arange(500))
    # a fraction too small to hold out a single example is no split either
    assert nm.split_validation(TrainConfig(validation_fraction=0.0004), 1000, CPU)[1] is None


def test_validation_fraction_that_leaves_no_training_data_is_a_clear_error(mnist_dir, mnist_2k_test):
    with pytest.raises(ValueError, match="validation_fraction"):
        nm.split_validation(TrainConfig(validation_fraction=0.999), 300, CPU)
    with pytest.raises(ValueError, match="validation_fraction"):
        nm.train_and_evaluate(tiny(mnist_dir, max_train_samples=300, validation_fraction=0.999), mnist_2k_test)


def test_prepare_run_label_noise(mnist_2k_test):
    cfg = TrainConfig(noise_type="label_flip", p=0.4, max_train_samples=1000, validation_fraction=0.2, seed=3)
    run = nm.prepare_run(cfg, mnist_2k_test, CPU)
    assert torch.equal(run.clean_labels, mnist_2k_test.train_labels[:1000])
    assert int((run.labels != run.clean_labels).sum()) == 400  # label_flip: every chosen label changes
    expected_labels, _ = nm.corrupt_labels(run.clean_labels, 0.4, torch.from_numpy(registry.relabel_matrix("label_flip")),
                                          nm.make_generator(3, "label_noise"))
    assert torch.equal(run.labels, expected_labels)  # the run's label_noise stream
    train, validation = nm.split_validation(cfg, 1000, CPU)
    assert torch.equal(run.train_indices, train) and torch.equal(run.validation_indices, validation)
    # memorisation is checked on (up to MEMORISATION_SAMPLE) distinct training examples, never validation ones
    sample = run.memorisation_indices
    assert len(sample) == min(nm.MEMORISATION_SAMPLE, 800) and len(sample.unique()) == len(sample)
    assert np.isin(sample.numpy(), train.numpy()).all()
    assert run.test_source.images is mnist_2k_test.test_images and torch.equal(run.test_labels,
                                                                               mnist_2k_test.test_labels)
    assert not run.source.pixel_noise and not run.clean_source.pixel_noise and not run.test_source.pixel_noise


def test_prepare_run_pixel_noise(mnist_2k_test):
    cfg = TrainConfig(noise_type="pixel_empirical", p=0.3, max_train_samples=700)
    run = nm.prepare_run(cfg, mnist_2k_test, CPU)
    assert torch.equal(run.labels, run.clean_labels) and run.validation_indices is None
    assert torch.equal(run.train_indices, torch.arange(700)) and len(run.memorisation_indices) == 700
    assert run.source.pixel_noise and not run.clean_source.pixel_noise and not run.test_source.pixel_noise
    # the noise looks like the run's own training images
    assert torch.equal(run.source.cdf, nm.pixel_intensity_cdf(mnist_2k_test.train_images[:700]))
    indices = torch.arange(10)
    assert torch.equal(run.clean_source.batch(indices), nm.BatchSource(TrainConfig(), run.source.images,
                                                                       CPU).batch(indices))


def test_max_train_samples_beyond_the_training_set_means_all_of_it(mnist_dir, mnist):
    small = nm.Dataset(mnist.train_images[:300], mnist.train_labels[:300], mnist.test_images[:200],
                       mnist.test_labels[:200])
    cfg = tiny(mnist_dir, max_train_samples=500, validation_fraction=0.2)
    run = nm.prepare_run(cfg, small, CPU)
    assert len(run.labels) == 300 and len(run.train_indices) + len(run.validation_indices) == 300
    assert len(run.validation_indices) == 60
    result = nm.train_and_evaluate(cfg, small)
    assert math.isfinite(result["test_loss"]) and result["max_train_samples"] == 500


def test_results_at_by_hand(mnist_2k_test):
    history = {"test_accuracy": [0.5, 0.7, 0.6, 0.65], "test_loss": [1.0, 0.8, 0.9, 0.85],
               "validation_loss": [0.9, 0.7, 0.8, 0.7]}
    cfg = TrainConfig(noise_type="label_flip", p=0.2)
    run = nm.prepare_run(cfg, mnist_2k_test, CPU)
    logits = torch.zeros(len(run.test_labels), K)
    results = nm.results_at(None, cfg, run, history, logits)
    reliability = results.pop("reliability")
    assert results == {
        "test_accuracy": 0.65, "test_loss": 0.85, "validation_loss": 0.7,
        "selected_epoch": 2, "selected_test_accuracy": 0.7, "selected_test_loss": 0.8,  # the first lowest
        "noisy_test_accuracy": 0.65, "noisy_test_loss": 0.85,  # no pixel noise: the clean test
    }
    assert type(results["selected_epoch"]) is int
    assert reliability["count"][int(ECE_BINS / K)] == len(run.test_labels)  # constant logits: confidence 1/K
    without = nm.results_at(None, cfg, run, {"test_accuracy": [0.5], "test_loss": [1.0]}, logits)
    assert not any(k.startswith("selected_") for k in without) and without["test_accuracy"] == 0.5


# ================================================================ train_and_evaluate: results


def test_result_keys_and_history_length(mnist_dir, mnist):
    cfg = tiny(mnist_dir, epochs=2)
    result = nm.train_and_evaluate(cfg, mnist)
    per_epoch = METRIC_KEYS | MEMORISATION_KEYS  # no pixel noise (the clean default): memorisation too
    expected = {f.name for f in dataclasses.fields(TrainConfig)} | per_epoch | NOISY_TEST_KEYS | {
        f"history_{k}" for k in per_epoch} | {"train_loss", "n_params", "reliability", "seconds", "train_seconds",
                                              "history_train_loss", "reported"}
    assert set(result) == expected
    for field in dataclasses.fields(TrainConfig):
        assert result[field.name] == getattr(cfg, field.name)
    for key in per_epoch:
        assert len(result[f"history_{key}"]) == cfg.epochs, key
        assert same(result[f"history_{key}"][-1], result[key]), key
    assert set(result["reliability"]) == {"count", "confidence", "accuracy"}
    assert sum(result["reliability"]["count"]) == len(mnist.test_labels)
    assert len(result["reliability"]["count"]) == ECE_BINS
    # p = 0: nothing is corrupted, so the memorisation fractions on corrupted examples are NaN
    assert math.isnan(result["memorised_fraction"]) and math.isnan(result["corrupted_true_fraction"])
    assert 0.0 <= result["clean_train_accuracy"] <= 1.0
    assert 0.0 <= result["test_ece"] <= 1.0 and 1 / K <= result["test_mean_confidence"] <= 1.0
    assert result["n_params"] == nm.count_parameters(build_model("mlp", "relu", (32,)))
    assert 0 < result["train_seconds"] < result["seconds"]  # the rest: set-up and evaluation
    assert np.isfinite(result["train_loss"])
    assert result["test_accuracy"] > 0.3  # even 8 optimizer steps on 500 examples beat chance (0.1) clearly
    assert result["reported"] == {} and result["noise_type"] == registry.CLEAN


def test_a_run_reports_each_shorter_length_as_that_shorter_run_would(mnist_dir, mnist_2k_test):
    """With reported_epochs, the results after those epochs are a run of that length's, bit for bit
    (the learning rate is constant); the history is the longest run's."""
    cfg = noise_config(mnist_dir, "label_flip", p=0.4, epochs=3, reported_epochs=(1, 2), validation_fraction=0.2)
    long = nm.train_and_evaluate(cfg, mnist_2k_test)
    assert sorted(long["reported"]) == ["1", "2"] and len(long["history_test_loss"]) == 3
    for epochs in (1, 2):
        short = nm.train_and_evaluate(dataclasses.replace(cfg, epochs=epochs, reported_epochs=()), mnist_2k_test)
        reported = without_time(long["reported"][str(epochs)])
        assert set(reported) == set(without_time(short)) - {f.name for f in dataclasses.fields(TrainConfig)} - {
            "n_params", "reported"} - {k for k in short if k.startswith("history_")}
        assert same(reported, {k: short[k] for k in reported}), epochs
    assert long["reported"]["1"]["test_loss"] != long["test_loss"]
    assert long["reported"]["1"]["train_seconds"] < long["reported"]["2"]["train_seconds"] < long["train_seconds"]


def test_results_have_exactly_the_documented_metrics(mnist_dir, mnist_2k_test):
    """What the runs return is what registry.METRICS (the per-run CSV's columns) names: every
    documented metric is produced by some run and nothing else is; every per-epoch metric (the
    history CSV's columns) has its per-epoch list."""
    label = nm.train_and_evaluate(tiny(mnist_dir, noise_type="label_flip", p=0.3, validation_fraction=0.2),
                                  mnist_2k_test)
    pixel = nm.train_and_evaluate(tiny(mnist_dir, noise_type="pixel_uniform", p=0.3), mnist_2k_test)
    estimated = nm.train_and_evaluate(tiny(mnist_dir, noise_type="label_flip", p=0.3, loss="forward_estimated",
                                           loss_settings=(("estimate_epochs", 1.0), ("percentile", 97.0))),
                                      mnist_2k_test)
    config_names = {f.name for f in dataclasses.fields(TrainConfig)}
    produced, histories = set(), set()
    for result in (label, pixel, estimated):
        histories |= {k.removeprefix("history_") for k in result if k.startswith("history_")}
        produced |= set(result) - config_names - {"n_params", "reliability", "reported", "estimated_transition"} - {
            k for k in result if k.startswith("history_")}
    assert produced == set(registry.METRICS)
    assert set(registry.per_epoch_metrics()) == histories


def test_loads_data_from_data_dir_when_not_given(mnist_dir, mnist):
    cfg = tiny(mnist_dir)
    assert same(without_time(nm.train_and_evaluate(cfg)), without_time(nm.train_and_evaluate(cfg, mnist)))


@pytest.mark.parametrize("noise_type, p", [("label_uniform", 0.3), ("label_flip", 0.5),
                                           ("label_pairflip", 0.4), ("label_matrix", 0.5),
                                           ("pixel_uniform", 0.3), ("pixel_empirical", 0.3)])
def test_same_config_is_deterministic(mnist_dir, mnist_2k_test, noise_type, p):
    cfg = noise_config(mnist_dir, noise_type, p=p, validation_fraction=0.1)
    first = nm.train_and_evaluate(cfg, mnist_2k_test)
    nm.train_and_evaluate(tiny(mnist_dir, seed=5), mnist_2k_test)  # unrelated run in between
    second = nm.train_and_evaluate(cfg, mnist_2k_test)
    assert same(without_time(first), without_time(second))
    assert len(without_time(first)) > 30  # the comparison covers the whole result


def test_different_seeds_differ(mnist_dir, mnist_2k_test):
    a = nm.train_and_evaluate(tiny(mnist_dir, seed=0), mnist_2k_test)
    b = nm.train_and_evaluate(tiny(mnist_dir, seed=1), mnist_2k_test)
    assert a["test_loss"] != b["test_loss"]
    assert a["train_loss"] != b["train_loss"]


def test_noise_changes_the_result(mnist_dir, mnist_2k_test):
    clean = nm.train_and_evaluate(tiny(mnist_dir), mnist_2k_test)
    for noise_type in registry.noisy_types():
        noisy = nm.train_and_evaluate(noise_config(mnist_dir, noise_type, p=0.5), mnist_2k_test)
        assert noisy["train_loss"] != clean["train_loss"], noise_type


def test_p_zero_is_the_same_run_for_every_noise_type(mnist_dir, mnist_2k_test):
    """Common random numbers: at p=0 the noise type must not matter at all, so one clean run (noise type "none")
    serves them all. Only pixel-noise runs leave the memorisation metrics out; the noisy test at p = 0 is the
    clean test."""
    results = {t: without_time(nm.train_and_evaluate(noise_config(mnist_dir, t, p=0.0), mnist_2k_test))
               for t in registry.NOISE_TYPES}
    memorisation = MEMORISATION_KEYS | {f"history_{k}" for k in MEMORISATION_KEYS}
    popped = {}
    for t, r in results.items():
        assert r.pop("noise_type") == t
        assert r.pop("noise_matrix") == (HALF_NEXT if t == "label_matrix" else None)
        assert r["noisy_test_accuracy"] == r["test_accuracy"] and r["noisy_test_loss"] == r["test_loss"]
        assert (memorisation <= set(r)) == (t not in PIXEL_TYPES), t
        popped[t] = {key: r.pop(key) for key in memorisation & set(r)}
    clean = results[registry.CLEAN]
    assert all(same(r, clean) for r in results.values())
    # ...and every type but pixel noise agrees on the memorisation metrics too (computed on the same sample)
    assert all(same(popped[t], popped[registry.CLEAN]) for t in (*LABEL_TYPES, registry.CLEAN))


def read_from_disk(mnist_dir) -> list[torch.Tensor]:
    arrays = {name: nm.read_idx(mnist_dir / f) for name, f in nm.IDX_FILES.items()}
    return [
        torch.from_numpy(arrays["train_images"].copy()).unsqueeze(1),
        torch.from_numpy(arrays["train_labels"].astype(np.int64)),
        torch.from_numpy(arrays["test_images"].copy()).unsqueeze(1),
        torch.from_numpy(arrays["test_labels"].astype(np.int64)),
    ]


def test_test_and_train_tensors_untouched(mnist_dir, mnist):
    # compare with the files on disk, not a clone: earlier runs in this session used `mnist` too
    before = read_from_disk(mnist_dir)
    for name, old, new in zip(nm.Dataset._fields, before, mnist):
        assert torch.equal(old, new), f"{name} was modified by an earlier run"
    small_test = nm.Dataset(mnist.train_images, mnist.train_labels, mnist.test_images[:1000], mnist.test_labels[:1000])
    for noise_type in registry.noisy_types():
        for loss in ("ce", "forward") if noise_type in LABEL_TYPES else ("ce",):
            nm.train_and_evaluate(noise_config(mnist_dir, noise_type, p=0.6, loss=loss,
                                               validation_fraction=0.2), small_test)
    for name, old, new in zip(nm.Dataset._fields, before, mnist):
        assert torch.equal(old, new), f"{name} was modified by a run"
    # the cached dataset is the same object and equally untouched
    cached = nm.load_dataset("mnist", mnist_dir, download=False)
    for old, new in zip(before, cached):
        assert torch.equal(old, new)


def record_initial_weights(monkeypatch) -> list[dict]:
    recorded = []
    real_build_model = nm.build_model

    def recording_build_model(*args, **kwargs):
        model = real_build_model(*args, **kwargs)
        recorded.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return model

    monkeypatch.setattr(nm, "build_model", recording_build_model)
    return recorded


def same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_common_random_numbers_same_initial_weights_across_p(mnist_dir, mnist_2k_test, monkeypatch):
    recorded = record_initial_weights(monkeypatch)
    runs = [("label_uniform", 0.3), ("label_uniform", 0.6), ("label_flip", 0.6),
            ("pixel_uniform", 0.3), ("pixel_empirical", 0.6)]
    results = [nm.train_and_evaluate(tiny(mnist_dir, noise_type=t, p=p), mnist_2k_test) for t, p in runs]
    nm.train_and_evaluate(tiny(mnist_dir, seed=1, p=0.3), mnist_2k_test)
    assert len(recorded) == len(runs) + 1
    for state in recorded[1:len(runs)]:
        assert same_state(state, recorded[0])
    assert not same_state(recorded[-1], recorded[0]), "another seed must give other initial weights"
    # independent check: seeding as documented and building the model gives the same weights
    nm.seed_everything(0)
    direct = {k: v.detach().clone() for k, v in nm.MLP("relu", (32,)).state_dict().items()}
    assert same_state(direct, recorded[0])
    assert results[0]["train_loss"] != results[1]["train_loss"]  # the noise did change something


def test_initial_weights_do_not_depend_on_earlier_global_rng_use(mnist_dir, mnist_2k_test, monkeypatch):
    recorded = record_initial_weights(monkeypatch)
    cfg = tiny(mnist_dir, p=0.3)
    nm.train_and_evaluate(cfg, mnist_2k_test)
    torch.rand(1000)
    np.random.rand(10)
    nm.train_and_evaluate(cfg, mnist_2k_test)
    assert same_state(recorded[0], recorded[1])


def test_cnn_tiny_run(mnist_dir, mnist):
    cfg = tiny(mnist_dir, model_type="cnn", max_train_samples=200, noise_type="pixel_empirical", p=0.2)
    small = nm.Dataset(mnist.train_images, mnist.train_labels, mnist.test_images[:1000], mnist.test_labels[:1000])
    result = nm.train_and_evaluate(cfg, small)
    assert result["n_params"] == 421_642
    assert 0.0 <= result["test_accuracy"] <= 1.0 and np.isfinite(result["test_loss"])
    assert result["noisy_test_accuracy"] <= 1.0 and np.isfinite(result["noisy_test_loss"])


def test_training_run_flushes_subnormal_floats(mnist_dir, mnist_2k_test):
    """Subnormal floats (slow on CPUs: Adam's moments of dead units decay into them) are
    flushed to zero once a run has started."""
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush subnormal floats")
    torch.set_flush_denormal(False)
    assert torch.tensor(1e-39).mul(1.0).item() > 0
    nm.train_and_evaluate(tiny(mnist_dir, max_train_samples=128), mnist_2k_test)
    assert torch.tensor(1e-39).mul(1.0).item() == 0


# ================================================================ memorisation, validation, noisy test


def test_memorisation_history_only_for_label_noise(mnist_dir, mnist_2k_test):
    label = nm.train_and_evaluate(tiny(mnist_dir, max_train_samples=1000, noise_type="label_flip", p=0.5, epochs=2),
                                  mnist_2k_test)
    pixel = nm.train_and_evaluate(tiny(mnist_dir, max_train_samples=1000, noise_type="pixel_uniform", p=0.5,
                                       epochs=2), mnist_2k_test)
    for key in MEMORISATION_KEYS:
        assert len(label[f"history_{key}"]) == 2 and 0 <= label[key] <= 1
        assert key not in pixel and f"history_{key}" not in pixel
    # label_flip: every corrupted example has a wrong label, so the two fractions cannot exceed 1
    assert label["memorised_fraction"] + label["corrupted_true_fraction"] <= 1


def test_early_stopping_selects_by_noisy_validation_loss(mnist_dir, mnist_2k_test, monkeypatch):
    trained_on = []
    real = nm.train_one_epoch

    def recording(*args, **kwargs):
        trained_on.append(args[6].clone())  # the indices of the examples trained on
        return real(*args, **kwargs)

    monkeypatch.setattr(nm, "train_one_epoch", recording)
    cfg = tiny(mnist_dir, max_train_samples=1000, noise_type="label_flip", p=0.4, epochs=4, validation_fraction=0.25,
               seed=1)
    result = nm.train_and_evaluate(cfg, mnist_2k_test)
    _, validation = nm.split_validation(cfg, 1000, CPU)
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
    flipped = nm.train_and_evaluate(tiny(mnist_dir, max_train_samples=1000, noise_type="label_flip", p=1.0, epochs=2,
                                         validation_fraction=0.3), mnist_2k_test)
    clean = nm.train_and_evaluate(tiny(mnist_dir, max_train_samples=1000, noise_type="label_flip", p=0.0, epochs=2,
                                       validation_fraction=0.3), mnist_2k_test)
    assert flipped["history_validation_loss"][-1] > clean["history_validation_loss"][-1] + 0.5
    assert clean["history_validation_loss"][-1] == pytest.approx(clean["test_loss"], abs=0.5)


def test_validation_loss_of_pixel_noise_runs_is_on_noisy_images_drawn_the_same_every_epoch(mnist_dir, mnist_2k_test,
                                                                                           monkeypatch):
    """The held-out images carry the run's pixel noise, from their own stream, the same draw
    after every epoch."""
    drawn = []
    real_predict = nm.predict

    def recording_predict(model, source, indices):
        if source.pixel_noise:
            drawn.append((source.generator.initial_seed(), source.generator.get_state(), indices.clone()))
        return real_predict(model, source, indices)

    monkeypatch.setattr(nm, "predict", recording_predict)
    nm.train_and_evaluate(tiny(mnist_dir, noise_type="pixel_uniform", p=0.5, epochs=2, validation_fraction=0.2),
                          mnist_2k_test)
    validation_seed, test_seed = nm.stream_seed(0, "validation_noise"), nm.stream_seed(0, "test_noise")
    assert [seed for seed, _, _ in drawn] == [validation_seed, validation_seed, test_seed]
    (_, state_1, indices_1), (_, state_2, indices_2) = drawn[:2]
    assert torch.equal(state_1, state_2) and torch.equal(indices_1, indices_2)  # the same draw every epoch
    _, validation = nm.split_validation(tiny(mnist_dir, validation_fraction=0.2), 500, CPU)
    assert torch.equal(indices_1, validation)


def test_without_validation_there_are_no_selected_metrics(mnist_dir, mnist_2k_test):
    result = nm.train_and_evaluate(tiny(mnist_dir, noise_type="label_uniform", p=0.3, epochs=2), mnist_2k_test)
    assert not any(k.startswith("selected_") for k in result)
    assert "validation_loss" not in result and "history_validation_loss" not in result


@pytest.mark.parametrize("noise_type", PIXEL_TYPES)
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


def test_without_pixel_noise_the_noisy_test_is_the_clean_test(mnist_dir, mnist_2k_test):
    for noise_type in LABEL_TYPES:
        result = nm.train_and_evaluate(noise_config(mnist_dir, noise_type, p=0.5, max_train_samples=300),
                                       mnist_2k_test)
        assert result["noisy_test_accuracy"] == result["test_accuracy"], noise_type
        assert result["noisy_test_loss"] == result["test_loss"], noise_type


# ================================================================ mixed precision and CUDA


@pytest.mark.parametrize("model_type, max_train_samples", [("mlp", 3000), ("cnn", 2000)])
def test_bfloat16_run_learns_as_well_as_the_float32_run(mnist_dir, mnist, mnist_2k_test, model_type,
                                                       max_train_samples):
    cfg = tiny(mnist_dir, model_type=model_type, noise_type="label_uniform", p=0.2,
               max_train_samples=max_train_samples, epochs=2)
    data = mnist_2k_test if model_type == "cnn" else mnist  # the CNN's evaluation is the costly part
    mixed = nm.train_and_evaluate(dataclasses.replace(cfg, precision="bfloat16"), data)
    single = nm.train_and_evaluate(cfg, data)
    assert mixed["precision"] == "bfloat16" and mixed["train_loss"] != single["train_loss"]  # it took effect
    assert mixed["test_accuracy"] > 0.8
    assert abs(mixed["test_accuracy"] - single["test_accuracy"]) < 0.03
    assert abs(mixed["test_loss"] - single["test_loss"]) < 0.1


def test_cuda_requested_without_cuda_raises(mnist_dir, mnist_2k_test):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is available here")
    with pytest.raises(RuntimeError, match="CUDA"):
        nm.train_and_evaluate(tiny(mnist_dir, use_cuda=True), mnist_2k_test)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("model_type, noise_type, precision", [
    ("mlp", "label_flip", "float32"), ("mlp", "pixel_empirical", "float32"), ("cnn", "pixel_uniform", "float32"),
    ("cnn", "label_uniform", "bfloat16")])
def test_cuda_run_learns_as_well_as_the_cpu_run(mnist_dir, mnist, model_type, noise_type, precision):
    cfg = tiny(mnist_dir, model_type=model_type, noise_type=noise_type, p=0.2, max_train_samples=3000,
               epochs=2, validation_fraction=0.1, use_cuda=True, precision=precision)
    on_gpu = nm.train_and_evaluate(cfg, mnist)
    on_cpu = nm.train_and_evaluate(dataclasses.replace(cfg, use_cuda=False), mnist)
    assert on_gpu["test_accuracy"] > 0.7
    assert abs(on_gpu["test_accuracy"] - on_cpu["test_accuracy"]) < 0.05  # other random streams, same learning
    assert np.isfinite(on_gpu["test_loss"]) and np.isfinite(on_gpu["selected_test_loss"])


@pytest.mark.slow
def test_full_mnist_mlp_one_epoch_reaches_95_percent(mnist_dir, mnist):
    cfg = TrainConfig(data_dir=str(mnist_dir), model_type="mlp", noise_type=registry.CLEAN, p=0.0,
                      epochs=1, optimizer="adam", learning_rate=1e-3, batch_size=128, seed=0)
    result = nm.train_and_evaluate(cfg, mnist)
    assert result["test_accuracy"] >= 0.95, result
    assert len(result["history_test_accuracy"]) == 1
