"""Errors the services raise for the API to turn into HTTP 4xx answers."""


class ServiceError(Exception):
    status = 400


class InvalidRequest(ServiceError):
    status = 422


class NotFound(ServiceError):
    status = 404


class Conflict(ServiceError):
    status = 409


class PlacedElsewhere(ServiceError):
    """The VM belongs on another node: the API relays the request there."""

    status = 409

    def __init__(self, node: str) -> None:
        super().__init__(f"the VM goes to node {node}")
        self.node = node
