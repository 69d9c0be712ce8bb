"""Errors the services raise for the API to turn into HTTP 4xx answers."""


class ServiceError(Exception):
    status = 400


class InvalidRequest(ServiceError):
    status = 422


class NotFound(ServiceError):
    status = 404


class Conflict(ServiceError):
    status = 409
