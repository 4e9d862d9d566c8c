from tests.conftest import UPSTREAM_TOKEN


async def test_read_passes(gateway, upstream):
    upstream.put_record("contacts", {"id": "1", "name": "Ada"})
    r = await gateway.request("GET", "/api/contacts/1")
    assert r.status == 200, await r.text()
    assert (await r.json())["name"] == "Ada"
    got = upstream.received[-1]
    assert got.headers["Authorization"] == f"Bearer {UPSTREAM_TOKEN}"
