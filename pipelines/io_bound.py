"""Q1 of the notebook, I/O-bound side: HTTP requests to a slow server.

Each request spends its time waiting for the server, with the GIL released, so threads
overlap the waits as well as processes do, and cost far less to start.
Start a server with `python -m pipelines.slow_server` (see there), then run
`configs/io_bound.yaml`.
"""

import json
import urllib.request
from collections.abc import Iterator
from typing import Any


def urls(base: str, count: int = 40) -> Iterator[str]:
    """`base/items/0` .. `base/items/{count-1}`."""
    for n in range(count):
        yield f"{base.rstrip('/')}/items/{n}"


def fetch(url: str) -> dict[str, Any]:
    """GET `url` and decode its JSON body."""
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())
