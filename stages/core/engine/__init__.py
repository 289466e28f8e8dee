"""The training loop (one ``fit()``), checkpoints, distributed launch, progress, and the device
and precision choice. Imports only stages.core.common; knows no architecture."""
