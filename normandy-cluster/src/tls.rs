//! [`ClusterTls`]: TLS (rustls) on the node-to-node RPC, mutual by default.
//!
//! Without it the RPC runs over plain HTTP/2 and the cluster secret crosses the network in clear
//! text: fine on loopback or inside a private overlay network, not across a shared one. With it,
//! every node presents one certificate both as a server and as a client, and checks its peers'
//! certificates against the cluster's CA; the cluster secret is still checked on every call.
//!
//! All nodes usually share one server name (a SAN in every node's certificate, say
//! `normandy-node`), because peers dial each other by `host:port` addresses that change as nodes
//! come and go; [`ClusterTls::server_name`] sets it.

use std::path::Path;

use normandy_core::{Error, Result};
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

/// The server name checked by default: peers' certificates must carry it as a DNS SAN.
pub const DEFAULT_SERVER_NAME: &str = "normandy-node";

/// TLS settings of a node's RPC server and of its clients to other nodes.
///
/// # Behavior
/// - The node serves TLS only; a plaintext call fails at the connection, before any handler.
/// - Mutual by default: a peer without a certificate signed by the cluster's CA is refused
///   during the handshake ([`require_client_cert(false)`](Self::require_client_cert) to
///   relax it, leaving the cluster secret as the only client check).
/// - Outgoing calls verify the peer's certificate against the CA and the server name.
#[derive(Clone)]
pub struct ClusterTls {
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
    ca_pem: Vec<u8>,
    server_name: String,
    require_client_cert: bool,
}

impl std::fmt::Debug for ClusterTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterTls")
            .field("server_name", &self.server_name)
            .field("require_client_cert", &self.require_client_cert)
            .finish_non_exhaustive()
    }
}

impl ClusterTls {
    /// From PEM bytes: this node's certificate (chain), its private key, and the CA certificate
    /// that signed every node's certificate.
    ///
    /// # Errors
    /// [`Error::Config`] when a part is empty or holds no PEM block.
    pub fn from_pem(
        cert_pem: impl Into<Vec<u8>>,
        key_pem: impl Into<Vec<u8>>,
        ca_pem: impl Into<Vec<u8>>,
    ) -> Result<Self> {
        let tls = Self {
            cert_pem: cert_pem.into(),
            key_pem: key_pem.into(),
            ca_pem: ca_pem.into(),
            server_name: DEFAULT_SERVER_NAME.into(),
            require_client_cert: true,
        };
        for (what, pem) in [
            ("certificate", &tls.cert_pem),
            ("private key", &tls.key_pem),
            ("CA certificate", &tls.ca_pem),
        ] {
            if !pem.windows(11).any(|w| w == b"-----BEGIN ") {
                return Err(Error::Config(format!(
                    "the cluster TLS {what} holds no PEM block (expected \"-----BEGIN ...\")"
                )));
            }
        }
        Ok(tls)
    }

    /// From PEM files (see [`from_pem`](Self::from_pem)).
    ///
    /// # Errors
    /// [`Error::Config`] naming the file that cannot be read or holds no PEM block.
    pub fn from_files(
        cert: impl AsRef<Path>,
        key: impl AsRef<Path>,
        ca: impl AsRef<Path>,
    ) -> Result<Self> {
        let read = |what: &str, p: &Path| {
            std::fs::read(p).map_err(|e| {
                Error::Config(format!(
                    "cannot read the cluster TLS {what} {}: {e}",
                    p.display()
                ))
            })
        };
        Self::from_pem(
            read("certificate", cert.as_ref())?,
            read("private key", key.as_ref())?,
            read("CA certificate", ca.as_ref())?,
        )
    }

    /// The name peers' certificates must carry (default [`DEFAULT_SERVER_NAME`]).
    pub fn server_name(mut self, name: impl Into<String>) -> Self {
        self.server_name = name.into();
        self
    }

    /// Whether callers must present a certificate signed by the CA (default true: mutual TLS).
    pub fn require_client_cert(mut self, required: bool) -> Self {
        self.require_client_cert = required;
        self
    }

    pub(crate) fn server_config(&self) -> ServerTlsConfig {
        // A caller that opens a connection and never finishes the handshake is dropped.
        let config = ServerTlsConfig::new()
            .identity(self.identity())
            .timeout(std::time::Duration::from_secs(10));
        if self.require_client_cert {
            config.client_ca_root(Certificate::from_pem(&self.ca_pem))
        } else {
            config
        }
    }

    pub(crate) fn client_config(&self) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca_pem))
            .identity(self.identity())
            .domain_name(self.server_name.clone())
    }

    fn identity(&self) -> Identity {
        Identity::from_pem(&self.cert_pem, &self.key_pem)
    }
}
