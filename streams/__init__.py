"""Stream processing: event schemas, pure KPI logic (one module per event kind), the engine, the Faust worker, replay."""
