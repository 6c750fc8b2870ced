//! The generic registry: one implementation of get/list/create/update/patch/delete/watch
//! for every resource in `resources::RESOURCES`, over `serde_json::Value` objects kept
//! in `Store`. Resource-specific behaviour is data (the table), defaulting, validation
//! and the few hooks below (Service IP/port allocation, pod binding, namespace finalize).

use std::collections::{HashMap, HashSet};
use std::net::Ipv4Addr;
use std::sync::Arc;

use base64::Engine;
use futures::{Stream, StreamExt};
use serde_json::{Value, json};

use super::resources::{self, Resource};
use super::selectors::{FieldSelector, LabelSelector};
use super::service_alloc::{Held, ServiceAllocations};
use super::status::{ApiError, ApiResult, Cause};
use super::validation::{self, FieldValidation};
use super::{apply, defaults, patch};
use crate::storage::{EventKind, KeyValue, Revision, StorageError, Store};

/// Service ClusterIPs come from 10.96.0.0/12; NodePorts from 30000-32767.
const SERVICE_CIDR_BASE: u32 = u32::from_be_bytes([10, 96, 0, 0]);
const SERVICE_CIDR_SIZE: u32 = 1 << 20;
/// The lowest addresses are kept for fixed assignments (10.96.0.1 kubernetes, 10.96.0.10 DNS).
const SERVICE_CIDR_STATIC: u32 = 256;
const NODE_PORT_RANGE: std::ops::RangeInclusive<i64> = 30000..=32767;

/// Options every write shares.
#[derive(Debug, Clone)]
pub struct WriteOptions {
    pub dry_run: bool,
    pub field_validation: FieldValidation,
    pub field_manager: String,
}

/// What a write produced: the object and any warnings for the Warning header.
pub struct WriteResult {
    pub object: Value,
    pub warnings: Vec<String>,
    pub created: bool,
}

#[derive(Debug, Default, Clone)]
pub struct ListOptions {
    pub label_selector: LabelSelector,
    pub field_selector: FieldSelector,
    pub limit: Option<usize>,
    pub continue_token: Option<String>,
}

pub struct ListOutput {
    pub items: Vec<Value>,
    pub revision: Revision,
    pub continue_token: Option<String>,
    pub remaining: Option<i64>,
}

#[derive(Debug, Default, Clone)]
pub struct DeleteOptions {
    pub grace_period_seconds: Option<i64>,
    pub propagation_policy: Option<String>,
    pub precondition_uid: Option<String>,
    pub precondition_rv: Option<String>,
    pub dry_run: bool,
}

/// One event of a watch as the handler encodes it.
#[derive(Debug, Clone)]
pub enum WatchItem {
    Added(Arc<SharedObject>),
    Modified(Arc<SharedObject>),
    Deleted(Arc<SharedObject>),
    Bookmark(Revision, bool),
    Error(ApiError),
}

/// A watched object, decoded once per store event and shared by every watcher that
/// receives the event; its JSON encoding is made on first use and shared too.
#[derive(Debug)]
pub struct SharedObject {
    pub value: Value,
    json: std::sync::OnceLock<bytes::Bytes>,
}

impl SharedObject {
    pub fn new(value: Value) -> Arc<Self> {
        Arc::new(Self {
            value,
            json: std::sync::OnceLock::new(),
        })
    }

    /// The object as JSON (encoded once, except when two watchers race to it).
    pub fn json(&self) -> &[u8] {
        if let Some(json) = self.json.get() {
            return json;
        }
        // Encoded outside the OnceLock: its initializer would block (futex, the whole
        // tokio worker thread) every other watcher wanting it meanwhile.
        let json: bytes::Bytes = serde_json::to_vec(&self.value).unwrap_or_default().into();
        self.json.get_or_init(|| json)
    }
}

/// The event's object with its resourceVersion, decoded by the first watcher that needs it
/// (kept in the event's memo for the others). None if the stored bytes are not JSON.
fn decoded(ev: &crate::storage::WatchEvent) -> Option<Arc<SharedObject>> {
    let decode = || {
        let mut v: Value = serde_json::from_slice(&ev.value).ok()?;
        set_rv(&mut v, ev.revision);
        Some(SharedObject::new(v))
    };
    // Decoded outside the OnceLock so a second watcher never blocks its worker thread
    // waiting for the first one's decode; a race costs one extra decode.
    let memo = match ev.memo.get() {
        Some(memo) => memo,
        None => {
            let mine = Arc::new(decode()) as Arc<dyn std::any::Any + Send + Sync>;
            ev.memo.get_or_init(|| mine)
        }
    };
    match memo.downcast_ref::<Option<Arc<SharedObject>>>() {
        Some(shared) => shared.clone(),
        // Another reader put something else in the memo: decode for ourselves.
        None => decode(),
    }
}

pub struct Registry {
    pub store: Arc<dyn Store>,
    /// Serialises Service IP and NodePort allocation within this apiserver.
    alloc_lock: tokio::sync::Mutex<()>,
    /// What the stored Services hold, followed from a watch (started on first use).
    service_allocations: tokio::sync::OnceCell<ServiceAllocations>,
}

fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

fn now_micro() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

fn name_of(obj: &Value) -> &str {
    obj["metadata"]["name"].as_str().unwrap_or("")
}

/// Parses a stored value and fills metadata.resourceVersion from the store revision.
fn from_kv(kv: &KeyValue) -> ApiResult<Value> {
    let mut v: Value = serde_json::from_slice(&kv.value)
        .map_err(|e| ApiError::internal(format!("corrupt object at {}: {e}", kv.key)))?;
    set_rv(&mut v, kv.mod_revision);
    Ok(v)
}

fn set_rv(v: &mut Value, rv: Revision) {
    if let Some(m) = v.get_mut("metadata").and_then(Value::as_object_mut) {
        m.insert("resourceVersion".into(), Value::String(rv.to_string()));
    }
}

/// Bytes to store: the object without resourceVersion (the store revision is the truth).
fn to_stored(v: &Value) -> Vec<u8> {
    let mut v = v.clone();
    if let Some(m) = v.get_mut("metadata").and_then(Value::as_object_mut) {
        m.remove("resourceVersion");
    }
    serde_json::to_vec(&v).unwrap_or_default()
}

fn parse_rv(s: &str) -> ApiResult<Revision> {
    s.parse::<Revision>().map_err(|_| {
        ApiError::bad_request(format!("invalid resource version {s:?}: expected a number"))
    })
}

/// Continue tokens carry the last key returned (relative to the list prefix) and the revision.
fn encode_continue(rv: Revision, start_after: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(json!({"v": "skiff/1", "rv": rv, "start": start_after}).to_string())
}

fn decode_continue(token: &str) -> ApiResult<(Revision, String)> {
    let bad = || ApiError::bad_request("continue key is not valid: malformed continue token");
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token)
        .map_err(|_| bad())?;
    let v: Value = serde_json::from_slice(&raw).map_err(|_| bad())?;
    let rv = v["rv"].as_i64().ok_or_else(bad)?;
    let start = v["start"].as_str().ok_or_else(bad)?.to_string();
    if start.contains("..") {
        return Err(bad());
    }
    Ok((rv, start))
}

fn random_suffix() -> String {
    use rand::Rng;
    // Kubernetes' generateName alphabet: no vowels, no confusable characters.
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut rng = rand::rng();
    (0..5)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect()
}

/// Whether a change touches anything but metadata and status (bumps metadata.generation).
fn spec_changed(old: &Value, new: &Value) -> bool {
    // Everything but metadata and status, compared in place (no copies of the objects).
    let (Some(o), Some(n)) = (old.as_object(), new.as_object()) else {
        return old != new;
    };
    let tracked = |k: &String| k != "metadata" && k != "status";
    o.keys().filter(|k| tracked(k)).count() != n.keys().filter(|k| tracked(k)).count()
        || o.iter()
            .filter(|(k, _)| tracked(k))
            .any(|(k, v)| n.get(k) != Some(v))
}

impl Registry {
    pub fn new(store: Arc<dyn Store>) -> Self {
        Registry {
            store,
            alloc_lock: tokio::sync::Mutex::new(()),
            service_allocations: tokio::sync::OnceCell::new(),
        }
    }

    fn ns_for<'a>(&self, r: &Resource, ns: Option<&'a str>) -> Option<&'a str> {
        if r.namespaced { ns } else { None }
    }

    pub async fn get(&self, r: &Resource, ns: Option<&str>, name: &str) -> ApiResult<Value> {
        validation::check_path_name(r, name)?;
        let key = r.key(self.ns_for(r, ns), name);
        match self.store.get(&key).await {
            Ok(Some(kv)) => from_kv(&kv),
            Ok(None) => Err(ApiError::not_found(r, name)),
            Err(e) => Err(ApiError::from_storage(e, r, name)),
        }
    }

    async fn get_kv(&self, r: &Resource, ns: Option<&str>, name: &str) -> ApiResult<KeyValue> {
        let key = r.key(self.ns_for(r, ns), name);
        match self.store.get(&key).await {
            Ok(Some(kv)) => Ok(kv),
            Ok(None) => Err(ApiError::not_found(r, name)),
            Err(e) => Err(ApiError::from_storage(e, r, name)),
        }
    }

    pub async fn list(
        &self,
        r: &Resource,
        ns: Option<&str>,
        opts: &ListOptions,
    ) -> ApiResult<ListOutput> {
        let prefix = r.key_prefix(self.ns_for(r, ns));
        let mut start_after = match &opts.continue_token {
            Some(t) => {
                let (_, start) = decode_continue(t)?;
                Some(format!("{prefix}{start}"))
            }
            None => None,
        };
        let filtering = !opts.label_selector.is_empty() || !opts.field_selector.is_empty();
        let mut items = Vec::new();
        // With selectors a page may need several store pages to fill `limit` matches.
        loop {
            let want = opts.limit.map(|l| {
                let missing = l.saturating_sub(items.len()).max(1);
                if filtering { missing.max(500) } else { missing }
            });
            let page = self
                .store
                .list(&prefix, start_after.as_deref(), want)
                .await
                .map_err(ApiError::from)?;
            let mut last_key = None;
            let mut stopped_early = false;
            for (i, kv) in page.items.iter().enumerate() {
                last_key = Some(kv.key.clone());
                let obj = from_kv(kv)?;
                if self.matches(&obj, opts) {
                    items.push(obj);
                    if opts.limit.is_some_and(|l| items.len() >= l) {
                        stopped_early = i + 1 < page.items.len();
                        break;
                    }
                }
            }
            let full = opts.limit.is_some_and(|l| items.len() >= l);
            if full || !page.more || last_key.is_none() {
                let more = page.more || stopped_early;
                let continue_token = match (&last_key, full && more) {
                    (Some(k), true) => Some(encode_continue(page.revision, &k[prefix.len()..])),
                    _ => None,
                };
                // Kubernetes reports remainingItemCount only when it is exact.
                let remaining =
                    if continue_token.is_some() && !filtering && opts.continue_token.is_none() {
                        let total = self.store.count(&prefix).await.map_err(ApiError::from)?;
                        Some(total - items.len() as i64)
                    } else {
                        None
                    };
                return Ok(ListOutput {
                    items,
                    revision: page.revision,
                    continue_token,
                    remaining,
                });
            }
            start_after = last_key;
        }
    }

    fn matches(&self, obj: &Value, opts: &ListOptions) -> bool {
        opts.label_selector.matches(&obj["metadata"]["labels"]) && opts.field_selector.matches(obj)
    }

    async fn check_namespace(
        &self,
        r: &Resource,
        ns: Option<&str>,
        creating: bool,
    ) -> ApiResult<()> {
        if !r.namespaced {
            return Ok(());
        }
        let ns = ns.ok_or_else(|| ApiError::bad_request("a namespace is required"))?;
        let nsr = resources::by_kind("v1", "Namespace").expect("namespaces are served");
        let obj = match self.get(nsr, None, ns).await {
            Ok(o) => o,
            Err(e) if e.code == 404 => return Err(ApiError::namespace_not_found(ns)),
            Err(e) => return Err(e),
        };
        if creating && !obj["metadata"]["deletionTimestamp"].is_null() {
            return Err(ApiError::new(
                403,
                "Forbidden",
                format!(
                    "{} is forbidden: unable to create new content in namespace {ns} because it is being terminated",
                    r.group_resource()
                ),
            ));
        }
        Ok(())
    }

    /// Decodes, defaults and validates a request body for `r` in `ns`.
    fn prepare(
        &self,
        r: &Resource,
        ns: Option<&str>,
        body: Value,
        name_hint: &str,
        fv: FieldValidation,
        warnings: &mut Vec<String>,
    ) -> ApiResult<Value> {
        let decoded = validation::decode(r, body, name_hint)?;
        if !decoded.unknown_fields.is_empty() {
            match fv {
                FieldValidation::Strict => {
                    let list: Vec<String> = decoded
                        .unknown_fields
                        .iter()
                        .map(|f| format!("unknown field {f:?}"))
                        .collect();
                    return Err(ApiError::bad_request(format!(
                        "strict decoding error: {}",
                        list.join(", ")
                    )));
                }
                FieldValidation::Warn => {
                    warnings.extend(
                        decoded
                            .unknown_fields
                            .iter()
                            .map(|f| format!("unknown field {f:?}")),
                    );
                }
                FieldValidation::Ignore => {}
            }
        }
        let mut obj = decoded.object;
        if r.namespaced {
            let body_ns = obj["metadata"]["namespace"].as_str().unwrap_or("");
            let url_ns = ns.unwrap_or("");
            if !body_ns.is_empty() && body_ns != url_ns {
                return Err(ApiError::bad_request(
                    "the namespace of the provided object does not match the namespace sent on the request",
                ));
            }
            obj["metadata"]["namespace"] = json!(url_ns);
        } else if let Some(m) = obj["metadata"].as_object_mut() {
            m.remove("namespace");
        }
        defaults::apply(r.kind, &mut obj);
        Ok(obj)
    }

    pub async fn create(
        &self,
        r: &'static Resource,
        ns: Option<&str>,
        body: Value,
        opts: &WriteOptions,
    ) -> ApiResult<WriteResult> {
        let ns = self.ns_for(r, ns);
        let mut warnings = Vec::new();
        let hint = body["metadata"]["name"].as_str().unwrap_or("").to_string();
        let mut obj = self.prepare(r, ns, body, &hint, opts.field_validation, &mut warnings)?;
        self.check_namespace(r, ns, true).await?;
        let generate = obj["metadata"]["generateName"]
            .as_str()
            .filter(|_| name_of(&obj).is_empty())
            .map(str::to_string);
        let meta = obj["metadata"]
            .as_object_mut()
            .expect("decoded objects have metadata");
        if meta
            .get("resourceVersion")
            .and_then(Value::as_str)
            .is_some_and(|s| !s.is_empty())
        {
            return Err(ApiError::bad_request(
                "resourceVersion should not be set on objects to be created",
            ));
        }
        meta.insert("uid".into(), json!(uuid::Uuid::new_v4().to_string()));
        meta.insert("creationTimestamp".into(), json!(now_rfc3339()));
        meta.insert("generation".into(), json!(1));
        meta.remove("deletionTimestamp");
        meta.remove("deletionGracePeriodSeconds");
        meta.remove("managedFields");
        if r.kind == "Pod"
            && let Some(s) = obj.get_mut("status").and_then(Value::as_object_mut)
        {
            s.clear();
        }
        if r.kind == "Pod" {
            default_pod_status(&mut obj);
        }
        for attempt in 0..8 {
            if let Some(g) = &generate {
                // As Kubernetes: the base is cut so base + 5 random characters fit in 63.
                let base: String = g.chars().take(58).collect();
                obj["metadata"]["name"] = json!(format!("{base}{}", random_suffix()));
            }
            let name = name_of(&obj).to_string();
            let causes = validation::validate(r, &obj, None);
            if !causes.is_empty() {
                return Err(ApiError::invalid(r, &name, causes));
            }
            let _guard = if r.kind == "Service" {
                let g = self.alloc_lock.lock().await;
                self.allocate_service(&mut obj, None).await?;
                Some(g)
            } else {
                None
            };
            apply::track_update(None, &mut obj, &opts.field_manager, &now_rfc3339());
            if opts.dry_run {
                return Ok(WriteResult {
                    object: obj,
                    warnings,
                    created: true,
                });
            }
            let key = r.key(ns, &name);
            match self.store.create(&key, to_stored(&obj)).await {
                Ok(rv) => {
                    if _guard.is_some() {
                        self.record_service(&key, rv, &obj);
                    }
                    set_rv(&mut obj, rv);
                    return Ok(WriteResult {
                        object: obj,
                        warnings,
                        created: true,
                    });
                }
                Err(StorageError::AlreadyExists(_)) if generate.is_some() && attempt < 7 => {
                    continue;
                }
                Err(e) => return Err(ApiError::from_storage(e, r, &name)),
            }
        }
        Err(ApiError::internal("could not generate a unique name"))
    }

    /// Replaces an object (PUT). `subresource` is None, Some("status") or Some("finalize").
    pub async fn update(
        &self,
        r: &'static Resource,
        ns: Option<&str>,
        name: &str,
        body: Value,
        subresource: Option<&str>,
        opts: &WriteOptions,
    ) -> ApiResult<WriteResult> {
        let ns = self.ns_for(r, ns);
        validation::check_path_name(r, name)?;
        let mut warnings = Vec::new();
        let new = self.prepare(r, ns, body, name, opts.field_validation, &mut warnings)?;
        if name_of(&new) != name {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({}) does not match the name on the URL ({name})",
                name_of(&new)
            )));
        }
        let expected = match new["metadata"]["resourceVersion"].as_str() {
            Some(s) if !s.is_empty() => Some(parse_rv(s)?),
            _ => None,
        };
        let kv = self.get_kv(r, ns, name).await?;
        let old = from_kv(&kv)?;
        let mut res = self
            .write_update(
                r,
                ns,
                old,
                new,
                expected.or(Some(kv.mod_revision)),
                subresource,
                opts,
            )
            .await?;
        res.warnings.extend(warnings);
        Ok(res)
    }

    /// The common tail of update and patch: merges the parts the subresource may not
    /// change from `old`, validates and stores with optimistic concurrency.
    #[allow(clippy::too_many_arguments)]
    async fn write_update(
        &self,
        r: &'static Resource,
        ns: Option<&str>,
        old: Value,
        mut new: Value,
        expected: Option<Revision>,
        subresource: Option<&str>,
        opts: &WriteOptions,
    ) -> ApiResult<WriteResult> {
        let name = name_of(&old).to_string();
        match subresource {
            Some("status") => {
                // Only status changes through /status.
                let status = new.as_object_mut().and_then(|m| m.remove("status"));
                new = old.clone();
                match status {
                    Some(s) => new["status"] = s,
                    None => {
                        if let Some(m) = new.as_object_mut() {
                            m.remove("status");
                        }
                    }
                }
            }
            Some("finalize") => {
                let fin = new["spec"]["finalizers"].clone();
                new = old.clone();
                new["spec"]["finalizers"] = fin;
            }
            _ => {
                if r.has_status {
                    match old.get("status") {
                        Some(s) => new["status"] = s.clone(),
                        None => {
                            if let Some(m) = new.as_object_mut() {
                                m.remove("status");
                            }
                        }
                    }
                }
            }
        }
        // System-owned metadata always comes from the stored object.
        for field in [
            "uid",
            "creationTimestamp",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
        ] {
            match old["metadata"].get(field) {
                Some(v) => new["metadata"][field] = v.clone(),
                None => {
                    if let Some(m) = new["metadata"].as_object_mut() {
                        m.remove(field);
                    }
                }
            }
        }
        if !old["metadata"]["deletionTimestamp"].is_null() {
            // Once deleting, finalizers may only be removed.
            let old_f: HashSet<&str> = str_list(&old["metadata"]["finalizers"]);
            let new_f: HashSet<&str> = str_list(&new["metadata"]["finalizers"]);
            if !new_f.is_subset(&old_f) {
                return Err(ApiError::invalid(
                    r,
                    &name,
                    vec![Cause::forbidden(
                        "metadata.finalizers",
                        "no new finalizers can be added if the object is being deleted",
                    )],
                ));
            }
        }
        let old_gen = old["metadata"]["generation"].as_i64().unwrap_or(1);
        // Only spec (everything but metadata and status) moves the generation; a status
        // write cannot change it.
        let spec_moved = subresource != Some("status") && spec_changed(&old, &new);
        new["metadata"]["generation"] = json!(if spec_moved { old_gen + 1 } else { old_gen });
        if new["metadata"]
            .get("managedFields")
            .is_none_or(Value::is_null)
            && let Some(mf) = old["metadata"].get("managedFields")
        {
            new["metadata"]["managedFields"] = mf.clone();
        }
        let causes = validation::validate(r, &new, Some(&old));
        if !causes.is_empty() {
            return Err(ApiError::invalid(r, &name, causes));
        }
        let _guard = if r.kind == "Service" && subresource.is_none() {
            let g = self.alloc_lock.lock().await;
            self.allocate_service(&mut new, Some(&old)).await?;
            Some(g)
        } else {
            None
        };
        apply::track_update(Some(&old), &mut new, &opts.field_manager, &now_rfc3339());
        let written = self
            .store_update(r, ns, &name, new, expected, opts.dry_run)
            .await;
        if _guard.is_some()
            && !opts.dry_run
            && let Ok(w) = &written
            && let Some(rv) = w.object["metadata"]["resourceVersion"]
                .as_str()
                .and_then(|v| v.parse().ok())
        {
            self.record_service(&r.key(ns, &name), rv, &w.object);
        }
        written
    }

    /// Stores `new`; an object whose deletion waits only on finalizers goes away once the
    /// last finalizer is removed.
    async fn store_update(
        &self,
        r: &Resource,
        ns: Option<&str>,
        name: &str,
        mut new: Value,
        expected: Option<Revision>,
        dry_run: bool,
    ) -> ApiResult<WriteResult> {
        let key = r.key(ns, name);
        let deleting = !new["metadata"]["deletionTimestamp"].is_null();
        let no_finalizers = new["metadata"]["finalizers"]
            .as_array()
            .is_none_or(Vec::is_empty)
            && (r.kind != "Namespace"
                || new["spec"]["finalizers"]
                    .as_array()
                    .is_none_or(Vec::is_empty));
        let graceful_pod = r.kind == "Pod"
            && new["metadata"]["deletionGracePeriodSeconds"]
                .as_i64()
                .unwrap_or(0)
                > 0;
        if dry_run {
            return Ok(WriteResult {
                object: new,
                warnings: vec![],
                created: false,
            });
        }
        if deleting && no_finalizers && !graceful_pod {
            let (rv, _) = self
                .store
                .delete(&key, expected)
                .await
                .map_err(|e| ApiError::from_storage(e, r, name))?;
            if r.kind == "Service" {
                self.record_service_gone(&key, rv);
            }
            set_rv(&mut new, rv);
            return Ok(WriteResult {
                object: new,
                warnings: vec![],
                created: false,
            });
        }
        let rv = self
            .store
            .update(&key, to_stored(&new), expected)
            .await
            .map_err(|e| ApiError::from_storage(e, r, name))?;
        set_rv(&mut new, rv);
        Ok(WriteResult {
            object: new,
            warnings: vec![],
            created: false,
        })
    }

    /// PATCH in all its forms. Retries on conflicts as Kubernetes' GuaranteedUpdate does,
    /// unless the patch itself pins a resourceVersion.
    #[allow(clippy::too_many_arguments)]
    pub async fn patch(
        &self,
        r: &'static Resource,
        ns: Option<&str>,
        name: &str,
        kind: patch::PatchType,
        body: &[u8],
        subresource: Option<&str>,
        force: bool,
        opts: &WriteOptions,
    ) -> ApiResult<WriteResult> {
        let ns = self.ns_for(r, ns);
        validation::check_path_name(r, name)?;
        check_patch_body(kind, body)?;
        for _attempt in 0..10 {
            let current = match self.get_kv(r, ns, name).await {
                Ok(kv) => Some(kv),
                Err(e)
                    if e.code == 404
                        && matches!(kind, patch::PatchType::Apply)
                        && subresource.is_none() =>
                {
                    None
                }
                Err(e) => return Err(e),
            };
            let old = current.as_ref().map(from_kv).transpose()?;
            let patched = match kind {
                patch::PatchType::Apply => {
                    let applied =
                        apply::parse_apply_body(body).map_err(|e| apply_error(r, name, e))?;
                    if applied["metadata"]["name"]
                        .as_str()
                        .is_some_and(|n| n != name)
                    {
                        return Err(ApiError::bad_request(format!(
                            "the name of the object ({}) does not match the name on the URL ({name})",
                            applied["metadata"]["name"].as_str().unwrap_or("")
                        )));
                    }
                    // Indexing below would panic on a non-object body or metadata.
                    if !applied.is_object()
                        || !(applied["metadata"].is_object() || applied["metadata"].is_null())
                    {
                        return Err(ApiError::bad_request(
                            "the body of the apply patch must be an object with an object metadata",
                        ));
                    }
                    let mut applied = applied;
                    if r.namespaced && applied["metadata"]["namespace"].is_null() {
                        applied["metadata"]["namespace"] = json!(ns.unwrap_or(""));
                    }
                    apply::server_side_apply(
                        old.as_ref(),
                        &applied,
                        &opts.field_manager,
                        force,
                        &now_rfc3339(),
                    )
                    .map_err(|e| apply_error(r, name, e))?
                }
                _ => {
                    let Some(old) = old.as_ref() else {
                        return Err(ApiError::not_found(r, name));
                    };
                    let scale;
                    let base = if subresource == Some("scale") {
                        scale = to_scale(r, old)?;
                        &scale
                    } else {
                        old
                    };
                    let mut out = patch::apply_patch(kind, base, body)
                        .map_err(|e| ApiError::new(422, "Invalid", e.to_string()))?;
                    if subresource == Some("scale") {
                        out = from_scale(r, old, &out)?;
                    }
                    out
                }
            };
            let Some(old) = old else {
                // Server-side apply of an object that does not exist yet creates it.
                let mut created = self.create(r, ns, patched, opts).await?;
                if let Some(mf) = created.object["metadata"].get_mut("managedFields")
                    && let Some(entries) = mf.as_array_mut()
                {
                    for e in entries.iter_mut() {
                        if e["manager"] == opts.field_manager.as_str() {
                            e["operation"] = json!("Apply");
                        }
                    }
                }
                return Ok(created);
            };
            let pinned = patched["metadata"]["resourceVersion"]
                .as_str()
                .filter(|s| {
                    !s.is_empty() && Some(*s) != old["metadata"]["resourceVersion"].as_str()
                })
                .map(parse_rv)
                .transpose()?;
            let expected = pinned.or(current.as_ref().map(|kv| kv.mod_revision));
            let mut warnings = Vec::new();
            let new = self.prepare(r, ns, patched, name, opts.field_validation, &mut warnings)?;
            let sub = if subresource == Some("scale") {
                None
            } else {
                subresource
            };
            match self
                .write_update(r, ns, old, new, expected, sub, opts)
                .await
            {
                Err(e) if e.reason == "Conflict" && pinned.is_none() => continue,
                Ok(mut res) => {
                    res.warnings.extend(warnings);
                    if subresource == Some("scale") {
                        res.object = to_scale(r, &res.object)?;
                    }
                    return Ok(res);
                }
                Err(e) => return Err(e),
            }
        }
        Err(ApiError::conflict(r, name))
    }

    pub async fn delete(
        &self,
        r: &'static Resource,
        ns: Option<&str>,
        name: &str,
        opts: &DeleteOptions,
    ) -> ApiResult<Value> {
        let ns = self.ns_for(r, ns);
        validation::check_path_name(r, name)?;
        for _ in 0..10 {
            let kv = self.get_kv(r, ns, name).await?;
            let mut obj = from_kv(&kv)?;
            if let Some(uid) = &opts.precondition_uid
                && obj["metadata"]["uid"].as_str() != Some(uid.as_str())
            {
                return Err(ApiError::new(
                    409,
                    "Conflict",
                    format!(
                        "Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                        obj["metadata"]["uid"].as_str().unwrap_or("")
                    ),
                ));
            }
            if let Some(rv) = &opts.precondition_rv
                && kv.mod_revision.to_string() != *rv
            {
                return Err(ApiError::new(
                    409,
                    "Conflict",
                    format!(
                        "Precondition failed: ResourceVersion in precondition: {rv}, ResourceVersion in object meta: {}",
                        kv.mod_revision
                    ),
                ));
            }
            let grace = self.grace_period(r, &obj, opts);
            let mut finalizers: Vec<String> = str_list(&obj["metadata"]["finalizers"])
                .into_iter()
                .map(String::from)
                .collect();
            match opts.propagation_policy.as_deref() {
                Some("Foreground") if !finalizers.iter().any(|f| f == "foregroundDeletion") => {
                    finalizers.push("foregroundDeletion".into())
                }
                Some("Orphan") if !finalizers.iter().any(|f| f == "orphan") => {
                    finalizers.push("orphan".into())
                }
                Some("Foreground" | "Orphan" | "Background") | None => {}
                Some(other) => {
                    return Err(ApiError::invalid(
                        r,
                        name,
                        vec![Cause::not_supported(
                            "propagationPolicy",
                            other,
                            &["Background", "Foreground", "Orphan"],
                        )],
                    ));
                }
            }
            let namespace_finalizers = r.kind == "Namespace"
                && obj["spec"]["finalizers"]
                    .as_array()
                    .is_some_and(|f| !f.is_empty());
            let graceful = grace > 0 || !finalizers.is_empty() || namespace_finalizers;
            if !graceful {
                if opts.dry_run {
                    return Ok(obj);
                }
                match self.store.delete(&kv.key, Some(kv.mod_revision)).await {
                    Ok((rv, _)) => {
                        if r.kind == "Service" {
                            self.record_service_gone(&kv.key, rv);
                        }
                        set_rv(&mut obj, rv);
                        return Ok(obj);
                    }
                    Err(StorageError::Conflict { .. }) => continue,
                    Err(e) => return Err(ApiError::from_storage(e, r, name)),
                }
            }
            // Graceful: mark, and let finalizers (controllers) or the kubelet finish.
            let meta = obj["metadata"]
                .as_object_mut()
                .expect("objects have metadata");
            if meta.get("deletionTimestamp").is_none_or(Value::is_null) {
                let at = chrono::Utc::now() + chrono::Duration::seconds(grace);
                meta.insert(
                    "deletionTimestamp".into(),
                    json!(at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)),
                );
                meta.insert("deletionGracePeriodSeconds".into(), json!(grace));
            } else if let Some(cur) = meta
                .get("deletionGracePeriodSeconds")
                .and_then(Value::as_i64)
                && grace < cur
            {
                // A shorter grace period may replace a longer one (kubectl delete --grace-period=0 --force).
                meta.insert("deletionGracePeriodSeconds".into(), json!(grace));
            }
            meta.insert("finalizers".into(), json!(finalizers));
            if finalizers.is_empty() {
                meta.remove("finalizers");
            }
            if r.kind == "Namespace" {
                obj["status"]["phase"] = json!("Terminating");
            }
            if r.kind == "Pod" && grace == 0 && finalizers.is_empty() {
                // Pods not on a node, or force-deleted, go at once.
                obj["metadata"]["deletionGracePeriodSeconds"] = json!(0);
            }
            match self
                .store_update(r, ns, name, obj, Some(kv.mod_revision), opts.dry_run)
                .await
            {
                Err(e) if e.reason == "Conflict" => continue,
                other => return other.map(|w| w.object),
            }
        }
        Err(ApiError::conflict(r, name))
    }

    /// Pods bound to a node get a grace period (the kubelet stops them, then deletes with 0);
    /// everything else is deleted at once.
    fn grace_period(&self, r: &Resource, obj: &Value, opts: &DeleteOptions) -> i64 {
        if r.kind != "Pod" {
            return 0;
        }
        let bound = obj["spec"]["nodeName"]
            .as_str()
            .is_some_and(|n| !n.is_empty());
        let terminal = matches!(
            obj["status"]["phase"].as_str(),
            Some("Succeeded" | "Failed")
        );
        if !bound || terminal {
            return 0;
        }
        opts.grace_period_seconds
            .or_else(|| obj["spec"]["terminationGracePeriodSeconds"].as_i64())
            .unwrap_or(30)
            .max(0)
    }

    pub async fn delete_collection(
        &self,
        r: &'static Resource,
        ns: Option<&str>,
        list: &ListOptions,
        opts: &DeleteOptions,
    ) -> ApiResult<Vec<Value>> {
        let items = self.list(r, ns, list).await?.items;
        let mut out = Vec::new();
        for item in items {
            let item_ns = item["metadata"]["namespace"].as_str().map(str::to_string);
            match self
                .delete(r, item_ns.as_deref(), name_of(&item), opts)
                .await
            {
                Ok(v) => out.push(v),
                Err(e) if e.code == 404 => {}
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// pods/binding: sets spec.nodeName once (the scheduler's only write to a pod).
    pub async fn bind(&self, ns: Option<&str>, name: &str, binding: &Value) -> ApiResult<Value> {
        let r = resources::by_kind("v1", "Pod").expect("pods are served");
        let node = binding["target"]["name"].as_str().unwrap_or("");
        if node.is_empty() {
            return Err(ApiError::invalid(
                r,
                name,
                vec![Cause::required("target.name")],
            ));
        }
        for _ in 0..10 {
            let kv = self.get_kv(r, ns, name).await?;
            let mut pod = from_kv(&kv)?;
            if pod["spec"]["nodeName"]
                .as_str()
                .is_some_and(|n| !n.is_empty())
            {
                return Err(ApiError::new(
                    409,
                    "Conflict",
                    format!(
                        "Operation cannot be fulfilled on pods/binding {name:?}: pod {name} is already assigned to node {:?}",
                        pod["spec"]["nodeName"].as_str().unwrap_or("")
                    ),
                ));
            }
            if !pod["metadata"]["deletionTimestamp"].is_null() {
                return Err(ApiError::new(
                    409,
                    "Conflict",
                    format!("pod {name} is being deleted, cannot be assigned to a host"),
                ));
            }
            pod["spec"]["nodeName"] = json!(node);
            let conds = pod["status"]["conditions"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let mut conds: Vec<Value> = conds
                .into_iter()
                .filter(|c| c["type"] != "PodScheduled")
                .collect();
            conds.push(json!({"type": "PodScheduled", "status": "True", "lastProbeTime": null, "lastTransitionTime": now_rfc3339()}));
            pod["status"]["conditions"] = json!(conds);
            match self
                .store
                .update(&kv.key, to_stored(&pod), Some(kv.mod_revision))
                .await
            {
                Ok(_) => {
                    return Ok(
                        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201}),
                    );
                }
                Err(StorageError::Conflict { .. }) => continue,
                Err(e) => return Err(ApiError::from_storage(e, r, name)),
            }
        }
        Err(ApiError::conflict(r, name))
    }

    /// The Service allocation table, loaded by the first Service write.
    async fn service_allocations(&self) -> ApiResult<&ServiceAllocations> {
        let r = resources::by_kind("v1", "Service").expect("services are served");
        self.service_allocations
            .get_or_try_init(|| ServiceAllocations::start(self.store.clone(), r.key_prefix(None)))
            .await
            .map_err(ApiError::from)
    }

    /// A Service write committed at `rv`: its addresses are taken from now on, before
    /// the watch reports it.
    fn record_service(&self, key: &str, rv: Revision, svc: &Value) {
        if let Some(a) = self.service_allocations.get() {
            a.lock().set(key, rv, Some(Held::of(svc)));
        }
    }

    /// A Service deleted at `rv`: its addresses are free again (as in Kubernetes, at once).
    fn record_service_gone(&self, key: &str, rv: Revision) {
        if let Some(a) = self.service_allocations.get() {
            a.lock().set(key, rv, None);
        }
    }

    /// ClusterIP and NodePort allocation against the table of what stored Services hold
    /// (service_alloc.rs); deleting a Service releases its IP and ports when the watch
    /// reports the deletion.
    async fn allocate_service(&self, svc: &mut Value, old: Option<&Value>) -> ApiResult<()> {
        let r = resources::by_kind("v1", "Service").expect("services are served");
        let name = name_of(svc).to_string();
        let ty = svc["spec"]["type"]
            .as_str()
            .unwrap_or("ClusterIP")
            .to_string();
        if ty == "ExternalName" {
            return Ok(());
        }
        let svc_key = r.key(svc["metadata"]["namespace"].as_str(), &name);
        let allocations = self.service_allocations().await?;
        let table = allocations.lock();
        // ClusterIP: keep the old one, honour a requested one, else pick a free one.
        if let Some(old_ip) = old.and_then(|o| o["spec"]["clusterIP"].as_str())
            && svc["spec"]["clusterIP"].as_str().is_none_or(str::is_empty)
        {
            svc["spec"]["clusterIP"] = json!(old_ip);
        }
        let requested = svc["spec"]["clusterIP"].as_str().unwrap_or("").to_string();
        let ip = if requested == "None" {
            "None".to_string()
        } else if requested.is_empty() {
            let mut found = None;
            let start = rand::random::<u32>() % (SERVICE_CIDR_SIZE - SERVICE_CIDR_STATIC - 1);
            for i in 0..(SERVICE_CIDR_SIZE - SERVICE_CIDR_STATIC - 1) {
                let off = SERVICE_CIDR_STATIC
                    + (start + i) % (SERVICE_CIDR_SIZE - SERVICE_CIDR_STATIC - 1);
                let ip = Ipv4Addr::from(SERVICE_CIDR_BASE + off);
                if !table.ip_taken(ip, &svc_key) {
                    found = Some(ip);
                    break;
                }
            }
            found
                .ok_or_else(|| ApiError::internal("failed to allocate a serviceIP: range is full"))?
                .to_string()
        } else {
            let ip: Ipv4Addr = requested.parse().map_err(|_| {
                ApiError::invalid(
                    r,
                    &name,
                    vec![Cause::invalid(
                        "spec.clusterIPs",
                        &json!(requested),
                        "must be a valid IP address, (e.g. 10.9.8.7 or 2001:db8::ffff)",
                    )],
                )
            })?;
            let n = u32::from(ip);
            if !(SERVICE_CIDR_BASE..SERVICE_CIDR_BASE + SERVICE_CIDR_SIZE).contains(&n) {
                return Err(ApiError::invalid(
                    r,
                    &name,
                    vec![Cause::invalid(
                        "spec.clusterIPs",
                        &json!(requested),
                        "failed to allocate IP: the provided IP is not in the valid range. The range of valid IPs is 10.96.0.0/12",
                    )],
                ));
            }
            let unchanged =
                old.and_then(|o| o["spec"]["clusterIP"].as_str()) == Some(requested.as_str());
            if table.ip_taken(ip, &svc_key) && !unchanged {
                return Err(ApiError::invalid(
                    r,
                    &name,
                    vec![Cause::invalid(
                        "spec.clusterIPs",
                        &json!(requested),
                        "failed to allocate IP: provided IP is already allocated",
                    )],
                ));
            }
            requested
        };
        svc["spec"]["clusterIP"] = json!(ip);
        svc["spec"]["clusterIPs"] = json!([ip]);
        // NodePorts for NodePort and LoadBalancer Services.
        let needs_ports = matches!(ty.as_str(), "NodePort" | "LoadBalancer");
        let old_ports: HashMap<(i64, String), i64> = old
            .and_then(|o| o["spec"]["ports"].as_array())
            .into_iter()
            .flatten()
            .filter_map(|p| {
                Some((
                    (
                        p["port"].as_i64()?,
                        p["protocol"].as_str().unwrap_or("TCP").to_string(),
                    ),
                    p["nodePort"].as_i64()?,
                ))
            })
            .collect();
        let mut mine = HashSet::new();
        if let Some(ports) = svc["spec"]["ports"].as_array_mut() {
            for (i, p) in ports.iter_mut().enumerate() {
                if !needs_ports {
                    if let Some(m) = p.as_object_mut() {
                        m.remove("nodePort");
                    }
                    continue;
                }
                let key = (
                    p["port"].as_i64().unwrap_or(0),
                    p["protocol"].as_str().unwrap_or("TCP").to_string(),
                );
                let np = match p["nodePort"].as_i64().filter(|n| *n != 0) {
                    Some(n) => {
                        if table.port_taken(n, &svc_key) || !mine.insert(n) {
                            return Err(ApiError::invalid(
                                r,
                                &name,
                                vec![Cause::invalid(
                                    format!("spec.ports[{i}].nodePort"),
                                    &json!(n),
                                    "provided port is already allocated",
                                )],
                            ));
                        }
                        n
                    }
                    None => {
                        let reuse = old_ports
                            .get(&key)
                            .copied()
                            .filter(|n| !table.port_taken(*n, &svc_key) && !mine.contains(n));
                        let n = match reuse {
                            Some(n) => n,
                            None => {
                                let span = NODE_PORT_RANGE.end() - NODE_PORT_RANGE.start() + 1;
                                let start = (rand::random::<u32>() as i64) % span;
                                (0..span)
                                    .map(|k| NODE_PORT_RANGE.start() + (start + k) % span)
                                    .find(|n| !table.port_taken(*n, &svc_key) && !mine.contains(n))
                                    .ok_or_else(|| {
                                        ApiError::internal(
                                            "failed to allocate a nodePort: range is full",
                                        )
                                    })?
                            }
                        };
                        mine.insert(n);
                        n
                    }
                };
                p["nodePort"] = json!(np);
            }
        }
        Ok(())
    }

    /// Watch: events for `r` in `ns` after `from` (None: current state first as ADDED).
    #[allow(clippy::too_many_arguments)]
    pub async fn watch(
        self: &Arc<Self>,
        r: &'static Resource,
        ns: Option<&str>,
        opts: ListOptions,
        from: Option<Revision>,
        send_initial: bool,
        bookmarks: bool,
        timeout: std::time::Duration,
    ) -> ApiResult<impl Stream<Item = WatchItem> + Send + 'static> {
        let ns = self.ns_for(r, ns).map(str::to_string);
        // A metadata.name selector narrows the watch to one key, but only when the key
        // is fully known (cluster-scoped, or namespaced within one namespace).
        let pinned = opts
            .field_selector
            .pinned_name()
            .filter(|_| !r.namespaced || ns.is_some());
        let prefix = match pinned {
            Some(name) => r.key(ns.as_deref(), name),
            None => r.key_prefix(ns.as_deref()),
        };
        let exact_key = pinned.is_some();
        // The keys the client currently sees as matching, so selector transitions become
        // ADDED/DELETED as in Kubernetes.
        let mut visible: HashSet<String> = HashSet::new();
        let mut initial = Vec::new();
        let start_rev;
        let list_opts = ListOptions {
            limit: None,
            continue_token: None,
            ..opts.clone()
        };
        if from.is_none() || send_initial {
            let listed = self.list(r, ns.as_deref(), &list_opts).await?;
            start_rev = listed.revision;
            for obj in listed.items {
                visible.insert(obj_key(r, &obj));
                initial.push(WatchItem::Added(SharedObject::new(obj)));
            }
            if send_initial {
                initial.push(WatchItem::Bookmark(start_rev, true));
            }
        } else {
            start_rev = from.unwrap_or(0);
            if !opts.label_selector.is_empty() || !opts.field_selector.is_empty() {
                for obj in self.list(r, ns.as_deref(), &list_opts).await?.items {
                    visible.insert(obj_key(r, &obj));
                }
            }
        }
        let events = match self.store.watch(&prefix, start_rev).await {
            Ok(s) => Some(s),
            Err(StorageError::Compacted { requested, oldest }) => {
                initial.push(WatchItem::Error(ApiError::gone(format!(
                    "too old resource version: {requested} ({oldest})"
                ))));
                None
            }
            Err(e) => return Err(ApiError::from(e)),
        };
        let deadline = tokio::time::Instant::now() + timeout;
        let state = WatchState {
            events,
            visible,
            opts,
            exact_key: if exact_key { Some(prefix) } else { None },
            last_rev: start_rev,
            bookmarks,
            deadline,
        };
        let live = futures::stream::unfold(state, |mut st| async move {
            loop {
                let events = st.events.as_mut()?;
                let tick = tokio::time::sleep(std::time::Duration::from_secs(15));
                let item = tokio::select! {
                    _ = tokio::time::sleep_until(st.deadline) => return None,
                    _ = tick, if st.bookmarks => Some(WatchItem::Bookmark(st.last_rev, false)),
                    ev = events.next() => match ev {
                        None => return None,
                        Some(Err(e)) => {
                            st.events = None;
                            let err = match e {
                                StorageError::Compacted { requested, oldest } => ApiError::gone(format!("too old resource version: {requested} ({oldest})")),
                                other => ApiError::from(other),
                            };
                            return Some((WatchItem::Error(err), st));
                        }
                        Some(Ok(ev)) => st.translate(ev),
                    },
                };
                if let Some(item) = item {
                    return Some((item, st));
                }
            }
        });
        Ok(futures::stream::iter(initial).chain(live))
    }
}

struct WatchState {
    events: Option<crate::storage::WatchStream>,
    visible: HashSet<String>,
    opts: ListOptions,
    exact_key: Option<String>,
    last_rev: Revision,
    bookmarks: bool,
    deadline: tokio::time::Instant,
}

impl WatchState {
    fn translate(&mut self, ev: crate::storage::WatchEvent) -> Option<WatchItem> {
        self.last_rev = ev.revision;
        if let Some(k) = &self.exact_key
            && &ev.key != k
        {
            return None;
        }
        let obj = decoded(&ev)?;
        if self.opts.label_selector.is_empty() && self.opts.field_selector.is_empty() {
            // Nothing can change what matches: the store's event type is the answer.
            return Some(match ev.kind {
                EventKind::Added => WatchItem::Added(obj),
                EventKind::Modified => WatchItem::Modified(obj),
                EventKind::Deleted => WatchItem::Deleted(obj),
            });
        }
        let matches = self
            .opts
            .label_selector
            .matches(&obj.value["metadata"]["labels"])
            && self.opts.field_selector.matches(&obj.value);
        let was_visible = self.visible.contains(&ev.key);
        match ev.kind {
            EventKind::Deleted => {
                self.visible.remove(&ev.key);
                (was_visible || matches).then_some(WatchItem::Deleted(obj))
            }
            EventKind::Added | EventKind::Modified if matches => {
                self.visible.insert(ev.key);
                Some(if was_visible {
                    WatchItem::Modified(obj)
                } else {
                    WatchItem::Added(obj)
                })
            }
            _ => {
                if was_visible {
                    self.visible.remove(&ev.key);
                    Some(WatchItem::Deleted(obj))
                } else {
                    None
                }
            }
        }
    }
}

fn obj_key(r: &Resource, obj: &Value) -> String {
    r.key(obj["metadata"]["namespace"].as_str(), name_of(obj))
}

fn str_list(v: &Value) -> HashSet<&str> {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect()
}

fn default_pod_status(pod: &mut Value) {
    if pod["status"].get("phase").is_none_or(Value::is_null) {
        pod["status"]["phase"] = json!("Pending");
    }
    if pod["status"].get("qosClass").is_none_or(Value::is_null) {
        pod["status"]["qosClass"] = json!(qos_class(&pod["spec"]));
    }
}

/// QoS class from requests and limits, as Kubernetes computes it.
fn qos_class(spec: &Value) -> &'static str {
    let containers: Vec<&Value> = spec["containers"]
        .as_array()
        .into_iter()
        .flatten()
        .collect();
    let mut any = false;
    let mut guaranteed = !containers.is_empty();
    for c in &containers {
        let req = &c["resources"]["requests"];
        let lim = &c["resources"]["limits"];
        if req.as_object().is_some_and(|m| !m.is_empty())
            || lim.as_object().is_some_and(|m| !m.is_empty())
        {
            any = true;
        }
        for res in ["cpu", "memory"] {
            let l = &lim[res];
            let r = if req[res].is_null() { l } else { &req[res] };
            if l.is_null() || r != l {
                guaranteed = false;
            }
        }
    }
    if !any {
        "BestEffort"
    } else if guaranteed {
        "Guaranteed"
    } else {
        "Burstable"
    }
}

/// A patch body that does not decode is a 400 (kube-apiserver: NewBadRequest); a
/// well-formed patch that cannot be applied stays a 422.
fn check_patch_body(kind: patch::PatchType, body: &[u8]) -> ApiResult<()> {
    let ok = match kind {
        patch::PatchType::Json => serde_json::from_slice::<json_patch::Patch>(body).is_ok(),
        patch::PatchType::Merge | patch::PatchType::StrategicMerge => {
            serde_json::from_slice::<Value>(body).is_ok_and(|v| v.is_object())
        }
        patch::PatchType::Apply => true,
    };
    if ok {
        Ok(())
    } else {
        Err(ApiError::bad_request(format!(
            "error decoding patch: the body is not a valid {kind:?} patch"
        )))
    }
}

fn apply_error(r: &Resource, name: &str, e: apply::ApplyError) -> ApiError {
    match e {
        apply::ApplyError::Invalid(m) => ApiError::bad_request(m),
        apply::ApplyError::Conflicts(c) => {
            let mut err = ApiError::new(409, "Conflict", apply::conflicts_message(&c));
            let mut details = json!({"name": name, "kind": r.plural, "causes": c.iter().map(|c| json!({
                "reason": "FieldManagerConflict",
                "message": format!("conflict with {}", c.manager_display()),
                "field": c.field,
            })).collect::<Vec<_>>()});
            if !r.group.is_empty() {
                details["group"] = json!(r.group);
            }
            err.details = Some(details);
            err
        }
    }
}

/// The autoscaling/v1 Scale view of a Deployment or ReplicaSet.
pub fn to_scale(r: &Resource, obj: &Value) -> ApiResult<Value> {
    if !r.has_scale {
        return Err(ApiError::not_found(r, name_of(obj)));
    }
    let sel = &obj["spec"]["selector"];
    let mut parts: Vec<String> = sel["matchLabels"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
        .collect();
    for e in sel["matchExpressions"].as_array().into_iter().flatten() {
        let key = e["key"].as_str().unwrap_or("");
        let vals: Vec<&str> = e["values"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        parts.push(match e["operator"].as_str().unwrap_or("") {
            "In" => format!("{key} in ({})", vals.join(",")),
            "NotIn" => format!("{key} notin ({})", vals.join(",")),
            "Exists" => key.to_string(),
            _ => format!("!{key}"),
        });
    }
    let m = &obj["metadata"];
    Ok(json!({
        "kind": "Scale",
        "apiVersion": "autoscaling/v1",
        "metadata": {
            "name": m["name"], "namespace": m["namespace"], "uid": m["uid"],
            "resourceVersion": m["resourceVersion"], "creationTimestamp": m["creationTimestamp"],
        },
        "spec": {"replicas": obj["spec"]["replicas"].as_i64().unwrap_or(1)},
        "status": {"replicas": obj["status"]["replicas"].as_i64().unwrap_or(0), "selector": parts.join(",")},
    }))
}

/// Applies a (patched or PUT) Scale back onto its object.
pub fn from_scale(r: &Resource, obj: &Value, scale: &Value) -> ApiResult<Value> {
    let name = name_of(obj);
    let replicas = &scale["spec"]["replicas"];
    // autoscaling/v1 ScaleSpec.replicas is `omitempty`: Go clients send 0 as an absent field
    // (kubectl scale --current-replicas=N --replicas=0 PUTs `"spec":{}`).
    let n = match replicas {
        Value::Null => 0,
        v => match v.as_i64() {
            Some(n) => n,
            None => {
                return Err(ApiError::invalid(
                    r,
                    name,
                    vec![Cause::invalid("spec.replicas", v, "must be an integer")],
                ));
            }
        },
    };
    if n < 0 {
        return Err(ApiError::invalid(
            r,
            name,
            vec![Cause::invalid(
                "spec.replicas",
                replicas,
                "must be greater than or equal to 0",
            )],
        ));
    }
    let mut out = obj.clone();
    out["spec"]["replicas"] = json!(n);
    if let Some(rv) = scale["metadata"]["resourceVersion"]
        .as_str()
        .filter(|s| !s.is_empty())
    {
        out["metadata"]["resourceVersion"] = json!(rv);
    }
    Ok(out)
}

pub fn micro_time() -> String {
    now_micro()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::WatchEvent;

    #[test]
    fn watchers_share_one_decoded_object_per_event() {
        let ev = WatchEvent::new(
            EventKind::Modified,
            "/registry/pods/ns/p".into(),
            br#"{"metadata":{"name":"p"}}"#.to_vec(),
            42,
        );
        // Each watcher receives its own clone of the broadcast event.
        let (a, b) = (ev.clone(), ev.clone());
        let (da, db) = (decoded(&a).expect("json"), decoded(&b).expect("json"));
        assert!(Arc::ptr_eq(&da, &db), "decoded once for both watchers");
        assert_eq!(da.value["metadata"]["resourceVersion"], "42");
        assert_eq!(
            serde_json::from_slice::<Value>(da.json()).expect("encoded"),
            da.value
        );
        // A separately stored copy of the same event (the history) has its own memo.
        let history = WatchEvent::new(ev.kind, ev.key.clone(), ev.value.clone(), ev.revision);
        assert!(!Arc::ptr_eq(&decoded(&history).expect("json"), &da));
        let garbage = WatchEvent::new(EventKind::Added, "/k".into(), b"not json".to_vec(), 1);
        assert!(decoded(&garbage).is_none());
    }
}
