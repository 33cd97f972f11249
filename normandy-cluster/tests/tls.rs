//! Mutual TLS on the node-to-node RPC, with certificates made at test time (rcgen), two nodes in
//! one process over real Redis and real loopback TLS.

mod support;

use std::time::Duration;

use normandy_cluster::{Cluster, ClusterTls, NodeClient};
use normandy_core::{
    CatalogEntry, ConfigTemplate, ContentBlock, EntryPayload, ErrorKind, ScriptedClient,
    TemplateCatalog,
};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use support::{cleanup, redis_url, unique_prefix};

const SECRET: &str = "tls-test-secret";

/// A certificate authority and the node certificates it signs.
struct Pki {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Pki {
    fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        Self { issuer }
    }

    fn ca_pem(&self) -> String {
        self.issuer.pem()
    }

    /// A node certificate (server and client use) for `names`, with its key, as PEM.
    fn node_cert(&self, names: &[&str]) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    /// TLS settings for one node: its own certificate for `normandy-node`, trusting this CA.
    fn node_tls(&self) -> ClusterTls {
        let (cert, key) = self.node_cert(&["normandy-node"]);
        ClusterTls::from_pem(cert, key, self.ca_pem()).unwrap()
    }
}

fn catalog() -> TemplateCatalog {
    TemplateCatalog::new()
        .with(
            ConfigTemplate::new("echo", "scripted"),
            CatalogEntry::with_client(ScriptedClient::echo()),
        )
        .unwrap()
}

async fn node(prefix: &str, name: &str, tls: ClusterTls) -> Cluster {
    Cluster::redis(catalog(), &redis_url())
        .prefix(prefix)
        .node_name(name)
        .secret(SECRET)
        .tls(tls)
        .build()
        .await
        .unwrap()
}

async fn wait_members(c: &Cluster, n: usize) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while c.members().len() < n {
        assert!(
            tokio::time::Instant::now() < deadline,
            "members never reached {n}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nodes_over_mutual_tls_route_sessions_to_each_other() {
    let Some(_) = support::redis_or_skip().await else {
        return;
    };
    let prefix = unique_prefix("tls-route");
    let pki = Pki::new("normandy test CA");
    let a = node(&prefix, "a", pki.node_tls()).await;
    let b = node(&prefix, "b", pki.node_tls()).await;
    wait_members(&b, 2).await;
    let id = a.start("echo").await.unwrap();
    assert_eq!(a.send(&id, "one").await.unwrap().text(), "echo: one");
    // Owned by a: b forwards over TLS, both ways.
    assert_eq!(b.send(&id, "two").await.unwrap().text(), "echo: two");
    assert!(b.stats().forwarded >= 1, "the send from b went to a");
    assert_eq!(b.sessions().live_count(), 0);
    let from_b = b.client(a.address()).unwrap();
    let h = from_b.health().await.unwrap();
    assert_eq!(h.node, a.node());
    let entries = b.history_all(&id).await.unwrap();
    let texts: Vec<String> = entries
        .iter()
        .filter_map(|e| match &e.payload {
            EntryPayload::Input { content, .. } => Some(
                content
                    .iter()
                    .filter_map(|b| match b {
                        ContentBlock::Text { text } => Some(text.clone()),
                        _ => None,
                    })
                    .collect(),
            ),
            EntryPayload::Assistant { message, .. } => Some(message.text()),
            _ => None,
        })
        .collect();
    assert_eq!(texts, ["one", "echo: one", "two", "echo: two"]);
    b.shutdown().await;
    a.shutdown().await;
    cleanup(&prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tls_node_refuses_plaintext_foreign_and_misnamed_callers() {
    let Some(_) = support::redis_or_skip().await else {
        return;
    };
    let prefix = unique_prefix("tls-refuse");
    let pki = Pki::new("normandy test CA");
    let a = node(&prefix, "a", pki.node_tls()).await;
    let addr = a.address().to_string();
    let timeout = Duration::from_secs(5);
    let probe = |tls: Option<ClusterTls>| {
        let addr = addr.clone();
        async move {
            NodeClient::connect(&addr, Some(SECRET), timeout, tls.as_ref())
                .unwrap()
                .health()
                .await
        }
    };

    // The right CA, a certificate it signed, the right name: served.
    assert_eq!(probe(Some(pki.node_tls())).await.unwrap().node, a.node());

    // Plaintext HTTP/2 to a TLS port: no handler runs, and the error says what to check.
    let err = probe(None).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
    assert!(err.to_string().contains("require TLS"), "{err}");

    // A stranger's PKI: its CA does not trust the node, and the node does not trust its cert.
    let stranger = Pki::new("some other CA");
    let err = probe(Some(stranger.node_tls())).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
    assert!(err.to_string().contains("UnknownIssuer"), "{err}");

    // Trusts our CA (so it accepts the node) but presents a certificate the cluster never
    // issued: mutual TLS refuses it in the handshake, secret or not.
    let (cert, key) = stranger.node_cert(&["normandy-node"]);
    let impostor = ClusterTls::from_pem(cert, key, pki.ca_pem()).unwrap();
    let err = probe(Some(impostor.clone())).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
    assert!(err.to_string().contains("connection closed"), "{err}");
    // ...and only for that: a node that does not require client certificates serves it (the
    // cluster secret is then the only check on callers).
    let lax = node(&prefix, "lax", pki.node_tls().require_client_cert(false)).await;
    let h = NodeClient::connect(lax.address(), Some(SECRET), timeout, Some(&impostor))
        .unwrap()
        .health()
        .await
        .unwrap();
    assert_eq!(h.node, lax.node());
    lax.shutdown().await;

    // Expects another server name than the node's certificate carries.
    let err = probe(Some(pki.node_tls().server_name("not-the-node")))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
    assert!(err.to_string().contains("not valid for name"), "{err}");

    // The node kept serving through all of it.
    assert_eq!(probe(Some(pki.node_tls())).await.unwrap().node, a.node());
    a.shutdown().await;
    cleanup(&prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tls_material_is_a_config_error_naming_the_part() {
    let Some(_) = support::redis_or_skip().await else {
        return;
    };
    let pki = Pki::new("normandy test CA");
    let (cert, key) = pki.node_cert(&["normandy-node"]);

    let err = ClusterTls::from_pem("not a certificate", key.clone(), pki.ca_pem()).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config);
    assert!(err.to_string().contains("certificate"), "{err}");
    let err = ClusterTls::from_pem(cert.clone(), "", pki.ca_pem()).unwrap_err();
    assert!(err.to_string().contains("private key"), "{err}");

    let missing = std::env::temp_dir().join("normandy-no-such-cert.pem");
    let err = ClusterTls::from_files(&missing, &missing, &missing).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config);
    assert!(
        err.to_string().contains("normandy-no-such-cert.pem"),
        "{err}"
    );

    // PEM framing around garbage: refused when the node is built, before it binds or joins.
    let garbage = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
    let tls = ClusterTls::from_pem(garbage, key, pki.ca_pem()).unwrap();
    let prefix = unique_prefix("tls-bad");
    let err = Cluster::redis(catalog(), &redis_url())
        .prefix(&prefix)
        .secret(SECRET)
        .tls(tls)
        .build()
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config, "{err}");
    assert!(err.to_string().contains("TLS"), "{err}");
    // Nothing joined: no lease, no member.
    let client = redis::Client::open(redis_url()).unwrap();
    let mut con = client.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}:*"))
        .query_async(&mut con)
        .await
        .unwrap();
    assert!(keys.is_empty(), "a node with bad TLS left keys: {keys:?}");
    cleanup(&prefix).await;
}
