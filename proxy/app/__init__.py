"""The process: the Gateway composes the layers below, owns the listeners and their lifecycle."""
