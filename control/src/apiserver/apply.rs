//! Server-side apply and managedFields bookkeeping.
//!
//! Field ownership is tracked as sets of paths in the FieldsV1 shape that
//! sigs.k8s.io/structured-merge-diff writes: `f:<field>`, `k:<json key>` for items of
//! keyed lists, `v:<json value>` for sets of primitives, and `.` when a node is owned
//! itself as well as having owned children. Without OpenAPI schemas we decide list
//! semantics from the field name (same table as strategic merge patch).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApplyConflict {
    pub manager: String,
    pub api_version: String,
    pub field: String,
    /// Operation of the conflicting manager ("Apply" or "Update"); Kubernetes prints
    /// `using <apiVersion> at <time>` only for Update managers.
    pub operation: String,
    pub time: Option<String>,
}

impl ApplyConflict {
    /// The manager as Kubernetes prints it in conflict messages and causes
    /// (`"kubectl-scale" using apps/v1 at 2024-01-01T00:00:00Z`, or `"kubectl"` for appliers).
    pub fn manager_display(&self) -> String {
        let name = format!("{:?}", self.manager);
        if self.operation != "Update" {
            return name;
        }
        match &self.time {
            Some(t) => format!("{name} using {} at {t}", self.api_version),
            None => format!("{name} using {}", self.api_version),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("{0}")]
    Invalid(String),
    #[error("{}", conflicts_message(.0))]
    Conflicts(Vec<ApplyConflict>),
}

/// The Status message Kubernetes returns for apply conflicts (managedfields/internal/conflict.go).
pub fn conflicts_message(c: &[ApplyConflict]) -> String {
    if let [one] = c {
        return format!(
            "Apply failed with 1 conflict: conflict with {}: {}",
            one.manager_display(),
            one.field
        );
    }
    // Grouped by manager, managers sorted, paths in the order found.
    let mut by_manager: BTreeMap<String, Vec<&ApplyConflict>> = BTreeMap::new();
    for x in c {
        by_manager.entry(x.manager_display()).or_default().push(x);
    }
    let mut lines = Vec::new();
    for (manager, items) in &by_manager {
        lines.push(format!("conflicts with {manager}:"));
        for x in items {
            lines.push(format!("- {}", x.field));
        }
    }
    format!(
        "Apply failed with {} conflicts: {}",
        c.len(),
        lines.join("\n")
    )
}

/// Parses an apply body (YAML or JSON, which is YAML too) that must hold one object.
pub fn parse_apply_body(body: &[u8]) -> Result<Value, ApplyError> {
    let text = std::str::from_utf8(body)
        .map_err(|e| ApplyError::Invalid(format!("error decoding YAML: body is not UTF-8: {e}")))?;
    let mut docs = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(text) {
        let v = Value::deserialize(doc)
            .map_err(|e| ApplyError::Invalid(format!("error decoding YAML: {e}")))?;
        if !v.is_null() {
            docs.push(v);
        }
    }
    if docs.len() > 1 {
        return Err(ApplyError::Invalid(
            "error decoding YAML: the apply body must contain a single object, found multiple documents".into(),
        ));
    }
    match docs.pop() {
        Some(v @ Value::Object(_)) => Ok(v),
        Some(other) => Err(ApplyError::Invalid(format!(
            "error decoding YAML: the apply body must be an object, got {}",
            kind_name(&other)
        ))),
        None => Err(ApplyError::Invalid(
            "error decoding YAML: the apply body is empty".into(),
        )),
    }
}

fn kind_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// One metadata.managedFields entry (k8s ManagedFieldsEntry).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ManagedFieldsEntry {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub manager: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub operation: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub api_version: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub fields_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fields_v1: Option<Value>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub subresource: String,
}

/// A set of field paths as a tree. `member` means the path to this node is itself in the set.
#[derive(Debug, Clone, Default, PartialEq)]
struct FieldSet {
    member: bool,
    children: BTreeMap<String, FieldSet>,
}

impl FieldSet {
    fn leaf() -> Self {
        FieldSet {
            member: true,
            children: BTreeMap::new(),
        }
    }

    fn is_empty(&self) -> bool {
        !self.member && self.children.values().all(FieldSet::is_empty)
    }

    fn from_v1(v: &Value) -> FieldSet {
        let mut set = FieldSet::default();
        if let Some(m) = v.as_object() {
            for (k, child) in m {
                if k == "." {
                    set.member = true;
                    continue;
                }
                let mut c = FieldSet::from_v1(child);
                // `{}` is a leaf: the path itself is owned.
                if child.as_object().is_none_or(|o| o.is_empty()) {
                    c.member = true;
                }
                set.children.insert(k.clone(), c);
            }
        }
        set
    }

    fn to_v1(&self) -> Value {
        let mut m = Map::new();
        if self.member && !self.children.is_empty() {
            m.insert(".".into(), Value::Object(Map::new()));
        }
        for (k, c) in &self.children {
            if !c.is_empty() {
                m.insert(k.clone(), c.to_v1());
            }
        }
        Value::Object(m)
    }

    fn union(&mut self, other: &FieldSet) {
        self.member |= other.member;
        for (k, c) in &other.children {
            self.children.entry(k.clone()).or_default().union(c);
        }
    }

    /// Removes the members of `other` (paths are individual: removing a member does not
    /// remove the children under it).
    fn difference(&mut self, other: &FieldSet) {
        if other.member {
            self.member = false;
        }
        for (k, c) in &other.children {
            if let Some(mine) = self.children.get_mut(k) {
                mine.difference(c);
            }
        }
        self.children.retain(|_, c| !c.is_empty());
    }

    fn intersection(&self, other: &FieldSet) -> FieldSet {
        let mut out = FieldSet {
            member: self.member && other.member,
            children: BTreeMap::new(),
        };
        for (k, c) in &self.children {
            if let Some(o) = other.children.get(k) {
                let i = c.intersection(o);
                if !i.is_empty() {
                    out.children.insert(k.clone(), i);
                }
            }
        }
        out
    }

    /// All member paths, depth first in set order.
    fn paths(&self) -> Vec<Vec<String>> {
        let mut out = Vec::new();
        self.collect(&mut Vec::new(), &mut out);
        out
    }

    fn collect(&self, prefix: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
        if self.member {
            out.push(prefix.clone());
        }
        for (k, c) in &self.children {
            prefix.push(k.clone());
            c.collect(prefix, out);
            prefix.pop();
        }
    }
}

/// Renders a path like structured-merge-diff's Path.String: `.spec.containers[name="web"].image`.
fn path_string(path: &[String]) -> String {
    let mut s = String::new();
    for pe in path {
        if let Some(f) = pe.strip_prefix("f:") {
            s.push('.');
            s.push_str(f);
        } else if let Some(k) = pe.strip_prefix("k:") {
            match serde_json::from_str::<Map<String, Value>>(k) {
                Ok(m) => {
                    let parts: Vec<String> = m.iter().map(|(n, v)| format!("{n}={v}")).collect();
                    s.push_str(&format!("[{}]", parts.join(",")));
                }
                Err(_) => s.push_str(&format!("[{k}]")),
            }
        } else if let Some(v) = pe.strip_prefix("v:") {
            s.push_str(&format!("[={v}]"));
        } else if let Some(i) = pe.strip_prefix("i:") {
            s.push_str(&format!("[{i}]"));
        } else {
            s.push_str(pe);
        }
    }
    s
}

/// How a list is merged and tracked, from Kubernetes' `x-kubernetes-list-type`/`-map-keys`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum ListKind {
    Keyed(Vec<&'static str>),
    Set,
    Atomic,
}

fn list_kind(field: &str, items: &[Value]) -> ListKind {
    let keys: &[&'static str] = match field {
        "containers"
        | "initContainers"
        | "ephemeralContainers"
        | "env"
        | "volumes"
        | "imagePullSecrets"
        | "resourceClaims" => &["name"],
        "volumeMounts" => &["mountPath"],
        "volumeDevices" => &["devicePath"],
        "hostAliases" => &["ip"],
        "conditions" => &["type"],
        "ownerReferences" => &["uid"],
        "topologySpreadConstraints" => &["topologyKey", "whenUnsatisfiable"],
        // SSA keys ports on port and protocol (container ports on containerPort).
        "ports" => {
            if items.iter().any(|i| i.get("containerPort").is_some()) {
                &["containerPort", "protocol"]
            } else {
                &["port", "protocol"]
            }
        }
        "finalizers" => return ListKind::Set,
        _ => return ListKind::Atomic,
    };
    ListKind::Keyed(keys.to_vec())
}

/// Key fields with API defaults, so `k:` elements match between applied config and live.
fn key_default(field: &str) -> Option<Value> {
    match field {
        "protocol" => Some(Value::from("TCP")),
        "whenUnsatisfiable" => Some(Value::from("DoNotSchedule")),
        _ => None,
    }
}

/// The `k:`/`v:` path element of a list item, or None if the item cannot be keyed.
fn item_pe(kind: &ListKind, item: &Value) -> Option<String> {
    match kind {
        ListKind::Keyed(keys) => {
            let m = item.as_object()?;
            // Keys are written sorted by name, as structured-merge-diff does.
            let mut sorted: Vec<&&str> = keys.iter().collect();
            sorted.sort();
            let mut key = Map::new();
            for k in sorted {
                let v = match m.get(*k) {
                    Some(v) if !v.is_null() => v.clone(),
                    _ => key_default(k)?,
                };
                key.insert((*k).to_string(), v);
            }
            Some(format!("k:{}", Value::Object(key)))
        }
        ListKind::Set => match item {
            Value::Object(_) | Value::Array(_) => None,
            v => Some(format!("v:{v}")),
        },
        ListKind::Atomic => None,
    }
}

/// Keys of all items, or None if any item cannot be keyed or keys repeat (then the list
/// is treated as atomic).
fn item_pes(kind: &ListKind, items: &[Value]) -> Option<Vec<String>> {
    let mut out: Vec<String> = Vec::with_capacity(items.len());
    for i in items {
        let pe = item_pe(kind, i)?;
        if out.contains(&pe) {
            return None;
        }
        out.push(pe);
    }
    Some(out)
}

/// LabelSelector and friends are `structType=atomic`: owned and replaced as a whole.
fn is_atomic_map(m: &Map<String, Value>) -> bool {
    m.contains_key("matchLabels") || m.contains_key("matchExpressions")
}

/// Maps with free-form keys: newly added ones are owned themselves (`.`) in Update sets.
fn is_free_form_map(field: &str) -> bool {
    matches!(
        field,
        "labels"
            | "annotations"
            | "nodeSelector"
            | "data"
            | "binaryData"
            | "stringData"
            | "limits"
            | "requests"
            | "capacity"
            | "allocatable"
            | "hard"
    )
}

/// The field set of everything set in `v` (which sits at field `field`).
fn value_set(field: &str, v: &Value, strict: bool) -> Result<FieldSet, ApplyError> {
    let mut set = FieldSet::default();
    match v {
        Value::Object(m) if !m.is_empty() && !is_atomic_map(m) => {
            for (k, c) in m {
                set.children
                    .insert(format!("f:{k}"), value_set(k, c, strict)?);
            }
        }
        Value::Array(items) if !items.is_empty() => {
            let kind = list_kind(field, items);
            match item_pes(&kind, items) {
                Some(pes) if kind != ListKind::Atomic => {
                    for (pe, item) in pes.into_iter().zip(items) {
                        // Items are owned themselves (`.`) plus, when keyed, their fields.
                        let mut c = match kind {
                            ListKind::Keyed(_) => object_children(item, strict)?,
                            _ => FieldSet::default(),
                        };
                        c.member = true;
                        set.children.insert(pe, c);
                    }
                }
                None if strict && kind != ListKind::Atomic => {
                    return Err(ApplyError::Invalid(format!(
                        ".{field}: every item must be unique and carry its key fields {}",
                        match &kind {
                            ListKind::Keyed(k) => format!("{k:?}"),
                            _ => "(a primitive value)".into(),
                        }
                    )));
                }
                _ => set.member = true,
            }
        }
        _ => set.member = true,
    }
    Ok(set)
}

fn object_children(item: &Value, strict: bool) -> Result<FieldSet, ApplyError> {
    let mut set = FieldSet::default();
    if let Some(m) = item.as_object() {
        for (k, c) in m {
            set.children
                .insert(format!("f:{k}"), value_set(k, c, strict)?);
        }
    }
    Ok(set)
}

/// Removes fields that never take part in ownership (stripMetaManager in Kubernetes, plus
/// status, which the main resource ignores).
fn strip_untracked(v: &Value) -> Value {
    let mut v = v.clone();
    if let Some(m) = v.as_object_mut() {
        for k in ["apiVersion", "kind", "status"] {
            m.shift_remove(k);
        }
        if let Some(Value::Object(meta)) = m.get_mut("metadata") {
            for k in [
                "name",
                "namespace",
                "creationTimestamp",
                "selfLink",
                "uid",
                "clusterName",
                "generation",
                "managedFields",
                "resourceVersion",
            ] {
                meta.shift_remove(k);
            }
            if meta.is_empty() {
                m.shift_remove("metadata");
            }
        }
    }
    v
}

/// Paths added or modified (first) and removed (second) going from `old` to `new`.
fn diff(field: &str, old: &Value, new: &Value) -> (FieldSet, FieldSet) {
    let mut changed = FieldSet::default();
    let mut removed = FieldSet::default();
    match (old, new) {
        (Value::Object(o), Value::Object(n)) if !is_atomic_map(o) && !is_atomic_map(n) => {
            for (k, nv) in n {
                let pe = format!("f:{k}");
                match o.get(k) {
                    Some(ov) => {
                        let (c, r) = diff(k, ov, nv);
                        insert_nonempty(&mut changed, &pe, c);
                        insert_nonempty(&mut removed, &pe, r);
                    }
                    None => {
                        changed.children.insert(pe, added_set(k, nv));
                    }
                }
            }
            for (k, ov) in o {
                if !n.contains_key(k) {
                    removed
                        .children
                        .insert(format!("f:{k}"), removed_set(k, ov));
                }
            }
        }
        (Value::Array(o), Value::Array(n)) if !o.is_empty() || !n.is_empty() => {
            let kind = list_kind(field, if n.is_empty() { o } else { n });

            let pes = (kind != ListKind::Atomic)
                .then(|| item_pes(&kind, o).zip(item_pes(&kind, n)))
                .flatten();
            let Some((ope, npe)) = pes else {
                if old != new {
                    changed.member = true;
                }
                return (changed, removed);
            };
            for (pe, nv) in npe.iter().zip(n) {
                match ope.iter().position(|p| p == pe) {
                    Some(i) => {
                        let (c, r) = if matches!(kind, ListKind::Keyed(_)) {
                            diff_item(&o[i], nv)
                        } else {
                            (FieldSet::default(), FieldSet::default())
                        };
                        insert_nonempty(&mut changed, pe, c);
                        insert_nonempty(&mut removed, pe, r);
                    }
                    None => {
                        let mut c = object_children(nv, false).unwrap_or_default();
                        c.member = true;
                        changed.children.insert(pe.clone(), c);
                    }
                }
            }
            for (pe, ov) in ope.iter().zip(o) {
                if !npe.contains(pe) {
                    let mut r = object_children(ov, false).unwrap_or_default();
                    r.member = true;
                    removed.children.insert(pe.clone(), r);
                }
            }
        }
        _ => {
            if old != new {
                changed.member = true;
            }
        }
    }
    (changed, removed)
}

fn diff_item(old: &Value, new: &Value) -> (FieldSet, FieldSet) {
    // Items are objects; diff them field by field like a map.
    let (o, n) = (strip_obj(old), strip_obj(new));
    diff("", &o, &n)
}

fn strip_obj(v: &Value) -> Value {
    match v {
        Value::Object(m) if m.is_empty() => Value::Object(Map::new()),
        other => other.clone(),
    }
}

fn insert_nonempty(set: &mut FieldSet, pe: &str, child: FieldSet) {
    if !child.is_empty() {
        set.children.insert(pe.to_string(), child);
    }
}

/// The set recorded for a field that newly appeared in an update. Unlike apply sets,
/// Kubernetes' comparison also owns newly added free-form maps themselves (`.`).
fn added_set(field: &str, v: &Value) -> FieldSet {
    let mut s = value_set(field, v, false).unwrap_or_else(|_| FieldSet::leaf());
    mark_free_form_maps(&mut s, field, v);
    s
}

fn mark_free_form_maps(set: &mut FieldSet, field: &str, v: &Value) {
    let Value::Object(m) = v else { return };
    if is_free_form_map(field) {
        set.member = true;
    }
    for (k, c) in m {
        if let Some(cs) = set.children.get_mut(&format!("f:{k}")) {
            mark_free_form_maps(cs, k, c);
        }
    }
}

/// Everything under a removed field, including the field itself.
fn removed_set(field: &str, v: &Value) -> FieldSet {
    let mut s = value_set(field, v, false).unwrap_or_default();
    s.member = true;
    s
}

fn parse_managed(obj: Option<&Value>) -> Vec<(ManagedFieldsEntry, FieldSet)> {
    let Some(list) = obj
        .and_then(|o| o.get("metadata"))
        .and_then(|m| m.get("managedFields"))
        .and_then(Value::as_array)
    else {
        return Vec::new();
    };
    // Entries that do not decode are dropped, as Kubernetes resets undecodable managedFields.
    list.iter()
        .filter_map(|e| serde_json::from_value::<ManagedFieldsEntry>(e.clone()).ok())
        .filter(|e| !e.manager.is_empty() || !e.operation.is_empty())
        .map(|e| {
            let set = e
                .fields_v1
                .as_ref()
                .map(FieldSet::from_v1)
                .unwrap_or_default();
            (e, set)
        })
        .collect()
}

/// Writes entries back, dropping empty ones and sorting as Kubernetes does (Apply before
/// Update, then oldest first, then by manager).
fn store_managed(obj: &mut Value, mut entries: Vec<(ManagedFieldsEntry, FieldSet)>) {
    entries.retain(|(_, s)| !s.is_empty());
    entries.sort_by(|(a, _), (b, _)| {
        a.operation
            .cmp(&b.operation)
            .then_with(|| a.time.cmp(&b.time))
            .then_with(|| a.manager.cmp(&b.manager))
            .then_with(|| a.api_version.cmp(&b.api_version))
            .then_with(|| a.subresource.cmp(&b.subresource))
    });
    let list: Vec<Value> = entries
        .into_iter()
        .map(|(mut e, s)| {
            e.fields_type = "FieldsV1".into();
            e.fields_v1 = Some(s.to_v1());
            serde_json::to_value(e).unwrap_or(Value::Null)
        })
        .collect();
    let Some(obj) = obj.as_object_mut() else {
        return;
    };
    let meta = obj
        .entry("metadata")
        .or_insert_with(|| Value::Object(Map::new()));
    let Some(meta) = meta.as_object_mut() else {
        return;
    };
    if list.is_empty() {
        meta.shift_remove("managedFields");
    } else {
        meta.insert("managedFields".into(), Value::Array(list));
    }
}

fn api_version_of(v: &Value) -> String {
    v.get("apiVersion")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string()
}

/// Server-side apply: merges `applied` into `live` (or creates), checks ownership conflicts,
/// prunes fields this manager stopped applying, and records the manager's Apply entry.
pub fn server_side_apply(
    live: Option<&Value>,
    applied: &Value,
    manager: &str,
    force: bool,
    now: &str,
) -> Result<Value, ApplyError> {
    let Some(am) = applied.as_object() else {
        return Err(ApplyError::Invalid(
            "the apply body must be an object".into(),
        ));
    };
    let api_version = api_version_of(applied);
    let kind = am.get("kind").and_then(Value::as_str).unwrap_or_default();
    if api_version.is_empty() || kind.is_empty() {
        return Err(ApplyError::Invalid(
            "apiVersion and kind must be set in the applied configuration".into(),
        ));
    }
    if manager.is_empty() {
        return Err(ApplyError::Invalid(
            "a fieldManager is required for apply".into(),
        ));
    }
    if applied
        .get("metadata")
        .and_then(|m| m.get("managedFields"))
        .is_some_and(|mf| !mf.is_null() && mf.as_array().is_none_or(|a| !a.is_empty()))
    {
        return Err(ApplyError::Invalid(
            "metadata.managedFields must be nil".into(),
        ));
    }
    if let Some(live) = live {
        let live_kind = live.get("kind").and_then(Value::as_str).unwrap_or(kind);
        if live_kind != kind {
            return Err(ApplyError::Invalid(format!(
                "the applied kind {kind:?} does not match the existing object's kind {live_kind:?}"
            )));
        }
    }

    let applied_set = value_set("", &strip_untracked(applied), true)?;
    let mut managed = parse_managed(live);
    let is_me = |e: &ManagedFieldsEntry| {
        e.manager == manager && e.operation == "Apply" && e.subresource.is_empty()
    };

    let base = live.cloned().unwrap_or_else(|| Value::Object(Map::new()));
    let mut merged = base.clone();
    merge_apply(&mut merged, applied, "");
    if let Some(m) = merged.as_object_mut() {
        // Status is not applied through the main resource.
        match base.get("status") {
            Some(s) => {
                m.insert("status".into(), s.clone());
            }
            None => {
                m.shift_remove("status");
            }
        }
    }

    // Conflicts: applied fields whose value changes and that another manager owns.
    let (changed, _) = diff("", &strip_untracked(&base), &strip_untracked(&merged));
    let mut conflicts = Vec::new();
    for (entry, set) in managed.iter_mut() {
        if is_me(entry) {
            continue;
        }
        let clash = set.intersection(&changed).intersection(&applied_set);
        if clash.is_empty() {
            continue;
        }
        if force {
            set.difference(&clash);
        } else {
            for p in clash.paths() {
                conflicts.push(ApplyConflict {
                    manager: entry.manager.clone(),
                    api_version: entry.api_version.clone(),
                    field: path_string(&p),
                    operation: entry.operation.clone(),
                    time: entry.time.clone(),
                });
            }
        }
    }
    if !conflicts.is_empty() {
        return Err(ApplyError::Conflicts(conflicts));
    }

    // Prune what this manager applied before but no longer does, unless someone else owns it.
    let previous = managed
        .iter()
        .find(|(e, _)| is_me(e))
        .map(|(_, s)| s.clone())
        .unwrap_or_default();
    let mut to_remove = previous;
    to_remove.difference(&applied_set);
    for (e, s) in &managed {
        if !is_me(e) {
            to_remove.difference(s);
        }
    }
    if !to_remove.is_empty() {
        remove_paths(&mut merged, "", &to_remove);
    }

    managed.retain(|(e, _)| !is_me(e));
    managed.push((
        ManagedFieldsEntry {
            manager: manager.to_string(),
            operation: "Apply".into(),
            api_version,
            time: Some(now.to_string()),
            fields_type: "FieldsV1".into(),
            fields_v1: None,
            subresource: String::new(),
        },
        applied_set,
    ));
    store_managed(&mut merged, managed);
    Ok(merged)
}

/// Merges an applied configuration into an object with SSA semantics: maps merge, keyed
/// lists merge by key, sets union, everything else is replaced; null removes.
fn merge_apply(target: &mut Value, applied: &Value, field: &str) {
    match (target, applied) {
        (Value::Object(t), Value::Object(a)) if !is_atomic_map(a) => {
            for (k, av) in a {
                if av.is_null() {
                    t.shift_remove(k);
                    continue;
                }
                match t.get_mut(k) {
                    Some(tv) => merge_apply(tv, av, k),
                    None => {
                        t.insert(k.clone(), av.clone());
                    }
                }
            }
        }
        (Value::Array(t), Value::Array(a)) => {
            let kind = list_kind(field, a);
            let ok = kind != ListKind::Atomic
                && item_pes(&kind, t).is_some()
                && item_pes(&kind, a).is_some();
            if !ok {
                *t = a.clone();
                return;
            }
            for item in a {
                let pe = item_pe(&kind, item);
                match t.iter_mut().find(|x| item_pe(&kind, x) == pe) {
                    Some(existing) => merge_apply(existing, item, field),
                    None => t.push(item.clone()),
                }
            }
        }
        (t, a) => *t = a.clone(),
    }
}

/// Removes the member paths of `set` from `v`; maps and lists emptied by the removal go too.
fn remove_paths(v: &mut Value, field: &str, set: &FieldSet) {
    match v {
        Value::Object(m) => {
            for (pe, child) in &set.children {
                let Some(f) = pe.strip_prefix("f:") else {
                    continue;
                };
                if child.member {
                    m.shift_remove(f);
                } else if let Some(cv) = m.get_mut(f) {
                    let was_empty = is_empty_container(cv);
                    remove_paths(cv, f, child);
                    if !was_empty && is_empty_container(cv) {
                        m.shift_remove(f);
                    }
                }
            }
        }
        Value::Array(items) => {
            let kind = list_kind(field, items);
            let mut keep = Vec::with_capacity(items.len());
            for mut item in items.drain(..) {
                let pe = item_pe(&kind, &item);
                match pe.and_then(|pe| set.children.get(&pe)) {
                    Some(child) if child.member => {}
                    Some(child) => {
                        remove_paths(&mut item, field, child);
                        keep.push(item);
                    }
                    None => keep.push(item),
                }
            }
            *items = keep;
        }
        _ => {}
    }
}

fn is_empty_container(v: &Value) -> bool {
    match v {
        Value::Object(m) => m.is_empty(),
        Value::Array(a) => a.is_empty(),
        _ => false,
    }
}

/// Records an ordinary create/update by `manager` (operation "Update"): the fields that
/// changed become the manager's and are taken from every other manager; removed fields
/// leave all sets. If the caller put managedFields on `new` that differ from `old`'s
/// (server-side apply does, and clients may on purpose), those are kept as they are.
pub fn track_update(old: Option<&Value>, new: &mut Value, manager: &str, now: &str) {
    let new_mf = new
        .get("metadata")
        .and_then(|m| m.get("managedFields"))
        .cloned();
    let old_mf = old
        .and_then(|o| o.get("metadata"))
        .and_then(|m| m.get("managedFields"))
        .cloned();
    match &new_mf {
        // `[{}]` is Kubernetes' way to clear managedFields.
        Some(Value::Array(a)) if a.len() == 1 && a[0].as_object().is_some_and(|o| o.is_empty()) => {
            if let Some(meta) = new.get_mut("metadata").and_then(Value::as_object_mut) {
                meta.shift_remove("managedFields");
            }
            return;
        }
        Some(Value::Array(a)) if !a.is_empty() && new_mf != old_mf => return,
        _ => {}
    }
    let empty = Value::Object(Map::new());
    let (changed, removed) = diff(
        "",
        &strip_untracked(old.unwrap_or(&empty)),
        &strip_untracked(new),
    );
    if let Some(old) = old
        && changed.is_empty()
        && removed.is_empty()
    {
        // Nothing tracked changed (a status write, a no-op update): the stored entries
        // stay exactly as they are, without parsing and re-encoding every manager's set.
        if let Some(meta) = new.get_mut("metadata").and_then(Value::as_object_mut) {
            match old.get("metadata").and_then(|m| m.get("managedFields")) {
                Some(mf) => {
                    meta.insert("managedFields".into(), mf.clone());
                }
                None => {
                    meta.shift_remove("managedFields");
                }
            }
        }
        return;
    }
    let mut managed = parse_managed(old);
    if !changed.is_empty() || !removed.is_empty() {
        for (_, set) in managed.iter_mut() {
            set.difference(&changed);
            set.difference(&removed);
        }
        let mine = |e: &ManagedFieldsEntry| {
            e.manager == manager && e.operation == "Update" && e.subresource.is_empty()
        };
        let api_version = api_version_of(new);
        match managed.iter_mut().find(|(e, _)| mine(e)) {
            Some((e, set)) => {
                set.union(&changed);
                e.time = Some(now.to_string());
                e.api_version = api_version;
            }
            None => managed.push((
                ManagedFieldsEntry {
                    manager: manager.to_string(),
                    operation: "Update".into(),
                    api_version,
                    time: Some(now.to_string()),
                    fields_type: "FieldsV1".into(),
                    fields_v1: None,
                    subresource: String::new(),
                },
                changed,
            )),
        }
    }
    store_managed(new, managed);
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const T1: &str = "2024-01-01T00:00:00Z";
    const T2: &str = "2024-01-02T00:00:00Z";

    fn deploy(replicas: i64, image: &str) -> Value {
        json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "web", "namespace": "default", "labels": {"app": "web"}},
            "spec": {
                "replicas": replicas,
                "selector": {"matchLabels": {"app": "web"}},
                "template": {
                    "metadata": {"labels": {"app": "web"}},
                    "spec": {"containers": [{"name": "web", "image": image}]}
                }
            }
        })
    }

    fn entries(obj: &Value) -> Vec<ManagedFieldsEntry> {
        serde_json::from_value(obj["metadata"]["managedFields"].clone()).unwrap()
    }

    fn entry<'a>(es: &'a [ManagedFieldsEntry], manager: &str, op: &str) -> &'a ManagedFieldsEntry {
        es.iter()
            .find(|e| e.manager == manager && e.operation == op)
            .unwrap()
    }

    #[test]
    fn first_apply_creates_ownership() {
        let out = server_side_apply(None, &deploy(2, "nginx:1"), "kubectl", false, T1).unwrap();
        assert_eq!(out["spec"]["replicas"], 2);
        let es = entries(&out);
        assert_eq!(es.len(), 1);
        let e = &es[0];
        assert_eq!(
            (
                e.manager.as_str(),
                e.operation.as_str(),
                e.api_version.as_str()
            ),
            ("kubectl", "Apply", "apps/v1")
        );
        assert_eq!(e.time.as_deref(), Some(T1));
        assert_eq!(e.fields_type, "FieldsV1");
        assert_eq!(
            e.fields_v1.as_ref().unwrap(),
            &json!({
                "f:metadata": {"f:labels": {"f:app": {}}},
                "f:spec": {
                    "f:replicas": {},
                    "f:selector": {},
                    "f:template": {
                        "f:metadata": {"f:labels": {"f:app": {}}},
                        "f:spec": {"f:containers": {"k:{\"name\":\"web\"}": {".": {}, "f:image": {}, "f:name": {}}}}
                    }
                }
            })
        );
    }

    #[test]
    fn reapply_without_field_removes_it() {
        let mut cfg = deploy(2, "nginx:1");
        cfg["metadata"]["labels"]["tier"] = json!("fe");
        cfg["spec"]["template"]["spec"]["containers"][0]["args"] = json!(["-v"]);
        let live = server_side_apply(None, &cfg, "kubectl", false, T1).unwrap();
        let out =
            server_side_apply(Some(&live), &deploy(2, "nginx:1"), "kubectl", false, T2).unwrap();
        assert_eq!(out["metadata"]["labels"], json!({"app": "web"}));
        assert!(
            out["spec"]["template"]["spec"]["containers"][0]
                .get("args")
                .is_none()
        );
        let e = &entries(&out)[0];
        assert_eq!(e.time.as_deref(), Some(T2));
        assert!(
            e.fields_v1.as_ref().unwrap()["f:metadata"]["f:labels"]
                .get("f:tier")
                .is_none()
        );

        // Removing a whole container removes the item; emptied maps go away.
        let mut two = deploy(2, "nginx:1");
        two["spec"]["template"]["spec"]["containers"]
            .as_array_mut()
            .unwrap()
            .push(json!({"name": "side", "image": "busybox"}));
        two["spec"]["strategy"] = json!({"rollingUpdate": {"maxSurge": 1}});
        let live = server_side_apply(Some(&out), &two, "kubectl", false, T2).unwrap();
        assert_eq!(
            live["spec"]["template"]["spec"]["containers"]
                .as_array()
                .unwrap()
                .len(),
            2
        );
        let out =
            server_side_apply(Some(&live), &deploy(2, "nginx:1"), "kubectl", false, T2).unwrap();
        assert_eq!(
            out["spec"]["template"]["spec"]["containers"],
            json!([{"name": "web", "image": "nginx:1"}])
        );
        assert!(out["spec"].get("strategy").is_none());
    }

    #[test]
    fn field_kept_when_another_manager_owns_it() {
        let mut cfg = deploy(2, "nginx:1");
        cfg["metadata"]["labels"]["tier"] = json!("fe");
        let live = server_side_apply(None, &cfg, "a", false, T1).unwrap();
        let live = server_side_apply(Some(&live), &cfg, "b", false, T1).unwrap();
        let out = server_side_apply(Some(&live), &deploy(2, "nginx:1"), "a", false, T2).unwrap();
        assert_eq!(out["metadata"]["labels"]["tier"], "fe");
    }

    #[test]
    fn second_manager_conflicts_then_force_takes_over() {
        let live = server_side_apply(None, &deploy(2, "nginx:1"), "kubectl", false, T1).unwrap();
        let other = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"}, "spec": {"replicas": 5}});
        let err = server_side_apply(Some(&live), &other, "hpa", false, T2).unwrap_err();
        let ApplyError::Conflicts(c) = &err else {
            panic!("{err}")
        };
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].field, ".spec.replicas");
        assert_eq!(c[0].manager, "kubectl");
        assert_eq!(c[0].api_version, "apps/v1");
        assert_eq!(
            err.to_string(),
            r#"Apply failed with 1 conflict: conflict with "kubectl": .spec.replicas"#
        );

        let out = server_side_apply(Some(&live), &other, "hpa", true, T2).unwrap();
        assert_eq!(out["spec"]["replicas"], 5);
        let es = entries(&out);
        let hpa = entry(&es, "hpa", "Apply");
        assert_eq!(
            hpa.fields_v1.as_ref().unwrap(),
            &json!({"f:spec": {"f:replicas": {}}})
        );
        let k = entry(&es, "kubectl", "Apply");
        assert!(
            k.fields_v1.as_ref().unwrap()["f:spec"]
                .get("f:replicas")
                .is_none()
        );
        // The old owner re-applying its old value now conflicts with the new owner.
        let err =
            server_side_apply(Some(&out), &deploy(2, "nginx:1"), "kubectl", false, T2).unwrap_err();
        assert!(
            err.to_string()
                .contains(r#"conflict with "hpa": .spec.replicas"#),
            "{err}"
        );
        // The old owner dropping replicas does not remove it: hpa owns it.
        let mut no_replicas = deploy(2, "nginx:1");
        no_replicas["spec"]
            .as_object_mut()
            .unwrap()
            .remove("replicas");
        let out = server_side_apply(Some(&out), &no_replicas, "kubectl", false, T2).unwrap();
        assert_eq!(out["spec"]["replicas"], 5);
    }

    #[test]
    fn same_value_shares_ownership() {
        let live = server_side_apply(None, &deploy(2, "nginx:1"), "kubectl", false, T1).unwrap();
        let other = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"}, "spec": {"replicas": 2}});
        let out = server_side_apply(Some(&live), &other, "other", false, T2).unwrap();
        let es = entries(&out);
        assert_eq!(es.len(), 2);
        assert!(
            entry(&es, "kubectl", "Apply").fields_v1.as_ref().unwrap()["f:spec"]
                .get("f:replicas")
                .is_some()
        );
        assert!(
            entry(&es, "other", "Apply").fields_v1.as_ref().unwrap()["f:spec"]
                .get("f:replicas")
                .is_some()
        );
        // kubectl dropping replicas keeps the value: "other" still owns it.
        let mut cfg = deploy(2, "nginx:1");
        cfg["spec"].as_object_mut().unwrap().remove("replicas");
        let out = server_side_apply(Some(&out), &cfg, "kubectl", false, T2).unwrap();
        assert_eq!(out["spec"]["replicas"], 2);
    }

    #[test]
    fn update_manager_then_apply_conflicts() {
        let live = server_side_apply(None, &deploy(2, "nginx:1"), "kubectl", false, T1).unwrap();
        let mut scaled = live.clone();
        scaled["spec"]["replicas"] = json!(4);
        track_update(Some(&live), &mut scaled, "kubectl-scale", T2);
        let es = entries(&scaled);
        let scale = entry(&es, "kubectl-scale", "Update");
        assert_eq!(
            scale.fields_v1.as_ref().unwrap(),
            &json!({"f:spec": {"f:replicas": {}}})
        );
        assert!(
            entry(&es, "kubectl", "Apply").fields_v1.as_ref().unwrap()["f:spec"]
                .get("f:replicas")
                .is_none()
        );
        // Apply entries sort before Update entries.
        assert_eq!(es[0].operation, "Apply");

        let err = server_side_apply(Some(&scaled), &deploy(3, "nginx:1"), "kubectl", false, T2)
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                r#"Apply failed with 1 conflict: conflict with "kubectl-scale" using apps/v1 at {T2}: .spec.replicas"#
            )
        );
        // Applying the value the scaler set is fine.
        let ok =
            server_side_apply(Some(&scaled), &deploy(4, "nginx:1"), "kubectl", false, T2).unwrap();
        assert_eq!(ok["spec"]["replicas"], 4);
    }

    #[test]
    fn multiple_conflicts_message() {
        let c = |m: &str, op: &str, f: &str| ApplyConflict {
            manager: m.into(),
            api_version: "apps/v1".into(),
            field: f.into(),
            operation: op.into(),
            time: None,
        };
        let msg = conflicts_message(&[
            c("kubectl-client-side-apply", "Update", ".spec.replicas"),
            c("a", "Apply", ".spec.paused"),
            c(
                "kubectl-client-side-apply",
                "Update",
                ".spec.minReadySeconds",
            ),
        ]);
        assert_eq!(
            msg,
            "Apply failed with 3 conflicts: conflicts with \"a\":\n- .spec.paused\nconflicts with \"kubectl-client-side-apply\" using apps/v1:\n- .spec.replicas\n- .spec.minReadySeconds"
        );
    }

    #[test]
    fn keyed_list_merge_by_container_name() {
        let live = server_side_apply(None, &deploy(2, "nginx:1"), "kubectl", false, T1).unwrap();
        let side = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"},
            "spec": {"template": {"spec": {"containers": [{"name": "side", "image": "busybox"}]}}}});
        let out = server_side_apply(Some(&live), &side, "injector", false, T2).unwrap();
        let cs = out["spec"]["template"]["spec"]["containers"]
            .as_array()
            .unwrap();
        assert_eq!(cs.len(), 2);
        assert_eq!(cs[0]["image"], "nginx:1");
        // Changing another container's image conflicts with its owner and names the item.
        let bad = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"},
            "spec": {"template": {"spec": {"containers": [{"name": "web", "image": "nginx:2"}]}}}});
        let err = server_side_apply(Some(&out), &bad, "injector", false, T2).unwrap_err();
        assert!(
            err.to_string()
                .ends_with(r#".spec.template.spec.containers[name="web"].image"#),
            "{err}"
        );
    }

    #[test]
    fn service_ports_key_on_port_and_protocol() {
        let svc = json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s"},
            "spec": {"ports": [{"port": 80, "targetPort": 8080}], "selector": {"app": "web"}}});
        let out = server_side_apply(None, &svc, "kubectl", false, T1).unwrap();
        let f = entries(&out)[0].fields_v1.clone().unwrap();
        assert_eq!(
            f["f:spec"]["f:ports"],
            json!({"k:{\"port\":80,\"protocol\":\"TCP\"}": {".": {}, "f:port": {}, "f:targetPort": {}}})
        );
        // Service selectors are plain maps, not atomic label selectors.
        assert_eq!(f["f:spec"]["f:selector"], json!({"f:app": {}}));
    }

    #[test]
    fn finalizers_are_a_set() {
        let cm = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c", "finalizers": ["a/b"]}, "data": {"k": "v"}});
        let out = server_side_apply(None, &cm, "m", false, T1).unwrap();
        let f = entries(&out)[0].fields_v1.clone().unwrap();
        assert_eq!(f["f:metadata"]["f:finalizers"], json!({"v:\"a/b\"": {}}));
        assert_eq!(f["f:data"], json!({"f:k": {}}));
        let cm2 = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c", "finalizers": ["x/y"]}});
        let out = server_side_apply(Some(&out), &cm2, "n", false, T2).unwrap();
        assert_eq!(out["metadata"]["finalizers"], json!(["a/b", "x/y"]));
    }

    #[test]
    fn track_update_on_create_and_update() {
        let mut obj = deploy(1, "nginx:1");
        obj["metadata"]["uid"] = json!("u1");
        obj["metadata"]["resourceVersion"] = json!("5");
        obj["status"] = json!({"replicas": 0});
        track_update(None, &mut obj, "kubectl-create", T1);
        let es = entries(&obj);
        assert_eq!(es.len(), 1);
        let f = es[0].fields_v1.clone().unwrap();
        assert_eq!(f["f:metadata"], json!({"f:labels": {".": {}, "f:app": {}}}));
        assert!(f.get("f:status").is_none() && f.get("f:apiVersion").is_none());
        assert_eq!(
            f["f:spec"]["f:template"]["f:spec"]["f:containers"]["k:{\"name\":\"web\"}"]
                [".".to_string()],
            json!({})
        );

        // An edit by another client takes the changed field from the creator.
        let old = obj.clone();
        obj["spec"]["template"]["spec"]["containers"][0]["image"] = json!("nginx:2");
        obj["metadata"]["labels"]
            .as_object_mut()
            .unwrap()
            .remove("app");
        track_update(Some(&old), &mut obj, "kubectl-edit", T2);
        let es = entries(&obj);
        let edit = entry(&es, "kubectl-edit", "Update")
            .fields_v1
            .clone()
            .unwrap();
        assert_eq!(
            edit,
            json!({"f:spec": {"f:template": {"f:spec": {"f:containers": {"k:{\"name\":\"web\"}": {"f:image": {}}}}}}})
        );
        let create = entry(&es, "kubectl-create", "Update")
            .fields_v1
            .clone()
            .unwrap();
        assert!(create["f:metadata"]["f:labels"].get("f:app").is_none());
        assert!(
            create["f:spec"]["f:template"]["f:spec"]["f:containers"]["k:{\"name\":\"web\"}"]
                .get("f:image")
                .is_none()
        );

        // A no-op update leaves managedFields untouched.
        let before = obj.clone();
        track_update(Some(&before), &mut obj, "someone", "2030-01-01T00:00:00Z");
        assert_eq!(obj, before);
    }

    #[test]
    fn track_update_respects_caller_managed_fields() {
        let live = server_side_apply(None, &deploy(2, "nginx:1"), "kubectl", false, T1).unwrap();
        let applied =
            server_side_apply(Some(&live), &deploy(3, "nginx:1"), "kubectl", false, T2).unwrap();
        let mut new = applied.clone();
        track_update(Some(&live), &mut new, "kubectl", T2);
        assert_eq!(new, applied, "SSA result must not gain an Update entry");
        let mut created = live.clone();
        track_update(None, &mut created, "kubectl", T1);
        assert_eq!(created, live);
        // `[{}]` clears them.
        let mut reset = live.clone();
        reset["metadata"]["managedFields"] = json!([{}]);
        track_update(Some(&live), &mut reset, "x", T2);
        assert!(reset["metadata"].get("managedFields").is_none());
    }

    #[test]
    fn managed_fields_round_trip() {
        let out = server_side_apply(None, &deploy(2, "nginx:1"), "kubectl", false, T1).unwrap();
        let raw = out["metadata"]["managedFields"][0].clone();
        let keys: Vec<&str> = raw
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(
            keys,
            [
                "manager",
                "operation",
                "apiVersion",
                "time",
                "fieldsType",
                "fieldsV1"
            ]
        );
        let e: ManagedFieldsEntry = serde_json::from_value(raw.clone()).unwrap();
        assert_eq!(serde_json::to_value(&e).unwrap(), raw);
        let set = FieldSet::from_v1(e.fields_v1.as_ref().unwrap());
        assert_eq!(set.to_v1(), raw["fieldsV1"]);
        // YAML round trip as kubectl shows it.
        let yaml = serde_yaml::to_string(&out).unwrap();
        assert_eq!(parse_apply_body(yaml.as_bytes()).unwrap(), out);
    }

    #[test]
    fn parse_body_yaml_json_and_errors() {
        let y = b"apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: c\ndata:\n  a: \"1\"\n";
        let v = parse_apply_body(y).unwrap();
        assert_eq!(v["data"]["a"], "1");
        let j = br#"{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"c"}}"#;
        assert_eq!(parse_apply_body(j).unwrap()["kind"], "ConfigMap");
        for bad in [
            &b""[..],
            b"- a\n- b\n",
            b"just a string",
            b"a: [",
            b"a: 1\n---\nb: 2\n",
            b"\xff\xfe",
        ] {
            assert!(
                matches!(parse_apply_body(bad), Err(ApplyError::Invalid(_))),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn apply_errors() {
        let live = server_side_apply(None, &deploy(2, "nginx:1"), "kubectl", false, T1).unwrap();
        let no_kind = json!({"apiVersion": "v1", "metadata": {"name": "x"}});
        assert!(server_side_apply(None, &no_kind, "m", false, T1).is_err());
        assert!(server_side_apply(None, &json!([1]), "m", false, T1).is_err());
        let mut with_mf = deploy(2, "x");
        with_mf["metadata"]["managedFields"] = json!([{"manager": "x"}]);
        assert!(
            server_side_apply(Some(&live), &with_mf, "m", false, T1)
                .unwrap_err()
                .to_string()
                .contains("managedFields")
        );
        let svc = json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"}});
        assert!(server_side_apply(Some(&live), &svc, "m", false, T1).is_err());
        let dup = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
            "spec": {"containers": [{"name": "a"}, {"name": "a"}]}});
        assert!(server_side_apply(None, &dup, "m", false, T1).is_err());
        let nokey = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": {"containers": [{"image": "a"}]}});
        assert!(server_side_apply(None, &nokey, "m", false, T1).is_err());
        // Garbage managedFields on the live object are dropped, never a panic.
        let mut weird = live.clone();
        weird["metadata"]["managedFields"] = json!(["x", {"manager": 3}, {"manager": "ok", "operation": "Update", "fieldsV1": "nope"}]);
        assert!(
            server_side_apply(Some(&weird), &deploy(3, "nginx:1"), "kubectl", false, T2).is_ok()
        );
        let mut not_obj = json!(7);
        track_update(Some(&json!("x")), &mut not_obj, "m", T1);
    }

    #[test]
    fn status_is_not_applied_or_tracked() {
        let mut cfg = deploy(2, "nginx:1");
        cfg["status"] = json!({"replicas": 9});
        let mut live =
            server_side_apply(None, &deploy(2, "nginx:1"), "kubectl", false, T1).unwrap();
        live["status"] = json!({"replicas": 2});
        let out = server_side_apply(Some(&live), &cfg, "kubectl", false, T2).unwrap();
        assert_eq!(out["status"], json!({"replicas": 2}));
        assert!(
            entries(&out)[0]
                .fields_v1
                .as_ref()
                .unwrap()
                .get("f:status")
                .is_none()
        );
    }

    #[test]
    fn no_panics_on_odd_inputs() {
        let shapes = [
            json!(null),
            json!(1),
            json!({}),
            json!({"apiVersion": "v1", "kind": "Pod"}),
            json!({"apiVersion": "v1", "kind": "Pod", "metadata": 1, "spec": [1]}),
            json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"managedFields": 3, "finalizers": [1, 1.5, true]},
                "spec": {"containers": [{"name": "a", "ports": [{"containerPort": 1}, {"port": 2}]}]}}),
            json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"managedFields": [{"manager": "m", "operation": "Update",
                "fieldsV1": {"f:spec": {"f:containers": {"k:{bad": {}, "v:1": {".": {}}}}, "i:0": 1}}]}}),
        ];
        for live in &shapes {
            for applied in &shapes {
                for force in [false, true] {
                    let _ = server_side_apply(Some(live), applied, "m", force, T1);
                    let _ = server_side_apply(None, applied, "m", force, T1);
                }
                let mut new = applied.clone();
                track_update(Some(live), &mut new, "u", T2);
                let mut new = applied.clone();
                track_update(None, &mut new, "u", T2);
            }
        }
        assert_eq!(
            path_string(&["f:a".into(), "k:{bad".into(), "v:1".into(), "i:2".into()]),
            ".a[{bad][=1][2]"
        );
    }
}
