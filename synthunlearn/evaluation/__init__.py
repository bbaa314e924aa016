"""Evaluation: instruction following (IFEval-style), pattern overfitting, knowledge, reports.

Modules: ``constraints`` (checkers), ``ifeval`` (accuracies), ``generate`` (greedy decoding),
``pattern`` (template rate, KL shift, token-frequency divergence), ``knowledge`` (multiple
choice, perplexity), ``report`` (JSON, markdown, plot).
"""
