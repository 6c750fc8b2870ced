//! Kubernetes protobuf request bodies (`application/vnd.kubernetes.protobuf`), as
//! kubectl's typed clients (`kubectl create namespace|configmap|secret|deployment|...`)
//! and client-go controllers send them, decoded into the JSON object the JSON path
//! would have produced. Responses stay JSON, which client-go accepts.
//!
//! The wire format is the 4-byte magic `k8s\0` followed by a `runtime.Unknown`
//! envelope {typeMeta{apiVersion, kind}, raw, contentEncoding, contentType}; `raw` is
//! the typed message of Kubernetes' generated.proto files. Messages are decoded
//! dynamically (prost-reflect) against the descriptors in `k8s-v1.35.binpb`, so every
//! kind the protos define decodes without per-kind code. Proto field names are the
//! JSON names in Kubernetes' protos. The special types map as their JSON forms do:
//! Time and MicroTime to RFC 3339 (a zero Time is omitted, as JSON writes null),
//! Quantity to its string, IntOrString to an int or a string, Duration to Go's
//! duration string, RawExtension and FieldsV1 to the embedded JSON, bytes to base64.
//!
//! Go always writes non-pointer fields, so a decoded message has `""`, `0` and
//! `false` for every field the client left unset. Empty strings are omitted (as
//! `omitempty` does in JSON). Zero numbers and `false` are kept, because a pointer
//! field set to 0 or false (`replicas: 0`, `automountServiceAccountToken: false`)
//! means something and the wire cannot tell the two apart; the exception is a short
//! list of fields known to be Go values (`omit_zero`), which kubectl sends on every
//! create. Fields unknown to the descriptors are dropped, as kube-apiserver drops
//! them for protobuf.
//!
//! `k8s-v1.35.binpb` is a FileDescriptorSet (no source info) compiled from the
//! Kubernetes v1.35 generated.proto files (Copyright The Kubernetes Authors, Apache
//! License 2.0) as the k8s-rs-pb 0.5.0 crate ships them (packages without the
//! `k8s.io.` prefix). To regenerate, from that crate's `src/v1_35`:
//!
//! ```text
//! protoc -I . --include_imports -o k8s-v1.35.binpb \
//!   api/{core,apps,discovery,networking,coordination,rbac,autoscaling,policy,batch,events,storage,scheduling}/v1/generated.proto \
//!   apimachinery/pkg/apis/meta/v1/generated.proto
//! ```

use std::sync::OnceLock;

use base64::Engine;
use chrono::{DateTime, SecondsFormat};
use prost_reflect::{
    DescriptorPool, DynamicMessage, Kind, MapKey, MessageDescriptor, ReflectMessage,
};
use serde_json::{Map, Number, Value};

/// The prefix of every Kubernetes protobuf body.
pub const MAGIC: &[u8] = b"k8s\0";

/// Go's zero `time.Time` as Unix seconds (0001-01-01T00:00:00Z).
const GO_ZERO_TIME: i64 = -62_135_596_800;

const DESCRIPTORS: &[u8] = include_bytes!("k8s-v1.35.binpb");

fn pool() -> &'static DescriptorPool {
    static POOL: OnceLock<DescriptorPool> = OnceLock::new();
    POOL.get_or_init(|| {
        DescriptorPool::decode(DESCRIPTORS).expect("the embedded Kubernetes descriptors decode")
    })
}

/// Decodes a Kubernetes protobuf request body into its JSON object, with `apiVersion`
/// and `kind` taken from the envelope.
pub fn decode_request(body: &[u8]) -> Result<Value, String> {
    let rest = body.strip_prefix(MAGIC).ok_or_else(|| {
        "the protobuf body does not start with the Kubernetes magic prefix \"k8s\\x00\"".to_string()
    })?;
    let unknown = pool()
        .get_message_by_name("apimachinery.pkg.runtime.Unknown")
        .expect("runtime.Unknown is in the embedded descriptors");
    let envelope = DynamicMessage::decode(unknown, rest)
        .map_err(|e| format!("error decoding the protobuf envelope (runtime.Unknown): {e}"))?;
    let type_meta = match envelope.get_field_by_name("typeMeta").as_deref() {
        Some(prost_reflect::Value::Message(m)) => m.clone(),
        _ => DynamicMessage::new(
            pool()
                .get_message_by_name("apimachinery.pkg.runtime.TypeMeta")
                .expect("runtime.TypeMeta is in the embedded descriptors"),
        ),
    };
    let api_version = string_field(&type_meta, "apiVersion");
    let kind = string_field(&type_meta, "kind");
    if kind.is_empty() || api_version.is_empty() {
        return Err(
            "the protobuf envelope has no apiVersion and kind (runtime.Unknown.typeMeta)".into(),
        );
    }
    let encoding = string_field(&envelope, "contentEncoding");
    if !encoding.is_empty() {
        return Err(format!(
            "unsupported contentEncoding {encoding:?} in the protobuf envelope"
        ));
    }
    let raw = bytes_field(&envelope, "raw");
    let content_type = string_field(&envelope, "contentType");
    let mut obj = if content_type.is_empty() || content_type.contains("protobuf") {
        let desc = message_for(&api_version, &kind)
            .ok_or_else(|| format!("no protobuf schema for {kind} in {api_version}"))?;
        let msg = DynamicMessage::decode(desc, raw.as_slice())
            .map_err(|e| format!("error decoding {api_version} {kind} from protobuf: {e}"))?;
        message_to_json(&msg)?.unwrap_or_else(|| Value::Object(Map::new()))
    } else if content_type.contains("json") {
        serde_json::from_slice(&raw).map_err(|e| {
            format!(
                "error decoding the JSON inside the protobuf envelope ({api_version} {kind}): {e}"
            )
        })?
    } else {
        return Err(format!(
            "unsupported contentType {content_type:?} in the protobuf envelope"
        ));
    };
    let Value::Object(fields) = &mut obj else {
        return Err(format!("{api_version} {kind} did not decode to an object"));
    };
    // apiVersion and kind first, as JSON bodies have them.
    let mut out = Map::new();
    out.insert("apiVersion".into(), Value::String(api_version));
    out.insert("kind".into(), Value::String(kind));
    out.extend(std::mem::take(fields));
    Ok(Value::Object(out))
}

/// The proto package of an apiVersion in the embedded descriptors: "v1" →
/// api.core.v1, "apps/v1" → api.apps.v1, "networking.k8s.io/v1" →
/// api.networking.v1, "meta.k8s.io/v1" → apimachinery.pkg.apis.meta.v1.
fn package(api_version: &str) -> String {
    let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
    match group {
        "" => format!("api.core.{version}"),
        "meta.k8s.io" => format!("apimachinery.pkg.apis.meta.{version}"),
        g => format!("api.{}.{version}", g.split('.').next().unwrap_or(g)),
    }
}

/// The message for a kind; the options kinds (DeleteOptions, ...) every group
/// version carries are meta.k8s.io/v1's.
fn message_for(api_version: &str, kind: &str) -> Option<MessageDescriptor> {
    let pool = pool();
    pool.get_message_by_name(&format!("{}.{kind}", package(api_version)))
        .or_else(|| {
            kind.ends_with("Options")
                .then(|| pool.get_message_by_name(&format!("apimachinery.pkg.apis.meta.v1.{kind}")))
                .flatten()
        })
}

fn string_field(m: &DynamicMessage, name: &str) -> String {
    match m.get_field_by_name(name).as_deref() {
        Some(prost_reflect::Value::String(s)) => s.clone(),
        _ => String::new(),
    }
}

fn bytes_field(m: &DynamicMessage, name: &str) -> Vec<u8> {
    match m.get_field_by_name(name).as_deref() {
        Some(prost_reflect::Value::Bytes(b)) => b.to_vec(),
        _ => Vec::new(),
    }
}

/// A set (present) scalar field as i64.
fn int_field(m: &DynamicMessage, name: &str) -> Option<i64> {
    let f = m.descriptor().get_field_by_name(name)?;
    if !m.has_field(&f) {
        return None;
    }
    match m.get_field(&f).as_ref() {
        prost_reflect::Value::I32(n) => Some((*n).into()),
        prost_reflect::Value::I64(n) => Some(*n),
        prost_reflect::Value::U32(n) => Some((*n).into()),
        prost_reflect::Value::U64(n) => i64::try_from(*n).ok(),
        _ => None,
    }
}

/// A message as JSON; `None` for a value JSON would write as null (a zero Time).
fn message_to_json(m: &DynamicMessage) -> Result<Option<Value>, String> {
    let d = m.descriptor();
    let full = d.full_name();
    // The embedded packages lack upstream's "k8s.io." prefix; accept both.
    let name = full.strip_prefix("k8s.io.").unwrap_or(full);
    match name {
        "apimachinery.pkg.apis.meta.v1.Time" => return Ok(time(m, SecondsFormat::Secs)),
        "apimachinery.pkg.apis.meta.v1.MicroTime" => return Ok(time(m, SecondsFormat::Micros)),
        "apimachinery.pkg.api.resource.Quantity" => {
            let s = string_field(m, "string");
            return Ok(Some(Value::String(if s.is_empty() {
                "0".into()
            } else {
                s
            })));
        }
        "apimachinery.pkg.util.intstr.IntOrString" => {
            return Ok(Some(if int_field(m, "type") == Some(1) {
                Value::String(string_field(m, "strVal"))
            } else {
                Value::from(int_field(m, "intVal").unwrap_or(0))
            }));
        }
        "apimachinery.pkg.apis.meta.v1.Duration" => {
            let ns = int_field(m, "duration").unwrap_or(0);
            return Ok(Some(Value::String(go_duration(ns))));
        }
        "apimachinery.pkg.runtime.RawExtension" => return embedded(&bytes_field(m, "raw"), name),
        "apimachinery.pkg.apis.meta.v1.FieldsV1" => return embedded(&bytes_field(m, "Raw"), name),
        _ => {}
    }
    let mut out = Map::new();
    for (f, v) in m.fields() {
        if let prost_reflect::Value::Message(inner) = v
            && is_inline(f.name(), inner.descriptor().name())
        {
            if let Some(Value::Object(fields)) = message_to_json(inner)? {
                out.extend(fields);
            }
            continue;
        }
        let value = match v {
            prost_reflect::Value::List(items) => {
                if items.is_empty() {
                    continue;
                }
                let mut list = Vec::with_capacity(items.len());
                for item in items {
                    list.push(value_to_json(item)?.unwrap_or(Value::Null));
                }
                Value::Array(list)
            }
            prost_reflect::Value::Map(entries) => {
                if entries.is_empty() {
                    continue;
                }
                let mut obj = Map::new();
                for (k, v) in entries {
                    let key = match k {
                        MapKey::String(s) => s.clone(),
                        MapKey::Bool(b) => b.to_string(),
                        MapKey::I32(n) => n.to_string(),
                        MapKey::I64(n) => n.to_string(),
                        MapKey::U32(n) => n.to_string(),
                        MapKey::U64(n) => n.to_string(),
                    };
                    obj.insert(key, value_to_json(v)?.unwrap_or(Value::Null));
                }
                Value::Object(obj)
            }
            prost_reflect::Value::EnumNumber(n) => match f.kind() {
                Kind::Enum(e) => match e.get_value(*n) {
                    Some(ev) => Value::String(ev.name().to_string()),
                    None => Value::from(*n),
                },
                _ => Value::from(*n),
            },
            prost_reflect::Value::I32(0)
            | prost_reflect::Value::I64(0)
            | prost_reflect::Value::Bool(false)
                if omit_zero(d.name(), f.name()) =>
            {
                continue;
            }
            other => match value_to_json(other)? {
                Some(Value::String(s)) if s.is_empty() => continue,
                Some(j) => j,
                None => continue,
            },
        };
        out.insert(json_name(f.name()).to_string(), value);
    }
    Ok(Some(Value::Object(out)))
}

/// The JSON name of a proto field: the same, but for the one the proto generator
/// spelled from the Go name (IngressClassParametersReference.APIGroup).
fn json_name(proto: &str) -> &str {
    match proto {
        "aPIGroup" => "apiGroup",
        other => other,
    }
}

/// Non-pointer `omitempty` number and bool fields that kubectl's typed clients send as
/// 0/false on every create: omitted when zero, as Go's JSON does, so the stored object
/// matches what a JSON body gives. Only fields known to be Go values are listed; a
/// zero anywhere else is kept (it may be a pointer set to 0, e.g. `replicas`).
fn omit_zero(message: &str, field: &str) -> bool {
    matches!(
        (message, field),
        ("ObjectMeta", "generation")
            | ("DeploymentSpec", "minReadySeconds" | "paused")
            | ("ReplicaSetSpec" | "DaemonSetSpec", "minReadySeconds")
            | (
                "DeploymentStatus",
                "observedGeneration"
                    | "replicas"
                    | "updatedReplicas"
                    | "readyReplicas"
                    | "availableReplicas"
                    | "unavailableReplicas"
            )
            | (
                "Container" | "EphemeralContainerCommon",
                "stdin" | "stdinOnce" | "tty"
            )
            | ("PodSpec", "hostNetwork" | "hostPID" | "hostIPC")
            | (
                "ServiceSpec",
                "healthCheckNodePort" | "publishNotReadyAddresses"
            )
            | ("ServicePort", "nodePort")
            | ("ContainerPort", "hostPort")
    )
}

/// Go structs embedded with `json:",inline"`: a field of their own in protobuf, their
/// fields spliced into the parent in JSON (`livenessProbe.tcpSocket`, not
/// `livenessProbe.handler.tcpSocket`).
fn is_inline(field: &str, type_name: &str) -> bool {
    matches!(
        (field, type_name),
        ("handler", "ProbeHandler")
            | ("volumeSource", "VolumeSource")
            | ("persistentVolumeSource", "PersistentVolumeSource")
            | ("ephemeralContainerCommon", "EphemeralContainerCommon")
            | ("ingressRuleValue", "IngressRuleValue")
            | ("localObjectReference", "LocalObjectReference")
    )
}

fn value_to_json(v: &prost_reflect::Value) -> Result<Option<Value>, String> {
    use prost_reflect::Value as V;
    Ok(Some(match v {
        V::Bool(b) => Value::Bool(*b),
        V::I32(n) => Value::from(*n),
        V::I64(n) => Value::from(*n),
        V::U32(n) => Value::from(*n),
        V::U64(n) => Value::from(*n),
        V::F32(n) => float(f64::from(*n))?,
        V::F64(n) => float(*n)?,
        V::String(s) => Value::String(s.clone()),
        V::Bytes(b) => Value::String(base64::engine::general_purpose::STANDARD.encode(b)),
        V::EnumNumber(n) => Value::from(*n),
        V::Message(m) => return message_to_json(m),
        V::List(items) => {
            let mut list = Vec::with_capacity(items.len());
            for item in items {
                list.push(value_to_json(item)?.unwrap_or(Value::Null));
            }
            Value::Array(list)
        }
        V::Map(_) => return Err("a map nested in a list is not part of the Kubernetes API".into()),
    }))
}

fn float(n: f64) -> Result<Value, String> {
    Number::from_f64(n)
        .map(Value::Number)
        .ok_or_else(|| format!("the protobuf body holds a number JSON cannot carry: {n}"))
}

/// Time/MicroTime {seconds, nanos}. Go writes a zero time as an empty message.
fn time(m: &DynamicMessage, format: SecondsFormat) -> Option<Value> {
    let seconds = int_field(m, "seconds");
    let nanos = int_field(m, "nanos");
    if seconds.is_none() && nanos.is_none() {
        return None;
    }
    let seconds = seconds.unwrap_or(0);
    let nanos = u32::try_from(nanos.unwrap_or(0)).unwrap_or(0);
    if seconds == GO_ZERO_TIME && nanos == 0 {
        return None;
    }
    let t = DateTime::from_timestamp(seconds, nanos)?;
    Some(Value::String(t.to_rfc3339_opts(format, true)))
}

/// RawExtension / FieldsV1: raw JSON (or, for an embedded object, a nested
/// protobuf body) as its JSON value.
fn embedded(raw: &[u8], what: &str) -> Result<Option<Value>, String> {
    if raw.is_empty() {
        return Ok(None);
    }
    if raw.starts_with(MAGIC) {
        return decode_request(raw).map(Some);
    }
    serde_json::from_slice(raw)
        .map(Some)
        .map_err(|e| format!("the {what} in the protobuf body is not JSON: {e}"))
}

/// Go's `time.Duration.String()`: "1h2m3.5s", "1.5ms", "0s".
fn go_duration(ns: i64) -> String {
    if ns == 0 {
        return "0s".into();
    }
    let sign = if ns < 0 { "-" } else { "" };
    let u = ns.unsigned_abs();
    let frac = |value: u64, unit: u64| -> String {
        let whole = value / unit;
        let rest = value % unit;
        if rest == 0 {
            return whole.to_string();
        }
        let digits = unit.ilog10() as usize;
        let f = format!("{rest:0digits$}");
        format!("{whole}.{}", f.trim_end_matches('0'))
    };
    if u < 1_000 {
        return format!("{sign}{u}ns");
    }
    if u < 1_000_000 {
        return format!("{sign}{}µs", frac(u, 1_000));
    }
    if u < 1_000_000_000 {
        return format!("{sign}{}ms", frac(u, 1_000_000));
    }
    let secs = u / 1_000_000_000;
    let sub = u % 1_000_000_000;
    let (h, m, s) = (secs / 3600, (secs / 60) % 60, secs % 60);
    let s = frac(s * 1_000_000_000 + sub, 1_000_000_000);
    if h > 0 {
        format!("{sign}{h}h{m}m{s}s")
    } else if m > 0 {
        format!("{sign}{m}m{s}s")
    } else {
        format!("{sign}{s}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost_reflect::prost::Message;
    use serde_json::json;

    // Captured from `kubectl -v=9` (v1.32): the bodies of kubectl's typed clients.
    const NAMESPACE: &[u8] = b"k8s\x00\x0a\x0f\x0a\x02v1\x12\x09Namespace\x12\x19\x0a\x11\x0a\x01x\x12\x00\x1a\x00\x22\x00*\x002\x008\x00B\x00\x12\x00\x1a\x02\x0a\x00\x1a\x00\x22\x00";
    const CONFIGMAP: &[u8] = b"k8s\x00\x0a\x0f\x0a\x02v1\x12\x09ConfigMap\x12\x1c\x0a\x12\x0a\x01c\x12\x00\x1a\x01x\x22\x00*\x002\x008\x00B\x00\x12\x06\x0a\x01a\x12\x01b\x1a\x00\x22\x00";
    const SECRET: &[u8] = b"k8s\x00\x0a\x0c\x0a\x02v1\x12\x06Secret\x12\x1e\x0a\x12\x0a\x01s\x12\x00\x1a\x01x\x22\x00*\x002\x008\x00B\x00\x12\x06\x0a\x01p\x12\x01q\x1a\x00\x1a\x00\x22\x00";
    const SERVICEACCOUNT: &[u8] = b"k8s\x00\x0a\x14\x0a\x02v1\x12\x0eServiceAccount\x12\x16\x0a\x14\x0a\x03sa1\x12\x00\x1a\x01x\x22\x00*\x002\x008\x00B\x00\x1a\x00\x22\x00";
    const SERVICE: &[u8] = b"k8s\x00\x0a\x0d\x0a\x02v1\x12\x07Service\x12j\x0a \x0a\x03web\x12\x00\x1a\x01x\x22\x00*\x002\x008\x00B\x00Z\x0a\x0a\x03app\x12\x03web\x12B\x0a\x1b\x0a\x0780-8080\x12\x03TCP\x18P\x22\x07\x08\x00\x10\x90?\x1a\x00(\x00\x12\x0a\x0a\x03app\x12\x03web\x1a\x00\x22\x09ClusterIP:\x00B\x00R\x00Z\x00`\x00h\x00\x1a\x02\x0a\x00\x1a\x00\x22\x00";
    const DEPLOYMENT: &[u8] = b"k8s\x00\x0a\x15\x0a\x07apps/v1\x12\x0aDeployment\x12\xb1\x01\x0a \x0a\x03web\x12\x00\x1a\x01x\x22\x00*\x002\x008\x00B\x00Z\x0a\x0a\x03app\x12\x03web\x12\x7f\x08\x02\x12\x0c\x0a\x0a\x0a\x03app\x12\x03web\x1ae\x0a\x1c\x0a\x00\x12\x00\x1a\x00\x22\x00*\x002\x008\x00B\x00Z\x0a\x0a\x03app\x12\x03web\x12E\x12'\x0a\x05nginx\x12\x0anginx:1.25*\x00B\x00j\x00r\x00\x80\x01\x00\x88\x01\x00\x90\x01\x00\xa2\x01\x00\x1a\x002\x00B\x00J\x00R\x00X\x00`\x00h\x00\x82\x01\x00\x8a\x01\x00\x9a\x01\x00\xc2\x01\x00\x22\x02\x0a\x00(\x008\x00\x1a\x0c\x08\x00\x10\x00\x18\x00 \x00(\x008\x00\x1a\x00\x22\x00";
    const INGRESS: &[u8] = b"k8s\x00\x0a\x1f\x0a\x14networking.k8s.io/v1\x12\x07Ingress\x12Q\x0a\x1a\x0a\x03ing\x12\x00\x1a\x07default\x22\x00*\x002\x008\x00B\x00\x12/\x1a-\x0a\x07foo.com\x12\x22\x0a \x0a\x1e\x0a\x04/bar\x12\x0f\x22\x0d\x0a\x04svc1\x12\x05\x0a\x00\x10\x90?\x1a\x05Exact\x1a\x02\x0a\x00\x1a\x00\x22\x00";
    const ROLE: &[u8] = b"k8s\x00\x0a$\x0a\x1crbac.authorization.k8s.io/v1\x12\x04Role\x12)\x0a\x18\x0a\x01r\x12\x00\x1a\x07default\x22\x00*\x002\x008\x00B\x00\x12\x0d\x0a\x03get\x12\x00\x1a\x04pods\x1a\x00\x22\x00";

    /// Builds a message from a JSON spec in the proto's own shapes (Time as
    /// {"seconds": ..}, bytes as UTF-8 strings), as a client would encode it.
    fn build(desc: MessageDescriptor, spec: &Value) -> DynamicMessage {
        let mut m = DynamicMessage::new(desc.clone());
        for (k, v) in spec.as_object().expect("an object spec") {
            let f = desc
                .get_field_by_name(k)
                .unwrap_or_else(|| panic!("no field {k}"));
            let one = |kind: &Kind, v: &Value| -> prost_reflect::Value {
                use prost_reflect::Value as V;
                match kind {
                    Kind::Message(md) => V::Message(build(md.clone(), v)),
                    Kind::String => V::String(v.as_str().unwrap().into()),
                    Kind::Bytes => V::Bytes(v.as_str().unwrap().as_bytes().to_vec().into()),
                    Kind::Bool => V::Bool(v.as_bool().unwrap()),
                    Kind::Int32 => V::I32(v.as_i64().unwrap() as i32),
                    Kind::Int64 => V::I64(v.as_i64().unwrap()),
                    other => panic!("kind {other:?} not needed in tests"),
                }
            };
            let value = if f.is_map() {
                let Kind::Message(entry) = f.kind() else {
                    unreachable!()
                };
                let vk = entry.map_entry_value_field().kind();
                prost_reflect::Value::Map(
                    v.as_object()
                        .unwrap()
                        .iter()
                        .map(|(k, v)| (MapKey::String(k.clone()), one(&vk, v)))
                        .collect(),
                )
            } else if f.is_list() {
                let kind = f.kind();
                prost_reflect::Value::List(
                    v.as_array()
                        .unwrap()
                        .iter()
                        .map(|v| one(&kind, v))
                        .collect(),
                )
            } else {
                one(&f.kind(), v)
            };
            m.set_field(&f, value);
        }
        m
    }

    /// Wraps a message in the envelope, as client-go's protobuf serializer does.
    fn body(api_version: &str, kind: &str, spec: Value) -> Vec<u8> {
        let msg = build(message_for(api_version, kind).unwrap(), &spec);
        envelope(api_version, kind, msg.encode_to_vec(), "")
    }

    fn envelope(api_version: &str, kind: &str, raw: Vec<u8>, content_type: &str) -> Vec<u8> {
        let unknown = pool()
            .get_message_by_name("apimachinery.pkg.runtime.Unknown")
            .unwrap();
        let mut u = build(
            unknown,
            &json!({"typeMeta": {"apiVersion": api_version, "kind": kind},
                "contentType": content_type}),
        );
        u.set_field_by_name("raw", prost_reflect::Value::Bytes(raw.into()));
        let mut out = MAGIC.to_vec();
        out.extend(u.encode_to_vec());
        out
    }

    #[test]
    fn kubectl_create_namespace() {
        let v = decode_request(NAMESPACE).unwrap();
        assert_eq!(
            v,
            json!({"apiVersion": "v1", "kind": "Namespace",
                "metadata": {"name": "x"}, "spec": {}, "status": {}})
        );
        // apiVersion and kind lead, as in JSON bodies.
        let keys: Vec<_> = v.as_object().unwrap().keys().cloned().collect();
        assert_eq!(keys[..2], ["apiVersion", "kind"]);
    }

    #[test]
    fn kubectl_create_configmap_secret_serviceaccount() {
        assert_eq!(
            decode_request(CONFIGMAP).unwrap(),
            json!({"apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": "c", "namespace": "x"}, "data": {"a": "b"}})
        );
        // Secret.data is map<string, bytes>: base64 in JSON.
        assert_eq!(
            decode_request(SECRET).unwrap(),
            json!({"apiVersion": "v1", "kind": "Secret",
                "metadata": {"name": "s", "namespace": "x"}, "data": {"p": "cQ=="}})
        );
        assert_eq!(
            decode_request(SERVICEACCOUNT).unwrap(),
            json!({"apiVersion": "v1", "kind": "ServiceAccount",
                "metadata": {"name": "sa1", "namespace": "x"}})
        );
    }

    #[test]
    fn kubectl_create_service() {
        let v = decode_request(SERVICE).unwrap();
        assert_eq!(
            v["spec"],
            json!({"ports": [{"name": "80-8080", "protocol": "TCP", "port": 80,
                    "targetPort": 8080}],
                "selector": {"app": "web"}, "type": "ClusterIP"})
        );
        assert_eq!(v["metadata"]["labels"], json!({"app": "web"}));
    }

    #[test]
    fn kubectl_create_deployment() {
        let v = decode_request(DEPLOYMENT).unwrap();
        assert_eq!(v["apiVersion"], "apps/v1");
        assert_eq!(v["kind"], "Deployment");
        assert_eq!(v["metadata"]["name"], "web");
        assert_eq!(v["spec"]["replicas"], 2);
        assert_eq!(
            v["spec"]["selector"],
            json!({"matchLabels": {"app": "web"}})
        );
        let tpl = &v["spec"]["template"];
        assert_eq!(tpl["metadata"]["labels"], json!({"app": "web"}));
        // The template's zero creationTimestamp is omitted, as JSON writes null.
        assert!(tpl["metadata"].get("creationTimestamp").is_none());
        let c = &tpl["spec"]["containers"][0];
        assert_eq!(c["name"], "nginx");
        assert_eq!(c["image"], "nginx:1.25");
        assert_eq!(c["resources"], json!({}));
        assert!(c.get("imagePullPolicy").is_none());
        // Go value fields sent as zero are omitted, as a JSON body leaves them out.
        assert_eq!(c.get("stdin"), None);
        assert_eq!(tpl["spec"].get("hostNetwork"), None);
        assert_eq!(v["spec"].get("paused"), None);
        assert_eq!(v["status"], json!({}));
        // The decoded object fits the k8s-openapi type, as the registry needs.
        let r = super::super::resources::by_kind("apps/v1", "Deployment").unwrap();
        (r.ops.round_trip)(&v).unwrap();
    }

    #[test]
    fn kubectl_create_ingress_and_role() {
        let v = decode_request(INGRESS).unwrap();
        assert_eq!(
            v["spec"]["rules"],
            json!([{"host": "foo.com", "http": {"paths": [{"path": "/bar", "pathType": "Exact",
                "backend": {"service": {"name": "svc1", "port": {"number": 8080}}}}]}}])
        );
        let v = decode_request(ROLE).unwrap();
        assert_eq!(v["apiVersion"], "rbac.authorization.k8s.io/v1");
        assert_eq!(
            v["rules"],
            json!([{"verbs": ["get"], "apiGroups": [""], "resources": ["pods"]}])
        );
    }

    #[test]
    fn every_served_kind_has_a_schema() {
        for r in super::super::resources::RESOURCES {
            assert!(
                message_for(&r.api_version(), r.kind).is_some(),
                "{} {}",
                r.api_version(),
                r.kind
            );
        }
        for (v, k) in [
            ("v1", "DeleteOptions"),
            ("apps/v1", "DeleteOptions"),
            ("meta.k8s.io/v1", "DeleteOptions"),
            ("autoscaling/v1", "Scale"),
            ("policy/v1", "Eviction"),
            ("v1", "Binding"),
        ] {
            assert!(message_for(v, k).is_some(), "{v} {k}");
        }
    }

    /// Every field of every served kind's message, inline structs spliced in, has a
    /// property of that name in k8s-openapi's JSON schema for the type: proto names
    /// are the JSON names, and no other inline struct is missing from `is_inline`.
    #[test]
    fn descriptors_match_the_json_schema() {
        fn check(
            md: &MessageDescriptor,
            schema: &Value,
            defs: &Map<String, Value>,
            path: &str,
            problems: &mut Vec<String>,
        ) {
            // A described reference is {"description", "allOf": [{"$ref"}]}.
            let schema = schema.pointer("/allOf/0").unwrap_or(schema);
            let schema = match schema.get("$ref").and_then(Value::as_str) {
                Some(r) => &defs[r.rsplit('/').next().unwrap()],
                None => schema,
            };
            let Some(props) = schema.get("properties").and_then(Value::as_object) else {
                return;
            };
            for f in md.fields() {
                // Kubernetes 1.35's alpha PodSpec.workloadRef is gone from k8s-openapi's
                // newer types (strict field validation reports it if a client sets it).
                if f.name() == "workloadRef" {
                    continue;
                }
                let name = json_name(f.name());
                let Kind::Message(sub) = f.kind() else {
                    if !props.contains_key(name) {
                        problems.push(format!("{path}.{name}"));
                    }
                    continue;
                };
                if is_inline(f.name(), sub.name()) {
                    check(&sub, schema, defs, path, problems);
                    continue;
                }
                let Some(prop) = props.get(name) else {
                    problems.push(format!("{path}.{name}"));
                    continue;
                };
                let (sub, prop) = if f.is_map() {
                    match sub.map_entry_value_field().kind() {
                        Kind::Message(v) => (v, &prop["additionalProperties"]),
                        _ => continue,
                    }
                } else if f.is_list() {
                    (sub, &prop["items"])
                } else {
                    (sub, prop)
                };
                check(&sub, prop, defs, &format!("{path}.{name}"), problems);
            }
        }
        let mut g = schemars::generate::SchemaSettings::draft07().into_generator();
        let roots: Vec<_> = super::super::resources::RESOURCES
            .iter()
            .map(|r| (r, serde_json::to_value((r.ops.schema)(&mut g)).unwrap()))
            .collect();
        let defs = g.take_definitions(true);
        let mut problems = Vec::new();
        for (r, root) in roots {
            let md = message_for(&r.api_version(), r.kind).unwrap();
            check(&md, &root, &defs, r.kind, &mut problems);
        }
        assert!(
            problems.is_empty(),
            "fields with no JSON property: {problems:#?}"
        );
    }

    #[test]
    fn pod_with_time_quantity_intorstring() {
        let b = body(
            "v1",
            "Pod",
            json!({
                "metadata": {"name": "p", "creationTimestamp": {},
                    "deletionTimestamp": {"seconds": 1_700_000_000, "nanos": 0},
                    "deletionGracePeriodSeconds": 0},
                "spec": {"automountServiceAccountToken": false,
                    "securityContext": {"supplementalGroups": [1000, 2000]},
                    "containers": [{"name": "c",
                        "ports": [{"name": "http", "containerPort": 8080}],
                        "resources": {"limits": {"cpu": {"string": "100m"}}},
                        "livenessProbe": {"handler": {"tcpSocket":
                            {"port": {"type": 1, "intVal": 0, "strVal": "http"}}}}}]}}),
        );
        let v = decode_request(&b).unwrap();
        assert_eq!(
            v["metadata"],
            json!({"name": "p", "deletionTimestamp": "2023-11-14T22:13:20Z",
                "deletionGracePeriodSeconds": 0})
        );
        assert_eq!(v["spec"]["automountServiceAccountToken"], false);
        assert_eq!(
            v["spec"]["securityContext"],
            json!({"supplementalGroups": [1000, 2000]})
        );
        let c = &v["spec"]["containers"][0];
        assert_eq!(c["resources"], json!({"limits": {"cpu": "100m"}}));
        assert_eq!(c["livenessProbe"]["tcpSocket"]["port"], "http");
        assert_eq!(c["ports"], json!([{"name": "http", "containerPort": 8080}]));
        let r = super::super::resources::by_kind("v1", "Pod").unwrap();
        (r.ops.round_trip)(&v).unwrap();
    }

    #[test]
    fn lease_microtime_endpointslice_node_event() {
        let b = body(
            "coordination.k8s.io/v1",
            "Lease",
            json!({"metadata": {"name": "node-1", "namespace": "kube-node-lease"},
                "spec": {"holderIdentity": "node-1", "leaseDurationSeconds": 40,
                    "renewTime": {"seconds": 1_700_000_000, "nanos": 123_456_000}}}),
        );
        let v = decode_request(&b).unwrap();
        assert_eq!(
            v["spec"],
            json!({"holderIdentity": "node-1", "leaseDurationSeconds": 40,
                "renewTime": "2023-11-14T22:13:20.123456Z"})
        );

        let b = body(
            "discovery.k8s.io/v1",
            "EndpointSlice",
            json!({"metadata": {"name": "web-abc"}, "addressType": "IPv4",
                "endpoints": [{"addresses": ["10.0.0.1"], "conditions": {"ready": false}}],
                "ports": [{"name": "", "port": 8080, "protocol": "TCP"}]}),
        );
        let v = decode_request(&b).unwrap();
        assert_eq!(v["addressType"], "IPv4");
        assert_eq!(
            v["endpoints"],
            json!([{"addresses": ["10.0.0.1"], "conditions": {"ready": false}}])
        );
        assert_eq!(v["ports"], json!([{"port": 8080, "protocol": "TCP"}]));

        let b = body(
            "v1",
            "Node",
            json!({"metadata": {"name": "n1"}, "spec": {"podCIDR": "10.244.0.0/24"},
                "status": {"capacity": {"cpu": {"string": "2"}, "memory": {"string": "4Gi"}},
                    "conditions": [{"type": "Ready", "status": "True",
                        "lastHeartbeatTime": {"seconds": 1_700_000_000}}]}}),
        );
        let v = decode_request(&b).unwrap();
        assert_eq!(v["spec"]["podCIDR"], "10.244.0.0/24");
        assert_eq!(
            v["status"]["capacity"],
            json!({"cpu": "2", "memory": "4Gi"})
        );
        assert_eq!(
            v["status"]["conditions"][0]["lastHeartbeatTime"],
            "2023-11-14T22:13:20Z"
        );

        let b = body(
            "v1",
            "Event",
            json!({"metadata": {"name": "e1", "namespace": "default"},
                "involvedObject": {"kind": "Pod", "name": "p"}, "reason": "Started",
                "count": 1, "eventTime": {}, "type": "Normal"}),
        );
        let v = decode_request(&b).unwrap();
        assert_eq!(v["involvedObject"], json!({"kind": "Pod", "name": "p"}));
        assert_eq!(v["count"], 1);
        assert!(v.get("eventTime").is_none());
        let r = super::super::resources::by_kind("v1", "Event").unwrap();
        (r.ops.round_trip)(&v).unwrap();
    }

    #[test]
    fn managed_fields_and_raw_extension_hold_json() {
        let b = body(
            "apps/v1",
            "ControllerRevision",
            json!({"metadata": {"name": "r1", "managedFields": [{"manager": "m",
                    "operation": "Update", "fieldsType": "FieldsV1",
                    "fieldsV1": {"Raw": "{\"f:data\":{}}"}}]},
                "data": {"raw": "{\"spec\":{\"a\":1}}"}, "revision": 3}),
        );
        let v = decode_request(&b).unwrap();
        assert_eq!(v["data"], json!({"spec": {"a": 1}}));
        assert_eq!(v["revision"], 3);
        assert_eq!(
            v["metadata"]["managedFields"][0]["fieldsV1"],
            json!({"f:data": {}})
        );
    }

    #[test]
    fn pointer_zeros_are_kept_value_zeros_dropped() {
        let b = body(
            "apps/v1",
            "Deployment",
            json!({"metadata": {"name": "d", "generation": 0},
                "spec": {"replicas": 0, "revisionHistoryLimit": 0, "minReadySeconds": 0,
                    "paused": false},
                "status": {"replicas": 0, "collisionCount": 0}}),
        );
        let v = decode_request(&b).unwrap();
        assert_eq!(v["metadata"], json!({"name": "d"}));
        assert_eq!(v["spec"], json!({"replicas": 0, "revisionHistoryLimit": 0}));
        assert_eq!(v["status"], json!({"collisionCount": 0}));
    }

    #[test]
    fn delete_options() {
        let b = body(
            "v1",
            "DeleteOptions",
            json!({"gracePeriodSeconds": 0, "propagationPolicy": "Foreground",
                "preconditions": {"uid": "u1"}, "dryRun": ["All"]}),
        );
        assert_eq!(
            decode_request(&b).unwrap(),
            json!({"apiVersion": "v1", "kind": "DeleteOptions", "gracePeriodSeconds": 0,
                "propagationPolicy": "Foreground", "preconditions": {"uid": "u1"},
                "dryRun": ["All"]})
        );
    }

    #[test]
    fn json_inside_the_envelope() {
        let b = envelope(
            "v1",
            "ConfigMap",
            br#"{"metadata":{"name":"j"}}"#.to_vec(),
            "application/json",
        );
        assert_eq!(
            decode_request(&b).unwrap(),
            json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "j"}})
        );
    }

    #[test]
    fn errors_name_the_problem() {
        let e = decode_request(b"{\"kind\":\"Namespace\"}").unwrap_err();
        assert!(e.contains("magic"), "{e}");
        let e = decode_request(b"k8s\x00\xff\xff\xff").unwrap_err();
        assert!(e.contains("runtime.Unknown"), "{e}");
        let e = decode_request(&envelope("v1", "Widget", Vec::new(), "")).unwrap_err();
        assert_eq!(e, "no protobuf schema for Widget in v1");
        let e = decode_request(&envelope("", "", Vec::new(), "")).unwrap_err();
        assert!(e.contains("no apiVersion and kind"), "{e}");
        // A typed message cut short.
        let b = envelope("v1", "Namespace", b"\x0a\x11\x0a\x01x".to_vec(), "");
        let e = decode_request(&b).unwrap_err();
        assert!(
            e.starts_with("error decoding v1 Namespace from protobuf"),
            "{e}"
        );
        let b = envelope("v1", "Namespace", Vec::new(), "application/cbor");
        let e = decode_request(&b).unwrap_err();
        assert!(e.contains("unsupported contentType"), "{e}");
    }

    #[test]
    fn durations() {
        assert_eq!(go_duration(0), "0s");
        assert_eq!(go_duration(1_500), "1.5µs");
        assert_eq!(go_duration(2_000_000), "2ms");
        assert_eq!(go_duration(1_500_000_000), "1.5s");
        assert_eq!(go_duration(3_600_000_000_000), "1h0m0s");
        assert_eq!(go_duration(90_000_000_000), "1m30s");
        assert_eq!(go_duration(-2_000_000_000), "-2s");
    }
}
