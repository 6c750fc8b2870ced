//! Namespace controller: the deletion cascade. A Namespace being deleted carries the
//! "kubernetes" finalizer in spec.finalizers; this controller deletes every namespaced
//! object in it, waits until they are gone (pods on nodes and objects with finalizers
//! take a while), reports progress in status.conditions, and then removes the finalizer
//! through the finalize subresource, which lets the apiserver drop the Namespace.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, NamespaceCondition};
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams,
};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use serde_json::json;

use super::{Backoff, Error, Result, done_unless_error, is_not_found, key_of};
use crate::apiserver::resources::{RESOURCES, Resource};

const COMPONENT: &str = "namespace-controller";
const FINALIZER: &str = "kubernetes";
/// How often to look again while content is still going away.
const POLL: Duration = Duration::from_secs(1);

pub struct Ctx {
    client: Client,
    backoff: Backoff,
}

pub async fn run(client: Client) {
    let api: Api<Namespace> = Api::all(client.clone());
    let ctx = Arc::new(Ctx {
        client,
        backoff: Backoff::default(),
    });
    let ctrl = Controller::new(api, watcher::Config::default());
    super::drain(COMPONENT, ctrl.run(reconcile, error_policy, ctx)).await;
}

fn error_policy(ns: Arc<Namespace>, err: &Error, ctx: Arc<Ctx>) -> Action {
    let key = key_of(ns.as_ref());
    let wait = ctx.backoff.failed(&key);
    tracing::warn!("namespace {key}: {err}; retrying in {wait:?}");
    Action::requeue(wait)
}

/// The namespaced kinds whose content a namespace deletion removes (all of them:
/// nothing may outlive its namespace in storage).
pub fn namespaced_resources() -> impl Iterator<Item = &'static Resource> {
    RESOURCES.iter().filter(|r| r.namespaced)
}

pub fn api_resource(r: &Resource) -> ApiResource {
    ApiResource {
        group: r.group.into(),
        version: r.version.into(),
        api_version: r.api_version(),
        kind: r.kind.into(),
        plural: r.plural.into(),
    }
}

async fn reconcile(ns: Arc<Namespace>, ctx: Arc<Ctx>) -> Result<Action> {
    let key = key_of(ns.as_ref());
    if ns.metadata.deletion_timestamp.is_none() {
        return Ok(Action::await_change());
    }
    let has_finalizer = ns
        .spec
        .as_ref()
        .and_then(|s| s.finalizers.as_ref())
        .is_some_and(|f| f.iter().any(|f| f == FINALIZER));
    if !has_finalizer {
        return Ok(Action::await_change());
    }
    let name = ns.name_any();

    // Delete everything (idempotent: objects already terminating are left alone), then
    // count what is still there.
    let mut remaining: Vec<(String, usize)> = Vec::new();
    let mut failures: Vec<String> = Vec::new();
    for r in namespaced_resources() {
        let api: Api<DynamicObject> =
            Api::namespaced_with(ctx.client.clone(), &name, &api_resource(r));
        let items = match api.list(&ListParams::default()).await {
            Ok(l) => l.items,
            Err(e) => {
                failures.push(format!("listing {}: {e}", r.plural));
                continue;
            }
        };
        let mut left = 0;
        for obj in items {
            if obj.metadata.deletion_timestamp.is_none() {
                match api
                    .delete(&obj.name_any(), &DeleteParams::background())
                    .await
                {
                    Ok(either) => {
                        if either.is_left() {
                            left += 1;
                        }
                    }
                    Err(e) if is_not_found(&e) => {}
                    Err(e) => {
                        failures.push(format!("deleting {} {}: {e}", r.plural, obj.name_any()));
                        left += 1;
                    }
                }
            } else {
                left += 1;
            }
        }
        if left > 0 {
            remaining.push((r.group_resource(), left));
        }
    }

    set_conditions(&ctx.client, &ns, &remaining, &failures).await?;
    if !failures.is_empty() {
        return Err(Error::Other(failures.join("; ")));
    }
    if !remaining.is_empty() {
        ctx.backoff.succeeded(&key);
        return Ok(Action::requeue(POLL));
    }

    // Empty: drop our finalizer. The resourceVersion makes a concurrent change a 409,
    // which simply retries.
    let mut updated = (*ns).clone();
    if let Some(spec) = updated.spec.as_mut() {
        spec.finalizers = Some(
            spec.finalizers
                .take()
                .unwrap_or_default()
                .into_iter()
                .filter(|f| f != FINALIZER)
                .collect(),
        );
    }
    updated.metadata.managed_fields = None;
    let api: Api<Namespace> = Api::all(ctx.client.clone());
    match api
        .replace_subresource("finalize", &name, &PostParams::default(), &updated)
        .await
    {
        Ok(_) => {}
        Err(e) if is_not_found(&e) => {}
        Err(e) => return Err(e.into()),
    }
    tracing::info!("namespace {name}: content removed, finalized");
    ctx.backoff.succeeded(&key);
    Ok(Action::await_change())
}

/// The conditions Kubernetes reports on a terminating namespace (the cheap subset).
async fn set_conditions(
    client: &Client,
    ns: &Namespace,
    remaining: &[(String, usize)],
    failures: &[String],
) -> Result<()> {
    let cond = |type_: &str, on: bool, reason: &str, message: String| NamespaceCondition {
        type_: type_.into(),
        status: if on { "True" } else { "False" }.into(),
        reason: Some(reason.into()),
        message: Some(message),
        last_transition_time: Some(super::now()),
    };
    let content = if remaining.is_empty() {
        cond(
            "NamespaceContentRemaining",
            false,
            "ContentRemoved",
            "All content successfully removed".into(),
        )
    } else {
        let list: Vec<String> = remaining
            .iter()
            .map(|(r, n)| format!("{r} has {n} resource instances"))
            .collect();
        cond(
            "NamespaceContentRemaining",
            true,
            "SomeResourcesRemain",
            format!("Some resources are remaining: {}", list.join(", ")),
        )
    };
    let failure = if failures.is_empty() {
        cond(
            "NamespaceDeletionContentFailure",
            false,
            "ContentDeleted",
            "All content successfully deleted, may be waiting on finalization".into(),
        )
    } else {
        cond(
            "NamespaceDeletionContentFailure",
            true,
            "ContentDeletionFailed",
            failures.join("; "),
        )
    };
    let wanted = [content, failure];
    let old = ns
        .status
        .as_ref()
        .and_then(|s| s.conditions.clone())
        .unwrap_or_default();
    let unchanged = wanted.iter().all(|w| {
        old.iter()
            .any(|o| o.type_ == w.type_ && o.status == w.status && o.message == w.message)
    });
    if unchanged {
        return Ok(());
    }
    let mut conditions: Vec<NamespaceCondition> = old
        .into_iter()
        .filter(|o| !wanted.iter().any(|w| w.type_ == o.type_))
        .collect();
    conditions.extend(wanted);
    let api: Api<Namespace> = Api::all(client.clone());
    let patch = json!({"status": {"conditions": conditions}});
    done_unless_error(
        api.patch_status(
            &ns.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await,
    )
}
