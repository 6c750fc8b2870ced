//! Discovery documents: legacy (/api, /apis, /api/v1, /apis/<g>/<v>) and aggregated
//! (apidiscovery.k8s.io/v2 on /api and /apis when the client asks for it).
//!
//! client-go sends `Accept: <v2>,<v2beta1>,application/json` on /api and /apis and picks
//! the decoder from the response Content-Type, so the aggregated answer must carry
//! [`AGGREGATED_CONTENT_TYPE`] or it is parsed as a legacy APIVersions/APIGroupList.

use serde_json::{Value, json};

use crate::apiserver::resources::{RESOURCES, Resource, groups};

/// Response Content-Type for aggregated discovery (client-go matches g, v and as).
pub const AGGREGATED_CONTENT_TYPE: &str =
    "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList";

/// Verbs every top-level resource supports.
pub const VERBS: [&str; 8] = [
    "create",
    "delete",
    "deletecollection",
    "get",
    "list",
    "patch",
    "update",
    "watch",
];

/// A subresource as discovery lists it. `group`/`version` are set only when the
/// subresource speaks another group's kind (Scale, Eviction).
#[derive(Clone, Copy)]
pub struct Subresource {
    pub name: &'static str,
    pub group: Option<&'static str>,
    pub version: Option<&'static str>,
    pub kind: &'static str,
    pub verbs: &'static [&'static str],
}

const STATUS_VERBS: &[&str] = &["get", "patch", "update"];

/// Subresources beyond status/scale (which come from the resource table), as
/// Kubernetes lists them: (group, plural, subresource).
const EXTRA: &[(&str, &str, Subresource)] = &[
    (
        "",
        "pods",
        Subresource {
            name: "attach",
            group: None,
            version: None,
            kind: "PodAttachOptions",
            verbs: &["create", "get"],
        },
    ),
    (
        "",
        "pods",
        Subresource {
            name: "binding",
            group: None,
            version: None,
            kind: "Binding",
            verbs: &["create"],
        },
    ),
    (
        "",
        "pods",
        Subresource {
            name: "eviction",
            group: Some("policy"),
            version: Some("v1"),
            kind: "Eviction",
            verbs: &["create"],
        },
    ),
    (
        "",
        "pods",
        Subresource {
            name: "exec",
            group: None,
            version: None,
            kind: "PodExecOptions",
            verbs: &["create", "get"],
        },
    ),
    (
        "",
        "pods",
        Subresource {
            name: "log",
            group: None,
            version: None,
            kind: "Pod",
            verbs: &["get"],
        },
    ),
    (
        "",
        "pods",
        Subresource {
            name: "portforward",
            group: None,
            version: None,
            kind: "PodPortForwardOptions",
            verbs: &["create", "get"],
        },
    ),
    (
        "",
        "namespaces",
        Subresource {
            name: "finalize",
            group: None,
            version: None,
            kind: "Namespace",
            verbs: &["update"],
        },
    ),
];

/// All subresources of `r`, sorted by name as Kubernetes lists them.
pub fn subresources(r: &Resource) -> Vec<Subresource> {
    let mut out: Vec<Subresource> = EXTRA
        .iter()
        .filter(|(g, p, _)| *g == r.group && *p == r.plural)
        .map(|(_, _, s)| *s)
        .collect();
    if r.has_status {
        out.push(Subresource {
            name: "status",
            group: None,
            version: None,
            kind: r.kind,
            verbs: STATUS_VERBS,
        });
    }
    if r.has_scale {
        out.push(Subresource {
            name: "scale",
            group: Some("autoscaling"),
            version: Some("v1"),
            kind: "Scale",
            verbs: STATUS_VERBS,
        });
    }
    out.sort_by_key(|s| s.name);
    out
}

/// GET /api (legacy): the core versions and where to reach the server.
pub fn api_versions(server_address: &str) -> Value {
    json!({
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": server_address}],
    })
}

fn versions_of(group: &str) -> Vec<&'static str> {
    let mut out: Vec<&'static str> = Vec::new();
    for r in RESOURCES.iter().filter(|r| r.group == group) {
        if !out.contains(&r.version) {
            out.push(r.version);
        }
    }
    out
}

/// GET /apis (legacy): every non-core group. The first version listed is preferred.
pub fn api_group_list() -> Value {
    let groups: Vec<Value> = groups()
        .into_iter()
        .filter(|g| !g.is_empty())
        .map(|g| {
            let versions: Vec<Value> = versions_of(g)
                .into_iter()
                .map(|v| json!({"groupVersion": format!("{g}/{v}"), "version": v}))
                .collect();
            let preferred = versions.first().cloned().unwrap_or(Value::Null);
            json!({"name": g, "versions": versions, "preferredVersion": preferred})
        })
        .collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

/// GET /apis/<group> (legacy): one APIGroup, or None when the group is not served.
pub fn api_group(group: &str) -> Option<Value> {
    let list = api_group_list();
    let g = list["groups"]
        .as_array()?
        .iter()
        .find(|g| g["name"] == group)?
        .clone();
    let mut g = g;
    g["kind"] = json!("APIGroup");
    g["apiVersion"] = json!("v1");
    Some(g)
}

/// GET /api/v1 or /apis/<group>/<version>: APIResourceList, or None when not served.
pub fn api_resource_list(group: &str, version: &str) -> Option<Value> {
    let mut resources = Vec::new();
    for r in RESOURCES
        .iter()
        .filter(|r| r.group == group && r.version == version)
    {
        let mut entry = json!({
            "name": r.plural,
            "singularName": r.singular,
            "namespaced": r.namespaced,
            "kind": r.kind,
            "verbs": VERBS,
        });
        if !r.short_names.is_empty() {
            entry["shortNames"] = json!(r.short_names);
        }
        if !r.categories.is_empty() {
            entry["categories"] = json!(r.categories);
        }
        resources.push(entry);
        for s in subresources(r) {
            let mut sub = json!({
                "name": format!("{}/{}", r.plural, s.name),
                "singularName": "",
                "namespaced": r.namespaced,
                "kind": s.kind,
                "verbs": s.verbs,
            });
            if let (Some(g), Some(v)) = (s.group, s.version) {
                sub["group"] = json!(g);
                sub["version"] = json!(v);
            }
            resources.push(sub);
        }
    }
    if resources.is_empty() {
        return None;
    }
    let group_version = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    Some(json!({
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": group_version,
        "resources": resources,
    }))
}

fn aggregated_resource(r: &Resource) -> Value {
    let subs: Vec<Value> = subresources(r)
        .into_iter()
        .map(|s| {
            json!({
                "subresource": s.name,
                "responseKind": {
                    "group": s.group.unwrap_or(r.group),
                    "version": s.version.unwrap_or(r.version),
                    "kind": s.kind,
                },
                "verbs": s.verbs,
            })
        })
        .collect();
    let mut out = json!({
        "resource": r.plural,
        "responseKind": {"group": r.group, "version": r.version, "kind": r.kind},
        "scope": if r.namespaced { "Namespaced" } else { "Cluster" },
        "singularResource": r.singular,
        "verbs": VERBS,
    });
    if !r.short_names.is_empty() {
        out["shortNames"] = json!(r.short_names);
    }
    if !r.categories.is_empty() {
        out["categories"] = json!(r.categories);
    }
    if !subs.is_empty() {
        out["subresources"] = Value::Array(subs);
    }
    out
}

/// Aggregated discovery (apidiscovery.k8s.io/v2 APIGroupDiscoveryList): the core group
/// for /api (`legacy`), every other group for /apis. Serve with
/// [`AGGREGATED_CONTENT_TYPE`] when [`wants_aggregated`] says so.
pub fn aggregated(legacy: bool) -> Value {
    let items: Vec<Value> = groups()
        .into_iter()
        .filter(|g| g.is_empty() == legacy)
        .map(|g| {
            let versions: Vec<Value> = versions_of(g)
                .into_iter()
                .map(|v| {
                    let resources: Vec<Value> = RESOURCES
                        .iter()
                        .filter(|r| r.group == g && r.version == v)
                        .map(aggregated_resource)
                        .collect();
                    json!({"version": v, "resources": resources, "freshness": "Current"})
                })
                .collect();
            let metadata = if g.is_empty() {
                json!({"creationTimestamp": null})
            } else {
                json!({"name": g, "creationTimestamp": null})
            };
            json!({"metadata": metadata, "versions": versions})
        })
        .collect();
    json!({
        "kind": "APIGroupDiscoveryList",
        "apiVersion": "apidiscovery.k8s.io/v2",
        "metadata": {},
        "items": items,
    })
}

/// True when an Accept header asks for aggregated discovery v2 (any media range that is
/// application/json with g=apidiscovery.k8s.io, v=v2, as=APIGroupDiscoveryList; extra
/// parameters such as profile=nopeer or q are tolerated).
pub fn wants_aggregated(accept: &str) -> bool {
    accept.split(',').any(|range| {
        let mut parts = range.split(';').map(str::trim);
        if !parts
            .next()
            .is_some_and(|b| b.eq_ignore_ascii_case("application/json"))
        {
            return false;
        }
        let (mut g, mut v, mut a, mut q_zero) = (false, false, false, false);
        for p in parts {
            let Some((k, val)) = p.split_once('=') else {
                continue;
            };
            let val = val.trim().trim_matches('"');
            match k.trim() {
                "g" => g = val == "apidiscovery.k8s.io",
                "v" => v = val == "v2",
                "as" => a = val == "APIGroupDiscoveryList",
                "q" => q_zero = val.parse::<f32>().is_ok_and(|q| q <= 0.0),
                _ => {}
            }
        }
        g && v && a && !q_zero
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLIENT_GO_ACCEPT: &str = "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList,application/json;g=apidiscovery.k8s.io;v=v2beta1;as=APIGroupDiscoveryList,application/json";

    #[test]
    fn accept_negotiation() {
        assert!(wants_aggregated(CLIENT_GO_ACCEPT));
        assert!(wants_aggregated(&format!(
            "{AGGREGATED_CONTENT_TYPE};profile=nopeer,{CLIENT_GO_ACCEPT}"
        )));
        assert!(!wants_aggregated("application/json"));
        assert!(!wants_aggregated(
            "application/json;g=apidiscovery.k8s.io;v=v2beta1;as=APIGroupDiscoveryList"
        ));
        assert!(!wants_aggregated(""));
        assert!(!wants_aggregated(&format!("{AGGREGATED_CONTENT_TYPE};q=0")));
    }

    #[test]
    fn legacy_documents() {
        let v = api_versions("10.0.0.1:6443");
        assert_eq!(
            v["serverAddressByClientCIDRs"][0]["serverAddress"],
            "10.0.0.1:6443"
        );
        let groups = api_group_list();
        let names: Vec<&str> = groups["groups"]
            .as_array()
            .unwrap()
            .iter()
            .map(|g| g["name"].as_str().unwrap())
            .collect();
        assert_eq!(names[0], "apps");
        assert!(!names.contains(&""));
        assert_eq!(
            groups["groups"][0]["preferredVersion"]["groupVersion"],
            "apps/v1"
        );
        assert_eq!(api_group("apps").unwrap()["kind"], "APIGroup");
        assert!(api_group("nope").is_none());

        let core = api_resource_list("", "v1").unwrap();
        assert_eq!(core["groupVersion"], "v1");
        let res = core["resources"].as_array().unwrap();
        let find = |n: &str| res.iter().find(|r| r["name"] == n).unwrap();
        assert_eq!(find("pods")["shortNames"], json!(["po"]));
        assert_eq!(find("pods")["verbs"], json!(VERBS));
        assert_eq!(find("pods/eviction")["group"], "policy");
        assert_eq!(find("pods/binding")["kind"], "Binding");
        assert_eq!(
            find("pods/status")["verbs"],
            json!(["get", "patch", "update"])
        );
        find("pods/log");
        find("pods/exec");
        let apps = api_resource_list("apps", "v1").unwrap();
        let scale = apps["resources"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == "deployments/scale")
            .unwrap();
        assert_eq!(scale["kind"], "Scale");
        assert_eq!(scale["group"], "autoscaling");
        assert!(api_resource_list("apps", "v2").is_none());
    }

    #[test]
    fn aggregated_documents() {
        let core = aggregated(true);
        assert_eq!(core["items"].as_array().unwrap().len(), 1);
        let pods = &core["items"][0]["versions"][0]["resources"][0];
        assert_eq!(pods["resource"], "pods");
        assert_eq!(pods["scope"], "Namespaced");
        assert_eq!(pods["responseKind"]["kind"], "Pod");
        let apis = aggregated(false);
        let items = apis["items"].as_array().unwrap();
        assert!(items.iter().all(|i| i["metadata"]["name"] != ""));
        let total: usize = [&core, &apis]
            .iter()
            .flat_map(|d| d["items"].as_array().unwrap())
            .flat_map(|i| i["versions"].as_array().unwrap())
            .map(|v| v["resources"].as_array().unwrap().len())
            .sum();
        assert_eq!(total, RESOURCES.len());
        let nodes = core["items"][0]["versions"][0]["resources"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["resource"] == "nodes")
            .unwrap()
            .clone();
        assert_eq!(nodes["scope"], "Cluster");
    }
}
