"""The ground floor: errors, params, file layout, atomic io, the CLI wrapper, telemetry, the
canonical schema and digests. Imports nothing of ours."""
