"""A finished Vega-Lite spec that ``gr.Plot`` draws as an Altair chart.

``gr.Plot`` draws any value from a module whose name holds "altair" by sending its ``to_json()``.
Building and validating a whole Altair chart on every poll cost ~60 ms for 3,000 points; the
training curve instead builds its layout with Altair once (cached, validated) and each poll only
fills in the data, so this wrapper carries the finished spec.
"""

from __future__ import annotations

import json
from typing import Any


class VegaLiteChart:
    """A Vega-Lite spec (a dict) with Altair's ``to_dict``/``to_json`` interface."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec

    def to_dict(self) -> dict[str, Any]:
        return self.spec

    def to_json(self) -> str:
        return json.dumps(self.spec, separators=(",", ":"))
