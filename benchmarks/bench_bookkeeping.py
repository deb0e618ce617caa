"""The campaign process's own CPU at large grids: what storing a finished run and refreshing the CSVs cost.

Builds campaigns of N stored runs (copies of one real tiny run with other seeds, p values and metrics), then
measures in this process, as CPU time (time.process_time):
  - per finished run: Campaign.add (store the record, update the counts and campaign.json) with N runs stored,
    the CSV refresh left out;
  - one CSV refresh: results_store.write_csvs of all N records;
and prints the campaign process's share of one core at a given rate of finished runs,
    rate * add + refresh / interval, interval = max(CSV_REFRESH_SECONDS, refresh / CSV_REFRESH_SHARE).
Run from the repository root (a few minutes; the 50,000-run store takes about 1 GB under /tmp):
    .venv/bin/python benchmarks/bench_bookkeeping.py --data_dir ../shared/data/mnist
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import nnet_models as nm  # noqa: E402
import results_store as rs  # noqa: E402
import run_experiments as rx  # noqa: E402


def template_record(data_dir: str) -> tuple[dict, rx.RunSpec]:
    """A real record of a tiny 5-epoch run (history and reliability bins as long as a real campaign's)."""
    cfg = nm.TrainConfig(noise_type="label_flip", p=0.3, epochs=5, max_train_samples=512, data_dir=data_dir)
    spec = rx.spec_for(cfg, 0, 0)
    return rx.run_one(spec), spec


def synthetic_specs(n: int, template_spec: rx.RunSpec) -> list[rx.RunSpec]:
    """n runs of distinct settings (p, seed): the grid of a large campaign."""
    configs = (dataclasses.replace(template_spec.config, p=round(i % 1000 / 1000, 3), seed=i // 1000)
               for i in range(n))
    return [rx.RunSpec(rx.run_key(cfg), 0, cfg) for cfg in configs]


def record_of(template: dict, spec: rx.RunSpec, rng: random.Random) -> dict:
    return {**template, **rx.run_record(spec, "ok"), "test_accuracy": rng.random(), "test_loss": rng.random()}


def measure(n: int, template: dict, template_spec: rx.RunSpec, data_dir: str, adds: int = 300) -> tuple[float, float]:
    """(CPU seconds per Campaign.add, CPU seconds per CSV refresh) with n runs stored."""
    rng = random.Random(0)
    specs = synthetic_specs(n + adds, template_spec)
    with tempfile.TemporaryDirectory() as tmp:
        runs = Path(tmp) / rs.RUNS_DIR
        runs.mkdir()
        records = [record_of(template, spec, rng) for spec in specs[:n]]
        for record in records:  # plain writes: setting the store up is not what is measured
            (runs / f"{record['run_id']}.json").write_text(json.dumps(record))
        config = {**rx.config_from_args(["--output_dir", tmp, "--data_dir", data_dir])[0], "max_workers": 1}
        campaign = rx.Campaign(config, specs)
        campaign.csv_interval = float("inf")  # measured on its own below
        campaign.bar = type("NoBar", (), {"total": len(specs), "disable": True, "update": lambda self: None})()
        campaign.say = lambda message, error=False: None
        campaign.started = time.monotonic()
        started = time.process_time()
        for spec in specs[n:]:
            campaign.add(record_of(template, spec, rng))
        per_add = (time.process_time() - started) / adds
        started = time.process_time()
        rs.write_csvs(records, tmp)
        refresh = time.process_time() - started
        campaign.log_file.close()
        campaign.lock.close()
    return per_add, refresh


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", required=True)
    parser.add_argument("--sizes", default="1000,10000,50000")
    parser.add_argument("--rate", type=float, default=8.0, help="finished runs per second (16 workers x 2 s runs)")
    args = parser.parse_args()
    template, template_spec = template_record(args.data_dir)
    print(f"{'runs':>7} {'add (ms)':>9} {'refresh (s)':>12} {'interval (s)':>13} {'share of a core':>16}")
    for n in map(int, args.sizes.split(",")):
        per_add, refresh = measure(n, template, template_spec, args.data_dir)
        interval = max(rx.CSV_REFRESH_SECONDS, refresh / rx.CSV_REFRESH_SHARE)
        share = args.rate * per_add + refresh / interval
        print(f"{n:>7} {per_add * 1000:>9.2f} {refresh:>12.2f} {interval:>13.0f} {share:>15.1%}", flush=True)
    print(f"(share at {args.rate:g} finished runs per second: the add cost times the rate, plus the refresh "
          "cost over its interval)")


if __name__ == "__main__":
    main()
