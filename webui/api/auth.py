"""HTTP Basic auth for every API route when the server runs with --api-auth user:pass[,user2:pass2]."""
from __future__ import annotations

from secrets import compare_digest
from typing import Callable

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPBasic, HTTPBasicCredentials

REALM = "diffusers-webui API"


def basic_auth(credentials: list[tuple[str, str]]) -> Callable[..., str] | None:
    """A FastAPI dependency that admits the listed users, or None when no credentials are set."""
    if not credentials:
        return None
    pairs = [(user.encode(), password.encode()) for user, password in credentials]
    scheme = HTTPBasic(realm=REALM, auto_error=False, description="the --api-auth user:password")

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
            headers={"WWW-Authenticate": f'Basic realm="{REALM}"'},
        )

    return require_user
