"""TLS on qlm's gRPC listeners and channels, from :class:`CommonSettings`' ``tls_*`` files.

:func:`add_listener` binds a server: TLS when ``tls_cert_file``/``tls_key_file`` are set
(mTLS when ``tls_client_ca_file`` is too), plaintext otherwise. :func:`channel` opens a
channel to another qlm service: TLS trusting ``tls_ca_file`` when set.
"""

from __future__ import annotations

import grpc

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
