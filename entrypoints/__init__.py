"""Entry points: the ``ioc`` command (`entrypoints.cli`), the dev supervisor (`entrypoints.dev`), the embedded services.

The top layer: it starts what the packages below provide (the worker, the API, the simulators,
reports) and nothing below imports it. `entrypoints.embedded` starts throwaway local servers (a
Kafka-protocol broker, PostgreSQL, mosquitto) for `ioc dev`, the tests and the benchmarks.
"""
