"""One pipeline of named stages, shared by every front door."""
