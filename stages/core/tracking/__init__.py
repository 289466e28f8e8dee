"""MLflow: the store, the stage run and its worker process, lineage, the registry and serving.
May import anything below it."""
