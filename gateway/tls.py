"""TLS to an arm's model server: a private CA, a client certificate (mTLS), or no verification."""

from __future__ import annotations

import os
import ssl


def client_context(
    ca_file: str | None = None,
    cert_file: str | None = None,
    key_file: str | None = None,
    verify: bool = True,
) -> ssl.SSLContext:
    """Raises ValueError with what to fix when a file is missing or not a certificate/key."""
    for field, path in (("ca_file", ca_file), ("client_cert_file", cert_file), ("client_key_file", key_file)):
        if path is not None and not os.access(path, os.R_OK):
            raise ValueError(f"{field}: cannot read {path}")
    context = ssl.create_default_context()
    try:
        if ca_file is not None:
            context.load_verify_locations(cafile=ca_file)
        if cert_file is not None:
            context.load_cert_chain(cert_file, key_file)
    except OSError as exc:
        raise ValueError(f"cannot read a certificate or key: {exc.strerror}") from None
    except ssl.SSLError as exc:
        raise ValueError(f"not a usable PEM certificate or key ({exc.reason or exc})") from None
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context
