"""Re-runnable analyses of "Why Approximate Matrix Square Root Outperforms Accurate SVD in Global Covariance Pooling?"
(Song, Sebe, Wang, ICCV 2021, https://arxiv.org/abs/2105.02498), computed with the library's own methods.

Modules, each returning plain rows (lists of dicts) that :func:`write_report` turns into a markdown report with PNG
figures and CSVs (``scripts/reproduce_paper.py``):

- ``covariances``: the random covariance generator used across the package and a model head's own covariances;
- ``kernels``: Tables 6 and 7 (the backward kernels' approximation error and largest |K|), the reference's Padé value
  at ties;
- ``gradients``: every method's ∂L/∂Σ against the exact gradient; Newton–Schulz as a function of one eigenvalue;
- ``precision``: float32 against float64 (eigenvalues, and the gradient a model's head sends into the backbone); the
  reference code's tie rule against ours;
- ``fig2``: Fig. 2, training error and effective β-smoothness of MPN-COV and iSQRT-COV in float32 and float64;
- ``table2``: a small Table 2 (standalone and hybrid training) with the condition-number trend of Table 1;
- ``report``: the report's text, with ``tables`` (CSV and markdown output) and ``figures`` (its PNGs).
"""
from .covariances import (
    condition_numbers, model_feature_covariances, model_head_features, random_covariances, random_features)
from .fig2 import Fig2Config, effective_beta, run_fig2, summarise_fig2, train_fig2_run
from .gradients import DEFAULT_GRAD_VARIANTS, GradVariant, gradient_comparison, method_gradient, ns_function_curve
from .kernels import PAPER_TABLE6, PAPER_TABLE7, TABLE6_R, analysis_tables, table6, table7
from .precision import eig_precision_counts, head_gradient_precision, reference_tie_kernel, tie_rule_comparison
from .report import write_report
from .table2 import (
    TABLE2_METHOD_OPTIONS, TABLE2_METHODS, TABLE2_MODEL_KWARGS, TABLE2_TRAINER_ARGS, Table2Config, run_table2,
    summarise_table2, train_command)
from .tables import markdown_table, write_csv

__all__ = [
    'random_features', 'random_covariances', 'model_head_features', 'model_feature_covariances', 'condition_numbers',
    'PAPER_TABLE6', 'PAPER_TABLE7', 'TABLE6_R', 'table6', 'table7', 'analysis_tables',
    'GradVariant', 'DEFAULT_GRAD_VARIANTS', 'method_gradient', 'gradient_comparison', 'ns_function_curve',
    'eig_precision_counts', 'head_gradient_precision', 'reference_tie_kernel', 'tie_rule_comparison',
    'Fig2Config', 'effective_beta', 'train_fig2_run', 'run_fig2', 'summarise_fig2',
    'TABLE2_METHODS', 'TABLE2_TRAINER_ARGS', 'TABLE2_MODEL_KWARGS', 'TABLE2_METHOD_OPTIONS', 'Table2Config',
    'run_table2', 'summarise_table2', 'train_command',
    'write_csv', 'markdown_table', 'write_report',
]
