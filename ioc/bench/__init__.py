"""`ioc bench`: the performance harness (throughput, latency, fan-out, database sink) of issue #7.

A benchmark prints figures; nothing here asserts a time. `ioc.bench.harness.run` starts (or
joins) the broker and the database, runs the chosen sections, prints a table with the goals
met or missed, and writes the figures as JSON.
"""
