//! TLS 1.3 for a multi-socket's paths, both ends authenticated by pinned Ed25519 keys.
//!
//! A relay carries all of a user's traffic, so its paths are never plain: each physical
//! connection is TLS 1.3 (rustls) with raw public keys (RFC 7250) — no certificates, no
//! authorities: the connecting side knows the one key its peer must present, and the accepting
//! side knows the keys it lets in. No session resumption and no 0-RTT, so a path's handshake
//! (and the exporter secret a join proof is bound to) is always fresh.
//!
//! Keys: [`Identity::generate`] makes one (PKCS#8, stored by the caller), [`PublicKey`] is its
//! shareable half, written as base64 of the 32 key bytes (one line, as `cmm-relay keygen`
//! prints it).

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{AlwaysResolvesClientRawPublicKeys, Resumption};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms, verify_tls13_signature_with_raw_key};
use rustls::pki_types::{
    CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, SubjectPublicKeyInfoDer, UnixTime,
};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{AlwaysResolvesServerRawPublicKeys, NoServerSessionStorage};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, Error, ServerConfig,
    SignatureScheme,
};

/// The DER prefix of an Ed25519 SubjectPublicKeyInfo; the 32 key bytes follow.
const ED25519_SPKI_PREFIX: [u8; 12] =
    [0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00];
/// The label of the keying material a join proof is computed over (RFC 8446 §7.5).
pub const JOIN_EXPORTER_LABEL: &[u8] = b"EXPORTER-cmm-path-join";

/// Why a key or a TLS setting could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// A public key that is not base64 of 32 bytes.
    #[error("not a public key (base64 of 32 bytes expected): {0:?}")]
    BadPublicKey(String),
    /// A private key file that is not an Ed25519 PKCS#8 key.
    #[error("not an Ed25519 private key (PKCS#8, base64 or DER): {0}")]
    BadPrivateKey(String),
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Tls(#[from] Error),
}

/// An Ed25519 public key: what a peer is pinned to.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublicKey(pub [u8; 32]);

impl PublicKey {
    /// The DER SubjectPublicKeyInfo (what RFC 7250 puts on the wire).
    pub fn spki(&self) -> Vec<u8> {
        let mut v = ED25519_SPKI_PREFIX.to_vec();
        v.extend_from_slice(&self.0);
        v
    }

    /// The key of a SubjectPublicKeyInfo, if it is an Ed25519 one.
    pub fn from_spki(der: &[u8]) -> Option<PublicKey> {
        let key = der.strip_prefix(&ED25519_SPKI_PREFIX[..])?;
        Some(PublicKey(key.try_into().ok()?))
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&BASE64.encode(self.0))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

impl FromStr for PublicKey {
    type Err = KeyError;

    fn from_str(s: &str) -> Result<PublicKey, KeyError> {
        let bad = || KeyError::BadPublicKey(s.to_string());
        let bytes = BASE64.decode(s.trim()).map_err(|_| bad())?;
        Ok(PublicKey(bytes.try_into().map_err(|_| bad())?))
    }
}

/// This side's key pair.
#[derive(Clone)]
pub struct Identity {
    pkcs8: Vec<u8>,
    public: PublicKey,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity").field("public", &self.public).finish_non_exhaustive()
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl Identity {
    /// A new random key pair.
    pub fn generate() -> Result<Identity, KeyError> {
        let rng = ring::rand::SystemRandom::new();
        let doc = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng)
            .map_err(|_| KeyError::BadPrivateKey("the system's random source failed".into()))?;
        Identity::from_pkcs8(doc.as_ref())
    }

    /// A key pair from its PKCS#8 DER.
    pub fn from_pkcs8(der: &[u8]) -> Result<Identity, KeyError> {
        use ring::signature::KeyPair;
        let pair = ring::signature::Ed25519KeyPair::from_pkcs8_maybe_unchecked(der)
            .map_err(|e| KeyError::BadPrivateKey(e.to_string()))?;
        let public = PublicKey(
            pair.public_key()
                .as_ref()
                .try_into()
                .map_err(|_| KeyError::BadPrivateKey("odd public key length".into()))?,
        );
        Ok(Identity { pkcs8: der.to_vec(), public })
    }

    /// The key pair in the text form key files hold: base64 of the PKCS#8 DER, one line.
    pub fn to_text(&self) -> String {
        BASE64.encode(&self.pkcs8)
    }

    /// A key pair from a key file's text (see [`Identity::to_text`]).
    pub fn from_text(text: &str) -> Result<Identity, KeyError> {
        let der = BASE64
            .decode(text.trim())
            .map_err(|_| KeyError::BadPrivateKey("the file is not base64 of a PKCS#8 key".into()))?;
        Identity::from_pkcs8(&der)
    }

    /// The public half, to give to peers.
    pub fn public_key(&self) -> PublicKey {
        self.public
    }

    fn certified(&self, provider: &CryptoProvider) -> Result<Arc<CertifiedKey>, KeyError> {
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.pkcs8.clone()));
        let signer = provider.key_provider.load_private_key(key)?;
        Ok(Arc::new(CertifiedKey::new(vec![CertificateDer::from(self.public.spki())], signer)))
    }

    /// The TLS configuration of a connecting side that trusts only `peer`.
    pub fn client_config(&self, peer: PublicKey) -> Result<Arc<ClientConfig>, KeyError> {
        let provider = provider();
        let certified = self.certified(&provider)?;
        let verifier =
            Arc::new(Pinned { allowed: vec![peer], algorithms: provider.signature_verification_algorithms });
        let mut config = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_cert_resolver(Arc::new(AlwaysResolvesClientRawPublicKeys::new(certified)));
        config.resumption = Resumption::disabled();
        config.enable_early_data = false;
        Ok(Arc::new(config))
    }

    /// The TLS configuration of an accepting side that lets in only `allowed`.
    pub fn server_config(&self, allowed: &[PublicKey]) -> Result<Arc<ServerConfig>, KeyError> {
        let provider = provider();
        let certified = self.certified(&provider)?;
        let verifier = Arc::new(Pinned {
            allowed: allowed.to_vec(),
            algorithms: provider.signature_verification_algorithms,
        });
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(Arc::new(AlwaysResolvesServerRawPublicKeys::new(certified)));
        config.session_storage = Arc::new(NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
        config.max_early_data_size = 0;
        Ok(Arc::new(config))
    }
}

/// The join proof of a TLS path: HMAC-SHA256 keyed with the session's join secret over 32
/// bytes of the path's TLS exporter (label [`JOIN_EXPORTER_LABEL`], context the session id).
/// It is bound to this one TLS session, so a proof seen on one connection is worth nothing on
/// another, and it needs the secret, which only travelled inside the session's own TLS.
pub fn join_proof(
    conn: &rustls::Connection,
    secret: &[u8; 32],
    session: &[u8; 16],
) -> Result<[u8; 32], Error> {
    let exported = conn.export_keying_material([0u8; 32], JOIN_EXPORTER_LABEL, Some(session))?;
    Ok(proof_over(&exported, secret))
}

/// The MAC of a join proof over `exported` (a path's 32 bytes of TLS exporter) with `secret`.
pub fn proof_over(exported: &[u8; 32], secret: &[u8; 32]) -> [u8; 32] {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    let tag = ring::hmac::sign(&key, exported);
    let mut out = [0u8; 32];
    out.copy_from_slice(tag.as_ref());
    out
}

/// Whether `proof` is this path's join proof for the session (compared in constant time).
pub fn check_join_proof(
    conn: &rustls::Connection,
    secret: &[u8; 32],
    session: &[u8; 16],
    proof: &[u8; 32],
) -> bool {
    let Ok(exported) = conn.export_keying_material([0u8; 32], JOIN_EXPORTER_LABEL, Some(session)) else {
        return false;
    };
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    ring::hmac::verify(&key, &exported, proof).is_ok()
}

/// A fresh random join secret.
pub fn random_secret() -> Result<[u8; 32], KeyError> {
    use ring::rand::SecureRandom;
    let mut s = [0u8; 32];
    ring::rand::SystemRandom::new()
        .fill(&mut s)
        .map_err(|_| KeyError::BadPrivateKey("the system's random source failed".into()))?;
    Ok(s)
}

/// The name a connecting side gives; the peer is known by its key, not by a name.
pub fn server_name() -> ServerName<'static> {
    ServerName::try_from("cmm-peer").expect("a valid DNS name")
}

/// The peer's key after a handshake, from what it presented.
pub fn peer_key(certs: Option<&[CertificateDer<'_>]>) -> Option<PublicKey> {
    PublicKey::from_spki(certs?.first()?.as_ref())
}

/// Accepts exactly the pinned keys, each as a raw public key.
#[derive(Debug)]
struct Pinned {
    allowed: Vec<PublicKey>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl Pinned {
    fn check(&self, presented: &CertificateDer<'_>) -> Result<(), Error> {
        match PublicKey::from_spki(presented.as_ref()) {
            Some(k) if self.allowed.contains(&k) => Ok(()),
            Some(_) => Err(Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure)),
            None => Err(Error::InvalidCertificate(CertificateError::BadEncoding)),
        }
    }

    fn verify13(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls13_signature_with_raw_key(
            message,
            &SubjectPublicKeyInfoDer::from(cert.as_ref()),
            dss,
            &self.algorithms,
        )
    }
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        self.check(end_entity).map(|()| ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        Err(Error::PeerIncompatible(rustls::PeerIncompatible::Tls12NotOffered))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.verify13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }

    fn requires_raw_public_keys(&self) -> bool {
        true
    }
}

impl ClientCertVerifier for Pinned {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        self.check(end_entity).map(|()| ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        Err(Error::PeerIncompatible(rustls::PeerIncompatible::Tls12NotOffered))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.verify13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }

    fn requires_raw_public_keys(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn handshake(
        client: Arc<ClientConfig>,
        server: Arc<ServerConfig>,
    ) -> (Result<Option<PublicKey>, std::io::Error>, Result<Option<PublicKey>, std::io::Error>) {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let connect = async move {
            let mut s = tokio_rustls::TlsConnector::from(client).connect(server_name(), a).await?;
            s.write_all(b"ping").await?;
            let mut buf = [0u8; 4];
            s.read_exact(&mut buf).await?;
            Ok(peer_key(s.get_ref().1.peer_certificates()))
        };
        let accept = async move {
            let mut s = tokio_rustls::TlsAcceptor::from(server).accept(b).await?;
            let mut buf = [0u8; 4];
            s.read_exact(&mut buf).await?;
            s.write_all(b"pong").await?;
            Ok(peer_key(s.get_ref().1.peer_certificates()))
        };
        tokio::join!(connect, accept)
    }

    #[tokio::test]
    async fn pinned_keys_meet_and_strangers_are_refused() {
        let (relay, proxy, stranger) =
            (Identity::generate().unwrap(), Identity::generate().unwrap(), Identity::generate().unwrap());
        let server = relay.server_config(&[proxy.public_key()]).unwrap();
        let (c, s) = handshake(proxy.client_config(relay.public_key()).unwrap(), server.clone()).await;
        assert_eq!(c.unwrap(), Some(relay.public_key()));
        assert_eq!(s.unwrap(), Some(proxy.public_key()));
        // A client whose key is not allowed.
        let (c, s) = handshake(stranger.client_config(relay.public_key()).unwrap(), server.clone()).await;
        assert!(c.is_err() && s.is_err());
        // A server that is not the pinned one.
        let impostor = stranger.server_config(&[proxy.public_key()]).unwrap();
        let (c, s) = handshake(proxy.client_config(relay.public_key()).unwrap(), impostor).await;
        assert!(c.is_err() && s.is_err());
    }

    #[test]
    fn keys_round_trip_through_their_text_and_bad_ones_say_so() {
        let id = Identity::generate().unwrap();
        let again = Identity::from_text(&id.to_text()).unwrap();
        assert_eq!(again.public_key(), id.public_key());
        let text = id.public_key().to_string();
        assert_eq!(text.parse::<PublicKey>().unwrap(), id.public_key());
        assert!(matches!("c2hvcnQ=".parse::<PublicKey>(), Err(KeyError::BadPublicKey(_))));
        assert!(matches!(Identity::from_text("bm90IGEga2V5"), Err(KeyError::BadPrivateKey(_))));
    }
}
