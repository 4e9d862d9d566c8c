"""The REST front door: an agent's SDK pointed at Tether; its intake stages and Tether's /_tether/ endpoints."""
