"""A vRealize Operations suite-api client: token auth, host lookup, maintained mark.

One :class:`VropsClient` per worker process keeps its token until the token's ``validity`` is
near or vROps answers 401 (then it is re-acquired once), and remembers which resource is which
vCenter host, so the steady state is one HTTP call per event.

Failures become one of two exceptions:

* :class:`VropsUnavailable` — connection errors, timeouts, 408, 429 and 5xx
  (:func:`workers.http_failures.retryable`): retry later
  (``retry_after`` carries the server's ``Retry-After``);
* :class:`VropsRejected` — other 4xx, refused credentials, TLS verification failures, and a
  host that cannot be identified: a :class:`~workers.errors.PermanentError`, dead-lettered at once.

The password and the token never appear in a log line, a repr or an exception message.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import requests

from vebaq.core.config import VropsSettings
from vebaq.core.errors import PermanentError
from vebaq.core.secrets import redact_url, scrub
from workers.http_failures import (
    MAX_ERROR_BODY,
    HttpFailure,
    parse_retry_after,
    retryable,
    short_body,
)

logger = logging.getLogger("vebaq.vrops")

#: Path of the suite-api below the configured vROps URL.
API = "/suite-api/api"

#: Re-acquire a token this many seconds before its validity ends (at most a tenth of its life).
TOKEN_EXPIRY_MARGIN = 60.0

#: Identifier types of a vROps ``HostSystem`` resource (adapter ``VMWARE``).
OBJECT_ID = "VMEntityObjectID"
VCENTER_ID = "VMEntityVCID"


class VropsUnavailable(HttpFailure):
    """vROps did not answer usefully now (network, timeout, 408/429/5xx); a retry may work
    (``retry_after`` carries the server's ``Retry-After``)."""


class VropsRejected(HttpFailure, PermanentError):
    """vROps refused the request (400/403/404 …) or the host cannot be identified; retrying
    cannot help."""


@dataclass(frozen=True)
class _Token:
    value: str
    #: ``time.time()`` after which the token is not used any more.
    renew_at: float

    def __repr__(self) -> str:
        return f"_Token(renew_at={self.renew_at})"


def identifiers(resource: dict[str, Any]) -> dict[str, str]:
    """``{"VMEntityObjectID": "host-19", "VMEntityVCID": "…", …}`` of a ``resourceList`` item."""
    result = {}
    for item in (resource.get("resourceKey") or {}).get("resourceIdentifiers") or ():
        name = ((item or {}).get("identifierType") or {}).get("name")
        if name:
            result[name] = str(item.get("value") or "")
    return result


def choose_host(resources: list[dict[str, Any]], host_name: str, moref: str,
                vc_uuid: str) -> tuple[str | None, str]:
    """Pick the resource of one vCenter host from a name search; returns ``(id, how)`` or
    ``(None, why not)``.

    A resource matches when its ``VMEntityObjectID`` is ``moref`` and its ``VMEntityVCID`` is
    ``vc_uuid``. Failing that, a unique resource with exactly ``host_name`` that does not belong
    to another vCenter or host (no contradicting identifier) is taken. Never the first hit.
    """
    vc = vc_uuid.lower()
    matched = [r for r in resources if identifiers(r).get(OBJECT_ID) == moref
               and identifiers(r).get(VCENTER_ID, "").lower() == vc]
    if len(matched) == 1:
        return matched[0].get("identifier"), "identifiers"
    if len(matched) > 1:
        ids = ", ".join(str(r.get("identifier")) for r in matched)
        return None, f"{len(matched)} resources have {OBJECT_ID}={moref} and " \
                     f"{VCENTER_ID}={vc_uuid} ({ids})"

    def compatible(resource: dict[str, Any]) -> bool:
        ids = identifiers(resource)
        return (ids.get(OBJECT_ID) in (None, "", moref)
                and ids.get(VCENTER_ID, "").lower() in ("", vc))

    named = [r for r in resources if (r.get("resourceKey") or {}).get("name") == host_name]
    usable = [r for r in named if compatible(r)]
    if len(usable) == 1:
        return usable[0].get("identifier"), "exact name"
    if len(usable) > 1:
        return None, (f"no resource has {OBJECT_ID}={moref} and {VCENTER_ID}={vc_uuid}, and "
                      f"{len(usable)} resources are named {host_name!r}: ambiguous")
    others = f" ({len(named)} named so belong to other hosts or vCenters)" if named else ""
    return None, (f"no HostSystem resource has {OBJECT_ID}={moref} and {VCENTER_ID}={vc_uuid} "
                  f"or the exact name {host_name!r}{others}; {len(resources)} resource(s) "
                  f"matched the name search")


class VropsClient:
    """Talks to one vROps; safe to share between the threads of a process.

    :param settings: URL, credentials, TLS and timeout
        (:class:`~vebaq.core.config.VropsSettings`).
    :param session: a :class:`requests.Session` to use instead of a new one.
    """

    def __init__(self, settings: VropsSettings, session: requests.Session | None = None) -> None:
        if not settings.url:
            raise PermanentError("vROps is not configured: set VROPS_URL (or vropsFqdn)")
        base = settings.url.rstrip("/")
        for suffix in (API, "/suite-api"):
            base = base.removesuffix(suffix)
        self.base_url = base
        self.settings = settings
        self.session = session or requests.Session()
        self.session.headers["Accept"] = "application/json"
        if settings.ca_bundle:
            self.session.verify = settings.ca_bundle
        elif settings.insecure_ssl:
            self.session.verify = False
        self._token: _Token | None = None
        self._token_lock = threading.Lock()
        self._resources: dict[tuple[str, str], str] = {}

    def __repr__(self) -> str:
        return f"VropsClient(url={redact_url(self.base_url)!r}, user={self.settings.username!r})"

    def close(self) -> None:
        self.session.close()

    # --- HTTP plumbing

    def _secrets(self) -> tuple[str, ...]:
        token = self._token.value if self._token else ""
        return tuple(v for v in (self.settings.password.reveal(), token) if v)

    def _url(self, path: str) -> str:
        return f"{self.base_url}{API}{path}"

    def _send(self, method: str, path: str, *, json: Any = None, params: Any = None,
              token: str | None = None) -> requests.Response:
        """One HTTP call; raises :class:`VropsUnavailable` / :class:`VropsRejected` for
        failures, except 401 on an authenticated call, which is returned to the caller."""
        url = self._url(path)
        shown = redact_url(url)
        headers = {"Authorization": f"vRealizeOpsToken {token}"} if token else None
        try:
            # verify given per request: requests lets $REQUESTS_CA_BUNDLE override a session's.
            response = self.session.request(method, url, json=json, params=params,
                                            headers=headers, timeout=self.settings.timeout,
                                            verify=self.session.verify)
        except requests.exceptions.SSLError as exc:
            raise VropsRejected(
                f"vROps {method} {shown}: TLS verification failed (set VROPS_CA_BUNDLE, or "
                f"VROPS_INSECURE_SSL=true for a lab): {scrub(str(exc), self._secrets())}",
                url=shown) from None
        except requests.exceptions.Timeout:
            raise VropsUnavailable(f"vROps {method} {shown}: no answer within "
                                   f"{self.settings.timeout:g}s", url=shown) from None
        except requests.exceptions.RequestException as exc:
            raise VropsUnavailable(f"vROps {method} {shown}: {type(exc).__name__}: "
                                   f"{scrub(str(exc), self._secrets())}", url=shown) from None
        status = response.status_code
        if status < 400 or (status == 401 and token):
            return response
        body = short_body(response.text, self._secrets())
        message = f"vROps {method} {shown}: {status} {response.reason}: {body}"
        if retryable(status):
            retry_after = parse_retry_after(response.headers.get("Retry-After"))
            raise VropsUnavailable(message, url=shown, status=status, body=body,
                                   retry_after=retry_after)
        if status == 401:
            message = (f"vROps {method} {shown}: 401: vROps refused the credentials of user "
                       f"{self.settings.username!r} (check VROPS_USER, VROPS_PASSWORD and "
                       f"VROPS_AUTH_SOURCE): {body}")
        raise VropsRejected(message, url=shown, status=status, body=body)

    def _current_token(self) -> str:
        """The cached token, or a new one if there is none or it is about to expire."""
        with self._token_lock:
            if self._token is None or time.time() >= self._token.renew_at:
                self._token = self._acquire()
            return self._token.value

    def _acquire(self) -> _Token:
        settings = self.settings
        if not settings.username or not settings.password:
            raise PermanentError("vROps credentials are not configured: set VROPS_USER and "
                                 "VROPS_PASSWORD (or vropsUser and vropsPassword)")
        body = {"username": settings.username, "password": settings.password.reveal()}
        if settings.auth_source:
            body["authSource"] = settings.auth_source
        started = time.time()
        response = self._send("POST", "/auth/token/acquire", json=body)
        shown = redact_url(self._url("/auth/token/acquire"))
        try:
            answer = response.json()
            value = str(answer["token"])
        except (ValueError, KeyError, TypeError):
            raise VropsUnavailable(f"vROps POST {shown}: answer has no token", url=shown,
                                   status=response.status_code) from None
        validity = answer.get("validity")
        expires = float(validity) / 1000 if isinstance(validity, int | float) else started + 1800
        margin = min(TOKEN_EXPIRY_MARGIN, max(0.0, expires - started) / 10)
        logger.info("vROps token acquired for %s (valid for %.0fs)", settings.username,
                    expires - started)
        return _Token(value, expires - margin)

    def _forget_token(self, token: str) -> None:
        with self._token_lock:
            if self._token is not None and self._token.value == token:
                self._token = None

    def _call(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        """An authenticated call; on 401 the token is re-acquired and the call made once more."""
        token = self._current_token()
        response = self._send(method, path, token=token, **kwargs)
        if response.status_code != 401:
            return response
        logger.info("vROps answered 401 to %s %s: re-acquiring the token", method, path)
        self._forget_token(token)
        response = self._send(method, path, token=self._current_token(), **kwargs)
        if response.status_code == 401:
            shown = redact_url(self._url(path))
            body = short_body(response.text, self._secrets())
            raise VropsRejected(f"vROps {method} {shown}: 401 with a fresh token: {body}",
                                url=shown, status=401, body=body)
        return response

    # --- the API the vrops pool uses

    def release_token(self) -> None:
        """Give the token back (best effort, e.g. at worker shutdown)."""
        with self._token_lock:
            token, self._token = self._token, None
        if token is not None:
            try:
                self._send("POST", "/auth/token/release", token=token.value)
            except (VropsUnavailable, VropsRejected) as exc:
                logger.debug("vROps token release failed: %s", exc)

    def find_hosts(self, name: str) -> list[dict[str, Any]]:
        """``resourceList`` of the ``HostSystem`` name search (vROps matches substrings)."""
        path = "/adapterkinds/VMWARE/resourcekinds/HostSystem/resources"
        response = self._call("GET", path, params={"name": name, "pageSize": 1000})
        shown = redact_url(self._url(path))
        try:
            resources = response.json().get("resourceList") or []
        except (ValueError, AttributeError):
            raise VropsUnavailable(f"vROps GET {shown}: answer is not a resource list",
                                   url=shown, status=response.status_code) from None
        return [r for r in resources if isinstance(r, dict)]

    def resource_for_host(self, host_name: str, moref: str, vc_uuid: str) -> str:
        """The vROps resource id of vCenter ``vc_uuid``'s host ``moref`` named ``host_name``;
        cached. Raises :class:`VropsRejected` if none or several resources fit."""
        cache_key = (vc_uuid.lower(), moref)
        cached = self._resources.get(cache_key)
        if cached:
            return cached
        resources = self.find_hosts(host_name)
        identifier, how = choose_host(resources, host_name, moref, vc_uuid)
        if not identifier:
            url = redact_url(self._url("/adapterkinds/VMWARE/resourcekinds/HostSystem/resources"))
            raise VropsRejected(f"vROps has no unique resource for host {host_name!r} "
                                f"({moref} of vCenter {vc_uuid}): {how}", url=url, status=None,
                                body=how[:MAX_ERROR_BODY])
        if how != "identifiers":
            logger.warning("vROps resource %s chosen for %s (%s of vCenter %s) by %s only",
                           identifier, host_name, moref, vc_uuid, how)
        self._resources[cache_key] = identifier
        return identifier

    def forget_resource(self, moref: str, vc_uuid: str) -> None:
        """Drop a cached resource id (it answered 404: the resource was re-created)."""
        self._resources.pop((vc_uuid.lower(), moref), None)

    def set_maintained(self, resource_id: str, maintained: bool) -> None:
        """Mark (``PUT``) or unmark (``DELETE``) the resource as maintained."""
        method = "PUT" if maintained else "DELETE"
        self._call(method, f"/resources/{quote(resource_id, safe='')}/maintained")

    def mark_host(self, host_name: str, moref: str, vc_uuid: str, maintained: bool) -> str:
        """:meth:`resource_for_host` then :meth:`set_maintained`; a cached id that vROps no longer
        knows (404) is looked up again once. Returns the resource id."""
        cached = (vc_uuid.lower(), moref) in self._resources
        resource_id = self.resource_for_host(host_name, moref, vc_uuid)
        try:
            self.set_maintained(resource_id, maintained)
        except VropsRejected as exc:
            if not (cached and exc.status == 404):
                raise
            logger.info("vROps resource %s of %s is gone: looking the host up again",
                        resource_id, host_name)
            self.forget_resource(moref, vc_uuid)
            resource_id = self.resource_for_host(host_name, moref, vc_uuid)
            self.set_maintained(resource_id, maintained)
        return resource_id
