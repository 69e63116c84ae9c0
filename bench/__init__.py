"""`ioc bench` and `ioc soak`: the performance and soak harness, outside the installed runtime packages.

A benchmark prints figures; nothing here asserts a time. `bench.harness.run` starts (or
joins) the broker and the database, runs the chosen sections, prints a table with the goals
met or missed, and writes the figures as JSON. It lives at the top of the checkout and is not
installed (pyproject.toml): the ``ioc`` command imports it from there (`entrypoints.cli`).
"""

from pathlib import Path
from typing import Final

#: The checkout this harness is in: its children (``python -m bench.clients``) import from here.
CHECKOUT: Final = Path(__file__).resolve().parents[1]
