"""Connecting to vCenter with pyvmomi, with every failure turned into one clear line; every SOAP
call of a session is counted per vCenter and method (:data:`CALLS`, exported as
``vebaq_producer_vcenter_calls_total{method,vcenter}``: what the producer costs vCenter).

Sessions of several vCenters are opened from their own threads (:mod:`producer.supervisor`):
each thread has its own session, and only the login touches process-wide state (the default
socket timeout, see :func:`_bound_sockets`)."""

from __future__ import annotations

import collections
import contextlib
import http.client
import socket
import ssl
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import urlsplit

from pyVim.connect import Disconnect, SmartConnect
from pyVmomi import vim, vmodl

from vebaq.core.config import VCenterSettings
from vebaq.core.errors import ConfigError, LoginRefused, VCenterError

#: Faults that mean "the session is gone, log in again".
SESSION_LOST = (vim.fault.NotAuthenticated, vim.fault.InvalidState,
                vmodl.fault.ManagedObjectNotFound)

#: Transport failures: vCenter restarting, network blips.
CONNECTION_LOST = (OSError, http.client.HTTPException, ssl.SSLError)

#: SOAP calls this process made to vCenter after each login, by vCenter (its configured URL) and
#: WSDL method name (property reads through pyvmomi's accessors are ``Fetch``); the login's own
#: few calls are not counted. Each vCenter's session counts from its own thread only.
CALLS: collections.Counter[tuple[str, str]] = collections.Counter()


def calls(method: str, vcenter: str | None = None) -> int:
    """How many calls of ``method`` were made so far, to one vCenter or to all."""
    return sum(n for (url, name), n in CALLS.items() if name == method and vcenter in (None, url))


def count_calls(si: vim.ServiceInstance, url: str) -> None:
    """Count every later call of ``si``'s session (with the vCenter at ``url``) in
    :data:`CALLS`: pyvmomi sends each method call and property read through its stub's
    ``InvokeMethod``."""
    stub = si._stub
    invoke = stub.InvokeMethod

    def counted(mo: object, info: object, args: object, *rest: object, **options: object) -> object:
        CALLS[url, getattr(info, "wsdlName", None) or "?"] += 1
        return invoke(mo, info, args, *rest, **options)

    stub.InvokeMethod = counted


@dataclass
class Session:
    """A logged-in vCenter session and what the producer needs to know about the vCenter."""

    si: vim.ServiceInstance
    content: vim.ServiceInstanceContent
    url: str
    instance_uuid: str
    api_version: str

    def now(self) -> datetime:
        """vCenter's clock (event times are vCenter's, so start positions use it too)."""
        now = self.si.CurrentTime()
        return now if now.tzinfo else now.replace(tzinfo=UTC)

    def close(self) -> None:
        with contextlib.suppress(Exception):  # best effort: the session may be dead already
            Disconnect(self.si)


def ssl_context(settings: VCenterSettings) -> ssl.SSLContext:
    """Verify certificates unless told not to; a CA bundle adds a private CA."""
    if settings.insecure_ssl:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    try:
        return ssl.create_default_context(cafile=settings.ca_bundle)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"{settings.where}.caBundle: cannot load {settings.ca_bundle!r}: "
                          f"{exc.strerror or exc}") from None


_timeouts_lock = threading.Lock()
_login_timeouts: list[float] = []
_timeout_before: list[float | None] = [None]


def _bound_sockets(seconds: float) -> None:
    """Bound every socket opened from now on by ``seconds``, until :func:`_unbound_sockets`.

    The default timeout is process-wide: while several logins run at once (one per vCenter
    thread) it is the longest of theirs, and the previous default returns after the last."""
    with _timeouts_lock:
        if not _login_timeouts:
            _timeout_before[0] = socket.getdefaulttimeout()
        _login_timeouts.append(seconds)
        socket.setdefaulttimeout(max(_login_timeouts))


def _unbound_sockets(seconds: float) -> None:
    with _timeouts_lock:
        _login_timeouts.remove(seconds)
        socket.setdefaulttimeout(max(_login_timeouts) if _login_timeouts else _timeout_before[0])


def check(settings: VCenterSettings) -> None:
    """Raise :class:`ConfigError` naming the key if ``settings`` cannot be used to log in."""
    if not settings.url:
        raise ConfigError(f"{settings.where}.url: not set (set VCENTER_URL=https://<vcenter>/sdk)")
    if not settings.username or not settings.password:
        if settings.where == "vcenter":
            raise ConfigError("vcenter: set VCENTER_USER and VCENTER_PASSWORD")
        missing = "username" if not settings.username else "password"
        raise ConfigError(f"{settings.where}.{missing}: not set (for {settings.url})")
    if urlsplit(settings.url).scheme == "https":
        ssl_context(settings)


def connect(settings: VCenterSettings) -> Session:
    """Log in; raises :class:`VCenterError` (:class:`LoginRefused` for a wrong user name or
    password) or :class:`ConfigError` with a one-line reason."""
    check(settings)
    parts = urlsplit(settings.url)
    secure = parts.scheme == "https"
    where = f"vCenter {settings.url}"
    # SmartConnect's API version discovery opens a connection of its own without a timeout: a
    # hung vCenter would hang the login forever. The default timeout bounds that one too.
    _bound_sockets(settings.request_timeout)
    try:
        si = SmartConnect(
            protocol=parts.scheme, host=parts.hostname, port=parts.port or (443 if secure else 80),
            path=parts.path or "/sdk", user=settings.username,
            pwd=settings.password.reveal(),
            sslContext=ssl_context(settings) if secure else None,
            httpConnectionTimeout=settings.request_timeout,
        )
    except vim.fault.InvalidLogin:
        raise LoginRefused(f"{where} refused the login of {settings.username!r}: "
                           f"wrong user name or password") from None
    except ssl.SSLCertVerificationError as exc:
        raise VCenterError(f"{where}: certificate not trusted ({exc.verify_message}); set "
                           f"VCENTER_CA_BUNDLE, or VCENTER_INSECURE_SSL=true for a lab") from None
    except socket.gaierror:
        raise VCenterError(f"{where}: unknown host {parts.hostname!r}") from None
    except TimeoutError:
        raise VCenterError(f"{where}: no answer within {settings.request_timeout:g}s "
                           f"(vcenter.requestTimeout)") from None
    except ConnectionRefusedError:
        raise VCenterError(f"{where}: connection refused (is vCenter up, is the port right?)"
                           ) from None
    except vmodl.MethodFault as exc:
        raise VCenterError(f"{where}: {type(exc).__name__}: {exc.msg}") from None
    except CONNECTION_LOST as exc:
        raise VCenterError(f"{where}: cannot connect: {exc}") from None
    except Exception as exc:  # pyvmomi raises bare Exceptions for odd endpoints
        raise VCenterError(f"{where}: not a vSphere API endpoint? ({type(exc).__name__}: "
                           f"{str(exc)[:200]})") from None
    finally:
        _unbound_sockets(settings.request_timeout)
    count_calls(si, settings.url)
    content = si.RetrieveContent()
    return Session(si, content, settings.url, content.about.instanceUuid,
                   content.about.apiVersion)
