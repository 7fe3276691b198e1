"""Bounds for assertions on a trained model's numbers that hold on any correct floating-point path.

CPUs differ in their kernels' last bits (AVX2, AVX-512, AMX, the portable `default` path), and over a few epochs
those bits grow into a different model. So a test never compares a trained model's numbers with a literal recorded
on one machine: it asserts what the method guarantees, a margin derived from the set's size, or that two
computations in the same run on the same machine agree.
"""

from __future__ import annotations

import math

# A result this unlikely under the null hypothesis is not luck: one false failure in a thousand runs per assertion.
ALPHA = 1e-3


def binomial_tail(successes: int, trials: int, p: float) -> float:
    """P(X >= successes) for X ~ Binomial(trials, p)."""
    return sum(math.comb(trials, k) * p**k * (1 - p) ** (trials - k) for k in range(successes, trials + 1))


def beats_chance(correct: int, images: int, classes: int, alpha: float = ALPHA) -> bool:
    """Whether `correct` of `images` right answers is more than guessing among `classes` could give (p < alpha)."""
    return binomial_tail(correct, images, 1 / classes) < alpha


def most_flagged(images: int, keep: float) -> int:
    """The most of `images` validation images a threshold fitted on them to keep `keep` known may flag elsewhere.

    The threshold is one of their own scores (the `keep` quantile, rounded up), so at most floor((1 - keep) * n)
    lie above it where it was fitted; another computation of the same scores (the served path, folded BatchNorm,
    another thread count) may move the image that sits exactly on the threshold by a last bit, hence one more.
    """
    return math.floor((1 - keep) * images + 1e-9) + 1
