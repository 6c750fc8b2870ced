//! TLS and authentication: a cluster CA generated on first start, the apiserver's
//! serving certificate, an admin client certificate written into a kubeconfig, and the
//! HTTPS accept loop that attaches the caller's identity to each request.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use base64::Engine;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};

/// Who is calling. Authorization (RBAC) builds on this in a later step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserInfo {
    pub name: String,
    pub groups: Vec<String>,
}

/// The cluster PKI, stored as PEM files in the data directory.
pub struct Pki {
    pub dir: PathBuf,
}

impl Pki {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    pub fn ca_cert_path(&self) -> PathBuf {
        self.path("ca.crt")
    }

    /// Creates the CA, serving and admin certificates unless they already exist.
    /// `hosts` are the names and IPs the serving certificate is valid for.
    pub fn ensure(dir: &Path, hosts: &[String]) -> Result<Pki> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let pki = Pki {
            dir: dir.to_path_buf(),
        };
        if !pki.path("ca.crt").exists() || !pki.path("ca.key").exists() {
            let key = KeyPair::generate()?;
            let mut params = CertificateParams::new(Vec::<String>::new())?;
            params.distinguished_name = dn("skiff-ca", None);
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.key_usages = vec![
                KeyUsagePurpose::KeyCertSign,
                KeyUsagePurpose::CrlSign,
                KeyUsagePurpose::DigitalSignature,
            ];
            params.not_after = rcgen::date_time_ymd(2036, 1, 1);
            let cert = params.self_signed(&key)?;
            write_private(&pki.path("ca.key"), &key.serialize_pem())?;
            std::fs::write(pki.path("ca.crt"), cert.pem())?;
        }
        // The serving cert is re-issued when the host list changes.
        let hosts_file = pki.path("apiserver.hosts");
        let wanted = hosts.join(",");
        let current = std::fs::read_to_string(&hosts_file).unwrap_or_default();
        if current != wanted || !pki.path("apiserver.crt").exists() {
            let mut sans: Vec<String> = hosts.to_vec();
            for extra in [
                "localhost",
                "kubernetes",
                "kubernetes.default",
                "kubernetes.default.svc",
                "kubernetes.default.svc.cluster.local",
                "127.0.0.1",
                "10.96.0.1",
            ] {
                if !sans.iter().any(|h| h == extra) {
                    sans.push(extra.to_string());
                }
            }
            pki.issue("apiserver", "kube-apiserver", None, &sans, true)?;
            std::fs::write(&hosts_file, wanted)?;
        }
        if !pki.path("admin.crt").exists() {
            pki.issue("admin", "skiff-admin", Some("system:masters"), &[], false)?;
        }
        Ok(pki)
    }

    /// Issues `<file>.crt`/`<file>.key` signed by the CA.
    pub fn issue(
        &self,
        file: &str,
        common_name: &str,
        organization: Option<&str>,
        sans: &[String],
        server: bool,
    ) -> Result<()> {
        let ca_key = KeyPair::from_pem(&std::fs::read_to_string(self.path("ca.key"))?)?;
        let issuer =
            Issuer::from_ca_cert_pem(&std::fs::read_to_string(self.path("ca.crt"))?, ca_key)?;
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name = dn(common_name, organization);
        params.subject_alt_names = sans
            .iter()
            .map(|h| match h.parse::<std::net::IpAddr>() {
                Ok(ip) => Ok(SanType::IpAddress(ip)),
                Err(_) => Ok(SanType::DnsName(h.clone().try_into()?)),
            })
            .collect::<Result<Vec<_>, rcgen::Error>>()?;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![if server {
            ExtendedKeyUsagePurpose::ServerAuth
        } else {
            ExtendedKeyUsagePurpose::ClientAuth
        }];
        params.not_after = rcgen::date_time_ymd(2035, 1, 1);
        let cert = params.signed_by(&key, &issuer)?;
        write_private(&self.path(&format!("{file}.key")), &key.serialize_pem())?;
        std::fs::write(self.path(&format!("{file}.crt")), cert.pem())?;
        Ok(())
    }

    /// Writes a kubeconfig for the client certificate `<file>.crt`.
    pub fn write_kubeconfig(&self, file: &str, server_url: &str, out: &Path) -> Result<()> {
        let b64 = |p: PathBuf| -> Result<String> {
            Ok(base64::engine::general_purpose::STANDARD.encode(std::fs::read(p)?))
        };
        let user = file;
        let config = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "skiff", "cluster": {
                "server": server_url,
                "certificate-authority-data": b64(self.path("ca.crt"))?,
            }}],
            "users": [{"name": user, "user": {
                "client-certificate-data": b64(self.path(&format!("{file}.crt")))?,
                "client-key-data": b64(self.path(&format!("{file}.key")))?,
            }}],
            "contexts": [{"name": "skiff", "context": {"cluster": "skiff", "user": user}}],
            "current-context": "skiff",
        });
        write_private(out, &serde_yaml::to_string(&config)?)
    }

    /// rustls server config: our serving cert; client certs are optional (a request may
    /// authenticate with a bearer token instead) but must chain to our CA when presented.
    pub fn server_config(&self) -> Result<rustls::ServerConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let certs: Vec<CertificateDer<'static>> =
            CertificateDer::pem_file_iter(self.path("apiserver.crt"))?.collect::<Result<_, _>>()?;
        let key = PrivateKeyDer::from_pem_file(self.path("apiserver.key"))?;
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(self.path("ca.crt"))? {
            roots.add(c?)?;
        }
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            provider.clone(),
        )
        .allow_unauthenticated()
        .build()?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs, key)?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(config)
    }
}

fn dn(cn: &str, org: Option<&str>) -> DistinguishedName {
    let mut d = DistinguishedName::new();
    d.push(DnType::CommonName, cn);
    if let Some(o) = org {
        d.push(DnType::OrganizationName, o);
    }
    d
}

fn write_private(path: &Path, contents: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(contents.as_bytes())?;
    Ok(())
}

/// The user a verified client certificate names: CN is the user, O entries the groups.
pub fn user_from_cert(der: &[u8]) -> Option<UserInfo> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let subject = cert.subject();
    let name = subject
        .iter_common_name()
        .next()?
        .as_str()
        .ok()?
        .to_string();
    let groups = subject
        .iter_organization()
        .filter_map(|o| o.as_str().ok().map(str::to_string))
        .collect();
    Some(UserInfo { name, groups })
}

/// Static bearer tokens, in kube-apiserver's --token-auth-file CSV format:
/// token,user,uid,"group1,group2".
#[derive(Default, Clone)]
pub struct TokenFile(Vec<(String, UserInfo)>);

impl TokenFile {
    pub fn load(path: &Path) -> Result<TokenFile> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading token file {}", path.display()))?;
        let mut out = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut cols = line.splitn(4, ',');
            let (Some(token), Some(user)) = (cols.next(), cols.next()) else {
                anyhow::bail!(
                    "{}:{}: expected token,user,uid[,groups]",
                    path.display(),
                    i + 1
                );
            };
            let _uid = cols.next();
            let groups = cols
                .next()
                .map(|g| {
                    g.trim_matches('"')
                        .split(',')
                        .filter(|s| !s.is_empty())
                        .map(str::to_string)
                        .collect()
                })
                .unwrap_or_default();
            out.push((
                token.to_string(),
                UserInfo {
                    name: user.to_string(),
                    groups,
                },
            ));
        }
        Ok(TokenFile(out))
    }

    pub fn lookup(&self, token: &str) -> Option<&UserInfo> {
        self.0.iter().find(|(t, _)| t == token).map(|(_, u)| u)
    }
}

/// Serves `app` over HTTPS on `listener`, passing the client certificate's identity to
/// every request as an extension. Runs until the task is dropped.
pub async fn serve(
    listener: tokio::net::TcpListener,
    config: rustls::ServerConfig,
    app: axum::Router,
) -> Result<()> {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use hyper_util::service::TowerToHyperService;
    use tower::ServiceExt;

    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    loop {
        let (tcp, peer): (tokio::net::TcpStream, SocketAddr) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let acceptor = acceptor.clone();
        let app = app.clone();
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(
                std::time::Duration::from_secs(10),
                acceptor.accept(tcp),
            )
            .await
            {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, "TLS handshake failed: {e}");
                    return;
                }
                Err(_) => return,
            };
            let identity = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(|c| user_from_cert(c.as_ref()));
            let svc = app.map_request(move |mut req: hyper::Request<hyper::body::Incoming>| {
                req.extensions_mut().insert(CertIdentity(identity.clone()));
                req
            });
            let svc = TowerToHyperService::new(svc);
            if let Err(e) = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection_with_upgrades(TokioIo::new(tls), svc)
                .await
            {
                tracing::debug!(%peer, "connection ended: {e}");
            }
        });
    }
}

/// The identity from the TLS layer (None without a client certificate).
#[derive(Clone, Debug)]
pub struct CertIdentity(pub Option<UserInfo>);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pki_is_created_once_and_names_the_admin() {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::ensure(dir.path(), &["127.0.0.1".into()]).unwrap();
        let ca1 = std::fs::read(pki.ca_cert_path()).unwrap();
        let pki = Pki::ensure(dir.path(), &["127.0.0.1".into()]).unwrap();
        assert_eq!(ca1, std::fs::read(pki.ca_cert_path()).unwrap());
        let der = CertificateDer::from_pem_file(dir.path().join("admin.crt")).unwrap();
        let user = user_from_cert(der.as_ref()).unwrap();
        assert_eq!(user.name, "skiff-admin");
        assert_eq!(user.groups, vec!["system:masters".to_string()]);
        pki.server_config().unwrap();
        let kc = dir.path().join("kubeconfig");
        pki.write_kubeconfig("admin", "https://127.0.0.1:6443", &kc)
            .unwrap();
        assert!(
            std::fs::read_to_string(kc)
                .unwrap()
                .contains("client-key-data")
        );
    }

    #[test]
    fn token_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("tokens.csv");
        std::fs::write(&p, "abc,alice,1,\"dev,ops\"\n# comment\nxyz,bob,2\n").unwrap();
        let t = TokenFile::load(&p).unwrap();
        assert_eq!(t.lookup("abc").unwrap().groups, vec!["dev", "ops"]);
        assert_eq!(t.lookup("xyz").unwrap().name, "bob");
        assert!(t.lookup("nope").is_none());
    }
}
