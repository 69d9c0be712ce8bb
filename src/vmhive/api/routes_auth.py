"""Login, logout and the users of the web UI."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field

from vmhive.api.auth import COOKIE, session_cookie
from vmhive.api.deps import daemon_of
from vmhive.services.users import SESSION_LIFETIME, Login

router = APIRouter(tags=["auth"])


class LoginIn(BaseModel):
    username: str = Field(max_length=64)
    password: str = Field(max_length=1024)


class UserIn(BaseModel):
    name: str
    password: str


class PasswordIn(BaseModel):
    password: str


def _me(login: Login) -> dict[str, Any]:
    return {"user": login.user, "via": login.via, "csrf_token": login.csrf_token}


@router.post("/auth/login")
async def login(request: Request, body: LoginIn) -> JSONResponse:
    daemon = daemon_of(request)
    found = await daemon.users.login(body.username, body.password)
    if found is None:
        return JSONResponse({"detail": "wrong user name or password"}, status_code=401)
    cookie, who = found
    response = JSONResponse(_me(who))
    response.set_cookie(
        COOKIE,
        cookie,
        max_age=int(SESSION_LIFETIME.total_seconds()),
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
        path="/",
    )
    return response


@router.get("/auth/me")
async def me(request: Request) -> JSONResponse:
    login: Login | None = request.state.login
    if login is None:
        return JSONResponse({"detail": "not logged in"}, status_code=401)
    return JSONResponse(_me(login))


@router.post("/auth/logout", status_code=204)
async def logout(request: Request) -> Response:
    cookie = session_cookie(request.scope)
    if cookie is not None:
        await daemon_of(request).users.logout(cookie)
    response = Response(status_code=204)
    response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict")
    return response


@router.get("/users")
async def list_users(request: Request) -> list[dict[str, Any]]:
    users = await daemon_of(request).users.list()
    return [{"name": u.name, "created_at": u.created_at.isoformat()} for u in users]


@router.post("/users", status_code=201)
async def add_user(request: Request, body: UserIn) -> dict[str, Any]:
    user = await daemon_of(request).users.add(body.name, body.password)
    return {"name": user.name, "created_at": user.created_at.isoformat()}


@router.put("/users/{name}/password", status_code=204)
async def set_password(request: Request, name: str, body: PasswordIn) -> Response:
    await daemon_of(request).users.set_password(name, body.password)
    return Response(status_code=204)


@router.delete("/users/{name}", status_code=204)
async def delete_user(request: Request, name: str) -> Response:
    await daemon_of(request).users.delete(name)
    return Response(status_code=204)
