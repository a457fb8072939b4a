//! The certificate verifier of [`super::TlsSettings::client_config`]: checks the server
//! certificate exactly as far as the `sslmode` promises, and words what it refuses for the
//! operator.
//!
//! It must never accept more than the mode says (a chain it could not verify, a name that does not
//! match under verify-full) and never prints certificate contents beyond the names a certificate
//! was issued for.

use std::fmt;
use std::io;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};

/// A certificate problem, worded for the operator; travels inside rustls's error.
#[derive(Debug)]
struct CertificateProblem(String);

impl fmt::Display for CertificateProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for CertificateProblem {}

/// A rustls error as an operator should read it: the verifier's own wording for certificate
/// problems (rustls would print it through `Debug`), rustls's message otherwise.
pub fn describe_rustls(error: &rustls::Error) -> String {
    if let rustls::Error::InvalidCertificate(CertificateError::Other(other)) = error {
        return other.0.to_string();
    }
    error.to_string()
}

/// A name from rustls's `NotValidForNameContext::presented`, which renders them through `Debug`
/// (`DnsName("localhost")`, `IpAddress(127.0.0.1)`): just the name.
fn presented_name(name: &str) -> &str {
    name.split_once('(')
        .and_then(|(_, rest)| rest.strip_suffix(')'))
        .map_or(name, |inner| inner.trim_matches('"'))
}

fn problem(message: String) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(
        CertificateProblem(message),
    ))))
}

/// Checks the server certificate exactly as far as the mode promises.
///
/// Chain and host name are checked by separate calls (not by `WebPkiServerVerifier`, which always
/// checks both) so that verify-ca's "chain but no name" is explicit rather than a matter of
/// swallowing a name error. Handshake signatures are always verified: even without a chain
/// check, the server must prove it holds the key of the certificate it sent.
#[derive(Debug)]
pub(super) struct PolicyVerifier {
    /// `None`: the chain is not checked (prefer, require without a root certificate).
    pub(super) roots: Option<Arc<RootCertStore>>,
    pub(super) check_host: bool,
    /// Where the roots come from, for messages.
    pub(super) trusted: String,
    pub(super) provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PolicyVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(roots) = &self.roots else {
            return Ok(ServerCertVerified::assertion());
        };
        let cert = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )
        .map_err(|e| match e {
            rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer) => problem(format!(
                "the server certificate is not signed by a CA in {}: set sslrootcert to the \
                 certificate of the CA that issued it",
                self.trusted
            )),
            rustls::Error::InvalidCertificate(
                CertificateError::Expired | CertificateError::ExpiredContext { .. },
            ) => problem(format!(
                "the server certificate has expired ({e}): renew it"
            )),
            other => problem(format!(
                "the server certificate does not verify against {}: {other}",
                self.trusted
            )),
        })?;
        if self.check_host {
            rustls::client::verify_server_name(&cert, server_name).map_err(|e| {
                let names = match &e {
                    rustls::Error::InvalidCertificate(
                        CertificateError::NotValidForNameContext { presented, .. },
                    ) if !presented.is_empty() => presented
                        .iter()
                        .map(|name| presented_name(name))
                        .collect::<Vec<_>>()
                        .join(", "),
                    _ => "other names".into(),
                };
                problem(format!(
                    "the server certificate (for {names}) is not valid for host {}: connect \
                     with a name it lists, use sslmode=verify-ca (no host name check), or fix \
                     the certificate",
                    server_name.to_str()
                ))
            })?;
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The rustls error inside an I/O error from a TLS stream, if the failure was TLS's (a refused
/// certificate, a protocol violation) rather than the network's.
pub fn rustls_cause(error: &io::Error) -> Option<&rustls::Error> {
    error.get_ref()?.downcast_ref::<rustls::Error>()
}

#[cfg(test)]
mod tests {
    use super::super::{SslMode, plain_refused};
    use super::*;

    #[test]
    fn certificate_names_and_refusals_read_plainly() {
        assert_eq!(presented_name("DnsName(\"localhost\")"), "localhost");
        assert_eq!(presented_name("IpAddress(127.0.0.1)"), "127.0.0.1");
        assert_eq!(presented_name("odd"), "odd");
        let message = "pg_hba.conf rejects connection for host \"h\", user \"u\", database \"d\", no encryption";
        assert!(plain_refused(SslMode::Disable, "28000", message).is_some());
        assert!(plain_refused(SslMode::Prefer, "28000", message).is_none());
        assert!(plain_refused(SslMode::Disable, "28P01", message).is_none());
        let wrapped = rustls::Error::InvalidCertificate(CertificateError::Other(
            rustls::OtherError(Arc::new(CertificateProblem("plain words".into()))),
        ));
        assert_eq!(describe_rustls(&wrapped), "plain words");
    }
}
