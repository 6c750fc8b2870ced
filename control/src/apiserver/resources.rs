//! The table of built-in resources the generic registry serves. Everything resource
//! specific that is only data (names, scope, subresources, the Rust type behind it) is
//! here; behaviour (defaulting, validation, tables) dispatches on `kind`.

use k8s_openapi::api::{apps, coordination, core, discovery, networking, rbac};
use serde_json::Value;

/// Operations on the k8s-openapi type behind a resource, erased to plain functions so
/// the registry can stay generic over `serde_json::Value`.
#[derive(Clone, Copy)]
pub struct TypeOps {
    /// Deserializes into the typed struct and serializes back. Fields the type does not
    /// know are dropped, which is how strict field validation finds unknown fields.
    pub round_trip: fn(&Value) -> Result<Value, DecodeError>,
    /// JSON schema of the type (k8s-openapi's schemars impl; definition names are the
    /// OpenAPI ones, e.g. io.k8s.api.apps.v1.Deployment).
    pub schema: fn(&mut schemars::SchemaGenerator) -> schemars::Schema,
    /// OpenAPI definition name, e.g. "io.k8s.api.apps.v1.Deployment".
    pub definition: fn() -> String,
}

/// Why a body could not be decoded into its type, and where ("spec.replicas").
#[derive(Debug, Clone)]
pub struct DecodeError {
    pub path: String,
    pub message: String,
}

fn round_trip<T: serde::de::DeserializeOwned + serde::Serialize>(
    v: &Value,
) -> Result<Value, DecodeError> {
    // From the borrowed Value: no copy of the whole object per write.
    let typed: T = serde_path_to_error::deserialize(v).map_err(|e| DecodeError {
        path: e.path().to_string(),
        message: e.inner().to_string(),
    })?;
    serde_json::to_value(&typed).map_err(|e| DecodeError {
        path: ".".into(),
        message: e.to_string(),
    })
}

fn schema<T: schemars::JsonSchema>(g: &mut schemars::SchemaGenerator) -> schemars::Schema {
    g.subschema_for::<T>()
}

fn definition<T: schemars::JsonSchema>() -> String {
    T::schema_name().into_owned()
}

const fn ops<T>() -> TypeOps
where
    T: serde::de::DeserializeOwned + serde::Serialize + schemars::JsonSchema,
{
    TypeOps {
        round_trip: round_trip::<T>,
        schema: schema::<T>,
        definition: definition::<T>,
    }
}

#[derive(Clone, Copy)]
pub struct Resource {
    /// API group; "" for the legacy core group.
    pub group: &'static str,
    pub version: &'static str,
    pub kind: &'static str,
    pub list_kind: &'static str,
    /// URL segment and storage segment: /registry/<plural>/...
    pub plural: &'static str,
    pub singular: &'static str,
    pub namespaced: bool,
    pub short_names: &'static [&'static str],
    pub categories: &'static [&'static str],
    pub has_status: bool,
    pub has_scale: bool,
    pub ops: TypeOps,
}

impl Resource {
    /// "v1" or "apps/v1".
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// "pods" or "deployments.apps", as Kubernetes names a resource in messages.
    pub fn group_resource(&self) -> String {
        if self.group.is_empty() {
            self.plural.to_string()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }

    /// "Pod" or "Deployment.apps", as Kubernetes names a kind in validation messages.
    pub fn group_kind(&self) -> String {
        if self.group.is_empty() {
            self.kind.to_string()
        } else {
            format!("{}.{}", self.kind, self.group)
        }
    }

    /// Storage prefix for a namespace (or all namespaces / cluster scope when `None`).
    /// Keys are /registry/<plural>/<namespace>/<name> as Kubernetes lays them out.
    pub fn key_prefix(&self, namespace: Option<&str>) -> String {
        // Plurals are unique across the groups skiff serves, so the group is not in the key.
        let base = format!("/registry/{}/", self.plural);
        match (self.namespaced, namespace) {
            (true, Some(ns)) => format!("{base}{ns}/"),
            _ => base,
        }
    }

    pub fn key(&self, namespace: Option<&str>, name: &str) -> String {
        format!("{}{name}", self.key_prefix(namespace))
    }
}

macro_rules! resources {
    ($( $group:literal $version:literal $kind:ident $plural:literal $singular:literal
        namespaced=$ns:literal short=[$($short:literal),*] cats=[$($cat:literal),*]
        status=$status:literal scale=$scale:literal => $ty:ty; )*) => {
        pub static RESOURCES: &[Resource] = &[
            $(Resource {
                group: $group,
                version: $version,
                kind: stringify!($kind),
                list_kind: concat!(stringify!($kind), "List"),
                plural: $plural,
                singular: $singular,
                namespaced: $ns,
                short_names: &[$($short),*],
                categories: &[$($cat),*],
                has_status: $status,
                has_scale: $scale,
                ops: ops::<$ty>(),
            },)*
        ];
    };
}

resources! {
    "" "v1" Pod "pods" "pod" namespaced=true short=["po"] cats=["all"] status=true scale=false => core::v1::Pod;
    "" "v1" Service "services" "service" namespaced=true short=["svc"] cats=["all"] status=true scale=false => core::v1::Service;
    "" "v1" Endpoints "endpoints" "endpoints" namespaced=true short=["ep"] cats=[] status=false scale=false => core::v1::Endpoints;
    "" "v1" Node "nodes" "node" namespaced=false short=["no"] cats=[] status=true scale=false => core::v1::Node;
    "" "v1" Namespace "namespaces" "namespace" namespaced=false short=["ns"] cats=[] status=true scale=false => core::v1::Namespace;
    "" "v1" ConfigMap "configmaps" "configmap" namespaced=true short=["cm"] cats=[] status=false scale=false => core::v1::ConfigMap;
    "" "v1" Secret "secrets" "secret" namespaced=true short=[] cats=[] status=false scale=false => core::v1::Secret;
    "" "v1" ServiceAccount "serviceaccounts" "serviceaccount" namespaced=true short=["sa"] cats=[] status=false scale=false => core::v1::ServiceAccount;
    "" "v1" Event "events" "event" namespaced=true short=["ev"] cats=[] status=false scale=false => core::v1::Event;
    "apps" "v1" Deployment "deployments" "deployment" namespaced=true short=["deploy"] cats=["all"] status=true scale=true => apps::v1::Deployment;
    "apps" "v1" ReplicaSet "replicasets" "replicaset" namespaced=true short=["rs"] cats=["all"] status=true scale=true => apps::v1::ReplicaSet;
    "apps" "v1" DaemonSet "daemonsets" "daemonset" namespaced=true short=["ds"] cats=["all"] status=true scale=false => apps::v1::DaemonSet;
    "apps" "v1" ControllerRevision "controllerrevisions" "controllerrevision" namespaced=true short=[] cats=[] status=false scale=false => apps::v1::ControllerRevision;
    "discovery.k8s.io" "v1" EndpointSlice "endpointslices" "endpointslice" namespaced=true short=[] cats=[] status=false scale=false => discovery::v1::EndpointSlice;
    "networking.k8s.io" "v1" Ingress "ingresses" "ingress" namespaced=true short=["ing"] cats=[] status=true scale=false => networking::v1::Ingress;
    "networking.k8s.io" "v1" IngressClass "ingressclasses" "ingressclass" namespaced=false short=[] cats=[] status=false scale=false => networking::v1::IngressClass;
    "networking.k8s.io" "v1" NetworkPolicy "networkpolicies" "networkpolicy" namespaced=true short=["netpol"] cats=[] status=false scale=false => networking::v1::NetworkPolicy;
    "coordination.k8s.io" "v1" Lease "leases" "lease" namespaced=true short=[] cats=[] status=false scale=false => coordination::v1::Lease;
    "rbac.authorization.k8s.io" "v1" Role "roles" "role" namespaced=true short=[] cats=[] status=false scale=false => rbac::v1::Role;
    "rbac.authorization.k8s.io" "v1" RoleBinding "rolebindings" "rolebinding" namespaced=true short=[] cats=[] status=false scale=false => rbac::v1::RoleBinding;
    "rbac.authorization.k8s.io" "v1" ClusterRole "clusterroles" "clusterrole" namespaced=false short=[] cats=[] status=false scale=false => rbac::v1::ClusterRole;
    "rbac.authorization.k8s.io" "v1" ClusterRoleBinding "clusterrolebindings" "clusterrolebinding" namespaced=false short=[] cats=[] status=false scale=false => rbac::v1::ClusterRoleBinding;
}

/// Groups in the order discovery lists them (core first, as Kubernetes does).
pub fn groups() -> Vec<&'static str> {
    let mut out: Vec<&'static str> = Vec::new();
    for r in RESOURCES {
        if !out.contains(&r.group) {
            out.push(r.group);
        }
    }
    out
}

/// Looks up a resource by group, version and plural (URL form).
pub fn by_plural(group: &str, version: &str, plural: &str) -> Option<&'static Resource> {
    RESOURCES
        .iter()
        .find(|r| r.group == group && r.version == version && r.plural == plural)
}

/// Looks up a resource by apiVersion ("apps/v1") and kind.
pub fn by_kind(api_version: &str, kind: &str) -> Option<&'static Resource> {
    RESOURCES
        .iter()
        .find(|r| r.api_version() == api_version && r.kind == kind)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookup_and_keys() {
        let d = by_plural("apps", "v1", "deployments").unwrap();
        assert_eq!(d.kind, "Deployment");
        assert_eq!(
            d.key(Some("default"), "web"),
            "/registry/deployments/default/web"
        );
        let n = by_kind("v1", "Namespace").unwrap();
        assert_eq!(
            n.key(None, "kube-system"),
            "/registry/namespaces/kube-system"
        );
        assert_eq!((d.ops.definition)(), "io.k8s.api.apps.v1.Deployment");
        let r = by_plural("rbac.authorization.k8s.io", "v1", "roles").unwrap();
        assert_eq!(r.key(Some("a"), "b"), "/registry/roles/a/b");
    }

    #[test]
    fn round_trip_drops_unknown_fields() {
        let cm = by_kind("v1", "ConfigMap").unwrap();
        let v = serde_json::json!({"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"x"},"bogus":1});
        let out = (cm.ops.round_trip)(&v).unwrap();
        assert!(out.get("bogus").is_none());
        assert_eq!(out["metadata"]["name"], "x");
    }
}
