"""synthunlearn: SFT and lower-bounded unlearning of synthetic-data pattern overfitting.

Package map (one responsibility per module):
    config        YAML -> typed dataclasses, dotted overrides, validation
    errors        user-facing error types (reported without a traceback)
    cli           the launchers' command line (launch/sft.py, launch/unlearn.py)
    distributed   process group under deepspeed, torchrun, srun or plain python
    modeling      loading HF causal LMs (ZeRO-3 aware) and exporting trained ones
    ops           fused linear -> log-prob / KL op (torch oracle, Triton, C++ CPU)
    data          records -> token ids and labels, samplers, collation
    objectives    SFT and unlearning loss terms on per-token vectors
    training      DeepSpeed engines, loop, checkpoints, export
    evaluation    IFEval-style checkers, pattern / KL shift, knowledge, seed statistics, report
    experiment    the miniature study: world generator, synthesis, pipeline, pooling of runs
    environment   what a measurement ran on: commit, package versions, CPU / GPU
    slurm         node lists, rendezvous and requeue for launch/slurm/*.sbatch
    tiny_model    the embedded tiny Llama and tokenizer, built offline
"""

__version__ = "0.1.0"
