"""The bridge: claims the game's pending requests and sends them to the workers as batches."""

from bridge.loop import Bridge

__all__ = ["Bridge"]
