"""Ranking and scoring as pure functions of embeddings and score matrices (numpy and scipy).

Training's validation and `python -m infer` both score through here, so a figure means the same
wherever it is printed.

One-to-one assignment: in the Kaggle test (and in `validation_split`) every candidate image is
the true match of exactly one query. `assign` re-scores the whole pool with that in mind: Sinkhorn
balancing (soft) or the Hungarian algorithm (hard), each query restricted to its own candidates.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import maximum_bipartite_matching

ASSIGN_METHODS = ("none", "sinkhorn", "hungarian")
DEFAULT_ASSIGN = "sinkhorn"  # where the pool is one-to-one; benchmarks/assignment_quality.py
# Sinkhorn's, in units of the scores' standard deviation (see `assign`)
DEFAULT_TEMPERATURE = 0.5
# The largest |log row sum| accepted (columns are exact after each step). On a 2,000-query pool
# every query's top 2 came out as at 1e-6, in half the iterations.
SINKHORN_TOLERANCE = 1e-4
# Bounds the time (~1.5 s for 2,000 queries on a busy 2-core CPU); temperatures below ~0.03 on
# cosine scores can need more iterations to meet the tolerance, and stop here.
SINKHORN_MAX_ITERATIONS = 1000
# Scores whose standard deviation is below this fraction of their largest magnitude differ by
# rounding alone: cosines of float32 embeddings carry about 7 significant digits, and dividing
# such noise by its own spread (Sinkhorn's temperature) would turn it into a confident ranking.
NOISE_SPREAD = 1e-6
# A row of scores whose range is below this (relative to its largest magnitude, at least 1) is
# flat: the submission's 9 significant digits cannot tell its candidates apart.
FLAT_RANGE = 1e-7


def candidate_similarities(embeddings: np.ndarray, query_rows: np.ndarray,
                           candidate_rows: np.ndarray) -> np.ndarray:
    """Cosine of each query with each of its candidates, (Q, K).

    embeddings (M, D) unit rows of every image; query_rows (Q,) the row of each query's image;
    candidate_rows (Q, K) the rows of its candidates.
    """
    scores = embeddings[query_rows] @ embeddings.T  # (Q, M): each query against every image
    return np.take_along_axis(scores, candidate_rows, axis=1)


def assignment_premise(candidates: np.ndarray, n_images: int) -> str | None:
    """None where one-to-one assignment makes sense for this pool, else a sentence saying why not.

    candidates (Q, K) column indices into a pool of `n_images` images. The premise: every pool
    image is some query's candidate, there are as many pool images as queries, and each query
    can be given a different one of its own candidates.
    """
    n_queries = len(candidates)
    if candidates.size and (candidates.min() < 0 or candidates.max() >= n_images):
        return f"candidate indices must lie in [0, {n_images}), the pool's images"
    used = len(np.unique(candidates))
    if used < n_images:
        return (f"{n_images - used} of the {n_images} pool images are no query's candidate, so "
                "they cannot be anyone's match")
    if n_images != n_queries:
        return (f"the pool has {n_images} candidate images for {n_queries} queries; one-to-one "
                "needs exactly one image per query")
    rows = np.repeat(np.arange(n_queries), candidates.shape[1])
    allowed = csr_matrix((np.ones(candidates.size), (rows, candidates.ravel())),
                         shape=(n_queries, n_images))
    matched = int((maximum_bipartite_matching(allowed, perm_type="column") >= 0).sum())
    if matched < n_queries:
        return (f"at most {matched} of the {n_queries} queries can each get a different one of "
                "their own candidates")
    return None


def assign(scores: np.ndarray, candidates: np.ndarray, method: str = DEFAULT_ASSIGN,
           temperature: float = DEFAULT_TEMPERATURE) -> np.ndarray:
    """Scores (Q, K) re-ranked so that every pool image is used once; finite, higher = better.

    scores (Q, K) each query's similarity to its candidates; candidates (Q, K) integer ids of
    those images (any ids: the pool is the set of distinct ids). `method`:
    none: `scores` unchanged.
    sinkhorn: log-probabilities of the balanced assignment: exp(scores / (temperature * sigma))
        over each query's own candidates, rows and columns alternately normalised until every
        row and every image sums to 1. sigma is the standard deviation of all of `scores`: the
        temperature is relative to their spread, so one setting serves a trained head, whose
        cosines spread widely, and frozen trunk features, whose cosines all sit near 1 (there a
        fixed temperature of 0.05 leaves the kernel nearly flat, and how many queries share
        each image, not the scores, decides the ranking: random-init ResNet50's frozen top-2
        fell from 0.26 to 0.15).
    hungarian: the best one-to-one assignment (maximum total score); each query's assigned
        candidate is lifted above its others (row maximum + 1), which keep their plain scores
        and order, so top-2 still has a second choice.
    Scores that carry no information (`uninformative`) are returned as they are: balancing
    rounding noise would only invent a ranking.
    Raises ValueError where the pool is not one-to-one (`assignment_premise` says why), and where
    Sinkhorn's temperature is so high that a row comes out flat that was not.
    """
    if method not in ASSIGN_METHODS:
        raise ValueError(f"unknown assignment {method!r}; choose one of "
                         f"{', '.join(ASSIGN_METHODS)}")
    if method == "none":
        return scores
    if not np.isfinite(scores).all():
        raise ValueError("cannot assign from non-finite scores")
    pool, columns = np.unique(candidates, return_inverse=True)
    columns = columns.reshape(candidates.shape)  # (Q, K) in [0, N), N = pool size
    reason = assignment_premise(columns, len(pool))
    if reason:
        raise ValueError(f"no one-to-one assignment for this pool: {reason}")
    if method == "sinkhorn" and not 0 < temperature < np.inf:
        raise ValueError(f"the Sinkhorn temperature must be positive and finite, got "
                         f"{temperature}")
    if uninformative(scores):  # the caller says so (`uninformative`); nothing to balance
        return scores
    if method == "sinkhorn":
        spread = float(scores.std()) or 1.0  # all scores equal: any scale gives a flat kernel
        log_kernel = scores.astype(np.float64) / (temperature * spread)  # (Q, K)
        assigned = _sinkhorn(log_kernel, columns, len(pool))
        # a flat kernel row is ranked by how many queries share each image, not by its scores
        flattened = int(((flat_rows(log_kernel) | flat_rows(assigned))
                         & ~flat_rows(scores)).sum())
        if flattened:
            raise ValueError(f"the Sinkhorn temperature {temperature:g} is too high for these "
                             f"scores: at that scale the candidates of {flattened} of the "
                             f"{len(scores)} queries all look alike; choose a lower one")
        return assigned
    return _hungarian(scores, columns, len(pool))


def uninformative(scores: np.ndarray) -> str | None:
    """None where finite scores (Q, K) can rank anything, else a sentence saying why not: their
    spread is at the level of float noise (`NOISE_SPREAD`), as when every image has the same
    features. `assign` leaves such scores as they are."""
    spread, magnitude = float(scores.std()), float(np.abs(scores).max(initial=0.0))
    if spread <= NOISE_SPREAD * magnitude:
        return (f"the scores' spread ({spread:.2g}) is at the level of float rounding for their "
                f"magnitude ({magnitude:.2g}): they carry no information")
    return None


def flat_rows(scores: np.ndarray) -> np.ndarray:
    """(Q,) whether each row of scores (Q, K) gives every candidate the same score, to within
    `FLAT_RANGE` of its largest magnitude (at least 1)."""
    scale = np.maximum(np.abs(scores).max(axis=1), 1.0)  # (Q,)
    return np.ptp(scores, axis=1) <= FLAT_RANGE * scale


def _sinkhorn(log_kernel: np.ndarray, columns: np.ndarray, n_images: int) -> np.ndarray:
    """Balanced log-probabilities (Q, K) of the kernel exp(log_kernel) (Q, K), whose entry (q, k)
    sits at column columns[q, k] of the (Q, N) matrix; every entry off the mask is -inf.

    Only the Q x K mask entries are stored: the dense (Q, N) matrix would be 99% -inf for the
    Kaggle test and cost 100 times more per step. Each image's entries are gathered through a
    padded (N, C) index table (C = the most queries sharing one image).
    """
    flat_columns = columns.ravel()  # (Q*K,)
    counts = np.bincount(flat_columns, minlength=n_images)  # (N,)
    by_column = np.argsort(flat_columns, kind="stable")  # (Q*K,) entries grouped by image
    slot = np.arange(flat_columns.size) - np.repeat(np.cumsum(counts) - counts, counts)
    members = np.full((n_images, counts.max()), flat_columns.size)  # (N, C); pad -> the -inf slot
    members[flat_columns[by_column], slot] = by_column

    log_p = log_kernel.astype(np.float64)  # (Q, K)
    for _ in range(SINKHORN_MAX_ITERATIONS):
        row_sums = logsumexp_rows(log_p)  # (Q,) log of each query's mass
        if np.abs(row_sums).max() < SINKHORN_TOLERANCE:
            break
        log_p = log_p - row_sums[:, None]
        padded = np.append(log_p.ravel(), -np.inf)  # (Q*K + 1,)
        column_sums = logsumexp_rows(padded[members])  # (N,) log of each image's mass
        log_p = log_p - column_sums[columns]
    return log_p


def logsumexp_rows(values: np.ndarray) -> np.ndarray:
    """log(sum(exp(values), axis=1)) of (R, C) -> (R,); every row needs a finite entry.

    scipy.special.logsumexp gives the same, but its generality costs ~1 ms a call at Sinkhorn's
    sizes, 3-4 times this, and Sinkhorn calls it twice per iteration.
    """
    peak = values.max(axis=1, keepdims=True)  # (R, 1) finite: shifting by it cannot overflow
    return peak[:, 0] + np.log(np.exp(values - peak).sum(axis=1))


def _hungarian(scores: np.ndarray, columns: np.ndarray, n_images: int) -> np.ndarray:
    """Scores (Q, K) with each query's assigned candidate lifted to the row's maximum + 1."""
    n_queries = len(scores)
    cost = np.full((n_queries, n_images), np.inf)  # (Q, N); inf: not this query's candidate
    cost[np.arange(n_queries)[:, None], columns] = -scores  # maximise the total score
    _, assigned = linear_sum_assignment(cost)  # (Q,) the pool column of each query's match
    lifted = scores.astype(np.float64)  # a copy
    is_assigned = columns == assigned[:, None]  # (Q, K), one True per row
    lifted[is_assigned] = scores.max(axis=1) + 1.0
    return lifted


def truth_ranks(scores: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Rank (Q,) of each query's true candidate, 1 = first; ties count against the truth.

    scores (Q, K), higher = more likely; truth (Q,) the index of the true candidate. The rank is
    1 + the number of OTHER candidates scoring >= the truth, so a model that scores every
    candidate alike ranks every truth last, not by chance.
    """
    if not np.isfinite(scores).all():
        raise ValueError("cannot rank non-finite scores")
    true_scores = scores[np.arange(len(scores)), truth]  # (Q,)
    return (scores >= true_scores[:, None]).sum(axis=1)  # (Q,) the truth counts itself once


def ranking_metrics(scores: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """top-1, top-2 accuracy and mean reciprocal rank of the true candidate.

    scores (Q, K), higher = more likely; truth (Q,) the index of the true candidate. Tie rule
    (`truth_ranks`): a tie counts against the truth, so a constant model gets top-1 0.
    """
    ranks = truth_ranks(scores, truth)  # (Q,)
    return {
        "top1": float(np.mean(ranks <= 1)),
        "top2": float(np.mean(ranks <= 2)),
        "mrr": float(np.mean(1.0 / ranks)),
    }
