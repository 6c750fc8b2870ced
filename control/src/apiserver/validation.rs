//! Decoding and validation of request bodies. Decoding goes through the k8s-openapi type
//! (wrong types and missing required fields are found there, with their path); the rules
//! Kubernetes adds on top (name formats, selectors matching templates, port ranges) are
//! here. Every problem becomes a Cause naming the field.

use serde_json::{Map, Value};

use super::resources::Resource;
use super::status::{ApiError, Cause};

/// How unknown fields are treated (`?fieldValidation=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldValidation {
    Ignore,
    Warn,
    Strict,
}

impl FieldValidation {
    pub fn parse(s: Option<&str>) -> Result<Self, ApiError> {
        match s {
            None | Some("") | Some("Warn") => Ok(Self::Warn),
            Some("Ignore") => Ok(Self::Ignore),
            Some("Strict") => Ok(Self::Strict),
            Some(other) => Err(ApiError::bad_request(format!(
                "fieldValidation parameter unsupported: {other:?}; supported values: \"Ignore\", \"Warn\", \"Strict\""
            ))),
        }
    }
}

/// Result of decoding: the normalised object and the unknown fields it had.
pub struct Decoded {
    pub object: Value,
    pub unknown_fields: Vec<String>,
}

/// Checks apiVersion/kind against the endpoint and decodes through the typed struct.
pub fn decode(r: &Resource, body: Value, name_hint: &str) -> Result<Decoded, ApiError> {
    let Value::Object(mut map) = body else {
        return Err(ApiError::bad_request(format!(
            "the body of the request was in an unknown format: expected a JSON object for {}",
            r.kind
        )));
    };
    for field in ["apiVersion", "kind"] {
        if map
            .get(field)
            .is_some_and(|v| !v.is_string() && !v.is_null())
        {
            return Err(ApiError::bad_request(format!(
                "{field} must be a string, got {}",
                map[field]
            )));
        }
    }
    let expected = r.api_version();
    match map.get("apiVersion").and_then(Value::as_str) {
        None | Some("") => {
            map.insert("apiVersion".into(), Value::String(expected.clone()));
        }
        Some(v) if v == expected => {}
        Some(v) => {
            return Err(ApiError::bad_request(format!(
                "the API version in the data ({v}) does not match the expected API version ({expected})"
            )));
        }
    }
    match map.get("kind").and_then(Value::as_str) {
        None | Some("") => {
            map.insert("kind".into(), Value::String(r.kind.into()));
        }
        Some(k) if k == r.kind => {}
        Some(k) => {
            return Err(ApiError::bad_request(format!(
                "the kind in the data ({k}) does not match the expected kind ({}) for {}",
                r.kind,
                r.group_resource()
            )));
        }
    }
    if !map.contains_key("metadata") {
        map.insert("metadata".into(), Value::Object(Map::new()));
    }
    let body = Value::Object(map);
    let object = (r.ops.round_trip)(&body).map_err(|e| {
        if let Some(field) = e
            .message
            .strip_prefix("missing field `")
            .and_then(|m| m.split('`').next())
        {
            let path = if e.path == "." {
                field.to_string()
            } else {
                format!("{}.{field}", e.path)
            };
            return ApiError::invalid(r, name_hint, vec![Cause::required(path)]);
        }
        ApiError::bad_request(format!(
            "{} in version {:?} cannot be handled as a {}: {}: {}",
            r.kind, r.version, r.kind, e.path, e.message
        ))
    })?;
    let mut unknown_fields = Vec::new();
    find_unknown(&body, &object, "", &mut unknown_fields);
    Ok(Decoded {
        object,
        unknown_fields,
    })
}

/// Paths present (and non-null) in `input` that the typed round trip dropped.
fn find_unknown(input: &Value, known: &Value, path: &str, out: &mut Vec<String>) {
    match (input, known) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in a {
                let p = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                match b.get(k) {
                    Some(kv) => find_unknown(v, kv, &p, out),
                    None if !v.is_null() && !is_empty_container(v) => out.push(p),
                    None => {}
                }
            }
        }
        (Value::Array(a), Value::Array(b)) => {
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                find_unknown(x, y, &format!("{path}[{i}]"), out);
            }
        }
        _ => {}
    }
}

fn is_empty_container(v: &Value) -> bool {
    matches!(v, Value::Object(m) if m.is_empty()) || matches!(v, Value::Array(a) if a.is_empty())
}

/// The first key that appears twice in one JSON object of `body` (as a dotted path), for
/// `fieldValidation=Strict`: serde keeps the last value silently, Kubernetes rejects it.
pub fn duplicate_json_field(body: &[u8]) -> Option<String> {
    use serde::de::{DeserializeSeed, MapAccess, SeqAccess, Visitor};
    use std::cell::RefCell;
    use std::rc::Rc;

    struct Dup {
        path: String,
        found: Rc<RefCell<Option<String>>>,
    }
    impl Dup {
        fn child(&self, path: String) -> Dup {
            Dup {
                path,
                found: self.found.clone(),
            }
        }
    }
    impl<'de> DeserializeSeed<'de> for Dup {
        type Value = ();
        fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
            d.deserialize_any(self)
        }
    }
    impl<'de> Visitor<'de> for Dup {
        type Value = ();
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("any JSON value")
        }
        fn visit_bool<E>(self, _: bool) -> Result<(), E> {
            Ok(())
        }
        fn visit_i64<E>(self, _: i64) -> Result<(), E> {
            Ok(())
        }
        fn visit_u64<E>(self, _: u64) -> Result<(), E> {
            Ok(())
        }
        fn visit_f64<E>(self, _: f64) -> Result<(), E> {
            Ok(())
        }
        fn visit_str<E>(self, _: &str) -> Result<(), E> {
            Ok(())
        }
        fn visit_unit<E>(self) -> Result<(), E> {
            Ok(())
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
            let mut i = 0;
            while seq
                .next_element_seed(self.child(format!("{}[{i}]", self.path)))?
                .is_some()
            {
                i += 1;
            }
            Ok(())
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
            let mut seen = std::collections::HashSet::new();
            while let Some(k) = map.next_key::<String>()? {
                let p = if self.path.is_empty() {
                    k.clone()
                } else {
                    format!("{}.{k}", self.path)
                };
                if !seen.insert(k) && self.found.borrow().is_none() {
                    *self.found.borrow_mut() = Some(p.clone());
                }
                map.next_value_seed(self.child(p))?;
            }
            Ok(())
        }
    }
    let found = Rc::new(RefCell::new(None));
    let mut de = serde_json::Deserializer::from_slice(body);
    Dup {
        path: String::new(),
        found: found.clone(),
    }
    .deserialize(&mut de)
    .ok()?;
    found.take()
}

const DNS1123_LABEL_MSG: &str = "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')";
const DNS1123_SUBDOMAIN_MSG: &str = "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')";
const DNS1035_LABEL_MSG: &str = "a DNS-1035 label must consist of lower case alphanumeric characters or '-', start with an alphabetic character, and end with an alphanumeric character (e.g. 'my-name',  or 'abc-123', regex used for validation is '[a-z]([-a-z0-9]*[a-z0-9])?')";

pub fn is_dns1123_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// Kubernetes' IsDNS1123Subdomain: the regex bounds the whole name (253), not each
/// dot-separated part.
pub fn is_dns1123_subdomain(s: &str) -> bool {
    let part_ok = |p: &str| {
        !p.is_empty()
            && p.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !p.starts_with('-')
            && !p.ends_with('-')
    };
    !s.is_empty() && s.len() <= 253 && s.split('.').all(part_ok)
}

fn is_dns1035_label(s: &str) -> bool {
    is_dns1123_label(s) && s.as_bytes()[0].is_ascii_lowercase()
}

/// Label values and the name part of label keys: [A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?, max 63.
fn is_qualified_part(s: &str, allow_empty: bool) -> bool {
    if s.is_empty() {
        return allow_empty;
    }
    let b = s.as_bytes();
    s.len() <= 63
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
}

fn is_label_key(k: &str) -> bool {
    match k.split_once('/') {
        Some((prefix, name)) => is_dns1123_subdomain(prefix) && is_qualified_part(name, false),
        None => is_qualified_part(k, false),
    }
}

/// Which name rule a kind's metadata.name follows.
fn name_rule(r: &Resource) -> (fn(&str) -> bool, &'static str) {
    match r.kind {
        "Namespace" => (is_dns1123_label, DNS1123_LABEL_MSG),
        "Service" => (is_dns1035_label, DNS1035_LABEL_MSG),
        _ => (is_dns1123_subdomain, DNS1123_SUBDOMAIN_MSG),
    }
}

/// Checks a name before it is used in a key (also for get/delete paths).
pub fn check_path_name(r: &Resource, name: &str) -> Result<(), ApiError> {
    if name.is_empty() || name.contains('/') || name == "." || name == ".." || name.contains('%') {
        return Err(ApiError::bad_request(format!(
            "invalid resource name {name:?}: may not be empty or contain '/' or '%'"
        )));
    }
    let _ = r;
    Ok(())
}

/// Validates a decoded object. `old` is the stored object on update.
pub fn validate(r: &Resource, obj: &Value, old: Option<&Value>) -> Vec<Cause> {
    let mut causes = Vec::new();
    let meta = &obj["metadata"];
    let name = meta["name"].as_str().unwrap_or("");
    let (ok, msg) = name_rule(r);
    if name.is_empty() {
        causes.push(Cause {
            reason: "FieldValueRequired",
            field: "metadata.name".into(),
            message: "Required value: name or generateName is required".into(),
        });
    } else if !ok(name) {
        causes.push(Cause::invalid("metadata.name", &meta["name"], msg));
    }
    if let Some(ns) = meta["namespace"].as_str()
        && r.namespaced
        && !is_dns1123_label(ns)
    {
        causes.push(Cause::invalid(
            "metadata.namespace",
            &meta["namespace"],
            DNS1123_LABEL_MSG,
        ));
    }
    validate_labels(&meta["labels"], "metadata.labels", &mut causes);
    if let Some(old) = old {
        let (old_uid, new_uid) = (&old["metadata"]["uid"], &meta["uid"]);
        if !new_uid.is_null() && new_uid != old_uid {
            causes.push(Cause::invalid(
                "metadata.uid",
                new_uid,
                "field is immutable",
            ));
        }
    }
    match r.kind {
        "Pod" => validate_pod_spec(&obj["spec"], "spec", &mut causes),
        "Deployment" | "ReplicaSet" | "DaemonSet" => validate_workload(r, obj, &mut causes),
        "Service" => validate_service(obj, old, &mut causes),
        "ConfigMap" | "Secret" => {
            // Kubernetes caps the summed size of keys and values at 1 MiB.
            const MAX_DATA: usize = 1024 * 1024;
            let size: usize = ["data", "binaryData", "stringData"]
                .iter()
                .filter_map(|f| obj[*f].as_object())
                .flatten()
                .map(|(k, v)| k.len() + v.as_str().map_or(0, str::len))
                .sum();
            if size > MAX_DATA {
                causes.push(Cause {
                    reason: "FieldValueTooLong",
                    field: "data".into(),
                    message: format!("Too long: must have at most {MAX_DATA} bytes"),
                });
            }
            for field in ["data", "binaryData", "stringData"] {
                if let Some(m) = obj[field].as_object() {
                    for k in m.keys() {
                        let good = !k.is_empty()
                            && k.len() <= 253
                            && k.bytes().all(|b| {
                                b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.')
                            });
                        if !good {
                            causes.push(Cause::invalid(
                                format!("{field}[{k}]"),
                                &Value::String(k.clone()),
                                "a valid config key must consist of alphanumeric characters, '-', '_' or '.' (e.g. 'key.name',  or 'KEY_NAME',  or 'key-name', regex used for validation is '[-._a-zA-Z0-9]+')",
                            ));
                        }
                    }
                }
            }
        }
        _ => {}
    }
    causes
}

fn validate_labels(labels: &Value, field: &str, causes: &mut Vec<Cause>) {
    let Some(m) = labels.as_object() else { return };
    for (k, v) in m {
        if !is_label_key(k) {
            causes.push(Cause::invalid(
                field,
                &Value::String(k.clone()),
                "name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character",
            ));
        }
        if !is_qualified_part(v.as_str().unwrap_or(""), true) {
            causes.push(Cause::invalid(
                field.to_string(),
                v,
                "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character",
            ));
        }
    }
}

fn validate_port(v: &Value, field: String, causes: &mut Vec<Cause>) {
    if let Some(p) = v.as_i64()
        && !(1..=65535).contains(&p)
    {
        causes.push(Cause::invalid(
            field,
            v,
            "must be between 1 and 65535, inclusive",
        ));
    }
}

fn validate_pod_spec(spec: &Value, path: &str, causes: &mut Vec<Cause>) {
    let containers = spec["containers"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or(&[]);
    if containers.is_empty() {
        causes.push(Cause::required(format!("{path}.containers")));
    }
    let mut names = std::collections::HashSet::new();
    for (list, items) in [
        (
            "initContainers",
            spec["initContainers"]
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or(&[]),
        ),
        ("containers", containers),
    ] {
        for (i, c) in items.iter().enumerate() {
            let p = format!("{path}.{list}[{i}]");
            let name = c["name"].as_str().unwrap_or("");
            if name.is_empty() {
                causes.push(Cause::required(format!("{p}.name")));
            } else if !is_dns1123_label(name) {
                causes.push(Cause::invalid(
                    format!("{p}.name"),
                    &c["name"],
                    DNS1123_LABEL_MSG,
                ));
            } else if !names.insert(name.to_string()) {
                causes.push(Cause::duplicate(format!("{p}.name"), &c["name"]));
            }
            if c["image"].as_str().unwrap_or("").trim().is_empty() {
                causes.push(Cause::required(format!("{p}.image")));
            }
            if let Some(ports) = c["ports"].as_array() {
                for (j, port) in ports.iter().enumerate() {
                    validate_port(
                        &port["containerPort"],
                        format!("{p}.ports[{j}].containerPort"),
                        causes,
                    );
                    if let Some(proto) = port["protocol"].as_str()
                        && !["TCP", "UDP", "SCTP"].contains(&proto)
                    {
                        causes.push(Cause::not_supported(
                            format!("{p}.ports[{j}].protocol"),
                            proto,
                            &["SCTP", "TCP", "UDP"],
                        ));
                    }
                }
            }
            if let Some(policy) = c["imagePullPolicy"].as_str()
                && !["Always", "IfNotPresent", "Never"].contains(&policy)
            {
                causes.push(Cause::not_supported(
                    format!("{p}.imagePullPolicy"),
                    policy,
                    &["Always", "IfNotPresent", "Never"],
                ));
            }
        }
    }
    if let Some(policy) = spec["restartPolicy"].as_str()
        && !["Always", "OnFailure", "Never"].contains(&policy)
    {
        causes.push(Cause::not_supported(
            format!("{path}.restartPolicy"),
            policy,
            &["Always", "OnFailure", "Never"],
        ));
    }
    if let Some(tols) = spec["tolerations"].as_array() {
        for (i, t) in tols.iter().enumerate() {
            if let Some(op) = t["operator"].as_str()
                && !["Exists", "Equal"].contains(&op)
            {
                causes.push(Cause::not_supported(
                    format!("{path}.tolerations[{i}].operator"),
                    op,
                    &["Equal", "Exists"],
                ));
            }
            if t["operator"].as_str() == Some("Exists")
                && !t["value"].as_str().unwrap_or("").is_empty()
            {
                causes.push(Cause::invalid(
                    format!("{path}.tolerations[{i}].operator"),
                    &t["operator"],
                    "value must be empty when `operator` is 'Exists'",
                ));
            }
        }
    }
    let mut vol_names = std::collections::HashSet::new();
    for (i, v) in spec["volumes"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or(&[])
        .iter()
        .enumerate()
    {
        let name = v["name"].as_str().unwrap_or("");
        if !vol_names.insert(name.to_string()) {
            causes.push(Cause::duplicate(
                format!("{path}.volumes[{i}].name"),
                &v["name"],
            ));
        }
    }
}

/// Label selector requirements as LabelSelector (matchLabels + matchExpressions) checks them.
pub fn selector_matches(selector: &Value, labels: &Value) -> bool {
    let get = |k: &str| labels.get(k).and_then(Value::as_str);
    let labels_ok = selector["matchLabels"]
        .as_object()
        .is_none_or(|m| m.iter().all(|(k, v)| get(k) == v.as_str()));
    let exprs_ok = selector["matchExpressions"].as_array().is_none_or(|exprs| {
        exprs.iter().all(|e| {
            let key = e["key"].as_str().unwrap_or("");
            let values: Vec<&str> = e["values"]
                .as_array()
                .map(|a| a.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            match e["operator"].as_str().unwrap_or("") {
                "In" => get(key).is_some_and(|v| values.contains(&v)),
                "NotIn" => get(key).is_none_or(|v| !values.contains(&v)),
                "Exists" => get(key).is_some(),
                "DoesNotExist" => get(key).is_none(),
                _ => false,
            }
        })
    });
    labels_ok && exprs_ok
}

fn validate_workload(r: &Resource, obj: &Value, causes: &mut Vec<Cause>) {
    let spec = &obj["spec"];
    let selector = &spec["selector"];
    let empty = selector["matchLabels"]
        .as_object()
        .is_none_or(Map::is_empty)
        && selector["matchExpressions"]
            .as_array()
            .is_none_or(Vec::is_empty);
    if empty {
        causes.push(Cause::required("spec.selector"));
    }
    if let Some(exprs) = selector["matchExpressions"].as_array() {
        for (i, e) in exprs.iter().enumerate() {
            let op = e["operator"].as_str().unwrap_or("");
            if !["In", "NotIn", "Exists", "DoesNotExist"].contains(&op) {
                causes.push(Cause::not_supported(
                    format!("spec.selector.matchExpressions[{i}].operator"),
                    op,
                    &["DoesNotExist", "Exists", "In", "NotIn"],
                ));
            }
        }
    }
    validate_labels(
        &selector["matchLabels"],
        "spec.selector.matchLabels",
        causes,
    );
    let tmpl_labels = &spec["template"]["metadata"]["labels"];
    validate_labels(tmpl_labels, "spec.template.metadata.labels", causes);
    if !empty && !selector_matches(selector, tmpl_labels) {
        causes.push(Cause::invalid(
            "spec.template.metadata.labels",
            tmpl_labels,
            "`selector` does not match template `labels`",
        ));
    }
    if let Some(n) = spec["replicas"].as_i64()
        && n < 0
    {
        causes.push(Cause::invalid(
            "spec.replicas",
            &spec["replicas"],
            "must be greater than or equal to 0",
        ));
    }
    if r.kind == "Deployment"
        && let Some(t) = spec["strategy"]["type"].as_str()
    {
        if !["RollingUpdate", "Recreate"].contains(&t) {
            causes.push(Cause::not_supported(
                "spec.strategy.type",
                t,
                &["Recreate", "RollingUpdate"],
            ));
        } else if t == "Recreate" && !spec["strategy"]["rollingUpdate"].is_null() {
            causes.push(Cause::forbidden(
                "spec.strategy.rollingUpdate",
                "may not be specified when strategy `type` is 'Recreate'",
            ));
        }
    }
    validate_pod_spec(&spec["template"]["spec"], "spec.template.spec", causes);
}

fn validate_service(obj: &Value, old: Option<&Value>, causes: &mut Vec<Cause>) {
    let spec = &obj["spec"];
    let ty = spec["type"].as_str().unwrap_or("ClusterIP");
    if !["ClusterIP", "NodePort", "LoadBalancer", "ExternalName"].contains(&ty) {
        causes.push(Cause::not_supported(
            "spec.type",
            ty,
            &["ClusterIP", "ExternalName", "LoadBalancer", "NodePort"],
        ));
    }
    let ports = spec["ports"].as_array().map(Vec::as_slice).unwrap_or(&[]);
    let headless = spec["clusterIP"].as_str() == Some("None");
    if ports.is_empty() && !headless && ty != "ExternalName" {
        causes.push(Cause::required("spec.ports"));
    }
    let mut names = std::collections::HashSet::new();
    for (i, p) in ports.iter().enumerate() {
        validate_port(&p["port"], format!("spec.ports[{i}].port"), causes);
        if p["port"].is_null() {
            causes.push(Cause::required(format!("spec.ports[{i}].port")));
        }
        if let Some(np) = p["nodePort"].as_i64()
            && np != 0
            && !(30000..=32767).contains(&np)
        {
            causes.push(Cause::invalid(
                format!("spec.ports[{i}].nodePort"),
                &p["nodePort"],
                "provided port is not in the valid range. The range of valid ports is 30000-32767",
            ));
        }
        if let Some(proto) = p["protocol"].as_str()
            && !["TCP", "UDP", "SCTP"].contains(&proto)
        {
            causes.push(Cause::not_supported(
                format!("spec.ports[{i}].protocol"),
                proto,
                &["SCTP", "TCP", "UDP"],
            ));
        }
        let name = p["name"].as_str().unwrap_or("");
        if ports.len() > 1 && name.is_empty() {
            causes.push(Cause::required(format!("spec.ports[{i}].name")));
        }
        if !name.is_empty() && !names.insert(name.to_string()) {
            causes.push(Cause::duplicate(
                format!("spec.ports[{i}].name"),
                &p["name"],
            ));
        }
    }
    if let Some(old) = old {
        let (o, n) = (&old["spec"]["clusterIP"], &spec["clusterIP"]);
        if !o.is_null() && !n.is_null() && o != n && old["spec"]["type"] != "ExternalName" {
            causes.push(Cause::invalid(
                "spec.clusterIPs[0]",
                n,
                "may not change once set",
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apiserver::resources::by_kind;
    use serde_json::json;

    #[test]
    fn duplicate_fields() {
        assert_eq!(
            duplicate_json_field(br#"{"a":1,"spec":{"r":1,"l":[{"x":1,"x":2}]}}"#),
            Some("spec.l[0].x".to_string())
        );
        assert_eq!(duplicate_json_field(br#"{"a":1,"b":{"a":2}}"#), None);
        assert_eq!(duplicate_json_field(b"not json"), None);
    }

    #[test]
    fn names() {
        assert!(is_dns1123_label("web-1"));
        assert!(!is_dns1123_label("Web"));
        assert!(!is_dns1123_label("-a"));
        assert!(is_dns1123_subdomain("a.b-c"));
        assert!(is_dns1123_subdomain(&"x".repeat(250)));
        assert!(!is_dns1123_subdomain(&"x".repeat(254)));
        assert!(!is_dns1123_subdomain("a..b"));
        assert!(is_dns1035_label("a1"));
        assert!(!is_dns1035_label("1a"));
        assert!(is_label_key("app.kubernetes.io/name"));
        assert!(!is_label_key("bad key"));
    }

    #[test]
    fn decode_reports_missing_and_unknown_fields() {
        let d = by_kind("apps/v1", "Deployment").unwrap();
        let body = json!({"apiVersion":"apps/v1","kind":"Deployment","metadata":{"name":"w"},
            "spec":{"selector":{"matchLabels":{"a":"b"}},"template":{"metadata":{"labels":{"a":"b"}},
            "spec":{"containers":[{"image":"x"}]}}}});
        // k8s-openapi defaults missing required strings, so validate() is what catches them.
        let decoded = decode(d, body, "w").unwrap();
        let causes = validate(d, &decoded.object, None);
        assert!(
            causes
                .iter()
                .any(|c| c.field == "spec.template.spec.containers[0].name"
                    && c.reason == "FieldValueRequired"),
            "{causes:?}"
        );

        let body = json!({"apiVersion":"apps/v1","kind":"Deployment","metadata":{"name":"w"},"spec":{"bogus":1,
            "selector":{"matchLabels":{"a":"b"}},"template":{"spec":{"containers":[{"name":"c","image":"x"}]}}}});
        let ok = decode(d, body, "w").unwrap();
        assert_eq!(ok.unknown_fields, vec!["spec.bogus".to_string()]);

        let body = json!({"apiVersion":"v1","kind":"Deployment","metadata":{"name":"w"}});
        assert_eq!(decode(d, body, "w").err().unwrap().code, 400);
        let body = json!({"apiVersion":"apps/v1","kind":"Deployment","metadata":{"name":"w"},"spec":{"replicas":"three","selector":{},"template":{}}});
        let err = decode(d, body, "w").err().unwrap();
        assert_eq!(err.code, 400);
        assert!(err.message.contains("spec.replicas"), "{}", err.message);
    }

    #[test]
    fn workload_rules() {
        let d = by_kind("apps/v1", "Deployment").unwrap();
        let obj = json!({"metadata":{"name":"Bad_Name"},"spec":{"selector":{"matchLabels":{"a":"b"}},
            "template":{"metadata":{"labels":{"a":"c"}},"spec":{"containers":[{"name":"c","image":""}]}}}});
        let fields: Vec<String> = validate(d, &obj, None)
            .into_iter()
            .map(|c| c.field)
            .collect();
        assert!(fields.contains(&"metadata.name".to_string()));
        assert!(fields.contains(&"spec.template.metadata.labels".to_string()));
        assert!(fields.contains(&"spec.template.spec.containers[0].image".to_string()));
    }

    #[test]
    fn service_rules() {
        let s = by_kind("v1", "Service").unwrap();
        let obj =
            json!({"metadata":{"name":"web"},"spec":{"ports":[{"port":70000,"protocol":"XTP"}]}});
        let fields: Vec<String> = validate(s, &obj, None)
            .into_iter()
            .map(|c| c.field)
            .collect();
        assert_eq!(fields, vec!["spec.ports[0].port", "spec.ports[0].protocol"]);
    }
}
