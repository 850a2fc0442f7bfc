"""Ranking and scoring as pure functions of embeddings and score matrices (numpy, scikit-learn).

Training's validation and `python -m infer` both score through here, so a figure means the same
wherever it is printed.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import label_ranking_average_precision_score, top_k_accuracy_score


def score_matrix(queries: np.ndarray, images: np.ndarray) -> np.ndarray:
    """Cosine similarity of every query to every image: (Q, D) x (M, D) unit rows -> (Q, M)."""
    return queries @ images.T


def candidate_scores(scores: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """Each query's scores for its own candidates: (Q, M) and column indices (Q, K) -> (Q, K)."""
    return np.take_along_axis(scores, candidates, axis=1)


def ranking_metrics(scores: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """top-1, top-2 accuracy and mean reciprocal rank of the true candidate.

    scores (Q, K), higher = more likely; truth (Q,) the index of the true candidate.
    With one relevant candidate per query, label-ranking average precision is exactly MRR.
    """
    labels = np.arange(scores.shape[1])
    relevant = truth[:, None] == labels[None, :]  # (Q, K) one-hot
    return {
        "top1": float(top_k_accuracy_score(truth, scores, k=1, labels=labels)),
        "top2": float(top_k_accuracy_score(truth, scores, k=2, labels=labels)),
        "mrr": float(label_ranking_average_precision_score(relevant, scores)),
    }
