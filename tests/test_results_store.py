"""results_store: the run store on disk, the summary statistics and every derived table.

The statistics are recomputed here independently with pandas and scipy (sample std with
ddof=1, standard error, t-based 95% confidence interval) from hand-built records.
"""
from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pandas as pd
import pytest
from scipy import stats

import registry
import results_store as rs
from conftest import check_summary_against_per_run, same
from registry import ECE_BINS

HALF_NEXT = [[0.5 if j in (i, (i + 1) % 10) else 0.0 for j in range(10)] for i in range(10)]


def fake_record(run_id, *, p=0.0, epochs=1, max_train_samples=1000, activation="relu", repeat=0,
                status="ok", accuracy=0.9, loss=0.5, training_loss="ce", noise_type=None):
    """A stored run as run_experiments writes it (history varying by epoch, 15 reliability bins); at p = 0 the
    clean run (noise type "none"), else label_flip."""
    record = {"run_id": run_id, "repeat": repeat, "status": status, "error": "" if status == "ok" else "boom",
              "attempts": 1, "finished_at": "2024-01-01T00:00:00+00:00",
              "dataset": "mnist", "model_type": "mlp", "activation": activation, "hidden_sizes": "256-128",
              "noise_type": noise_type or ("none" if p == 0 else "label_flip"), "p": p, "epochs": epochs, "batch_size": 128, "optimizer": "adam",
              "learning_rate": 0.001, "weight_decay": 0.0, "normalize": True,
              "max_train_samples": max_train_samples, "use_cuda": False, "seed": 100 + repeat,
              "cpu_threads": 1, "data_dir": "data", "noise_matrix": None, "loss": training_loss, "loss_settings": "", "reported_epochs": "",
              "validation_fraction": 0.0, "precision": "float32"}
    if status == "ok":
        record.update(test_accuracy=accuracy, test_loss=loss, test_macro_precision=accuracy - 0.01,
                      test_macro_recall=accuracy - 0.02, test_macro_roc_auc=0.99, train_loss=loss + 0.1,
                      test_ece=loss / 10, test_mean_confidence=accuracy + 0.05,
                      memorised_fraction=p * loss / 4, corrupted_true_fraction=1 - p * loss / 4,
                      clean_train_accuracy=accuracy + 0.01,
                      seconds=1.0 + repeat, train_seconds=0.5 + repeat, n_params=1000,
                      history_test_loss=[loss + (epochs - 1 - e) * 0.25 for e in range(epochs)],
                      history_test_accuracy=[accuracy - (epochs - 1 - e) * 0.125 for e in range(epochs)],
                      history_test_ece=[loss / 10] * epochs,
                      reliability={"count": [0.0] * 13 + [100.0 * (1 + repeat), 900.0],
                                   "confidence": [math.nan] * 13 + [0.9, 0.97],
                                   "accuracy": [math.nan] * 13 + [accuracy, accuracy]})
    return record


# ================================================================ the run store


def test_save_writes_one_whole_record_and_no_temporary_file(tmp_path):
    store = rs.RunStore(tmp_path)
    record = fake_record("a" * 16, epochs=2)
    store.save(record)
    assert sorted(p.name for p in (tmp_path / rs.RUNS_DIR).iterdir()) == ["a" * 16 + ".json"]
    assert same(json.loads((tmp_path / rs.RUNS_DIR / ("a" * 16 + ".json")).read_text()), record)
    assert same(store.load(), {"a" * 16: record})


def test_save_replaces_the_record_of_the_same_run(tmp_path):
    store = rs.RunStore(tmp_path)
    store.save(fake_record("a" * 16, status="failed"))
    store.save(fake_record("b" * 16))
    store.save({**fake_record("a" * 16), "attempts": 2})
    records = store.load()
    assert sorted(records) == ["a" * 16, "b" * 16]
    assert (records["a" * 16]["status"], records["a" * 16]["attempts"]) == ("ok", 2)
    assert len(list((tmp_path / rs.RUNS_DIR).iterdir())) == 2


def test_a_write_that_dies_before_the_rename_leaves_the_previous_record(tmp_path, monkeypatch):
    """What a reader (or the next campaign) sees after a crash mid-write: the old record whole;
    the half-written temporary file is never taken for a record."""
    store = rs.RunStore(tmp_path)
    old = fake_record("a" * 16, accuracy=0.25)
    store.save(old)

    def crash(src, dst):
        raise OSError("killed before the rename")

    monkeypatch.setattr(rs.os, "replace", crash)
    with pytest.raises(OSError, match="killed before the rename"):
        store.save(fake_record("a" * 16, accuracy=0.75))
    monkeypatch.undo()
    assert [p.name for p in store.directory.iterdir()] == ["a" * 16 + ".json"]  # the temporary file removed
    # a writer killed outright leaves its temporary file behind: it is never taken for a record
    (store.directory / f".{'b' * 16}.json.12345.tmp").write_text('{"run_id": "' + "b" * 16 + '", "sta')
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert same(store.load(), {"a" * 16: old})


def test_atomic_write_text_replaces_whole_files(tmp_path):
    path = tmp_path / "table.csv"
    rs.atomic_write_text(path, "a,b\n1,2\n")
    rs.atomic_write_text(path, "a\n" + "x\n" * 100_000)
    assert path.read_text() == "a\n" + "x\n" * 100_000
    assert [p.name for p in tmp_path.iterdir()] == ["table.csv"]


def test_load_of_an_output_dir_without_runs_is_empty(tmp_path):
    assert rs.RunStore(tmp_path / "never-written").load() == {}
    assert not (tmp_path / "never-written").exists()


def test_a_failed_record_needs_no_metrics(tmp_path):
    store = rs.RunStore(tmp_path)
    failed = fake_record("a" * 16, status="failed")
    assert "test_accuracy" not in failed
    store.save(failed)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert store.load() == {"a" * 16: failed}


def without(record: dict, *names: str) -> dict:
    return {k: v for k, v in record.items() if k not in names}


INVALID = {  # what a file named bbbb...json may hold that is not a run record of bbbb...
    "empty": "", "open-brace": "{", "text": "not json at all", "nul-bytes": "\x00" * 64, "list": "[]",
    "string": '"a string"', "null": "null", "number": "42", "missing-fields": '{"run_id": "' + "b" * 16 + '"}',
    "another-runs-record": json.dumps(fake_record("c" * 16)),
    "unknown-status": json.dumps({**fake_record("b" * 16), "status": "running"}),
    "repeat-not-an-integer": json.dumps({**fake_record("b" * 16), "repeat": "0"}),
    "ok-without-accuracy": json.dumps(without(fake_record("b" * 16), "test_accuracy")),
    "ok-with-text-for-a-number": json.dumps({**fake_record("b" * 16), "seconds": "1.5"}),
    "ok-with-a-short-history": json.dumps({**fake_record("b" * 16, epochs=2), "history_test_loss": [0.5]}),
    "ok-without-reliability": json.dumps(without(fake_record("b" * 16), "reliability")),
}


@pytest.mark.parametrize("content", INVALID.values(), ids=INVALID.keys())
def test_load_moves_an_invalid_record_aside_with_a_warning_naming_it(tmp_path, content):
    store = rs.RunStore(tmp_path)
    good = fake_record("a" * 16)
    store.save(good)
    bad = store.directory / ("b" * 16 + ".json")
    bad.write_text(content)
    with pytest.warns(UserWarning, match="moved the invalid run record") as caught:
        records = store.load()
    assert same(records, {"a" * 16: good})
    assert any(f"{bad.name} to {store.directory / 'invalid'}/" in str(w.message) and "its run will be redone"
               in str(w.message) for w in caught)
    assert not bad.exists() and (store.directory / "invalid" / bad.name).read_text() == content  # kept, as it was
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once: the next load does not see it
        assert same(store.load(), {"a" * 16: good})


def test_load_names_the_missing_fields(tmp_path):
    store = rs.RunStore(tmp_path)
    store.directory.mkdir(parents=True)
    (store.directory / "c.json").write_text(json.dumps({"run_id": "c", "status": "ok", "test_accuracy": 0.5}))
    with pytest.warns(UserWarning) as caught:
        assert store.load() == {}
    message = str(caught[0].message)
    assert "missing fields" in message and "'p'" in message and "'repeat'" in message and "'noise_type'" in message


def test_csv_value_of_config_values():
    assert rs.csv_value((256, 128)) == "256-128"
    assert rs.csv_value((16,)) == "16"
    matrix = tuple(tuple(row) for row in HALF_NEXT)
    assert json.loads(rs.csv_value(matrix)) == HALF_NEXT
    for value in (0.5, 3, None, "relu", True):
        assert rs.csv_value(value) is value


# ================================================================ statistics


def statistics_of(values) -> dict:
    """summarize's statistics of one group of `values`."""
    row = rs.summarize(pd.DataFrame({"g": 0, "m": values}), ["g"], ["m"]).iloc[0]
    return {s: row[f"m_{s}"] for s in rs.STATISTICS}


def test_statistics_by_hand():
    std = math.sqrt(((0.2 - 0.5) ** 2 + (0.4 - 0.5) ** 2 + (0.9 - 0.5) ** 2) / 2)  # ddof = 1
    half = 4.302652729911275 * std / math.sqrt(3)  # t(0.975, 2 degrees of freedom)
    assert statistics_of([0.2, 0.4, 0.9]) == pytest.approx({"mean": 0.5, "std": std, "stderr": std / math.sqrt(3),
                                                            "ci95_low": 0.5 - half, "ci95_high": 0.5 + half})


def test_statistics_of_one_value_a_constant_and_missing_values():
    single = statistics_of([0.7])
    assert single["mean"] == 0.7
    assert all(math.isnan(single[k]) for k in ("std", "stderr", "ci95_low", "ci95_high"))
    constant = statistics_of([0.3, 0.3, 0.3])
    assert constant == pytest.approx({"mean": 0.3, "std": 0.0, "stderr": 0.0, "ci95_low": 0.3, "ci95_high": 0.3})
    with_missing = statistics_of([0.2, math.nan, 0.4, math.nan, 0.9])
    assert with_missing == pytest.approx(statistics_of([0.2, 0.4, 0.9]))  # NaN is not a value
    assert all(math.isnan(v) for v in statistics_of([math.nan, math.nan]).values())


def test_summarize_groups_and_names_its_columns():
    frame = pd.DataFrame({"g": ["a", "a", "b", "a"], "h": [1, 1, 1, 2], "m": [1.0, 3.0, 5.0, 7.0]})
    summary = rs.summarize(frame, ["g", "h"], ["m", "absent"])
    assert list(summary.columns) == ["g", "h", "n", *(f"m_{s}" for s in rs.STATISTICS),
                                     *(f"absent_{s}" for s in rs.STATISTICS)]
    assert list(zip(summary["g"], summary["h"], summary["n"])) == [("a", 1, 2), ("a", 2, 1), ("b", 1, 1)]
    assert summary["m_mean"].tolist() == [2.0, 7.0, 5.0]
    assert summary["m_std"].iloc[0] == pytest.approx(math.sqrt(2))
    assert summary[[f"absent_{s}" for s in rs.STATISTICS]].isna().all().all()  # a metric no run has


@pytest.fixture
def hand_records():
    """Six experiments (the failed run is no part of any); run ids of digits only."""
    rng = np.random.default_rng(0)
    records = []

    def add(count, **kw):
        for r in range(count):
            records.append(fake_record(f"{len(records):016d}", repeat=r, accuracy=float(rng.uniform(0.5, 1)),
                                       loss=float(rng.uniform(0.1, 2)), **kw))
    add(3, p=0.0)                                        # group A, n = 3
    add(1, p=0.5)                                        # n = 1: std, stderr and CI are NaN
    add(2, p=0.0, epochs=2)                              # like A but 2 epochs: a group of its own
    add(2, p=0.0, max_train_samples=2000)                # like A but more samples
    add(4, p=0.0, max_train_samples=None)                # all samples (None) is a group too
    add(2, p=0.0, activation="tanh")
    records.append(fake_record("f" * 16, p=0.0, repeat=3, status="failed"))  # never pooled into A
    return records


def test_summary_statistics_on_hand_built_records(hand_records):
    per_run = rs.per_run_table(hand_records)
    assert len(per_run) == len(hand_records)
    summary = rs.summary_table(per_run)
    assert check_summary_against_per_run(per_run, summary) == 6
    assert sorted(summary["n"]) == [1, 2, 2, 2, 3, 4]
    # group A by hand (the failed run is left out)
    acc = np.array([r["test_accuracy"] for r in hand_records[:3]])
    row = summary[(summary["p"] == 0.0) & (summary["epochs"] == 1) & (summary["max_train_samples"] == 1000)
                  & (summary["activation"] == "relu")].iloc[0]
    assert row["n"] == 3
    assert row["test_accuracy_mean"] == pytest.approx(acc.mean())
    assert row["test_accuracy_std"] == pytest.approx(acc.std(ddof=1))
    assert row["test_accuracy_stderr"] == pytest.approx(acc.std(ddof=1) / math.sqrt(3))
    half = stats.t.ppf(0.975, 2) * acc.std(ddof=1) / math.sqrt(3)
    assert row["test_accuracy_ci95_low"] == pytest.approx(max(acc.mean() - half, 0.0))  # a fraction: clipped
    assert row["test_accuracy_ci95_high"] == pytest.approx(min(acc.mean() + half, 1.0))
    single = summary[summary["p"] == 0.5].iloc[0]
    assert single["n"] == 1 and single["test_accuracy_mean"] == pytest.approx(hand_records[3]["test_accuracy"])
    assert math.isnan(single["test_accuracy_std"]) and math.isnan(single["test_accuracy_ci95_low"])
    full = summary[summary["max_train_samples"].isna()]
    assert list(full["n"]) == [4]


def test_summary_never_pools_different_epochs_sample_counts_or_losses(hand_records):
    extra = [fake_record(f"e{i:015d}", repeat=i, training_loss="forward", accuracy=0.1) for i in range(2)]
    summary = rs.summary_table(rs.per_run_table(hand_records + extra))
    relu0 = summary[(summary["activation"] == "relu") & (summary["p"] == 0.0)]
    combos = {(t, int(e), None if pd.isna(m) else int(m), c, int(n)) for t, e, m, c, n in
              zip(relu0["noise_type"], relu0["epochs"], relu0["max_train_samples"], relu0["loss"], relu0["n"])}
    # the clean runs count as p = 0 of label_flip where label_flip ran with their settings (group A), else as "none"
    assert combos == {("label_flip", 1, 1000, "ce", 3), ("none", 2, 1000, "ce", 2), ("none", 1, 2000, "ce", 2),
                      ("none", 1, None, "ce", 4), ("none", 1, 1000, "forward", 2)}
    forward = relu0[relu0["loss"] == "forward"].iloc[0]
    assert forward["test_accuracy_mean"] == pytest.approx(0.1)


def test_per_run_table_keeps_failed_runs_and_leaves_history_out(hand_records):
    per_run = rs.per_run_table(hand_records)
    assert list(per_run.columns) == (rs.RUN_FIELDS + rs.CONFIG_FIELDS + ["n_params"] + list(registry.METRICS)
                                     + ["estimated_transition"])
    failed = per_run[per_run["status"] == "failed"]
    assert failed["run_id"].tolist() == ["f" * 16] and failed["error"].tolist() == ["boom"]
    assert failed[list(registry.METRICS)].isna().all().all()
    assert str(per_run["max_train_samples"].dtype) == "Int64"  # 1000, not 1000.0; empty = all samples


def test_history_and_reliability_tables(hand_records):
    ok = [r for r in hand_records if r["status"] == "ok"]
    history = rs.history_table(hand_records)
    assert list(history.columns) == rs.RUN_KEYS + ["epoch"] + registry.per_epoch_metrics()
    assert len(history) == sum(r["epochs"] for r in ok)
    two_epochs = history[history["run_id"] == ok[4]["run_id"]]
    assert two_epochs["epoch"].tolist() == [1, 2]
    assert two_epochs["test_loss"].tolist() == ok[4]["history_test_loss"]
    assert history["validation_loss"].isna().all()  # no record has it
    reliability = rs.reliability_table(hand_records)
    assert list(reliability.columns) == rs.RUN_KEYS + ["bin", "count", "confidence", "accuracy"]
    assert len(reliability) == ECE_BINS * len(ok)
    assert (reliability.groupby("run_id")["bin"].apply(list) == [list(range(ECE_BINS))] * len(ok)).all()
    assert reliability.groupby("run_id")["count"].sum().to_dict() == {r["run_id"]: 1000 + 100 * r["repeat"] for r in ok}


def test_write_csvs_writes_the_four_tables_and_rewrites_them_whole(hand_records, tmp_path):
    paths = rs.write_csvs(hand_records, tmp_path)
    assert sorted(p.name for p in paths) == sorted([rs.PER_RUN_CSV, rs.SUMMARY_CSV, rs.HISTORY_CSV, rs.RELIABILITY_CSV])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in paths)  # no temporary files
    per_run = rs.read_csv(tmp_path / rs.PER_RUN_CSV)
    summary = rs.read_csv(tmp_path / rs.SUMMARY_CSV)
    assert per_run["run_id"].tolist() == rs.per_run_table(hand_records)["run_id"].tolist()  # "0000..." stays text
    assert check_summary_against_per_run(per_run, summary) == 6
    # rewritten from fewer records: nothing stale is left
    rs.write_csvs(hand_records[:3], tmp_path)
    assert len(rs.read_csv(tmp_path / rs.PER_RUN_CSV)) == 3
    assert rs.read_csv(tmp_path / rs.SUMMARY_CSV)["n"].tolist() == [3]
    assert len(rs.read_csv(tmp_path / rs.RELIABILITY_CSV)) == 3 * ECE_BINS


def test_a_label_matrix_run_roundtrips_its_matrix(tmp_path):
    shift = [[1.0 if j == (i + 1) % 10 else 0.0 for j in range(10)] for i in range(10)]
    records = [fake_record(run_id, p=0.5, noise_type="label_matrix") | {"noise_matrix": rs.csv_value(tuple(map(tuple, m)))}
               for run_id, m in (("a" * 16, HALF_NEXT), ("c" * 16, shift))]
    rs.write_csvs([*records, fake_record("b" * 16)], tmp_path)
    per_run = rs.read_csv(tmp_path / rs.PER_RUN_CSV).set_index("run_id")
    assert json.loads(per_run.loc["a" * 16, "noise_matrix"]) == HALF_NEXT
    assert pd.isna(per_run.loc["b" * 16, "noise_matrix"])
    summary = rs.read_csv(tmp_path / rs.SUMMARY_CSV)
    # another matrix, another experiment; the clean run is the p = 0 point of each
    assert sorted(zip(summary["noise_matrix"].map(json.loads).map(str), summary["p"], summary["n"])) == sorted(
        (str(m), p, 1) for m in (HALF_NEXT, shift) for p in (0.0, 0.5))
    assert (summary["noise_type"] == "label_matrix").all()


def test_the_clean_run_is_the_p0_point_of_every_noise_type_with_its_settings(tmp_path):
    clean = [fake_record(f"c{r:015d}", repeat=r, accuracy=0.9 + r / 100) for r in range(3)]
    noisy = [fake_record(f"{t[0]}{r:015d}", p=0.5, repeat=r, noise_type=t, accuracy=0.5)
             for t in ("label_flip", "pixel_uniform") for r in range(3)]
    lonely = [fake_record(f"t{r:015d}", repeat=r, activation="tanh") for r in range(2)]  # no noisy run with tanh
    rs.write_csvs(clean + noisy + lonely, tmp_path)
    summary = rs.read_csv(tmp_path / rs.SUMMARY_CSV)
    per_run = rs.read_csv(tmp_path / rs.PER_RUN_CSV)
    assert len(per_run) == 11  # stored once
    assert check_summary_against_per_run(per_run, summary) == 5
    at_zero = summary[summary["p"] == 0].set_index(["activation", "noise_type"])
    assert sorted(at_zero.index) == [("relu", "label_flip"), ("relu", "pixel_uniform"), ("tanh", "none")]
    for noise in ("label_flip", "pixel_uniform"):
        assert at_zero.loc[("relu", noise), "n"] == 3
        assert at_zero.loc[("relu", noise), "test_accuracy_mean"] == pytest.approx(0.91)
    # the paired differences take the clean run of the same seed: every noisy run is 0.4, 0.41, 0.42 below it
    noisy_rows = summary[summary["p"] == 0.5]
    assert noisy_rows["delta_test_accuracy_mean"].tolist() == pytest.approx([-0.41, -0.41])
    assert noisy_rows["delta_test_accuracy_std"].tolist() == pytest.approx([0.01, 0.01])


def test_a_run_reporting_shorter_lengths_gives_a_row_per_length(tmp_path):
    long = fake_record("a" * 16, epochs=3, accuracy=0.9)
    long["reported"] = {"1": {"test_accuracy": 0.5, "test_loss": 1.5, "seconds": 0.25, "train_seconds": 0.125,
                              "reliability": {"count": [10.0] + [0.0] * 14, "confidence": [0.05] + [math.nan] * 14,
                                              "accuracy": [0.5] + [math.nan] * 14}}}
    rs.write_csvs([long], tmp_path)
    per_run = rs.read_csv(tmp_path / rs.PER_RUN_CSV).set_index("epochs")
    assert per_run.loc[3, "test_accuracy"] == 0.9 and per_run.loc[1, "test_accuracy"] == 0.5
    assert per_run.loc[1, "test_loss"] == 1.5 and (per_run["run_id"] == "a" * 16).all()
    summary = rs.read_csv(tmp_path / rs.SUMMARY_CSV).set_index("epochs")
    assert sorted(summary.index) == [1, 3] and summary.loc[1, "test_accuracy_mean"] == 0.5
    reliability = rs.read_csv(tmp_path / rs.RELIABILITY_CSV)
    assert reliability.groupby("epochs")["count"].sum().to_dict() == {1: 10, 3: 1000}
    history = rs.read_csv(tmp_path / rs.HISTORY_CSV)
    assert history["epoch"].tolist() == [1, 2, 3]  # the history is the run's, once


def test_a_length_two_runs_of_a_seed_report_is_pooled_once(tmp_path):
    """A grid rerun with epochs 1,2,3 after 2: its 3-epoch run repeats the 2-epoch run's training, and the seed's
    result after 2 epochs is counted once (the earlier run's), in the summary, the reliability and the curves."""
    def after(epochs, accuracy):
        return {str(epochs): {"test_accuracy": accuracy, "test_loss": 1.0, "seconds": 1.0, "train_seconds": 0.5,
                              "reliability": {"count": [0.0] * 14 + [10.0], "confidence": [math.nan] * 14 + [0.9],
                                              "accuracy": [math.nan] * 14 + [accuracy]}}}

    earlier = fake_record("a" * 16, epochs=2, accuracy=0.8)
    rerun = fake_record("b" * 16, epochs=3, accuracy=0.95) | {"finished_at": "2024-02-01T00:00:00+00:00",
                                                              "reported": after(1, 0.5) | after(2, 0.81)}
    other_seed = fake_record("c" * 16, epochs=3, repeat=1, accuracy=0.97) | {"reported": after(1, 0.6) | after(2, 0.9)}
    rs.write_csvs([rerun, other_seed, earlier], tmp_path)
    per_run = rs.read_csv(tmp_path / rs.PER_RUN_CSV)
    assert sorted(zip(per_run["epochs"], per_run["run_id"])) == [
        (1, "b" * 16), (1, "c" * 16), (2, "a" * 16), (2, "c" * 16), (3, "b" * 16), (3, "c" * 16)]
    results = rs.read_results(tmp_path)
    summary = results.summary.set_index("epochs")
    assert summary["n"].to_dict() == {1: 2, 2: 2, 3: 2}
    assert summary.loc[2, "test_accuracy_mean"] == pytest.approx((0.8 + 0.9) / 2)
    assert summary.loc[2, "test_accuracy_std"] == pytest.approx(np.std([0.8, 0.9], ddof=1))
    assert results.reliability.groupby("epochs")["count"].sum().to_dict() == {1: 20, 2: 1000 + 10, 3: 1000 + 1100}
    curves = results.curves.set_index(["epochs", "epoch"])["n"]
    assert curves.to_dict() == {(2, 1): 1, (2, 2): 1, (3, 1): 2, (3, 2): 2, (3, 3): 2}  # each run's own length


def test_loss_effects_pair_each_loss_with_ce_on_the_same_seed():
    ce = [fake_record(f"c{r:015d}", p=0.5, repeat=r, accuracy=0.5 + r / 10) for r in range(3)]
    gce = [fake_record(f"g{r:015d}", p=0.5, repeat=r, accuracy=0.6 + r / 10 + r * r / 100, training_loss="gce")
           | {"loss_settings": "q=0.7"} for r in range(3)]
    other_seed = fake_record("x" * 16, p=0.5, repeat=7, accuracy=0.0, training_loss="gce") | {"loss_settings": "q=0.7"}
    effects = rs.loss_effects(rs.per_run_table(ce + gce + [other_seed]))
    assert len(effects) == 1
    row = effects.iloc[0]
    differences = pd.Series([0.1 + r * r / 100 for r in range(3)])
    assert (row["loss"], row["loss_settings"], row["n"]) == ("gce", "q=0.7", 3)  # no ce run of seed 107: unpaired
    assert row["minus_ce_test_accuracy_mean"] == pytest.approx(differences.mean())
    assert row["minus_ce_test_accuracy_std"] == pytest.approx(differences.std(ddof=1))
    assert row["minus_ce_test_loss_mean"] == pytest.approx(0.0)


# ================================================================ reading a campaign back


def test_read_results_curves_and_pooled_reliability(hand_records, tmp_path):
    rs.write_csvs(hand_records, tmp_path)
    results = rs.read_results(tmp_path)
    assert len(results.runs) == len(hand_records)
    assert check_summary_against_per_run(results.runs, results.summary) == 6

    # learning curves: per experiment and epoch, over its repeats
    ok = [r for r in hand_records if r["status"] == "ok"]
    assert len(results.curves) == sum(r["epochs"] for r in ok if r["repeat"] == 0)  # one row per experiment and epoch
    two = [r for r in ok if r["epochs"] == 2]
    curve = results.curves[results.curves["epochs"] == 2].sort_values("epoch")
    assert curve["epoch"].tolist() == [1, 2] and curve["n"].tolist() == [2, 2]
    for e in range(2):
        values = pd.Series([r["history_test_loss"][e] for r in two])
        assert curve["test_loss_mean"].iloc[e] == pytest.approx(values.mean())
        assert curve["test_loss_stderr"].iloc[e] == pytest.approx(values.std(ddof=1) / math.sqrt(2))
        assert curve["test_accuracy_mean"].iloc[e] == pytest.approx(np.mean([r["history_test_accuracy"][e] for r in two]))

    # reliability: the bins of an experiment's runs pooled, weighted by the bins' counts
    group_a = hand_records[:3]
    pooled = results.reliability[(results.reliability["epochs"] == 1) & (results.reliability["p"] == 0.0)
                                 & (results.reliability["max_train_samples"] == 1000)
                                 & (results.reliability["activation"] == "relu")].set_index("bin")
    assert pooled.index.tolist() == [13, 14]  # empty bins are left out
    counts = [100.0 * (1 + r["repeat"]) for r in group_a]
    assert pooled.loc[13, "count"] == sum(counts)
    assert pooled.loc[13, "accuracy"] == pytest.approx(np.average([r["test_accuracy"] for r in group_a], weights=counts))
    assert pooled.loc[13, "confidence"] == pytest.approx(0.9)
    assert pooled.loc[14, "count"] == 2700
    assert pooled.loc[14, "accuracy"] == pytest.approx(np.mean([r["test_accuracy"] for r in group_a]))
    # the failed run is pooled nowhere
    assert results.reliability["count"].sum() == sum(1000 + 100 * r["repeat"] for r in ok)


def test_read_results_of_a_directory_without_csvs_says_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="has a run finished") as info:
        rs.read_results(tmp_path)
    assert str(tmp_path / rs.PER_RUN_CSV) in str(info.value)


def test_early_stopping_effects_pair_the_selected_epoch_with_the_last_epoch_of_the_run_without_a_split():
    plain = [fake_record(f"c{r:015d}", p=0.5, repeat=r, accuracy=0.5 + r / 10, loss=1.0) for r in range(3)]
    split = [fake_record(f"v{r:015d}", p=0.5, repeat=r, accuracy=0.1, loss=2.0)
             | {"validation_fraction": 0.1, "selected_epoch": 1, "selected_test_accuracy": 0.7 + r * r / 100,
                "selected_test_loss": 0.8} for r in range(3)]
    effects = rs.early_stopping_effects(rs.per_run_table(plain + split))
    assert len(effects) == 1 and effects.iloc[0]["validation_fraction"] == 0.1 and effects.iloc[0]["n"] == 3
    differences = pd.Series([0.2 - r / 10 + r * r / 100 for r in range(3)])  # selected minus the plain run's last
    row = effects.iloc[0]
    assert row["minus_last_epoch_test_accuracy_mean"] == pytest.approx(differences.mean())
    assert row["minus_last_epoch_test_accuracy_stderr"] == pytest.approx(differences.std(ddof=1) / math.sqrt(3))
    assert row["minus_last_epoch_test_loss_mean"] == pytest.approx(-0.2)


def test_the_per_run_csv_holds_the_estimated_transition_matrix(tmp_path):
    estimated = fake_record("e" * 16, p=0.5, training_loss="forward_estimated") | {
        "estimated_transition": [[0.75, 0.25], [0.5, 0.5]], "transition_error_mean": 0.1, "transition_error_max": 0.2}
    rs.write_csvs([estimated, fake_record("c" * 16, p=0.5)], tmp_path)
    runs = rs.read_csv(tmp_path / rs.PER_RUN_CSV).set_index("loss")
    assert json.loads(runs.loc["forward_estimated", "estimated_transition"]) == [[0.75, 0.25], [0.5, 0.5]]
    assert pd.isna(runs.loc["ce", "estimated_transition"])
