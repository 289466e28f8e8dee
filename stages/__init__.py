"""finetune-pipeline: the DVC stages, each runnable as ``python -m stages.<name>``."""
