"""The CLI's HTTP client: the data dir's unix socket, or --api URL with a token."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from vmhive.config import default_data_dir

FINAL = ("succeeded", "failed", "cancelled")


class CliError(Exception):
    """Printed as one line; the CLI exits non-zero."""


@dataclass
class ApiTarget:
    base_url: str
    socket: Path | None
    token: str | None

    @classmethod
    def resolve(cls, api: str | None, token: str | None, data_dir: Path | None) -> ApiTarget:
        data = data_dir or default_data_dir()
        api = api or os.environ.get("VMHIVE_API")
        token = token or os.environ.get("VMHIVE_TOKEN")
        if api:
            if token is None and (data / "token").exists():
                token = (data / "token").read_text().strip()
            return cls(api.rstrip("/"), None, token)
        return cls("http://vmhive", data / "api.sock", None)

    def ws_url(self, path: str) -> str:
        return self.base_url.replace("http://", "ws://").replace("https://", "wss://") + path

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}


class Api:
    def __init__(self, target: ApiTarget, timeout: float = 30.0) -> None:
        self.target = target
        transport = httpx.HTTPTransport(uds=str(target.socket)) if target.socket else None
        self._http = httpx.Client(
            base_url=target.base_url,
            transport=transport,
            headers=target.headers(),
            timeout=timeout,
        )

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self._http.request(method, "/api" + path, **kwargs)
        except httpx.ConnectError as exc:
            where = self.target.socket or self.target.base_url
            raise CliError(
                f"cannot reach the vmhive daemon at {where}: {exc} (is `vmhive serve` running?)"
            ) from None
        except httpx.HTTPError as exc:
            raise CliError(f"request failed: {exc}") from None
        if response.status_code >= 400:
            raise CliError(_error_text(response))
        if response.headers.get("content-type", "").startswith("application/json"):
            return response.json()
        return response.content

    def get(self, path: str, **kwargs: Any) -> Any:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> Any:
        return self.request("POST", path, **kwargs)

    def put(self, path: str, **kwargs: Any) -> Any:
        return self.request("PUT", path, **kwargs)

    def delete(self, path: str, **kwargs: Any) -> Any:
        return self.request("DELETE", path, **kwargs)

    def wait_job(
        self,
        job: dict[str, Any],
        on_progress: Callable[[dict[str, Any]], None] | None = None,
        timeout: float = 3600.0,
    ) -> dict[str, Any]:
        """Follow a job to its end, reporting progress; raises CliError if it failed."""
        deadline = time.monotonic() + timeout
        while job["state"] not in FINAL:
            if time.monotonic() > deadline:
                raise CliError(f"job {job['id']} did not finish within {timeout:.0f} s")
            time.sleep(0.1)
            job = self.get(f"/jobs/{job['id']}")
            if on_progress:
                on_progress(job)
        if job["state"] != "succeeded":
            raise CliError(f"{job['kind']} {job['state']}: {job.get('error') or 'no reason given'}")
        return job


def _error_text(response: httpx.Response) -> str:
    try:
        detail = response.json().get("detail")
    except ValueError:
        detail = response.text.strip()
    if isinstance(detail, list):  # FastAPI validation errors
        parts = []
        for item in detail:
            where = ".".join(str(p) for p in item.get("loc", [])[1:])
            parts.append(f"{where}: {item.get('msg')}" if where else str(item.get("msg")))
        detail = "; ".join(parts)
    return f"{detail} (HTTP {response.status_code})"
