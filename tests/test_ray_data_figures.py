"""The figures data.loader: ray_data computes without the rows in one place (no Ray needed): length
statistics from histograms equal the driver path's from the lists, the seeded hash split, and the
config rule for what streaming cannot do."""

import numpy as np
import pytest

from jobs.config import ConfigError, DataConfig, load_config
from jobs.data import _length_stats
from jobs.ray_data import _add_hist, histogram_stats, in_validation


@pytest.mark.parametrize("seed", range(5))
def test_length_statistics_from_histograms_equal_those_from_the_lists(seed):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 700, size=int(rng.integers(1, 3000)))
    hist = None
    for part in np.array_split(lengths, 7):  # added up batch by batch, as on the cluster
        hist = _add_hist(hist, part)
    assert histogram_stats(hist) == _length_stats(list(lengths))


def test_the_split_is_seeded_stable_and_near_the_fraction():
    cfg = DataConfig(validation_fraction=0.1, seed=7)
    held = [in_validation("a.jsonl", row, cfg) for row in range(1, 20001)]
    assert held == [in_validation("a.jsonl", row, cfg) for row in range(1, 20001)]
    # Binomial(20000, 0.1): 2000 +- 42; +-200 is a 4.7-sigma band.
    assert 1800 <= sum(held) <= 2200
    other = [in_validation("a.jsonl", row, DataConfig(validation_fraction=0.1, seed=8)) for row in range(1, 20001)]
    assert held != other and sum(a and b for a, b in zip(held, other)) < 400, "another seed, another split"
    assert not any(in_validation("a.jsonl", row, DataConfig(validation_fraction=0.0)) for row in range(1, 1000))


def test_the_length_grouped_sampler_is_refused_with_streamed_data():
    with pytest.raises(ConfigError, match="training.group_by_length = True: .*data.loader: ray_data"):
        load_config(None, ["data.loader=ray_data", "training.group_by_length=true"])
