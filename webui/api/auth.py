"""HTTP Basic auth for every API route when the server runs with --api-auth user:pass[,user2:pass2]."""
from __future__ import annotations

import binascii
from base64 import b64decode
from secrets import compare_digest
from typing import Callable

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPBasic, HTTPBasicCredentials
from fastapi.security.utils import get_authorization_scheme_param

REALM = "diffusers-webui API"


class Utf8Basic(HTTPBasic):
    """Basic credentials read as UTF-8, as RFC 7617's charset="UTF-8" asks and browsers, curl and requests send a
    non-ASCII password (FastAPI's reads ASCII only, so such a password could never log in); Latin-1 where the bytes
    are no UTF-8 (older clients). None where no readable credentials were sent."""

    async def __call__(self, request: Request) -> HTTPBasicCredentials | None:
        scheme, param = get_authorization_scheme_param(request.headers.get("Authorization"))
        if scheme.lower() != "basic":
            return None
        try:
            raw = b64decode(param, validate=True)
        except (ValueError, binascii.Error):
            return None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = raw.decode("latin-1")
        username, separator, password = text.partition(":")
        return HTTPBasicCredentials(username=username, password=password) if separator else None


def basic_auth(credentials: list[tuple[str, str]]) -> Callable[..., str] | None:
    """A FastAPI dependency that admits the listed users, or None when no credentials are set."""
    if not credentials:
        return None
    pairs = [(user.encode(), password.encode()) for user, password in credentials]
    # named as FastAPI's own scheme, which generated clients may refer to
    scheme = Utf8Basic(realm=REALM, auto_error=False, description="the --api-auth user:password",
                       scheme_name="HTTPBasic")

    def require_user(request: Request, given: HTTPBasicCredentials | None = Depends(scheme)) -> str:
        if given is not None:
            user, password = given.username.encode(), given.password.encode()
            # Compare against every pair so the time taken says nothing about which part was wrong.
            matched = False
            for known_user, known_password in pairs:
                matched |= compare_digest(user, known_user) & compare_digest(password, known_password)
            if matched:
                request.state.api_user = given.username  # whose jobs /interrupt and /skip may stop
                return given.username
        raise HTTPException(
            status_code=401,
            detail="wrong or missing credentials: this API needs HTTP Basic auth with a user from --api-auth",
            headers={"WWW-Authenticate": f'Basic realm="{REALM}", charset="UTF-8"'},
        )

    return require_user
