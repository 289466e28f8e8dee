"""Architectures, the classifier and its saved form, LoRA and the fine-tuning strategies.
Imports stages.core.common and stages.core.engine."""
