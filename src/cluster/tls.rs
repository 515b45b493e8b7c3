//! The cluster core's `tls` mode (docs/CLUSTER.md, "TLS"): TLS 1.3 only, both ends present a
//! certificate chained to the cluster's private CA (`cluster.tls_ca`; never the system roots),
//! ALPN `wse-cluster/1`. Neither end checks a name during the TLS handshake: a seed is dialled
//! by address before its name is known, so each end verifies the chain only, and the node's
//! handshake then requires the HELLO's node name to be one the verified certificate is valid
//! for (a SAN), refusing the session otherwise as it refuses a wrong PSK.

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, DnsName, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use tokio::net::TcpStream;
use wse_cluster::handshake::CertifiedNames;
use wse_shards::config::ClusterConfig;

/// ALPN protocol of cluster links: a peer that speaks something else fails the TLS handshake.
const ALPN: &[u8] = b"wse-cluster/1";

/// The TLS settings of this node's links, loaded at start.
#[derive(Clone)]
pub struct Tls {
    acceptor: tokio_rustls::TlsAcceptor,
    connector: tokio_rustls::TlsConnector,
}

/// A TLS stream of either end.
pub type Stream = tokio_rustls::TlsStream<TcpStream>;

impl Tls {
    /// Loads the CA, this node's certificate chain and key (`cluster.tls_ca`, `tls_cert`,
    /// `tls_key`).
    ///
    /// # Errors
    /// One line naming the key and the file: missing, unreadable, not PEM, no certificate or
    /// key in it, or a key that does not match the certificate.
    pub fn load(cfg: &ClusterConfig) -> Result<Self, String> {
        let path = |key: &str, p: &Option<std::path::PathBuf>| {
            p.clone()
                .ok_or_else(|| format!("cluster.{key} is required with security = tls"))
        };
        let ca_path = path("tls_ca", &cfg.tls_ca)?;
        let cert_path = path("tls_cert", &cfg.tls_cert)?;
        let key_path = path("tls_key", &cfg.tls_key)?;
        let ca = certs("tls_ca", &ca_path)?;
        let chain = certs("tls_cert", &cert_path)?;
        let key = PrivateKeyDer::from_pem_file(&key_path).map_err(|e| {
            format!(
                "cluster.tls_key: {}: no private key read: {e}",
                key_path.display()
            )
        })?;
        let mut roots = RootCertStore::empty();
        for c in ca {
            roots.add(c).map_err(|e| {
                format!(
                    "cluster.tls_ca: {}: not a usable CA certificate: {e}",
                    ca_path.display()
                )
            })?;
        }
        let roots = Arc::new(roots);
        // ring: no post-quantum key exchange (hence rustls's deprecation note), but no cmake
        // and a short build, as aws-lc-rs would need; the links stay inside the operator's
        // network, under a private CA.
        #[allow(deprecated)]
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mismatch = |e: rustls::Error| {
            format!(
                "cluster.tls_key: {}: does not go with cluster.tls_cert {}: {e}",
                key_path.display(),
                cert_path.display()
            )
        };
        let client_verifier =
            WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
                .build()
                .map_err(|e| format!("cluster.tls_ca: {}: {e}", ca_path.display()))?;
        let mut server = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| e.to_string())?
            .with_client_cert_verifier(client_verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(mismatch)?;
        server.alpn_protocols = vec![ALPN.to_vec()];
        let server_verifier = Arc::new(ChainOnly {
            roots,
            algorithms: provider.signature_verification_algorithms,
        });
        let mut client = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| e.to_string())?
            .dangerous()
            .with_custom_certificate_verifier(server_verifier)
            .with_client_auth_cert(chain, key)
            .map_err(mismatch)?;
        client.alpn_protocols = vec![ALPN.to_vec()];
        Ok(Self {
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(server)),
            connector: tokio_rustls::TlsConnector::from(Arc::new(client)),
        })
    }

    /// The server side of an accepted socket; the names its verified client certificate is
    /// valid for.
    pub async fn accept(&self, s: TcpStream) -> std::io::Result<(Stream, CertifiedNames)> {
        let s = self.acceptor.accept(s).await?;
        let names = certified(s.get_ref().1.peer_certificates())?;
        Ok((Stream::Server(s), names))
    }

    /// The client side of a dialled socket; the names the peer's verified certificate is valid
    /// for. The name sent (SNI) is the one dialled when it is a DNS name; it is not checked.
    pub async fn connect(
        &self,
        addr: &str,
        s: TcpStream,
    ) -> std::io::Result<(Stream, CertifiedNames)> {
        let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let name = ServerName::try_from(host.to_owned())
            .unwrap_or_else(|_| ServerName::try_from("wse-cluster").expect("a DNS name"));
        let s = self.connector.connect(name, s).await?;
        let names = certified(s.get_ref().1.peer_certificates())?;
        Ok((Stream::Client(s), names))
    }
}

/// Every certificate of a PEM file.
fn certs(key: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("cluster.{key}: {}: {e}", path.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("cluster.{key}: {}: bad PEM: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "cluster.{key}: {}: no certificate in it",
            path.display()
        ));
    }
    Ok(certs)
}

/// What the peer's verified end-entity certificate is valid for, as the node's handshake asks
/// it: a node name is accepted when it is a DNS name the certificate's SAN covers.
fn certified(peer: Option<&[CertificateDer<'_>]>) -> std::io::Result<CertifiedNames> {
    let cert = peer
        .and_then(<[_]>::first)
        .ok_or_else(|| std::io::Error::other("the peer presented no certificate"))?
        .clone()
        .into_owned();
    Ok(Arc::new(move |name: &str| {
        let Ok(dns) = DnsName::try_from(name.to_owned()) else {
            return false;
        };
        webpki::EndEntityCert::try_from(&cert)
            .and_then(|c| c.verify_is_valid_for_subject_name(&ServerName::DnsName(dns)))
            .is_ok()
    }))
}

/// The dialler's check of the acceptor's certificate: chained to the CA, valid now, usable
/// for a server, and no name check here (the node's handshake checks the HELLO's name).
#[derive(Debug)]
struct ChainOnly {
    roots: Arc<RootCertStore>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = webpki::EndEntityCert::try_from(end_entity).map_err(pki_error)?;
        cert.verify_for_usage(
            self.algorithms.all,
            &self.roots.roots,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
            None,
            None,
        )
        .map_err(pki_error)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // TLS 1.2 is not offered.
        Err(rustls::Error::General("TLS 1.2 is not offered".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// A certificate error as rustls reports it (the peer gets the matching alert).
fn pki_error(e: webpki::Error) -> rustls::Error {
    use rustls::CertificateError as C;
    match e {
        webpki::Error::BadDer | webpki::Error::BadDerTime => C::BadEncoding.into(),
        webpki::Error::CertExpired { .. } => C::Expired.into(),
        webpki::Error::CertNotValidYet { .. } => C::NotValidYet.into(),
        webpki::Error::UnknownIssuer => C::UnknownIssuer.into(),
        webpki::Error::InvalidSignatureForPublicKey => C::BadSignature.into(),
        e => C::Other(rustls::OtherError(Arc::new(e))).into(),
    }
}
