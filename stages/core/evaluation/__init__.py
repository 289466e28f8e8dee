"""Scoring, baselines, gates, metrics with intervals, figures and the report. Imports
stages.core.common, .data, .engine and .modeling; never MLflow."""
