"""synthunlearn: SFT and lower-bounded unlearning of synthetic-data pattern overfitting.

Package map (one responsibility per module):
    config        YAML -> typed dataclasses, dotted overrides, validation
    errors        user-facing error types (reported without a traceback)
    ops           fused linear -> log-prob / KL op (torch oracle, Triton, C++ CPU)
    data          records -> token ids and labels, samplers, collation
    objectives    SFT and unlearning loss terms on per-token vectors
    training      DeepSpeed engines, loop, checkpoints, export
"""

__version__ = "0.1.0"
