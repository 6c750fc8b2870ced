//! PATCH bodies: RFC 6902 JSON patch, RFC 7386 merge patch and Kubernetes strategic merge
//! patch (SMP). Server-side apply lives in `apply.rs`.
//!
//! SMP needs per-field list semantics that Kubernetes takes from Go struct tags
//! (`patchStrategy`/`patchMergeKey`); we keep a small table keyed by the list's field name.

use serde_json::{Map, Value};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatchType {
    Json,
    Merge,
    StrategicMerge,
    Apply,
}

impl PatchType {
    /// Maps a Content-Type header to a patch type; parameters such as `;charset=utf-8` are
    /// ignored. `application/apply-patch+cbor` and anything unknown give `None`.
    pub fn from_content_type(ct: &str) -> Option<PatchType> {
        let base = ct
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        match base.as_str() {
            "application/json-patch+json" => Some(PatchType::Json),
            "application/merge-patch+json" => Some(PatchType::Merge),
            "application/strategic-merge-patch+json" => Some(PatchType::StrategicMerge),
            "application/apply-patch+yaml" => Some(PatchType::Apply),
            _ => None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PatchError {
    #[error("{0}")]
    Invalid(String),
}

fn invalid(msg: impl Into<String>) -> PatchError {
    PatchError::Invalid(msg.into())
}

/// Applies a JSON, merge or strategic merge patch to `original` and returns the result.
/// `PatchType::Apply` is rejected: server-side apply needs managedFields (see `apply.rs`).
pub fn apply_patch(kind: PatchType, original: &Value, patch: &[u8]) -> Result<Value, PatchError> {
    match kind {
        PatchType::Json => {
            let ops: json_patch::Patch = serde_json::from_slice(patch)
                .map_err(|e| invalid(format!("error decoding JSON patch: {e}")))?;
            let mut out = original.clone();
            json_patch::patch(&mut out, &ops)
                .map_err(|e| invalid(format!("the JSON patch could not be applied: {e}")))?;
            Ok(out)
        }
        PatchType::Merge => {
            let p = parse_object_patch(patch, "merge")?;
            let mut out = original.clone();
            json_patch::merge(&mut out, &p);
            Ok(out)
        }
        PatchType::StrategicMerge => {
            let p = parse_object_patch(patch, "strategic merge")?;
            strategic_merge(original, &p)
        }
        PatchType::Apply => Err(invalid(
            "apply patches must be handled by server-side apply, not as a patch",
        )),
    }
}

fn parse_object_patch(patch: &[u8], what: &str) -> Result<Value, PatchError> {
    let p: Value = serde_json::from_slice(patch)
        .map_err(|e| invalid(format!("error decoding {what} patch: {e}")))?;
    if !p.is_object() {
        // A non-object merge patch would replace the whole object, which can never decode
        // into a Kubernetes object, so reject it up front with a readable message.
        return Err(invalid(format!(
            "the {what} patch must be a JSON object, got: {}",
            truncate(&p.to_string())
        )));
    }
    Ok(p)
}

fn truncate(s: &str) -> String {
    if s.len() <= 200 {
        return s.to_string();
    }
    let mut end = 200;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

/// Applies a strategic merge patch (as a parsed JSON object) to `original`.
pub fn strategic_merge(original: &Value, patch: &Value) -> Result<Value, PatchError> {
    let Some(p) = patch.as_object() else {
        return Err(invalid("a strategic merge patch must be a JSON object"));
    };
    let orig = original.as_object().cloned().unwrap_or_default();
    match merge_map(orig, p)? {
        Merged::Map(m) => Ok(Value::Object(m)),
        // `$patch: delete` at the top level empties the object, as Kubernetes does.
        Merged::Deleted => Ok(Value::Object(Map::new())),
    }
}

const DIRECTIVE: &str = "$patch";
const RETAIN_KEYS: &str = "$retainKeys";
const SET_ORDER_PREFIX: &str = "$setElementOrder/";
const DELETE_PRIMITIVE_PREFIX: &str = "$deleteFromPrimitiveList/";

/// How SMP merges a list, from the Kubernetes `patchStrategy`/`patchMergeKey` tags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SmpList {
    /// `patchStrategy:"merge"` with a merge key: items are matched by that field.
    Keyed(&'static str),
    /// `patchStrategy:"merge"` on a list of primitives: union of values.
    PrimitiveSet,
    /// No strategy: the patch list replaces the original.
    Atomic,
}

fn smp_list_kind(field: &str, original: &[Value], patch: &[Value]) -> SmpList {
    match field {
        "containers"
        | "initContainers"
        | "ephemeralContainers"
        | "env"
        | "volumes"
        | "imagePullSecrets"
        | "resourceClaims" => SmpList::Keyed("name"),
        "volumeMounts" => SmpList::Keyed("mountPath"),
        "volumeDevices" => SmpList::Keyed("devicePath"),
        "hostAliases" => SmpList::Keyed("ip"),
        "conditions" => SmpList::Keyed("type"),
        "ownerReferences" => SmpList::Keyed("uid"),
        "topologySpreadConstraints" => SmpList::Keyed("topologyKey"),
        // Container ports merge on containerPort, Service ports on port.
        "ports" => {
            let has_container_port = original
                .iter()
                .chain(patch)
                .any(|i| i.get("containerPort").is_some());
            if has_container_port {
                SmpList::Keyed("containerPort")
            } else {
                SmpList::Keyed("port")
            }
        }
        "finalizers" => SmpList::PrimitiveSet,
        _ => SmpList::Atomic,
    }
}

enum Merged {
    Map(Map<String, Value>),
    /// The patch said `$patch: delete` for this map.
    Deleted,
}

fn merge_map(
    mut orig: Map<String, Value>,
    patch: &Map<String, Value>,
) -> Result<Merged, PatchError> {
    match patch.get(DIRECTIVE) {
        None => {}
        Some(Value::String(s)) if s == "merge" => {}
        Some(Value::String(s)) if s == "delete" => return Ok(Merged::Deleted),
        Some(Value::String(s)) if s == "replace" => {
            // Replace drops the original; merging into an empty map still strips directives
            // and nulls from the patch so none leak into the stored object.
            let mut rest = patch.clone();
            rest.remove(DIRECTIVE);
            return merge_map(Map::new(), &rest);
        }
        Some(other) => return Err(invalid(format!("unknown patch type: {other} in map"))),
    }

    if let Some(retain) = patch.get(RETAIN_KEYS) {
        let keys = string_list(retain, RETAIN_KEYS)?;
        orig.retain(|k, _| keys.iter().any(|r| r == k));
    }

    for (k, v) in patch {
        if let Some(field) = k.strip_prefix(DELETE_PRIMITIVE_PREFIX) {
            let Some(remove) = v.as_array() else {
                return Err(invalid(format!("{k} must be a list, got {v}")));
            };
            if let Some(Value::Array(items)) = orig.get_mut(field) {
                items.retain(|i| !remove.contains(i));
            }
        }
    }

    for (k, pv) in patch {
        if k.starts_with('$') {
            // Directives were handled above or below; unknown ones are dropped rather than
            // stored (no Kubernetes field name starts with '$').
            continue;
        }
        match pv {
            Value::Null => {
                orig.shift_remove(k);
            }
            Value::Object(pm) => {
                // take() leaves the key in place so merged maps keep their field order.
                let base = match orig.get_mut(k).map(Value::take) {
                    Some(Value::Object(m)) => m,
                    _ => Map::new(),
                };
                match merge_map(base, pm)? {
                    Merged::Map(m) => {
                        orig.insert(k.clone(), Value::Object(m));
                    }
                    Merged::Deleted => {
                        orig.shift_remove(k);
                    }
                }
            }
            Value::Array(pl) => {
                let base = match orig.get_mut(k).map(Value::take) {
                    Some(Value::Array(l)) => l,
                    _ => Vec::new(),
                };
                let merged = merge_list(k, base, pl)?;
                orig.insert(k.clone(), Value::Array(merged));
            }
            scalar => {
                orig.insert(k.clone(), scalar.clone());
            }
        }
    }

    for (k, order) in patch {
        if let Some(field) = k.strip_prefix(SET_ORDER_PREFIX) {
            let Some(order) = order.as_array() else {
                return Err(invalid(format!("{k} must be a list, got {order}")));
            };
            if let Some(Value::Array(items)) = orig.get_mut(field) {
                let kind = smp_list_kind(field, items, order);
                reorder(items, order, kind);
            }
        }
    }
    Ok(Merged::Map(orig))
}

fn string_list(v: &Value, what: &str) -> Result<Vec<String>, PatchError> {
    let err = || invalid(format!("{what} must be a list of strings, got {v}"));
    v.as_array()
        .ok_or_else(err)?
        .iter()
        .map(|s| s.as_str().map(str::to_string).ok_or_else(err))
        .collect()
}

fn merge_list(field: &str, orig: Vec<Value>, patch: &[Value]) -> Result<Vec<Value>, PatchError> {
    // `{"$patch": "replace"}` as a list item replaces the whole list with the other items.
    let replace = patch.iter().any(|i| {
        i.as_object()
            .is_some_and(|m| m.len() == 1 && m.get(DIRECTIVE) == Some(&Value::from("replace")))
    });
    if replace {
        let rest: Vec<Value> = patch
            .iter()
            .filter(|i| {
                !i.as_object()
                    .is_some_and(|m| m.len() == 1 && m.contains_key(DIRECTIVE))
            })
            .cloned()
            .collect();
        return clean_list(&rest);
    }
    match smp_list_kind(field, &orig, patch) {
        SmpList::Atomic => clean_list(patch),
        SmpList::PrimitiveSet => {
            let mut out = orig;
            for item in patch {
                if item.is_object() || item.is_array() {
                    return Err(invalid(format!(
                        "{field}: expected a list of primitives, got item {}",
                        truncate(&item.to_string())
                    )));
                }
                if !out.contains(item) {
                    out.push(item.clone());
                }
            }
            Ok(out)
        }
        SmpList::Keyed(key) => {
            let mut out = orig;
            for item in patch {
                let Some(pm) = item.as_object() else {
                    return Err(invalid(format!(
                        "{field}: expected a list of objects merged on {key:?}, got item {}",
                        truncate(&item.to_string())
                    )));
                };
                let Some(kv) = pm.get(key).filter(|v| !v.is_null()) else {
                    return Err(invalid(format!(
                        "map: {} does not contain declared merge key: {key}",
                        truncate(&item.to_string())
                    )));
                };
                let pos = out.iter().position(|o| o.get(key) == Some(kv));
                if pm.get(DIRECTIVE) == Some(&Value::from("delete")) {
                    out.retain(|o| o.get(key) != Some(kv));
                    continue;
                }
                let base = match pos.map(|p| &out[p]) {
                    Some(Value::Object(m)) => m.clone(),
                    _ => Map::new(),
                };
                match (merge_map(base, pm)?, pos) {
                    (Merged::Map(m), Some(p)) => out[p] = Value::Object(m),
                    (Merged::Map(m), None) => out.push(Value::Object(m)),
                    (Merged::Deleted, Some(p)) => {
                        out.remove(p);
                    }
                    (Merged::Deleted, None) => {}
                }
            }
            Ok(out)
        }
    }
}

/// Strips directives and nulls from list items that are taken over as they are.
fn clean_list(items: &[Value]) -> Result<Vec<Value>, PatchError> {
    let mut out = Vec::with_capacity(items.len());
    for item in items {
        match item {
            Value::Object(m) => {
                if let Merged::Map(m) = merge_map(Map::new(), m)? {
                    out.push(Value::Object(m));
                }
            }
            other => out.push(other.clone()),
        }
    }
    Ok(out)
}

/// Honours `$setElementOrder/<field>`: items named in `order` take the slots of the
/// patched items in the order given, while server-only items keep their positions.
fn reorder(items: &mut Vec<Value>, order: &[Value], kind: SmpList) {
    let ident = |v: &Value| -> Option<Value> {
        match kind {
            SmpList::Keyed(key) => v.get(key).cloned(),
            _ => Some(v.clone()),
        }
    };
    let wanted: Vec<Value> = order.iter().filter_map(ident).collect();
    let mut ordered = Vec::new();
    for w in &wanted {
        if let Some(item) = items.iter().find(|i| ident(i).as_ref() == Some(w))
            && !ordered.contains(item)
        {
            ordered.push(item.clone());
        }
    }
    let mut ordered = ordered.into_iter();
    let mut out = Vec::with_capacity(items.len());
    for item in items.drain(..) {
        let named = ident(&item).is_some_and(|id| wanted.contains(&id));
        if named {
            if let Some(next) = ordered.next() {
                out.push(next);
            }
        } else {
            out.push(item);
        }
    }
    *items = out;
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn smp(orig: Value, patch: Value) -> Value {
        apply_patch(
            PatchType::StrategicMerge,
            &orig,
            patch.to_string().as_bytes(),
        )
        .unwrap()
    }

    fn no_directives(v: &Value) -> bool {
        match v {
            Value::Object(m) => m
                .iter()
                .all(|(k, v)| !k.starts_with('$') && no_directives(v)),
            Value::Array(l) => l.iter().all(no_directives),
            _ => true,
        }
    }

    fn deployment() -> Value {
        json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "web", "labels": {"app": "web", "tier": "fe"}},
            "spec": {
                "replicas": 2,
                "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": "25%"}},
                "template": {"spec": {"containers": [
                    {"name": "web", "image": "nginx:1.25", "ports": [{"containerPort": 80, "protocol": "TCP"}],
                     "env": [{"name": "A", "value": "1"}, {"name": "B", "value": "2"}]},
                    {"name": "sidecar", "image": "busybox", "args": ["sleep", "1d"]}
                ]}}
            }
        })
    }

    #[test]
    fn content_types() {
        use PatchType::*;
        assert_eq!(
            PatchType::from_content_type("application/json-patch+json"),
            Some(Json)
        );
        assert_eq!(
            PatchType::from_content_type("application/merge-patch+json; charset=utf-8"),
            Some(Merge)
        );
        assert_eq!(
            PatchType::from_content_type("application/strategic-merge-patch+json"),
            Some(StrategicMerge)
        );
        assert_eq!(
            PatchType::from_content_type("application/apply-patch+yaml"),
            Some(Apply)
        );
        assert_eq!(
            PatchType::from_content_type("application/apply-patch+cbor"),
            None
        );
        assert_eq!(PatchType::from_content_type("application/json"), None);
        assert_eq!(PatchType::from_content_type(""), None);
    }

    #[test]
    fn json_patch_ops_and_errors() {
        let orig = json!({"spec": {"replicas": 1}, "metadata": {"labels": {"a": "b"}}});
        let p = br#"[{"op":"replace","path":"/spec/replicas","value":3},{"op":"remove","path":"/metadata/labels/a"}]"#;
        let out = apply_patch(PatchType::Json, &orig, p).unwrap();
        assert_eq!(
            out,
            json!({"spec": {"replicas": 3}, "metadata": {"labels": {}}})
        );

        let bad = apply_patch(
            PatchType::Json,
            &orig,
            br#"[{"op":"remove","path":"/nope"}]"#,
        );
        assert!(
            bad.unwrap_err()
                .to_string()
                .contains("could not be applied")
        );
        let test_fail = apply_patch(
            PatchType::Json,
            &orig,
            br#"[{"op":"test","path":"/spec/replicas","value":9}]"#,
        );
        assert!(test_fail.is_err());
        let garbage = apply_patch(PatchType::Json, &orig, b"{not json");
        assert!(
            garbage
                .unwrap_err()
                .to_string()
                .starts_with("error decoding JSON patch")
        );
        assert!(apply_patch(PatchType::Json, &orig, br#"{"op":"add"}"#).is_err());
    }

    #[test]
    fn merge_patch() {
        let orig = json!({"metadata": {"labels": {"a": "1", "b": "2"}}, "spec": {"x": [1, 2]}});
        let out = apply_patch(
            PatchType::Merge,
            &orig,
            br#"{"metadata":{"labels":{"a":null,"c":"3"}},"spec":{"x":[3]}}"#,
        )
        .unwrap();
        assert_eq!(
            out,
            json!({"metadata": {"labels": {"b": "2", "c": "3"}}, "spec": {"x": [3]}})
        );
        assert!(apply_patch(PatchType::Merge, &orig, b"[1]").is_err());
        assert!(apply_patch(PatchType::Merge, &orig, b"").is_err());
        assert!(apply_patch(PatchType::Apply, &orig, b"{}").is_err());
    }

    #[test]
    fn smp_removes_field_from_container_with_set_element_order() {
        // What `kubectl apply` sends after `ports:` is deleted from the manifest.
        let out = smp(
            deployment(),
            json!({"spec":{"template":{"spec":{"$setElementOrder/containers":[{"name":"web"},{"name":"sidecar"}],
                "containers":[{"name":"web","ports":null}]}}}}),
        );
        let c = &out["spec"]["template"]["spec"]["containers"];
        assert!(c[0].get("ports").is_none());
        assert_eq!(c[0]["image"], "nginx:1.25");
        assert_eq!(c[1]["name"], "sidecar");
        assert!(no_directives(&out));
    }

    #[test]
    fn smp_image_change_keeps_other_containers() {
        let out = smp(
            deployment(),
            json!({"spec":{"template":{"spec":{"containers":[{"name":"sidecar","image":"busybox:2"}]}}}}),
        );
        let c = out["spec"]["template"]["spec"]["containers"]
            .as_array()
            .unwrap();
        assert_eq!(c.len(), 2);
        assert_eq!(c[1]["image"], "busybox:2");
        assert_eq!(c[1]["args"], json!(["sleep", "1d"]));
        assert_eq!(c[0]["env"].as_array().unwrap().len(), 2);
    }

    #[test]
    fn smp_env_add_and_remove() {
        let out = smp(
            deployment(),
            json!({"spec":{"template":{"spec":{
                "$setElementOrder/containers":[{"name":"web"},{"name":"sidecar"}],
                "containers":[{"name":"web",
                    "$setElementOrder/env":[{"name":"C"},{"name":"B"}],
                    "env":[{"name":"C","value":"3"},{"$patch":"delete","name":"A"}]}]}}}}),
        );
        let env = &out["spec"]["template"]["spec"]["containers"][0]["env"];
        assert_eq!(
            env,
            &json!([{"name": "C", "value": "3"}, {"name": "B", "value": "2"}])
        );
        assert!(no_directives(&out));
    }

    #[test]
    fn smp_add_and_delete_container() {
        let out = smp(
            deployment(),
            json!({"spec":{"template":{"spec":{
                "$setElementOrder/containers":[{"name":"log"},{"name":"web"}],
                "containers":[{"name":"log","image":"fluent"},{"$patch":"delete","name":"sidecar"}]}}}}),
        );
        let names: Vec<_> = out["spec"]["template"]["spec"]["containers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(names, ["log", "web"]);
    }

    #[test]
    fn smp_label_removal_and_scale() {
        let out = smp(
            deployment(),
            json!({"metadata":{"labels":{"tier":null,"new":"x"}},"spec":{"replicas":5}}),
        );
        assert_eq!(out["metadata"]["labels"], json!({"app": "web", "new": "x"}));
        assert_eq!(out["spec"]["replicas"], 5);
        // Deleting a key that does not exist is fine.
        let out = smp(
            deployment(),
            json!({"metadata":{"annotations":{"gone":null}}}),
        );
        assert_eq!(out["metadata"]["annotations"], json!({}));
    }

    #[test]
    fn smp_strategy_change_with_retain_keys() {
        let out = smp(
            deployment(),
            json!({"spec":{"strategy":{"$retainKeys":["type"],"rollingUpdate":null,"type":"Recreate"}}}),
        );
        assert_eq!(out["spec"]["strategy"], json!({"type": "Recreate"}));
        // $retainKeys alone drops unlisted keys even without nulls.
        let out = smp(
            deployment(),
            json!({"spec":{"strategy":{"$retainKeys":["type"],"type":"Recreate"}}}),
        );
        assert_eq!(out["spec"]["strategy"], json!({"type": "Recreate"}));
        assert!(
            smp_err(
                deployment(),
                json!({"spec":{"strategy":{"$retainKeys":"type"}}})
            )
            .contains("$retainKeys")
        );
    }

    #[test]
    fn smp_finalizers_merge_as_set_and_delete_from_primitive_list() {
        let orig = json!({"metadata":{"finalizers":["a","b"]}});
        let out = smp(orig.clone(), json!({"metadata":{"finalizers":["b","c"]}}));
        assert_eq!(out["metadata"]["finalizers"], json!(["a", "b", "c"]));
        let out = smp(
            orig.clone(),
            json!({"metadata":{"$deleteFromPrimitiveList/finalizers":["a"]}}),
        );
        assert_eq!(out["metadata"]["finalizers"], json!(["b"]));
        let out = smp(
            orig,
            json!({"metadata":{"$setElementOrder/finalizers":["c","b","a"],"finalizers":["c"]}}),
        );
        assert_eq!(out["metadata"]["finalizers"], json!(["c", "b", "a"]));
        assert!(no_directives(&out));
    }

    #[test]
    fn smp_atomic_lists_replace() {
        let out = smp(
            deployment(),
            json!({"spec":{"template":{"spec":{"containers":[{"name":"sidecar","args":["x"]}],
                "tolerations":[{"key":"k","operator":"Exists"}]}}}}),
        );
        assert_eq!(
            out["spec"]["template"]["spec"]["containers"][1]["args"],
            json!(["x"])
        );
        assert_eq!(
            out["spec"]["template"]["spec"]["tolerations"],
            json!([{"key":"k","operator":"Exists"}])
        );
    }

    #[test]
    fn smp_ports_keys() {
        let svc = json!({"spec":{"ports":[{"port":80,"targetPort":8080},{"port":443}]}});
        let out = smp(
            svc,
            json!({"spec":{"ports":[{"port":80,"targetPort":9090}]}}),
        );
        assert_eq!(
            out["spec"]["ports"],
            json!([{"port":80,"targetPort":9090},{"port":443}])
        );
        let out = smp(
            deployment(),
            json!({"spec":{"template":{"spec":{"containers":[{"name":"web","ports":[{"containerPort":8080}]}]}}}}),
        );
        assert_eq!(
            out["spec"]["template"]["spec"]["containers"][0]["ports"]
                .as_array()
                .unwrap()
                .len(),
            2
        );
    }

    #[test]
    fn smp_patch_directives_on_maps_and_lists() {
        let out = smp(
            deployment(),
            json!({"spec":{"strategy":{"$patch":"replace","type":"Recreate"}}}),
        );
        assert_eq!(out["spec"]["strategy"], json!({"type": "Recreate"}));
        let out = smp(
            deployment(),
            json!({"spec":{"strategy":{"$patch":"delete"}}}),
        );
        assert!(out["spec"].get("strategy").is_none());
        let out = smp(
            deployment(),
            json!({"metadata":{"labels":{"$patch":"merge","x":"y"}}}),
        );
        assert_eq!(out["metadata"]["labels"]["x"], "y");
        let out = smp(
            deployment(),
            json!({"spec":{"template":{"spec":{"containers":[{"$patch":"replace"},{"name":"only","image":"i"}]}}}}),
        );
        assert_eq!(
            out["spec"]["template"]["spec"]["containers"],
            json!([{"name":"only","image":"i"}])
        );
        // Directives inside a new subtree must not leak either.
        let out = smp(
            json!({}),
            json!({"spec":{"strategy":{"$retainKeys":["type"],"type":"Recreate","x":null}}}),
        );
        assert_eq!(out, json!({"spec":{"strategy":{"type":"Recreate"}}}));
        assert!(no_directives(&out));
    }

    fn smp_err(orig: Value, patch: Value) -> String {
        apply_patch(
            PatchType::StrategicMerge,
            &orig,
            patch.to_string().as_bytes(),
        )
        .unwrap_err()
        .to_string()
    }

    #[test]
    fn smp_errors() {
        assert!(
            smp_err(
                deployment(),
                json!({"spec":{"strategy":{"$patch":"bogus"}}})
            )
            .contains("unknown patch type")
        );
        assert!(
            smp_err(
                deployment(),
                json!({"spec":{"template":{"spec":{"containers":[{"image":"x"}]}}}})
            )
            .contains("does not contain declared merge key: name")
        );
        assert!(
            smp_err(
                deployment(),
                json!({"spec":{"template":{"spec":{"containers":["x"]}}}})
            )
            .contains("containers")
        );
        assert!(
            smp_err(deployment(), json!({"metadata":{"finalizers":[{"a":1}]}}))
                .contains("primitives")
        );
        assert!(
            smp_err(
                deployment(),
                json!({"metadata":{"$setElementOrder/finalizers":"x"}})
            )
            .contains("must be a list")
        );
        assert!(apply_patch(PatchType::StrategicMerge, &deployment(), b"[]").is_err());
        assert!(apply_patch(PatchType::StrategicMerge, &deployment(), b"{").is_err());
        // Odd shapes in the original never panic.
        let out = smp(
            json!({"spec": 3, "metadata": {"finalizers": "x"}}),
            json!({"spec":{"a":1},"metadata":{"finalizers":["f"]}}),
        );
        assert_eq!(out, json!({"spec":{"a":1},"metadata":{"finalizers":["f"]}}));
        let out = smp(json!(null), json!({"a": 1}));
        assert_eq!(out, json!({"a": 1}));
    }

    #[test]
    fn smp_kubectl_apply_three_way_shape() {
        // `kubectl apply` after changing the image and dropping a label: the patch also
        // rewrites the last-applied annotation.
        let mut orig = deployment();
        orig["metadata"]["annotations"] =
            json!({"kubectl.kubernetes.io/last-applied-configuration": "{}"});
        let out = smp(
            orig,
            json!({"metadata":{"annotations":{"kubectl.kubernetes.io/last-applied-configuration":"{\"new\":1}"},
                "labels":{"tier":null}},
                "spec":{"template":{"spec":{"$setElementOrder/containers":[{"name":"web"},{"name":"sidecar"}],
                    "containers":[{"image":"nginx:1.26","name":"web"}]}}}}),
        );
        assert_eq!(out["metadata"]["labels"], json!({"app": "web"}));
        assert_eq!(
            out["spec"]["template"]["spec"]["containers"][0]["image"],
            "nginx:1.26"
        );
        assert_eq!(
            out["spec"]["template"]["spec"]["containers"][0]["env"][0]["name"],
            "A"
        );
        assert_eq!(
            out["metadata"]["annotations"]["kubectl.kubernetes.io/last-applied-configuration"],
            "{\"new\":1}"
        );
    }

    #[test]
    fn smp_other_keyed_lists() {
        let orig = json!({"metadata":{"ownerReferences":[{"uid":"1","name":"a"}]},
            "spec":{"volumes":[{"name":"v","emptyDir":{}}]},
            "status":{"conditions":[{"type":"Ready","status":"False"},{"type":"Other","status":"True"}]}});
        let out = smp(
            orig,
            json!({"metadata":{"ownerReferences":[{"uid":"2","name":"b"}]},
                "spec":{"volumes":[{"name":"v","$retainKeys":["name","configMap"],"configMap":{"name":"cm"},"emptyDir":null}]},
                "status":{"conditions":[{"type":"Ready","status":"True"}]}}),
        );
        assert_eq!(
            out["metadata"]["ownerReferences"].as_array().unwrap().len(),
            2
        );
        assert_eq!(
            out["spec"]["volumes"],
            json!([{"name":"v","configMap":{"name":"cm"}}])
        );
        assert_eq!(
            out["status"]["conditions"][0],
            json!({"type":"Ready","status":"True"})
        );
        assert_eq!(out["status"]["conditions"][1]["type"], "Other");
    }

    #[test]
    fn no_panics_on_odd_inputs() {
        let shapes = [
            json!(null),
            json!(1),
            json!("s"),
            json!([]),
            json!({}),
            json!({"containers": 1, "finalizers": {"a": 1}, "ports": [1, {"port": null}]}),
            json!({"containers": [null, 1, {"name": {}}], "env": [{"name": "a"}, {"name": "a"}]}),
            json!({"$patch": 1, "$retainKeys": [1], "$setElementOrder/x": [{}], "$deleteFromPrimitiveList/y": {}}),
            json!({"a": {"$patch": "delete"}, "b": [{"$patch": "replace"}], "finalizers": [[]]}),
        ];
        for o in &shapes {
            for p in &shapes {
                let _ = apply_patch(PatchType::StrategicMerge, o, p.to_string().as_bytes());
                let _ = apply_patch(PatchType::Merge, o, p.to_string().as_bytes());
                let _ = apply_patch(PatchType::Json, o, p.to_string().as_bytes());
                let _ = apply_patch(PatchType::StrategicMerge, o, &[0xff, 0x00]);
            }
        }
    }
}
