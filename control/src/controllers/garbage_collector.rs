//! Garbage collector over ownerReferences, for the kinds in `KINDS` (as owners and as
//! dependents; owners of any other built-in kind are still checked by a GET).
//!
//! - Background: a dependent whose owners are all gone (absent, or a different uid) is
//!   deleted; one with some live owners loses the references to the dead ones.
//! - Foreground: an owner with the `foregroundDeletion` finalizer ("waiting") gets its
//!   dependents deleted; once none with blockOwnerDeletion=true is left, the finalizer
//!   is removed and the apiserver drops the owner.
//! - Orphan: an owner with the `orphan` finalizer has its reference removed from every
//!   dependent, then the finalizer is removed.
//!
//! Inputs: one metadata-only watch per kind (PartialObjectMetadata, as Kubernetes' collector
//! uses metadata informers: owners, finalizers and deletion are all in metadata) feeding a kube-runtime Controller (its store doubles as the
//! dependency index: "who points at uid X") and, from the same events, the wakeups that
//! turn an owner's deletion into reconciles of its dependents (a Controller never
//! reconciles an object that is gone, so it cannot do this itself). Every decision to delete or patch is
//! re-checked against a fresh GET, never against the (possibly stale) cache.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, PartialObjectMeta, Patch, PatchParams,
    Preconditions,
};
use kube::runtime::WatchStreamExt;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::watcher::{self, Event};
use kube::{Client, ResourceExt};
use serde_json::json;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;

use super::namespace::api_resource;
use super::{Backoff, Error, Result, is_conflict, is_not_found};
use crate::apiserver::resources::{self, Resource};

const COMPONENT: &str = "garbage-collector";
pub const FOREGROUND: &str = "foregroundDeletion";
pub const ORPHAN: &str = "orphan";

/// Kinds the collector watches (plural names in the resource table).
pub const KINDS: &[&str] = &[
    "pods",
    "replicasets",
    "deployments",
    "daemonsets",
    "controllerrevisions",
    "endpointslices",
    "services",
    "configmaps",
    "secrets",
];

/// What the collector knows of an object: its metadata.
type Meta = PartialObjectMeta<DynamicObject>;

/// While waiting on dependents, look again this often (the cache may lag the API).
const POLL: Duration = Duration::from_secs(1);
/// Safety net for owners of kinds not watched here: their deletion wakes nobody.
const RESYNC: Duration = Duration::from_secs(300);

struct Kind {
    res: &'static Resource,
    ar: ApiResource,
    store: Store<Meta>,
    wake: mpsc::UnboundedSender<ObjectRef<Meta>>,
}

pub struct Gc {
    client: Client,
    kinds: Vec<Kind>,
    backoff: Backoff,
}

pub async fn run(client: Client) {
    // Stores first (the Gc holds them), then one watch per kind feeding both the
    // kind's Controller and the owner-change wakeups: every object event is sent and
    // decoded once for the collector.
    let mut kinds = Vec::new();
    let mut writers = Vec::new();
    for plural in KINDS {
        let res = resources::RESOURCES
            .iter()
            .find(|r| r.plural == *plural)
            .expect("GC kind is in the resource table");
        let ar = api_resource(res);
        let writer = reflector::store::Writer::new(ar.clone());
        let (tx, rx) = mpsc::unbounded_channel();
        kinds.push(Kind {
            res,
            ar,
            store: writer.as_reader(),
            wake: tx,
        });
        writers.push((writer, rx));
    }
    let gc = Arc::new(Gc {
        client: client.clone(),
        kinds,
        backoff: Backoff::default(),
    });
    let mut tasks = tokio::task::JoinSet::new();
    for (idx, (writer, rx)) in writers.into_iter().enumerate() {
        let kind = &gc.kinds[idx];
        // Api<PartialObjectMeta<_>> lists and watches with Accept: ...as=PartialObjectMetadata.
        let api: Api<Meta> = Api::all_with(client.clone(), &kind.ar);
        let watching = gc.clone();
        let objects = watcher::watcher(api, watcher::Config::default())
            .default_backoff()
            .reflect(writer)
            .inspect(move |ev| watching.on_watch_event(idx, ev))
            .applied_objects();
        let ctrl = Controller::for_stream_with(objects, kind.store.clone(), kind.ar.clone())
            .reconcile_on(UnboundedReceiverStream::new(rx));
        let gc2 = gc.clone();
        tasks.spawn(async move {
            let stream = ctrl.run(
                move |obj, gc| reconcile(obj, gc, idx),
                move |obj, err, gc| error_policy(obj, err, gc, idx),
                gc2,
            );
            super::drain(COMPONENT, stream).await;
        });
    }
    // Every task runs forever; the first to end (shutdown) ends the collector.
    tasks.join_next().await;
}

fn error_policy(obj: Arc<Meta>, err: &Error, gc: Arc<Gc>, idx: usize) -> Action {
    let key = obj_key(&obj, gc.kinds[idx].res);
    let wait = gc.backoff.failed(&key);
    tracing::warn!("gc {key}: {err}; retrying in {wait:?}");
    Action::requeue(wait)
}

fn obj_key(obj: &Meta, res: &Resource) -> String {
    format!(
        "{} {}/{}",
        res.kind,
        obj.namespace().unwrap_or_default(),
        obj.name_any()
    )
}

fn refs(meta: &ObjectMeta) -> &[OwnerReference] {
    meta.owner_references.as_deref().unwrap_or_default()
}

fn has_finalizer(meta: &ObjectMeta, f: &str) -> bool {
    meta.finalizers.iter().flatten().any(|x| x == f)
}

impl Gc {
    /// Turns "owner X went away or started deleting" into reconciles of X's dependents,
    /// and "dependent went away" into a reconcile of its owners (a foreground owner may
    /// be done). A Controller never reconciles an object that is gone, so it cannot do
    /// this itself.
    fn on_watch_event(&self, idx: usize, ev: &Result<Event<Meta>, watcher::Error>) {
        match ev {
            Ok(Event::Delete(obj)) => {
                self.wake_dependents(obj);
                self.wake_owners(obj);
            }
            Ok(Event::Apply(obj) | Event::InitApply(obj))
                if obj.metadata.deletion_timestamp.is_some() =>
            {
                self.wake_dependents(obj);
            }
            Ok(_) => {}
            Err(e) => tracing::debug!("gc watch {}: {e}", self.kinds[idx].res.plural),
        }
    }

    /// Dependents of `uid` across all watched kinds, from the caches.
    fn dependents(&self, uid: &str) -> Vec<(usize, Arc<Meta>)> {
        let mut out = Vec::new();
        for (i, k) in self.kinds.iter().enumerate() {
            for o in k.store.state() {
                if refs(&o.metadata).iter().any(|r| r.uid == uid) {
                    out.push((i, o));
                }
            }
        }
        out
    }

    fn wake(&self, idx: usize, obj: &Meta) {
        let k = &self.kinds[idx];
        let mut r = ObjectRef::new_with(&obj.name_any(), k.ar.clone());
        if let Some(ns) = obj.namespace() {
            r = r.within(&ns);
        }
        let _ = k.wake.send(r);
    }

    fn wake_dependents(&self, owner: &Meta) {
        let Some(uid) = owner.uid() else { return };
        for (i, d) in self.dependents(&uid) {
            self.wake(i, &d);
        }
    }

    fn wake_owners(&self, dependent: &Meta) {
        for r in refs(&dependent.metadata) {
            if let Some(i) = self
                .kinds
                .iter()
                .position(|k| k.res.api_version() == r.api_version && k.res.kind == r.kind)
            {
                let mut o = ObjectRef::new_with(&r.name, self.kinds[i].ar.clone());
                if self.kinds[i].res.namespaced
                    && let Some(ns) = dependent.namespace()
                {
                    o = o.within(&ns);
                }
                let _ = self.kinds[i].wake.send(o);
            }
        }
    }

    /// The owner `r` is in this collector's caches, with `r`'s uid, and not being deleted.
    /// False for kinds not watched here (they are checked live).
    fn cached_owner_is_solid(&self, r: &OwnerReference, ns: Option<&str>) -> bool {
        let Some(kind) = self
            .kinds
            .iter()
            .find(|k| k.res.api_version() == r.api_version && k.res.kind == r.kind)
        else {
            return false;
        };
        let mut key = ObjectRef::new_with(&r.name, kind.ar.clone());
        if kind.res.namespaced {
            let Some(ns) = ns else { return false };
            key = key.within(ns);
        }
        kind.store.get(&key).is_some_and(|o| {
            o.uid().as_deref() == Some(r.uid.as_str()) && o.metadata.deletion_timestamp.is_none()
        })
    }

    fn api(&self, res: &Resource, ns: Option<&str>) -> Api<DynamicObject> {
        let ar = api_resource(res);
        match (res.namespaced, ns) {
            (true, Some(ns)) => Api::namespaced_with(self.client.clone(), ns, &ar),
            _ => Api::all_with(self.client.clone(), &ar),
        }
    }
}

/// What an ownerReference points at, seen live.
enum OwnerState {
    Solid,
    Dangling,
    /// Being deleted in the foreground: its dependents must go first.
    Waiting,
}

async fn reconcile(obj: Arc<Meta>, gc: Arc<Gc>, idx: usize) -> Result<Action> {
    let res = gc.kinds[idx].res;
    let key = obj_key(&obj, res);
    let action = if obj.metadata.deletion_timestamp.is_some() {
        if has_finalizer(&obj.metadata, ORPHAN) {
            orphan_dependents(&gc, &obj, res).await?
        } else if has_finalizer(&obj.metadata, FOREGROUND) {
            delete_dependents_first(&gc, &obj, res).await?
        } else {
            Action::await_change()
        }
    } else if refs(&obj.metadata).is_empty() {
        Action::await_change()
    } else {
        collect_if_orphaned(&gc, &obj, res).await?
    };
    gc.backoff.succeeded(&key);
    Ok(action)
}

/// The dependent side: delete it when no owner is alive, drop references to dead owners.
async fn collect_if_orphaned(gc: &Gc, cached: &Meta, res: &Resource) -> Result<Action> {
    let ns = cached.namespace();
    // Graph first, as Kubernetes' collector does: when every owner is in the caches with
    // the same uid and is not being deleted, there is nothing to do and no request is
    // made (an owner's later deletion wakes this object again through
    // `watch_owner_changes`). Only a possibly dangling or leaving owner is checked live.
    if refs(&cached.metadata)
        .iter()
        .all(|r| gc.cached_owner_is_solid(r, ns.as_deref()))
    {
        return Ok(Action::requeue(RESYNC));
    }
    let api = gc.api(res, ns.as_deref());
    // Decide on the live object: the cache may predate an orphaning patch.
    let Some(obj) = api.get_metadata_opt(&cached.name_any()).await? else {
        return Ok(Action::await_change());
    };
    if obj.metadata.deletion_timestamp.is_some() || refs(&obj.metadata).is_empty() {
        return Ok(Action::await_change());
    }
    let mut solid = Vec::new();
    let mut dead = 0;
    let mut waiting = 0;
    for r in refs(&obj.metadata) {
        match owner_state(gc, r, ns.as_deref()).await? {
            OwnerState::Solid => solid.push(r.clone()),
            OwnerState::Dangling => dead += 1,
            OwnerState::Waiting => waiting += 1,
        }
    }
    if dead + waiting == 0 {
        return Ok(Action::requeue(RESYNC));
    }
    if !solid.is_empty() {
        // Still owned by someone alive: just forget the dead or leaving owners.
        let patch = json!({"metadata": {"resourceVersion": obj.resource_version(), "ownerReferences": solid}});
        patch_or_gone(&api, &obj.name_any(), &patch).await?;
        return Ok(Action::requeue(RESYNC));
    }
    // A waiting owner wants its whole subtree gone before it goes: delete this one in
    // the foreground too when it has dependents of its own.
    let foreground = waiting > 0 && !gc.dependents(&obj.uid().unwrap_or_default()).is_empty();
    let dp = DeleteParams {
        preconditions: Some(Preconditions {
            uid: obj.uid(),
            resource_version: obj.resource_version(),
        }),
        ..if foreground {
            DeleteParams::foreground()
        } else {
            DeleteParams::background()
        }
    };
    match api.delete(&obj.name_any(), &dp).await {
        Ok(_) => tracing::info!(
            "gc: deleted {} {}/{} (owners {})",
            res.kind,
            ns.unwrap_or_default(),
            obj.name_any(),
            if waiting > 0 {
                "deleting in foreground"
            } else {
                "gone"
            }
        ),
        Err(e) if is_not_found(&e) => {}
        Err(e) => return Err(e.into()),
    }
    Ok(Action::await_change())
}

async fn owner_state(gc: &Gc, r: &OwnerReference, ns: Option<&str>) -> Result<OwnerState> {
    let Some(res) = resources::by_kind(&r.api_version, &r.kind) else {
        // A kind this apiserver does not serve cannot be checked: leave it alone.
        return Ok(OwnerState::Solid);
    };
    let api = gc.api(res, ns);
    match api.get_metadata_opt(&r.name).await? {
        None => Ok(OwnerState::Dangling),
        Some(o) if o.uid().as_deref() != Some(r.uid.as_str()) => Ok(OwnerState::Dangling),
        Some(o)
            if o.metadata.deletion_timestamp.is_some()
                && has_finalizer(&o.metadata, FOREGROUND) =>
        {
            Ok(OwnerState::Waiting)
        }
        Some(_) => Ok(OwnerState::Solid),
    }
}

/// Foreground deletion, owner side: wake the dependents (their reconcile deletes them)
/// and drop the finalizer once nothing blocking is left.
async fn delete_dependents_first(gc: &Gc, owner: &Meta, res: &Resource) -> Result<Action> {
    let uid = owner.uid().unwrap_or_default();
    let deps = gc.dependents(&uid);
    let mut blocking = 0;
    for (i, d) in &deps {
        if d.metadata.deletion_timestamp.is_none() {
            gc.wake(*i, d);
        }
        if refs(&d.metadata)
            .iter()
            .any(|r| r.uid == uid && r.block_owner_deletion == Some(true))
        {
            blocking += 1;
        }
    }
    if blocking > 0 {
        return Ok(Action::requeue(POLL));
    }
    remove_finalizer(gc, owner, res, FOREGROUND).await?;
    Ok(Action::await_change())
}

/// Orphan deletion: remove the owner from every dependent, then the finalizer.
async fn orphan_dependents(gc: &Gc, owner: &Meta, res: &Resource) -> Result<Action> {
    let uid = owner.uid().unwrap_or_default();
    for (i, d) in gc.dependents(&uid) {
        let dres = gc.kinds[i].res;
        let api = gc.api(dres, d.namespace().as_deref());
        let Some(live) = api.get_metadata_opt(&d.name_any()).await? else {
            continue;
        };
        let kept: Vec<&OwnerReference> = refs(&live.metadata)
            .iter()
            .filter(|r| r.uid != uid)
            .collect();
        if kept.len() == refs(&live.metadata).len() {
            continue;
        }
        let patch = json!({"metadata": {"resourceVersion": live.resource_version(), "ownerReferences": kept}});
        patch_or_gone(&api, &live.name_any(), &patch).await?;
    }
    remove_finalizer(gc, owner, res, ORPHAN).await?;
    Ok(Action::await_change())
}

async fn remove_finalizer(gc: &Gc, owner: &Meta, res: &Resource, f: &str) -> Result<()> {
    let api = gc.api(res, owner.namespace().as_deref());
    let rest: Vec<&String> = owner.finalizers().iter().filter(|x| *x != f).collect();
    // The resourceVersion turns a concurrent change into a 409 and a retry.
    let patch =
        json!({"metadata": {"resourceVersion": owner.resource_version(), "finalizers": rest}});
    patch_or_gone(&api, &owner.name_any(), &patch).await?;
    tracing::info!(
        "gc: removed {f} from {} {}/{}",
        res.kind,
        owner.namespace().unwrap_or_default(),
        owner.name_any()
    );
    Ok(())
}

async fn patch_or_gone(
    api: &Api<DynamicObject>,
    name: &str,
    patch: &serde_json::Value,
) -> Result<()> {
    match api
        .patch(name, &PatchParams::default(), &Patch::Merge(patch))
        .await
    {
        Ok(_) => Ok(()),
        Err(e) if is_not_found(&e) => Ok(()),
        Err(e) if is_conflict(&e) => {
            Err(Error::Other(format!("{name} changed meanwhile; retrying")))
        }
        Err(e) => Err(e.into()),
    }
}
