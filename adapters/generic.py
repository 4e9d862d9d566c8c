"""Any REST API: collection/item conventions, configurable.

Options (``adapter_options`` in the rules file):

* ``id_field`` (default ``id``): where a created record's id is in the response body (dotted path);
* ``use_location`` (default true): take the created id from the ``Location`` header's last segment when
  the body has none;
* ``item_path`` (default ``{collection}/{id}``): how an item URL is built from its collection path;
* ``id_pattern``: a regular expression every ``{id}`` path parameter must fully match;
* ``recreate`` (default ``put_item``): how a deleted record is re-created from its pre-image —
  ``put_item`` (PUT to the item URL), ``post_collection`` (POST to the collection; the new record gets a
  new id) or ``none`` (deletes are non-compensable);
* ``readonly_fields`` (default ``[id, version, created_at, updated_at]``): pre-image fields never
  written back when restoring or re-creating;
* ``version_header`` (default ``ETag``): the response header carrying a record version; when present,
  undo steps are sent with ``If-Match`` so that a concurrent change makes them fail instead of
  overwriting it.

Undo plans: create → DELETE the created item; PATCH → PATCH back the fields the write changed, from the
pre-image; PUT → PUT the whole pre-image back; DELETE → re-create from the pre-image.
"""

from __future__ import annotations

import secrets
from typing import Any

from .base import Adapter, NotCompensable, Operation, PlannedRequest, SyntheticResponse, UndoPlan


def _get_path(body: Any, dotted: str) -> Any:
    node = body
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


class GenericRestAdapter(Adapter):
    name = "generic"

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        return ("id_pattern", "id_field", "use_location", "item_path", "recreate", "readonly_fields",
                "version_header")

    def __init__(self, options: dict[str, Any] | None = None) -> None:
        super().__init__(options)
        self.id_field: str = str(self.options.get("id_field", "id"))
        self.use_location: bool = bool(self.options.get("use_location", True))
        self.item_path: str = str(self.options.get("item_path", "{collection}/{id}"))
        recreate = self.options.get("recreate", "put_item")
        if recreate is False:
            recreate = "none"
        if recreate not in ("put_item", "post_collection", "none"):
            from .base import AdapterOptionsError

            raise AdapterOptionsError("recreate must be put_item, post_collection or none")
        self.recreate: str = recreate
        self.readonly_fields = frozenset(self.options.get("readonly_fields", ["id", "version", "created_at",
                                                                              "updated_at"]))
        self.version_header: str = str(self.options.get("version_header", "ETag"))

    # -- helpers --------------------------------------------------------------------------------

    def _item(self, collection: str, rid: str) -> str:
        return self.item_path.format(collection=collection.rstrip("/"), id=rid)

    def _collection_of(self, item_path: str) -> str:
        return item_path.rstrip("/").rsplit("/", 1)[0] or "/"

    def _writable(self, record: Any) -> dict[str, Any]:
        if not isinstance(record, dict):
            return {}
        return {k: v for k, v in record.items() if k not in self.readonly_fields}

    # -- outcome --------------------------------------------------------------------------------

    def created_ids(self, op: Operation, status: int, headers: dict[str, str], body: Any) -> list[str]:
        if status >= 300:
            return []
        rid = _get_path(body, self.id_field) if isinstance(body, dict) else None
        if rid is None and self.use_location:
            loc = {k.lower(): v for k, v in headers.items()}.get("location")
            if loc:
                rid = loc.rstrip("/").rsplit("/", 1)[-1]
        return [str(rid)] if rid is not None and getattr(op.capability, "operation", "") == "create" else []

    # -- dry-run --------------------------------------------------------------------------------

    def synthetic_response(self, op: Operation, item_id: str) -> SyntheticResponse:
        kind = getattr(op.capability, "operation", "action")
        body = op.body if isinstance(op.body, dict) else {}
        if kind == "create":
            new_id = f"dryrun-{secrets.token_hex(6)}"
            rec = {**body, self.id_field: new_id} if "." not in self.id_field else {**body, "id": new_id}
            return SyntheticResponse(201, rec, {"Location": self._item(op.path, new_id)})
        if kind == "delete":
            return SyntheticResponse(204)
        if kind in ("update", "upsert"):
            rid = op.params.get("id") or op.path.rstrip("/").rsplit("/", 1)[-1]
            return SyntheticResponse(200, {self.id_field: rid, **body})
        return SyntheticResponse(202, {"accepted": True, "dry_run": item_id})

    # -- compensation ---------------------------------------------------------------------------

    def pre_image_request(self, op: Operation) -> PlannedRequest | None:
        kind = getattr(op.capability, "operation", "")
        if kind in ("update", "delete", "upsert"):
            return PlannedRequest("GET", op.path, content_type=None)
        return None

    def plan_undo(self, op: Operation, pre_image: Any) -> UndoPlan:
        kind = getattr(op.capability, "operation", "")
        body = op.body if isinstance(op.body, dict) else {}
        if kind == "create":
            return UndoPlan("delete", PlannedRequest("DELETE", self._item(op.path, "{created_id}"), content_type=None),
                            expect=dict(body) or None, note="delete the record the write created")
        if kind in ("update", "upsert"):
            if not isinstance(pre_image, dict):
                raise NotCompensable(f"no pre-image of {op.path} to restore")
            if op.method == "PUT":
                restore = self._writable(pre_image)
                return UndoPlan("restore", PlannedRequest("PUT", op.path, body=restore), pre_image=pre_image,
                                expect=dict(body) or None, note="put the whole pre-image back")
            fields = {k: pre_image.get(k) for k in body if k not in self.readonly_fields}
            return UndoPlan("restore", PlannedRequest("PATCH", op.path, body=fields), pre_image=pre_image,
                            expect=dict(body) or None, note=f"restore {', '.join(sorted(fields)) or 'nothing'}")
        if kind == "delete":
            if self.recreate == "none":
                raise NotCompensable("this upstream's deletes cannot be undone (recreate: none)")
            if not isinstance(pre_image, dict):
                raise NotCompensable(f"no pre-image of {op.path} to re-create")
            restore = self._writable(pre_image)
            if self.recreate == "put_item":
                req = PlannedRequest("PUT", op.path, body=restore)
            else:
                req = PlannedRequest("POST", self._collection_of(op.path), body=restore)
            return UndoPlan("recreate", req, pre_image=pre_image, note="re-create from the pre-image")
        raise NotCompensable(f"the generic adapter cannot undo a {kind or 'custom'} operation")

    def arm_undo(self, plan: UndoPlan, op: Operation, status: int, headers: dict[str, str], body: Any) -> UndoPlan:
        if plan.request is not None and "{created_id}" in plan.request.path:
            ids = self.created_ids(op, status, headers, body)
            if not ids:
                raise NotCompensable("the upstream's response named no created id")
            if not self.valid_id(ids[0]):
                raise NotCompensable(f"the upstream's response names the created id {ids[0][:80]!r}, which is not an "
                                     "id (its undo could reach another record)")
            plan.request.path = plan.request.path.replace("{created_id}", ids[0])
        return plan

    def check_request(self, plan: UndoPlan) -> PlannedRequest | None:
        """Before an undo step: read the record to compare with what the agent wrote."""
        if plan.kind in ("restore", "delete") and plan.request is not None:
            return PlannedRequest("GET", plan.request.path, content_type=None)
        return None
