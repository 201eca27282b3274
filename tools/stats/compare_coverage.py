"""How often `vt-train compare`'s 95 % interval of an accuracy difference holds the true one.

Draws paired outcomes of two classifiers (both right, only A, only B, neither) from known
probabilities, computes each draw's interval, and counts the draws whose interval holds the
true difference: Newcombe's square-and-add interval (1998, method 10, which compare uses),
against the exact conditional one (Clopper-Pearson on A's share of the discordant images,
which compare used before) and Wald's.

    python3 tools/stats/compare_coverage.py [--draws N]   # numpy and scipy
"""

import argparse

import numpy as np
from scipy.stats import beta

Z = 1.959963984540054


def wilson(k, n):
    p = k / n
    center = (2 * k + Z * Z) / (2 * (n + Z * Z))
    half = Z * np.sqrt(Z * Z + 4 * k * (1 - p)) / (2 * (n + Z * Z))
    return center - half, center + half


def newcombe(both, only_a, only_b, neither):
    n = both + only_a + only_b + neither
    a, b = both + only_a, both + only_b
    p_a, p_b = a / n, b / n
    low_a, high_a = wilson(a, n)
    low_b, high_b = wilson(b, n)
    cross = (both * neither - only_a * only_b).astype(float)
    margins = (a * (n - a) * b * (n - b)).astype(float)
    cross = np.where(cross > n / 2, cross - n / 2, np.minimum(cross, 0))
    phi = np.where(margins > 0, cross / np.sqrt(np.where(margins > 0, margins, 1)), 0)

    def spread(x, y):
        return np.sqrt(np.maximum(x * x - 2 * phi * x * y + y * y, 0))

    d = p_a - p_b
    return d - spread(p_a - low_a, high_b - p_b), d + spread(p_b - low_b, high_a - p_a)


def conditional(only_a, only_b, n):
    m = only_a + only_b
    low = np.nan_to_num(np.where(only_a == 0, 0.0, beta.ppf(0.025, only_a, m - only_a + 1)))
    high = np.where(only_a == m, 1.0, np.nan_to_num(beta.ppf(0.975, only_a + 1, m - only_a), nan=1.0))
    share = m / n
    return share * (2 * low - 1), share * (2 * high - 1)


def wald(only_a, only_b, n):
    d = (only_a - only_b) / n
    se = np.sqrt(np.maximum((only_a + only_b) / n - d * d, 0) / n)
    return d - Z * se, d + Z * se


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--draws", type=int, default=200_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    print("| images | P(both) | P(only A) | P(only B) | Newcombe | conditional | Wald |")
    print("|---|---|---|---|---|---|---|")
    for n, p_both, p_a, p_b in [
        (150, 0.70, 0.14, 0.11),
        (150, 0.85, 0.10, 0.02),
        (360, 0.85, 0.05, 0.01),
        (360, 0.85, 0.01, 0.01),
        (3000, 0.90, 0.04, 0.03),
        (3000, 0.90, 0.05, 0.02),
    ]:
        draws = rng.multinomial(n, [p_both, p_a, p_b, 1 - p_both - p_a - p_b], size=args.draws)
        both, only_a, only_b, neither = draws.T
        true = p_a - p_b
        covered = []
        for low, high in [
            newcombe(both, only_a, only_b, neither),
            conditional(only_a, only_b, n),
            wald(only_a, only_b, n),
        ]:
            covered.append(np.mean((low <= true) & (true <= high)))
        print(f"| {n} | {p_both} | {p_a} | {p_b} | " + " | ".join(f"{c:.3f}" for c in covered) + " |")


if __name__ == "__main__":
    main()
