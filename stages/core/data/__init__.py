"""Tables before any model: sources, ingest, the Great Expectations gate, its report, splitting
and drift. Imports only stages.core.common; never torch."""
