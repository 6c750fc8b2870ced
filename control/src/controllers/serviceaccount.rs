//! ServiceAccount controller: every active namespace has a ServiceAccount `default`
//! (pods that name no service account run as it). Woken by namespaces, and by the
//! `default` ServiceAccount of a namespace changing or going away, so a deleted one is
//! recreated.

use std::sync::Arc;

use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Client, ResourceExt};

use super::{Backoff, Error, Result, is_conflict, key_of};

const COMPONENT: &str = "serviceaccount-controller";
const DEFAULT_SA: &str = "default";

pub struct Ctx {
    client: Client,
    backoff: Backoff,
}

pub async fn run(client: Client) {
    let ns_api: Api<Namespace> = Api::all(client.clone());
    let sa_api: Api<ServiceAccount> = Api::all(client.clone());
    // All ServiceAccounts are watched and filtered here rather than with a
    // metadata.name field selector: the apiserver's all-namespaces watch pinned by name
    // currently drops live events.
    let ctrl = Controller::new(ns_api, watcher::Config::default()).watches(
        sa_api,
        watcher::Config::default(),
        |sa: ServiceAccount| {
            (sa.name_any() == DEFAULT_SA)
                .then(|| sa.namespace().map(|ns| ObjectRef::new(&ns)))
                .flatten()
        },
    );
    let ctx = Arc::new(Ctx {
        client,
        backoff: Backoff::default(),
    });
    super::drain(COMPONENT, ctrl.run(reconcile, error_policy, ctx)).await;
}

fn error_policy(ns: Arc<Namespace>, err: &Error, ctx: Arc<Ctx>) -> Action {
    let key = key_of(ns.as_ref());
    let wait = ctx.backoff.failed(&key);
    tracing::warn!("serviceaccounts in {key}: {err}; retrying in {wait:?}");
    Action::requeue(wait)
}

async fn reconcile(ns: Arc<Namespace>, ctx: Arc<Ctx>) -> Result<Action> {
    let key = key_of(ns.as_ref());
    let terminating = ns.metadata.deletion_timestamp.is_some()
        || ns.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Terminating");
    if terminating {
        return Ok(Action::await_change());
    }
    let api: Api<ServiceAccount> = Api::namespaced(ctx.client.clone(), &ns.name_any());
    if api.get_opt(DEFAULT_SA).await?.is_none() {
        let sa = ServiceAccount {
            metadata: ObjectMeta {
                name: Some(DEFAULT_SA.into()),
                ..Default::default()
            },
            ..Default::default()
        };
        match api.create(&PostParams::default(), &sa).await {
            Ok(_) => tracing::info!("created serviceaccount {key}/{DEFAULT_SA}"),
            // Someone (another reconcile, a user) made it first: that is the goal.
            Err(e) if is_conflict(&e) => {}
            Err(e) => return Err(e.into()),
        }
    }
    ctx.backoff.succeeded(&key);
    Ok(Action::await_change())
}
