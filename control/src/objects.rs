//! Helpers over Kubernetes objects shared by the scheduler and the controllers: label
//! selectors, controller ownerReferences, pod phase and readiness.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};

/// The ownerReference with controller=true, if any.
pub fn controller_ref(meta: &ObjectMeta) -> Option<&OwnerReference> {
    meta.owner_references
        .as_deref()
        .unwrap_or_default()
        .iter()
        .find(|o| o.controller == Some(true))
}

/// matchLabels and matchExpressions. A missing or empty selector matches nothing, as
/// for ReplicaSets (validation rejects them anyway).
pub fn selector_matches(sel: &Option<&LabelSelector>, labels: &BTreeMap<String, String>) -> bool {
    let Some(sel) = sel else { return false };
    let ml = sel.match_labels.as_ref();
    let me = sel.match_expressions.as_deref().unwrap_or_default();
    if ml.is_none_or(BTreeMap::is_empty) && me.is_empty() {
        return false;
    }
    if let Some(ml) = ml
        && !ml.iter().all(|(k, v)| labels.get(k) == Some(v))
    {
        return false;
    }
    me.iter().all(|r| {
        let values = r.values.as_deref().unwrap_or_default();
        match r.operator.as_str() {
            "In" => labels.get(&r.key).is_some_and(|v| values.contains(v)),
            "NotIn" => labels.get(&r.key).is_none_or(|v| !values.contains(v)),
            "Exists" => labels.contains_key(&r.key),
            "DoesNotExist" => !labels.contains_key(&r.key),
            _ => false,
        }
    })
}

pub fn is_active(p: &Pod) -> bool {
    p.metadata.deletion_timestamp.is_none()
        && !matches!(
            p.status.as_ref().and_then(|s| s.phase.as_deref()),
            Some("Succeeded" | "Failed")
        )
}

pub fn is_ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

pub fn ready_since(p: &Pod) -> Option<k8s_openapi::jiff::Timestamp> {
    p.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == "Ready" && c.status == "True")?
        .last_transition_time
        .as_ref()
        .map(|t| t.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    fn labels(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn selectors() {
        let sel = LabelSelector {
            match_labels: Some(labels(&[("app", "web")])),
            match_expressions: Some(vec![LabelSelectorRequirement {
                key: "tier".into(),
                operator: "NotIn".into(),
                values: Some(vec!["db".into()]),
            }]),
        };
        assert!(selector_matches(&Some(&sel), &labels(&[("app", "web")])));
        assert!(!selector_matches(
            &Some(&sel),
            &labels(&[("app", "web"), ("tier", "db")])
        ));
        assert!(!selector_matches(&Some(&sel), &labels(&[("app", "api")])));
        assert!(!selector_matches(
            &Some(&LabelSelector::default()),
            &labels(&[("a", "b")])
        ));
        assert!(!selector_matches(&None, &labels(&[])));
    }
}

/// A Pod as the scheduler's and controller-manager's caches hold it: everything but
/// `metadata.managedFields`, which none of them reads and which is the costliest part of
/// a pod to decode and copy (about a third of the scheduler's decoding when every pod
/// carries entries from its creator, the binding and the kubelet). kube-scheduler and
/// kube-controller-manager trim it from their informers the same way. Watch
/// `Api<PodWithoutManagedFields>` and take `.0`, or map a stream with [`without_managed_fields`].
#[derive(Clone, Debug)]
pub struct PodWithoutManagedFields(pub Pod);

impl<'de> serde::Deserialize<'de> for PodWithoutManagedFields {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use k8s_openapi::api::core::v1::{PodSpec, PodStatus};
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

        /// ObjectMeta minus managedFields: serde skips that key without building it.
        #[derive(serde::Deserialize, Default)]
        #[serde(rename_all = "camelCase", default)]
        struct Meta {
            annotations: Option<BTreeMap<String, String>>,
            creation_timestamp: Option<Time>,
            deletion_grace_period_seconds: Option<i64>,
            deletion_timestamp: Option<Time>,
            finalizers: Option<Vec<String>>,
            generate_name: Option<String>,
            generation: Option<i64>,
            labels: Option<BTreeMap<String, String>>,
            name: Option<String>,
            namespace: Option<String>,
            owner_references: Option<Vec<OwnerReference>>,
            resource_version: Option<String>,
            self_link: Option<String>,
            uid: Option<String>,
        }
        #[derive(serde::Deserialize)]
        struct Wire {
            #[serde(default)]
            metadata: Meta,
            spec: Option<PodSpec>,
            status: Option<PodStatus>,
        }
        let Wire {
            metadata: m,
            spec,
            status,
        } = Wire::deserialize(d)?;
        Ok(Self(Pod {
            metadata: ObjectMeta {
                annotations: m.annotations,
                creation_timestamp: m.creation_timestamp,
                deletion_grace_period_seconds: m.deletion_grace_period_seconds,
                deletion_timestamp: m.deletion_timestamp,
                finalizers: m.finalizers,
                generate_name: m.generate_name,
                generation: m.generation,
                labels: m.labels,
                managed_fields: None,
                name: m.name,
                namespace: m.namespace,
                owner_references: m.owner_references,
                resource_version: m.resource_version,
                self_link: m.self_link,
                uid: m.uid,
            },
            spec,
            status,
        }))
    }
}

impl kube::Resource for PodWithoutManagedFields {
    type DynamicType = ();
    type Scope = k8s_openapi::NamespaceResourceScope;

    fn kind(dt: &()) -> std::borrow::Cow<'_, str> {
        Pod::kind(dt)
    }
    fn group(dt: &()) -> std::borrow::Cow<'_, str> {
        Pod::group(dt)
    }
    fn version(dt: &()) -> std::borrow::Cow<'_, str> {
        Pod::version(dt)
    }
    fn plural(dt: &()) -> std::borrow::Cow<'_, str> {
        Pod::plural(dt)
    }
    fn meta(&self) -> &ObjectMeta {
        &self.0.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.0.metadata
    }
}

/// A pod watch (`watcher(Api::<PodWithoutManagedFields>::all(..))`) as events of plain Pods.
pub fn without_managed_fields<E>(
    events: impl futures::Stream<
        Item = Result<kube::runtime::watcher::Event<PodWithoutManagedFields>, E>,
    >,
) -> impl futures::Stream<Item = Result<kube::runtime::watcher::Event<Pod>, E>> {
    use futures::TryStreamExt;
    use kube::runtime::watcher::Event;
    events.map_ok(|ev| match ev {
        Event::Apply(p) => Event::Apply(p.0),
        Event::Delete(p) => Event::Delete(p.0),
        Event::Init => Event::Init,
        Event::InitApply(p) => Event::InitApply(p.0),
        Event::InitDone => Event::InitDone,
    })
}

#[cfg(test)]
mod pod_without_managed_fields_tests {
    use super::*;

    #[test]
    fn decodes_everything_but_managed_fields() {
        let json = serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {
                "name": "p", "namespace": "ns", "uid": "u1", "resourceVersion": "7",
                "labels": {"app": "a"}, "finalizers": ["f"],
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                    "name": "rs", "uid": "u0", "controller": true}],
                "deletionTimestamp": "2026-01-01T00:00:00Z",
                "managedFields": [{"manager": "kubectl", "operation": "Update",
                    "fieldsType": "FieldsV1", "fieldsV1": {"f:spec": {}}}]
            },
            "spec": {"nodeName": "n1", "containers": [{"name": "c", "image": "i"}]},
            "status": {"phase": "Running"}
        });
        let lean: PodWithoutManagedFields = serde_json::from_value(json.clone()).unwrap();
        let mut full: Pod = serde_json::from_value(json).unwrap();
        assert!(full.metadata.managed_fields.take().is_some());
        assert_eq!(lean.0, full);
        // A pod without metadata at all still decodes (as the typed Pod does).
        let bare: PodWithoutManagedFields =
            serde_json::from_value(serde_json::json!({"spec": {"containers": []}})).unwrap();
        assert!(bare.0.metadata.name.is_none());
    }
}
