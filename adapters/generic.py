"""Any REST API: collection/item conventions, configurable.

Options (``adapter_options`` in the rules file):

* ``id_field`` (default ``id``): where a created record's id is in the response body;
* ``use_location`` (default true): take the created id from the ``Location`` header's last segment when
  the body has none;
* ``item_path`` (default ``{collection}/{id}``): how an item URL is built from its collection path;
* ``id_pattern``: a regular expression every ``{id}`` path parameter must fully match;
* ``recreate`` (default true): a deleted record can be re-created by POSTing its pre-image to the
  collection (false: deletes are non-compensable).
"""

from __future__ import annotations

from typing import Any

from .base import Adapter


class GenericRestAdapter(Adapter):
    name = "generic"

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        return ("id_pattern", "id_field", "use_location", "item_path", "recreate")

    def __init__(self, options: dict[str, Any] | None = None) -> None:
        super().__init__(options)
        self.id_field: str = str(self.options.get("id_field", "id"))
        self.use_location: bool = bool(self.options.get("use_location", True))
        self.item_path: str = str(self.options.get("item_path", "{collection}/{id}"))
        self.recreate: bool = bool(self.options.get("recreate", True))
