"""infer.scoring: the metrics and their tie rule by hand, the candidate gather against a loop,
and one-to-one assignment (Sinkhorn, Hungarian) on pools whose answer is known by hand."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy.special import logsumexp

from infer.scoring import (
    ASSIGN_METHODS,
    DEFAULT_TEMPERATURE,
    assign,
    assignment_premise,
    candidate_similarities,
    logsumexp_rows,
    ranking_metrics,
    truth_ranks,
)

# --- ranking metrics ---------------------------------------------------------------------------


def test_metrics_by_hand() -> None:
    scores = np.array([[0.9, 0.1, 0.2, 0.3],  # truth 0 ranks 1
                       [0.5, 0.7, 0.6, 0.0],  # truth 2 ranks 2
                       [0.4, 0.3, 0.2, 0.1]])  # truth 3 ranks 4
    truth = np.array([0, 2, 3])
    assert truth_ranks(scores, truth).tolist() == [1, 2, 4]
    assert ranking_metrics(scores, truth) == pytest.approx(
        {"top1": 1 / 3, "top2": 2 / 3, "mrr": (1 + 1 / 2 + 1 / 4) / 3})


def test_perfect_model_scores_one_everywhere() -> None:
    scores = np.eye(5)[[3, 0, 4]]  # each row's truth alone at 1
    assert ranking_metrics(scores, np.array([3, 0, 4])) == {"top1": 1.0, "top2": 1.0, "mrr": 1.0}


def test_ties_count_against_the_truth() -> None:
    # a constant model ranks every truth last, not at chance
    assert ranking_metrics(np.zeros((4, 20)), np.array([0, 5, 19, 7])) == pytest.approx(
        {"top1": 0.0, "top2": 0.0, "mrr": 1 / 20})
    scores = np.array([[0.8, 0.8, 0.1],  # tied with one other: rank 2
                       [0.5, 0.5, 0.5],  # tied with two others: rank 3
                       [0.95, 0.9, 0.9]])  # one higher and one tied: rank 3
    truth = np.array([1, 0, 2])
    assert truth_ranks(scores, truth).tolist() == [2, 3, 3]
    assert ranking_metrics(scores, truth) == pytest.approx(
        {"top1": 0.0, "top2": 1 / 3, "mrr": (1 / 2 + 1 / 3 + 1 / 3) / 3})


def test_non_finite_scores_are_refused() -> None:
    with pytest.raises(ValueError, match="non-finite"):
        ranking_metrics(np.array([[0.1, np.nan]]), np.array([0]))


# --- candidate similarities --------------------------------------------------------------------


def test_candidate_similarities_match_a_loop() -> None:
    rng = np.random.default_rng(0)
    embeddings = rng.normal(size=(30, 8))
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)  # (M, D) unit rows
    query_rows = rng.integers(0, 30, size=7)  # (Q,)
    candidate_rows = np.stack([rng.choice(30, 5, replace=False) for _ in range(7)])  # (Q, K)
    expected = [[float(embeddings[q] @ embeddings[c]) for c in row]
                for q, row in zip(query_rows, candidate_rows, strict=True)]
    got = candidate_similarities(embeddings, query_rows, candidate_rows)
    assert got.shape == (7, 5)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)


# --- one-to-one assignment ---------------------------------------------------------------------

FULL_3 = np.tile(np.arange(3), (3, 1))  # (3, 3): every query may pick every image
# plain top-1: image 1, 1, 0 (two queries share image 1, and image 2 is nobody's);
# the best one-to-one assignment, by hand over the 6 permutations: 1, 0, 2 (0.9 + 0.8 + 0.45)
SCORES_3 = np.array([[0.1, 0.9, 0.3],
                     [0.8, 0.85, 0.2],
                     [0.5, 0.4, 0.45]])


def best_assignment(scores: np.ndarray, candidates: np.ndarray) -> list[int]:
    """Brute force over permutations: the image id each query gets in the one-to-one assignment
    of highest total score, each query restricted to its candidates (ids 0..Q-1)."""
    n = len(scores)
    total = {p: sum(scores[q, list(candidates[q]).index(p[q])] for q in range(n))
             for p in itertools.permutations(range(n))
             if all(p[q] in candidates[q] for q in range(n))}
    return list(max(total, key=total.get))


@pytest.mark.parametrize("method", ["sinkhorn", "hungarian"])
def test_assignment_solves_3x3_by_hand(method: str) -> None:
    assert best_assignment(SCORES_3, FULL_3) == [1, 0, 2]
    assert SCORES_3.argmax(axis=1).tolist() == [1, 1, 0]  # plain ranking gets 2 of 3 wrong
    assigned = assign(SCORES_3, FULL_3, method, temperature=0.01)
    assert assigned.argmax(axis=1).tolist() == [1, 0, 2]


# A ring of 4 queries and 4 images with 2 candidates each, under arbitrary image ids: query i may
# pick image i (its truth) or the next one. Plain ranking sends query 1 to image 2; the best
# one-to-one assignment (0.9 + 0.6 + 0.8 + 0.5 against 0.1 + 0.7 + 0.2 + 0.3) is the truth.
IDS = np.array([70, 11, 42, 5])  # image i's id
RING_CANDIDATES = IDS[np.array([[1, 0], [1, 2], [3, 2], [3, 0]])]  # (4, 2) the truth not first
RING_SCORES = np.array([[0.1, 0.9], [0.6, 0.7], [0.2, 0.8], [0.5, 0.3]])
RING_TRUTH = np.array([1, 0, 1, 0])


@pytest.mark.parametrize("method", ["sinkhorn", "hungarian"])
def test_assignment_fixes_what_plain_ranking_gets_wrong(method: str) -> None:
    assert ranking_metrics(RING_SCORES, RING_TRUTH)["top1"] == 0.75
    assigned = assign(RING_SCORES, RING_CANDIDATES, method, temperature=0.05)
    assert assigned.shape == RING_SCORES.shape and np.isfinite(assigned).all()
    assert ranking_metrics(assigned, RING_TRUTH)["top1"] == 1.0


def test_none_returns_the_scores_unchanged() -> None:
    assert assign(SCORES_3, FULL_3, "none") is SCORES_3
    assert set(ASSIGN_METHODS) == {"none", "sinkhorn", "hungarian"}


def test_hungarian_puts_the_assigned_first_and_keeps_the_plain_order_behind() -> None:
    candidates = np.array([[0, 1, 2], [0, 1, 3], [2, 3, 1], [3, 0, 2]])  # (4, 3) ids of 4 images
    scores = np.array([[0.9, 0.5, 0.7], [0.8, 0.3, 0.6], [0.2, 0.4, 0.1], [0.3, 0.2, 0.1]])
    # the best assignment (total 1.9, the next best 1.8): images 2, 0, 1, 3, i.e. positions
    # 2, 0, 2, 0; queries 0 and 2 lose their plain favourite
    assert best_assignment(scores, candidates) == [2, 0, 1, 3]
    lifted = assign(scores, candidates, "hungarian")
    assigned = [2, 0, 2, 0]  # position in each row of the assigned candidate
    for row, plain, position in zip(lifted, scores, assigned, strict=True):
        others = [k for k in np.argsort(-plain, kind="stable") if k != position]
        assert np.argsort(-row, kind="stable").tolist() == [position, *others]
        np.testing.assert_array_equal(np.delete(row, position), np.delete(plain, position))
    assert np.isfinite(lifted).all()


def random_pool(n: int, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Scores and candidates (n, k) laid out like `validation_split`: query i's truth is image i,
    its foils k - 1 of the others."""
    rng = np.random.default_rng(seed)
    candidates = np.stack([rng.permutation(np.append(
        rng.choice(np.delete(np.arange(n), i), k - 1, replace=False), i)) for i in range(n)])
    return rng.uniform(-0.5, 1.0, size=(n, k)), candidates


def sinkhorn_marginals(log_p: np.ndarray, candidates: np.ndarray) -> tuple[np.ndarray, ...]:
    """Each query's and each image's total probability, recomputed here."""
    p = np.exp(log_p)
    _, columns = np.unique(candidates, return_inverse=True)
    return p.sum(axis=1), np.bincount(columns.ravel(), weights=p.ravel())


@pytest.mark.parametrize("pool", ["full", "partial"])
def test_sinkhorn_is_finite_balanced_and_shift_invariant(pool: str) -> None:
    if pool == "full":  # Q = M: every query sees every image
        scores = np.random.default_rng(1).uniform(-1, 1, size=(12, 12))
        candidates = np.tile(np.arange(12), (12, 1))
    else:
        scores, candidates = random_pool(60, 20, seed=2)
    log_p = assign(scores, candidates, "sinkhorn", temperature=0.1)
    assert log_p.shape == scores.shape and np.isfinite(log_p).all()
    rows, columns = sinkhorn_marginals(log_p, candidates)
    np.testing.assert_allclose(rows, 1, atol=1e-3)
    np.testing.assert_allclose(columns, 1, atol=1e-3)
    np.testing.assert_allclose(assign(scores + 3.7, candidates, "sinkhorn", temperature=0.1),
                               log_p, atol=1e-9)
    # the temperature is relative to the scores' spread: scaling them changes nothing
    np.testing.assert_allclose(assign(scores * 0.01, candidates, "sinkhorn", temperature=0.1),
                               log_p, atol=1e-6)


def dense_sinkhorn(scores: np.ndarray, candidates: np.ndarray, temperature: float) -> np.ndarray:
    """Sinkhorn written the plain way, as a reference: the dense (Q, N) kernel, -inf off each
    query's candidates, rows and columns normalised in turn until both sum to 1; (Q, K)."""
    pool, columns = np.unique(candidates, return_inverse=True)
    columns = columns.reshape(candidates.shape)
    rows = np.arange(len(scores))[:, None]
    log_p = np.full((len(scores), len(pool)), -np.inf)  # (Q, N)
    log_p[rows, columns] = scores / (temperature * scores.std())
    for _ in range(20_000):
        log_p -= logsumexp(log_p, axis=1, keepdims=True)
        log_p -= logsumexp(log_p, axis=0, keepdims=True)
        if np.abs(logsumexp(log_p, axis=1)).max() < 1e-12:
            break
    return log_p[rows, columns]


def test_sinkhorn_on_an_uneven_pool_at_the_default_temperature_matches_a_dense_reference() -> None:
    """Images shared by different numbers of queries (from 1 to 8 here) take the padded slots of
    the sparse gather; at the default temperature every entry counts, so a pad that picked a real
    entry instead of -inf would change the balance and some top-1 answers."""
    scores, candidates = random_pool(60, 20, seed=5)
    shared_by = np.bincount(candidates.ravel())
    assert shared_by.min() < shared_by.max()  # uneven: some images' slots are padded
    log_p = assign(scores, candidates, "sinkhorn")  # DEFAULT_TEMPERATURE
    expected = dense_sinkhorn(scores, candidates, DEFAULT_TEMPERATURE)
    np.testing.assert_allclose(np.exp(log_p), np.exp(expected), atol=1e-4)
    assert (log_p.argmax(axis=1) == expected.argmax(axis=1)).all()
    rows, columns = sinkhorn_marginals(log_p, candidates)
    np.testing.assert_allclose(rows, 1, atol=1e-3)
    np.testing.assert_allclose(columns, 1, atol=1e-3)


@pytest.mark.parametrize("method", ASSIGN_METHODS)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_assign_leaves_its_input_scores_unchanged(method: str, dtype: type) -> None:
    """infer and head.train report the plain figures from the scores they passed to `assign`:
    an assignment written into them would pass off assigned figures as plain ones."""
    scores, candidates = random_pool(30, 10, seed=6)
    scores = scores.astype(dtype)
    before = scores.copy()
    assign(scores, candidates, method)
    assert scores.tobytes() == before.tobytes()


@pytest.mark.parametrize("temperature", [0.05, 0.3, 2.0])
def test_sinkhorn_2x2_closed_form(temperature: float) -> None:
    """A doubly stochastic 2 x 2 is [[p, 1-p], [1-p, p]], and Sinkhorn keeps the kernel's cross
    ratio, so p / (1-p) = exp(d / 2 T sigma) with d = s00 + s11 - s01 - s10 and sigma the
    scores' standard deviation (0.1920 here)."""
    scores = np.array([[0.7, 0.6], [0.2, 0.5]])
    d = 0.7 + 0.5 - 0.6 - 0.2
    sigma = np.sqrt(np.mean((scores - 0.5) ** 2))
    p = 1 / (1 + np.exp(-d / (2 * temperature * sigma)))
    log_p = assign(scores, np.array([[0, 1], [0, 1]]), "sinkhorn", temperature)
    np.testing.assert_allclose(np.exp(log_p), [[p, 1 - p], [1 - p, p]], atol=1e-4)


def test_sinkhorn_keeps_a_one_to_one_consistent_top1() -> None:
    """Where each query's plain favourite is a different image, that is already the best
    assignment, and low-temperature Sinkhorn keeps it."""
    scores, candidates = random_pool(40, 20, seed=3)
    scores[candidates == np.arange(40)[:, None]] += 2.0  # each query's truth now leads clearly
    favourites = candidates[np.arange(40), scores.argmax(axis=1)]
    assert len(set(favourites.tolist())) == 40
    for method in ("sinkhorn", "hungarian"):
        assigned = assign(scores, candidates, method, temperature=0.05)
        assert (assigned.argmax(axis=1) == scores.argmax(axis=1)).all(), method


def test_sinkhorn_at_high_temperature_ranks_by_score_less_the_image_mean() -> None:
    """High temperature does not give back the plain ranking: balancing subtracts each image's
    potential, which to first order in 1/T is the image's mean score over the queries."""
    scores = np.random.default_rng(1).uniform(-1, 1, size=(6, 6))
    full = np.tile(np.arange(6), (6, 1))
    centred = scores - scores.mean(axis=0)
    assert (centred.argmax(axis=1) != scores.argmax(axis=1)).any()  # the two orders differ here
    assert (assign(scores, full, "sinkhorn", 1000.0).argmax(axis=1)
            == centred.argmax(axis=1)).all()


def test_logsumexp_rows_matches_scipy() -> None:
    values = np.random.default_rng(0).normal(scale=30, size=(5, 7))
    values[1, 3:] = -np.inf  # the padding Sinkhorn gathers
    np.testing.assert_allclose(logsumexp_rows(values), logsumexp(values, axis=1), rtol=1e-12)


# --- when one-to-one makes no sense ------------------------------------------------------------


def test_premise_holds_for_one_to_one_pools() -> None:
    assert assignment_premise(FULL_3, 3) is None
    assert assignment_premise(np.unique(RING_CANDIDATES, return_inverse=True)[1].reshape(4, 2),
                              4) is None
    assert assignment_premise(random_pool(50, 20, seed=4)[1], 50) is None


@pytest.mark.parametrize("candidates, n_images, reason", [
    ([[0, 1], [1, 2], [2, 0]], 4, "1 of the 4 pool images are no query's candidate"),
    ([[0, 1], [1, 2], [2, 3]], 4, "the pool has 4 candidate images for 3 queries"),
    ([[0, 1], [0, 1], [0, 1], [2, 3]], 4, "at most 3 of the 4 queries"),
    ([[0, 1], [1, 5]], 2, "candidate indices must lie in [0, 2)"),
], ids=["image nobody can pick", "more images than queries", "no matching", "out of range"])
def test_premise_refuses(candidates: list, n_images: int, reason: str) -> None:
    assert reason in assignment_premise(np.array(candidates), n_images)


@pytest.mark.parametrize("method", ["sinkhorn", "hungarian"])
def test_assign_refuses_a_pool_that_is_not_one_to_one(method: str) -> None:
    candidates = np.array([[0, 1], [1, 2], [2, 3]])  # 4 images for 3 queries
    with pytest.raises(ValueError, match="4 candidate images for 3 queries"):
        assign(np.ones((3, 2)), candidates, method)


def test_assign_refuses_bad_arguments() -> None:
    with pytest.raises(ValueError, match="unknown assignment 'greedy'; choose one of none, "):
        assign(SCORES_3, FULL_3, "greedy")
    with pytest.raises(ValueError, match="temperature must be positive"):
        assign(SCORES_3, FULL_3, "sinkhorn", temperature=0.0)
    with pytest.raises(ValueError, match="non-finite"):
        assign(np.full((3, 3), np.inf), FULL_3, "hungarian")
