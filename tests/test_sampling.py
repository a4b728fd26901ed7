"""Next-token sampling: temperature, top-k and top-p draw only from their sets and follow the
softmax; bad values are clear errors."""

import numpy as np
import pytest
from hypothesis import assume, example, given
from hypothesis import strategies as st

from numgpt import ConfigError, NumGPTError
from numgpt.sampling import check_sampling_args, next_token_probs, sample_next

logits_rows = st.integers(2, 40).flatmap(lambda V: st.lists(
    st.lists(st.floats(-10, 10), min_size=V, max_size=V), min_size=1, max_size=3))


@given(rows=logits_rows, k=st.integers(1, 50), seed=st.integers(0, 2**32 - 1))
@example(rows=[[0.0, 1.0, 1.0, 1.0, 1.0, 3e-224]], k=5, seed=0)   # 3e-224 - 1 rounds to 0 - 1
def test_top_k_never_draws_outside_the_k_most_likely(rows, k, seed):
    logits = np.array(rows)
    rng = np.random.default_rng(seed)
    for _ in range(20):
        ids = sample_next(logits, temperature=1.0, top_k=k, rng=rng)
        for row, i in zip(logits, ids):
            assert (row > row[i]).sum() < k     # fewer than k tokens beat the drawn one


def test_top_k_keeps_exactly_the_k_most_likely_renormalised():
    """The k most likely tokens keep their softmax shares, renormalised; the rest get 0. (The test
    above would pass a top-k that kept the argmax alone.)"""
    probs = next_token_probs(np.array([[1.0, 3.0, 0.0, 2.0]]), top_k=2)
    kept = np.exp([3.0, 2.0]) / np.exp([3.0, 2.0]).sum()
    np.testing.assert_allclose(probs, [[0.0, kept[0], 0.0, kept[1]]], rtol=1e-12)


@given(rows=st.integers(2, 40).flatmap(lambda V: st.lists(st.floats(-10, 10), min_size=V, max_size=V, unique=True)),
       k=st.integers(1, 50))
def test_top_k_keeps_min_k_v_tokens_without_ties(rows, k):
    probs = next_token_probs(np.array([rows]), top_k=k)
    assert (probs > 0).sum() == min(k, len(rows))


@given(rows=logits_rows, p=st.floats(0.01, 1.0), seed=st.integers(0, 2**32 - 1))
def test_top_p_never_draws_outside_the_nucleus(rows, p, seed):
    logits = np.array(rows)
    full = next_token_probs(logits)
    rng = np.random.default_rng(seed)
    for _ in range(20):
        ids = sample_next(logits, temperature=1.0, top_p=p, rng=rng)
        for probs, i in zip(full, ids):
            mass_above = probs[probs > probs[i]].sum()
            assert mass_above < p + 1e-12       # the tokens ranked above it had not yet reached p


def test_temperature_one_follows_softmax():
    logits = np.array([[2.0, 1.0, 0.0, -1.0, 0.5]])
    expected = np.exp(logits[0]) / np.exp(logits[0]).sum()
    rng = np.random.default_rng(0)
    n = 40_000
    draws = np.concatenate([sample_next(np.repeat(logits, 1000, axis=0), rng=rng) for _ in range(n // 1000)])
    freq = np.bincount(draws, minlength=5) / n
    sigma = np.sqrt(expected * (1 - expected) / n)
    assert np.all(np.abs(freq - expected) < 5 * sigma)


def test_temperature_sharpens_and_zero_is_greedy():
    logits = np.array([[1.0, 2.0, 0.5]])
    cold, hot = next_token_probs(logits, temperature=0.5), next_token_probs(logits, temperature=2.0)
    assert cold[0, 1] > next_token_probs(logits)[0, 1] > hot[0, 1]
    assert sample_next(logits, temperature=0)[0] == 1


@pytest.mark.parametrize("temperature", [1e-8, 1e-30, 1e-308, 5e-324])
@pytest.mark.parametrize("filters", [{}, dict(top_k=2), dict(top_p=0.5)])
def test_a_tiny_temperature_is_greedy_not_nan(temperature, filters):
    """Logits of size ~100 divided by a temperature near float64's smallest overflow to inf, and
    inf - inf is NaN: the logits must be shifted by their maximum before they are divided."""
    logits = np.array([[100.0, 99.0, -100.0], [-3.0, 98.5, 99.0]], dtype=np.float32)
    probs = next_token_probs(logits, temperature=temperature, **filters)
    np.testing.assert_array_equal(probs, [[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    np.testing.assert_array_equal(sample_next(logits, temperature=temperature, **filters, rng=np.random.default_rng(0)),
                                  [0, 2])


@pytest.mark.parametrize("kwargs", [dict(temperature=-0.1), dict(top_k=0), dict(top_k=1.5), dict(top_p=0.0),
                                    dict(top_p=1.01), dict(temperature="hot"),
                                    dict(temperature=float("inf")), dict(temperature=float("nan")),
                                    dict(top_p=float("nan")), dict(top_p=float("inf")),
                                    dict(temperature=True), dict(top_p=True)])
def test_bad_values_raise(kwargs):
    with pytest.raises(ConfigError):
        check_sampling_args(**kwargs)


def test_numpy_numbers_are_good_values():
    check_sampling_args(np.float32(0.7), np.int64(5), np.float32(0.9))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_logits_that_overflowed_are_an_error_not_token_0(bad):
    logits = np.array([[1.0, 2.0, 3.0], [1.0, bad, 0.0]])
    for temperature in (1.0, 0.0):
        with pytest.raises(NumGPTError, match="NaN or infinite"):
            sample_next(logits, temperature, rng=np.random.default_rng(0))
    with pytest.raises(NumGPTError, match="NaN or infinite"):
        next_token_probs(np.array([[-np.inf, -np.inf]]))   # a row with no token to draw


def test_minus_inf_masks_a_token():
    np.testing.assert_array_equal(next_token_probs(np.array([[-np.inf, 0.0, 0.0]])), [[0.0, 0.5, 0.5]])


def test_top_p_keeps_the_smallest_set_that_reaches_p():
    """The nucleus is the smallest set of most likely tokens whose mass reaches p, renormalised:
    of four equal tokens, p = 0.5 keeps two (a third is not needed), p = 0.51 three."""
    logits = np.zeros((1, 4))
    np.testing.assert_array_equal(next_token_probs(logits, top_p=0.5), [[0.5, 0.5, 0.0, 0.0]])
    np.testing.assert_allclose(next_token_probs(logits, top_p=0.51), [[1 / 3, 1 / 3, 1 / 3, 0.0]], rtol=1e-15)


def test_top_p_at_a_huge_temperature_keeps_the_likeliest_tokens():
    """At T = 1e17 every exp rounds to 1, so the probabilities all tie: the nucleus (2 of 4 equal
    shares reach p = 0.3) must still be the two likeliest tokens, not the two lowest ids."""
    probs = next_token_probs(np.array([[0.0, 1.0, 2.0, 3.0]]), temperature=1e17, top_p=0.3)
    np.testing.assert_array_equal(probs, [[0.0, 0.0, 0.5, 0.5]])


@given(V=st.integers(2, 60), seed=st.integers(0, 2**32 - 1), temperature=st.sampled_from([0.3, 1.0, 2.5, 1e17]),
       top_k=st.none() | st.integers(1, 70), top_p=st.none() | st.floats(0.05, 0.99))
def test_the_distribution_is_transformers_warpers(V, seed, temperature, top_k, top_p):
    """Temperature, then top-k, then top-p, as transformers' generate applies its warpers: the same
    tokens kept and the same probabilities. Logits drawn from a continuum do not tie; a p within
    1e-9 of a cumulative mass is left out (where 1 - p rounds, the two may choose differently)."""
    torch = pytest.importorskip("torch", reason="torch is not installed (optional reference)")
    transformers = pytest.importorskip("transformers", reason="transformers is not installed (optional reference)")
    logits = np.random.default_rng(seed).standard_normal((1, V)) * 3
    if top_p is not None:
        masses = np.cumsum(np.sort(next_token_probs(logits, temperature, top_k)[0])[::-1])
        assume(np.abs(masses - top_p).min() > 1e-9)
    scores = torch.tensor(logits)
    warpers = [transformers.TemperatureLogitsWarper(temperature)]
    warpers += [transformers.TopKLogitsWarper(top_k)] if top_k is not None else []
    warpers += [transformers.TopPLogitsWarper(top_p)] if top_p is not None else []
    for warper in warpers:
        scores = warper(None, scores)
    reference = torch.softmax(scores, dim=-1).numpy()
    ours = next_token_probs(logits, temperature, top_k, top_p)
    np.testing.assert_array_equal(ours > 0, reference > 0)
    np.testing.assert_allclose(ours, reference, rtol=1e-12, atol=0)


def test_top_p_1_is_off():
    """--top-p 1 (the whole mass) is the documented way to switch the nucleus off."""
    check_sampling_args(top_p=1.0)
    logits = np.log([[0.5, 0.3, 0.15, 0.05]])
    np.testing.assert_allclose(next_token_probs(logits, top_p=1.0), next_token_probs(logits), rtol=1e-15)


class ZeroDraws:
    """A generator whose uniform draws are all 0.0, which a real one returns with probability 2**-53."""

    def random(self, shape):
        return np.zeros(shape)


def test_a_draw_of_zero_never_picks_a_token_of_probability_zero():
    """The token drawn is the first whose running mass exceeds the uniform draw: a token of
    probability 0 (masked, or cut by top-k) before it is skipped even when the draw is 0.0."""
    np.testing.assert_array_equal(sample_next(np.array([[-np.inf, 1.0, 2.0]]), rng=ZeroDraws()), [1])
    np.testing.assert_array_equal(sample_next(np.array([[0.0, 5.0, 1.0]]), top_k=2, rng=ZeroDraws()), [1])


@pytest.mark.parametrize("bad", [dict(temperature=-1.0), dict(temperature=float("nan")), dict(top_k=0),
                                 dict(top_p=0.0), dict(top_p=1.5)])
def test_the_sampling_functions_check_their_own_arguments(bad):
    """next_token_probs and sample_next are public too, not only generate: they used to take these
    silently. temperature -1 drew the least likely token most often, top_p 0 made every probability
    NaN and sample_next then returned token 0, temperature NaN the same; top_k 0 failed inside
    np.partition."""
    logits = np.array([[1.0, 2.0, 3.0]])
    with pytest.raises(ConfigError):
        next_token_probs(logits, **bad)
    with pytest.raises(ConfigError):
        sample_next(logits, **bad, rng=np.random.default_rng(0))
