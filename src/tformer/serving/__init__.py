"""Serving a model over HTTP: a FastAPI app (`create_app`) in front of a request batcher (`Batcher`),
run on uvicorn from a socket bound beforehand (`tformer.serving.server`).

See docs/serving.md for the API, the limits and the batching window.
"""

from tformer.serving.app import create_app
from tformer.serving.batcher import Batcher, BatcherClosedError
from tformer.serving.limits import ServeConfig

__all__ = ["Batcher", "BatcherClosedError", "ServeConfig", "create_app"]
