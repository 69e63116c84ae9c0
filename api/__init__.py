"""The HTTP and WebSocket edge of the operations centre: KPIs, history, registries, live feed."""
