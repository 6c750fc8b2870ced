//! Registry credentials for image pulls (imagePullSecrets), as the kubelet's
//! credentialprovider keyring does it.
//!
//! Where the data comes from: the pod's `spec.imagePullSecrets` and, after them, the
//! `imagePullSecrets` of its ServiceAccount (Kubernetes copies those into the pod at
//! admission; reading them here as well gives the same result for pods made without
//! that admission step). Each Secret is of type `kubernetes.io/dockerconfigjson`
//! (`.dockerconfigjson`: `{"auths": {"<registry>": {...}}}`) or `kubernetes.io/dockercfg`
//! (`.dockercfg`: `{"<registry>": {...}}`); an entry has `username`/`password` or `auth`
//! (base64 of `user:password`).
//! What it decides: the entries whose key matches the image (host with port, `*` globs
//! per DNS label, the key's path a prefix of the repository; `docker.io`,
//! `index.docker.io`, `registry-1.docker.io` and `https://index.docker.io/v1/` are one
//! registry), most specific key first. The pod worker tries them in that order and pulls
//! anonymously only when none matches.

use std::collections::BTreeMap;

use base64::Engine;
use k8s_openapi::api::core::v1::{Pod, Secret, ServiceAccount};
use kube::{Api, Client};

/// One registry login from a pull secret.
#[derive(Clone, PartialEq, Eq)]
pub struct Credential {
    /// The key of the entry (`host[:port][/path]`, maybe with a scheme).
    pub key: String,
    pub username: String,
    pub password: String,
    /// The Secret it came from.
    pub secret: String,
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credential")
            .field("key", &self.key)
            .field("username", &self.username)
            .field("secret", &self.secret)
            .finish_non_exhaustive()
    }
}

impl Credential {
    pub fn registry_auth(&self) -> oci_client::secrets::RegistryAuth {
        oci_client::secrets::RegistryAuth::Basic(self.username.clone(), self.password.clone())
    }
}

const DOCKER_HUB: &str = "index.docker.io";

fn hub_alias(host: &str) -> &str {
    match host {
        "docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => DOCKER_HUB,
        h => h,
    }
}

/// `(host[:port], path)` of a keyring key: the scheme is dropped, Docker Hub's names are
/// one, the path loses its slashes at both ends (`https://index.docker.io/v1/` is the Hub
/// itself, `v1` is no repository).
pub fn parse_key(key: &str) -> (String, String) {
    let rest = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    let host = hub_alias(&host.to_ascii_lowercase()).to_string();
    let mut path = path.trim_matches('/').to_string();
    if host == DOCKER_HUB && (path == "v1" || path == "v2") {
        path.clear();
    }
    (host, path)
}

/// `(host[:port], repository)` of an image reference (`busybox` is
/// `index.docker.io`, `library/busybox`).
pub fn parse_image(image: &str) -> (String, String) {
    let without_digest = image.split('@').next().unwrap_or(image);
    let (first, rest) = match without_digest.split_once('/') {
        Some((f, r)) if f.contains('.') || f.contains(':') || f == "localhost" => {
            (f.to_ascii_lowercase(), r.to_string())
        }
        _ => {
            let r = if without_digest.contains('/') {
                without_digest.to_string()
            } else {
                format!("library/{without_digest}")
            };
            (DOCKER_HUB.to_string(), r)
        }
    };
    // The tag is after the last ':' of the last path component.
    let repo = match rest.rsplit_once(':') {
        Some((r, tag)) if !tag.contains('/') => r.to_string(),
        _ => rest,
    };
    (hub_alias(&first).to_string(), repo)
}

/// Glob match of one DNS label (`*` any run of characters, `?` one character).
fn glob(pattern: &str, s: &str) -> bool {
    let (p, s): (Vec<char>, Vec<char>) = (pattern.chars().collect(), s.chars().collect());
    let (mut pi, mut si, mut star, mut mark) = (0, 0, None, 0);
    while si < s.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == s[si]) {
            pi += 1;
            si += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = si;
            pi += 1;
        } else if let Some(st) = star {
            pi = st + 1;
            mark += 1;
            si = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

/// Whether keyring key `key` applies to `image`: same number of host labels each
/// matching (globs allowed), same port, the key's path a prefix of the repository (at a
/// `/` boundary).
pub fn key_matches(key: &str, image: &str) -> bool {
    let (kh, kp) = parse_key(key);
    let (ih, ip) = parse_image(image);
    let split_port = |h: &str| -> (String, String) {
        match h.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), p.to_string()),
            None => (h.to_string(), String::new()),
        }
    };
    let ((kh, kport), (ih, iport)) = (split_port(&kh), split_port(&ih));
    if kport != iport {
        return false;
    }
    let (kl, il): (Vec<&str>, Vec<&str>) = (kh.split('.').collect(), ih.split('.').collect());
    if kl.len() != il.len() || !kl.iter().zip(&il).all(|(k, i)| glob(k, i)) {
        return false;
    }
    kp.is_empty() || ip == kp || ip.starts_with(&format!("{kp}/"))
}

/// The logins of a pull secret (`type_` and its data). Other types are an error, as
/// are malformed documents.
pub fn parse_secret(
    name: &str,
    type_: &str,
    data: &BTreeMap<String, Vec<u8>>,
) -> Result<Vec<Credential>, String> {
    let (doc, nested) = match type_ {
        "kubernetes.io/dockerconfigjson" => (data.get(".dockerconfigjson"), true),
        "kubernetes.io/dockercfg" => (data.get(".dockercfg"), false),
        t => {
            return Err(format!(
                "secret {name:?} has type {t:?}, not a docker config"
            ));
        }
    };
    let doc = doc.ok_or_else(|| format!("secret {name:?} has no docker config key"))?;
    let v: serde_json::Value =
        serde_json::from_slice(doc).map_err(|e| format!("secret {name:?}: {e}"))?;
    let auths = if nested { &v["auths"] } else { &v };
    let Some(map) = auths.as_object() else {
        return Err(format!("secret {name:?}: no registry entries"));
    };
    let mut out = vec![];
    for (key, e) in map {
        if !e.is_object() {
            return Err(format!(
                "secret {name:?}: the entry of {key:?} is no object"
            ));
        }
        let field = |k: &str| e[k].as_str().unwrap_or_default().to_string();
        let (mut user, mut pass) = (field("username"), field("password"));
        if let Some(a) = e["auth"].as_str().filter(|a| !a.is_empty()) {
            let raw = base64::engine::general_purpose::STANDARD
                .decode(a.trim())
                .map_err(|e| format!("secret {name:?}: auth of {key:?}: {e}"))?;
            let s = String::from_utf8_lossy(&raw).into_owned();
            let (u, p) = s
                .split_once(':')
                .ok_or_else(|| format!("secret {name:?}: auth of {key:?} is not user:password"))?;
            (user, pass) = (u.to_string(), p.to_string());
        }
        out.push(Credential {
            key: key.clone(),
            username: user,
            password: pass,
            secret: name.to_string(),
        });
    }
    Ok(out)
}

/// The credentials of `keyring` for `image`, most specific key first (stable for equal
/// lengths, so the pod's secrets come before the ServiceAccount's).
pub fn lookup(keyring: &[Credential], image: &str) -> Vec<Credential> {
    let mut m: Vec<Credential> = keyring
        .iter()
        .filter(|c| key_matches(&c.key, image))
        .cloned()
        .collect();
    m.sort_by_key(|c| {
        let (h, p) = parse_key(&c.key);
        std::cmp::Reverse(h.len() + p.len())
    });
    m
}

/// The keyring of `pod`: its imagePullSecrets, then its ServiceAccount's. Returns the
/// names of the secrets that could not be read or parsed as the second value.
pub async fn pod_keyring(client: &Client, pod: &Pod) -> (Vec<Credential>, Vec<String>) {
    let ns = pod
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let spec = pod.spec.clone().unwrap_or_default();
    let mut names: Vec<String> = spec
        .image_pull_secrets
        .iter()
        .flatten()
        .map(|r| r.name.clone())
        .filter(|n| !n.is_empty())
        .collect();
    let sa = spec
        .service_account_name
        .clone()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "default".into());
    if let Ok(Some(sa)) = Api::<ServiceAccount>::namespaced(client.clone(), &ns)
        .get_opt(&sa)
        .await
    {
        for r in sa.image_pull_secrets.iter().flatten() {
            if !r.name.is_empty() && !names.contains(&r.name) {
                names.push(r.name.clone());
            }
        }
    }
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let (mut ring, mut missing) = (vec![], vec![]);
    for n in names {
        let got = secrets.get_opt(&n).await;
        let parsed = match got {
            Ok(Some(s)) => {
                let mut data: BTreeMap<String, Vec<u8>> = s
                    .data
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, v)| (k, v.0))
                    .collect();
                for (k, v) in s.string_data.unwrap_or_default() {
                    data.insert(k, v.into_bytes());
                }
                parse_secret(&n, s.type_.as_deref().unwrap_or("Opaque"), &data)
            }
            Ok(None) => Err(format!("secret {n:?} not found")),
            Err(e) => Err(e.to_string()),
        };
        match parsed {
            Ok(c) => ring.extend(c),
            Err(e) => {
                tracing::warn!(pod = ?pod.metadata.name, "image pull secret: {e}");
                missing.push(n);
            }
        }
    }
    (ring, missing)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(k: &str, v: &str) -> BTreeMap<String, Vec<u8>> {
        BTreeMap::from([(k.to_string(), v.as_bytes().to_vec())])
    }

    #[test]
    fn keys_and_images() {
        assert_eq!(
            parse_key("https://index.docker.io/v1/"),
            ("index.docker.io".into(), "".into())
        );
        assert_eq!(
            parse_key("docker.io"),
            ("index.docker.io".into(), "".into())
        );
        assert_eq!(
            parse_key("http://127.0.0.1:5000/team/"),
            ("127.0.0.1:5000".into(), "team".into())
        );
        assert_eq!(
            parse_image("busybox"),
            ("index.docker.io".into(), "library/busybox".into())
        );
        assert_eq!(
            parse_image("me/app:1"),
            ("index.docker.io".into(), "me/app".into())
        );
        assert_eq!(
            parse_image("127.0.0.1:5000/skiff/busybox:1.0"),
            ("127.0.0.1:5000".into(), "skiff/busybox".into())
        );
        assert_eq!(
            parse_image("localhost/x@sha256:abcd"),
            ("localhost".into(), "x".into())
        );
    }

    #[test]
    fn host_matching() {
        let img = "127.0.0.1:5000/skiff/busybox:1.0";
        assert!(key_matches("127.0.0.1:5000", img));
        assert!(key_matches("http://127.0.0.1:5000", img));
        assert!(key_matches("127.0.0.1:5000/skiff", img));
        assert!(key_matches("127.0.0.1:5000/skiff/busybox", img));
        assert!(!key_matches("127.0.0.1:5000/skif", img));
        assert!(!key_matches("127.0.0.1:5001", img));
        assert!(!key_matches("127.0.0.1", img));
        assert!(!key_matches("127.0.0.2:5000", img));
        assert!(key_matches("*.example.com", "reg.example.com/a/b:1"));
        assert!(!key_matches("*.example.com", "a.reg.example.com/a/b:1"));
        assert!(!key_matches("*.example.com", "example.com/a/b:1"));
        assert!(key_matches("https://index.docker.io/v1/", "busybox"));
        assert!(key_matches("docker.io", "docker.io/library/busybox:1"));
        assert!(!key_matches("quay.io", "busybox"));
        assert!(glob("reg-*", "reg-1") && glob("r?g", "reg") && !glob("r?g", "rg"));
    }

    #[test]
    fn secrets_and_lookup_order() {
        let json = r#"{"auths": {"127.0.0.1:5000": {"username": "alice", "password": "pw"},
            "127.0.0.1:5000/private": {"auth": "Ym9iOnNlY3JldDpwYXJ0"},
            "quay.io": {"username": "q", "password": "q"}}}"#;
        let ring = parse_secret(
            "regcred",
            "kubernetes.io/dockerconfigjson",
            &data(".dockerconfigjson", json),
        )
        .unwrap();
        assert_eq!(ring.len(), 3);
        let bob = ring.iter().find(|c| c.username == "bob").unwrap();
        assert_eq!(bob.password, "secret:part");
        let m = lookup(&ring, "127.0.0.1:5000/private/app:1");
        assert_eq!(
            m.iter().map(|c| c.username.as_str()).collect::<Vec<_>>(),
            ["bob", "alice"]
        );
        let m = lookup(&ring, "127.0.0.1:5000/public/app:1");
        assert_eq!(m.len(), 1);
        assert_eq!(m[0].username, "alice");
        assert!(lookup(&ring, "busybox").is_empty());
        // The legacy format: registries at the top level.
        let old = parse_secret(
            "old",
            "kubernetes.io/dockercfg",
            &data(
                ".dockercfg",
                r#"{"https://index.docker.io/v1/": {"auth": "dTpw"}}"#,
            ),
        )
        .unwrap();
        assert_eq!(
            (old[0].username.as_str(), old[0].password.as_str()),
            ("u", "p")
        );
        assert_eq!(lookup(&old, "nginx:1.27").len(), 1);
        // Errors.
        assert!(parse_secret("x", "Opaque", &data("a", "b")).is_err());
        assert!(
            parse_secret(
                "x",
                "kubernetes.io/dockerconfigjson",
                &data(".dockerconfigjson", "{")
            )
            .is_err()
        );
        assert!(parse_secret("x", "kubernetes.io/dockerconfigjson", &BTreeMap::new()).is_err());
        // The password is not printed.
        assert!(!format!("{:?}", ring[0]).contains("pw\""));
    }
}
