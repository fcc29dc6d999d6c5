"""TLS on qlm's listeners and channels, from :class:`CommonSettings`' ``tls_*`` files.

:func:`add_listener` binds a gRPC server: TLS when ``tls_cert_file``/``tls_key_file`` are
set (mTLS when ``tls_client_ca_file`` is too), plaintext otherwise. :func:`channel` opens
a channel to another qlm service: TLS trusting ``tls_ca_file`` when set.
:func:`http_ssl_context` is the same for an HTTP listener (ingest's OpenAI front door):
the same files, the same mTLS option.
"""

from __future__ import annotations

import ssl

import grpc

from qlm.core.errors import InvalidInput
from qlm.tls import read_pem
from services.common.settings import CommonSettings


def server_credentials(settings: CommonSettings | None) -> grpc.ServerCredentials | None:
    if settings is None or settings.tls_cert_file is None or settings.tls_key_file is None:
        return None
    cert = read_pem(settings.tls_cert_file, "tls_cert_file")
    key = read_pem(settings.tls_key_file, "tls_key_file")
    client_ca = (read_pem(settings.tls_client_ca_file, "tls_client_ca_file")
                 if settings.tls_client_ca_file is not None else None)
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def add_listener(server: grpc.aio.Server, address: str,
                 settings: CommonSettings | None) -> int:
    """Bind ``server`` to ``address`` (TLS per the settings); the port, or OSError."""
    credentials = server_credentials(settings)
    port = (server.add_secure_port(address, credentials) if credentials is not None
            else server.add_insecure_port(address))
    if port == 0:
        raise OSError(f"cannot listen on {address}")
    return port


def channel(target: str, settings: CommonSettings) -> grpc.aio.Channel:
    """A channel to another qlm service (TLS when ``tls_ca_file`` is set)."""
    if settings.tls_ca_file is None:
        return grpc.aio.insecure_channel(target)
    ca = read_pem(settings.tls_ca_file, "tls_ca_file")
    return grpc.aio.secure_channel(target, grpc.ssl_channel_credentials(root_certificates=ca))


def http_ssl_context(settings: CommonSettings | None) -> ssl.SSLContext | None:
    """The server-side TLS context of an HTTP listener (None: no ``tls_cert_file``, plain
    HTTP): TLS 1.2 or newer with the ``tls_cert_file`` / ``tls_key_file`` pair, and with
    ``tls_client_ca_file`` a client certificate signed by that CA required (mTLS).

    InvalidInput names the setting whose file is missing, not PEM, or does not match.
    """
    if settings is None or settings.tls_cert_file is None or settings.tls_key_file is None:
        return None
    read_pem(settings.tls_cert_file, "tls_cert_file")  # a clear error before OpenSSL's
    read_pem(settings.tls_key_file, "tls_key_file")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(settings.tls_cert_file, settings.tls_key_file)
    except ssl.SSLError as error:
        raise InvalidInput("tls_key_file", f"{settings.tls_key_file} does not hold the key "
                           f"of {settings.tls_cert_file}: {error.reason}") from None
    if settings.tls_client_ca_file is not None:
        read_pem(settings.tls_client_ca_file, "tls_client_ca_file")
        try:
            context.load_verify_locations(cafile=settings.tls_client_ca_file)
        except ssl.SSLError as error:
            raise InvalidInput("tls_client_ca_file", f"{settings.tls_client_ca_file}: "
                               f"{error.reason}") from None
        context.verify_mode = ssl.CERT_REQUIRED
    return context
