"""The benchmark report: compatibility matrix, ECC verdicts and AC, cross-device gaps, compatibility tax,
NFR/PFR and the mixed-gallery curve, measured from embeddings the training orchestration produced.

Torch-free (numpy, faiss, matplotlib) so the server's benchmark tools reuse it. Inputs are plain
dataclasses (`protocol`): `ModelEmbeddings` per model, `Labels` of the benchmark, and a `Protocol` naming
which pairs to judge. `figures.build_report` returns a JSON-ready dict; `report.write_report` writes it as
JSON, Markdown and two PNG figures.
"""

from training.evaluate.figures import Evaluator, build_report, manifest_metrics, matrix_pairs, semantic_common
from training.evaluate.protocol import (
    GAP_THRESHOLD,
    MAIN,
    ROLES,
    SHARES,
    UPGRADE_METRICS,
    BackfillSpec,
    DevicePair,
    FlipPair,
    Labels,
    MixedSpec,
    ModelEmbeddings,
    Protocol,
    TaxPair,
    UpgradePair,
)
from training.evaluate.report import markdown_report, markdown_table, plot_matrix, plot_mixed, write_report

__all__ = ["GAP_THRESHOLD", "MAIN", "ROLES", "SHARES", "UPGRADE_METRICS", "BackfillSpec", "DevicePair", "Evaluator",
           "FlipPair", "Labels", "MixedSpec", "ModelEmbeddings", "Protocol", "TaxPair", "UpgradePair", "build_report",
           "manifest_metrics", "markdown_report", "markdown_table", "matrix_pairs", "plot_matrix", "plot_mixed",
           "semantic_common", "write_report"]
