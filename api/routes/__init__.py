"""The API's HTTP routes, one module per area; each has ``router(...)`` for `api.app.create_app` to include."""
