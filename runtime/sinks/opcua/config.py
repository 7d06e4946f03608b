"""The ``opcua`` section of a run config: the OPC UA server the line offers to PLCs and SCADA clients."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from patchline.runtime.config_section import Section

Policy = Literal["Basic256Sha256_SignAndEncrypt", "Basic256Sha256_Sign", "None"]


class OpcUaConfig(Section):
    """Endpoint, security and users; the password comes from a credential, never the YAML."""

    host: str = "0.0.0.0"
    port: int = Field(4840, ge=1, le=65535)
    # Offered endpoints, most secure first. "None" (no signing, no encryption) only with allow_insecure.
    security_policies: tuple[Policy, ...] = Field(("Basic256Sha256_SignAndEncrypt", "Basic256Sha256_Sign"),
                                                  min_length=1)
    certificate: str | None = None  # the server's application instance certificate (DER or PEM)
    private_key: str | None = None  # its key (PEM, unencrypted)
    # Commissioning only: offers "None" where listed and lets anonymous clients in when no username is set.
    allow_insecure: bool = False
    username: str | None = None
    # Name of the password: read from $CREDENTIALS_DIRECTORY/<name> (systemd LoadCredential) or env var <name>.
    password_credential: str | None = None
    # The namespace of every patchline node; node ids are strings within it, so they survive restarts.
    namespace_uri: str = "urn:patchline:opcua"
    application_uri: str = "urn:patchline:server"  # must match the certificate's subjectAltName URI
    server_name: str = "patchline"

    @model_validator(mode="after")
    def _secure_unless_allowed(self) -> OpcUaConfig:
        if "None" in self.security_policies and not self.allow_insecure:
            raise ValueError('security policy "None" sends results and passwords in clear text: list it only with '
                             "allow_insecure: true (commissioning)")
        if any(p != "None" for p in self.security_policies) and not (self.certificate and self.private_key):
            raise ValueError("the Basic256Sha256 policies need the server's certificate and private_key files")
        if (self.username is None) != (self.password_credential is None):
            raise ValueError("username and password_credential go together")
        if self.username is None and not self.allow_insecure:
            raise ValueError("set username and password_credential: anonymous clients are refused unless "
                             "allow_insecure: true")
        return self
