//! OpenAPI documents (/openapi/v3, /openapi/v3/<gv>, /openapi/v2) generated from the
//! k8s-openapi schemars impls of the served resources. Built once, served as bytes.
//!
//! What kubectl relies on:
//! - `kubectl explain` reads /openapi/v3/<gv> and finds a kind through the
//!   `x-kubernetes-group-version-kind` list on its component schema.
//! - Strict field validation: kubectl's QueryParamVerifierV3 looks for a PATCH operation
//!   whose `x-kubernetes-group-version-kind` (an object, not a list) is the kind and which
//!   lists a `fieldValidation` parameter. If it finds one it leaves validation to the
//!   server; otherwise it downloads /openapi/v2 as protobuf to validate client side.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use k8s_openapi::apimachinery::pkg::apis::meta::v1 as meta;
use schemars::generate::SchemaSettings;
use schemars::{JsonSchema, SchemaGenerator};
use serde_json::{Map, Value, json};

use crate::apiserver::resources::{RESOURCES, Resource};

/// Content type client-go asks /openapi/v2 for (and the only one it can decode).
pub const V2_PROTOBUF: &str = "application/com.github.proto-openapi.spec.v2@v1.0+protobuf";

struct Docs {
    /// "api/v1" -> (hash, document bytes).
    v3: BTreeMap<String, (String, Vec<u8>)>,
    v3_root: Value,
    v2: Vec<u8>,
}

static DOCS: OnceLock<Docs> = OnceLock::new();

fn docs() -> &'static Docs {
    DOCS.get_or_init(build)
}

/// The /openapi/v3 discovery document: one entry per served group-version.
pub fn v3_root() -> Value {
    docs().v3_root.clone()
}

/// The /openapi/v3/<path> document, `path` as in the root ("api/v1", "apis/apps/v1");
/// a leading "/" or "openapi/v3/" and any "?hash=" query are tolerated.
pub fn v3_group_version(path: &str) -> Option<&'static [u8]> {
    let path = path
        .split('?')
        .next()
        .unwrap_or(path)
        .trim_start_matches('/');
    let path = path.strip_prefix("openapi/v3/").unwrap_or(path);
    docs().v3.get(path).map(|(_, b)| b.as_slice())
}

/// The swagger 2.0 document as JSON.
/// A gnostic openapi_v2.Document with only `swagger` (field 1) and `info` (field 2:
/// title = 1, version = 2) set, and no definitions.
pub fn v2_protobuf_stub() -> Vec<u8> {
    fn field(out: &mut Vec<u8>, number: u8, bytes: &[u8]) {
        out.push((number << 3) | 2); // length-delimited
        out.push(bytes.len() as u8); // all values here are < 128 bytes
        out.extend_from_slice(bytes);
    }
    let mut info = Vec::new();
    field(&mut info, 1, b"skiff");
    field(&mut info, 2, format!("v1.{}", super::KUBE_MINOR).as_bytes());
    let mut doc = Vec::new();
    field(&mut doc, 1, b"2.0");
    field(&mut doc, 2, &info);
    doc
}

pub fn v2_json() -> &'static [u8] {
    &docs().v2
}

/// Opaque content hash for the ?hash= cache buster (two FNV-1a lanes, 128 bits).
fn content_hash(bytes: &[u8]) -> String {
    let mut a: u64 = 0xcbf2_9ce4_8422_2325;
    let mut b: u64 = 0x6c62_272e_07bb_0142;
    for &x in bytes {
        a = (a ^ u64::from(x)).wrapping_mul(0x0000_0100_0000_01b3);
        b = (b ^ u64::from(x.rotate_left(3))).wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{a:016X}{b:016X}")
}

fn gv_path(group: &str, version: &str) -> String {
    if group.is_empty() {
        format!("api/{version}")
    } else {
        format!("apis/{group}/{version}")
    }
}

fn gvk(group: &str, version: &str, kind: &str) -> Value {
    json!({"group": group, "kind": kind, "version": version})
}

/// Group-versions in RESOURCES order.
fn group_versions() -> Vec<(&'static str, &'static str)> {
    let mut out: Vec<(&str, &str)> = Vec::new();
    for r in RESOURCES {
        if !out.contains(&(r.group, r.version)) {
            out.push((r.group, r.version));
        }
    }
    out
}

fn build() -> Docs {
    let mut v3 = BTreeMap::new();
    let mut root_paths = Map::new();
    for (group, version) in group_versions() {
        let resources: Vec<&Resource> = RESOURCES
            .iter()
            .filter(|r| r.group == group && r.version == version)
            .collect();
        let doc = v3_document(&resources);
        // Serializing a Value cannot fail; an empty document is still better than a panic.
        let bytes = serde_json::to_vec(&doc).unwrap_or_default();
        let hash = content_hash(&bytes);
        let path = gv_path(group, version);
        root_paths.insert(
            path.clone(),
            json!({"serverRelativeURL": format!("/openapi/v3/{path}?hash={hash}")}),
        );
        v3.insert(path, (hash, bytes));
    }
    let all: Vec<&Resource> = RESOURCES.iter().collect();
    let v2 = serde_json::to_vec(&v2_document(&all)).unwrap_or_default();
    Docs {
        v3,
        v3_root: json!({"paths": root_paths}),
        v2,
    }
}

/// Which flavour of document is being built: the differences are where `$ref`s point,
/// how parameters and bodies are spelled, and `$ref` siblings (fine in swagger 2.0 as
/// Kubernetes emits them, wrapped in allOf for 3.0 as Kubernetes does).
#[derive(Clone, Copy, PartialEq)]
enum Flavor {
    V2,
    V3,
}

impl Flavor {
    fn ref_to(self, name: &str) -> Value {
        match self {
            Flavor::V2 => json!({"$ref": format!("#/definitions/{name}")}),
            Flavor::V3 => json!({"$ref": format!("#/components/schemas/{name}")}),
        }
    }
}

fn generator(flavor: Flavor) -> SchemaGenerator {
    match flavor {
        Flavor::V3 => SchemaSettings::openapi3().into_generator(),
        Flavor::V2 => SchemaSettings::draft07()
            .with(|s| {
                s.transforms.clear();
            })
            .into_generator(),
    }
}

/// Collects the definitions for `resources` plus what the operations reference, with
/// `x-kubernetes-group-version-kind` on each kind and hand-built List kinds (k8s-openapi
/// has no schemars impl for its generic List<T>).
fn definitions(resources: &[&Resource], flavor: Flavor) -> Map<String, Value> {
    let mut g = generator(flavor);
    for r in resources {
        let _ = (r.ops.schema)(&mut g);
    }
    let _ = g.subschema_for::<meta::Status>();
    let _ = g.subschema_for::<meta::ListMeta>();
    let _ = g.subschema_for::<meta::DeleteOptions>();
    let _ = g.subschema_for::<meta::Patch>();
    if resources.iter().any(|r| r.has_scale) {
        let _ = g.subschema_for::<k8s_openapi::api::autoscaling::v1::Scale>();
    }
    if resources
        .iter()
        .any(|r| r.group.is_empty() && r.kind == "Pod")
    {
        let _ = g.subschema_for::<k8s_openapi::api::core::v1::Binding>();
        let _ = g.subschema_for::<k8s_openapi::api::policy::v1::Eviction>();
    }
    let mut defs = g.take_definitions(true);
    // Schemars-isms kube-openapi does not expect in 2.0/3.0 documents.
    for (name, v) in defs.iter_mut() {
        strip_schemars_keys(v);
        add_patch_extensions(name, v);
    }

    let mut tag = |name: &str, gvk_v: Value| {
        if let Some(Value::Object(o)) = defs.get_mut(name) {
            o.insert("x-kubernetes-group-version-kind".into(), json!([gvk_v]));
        }
    };
    for r in resources {
        tag(&(r.ops.definition)(), gvk(r.group, r.version, r.kind));
    }
    tag(&meta::Status::schema_name(), gvk("", "v1", "Status"));
    tag(
        &k8s_openapi::api::autoscaling::v1::Scale::schema_name(),
        gvk("autoscaling", "v1", "Scale"),
    );
    tag(
        &k8s_openapi::api::policy::v1::Eviction::schema_name(),
        gvk("policy", "v1", "Eviction"),
    );
    tag(
        &k8s_openapi::api::core::v1::Binding::schema_name(),
        gvk("", "v1", "Binding"),
    );

    for r in resources {
        let (name, schema) = list_schema(r, flavor);
        defs.insert(name, schema);
    }
    defs
}

/// Strategic-merge metadata kubectl reads from the schema (as the Go struct tags
/// `patchStrategy`/`patchMergeKey` appear in kube-apiserver's OpenAPI). Without it kubectl
/// treats every list as atomic, and a repeated `kubectl apply` of an unchanged manifest
/// would replace whole container lists. Must agree with patch.rs.
fn add_patch_extensions(definition: &str, schema: &mut Value) {
    let short = definition.rsplit('.').next().unwrap_or("");
    let Some(props) = schema.get_mut("properties").and_then(Value::as_object_mut) else {
        return;
    };
    for (field, prop) in props.iter_mut() {
        let (key, strategy) = match (short, field.as_str()) {
            (
                _,
                "containers"
                | "initContainers"
                | "ephemeralContainers"
                | "env"
                | "imagePullSecrets",
            ) => (Some("name"), "merge"),
            ("PodSpec", "volumes" | "resourceClaims") => (Some("name"), "merge,retainKeys"),
            (_, "volumeMounts") => (Some("mountPath"), "merge"),
            (_, "volumeDevices") => (Some("devicePath"), "merge"),
            (_, "hostAliases") => (Some("ip"), "merge"),
            (_, "conditions") => (Some("type"), "merge"),
            (_, "ownerReferences") => (Some("uid"), "merge"),
            (_, "topologySpreadConstraints") => (Some("topologyKey"), "merge"),
            ("Container" | "EphemeralContainer", "ports") => (Some("containerPort"), "merge"),
            ("ServiceSpec", "ports") => (Some("port"), "merge"),
            ("ObjectMeta", "finalizers") => (None, "merge"),
            ("DeploymentSpec", "strategy") => (None, "retainKeys"),
            _ => continue,
        };
        if let Some(o) = prop.as_object_mut() {
            if let Some(k) = key {
                o.insert("x-kubernetes-patch-merge-key".into(), json!(k));
            }
            o.insert("x-kubernetes-patch-strategy".into(), json!(strategy));
        }
    }
}

fn strip_schemars_keys(v: &mut Value) {
    match v {
        Value::Object(o) => {
            o.remove("$schema");
            o.remove("$id");
            for x in o.values_mut() {
                strip_schemars_keys(x);
            }
        }
        Value::Array(a) => a.iter_mut().for_each(strip_schemars_keys),
        _ => {}
    }
}

fn list_definition_name(r: &Resource) -> String {
    format!("{}List", (r.ops.definition)())
}

fn list_schema(r: &Resource, flavor: Flavor) -> (String, Value) {
    let item = flavor.ref_to(&(r.ops.definition)());
    let list_meta = flavor.ref_to(&meta::ListMeta::schema_name());
    let metadata = match flavor {
        Flavor::V2 => {
            let mut m = list_meta;
            if let Value::Object(o) = &mut m {
                o.insert("description".into(), json!(LIST_META_DOC));
            }
            m
        }
        Flavor::V3 => json!({"allOf": [list_meta], "default": {}, "description": LIST_META_DOC}),
    };
    let schema = json!({
        "description": format!("{} is a list of {} objects.", r.list_kind, r.kind),
        "type": "object",
        "properties": {
            "apiVersion": {"type": "string", "description": API_VERSION_DOC},
            "items": {
                "type": "array",
                "description": format!("List of {}.", r.plural),
                "items": item,
            },
            "kind": {"type": "string", "description": KIND_DOC},
            "metadata": metadata,
        },
        "required": ["items"],
        "x-kubernetes-group-version-kind": [gvk(r.group, r.version, r.list_kind)],
    });
    (list_definition_name(r), schema)
}

const API_VERSION_DOC: &str = "APIVersion defines the versioned schema of this representation of an object. Servers should convert recognized schemas to the latest internal value, and may reject unrecognized values. More info: https://git.k8s.io/community/contributors/devel/sig-architecture/api-conventions.md#resources";
const KIND_DOC: &str = "Kind is a string value representing the REST resource this object represents. Servers may infer this from the endpoint the client submits requests to. Cannot be updated. In CamelCase. More info: https://git.k8s.io/community/contributors/devel/sig-architecture/api-conventions.md#types-kinds";
const LIST_META_DOC: &str = "Standard list metadata. More info: https://git.k8s.io/community/contributors/devel/sig-architecture/api-conventions.md#types-kinds";

/// One query or path parameter, spelled for the flavor.
fn param(flavor: Flavor, name: &str, location: &str, ty: &str, description: &str) -> Value {
    let required = location == "path";
    match flavor {
        Flavor::V2 => {
            let mut p = json!({"name": name, "in": location, "description": description, "type": ty, "uniqueItems": true});
            if required {
                p["required"] = json!(true);
            }
            p
        }
        Flavor::V3 => {
            let mut p = json!({"name": name, "in": location, "description": description, "schema": {"type": ty, "uniqueItems": true}});
            if required {
                p["required"] = json!(true);
            }
            p
        }
    }
}

const DRY_RUN_DOC: &str = "When present, indicates that modifications should not be persisted. An invalid or unrecognized dryRun directive will result in an error response and no further processing of the request. Valid values are: - All: all dry run stages will be processed";
const FIELD_MANAGER_DOC: &str = "fieldManager is a name associated with the actor or entity that is making these changes. The value must be less than or 128 characters long, and only contain printable characters, as defined by https://golang.org/pkg/unicode/#IsPrint.";
const FIELD_VALIDATION_DOC: &str = "fieldValidation instructs the server on how to handle objects in the request (POST/PUT/PATCH) containing unknown or duplicate fields. Valid values are: - Ignore: This will ignore any unknown fields that are silently dropped from the object, and will ignore all but the last duplicate field that the decoder encounters. This is the default behavior prior to v1.23. - Warn: This will send a warning via the standard warning response header for each unknown field that is dropped from the object, and for each duplicate field that is encountered. The request will still succeed if there are no other errors, and will only persist the last of any duplicate fields. This is the default in v1.23+ - Strict: This will fail the request with a BadRequest error if any unknown fields would be dropped from the object, or if any duplicate fields are present. The error returned from the server will contain all unknown and duplicate fields encountered.";

fn write_params(flavor: Flavor, with_force: bool) -> Vec<Value> {
    let mut out = vec![
        param(flavor, "dryRun", "query", "string", DRY_RUN_DOC),
        param(flavor, "fieldManager", "query", "string", FIELD_MANAGER_DOC),
        param(
            flavor,
            "fieldValidation",
            "query",
            "string",
            FIELD_VALIDATION_DOC,
        ),
    ];
    if with_force {
        out.push(param(
            flavor,
            "force",
            "query",
            "boolean",
            "Force is going to \"force\" Apply requests. It means user will re-acquire conflicting fields owned by other people. Force flag must be unset for non-apply patch requests.",
        ));
    }
    out
}

fn list_params(flavor: Flavor) -> Vec<Value> {
    [
        ("allowWatchBookmarks", "boolean"),
        ("continue", "string"),
        ("fieldSelector", "string"),
        ("labelSelector", "string"),
        ("limit", "integer"),
        ("resourceVersion", "string"),
        ("resourceVersionMatch", "string"),
        ("sendInitialEvents", "boolean"),
        ("timeoutSeconds", "integer"),
        ("watch", "boolean"),
    ]
    .iter()
    .map(|(n, t)| param(flavor, n, "query", t, n))
    .collect()
}

const PATCH_TYPES: [&str; 4] = [
    "application/apply-patch+yaml",
    "application/json-patch+json",
    "application/merge-patch+json",
    "application/strategic-merge-patch+json",
];

struct OpSpec<'a> {
    action: &'a str,
    verb_doc: String,
    operation_id: String,
    body: Option<String>,
    response: String,
    params: Vec<Value>,
    gvk: Value,
    patch: bool,
    tag: String,
}

fn operation(flavor: Flavor, op: OpSpec<'_>) -> Value {
    let mut params = op.params;
    let mut o = Map::new();
    o.insert("tags".into(), json!([op.tag]));
    o.insert("description".into(), json!(op.verb_doc));
    o.insert("operationId".into(), json!(op.operation_id));
    match flavor {
        Flavor::V2 => {
            if let Some(body) = &op.body {
                params.insert(
                    0,
                    json!({"name": "body", "in": "body", "required": true, "schema": flavor.ref_to(body)}),
                );
            }
            if op.patch {
                o.insert("consumes".into(), json!(PATCH_TYPES));
            } else {
                o.insert("consumes".into(), json!(["*/*"]));
            }
            o.insert(
                "produces".into(),
                json!(["application/json", "application/yaml"]),
            );
            o.insert("schemes".into(), json!(["https"]));
            o.insert("parameters".into(), Value::Array(params));
            let ok = json!({"description": "OK", "schema": flavor.ref_to(&op.response)});
            o.insert(
                "responses".into(),
                json!({"200": ok, "401": {"description": "Unauthorized"}}),
            );
        }
        Flavor::V3 => {
            o.insert("parameters".into(), Value::Array(params));
            if let Some(body) = &op.body {
                let types: Vec<&str> = if op.patch {
                    PATCH_TYPES.to_vec()
                } else {
                    vec!["*/*"]
                };
                let content: Map<String, Value> = types
                    .into_iter()
                    .map(|t| (t.to_string(), json!({"schema": flavor.ref_to(body)})))
                    .collect();
                o.insert(
                    "requestBody".into(),
                    json!({"content": content, "required": true}),
                );
            }
            let schema = flavor.ref_to(&op.response);
            o.insert(
                "responses".into(),
                json!({
                    "200": {"description": "OK", "content": {
                        "application/json": {"schema": schema.clone()},
                        "application/yaml": {"schema": schema},
                    }},
                    "401": {"description": "Unauthorized"},
                }),
            );
        }
    }
    o.insert("x-kubernetes-action".into(), json!(op.action));
    o.insert("x-kubernetes-group-version-kind".into(), op.gvk);
    Value::Object(o)
}

/// "apps_v1" / "core_v1" tag and the "AppsV1" / "CoreV1" operationId infix, as
/// Kubernetes derives them from the group's first label.
fn tag_and_infix(group: &str, version: &str) -> (String, String) {
    let label = if group.is_empty() {
        "core".to_string()
    } else {
        group
            .trim_end_matches(".k8s.io")
            .split('.')
            .map(capitalize)
            .collect::<Vec<_>>()
            .join("")
    };
    let tag = format!("{}_{version}", label.to_lowercase());
    (
        tag,
        format!("{}{}", capitalize(&label), capitalize(version)),
    )
}

fn capitalize(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().collect::<String>() + c.as_str(),
        None => String::new(),
    }
}

/// Paths for one resource: collection, item, and the status/scale subresources.
fn resource_paths(r: &Resource, flavor: Flavor, paths: &mut Map<String, Value>) {
    let prefix = if r.group.is_empty() {
        format!("/api/{}", r.version)
    } else {
        format!("/apis/{}/{}", r.group, r.version)
    };
    let (tag, infix) = tag_and_infix(r.group, r.version);
    let scope = if r.namespaced { "Namespaced" } else { "" };
    let def = (r.ops.definition)();
    let list_def = list_definition_name(r);
    let status_def = meta::Status::schema_name().into_owned();
    let delete_def = meta::DeleteOptions::schema_name().into_owned();
    let patch_def = meta::Patch::schema_name().into_owned();
    let my_gvk = gvk(r.group, r.version, r.kind);
    let pretty = param(
        flavor,
        "pretty",
        "query",
        "string",
        "If 'true', then the output is pretty printed.",
    );
    let ns_param = param(
        flavor,
        "namespace",
        "path",
        "string",
        "object name and auth scope, such as for teams and projects",
    );
    let name_param = |what: &str| {
        param(
            flavor,
            "name",
            "path",
            "string",
            &format!("name of the {what}"),
        )
    };
    let collection = if r.namespaced {
        format!("{prefix}/namespaces/{{namespace}}/{}", r.plural)
    } else {
        format!("{prefix}/{}", r.plural)
    };
    let item = format!("{collection}/{{name}}");
    let mk = |action: &str,
              verb: &str,
              doc: String,
              body: Option<&str>,
              response: &str,
              params: Vec<Value>,
              patch: bool,
              g: &Value,
              suffix: &str| {
        operation(
            flavor,
            OpSpec {
                action,
                verb_doc: doc,
                operation_id: format!("{verb}{infix}{scope}{}{suffix}", r.kind),
                body: body.map(str::to_string),
                response: response.to_string(),
                params,
                gvk: g.clone(),
                patch,
                tag: tag.clone(),
            },
        )
    };

    let mut coll_params = vec![pretty.clone()];
    let mut item_params = vec![name_param(r.kind), pretty.clone()];
    if r.namespaced {
        coll_params.insert(0, ns_param.clone());
        item_params.insert(1, ns_param.clone());
    }

    paths.insert(
        collection,
        json!({
            "get": mk("list", "list", format!("list or watch objects of kind {}", r.kind), None, &list_def, list_params(flavor), false, &my_gvk, ""),
            "post": mk("post", "create", format!("create a {}", r.kind), Some(&def), &def, write_params(flavor, false), false, &my_gvk, ""),
            "delete": mk("deletecollection", "deleteCollection", format!("delete collection of {}", r.kind), Some(&delete_def), &status_def, list_params(flavor), false, &my_gvk, ""),
            "parameters": coll_params,
        }),
    );
    paths.insert(
        item.clone(),
        json!({
            "get": mk("get", "read", format!("read the specified {}", r.kind), None, &def, vec![], false, &my_gvk, ""),
            "put": mk("put", "replace", format!("replace the specified {}", r.kind), Some(&def), &def, write_params(flavor, false), false, &my_gvk, ""),
            "patch": mk("patch", "patch", format!("partially update the specified {}", r.kind), Some(&patch_def), &def, write_params(flavor, true), true, &my_gvk, ""),
            "delete": mk("delete", "delete", format!("delete a {}", r.kind), Some(&delete_def), &status_def, vec![param(flavor, "dryRun", "query", "string", DRY_RUN_DOC)], false, &my_gvk, ""),
            "parameters": item_params.clone(),
        }),
    );
    if r.namespaced {
        paths.insert(
            format!("{prefix}/{}", r.plural),
            json!({
                "get": mk("list", "list", format!("list or watch objects of kind {}", r.kind), None, &list_def, list_params(flavor), false, &my_gvk, "ForAllNamespaces"),
                "parameters": [pretty.clone()],
            }),
        );
    }
    let mut sub = |name: &str, def: &str, g: &Value, suffix: &str| {
        paths.insert(
            format!("{item}/{name}"),
            json!({
                "get": mk("get", "read", format!("read {name} of the specified {}", r.kind), None, def, vec![], false, g, suffix),
                "put": mk("put", "replace", format!("replace {name} of the specified {}", r.kind), Some(def), def, write_params(flavor, false), false, g, suffix),
                "patch": mk("patch", "patch", format!("partially update {name} of the specified {}", r.kind), Some(&patch_def), def, write_params(flavor, true), true, g, suffix),
                "parameters": item_params.clone(),
            }),
        );
    };
    if r.has_status {
        sub("status", &def, &my_gvk, "Status");
    }
    if r.has_scale {
        let scale = k8s_openapi::api::autoscaling::v1::Scale::schema_name().into_owned();
        sub("scale", &scale, &gvk("autoscaling", "v1", "Scale"), "Scale");
    }
}

fn all_paths(resources: &[&Resource], flavor: Flavor) -> Map<String, Value> {
    let mut paths = Map::new();
    for r in resources {
        resource_paths(r, flavor, &mut paths);
    }
    paths
}

fn v3_document(resources: &[&Resource]) -> Value {
    json!({
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes", "version": "unversioned"},
        "paths": all_paths(resources, Flavor::V3),
        "components": {
            "schemas": definitions(resources, Flavor::V3),
            "securitySchemes": {"BearerToken": {"type": "apiKey", "description": "Bearer Token authentication", "name": "authorization", "in": "header"}},
        },
    })
}

fn v2_document(resources: &[&Resource]) -> Value {
    json!({
        "swagger": "2.0",
        "info": {"title": "Kubernetes", "version": "unversioned"},
        "paths": all_paths(resources, Flavor::V2),
        "definitions": definitions(resources, Flavor::V2),
        "securityDefinitions": {"BearerToken": {"type": "apiKey", "description": "Bearer Token authentication", "name": "authorization", "in": "header"}},
        "security": [{"BearerToken": []}],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(path: &str) -> Value {
        serde_json::from_slice(v3_group_version(path).expect("served")).expect("json")
    }

    /// Every `$ref` in `v` must resolve inside `defs` (and use `prefix`).
    fn check_refs(v: &Value, prefix: &str, defs: &Map<String, Value>) {
        match v {
            Value::Object(o) => {
                if let Some(Value::String(r)) = o.get("$ref") {
                    let name = r
                        .strip_prefix(prefix)
                        .unwrap_or_else(|| panic!("bad ref {r}"));
                    assert!(defs.contains_key(name), "dangling ref {r}");
                }
                o.values().for_each(|x| check_refs(x, prefix, defs));
            }
            Value::Array(a) => a.iter().for_each(|x| check_refs(x, prefix, defs)),
            _ => {}
        }
    }

    #[test]
    fn root_lists_every_group_version() {
        let root = v3_root();
        let paths = root["paths"].as_object().unwrap();
        for r in RESOURCES {
            let p = gv_path(r.group, r.version);
            let url = paths[&p]["serverRelativeURL"].as_str().unwrap();
            assert!(url.starts_with(&format!("/openapi/v3/{p}?hash=")));
            assert!(v3_group_version(&p).is_some());
            assert!(v3_group_version(url).is_some());
        }
        assert!(v3_group_version("apis/nope/v1").is_none());
    }

    /// Mirrors QueryParamVerifierV3: every PATCH op for a kind must carry fieldValidation
    /// (Go map order is random, so the first one found must already be right).
    #[test]
    fn field_validation_supported_for_every_kind() {
        for r in RESOURCES {
            let doc = parse(&gv_path(r.group, r.version));
            let want = gvk(r.group, r.version, r.kind);
            let mut found = 0;
            for (_, item) in doc["paths"].as_object().unwrap() {
                let Some(patch) = item.get("patch") else {
                    continue;
                };
                if patch["x-kubernetes-group-version-kind"] != want {
                    continue;
                }
                found += 1;
                let params = patch["parameters"].as_array().unwrap();
                assert!(
                    params.iter().any(|p| p["name"] == "fieldValidation"),
                    "{}",
                    r.kind
                );
            }
            assert!(found >= 1, "no PATCH for {}", r.kind);
        }
    }

    #[test]
    fn schemas_are_tagged_and_refs_resolve() {
        for r in RESOURCES {
            let doc = parse(&gv_path(r.group, r.version));
            let schemas = doc["components"]["schemas"].as_object().unwrap();
            let def = &schemas[&(r.ops.definition)()];
            assert_eq!(
                def["x-kubernetes-group-version-kind"],
                json!([gvk(r.group, r.version, r.kind)])
            );
            assert!(schemas.contains_key(&list_definition_name(r)));
            check_refs(&doc, "#/components/schemas/", schemas);
        }
        let v2: Value = serde_json::from_slice(v2_json()).unwrap();
        let defs = v2["definitions"].as_object().unwrap();
        check_refs(&v2, "#/definitions/", defs);
        assert_eq!(v2["swagger"], "2.0");
        assert!(defs.contains_key("io.k8s.api.apps.v1.Deployment"));
    }

    #[test]
    fn v3_wraps_ref_siblings_in_all_of() {
        let doc = parse("apis/apps/v1");
        let spec =
            &doc["components"]["schemas"]["io.k8s.api.apps.v1.Deployment"]["properties"]["spec"];
        assert!(spec.get("$ref").is_none());
        assert_eq!(
            spec["allOf"][0]["$ref"],
            "#/components/schemas/io.k8s.api.apps.v1.DeploymentSpec"
        );
    }

    #[test]
    fn v2_protobuf_stub_is_a_document() {
        // swagger = "2.0" (field 1), then info (field 2) with title "skiff".
        let doc = v2_protobuf_stub();
        assert_eq!(&doc[..5], b"\x0a\x032.0");
        assert_eq!(doc[5], 0x12);
        assert_eq!(&doc[7..14], b"\x0a\x05skiff");
    }
}
