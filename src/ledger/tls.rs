//! TLS for the PostgreSQL ledger, with libpq's `sslmode` semantics, on rustls with the
//! AWS-LC provider keyrotate already uses for keys (no second crypto library, nothing
//! loaded at start-up when the ledger is SQLite).
//!
//! - `prefer` (the default) and `require` encrypt without checking the certificate
//!   (the handshake signature is still checked), as libpq does;
//! - `require` with `sslrootcert`, and `verify-ca`, check the chain, not the name;
//! - `verify-full` checks the chain and that the certificate names the host.
//!
//! `sslrootcert=PATH` is then the only trust anchor; without it, the system's store.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, Error, RootCertStore, SignatureScheme};
use tokio_postgres_rustls::MakeRustlsConnect;

/// How much a connection checks the server's certificate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Verify {
    Nothing,
    Chain,
    ChainAndHost,
}

/// The TLS a connection uses: how much it verifies, against which CA file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Tls {
    pub verify: Verify,
    pub rootcert: Option<String>,
}

/// The URL with keyrotate's TLS options taken out (in the form the driver parses), and
/// the TLS policy they ask for: `None` for `sslmode=disable`.
///
/// The query starts after the user-info (as the driver reads it), so a `?` in a
/// password is not mistaken for it. On Unix-domain sockets `sslmode` is ignored, as
/// libpq does: there is no TLS on a socket.
pub(super) fn policy(url: &str) -> Result<(String, Option<Tls>), String> {
    let parts = super::pgurl::split(url).ok_or("expected a postgres:// or postgresql:// URL")?;
    let (base, query) = (parts.base(), parts.query());
    let mut mode = "prefer".to_string();
    let mut rootcert = None;
    let mut rest = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let v = percent_encoding::percent_decode_str(v).decode_utf8_lossy().into_owned();
        match k {
            "sslmode" => mode = v,
            "sslrootcert" => rootcert = Some(v),
            _ => rest.push(pair.to_string()),
        }
    }
    let (wire, verify) = match mode.as_str() {
        "disable" => ("disable", None),
        "prefer" => ("prefer", Some(Verify::Nothing)),
        "require" if rootcert.is_some() => ("require", Some(Verify::Chain)),
        "require" => ("require", Some(Verify::Nothing)),
        "verify-ca" => ("require", Some(Verify::Chain)),
        "verify-full" => ("require", Some(Verify::ChainAndHost)),
        other => {
            return Err(format!(
                "sslmode={other} is not one of disable, prefer, require, verify-ca, verify-full"
            ))
        }
    };
    if parts.unix_socket_only() {
        rest.push("sslmode=disable".into());
        return Ok((format!("{base}?{}", rest.join("&")), None));
    }
    rest.push(format!("sslmode={wire}"));
    Ok((
        format!("{base}?{}", rest.join("&")),
        verify.map(|verify| Tls { verify, rootcert }),
    ))
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn roots(rootcert: Option<&str>) -> Result<RootCertStore, String> {
    let mut store = RootCertStore::empty();
    match rootcert {
        Some(path) => {
            for cert in CertificateDer::pem_file_iter(path).map_err(|e| format!("sslrootcert {path}: {e}"))? {
                let cert = cert.map_err(|e| format!("sslrootcert {path}: {e}"))?;
                store.add(cert).map_err(|e| format!("sslrootcert {path}: {e}"))?;
            }
            if store.is_empty() {
                return Err(format!("sslrootcert {path}: no certificate in it"));
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            store.add_parsable_certificates(found.certs);
            if store.is_empty() {
                return Err("no system CA certificates found: give sslrootcert".into());
            }
        }
    }
    Ok(store)
}

/// The connector for `tls`.
pub(super) fn connector(tls: &Tls) -> Result<MakeRustlsConnect, String> {
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS set-up: {e}"))?;
    let config = match tls.verify {
        Verify::ChainAndHost => builder
            .with_root_certificates(roots(tls.rootcert.as_deref())?)
            .with_no_client_auth(),
        Verify::Chain | Verify::Nothing => {
            let chain = match tls.verify {
                Verify::Chain => Some(
                    WebPkiServerVerifier::builder_with_provider(
                        Arc::new(roots(tls.rootcert.as_deref())?),
                        Arc::clone(&provider),
                    )
                    .build()
                    .map_err(|e| format!("TLS set-up: {e}"))?,
                ),
                _ => None,
            };
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(Lenient { chain, provider }))
                .with_no_client_auth()
        }
    };
    Ok(MakeRustlsConnect::new(config))
}

/// The verifier for `prefer`/`require` (no `chain`: encryption against passive
/// eavesdropping only, as in libpq) and `verify-ca` (the chain must lead to a trusted
/// root; the name is not checked). Either way the handshake signature is checked
/// against the presented certificate.
#[derive(Debug)]
struct Lenient {
    chain: Option<Arc<WebPkiServerVerifier>>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Lenient {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let Some(chain) = &self.chain else {
            return Ok(ServerCertVerified::assertion());
        };
        match chain.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
            Err(Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::{policy, Tls, Verify};

    fn tls(verify: Verify, rootcert: Option<&str>) -> Option<Tls> {
        Some(Tls {
            verify,
            rootcert: rootcert.map(str::to_string),
        })
    }

    #[test]
    fn sslmode_follows_libpq() {
        let p = |u: &str| policy(u).unwrap();
        assert_eq!(
            p("postgres://h/db"),
            ("postgres://h/db?sslmode=prefer".into(), tls(Verify::Nothing, None))
        );
        assert_eq!(p("postgres://h/db?sslmode=disable").1, None);
        assert_eq!(p("postgres://h/db?sslmode=require").1, tls(Verify::Nothing, None));
        let (wire, v) = p("postgres://h/db?connect_timeout=3&sslmode=verify-full&sslrootcert=%2Fetc%2Fca.pem");
        assert_eq!(wire, "postgres://h/db?connect_timeout=3&sslmode=require");
        assert_eq!(v, tls(Verify::ChainAndHost, Some("/etc/ca.pem")));
        assert_eq!(
            p("postgres://h/db?sslmode=require&sslrootcert=/ca").1,
            tls(Verify::Chain, Some("/ca"))
        );
        assert!(policy("postgres://h/db?sslmode=allow").is_err());
        assert_eq!(
            p("postgres://u:p?w@h/db?sslmode=disable"),
            ("postgres://u:p?w@h/db?sslmode=disable".into(), None)
        );
        assert_eq!(
            p("postgres://u@%2Fvar%2Frun%2Fpostgresql/db?sslmode=verify-full"),
            ("postgres://u@%2Fvar%2Frun%2Fpostgresql/db?sslmode=disable".into(), None)
        );
    }
}
