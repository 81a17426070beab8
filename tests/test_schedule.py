import math

import pytest

from gptcli.train.schedule import learning_rate

BASE = dict(lr=6e-4, min_lr=6e-5, warmup_steps=10, max_steps=110)


def test_warmup_rises_linearly_to_the_peak():
    assert learning_rate(0, **BASE) == pytest.approx(6e-5)
    assert learning_rate(4, **BASE) == pytest.approx(3e-4)
    assert learning_rate(9, **BASE) == pytest.approx(6e-4)


def test_cosine_passes_the_midpoint_and_ends_at_min_lr():
    assert learning_rate(10, **BASE) == pytest.approx(6e-4)
    assert learning_rate(60, **BASE) == pytest.approx((6e-4 + 6e-5) / 2)
    assert learning_rate(110, **BASE) == pytest.approx(6e-5)
    assert learning_rate(500, **BASE) == pytest.approx(6e-5)
    quarter = 6e-5 + 0.5 * (1 + math.cos(math.pi / 4)) * (6e-4 - 6e-5)
    assert learning_rate(35, **BASE) == pytest.approx(quarter)


def test_linear_and_constant():
    assert learning_rate(60, **BASE, schedule="linear") == pytest.approx((6e-4 + 6e-5) / 2)
    assert learning_rate(85, **BASE, schedule="linear") == pytest.approx(6e-4 - 0.75 * (6e-4 - 6e-5))
    assert learning_rate(100, **BASE, schedule="constant") == 6e-4
    assert learning_rate(3, **BASE, schedule="constant") == pytest.approx(2.4e-4)


def test_no_warmup_starts_at_the_peak():
    assert learning_rate(0, lr=1e-3, min_lr=0.0, warmup_steps=0, max_steps=10) == pytest.approx(1e-3)
