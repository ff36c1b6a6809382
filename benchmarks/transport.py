"""The transport ceiling: an application whose ingress only receives each request's body and counts it.

Deployed beside medserve, behind the same ingress mode, it answers how fast uploads can arrive at all; the
pipeline benchmark reports medserve's HTTP figure as a fraction of it.
"""

# No `from __future__ import annotations`: FastAPI must see real types on a Serve class ingress.
from fastapi import FastAPI, Request
from pydantic import BaseModel
from ray import serve

__all__ = ["BodySink", "Received"]

_api = FastAPI()


class Received(BaseModel):
    bytes: int


@serve.deployment(name="BodySink")
@serve.ingress(_api)
class BodySink:
    @_api.post("/", response_model=Received)
    async def receive(self, request: Request) -> Received:
        received = 0
        async for chunk in request.stream():
            received += len(chunk)
        return Received(bytes=received)
