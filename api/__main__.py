"""``python -m api``: run the API (what ``ioc api`` does) against ``IOC_*`` settings."""

from __future__ import annotations

import logging

from api.app import serve
from ioc.settings import Settings


def main() -> None:
    settings = Settings()
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    serve(settings)


if __name__ == "__main__":
    main()
