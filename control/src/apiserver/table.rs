//! meta.k8s.io/v1 Table output (`Accept: application/json;as=Table;g=meta.k8s.io;v=v1`),
//! which is what `kubectl get` renders. Columns and cell text follow Kubernetes'
//! pkg/printers/internalversion/printers.go. The server always emits the wide
//! (priority 1) columns; kubectl hides them unless `-o wide`.

use chrono::{DateTime, Utc};
use serde_json::{Map, Value, json};

use crate::apiserver::resources::Resource;

/// The `includeObject` query parameter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum IncludeObject {
    None,
    #[default]
    Metadata,
    Object,
}

impl IncludeObject {
    /// Parses the query value; absent or unknown means the default (Metadata).
    pub fn parse(v: Option<&str>) -> IncludeObject {
        match v {
            Some("None") => IncludeObject::None,
            Some("Object") => IncludeObject::Object,
            _ => IncludeObject::Metadata,
        }
    }
}

const NAME_DOC: &str = "Name must be unique within a namespace. Is required when creating resources, although some resources may allow a client to request the generation of an appropriate name automatically. Name is primarily intended for creation idempotence and configuration definition. Cannot be updated. More info: https://kubernetes.io/docs/concepts/overview/working-with-objects/names#names";
const AGE_DOC: &str = "CreationTimestamp is a timestamp representing the server time when this object was created. It is not guaranteed to be set in happens-before order across separate operations. Clients may not set this value. It is represented in RFC3339 form and is in UTC.\n\nPopulated by the system. Read-only. Null for lists. More info: https://git.k8s.io/community/contributors/devel/sig-architecture/api-conventions.md#metadata";
const CONTAINERS_DOC: &str = "Names of each container in the template.";
const IMAGES_DOC: &str = "Images referenced by each container in the template.";
const SELECTOR_DOC: &str = "Label selector for pods. Existing ReplicaSets whose pods are selected by this will be the ones affected by this deployment.";

/// (name, type, format, priority, description)
type Col = (&'static str, &'static str, &'static str, u8, &'static str);

const fn c(name: &'static str, ty: &'static str, desc: &'static str) -> Col {
    (name, ty, "", 0, desc)
}
const fn w(name: &'static str, ty: &'static str, desc: &'static str) -> Col {
    (name, ty, "", 1, desc)
}
const NAME: Col = ("Name", "string", "name", 0, NAME_DOC);
const AGE: Col = ("Age", "string", "", 0, AGE_DOC);

fn columns(kind: &str) -> Vec<Col> {
    match kind {
        "Pod" => vec![
            NAME,
            c(
                "Ready",
                "string",
                "The aggregate readiness state of this pod for accepting traffic.",
            ),
            c(
                "Status",
                "string",
                "The aggregate status of the containers in this pod.",
            ),
            c(
                "Restarts",
                "string",
                "The number of times the containers in this pod have been restarted and when the last container in this pod has restarted.",
            ),
            AGE,
            w(
                "IP",
                "string",
                "podIP address allocated to the pod. Routable at least within the cluster. Empty if not yet allocated.",
            ),
            w(
                "Node",
                "string",
                "NodeName indicates in which node this pod is scheduled.",
            ),
            w(
                "Nominated Node",
                "string",
                "nominatedNodeName is set when this pod preempts other pods on the node, but it cannot be scheduled right away as preemption victims receive their graceful termination periods.",
            ),
            w(
                "Readiness Gates",
                "string",
                "If specified, all readiness gates will be evaluated for pod readiness.",
            ),
        ],
        "Deployment" => vec![
            NAME,
            c("Ready", "string", "Number of the pod with ready state"),
            c(
                "Up-to-date",
                "string",
                "Total number of non-terminated pods targeted by this deployment that have the desired template spec.",
            ),
            c(
                "Available",
                "string",
                "Total number of available pods (ready for at least minReadySeconds) targeted by this deployment.",
            ),
            AGE,
            w("Containers", "string", CONTAINERS_DOC),
            w("Images", "string", IMAGES_DOC),
            w("Selector", "string", SELECTOR_DOC),
        ],
        "ReplicaSet" => vec![
            NAME,
            c(
                "Desired",
                "integer",
                "Replicas is the number of desired pods.",
            ),
            c(
                "Current",
                "integer",
                "Replicas is the most recently observed number of non-terminating pods.",
            ),
            c(
                "Ready",
                "integer",
                "The number of non-terminating pods targeted by this ReplicaSet with a Ready Condition.",
            ),
            AGE,
            w("Containers", "string", CONTAINERS_DOC),
            w("Images", "string", IMAGES_DOC),
            w("Selector", "string", SELECTOR_DOC),
        ],
        "DaemonSet" => vec![
            NAME,
            c(
                "Desired",
                "integer",
                "The total number of nodes that should be running the daemon pod.",
            ),
            c(
                "Current",
                "integer",
                "The number of nodes that are running at least 1 daemon pod and are supposed to run the daemon pod.",
            ),
            c(
                "Ready",
                "integer",
                "The number of nodes that should be running the daemon pod and have one or more of the daemon pod running with a Ready Condition.",
            ),
            c(
                "Up-to-date",
                "integer",
                "The total number of nodes that are running updated daemon pod",
            ),
            c(
                "Available",
                "integer",
                "The number of nodes that should be running the daemon pod and have one or more of the daemon pod running and available.",
            ),
            c(
                "Node Selector",
                "string",
                "NodeSelector is a selector which must be true for the pod to fit on a node.",
            ),
            AGE,
            w("Containers", "string", CONTAINERS_DOC),
            w("Images", "string", IMAGES_DOC),
            w("Selector", "string", SELECTOR_DOC),
        ],
        "Service" => vec![
            NAME,
            c(
                "Type",
                "string",
                "type determines how the Service is exposed.",
            ),
            c(
                "Cluster-IP",
                "string",
                "clusterIP is the IP address of the service and is usually assigned randomly.",
            ),
            c(
                "External-IP",
                "string",
                "externalIPs is a list of IP addresses for which nodes in the cluster will also accept traffic for this service.",
            ),
            c(
                "Port(s)",
                "string",
                "The list of ports that are exposed by this service.",
            ),
            AGE,
            w(
                "Selector",
                "string",
                "Route service traffic to pods with label keys and values matching this selector.",
            ),
        ],
        "Node" => vec![
            NAME,
            c("Status", "string", "The status of the node"),
            c("Roles", "string", "The roles of the node"),
            AGE,
            c("Version", "string", "Kubelet Version reported by the node."),
            w(
                "Internal-IP",
                "string",
                "List of addresses reachable to the node.",
            ),
            w(
                "External-IP",
                "string",
                "List of addresses reachable to the node.",
            ),
            w(
                "OS-Image",
                "string",
                "OS Image reported by the node from /etc/os-release (e.g. Debian GNU/Linux 7 (wheezy)).",
            ),
            w(
                "Kernel-Version",
                "string",
                "Kernel Version reported by the node from 'uname -r' (e.g. 3.16.0-0.bpo.4-amd64).",
            ),
            w(
                "Container-Runtime",
                "string",
                "ContainerRuntime Version reported by the node through runtime remote API (e.g. containerd://1.4.2).",
            ),
        ],
        "Namespace" => vec![
            NAME,
            c("Status", "string", "The status of the namespace"),
            AGE,
        ],
        "Endpoints" => vec![
            NAME,
            c(
                "Endpoints",
                "string",
                "The set of all endpoints is the union of all subsets.",
            ),
            AGE,
        ],
        "ConfigMap" => vec![
            NAME,
            c("Data", "string", "Data contains the configuration data."),
            AGE,
        ],
        "Secret" => vec![
            NAME,
            c(
                "Type",
                "string",
                "Used to facilitate programmatic handling of secret data.",
            ),
            c("Data", "string", "Data contains the secret data."),
            AGE,
        ],
        "ServiceAccount" => vec![
            NAME,
            c(
                "Secrets",
                "string",
                "Secrets is a list of the secrets in the same namespace that pods running using this ServiceAccount are allowed to use.",
            ),
            AGE,
        ],
        "Event" => vec![
            c(
                "Last Seen",
                "string",
                "The time at which the most recent occurrence of this event was recorded.",
            ),
            c(
                "Type",
                "string",
                "Type of this event (Normal, Warning), new types could be added in the future",
            ),
            c(
                "Reason",
                "string",
                "This should be a short, machine understandable string that gives the reason for the transition into the object's current status.",
            ),
            c("Object", "string", "The object that this event is about."),
            w(
                "Subobject",
                "string",
                "If referring to a piece of an object instead of an entire object, this string should contain a valid JSON/Go field access statement.",
            ),
            w(
                "Source",
                "string",
                "The component reporting this event. Should be a short machine understandable string.",
            ),
            c(
                "Message",
                "string",
                "A human-readable description of the status of this operation.",
            ),
            w(
                "First Seen",
                "string",
                "The time at which the event was first recorded. (Time of server receipt is in TypeMeta.)",
            ),
            w(
                "Count",
                "string",
                "The number of times this event has occurred.",
            ),
            ("Name", "string", "name", 1, NAME_DOC),
        ],
        "EndpointSlice" => vec![
            NAME,
            c(
                "AddressType",
                "string",
                "addressType specifies the type of address carried by this EndpointSlice.",
            ),
            c(
                "Ports",
                "string",
                "ports specifies the list of network ports exposed by each endpoint in this slice.",
            ),
            c(
                "Endpoints",
                "string",
                "endpoints is a list of unique endpoints in this slice.",
            ),
            AGE,
        ],
        "Lease" => vec![
            NAME,
            c(
                "Holder",
                "string",
                "holderIdentity contains the identity of the holder of a current lease.",
            ),
            AGE,
        ],
        "Ingress" => vec![
            NAME,
            c(
                "Class",
                "string",
                "The name of the IngressClass resource that should be used for the Ingress",
            ),
            c(
                "Hosts",
                "string",
                "Hosts that incoming requests are matched against before the ingress rule",
            ),
            c(
                "Address",
                "string",
                "Address is a list containing ingress points for the load-balancer",
            ),
            c("Ports", "string", "Ports of TLS configurations that open"),
            AGE,
        ],
        "IngressClass" => vec![
            NAME,
            c(
                "Controller",
                "string",
                "Controller that is responsible for handling this class",
            ),
            c(
                "Parameters",
                "string",
                "A reference to a resource with additional parameters",
            ),
            AGE,
        ],
        "NetworkPolicy" => vec![
            NAME,
            c(
                "Pod-Selector",
                "string",
                "Selects the pods to which this NetworkPolicy object applies.",
            ),
            AGE,
        ],
        "ControllerRevision" => vec![
            NAME,
            c("Controller", "string", "Controller of the object"),
            c(
                "Revision",
                "string",
                "Revision indicates the revision of the state represented by Data.",
            ),
            AGE,
        ],
        "Role" | "ClusterRole" => vec![NAME, c("Created At", "date", AGE_DOC)],
        "RoleBinding" | "ClusterRoleBinding" => vec![
            NAME,
            c(
                "Role",
                "string",
                "RoleRef can reference a Role in the current namespace or a ClusterRole in the global namespace.",
            ),
            AGE,
            w("Users", "string", "Users in the roleBinding"),
            w("Groups", "string", "Groups in the roleBinding"),
            w(
                "ServiceAccounts",
                "string",
                "ServiceAccounts in the roleBinding",
            ),
        ],
        _ => vec![NAME, AGE],
    }
}

/// Builds the Table for `objects` of `resource`. metadata is left empty for the
/// caller to fill (resourceVersion, continue).
pub fn table(
    resource: &Resource,
    objects: &[Value],
    include_object: IncludeObject,
    now: DateTime<Utc>,
) -> Value {
    let cols: Vec<Value> = columns(resource.kind)
        .into_iter()
        .map(|(name, ty, format, priority, description)| {
            json!({"name": name, "type": ty, "format": format, "description": description, "priority": priority})
        })
        .collect();
    let rows: Vec<Value> = objects
        .iter()
        .map(|o| {
            let (cells, conditions) = cells(resource, o, now);
            let mut row = Map::new();
            row.insert("cells".into(), Value::Array(cells));
            if let Some(c) = conditions {
                row.insert("conditions".into(), c);
            }
            match include_object {
                IncludeObject::None => {}
                IncludeObject::Metadata => {
                    row.insert(
                        "object".into(),
                        json!({
                            "kind": "PartialObjectMetadata",
                            "apiVersion": "meta.k8s.io/v1",
                            "metadata": o.get("metadata").cloned().unwrap_or_else(|| json!({})),
                        }),
                    );
                }
                IncludeObject::Object => {
                    row.insert("object".into(), o.clone());
                }
            }
            Value::Object(row)
        })
        .collect();
    json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": {},
        "columnDefinitions": cols,
        "rows": rows,
    })
}

// ---- small accessors over serde_json::Value ----

fn s<'a>(v: &'a Value, path: &[&str]) -> &'a str {
    get(v, path).and_then(Value::as_str).unwrap_or("")
}
fn get<'a>(v: &'a Value, path: &[&str]) -> Option<&'a Value> {
    path.iter().try_fold(v, |v, k| v.get(*k))
}
fn i(v: &Value, path: &[&str]) -> i64 {
    get(v, path).and_then(Value::as_i64).unwrap_or(0)
}
fn arr<'a>(v: &'a Value, path: &[&str]) -> &'a [Value] {
    get(v, path)
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or(&[])
}
fn or_none(x: &str) -> String {
    if x.is_empty() {
        "<none>".into()
    } else {
        x.into()
    }
}
fn parse_time(x: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(x)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

/// translateTimestampSince: "<unknown>" for a missing timestamp, else HumanDuration.
fn since(ts: Option<&Value>, now: DateTime<Utc>) -> String {
    match ts.and_then(Value::as_str).and_then(parse_time) {
        Some(t) => human_duration(now.signed_duration_since(t)),
        None => "<unknown>".into(),
    }
}

/// Port of k8s.io/apimachinery/pkg/util/duration.HumanDuration.
pub fn human_duration(d: chrono::TimeDelta) -> String {
    // Go truncates toward zero; up to 2s in the future is tolerated as clock skew.
    let seconds = d.num_seconds();
    if seconds < -1 {
        return "<invalid>".into();
    } else if seconds < 0 {
        return "0s".into();
    } else if seconds < 60 * 2 {
        return format!("{seconds}s");
    }
    let minutes = d.num_minutes();
    if minutes < 10 {
        let sec = seconds % 60;
        return if sec == 0 {
            format!("{minutes}m")
        } else {
            format!("{minutes}m{sec}s")
        };
    } else if minutes < 60 * 3 {
        return format!("{minutes}m");
    }
    let hours = d.num_hours();
    if hours < 8 {
        let m = minutes % 60;
        return if m == 0 {
            format!("{hours}h")
        } else {
            format!("{hours}h{m}m")
        };
    } else if hours < 48 {
        return format!("{hours}h");
    } else if hours < 24 * 8 {
        let h = hours % 24;
        return if h == 0 {
            format!("{}d", hours / 24)
        } else {
            format!("{}d{h}h", hours / 24)
        };
    } else if hours < 24 * 365 * 2 {
        return format!("{}d", hours / 24);
    } else if hours < 24 * 365 * 8 {
        let dy = (hours / 24) % 365;
        return if dy == 0 {
            format!("{}y", hours / 24 / 365)
        } else {
            format!("{}y{dy}d", hours / 24 / 365)
        };
    }
    format!("{}y", hours / 24 / 365)
}

/// labels.FormatLabels: "k=v,..." sorted by key, "<none>" when empty.
fn format_labels(m: Option<&Value>) -> String {
    let Some(Value::Object(m)) = m else {
        return "<none>".into();
    };
    let mut kv: Vec<String> = m
        .iter()
        .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
        .collect();
    kv.sort();
    if kv.is_empty() {
        "<none>".into()
    } else {
        kv.join(",")
    }
}

/// metav1.LabelSelectorAsSelector(..).String(): requirements sorted by key.
fn selector_string(sel: Option<&Value>) -> String {
    let Some(sel) = sel else { return String::new() };
    let mut reqs: Vec<(String, String)> = Vec::new();
    if let Some(Value::Object(m)) = sel.get("matchLabels") {
        for (k, v) in m {
            reqs.push((k.clone(), format!("{k}={}", v.as_str().unwrap_or(""))));
        }
    }
    for e in arr(sel, &["matchExpressions"]) {
        let key = s(e, &["key"]).to_string();
        let mut vals: Vec<&str> = arr(e, &["values"])
            .iter()
            .filter_map(Value::as_str)
            .collect();
        vals.sort_unstable();
        let text = match s(e, &["operator"]) {
            "In" => format!("{key} in ({})", vals.join(",")),
            "NotIn" => format!("{key} notin ({})", vals.join(",")),
            "Exists" => key.clone(),
            "DoesNotExist" => format!("!{key}"),
            _ => continue,
        };
        reqs.push((key, text));
    }
    reqs.sort_by(|a, b| a.0.cmp(&b.0));
    reqs.into_iter().map(|r| r.1).collect::<Vec<_>>().join(",")
}

/// metav1.FormatLabelSelector: "<none>" for an empty selector.
fn format_label_selector(sel: Option<&Value>) -> String {
    let out = selector_string(sel);
    if out.is_empty() { "<none>".into() } else { out }
}

fn containers_and_images(containers: &[Value]) -> (String, String) {
    let names: Vec<&str> = containers.iter().map(|c| s(c, &["name"])).collect();
    let images: Vec<&str> = containers.iter().map(|c| s(c, &["image"])).collect();
    (names.join(","), images.join(","))
}

fn cells(r: &Resource, o: &Value, now: DateTime<Utc>) -> (Vec<Value>, Option<Value>) {
    let name = json!(s(o, &["metadata", "name"]));
    let age = json!(since(get(o, &["metadata", "creationTimestamp"]), now));
    let out = match r.kind {
        "Pod" => return pod_cells(o, name, age, now),
        "Deployment" => {
            let desired = get(o, &["spec", "replicas"])
                .and_then(Value::as_i64)
                .unwrap_or(1);
            let (cs, is) =
                containers_and_images(arr(o, &["spec", "template", "spec", "containers"]));
            vec![
                name,
                json!(format!(
                    "{}/{}",
                    i(o, &["status", "readyReplicas"]),
                    desired
                )),
                json!(i(o, &["status", "updatedReplicas"])),
                json!(i(o, &["status", "availableReplicas"])),
                age,
                json!(cs),
                json!(is),
                json!(selector_string(get(o, &["spec", "selector"]))),
            ]
        }
        "ReplicaSet" => {
            let desired = get(o, &["spec", "replicas"])
                .and_then(Value::as_i64)
                .unwrap_or(1);
            let (cs, is) =
                containers_and_images(arr(o, &["spec", "template", "spec", "containers"]));
            vec![
                name,
                json!(desired),
                json!(i(o, &["status", "replicas"])),
                json!(i(o, &["status", "readyReplicas"])),
                age,
                json!(cs),
                json!(is),
                json!(selector_string(get(o, &["spec", "selector"]))),
            ]
        }
        "DaemonSet" => {
            let (cs, is) =
                containers_and_images(arr(o, &["spec", "template", "spec", "containers"]));
            vec![
                name,
                json!(i(o, &["status", "desiredNumberScheduled"])),
                json!(i(o, &["status", "currentNumberScheduled"])),
                json!(i(o, &["status", "numberReady"])),
                json!(i(o, &["status", "updatedNumberScheduled"])),
                json!(i(o, &["status", "numberAvailable"])),
                json!(format_labels(get(
                    o,
                    &["spec", "template", "spec", "nodeSelector"]
                ))),
                age,
                json!(cs),
                json!(is),
                json!(selector_string(get(o, &["spec", "selector"]))),
            ]
        }
        "Service" => service_cells(o, name, age),
        "Node" => node_cells(o, name, age),
        "Namespace" => vec![name, json!(s(o, &["status", "phase"])), age],
        "Endpoints" => vec![name, json!(format_endpoints(o)), age],
        "ConfigMap" => {
            let n = obj_len(o, "data") + obj_len(o, "binaryData");
            vec![name, json!(n), age]
        }
        "Secret" => {
            let ty = match s(o, &["type"]) {
                "" => "Opaque",
                t => t,
            };
            vec![name, json!(ty), json!(obj_len(o, "data")), age]
        }
        "ServiceAccount" => vec![name, json!(arr(o, &["secrets"]).len()), age],
        "Event" => event_cells(o, name, now),
        "EndpointSlice" => {
            let ports: Vec<String> = arr(o, &["ports"])
                .iter()
                .map(|p| {
                    match (
                        p.get("port").and_then(Value::as_i64),
                        p.get("name").and_then(Value::as_str),
                    ) {
                        (Some(n), _) => n.to_string(),
                        (None, Some(n)) => n.to_string(),
                        _ => "*".into(),
                    }
                })
                .collect();
            let addrs: Vec<String> = arr(o, &["endpoints"])
                .iter()
                .flat_map(|e| arr(e, &["addresses"]).iter().filter_map(Value::as_str))
                .map(str::to_string)
                .collect();
            vec![
                name,
                json!(s(o, &["addressType"])),
                json!(list_with_more(&ports)),
                json!(list_with_more(&addrs)),
                age,
            ]
        }
        "Lease" => vec![name, json!(s(o, &["spec", "holderIdentity"])), age],
        "Ingress" => ingress_cells(o, name, age),
        "IngressClass" => {
            let params = match get(o, &["spec", "parameters"]) {
                Some(p) => {
                    let mut kind = s(p, &["kind"]).to_string();
                    if let Some(g) = p.get("apiGroup").and_then(Value::as_str) {
                        kind = format!("{kind}.{g}");
                    }
                    format!("{kind}/{}", s(p, &["name"]))
                }
                None => "<none>".into(),
            };
            vec![
                name,
                json!(s(o, &["spec", "controller"])),
                json!(params),
                age,
            ]
        }
        "NetworkPolicy" => vec![
            name,
            json!(format_label_selector(get(o, &["spec", "podSelector"]))),
            age,
        ],
        "ControllerRevision" => {
            let controller = arr(o, &["metadata", "ownerReferences"])
                .iter()
                .find(|r| r.get("controller").and_then(Value::as_bool) == Some(true))
                .map(|r| {
                    let api_version = s(r, &["apiVersion"]);
                    let group = api_version.rsplit_once('/').map(|(g, _)| g).unwrap_or("");
                    let kind = s(r, &["kind"]).to_lowercase();
                    let kind = if group.is_empty() {
                        kind
                    } else {
                        format!("{kind}.{group}")
                    };
                    format!("{kind}/{}", s(r, &["name"]))
                })
                .unwrap_or_else(|| "<none>".into());
            vec![name, json!(controller), json!(i(o, &["revision"])), age]
        }
        "Role" | "ClusterRole" => {
            let created = get(o, &["metadata", "creationTimestamp"])
                .and_then(Value::as_str)
                .and_then(parse_time)
                .map(|t| t.format("%Y-%m-%dT%H:%M:%SZ").to_string())
                .unwrap_or_default();
            vec![name, json!(created)]
        }
        "RoleBinding" | "ClusterRoleBinding" => {
            let role = format!(
                "{}/{}",
                s(o, &["roleRef", "kind"]),
                s(o, &["roleRef", "name"])
            );
            let (mut users, mut groups, mut sas) = (vec![], vec![], vec![]);
            for sub in arr(o, &["subjects"]) {
                match s(sub, &["kind"]) {
                    "User" => users.push(s(sub, &["name"]).to_string()),
                    "Group" => groups.push(s(sub, &["name"]).to_string()),
                    "ServiceAccount" => {
                        sas.push(format!("{}/{}", s(sub, &["namespace"]), s(sub, &["name"])))
                    }
                    _ => {}
                }
            }
            vec![
                name,
                json!(role),
                age,
                json!(users.join(", ")),
                json!(groups.join(", ")),
                json!(sas.join(", ")),
            ]
        }
        _ => vec![name, age],
    };
    (out, None)
}

fn obj_len(o: &Value, key: &str) -> usize {
    o.get(key).and_then(Value::as_object).map_or(0, Map::len)
}

/// listWithMoreString for EndpointSlice ports/endpoints: three shown, then "+ N more...".
fn list_with_more(items: &[String]) -> String {
    const MAX: usize = 3;
    let shown = items
        .iter()
        .take(MAX)
        .cloned()
        .collect::<Vec<_>>()
        .join(",");
    if items.len() > MAX {
        format!("{shown} + {} more...", items.len() - MAX)
    } else if shown.is_empty() {
        "<unset>".into()
    } else {
        shown
    }
}

fn join_host_port(ip: &str, port: i64) -> String {
    if ip.contains(':') {
        format!("[{ip}]:{port}")
    } else {
        format!("{ip}:{port}")
    }
}

/// formatEndpoints: up to three ip:port, then "+ N more...".
fn format_endpoints(o: &Value) -> String {
    const MAX: usize = 3;
    let subsets = arr(o, &["subsets"]);
    if subsets.is_empty() {
        return "<none>".into();
    }
    let (mut list, mut more, mut count) = (Vec::new(), false, 0usize);
    for ss in subsets {
        let addrs = arr(ss, &["addresses"]);
        let ports = arr(ss, &["ports"]);
        if ports.is_empty() {
            count += addrs.len();
            for a in addrs {
                if list.len() == MAX {
                    more = true;
                    break;
                }
                list.push(s(a, &["ip"]).to_string());
            }
            continue;
        }
        for p in ports {
            count += addrs.len();
            for a in addrs {
                if list.len() == MAX {
                    more = true;
                    break;
                }
                list.push(join_host_port(s(a, &["ip"]), i(p, &["port"])));
            }
        }
    }
    let ret = list.join(",");
    if more {
        format!("{ret} + {} more...", count - MAX)
    } else {
        ret
    }
}

fn service_cells(o: &Value, name: Value, age: Value) -> Vec<Value> {
    let ty = match s(o, &["spec", "type"]) {
        "" => "ClusterIP",
        t => t,
    };
    let cluster_ip = arr(o, &["spec", "clusterIPs"])
        .first()
        .and_then(Value::as_str)
        .unwrap_or_else(|| s(o, &["spec", "clusterIP"]));
    let external_ips: Vec<&str> = arr(o, &["spec", "externalIPs"])
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let external = match ty {
        "ClusterIP" | "NodePort" => or_none(&external_ips.join(",")),
        "LoadBalancer" => {
            let mut all: Vec<String> = arr(o, &["status", "loadBalancer", "ingress"])
                .iter()
                .filter_map(|i| {
                    let ip = s(i, &["ip"]);
                    let host = s(i, &["hostname"]);
                    if !ip.is_empty() {
                        Some(ip.to_string())
                    } else if !host.is_empty() {
                        Some(host.to_string())
                    } else {
                        None
                    }
                })
                .collect();
            all.extend(external_ips.iter().map(|x| x.to_string()));
            if all.is_empty() {
                "<pending>".into()
            } else {
                all.join(",")
            }
        }
        "ExternalName" => s(o, &["spec", "externalName"]).to_string(),
        _ => "<unknown>".into(),
    };
    let ports: Vec<String> = arr(o, &["spec", "ports"])
        .iter()
        .map(|p| {
            let proto = match s(p, &["protocol"]) {
                "" => "TCP",
                x => x,
            };
            let node_port = i(p, &["nodePort"]);
            if node_port > 0 {
                format!("{}:{node_port}/{proto}", i(p, &["port"]))
            } else {
                format!("{}/{proto}", i(p, &["port"]))
            }
        })
        .collect();
    vec![
        name,
        json!(ty),
        json!(or_none(cluster_ip)),
        json!(external),
        json!(or_none(&ports.join(","))),
        age,
        json!(format_labels(get(o, &["spec", "selector"]))),
    ]
}

fn node_cells(o: &Value, name: Value, age: Value) -> Vec<Value> {
    let mut status: Vec<String> = Vec::new();
    if let Some(c) = arr(o, &["status", "conditions"])
        .iter()
        .find(|c| s(c, &["type"]) == "Ready")
    {
        status.push(if s(c, &["status"]) == "True" {
            "Ready".into()
        } else {
            "NotReady".into()
        });
    }
    if status.is_empty() {
        status.push("Unknown".into());
    }
    if get(o, &["spec", "unschedulable"]).and_then(Value::as_bool) == Some(true) {
        status.push("SchedulingDisabled".into());
    }
    let mut roles: Vec<String> = Vec::new();
    if let Some(Value::Object(labels)) = get(o, &["metadata", "labels"]) {
        for (k, v) in labels {
            if let Some(role) = k.strip_prefix("node-role.kubernetes.io/") {
                if !role.is_empty() {
                    roles.push(role.to_string());
                }
            } else if k == "kubernetes.io/role"
                && let Some(v) = v.as_str().filter(|v| !v.is_empty())
            {
                roles.push(v.to_string());
            }
        }
    }
    roles.sort();
    roles.dedup();
    let address = |ty: &str| {
        arr(o, &["status", "addresses"])
            .iter()
            .find(|a| s(a, &["type"]) == ty)
            .map(|a| s(a, &["address"]).to_string())
            .unwrap_or_else(|| "<none>".into())
    };
    let info = |k: &str| match s(o, &["status", "nodeInfo", k]) {
        "" => "<unknown>".to_string(),
        x => x.to_string(),
    };
    vec![
        name,
        json!(status.join(",")),
        json!(or_none(&roles.join(","))),
        age,
        json!(s(o, &["status", "nodeInfo", "kubeletVersion"])),
        json!(address("InternalIP")),
        json!(address("ExternalIP")),
        json!(info("osImage")),
        json!(info("kernelVersion")),
        json!(info("containerRuntimeVersion")),
    ]
}

fn event_cells(o: &Value, name: Value, now: DateTime<Utc>) -> Vec<Value> {
    let present = |p: &[&str]| get(o, p).is_some_and(|v| v.as_str().is_some_and(|x| !x.is_empty()));
    let first = if present(&["firstTimestamp"]) {
        since(get(o, &["firstTimestamp"]), now)
    } else {
        since(get(o, &["eventTime"]), now)
    };
    let mut last = if present(&["lastTimestamp"]) {
        since(get(o, &["lastTimestamp"]), now)
    } else {
        first.clone()
    };
    let mut count = i(o, &["count"]);
    if let Some(series) = o.get("series").filter(|v| v.is_object()) {
        last = since(series.get("lastObservedTime"), now);
        count = i(series, &["count"]);
    } else if count == 0 {
        // Singleton events from events.k8s.io carry no count.
        count = 1;
    }
    let kind = s(o, &["involvedObject", "kind"]).to_lowercase();
    let target_name = s(o, &["involvedObject", "name"]);
    let target = if target_name.is_empty() {
        kind
    } else {
        format!("{kind}/{target_name}")
    };
    let component = [
        s(o, &["source", "component"]),
        s(o, &["reportingComponent"]),
    ]
    .into_iter()
    .find(|x| !x.is_empty())
    .unwrap_or("");
    let host = [s(o, &["source", "host"]), s(o, &["reportingInstance"])]
        .into_iter()
        .find(|x| !x.is_empty())
        .unwrap_or("");
    let source = if host.is_empty() {
        component.to_string()
    } else {
        format!("{component}, {host}")
    };
    vec![
        json!(last),
        json!(s(o, &["type"])),
        json!(s(o, &["reason"])),
        json!(target),
        json!(s(o, &["involvedObject", "fieldPath"])),
        json!(source),
        json!(s(o, &["message"]).trim()),
        json!(first),
        json!(count),
        name,
    ]
}

fn ingress_cells(o: &Value, name: Value, age: Value) -> Vec<Value> {
    let class = get(o, &["spec", "ingressClassName"])
        .and_then(Value::as_str)
        .unwrap_or("<none>");
    let rules = arr(o, &["spec", "rules"]);
    let hosts: Vec<&str> = rules
        .iter()
        .map(|r| s(r, &["host"]))
        .filter(|h| !h.is_empty())
        .take(3)
        .collect();
    let hosts = if hosts.is_empty() {
        "*".to_string()
    } else if rules.len() > 3 {
        format!("{} + {} more...", hosts.join(","), rules.len() - 3)
    } else {
        hosts.join(",")
    };
    let address: Vec<&str> = arr(o, &["status", "loadBalancer", "ingress"])
        .iter()
        .map(|i| match s(i, &["ip"]) {
            "" => s(i, &["hostname"]),
            ip => ip,
        })
        .filter(|x| !x.is_empty())
        .collect();
    let ports = if arr(o, &["spec", "tls"]).is_empty() {
        "80"
    } else {
        "80, 443"
    };
    vec![
        name,
        json!(class),
        json!(hosts),
        json!(address.join(",")),
        json!(ports),
        age,
    ]
}

fn pod_cells(
    o: &Value,
    name: Value,
    age: Value,
    now: DateTime<Utc>,
) -> (Vec<Value>, Option<Value>) {
    let containers = arr(o, &["spec", "containers"]);
    let init_specs = arr(o, &["spec", "initContainers"]);
    // Sidecars (restartPolicy Always init containers) count as regular containers.
    let is_sidecar = |n: &str| {
        init_specs
            .iter()
            .any(|c| s(c, &["name"]) == n && s(c, &["restartPolicy"]) == "Always")
    };
    let mut total = containers.len()
        + init_specs
            .iter()
            .filter(|c| s(c, &["restartPolicy"]) == "Always")
            .count();
    let phase = s(o, &["status", "phase"]);
    let mut reason = match s(o, &["status", "reason"]) {
        "" => phase.to_string(),
        r => r.to_string(),
    };
    let conditions = arr(o, &["status", "conditions"]);
    if conditions
        .iter()
        .any(|c| s(c, &["type"]) == "PodScheduled" && s(c, &["reason"]) == "SchedulingGated")
    {
        reason = "SchedulingGated".into();
    }
    let row_conditions = match phase {
        "Succeeded" => Some(
            json!([{"type": "Completed", "status": "True", "message": "The pod has completed successfully."}]),
        ),
        "Failed" => {
            Some(json!([{"type": "Completed", "status": "True", "message": "The pod failed."}]))
        }
        _ => None,
    };

    let mut restarts = 0i64;
    let mut sidecar_restarts = 0i64;
    let mut ready = 0usize;
    let mut last_restart: Option<DateTime<Utc>> = None;
    let mut last_sidecar_restart: Option<DateTime<Utc>> = None;
    let finished = |c: &Value| {
        get(c, &["lastState", "terminated", "finishedAt"])
            .and_then(Value::as_str)
            .and_then(parse_time)
    };

    let init_statuses = arr(o, &["status", "initContainerStatuses"]);
    let mut initializing = false;
    for (idx, c) in init_statuses.iter().enumerate() {
        let cname = s(c, &["name"]);
        restarts += i(c, &["restartCount"]);
        if let Some(t) = finished(c) {
            last_restart = last_restart.max(Some(t));
        }
        let sidecar = is_sidecar(cname);
        if sidecar {
            sidecar_restarts += i(c, &["restartCount"]);
            if let Some(t) = finished(c) {
                last_sidecar_restart = last_sidecar_restart.max(Some(t));
            }
        }
        let terminated = get(c, &["state", "terminated"]);
        let waiting_reason = s(c, &["state", "waiting", "reason"]);
        if terminated.is_some_and(|t| i(t, &["exitCode"]) == 0) {
            continue;
        }
        if sidecar && get(c, &["started"]).and_then(Value::as_bool) == Some(true) {
            if get(c, &["ready"]).and_then(Value::as_bool) == Some(true) {
                ready += 1;
            }
            continue;
        }
        if let Some(t) = terminated {
            reason = match s(t, &["reason"]) {
                "" if i(t, &["signal"]) != 0 => format!("Init:Signal:{}", i(t, &["signal"])),
                "" => format!("Init:ExitCode:{}", i(t, &["exitCode"])),
                r => format!("Init:{r}"),
            };
        } else if !waiting_reason.is_empty() && waiting_reason != "PodInitializing" {
            reason = format!("Init:{waiting_reason}");
        } else {
            reason = format!("Init:{idx}/{}", init_specs.len());
        }
        initializing = true;
        break;
    }

    let initialized = conditions
        .iter()
        .any(|c| s(c, &["type"]) == "Initialized" && s(c, &["status"]) == "True");
    if !initializing || initialized {
        restarts = sidecar_restarts;
        last_restart = last_sidecar_restart;
        let mut has_running = false;
        for c in arr(o, &["status", "containerStatuses"]).iter().rev() {
            restarts += i(c, &["restartCount"]);
            if let Some(t) = finished(c) {
                last_restart = last_restart.max(Some(t));
            }
            let waiting = s(c, &["state", "waiting", "reason"]);
            let terminated = get(c, &["state", "terminated"]);
            if !waiting.is_empty() {
                reason = waiting.to_string();
            } else if let Some(t) = terminated {
                reason = match s(t, &["reason"]) {
                    "" if i(t, &["signal"]) != 0 => format!("Signal:{}", i(t, &["signal"])),
                    "" => format!("ExitCode:{}", i(t, &["exitCode"])),
                    r => r.to_string(),
                };
            } else if get(c, &["ready"]).and_then(Value::as_bool) == Some(true)
                && get(c, &["state", "running"]).is_some()
            {
                has_running = true;
                ready += 1;
            }
        }
        if reason == "Completed" && has_running {
            let pod_ready = conditions
                .iter()
                .any(|c| s(c, &["type"]) == "Ready" && s(c, &["status"]) == "True");
            reason = if pod_ready {
                "Running".into()
            } else {
                "NotReady".into()
            };
        }
    }

    let deleting = get(o, &["metadata", "deletionTimestamp"]).is_some_and(|v| !v.is_null());
    if deleting && s(o, &["status", "reason"]) == "NodeLost" {
        reason = "Unknown".into();
    } else if deleting && phase != "Succeeded" && phase != "Failed" {
        reason = "Terminating".into();
    }

    let restarts_cell = match last_restart {
        Some(t) if restarts != 0 => format!(
            "{restarts} ({} ago)",
            human_duration(now.signed_duration_since(t))
        ),
        _ => restarts.to_string(),
    };
    // A pod spec with no containers is invalid, but do not print "0/0" as if ready.
    total = total.max(ready);

    let pod_ip = arr(o, &["status", "podIPs"])
        .first()
        .map(|p| s(p, &["ip"]))
        .filter(|x| !x.is_empty())
        .unwrap_or_else(|| s(o, &["status", "podIP"]));
    let gates = arr(o, &["spec", "readinessGates"]);
    let gates_cell = if gates.is_empty() {
        "<none>".to_string()
    } else {
        let ok = gates
            .iter()
            .filter(|g| {
                conditions
                    .iter()
                    .find(|c| s(c, &["type"]) == s(g, &["conditionType"]))
                    .is_some_and(|c| s(c, &["status"]) == "True")
            })
            .count();
        format!("{ok}/{}", gates.len())
    };
    let cells = vec![
        name,
        json!(format!("{ready}/{total}")),
        json!(reason),
        json!(restarts_cell),
        age,
        json!(or_none(pod_ip)),
        json!(or_none(s(o, &["spec", "nodeName"]))),
        json!(or_none(s(o, &["status", "nominatedNodeName"]))),
        json!(gates_cell),
    ];
    (cells, row_conditions)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apiserver::resources::{RESOURCES, by_kind};
    use chrono::TimeDelta;

    fn now() -> DateTime<Utc> {
        parse_time("2024-05-01T12:00:00Z").unwrap()
    }

    fn row(kind: &str, api_version: &str, o: Value) -> Vec<Value> {
        let r = by_kind(api_version, kind).unwrap();
        let t = table(r, &[o], IncludeObject::Metadata, now());
        assert_eq!(
            t["rows"][0]["cells"].as_array().unwrap().len(),
            t["columnDefinitions"].as_array().unwrap().len()
        );
        t["rows"][0]["cells"].as_array().unwrap().clone()
    }

    #[test]
    fn human_duration_matches_go() {
        let d = |s: i64| human_duration(TimeDelta::seconds(s));
        assert_eq!(d(-5), "<invalid>");
        assert_eq!(d(-1), "0s");
        assert_eq!(d(5), "5s");
        assert_eq!(d(119), "119s");
        assert_eq!(d(192), "3m12s");
        assert_eq!(d(600), "10m");
        assert_eq!(d(3 * 3600 + 5 * 60), "3h5m");
        assert_eq!(d(9 * 3600), "9h");
        assert_eq!(d(51 * 3600), "2d3h");
        assert_eq!(d(10 * 86400), "10d");
        assert_eq!(d(800 * 86400), "2y70d");
        assert_eq!(d(9 * 365 * 86400), "9y");
        assert_eq!(human_duration(TimeDelta::milliseconds(-1500)), "0s");
    }

    #[test]
    fn every_kind_has_matching_cells() {
        for r in RESOURCES {
            let o = json!({"metadata": {"name": "x", "creationTimestamp": "2024-05-01T11:59:55Z"}});
            let t = table(r, &[o], IncludeObject::Object, now());
            assert_eq!(
                t["rows"][0]["cells"].as_array().unwrap().len(),
                t["columnDefinitions"].as_array().unwrap().len(),
                "{}",
                r.kind
            );
            assert_eq!(t["rows"][0]["object"]["metadata"]["name"], "x");
        }
    }

    #[test]
    fn pod_status_logic() {
        let base = |status: Value| {
            json!({"metadata": {"name": "p", "creationTimestamp": "2024-05-01T11:56:48Z"},
                   "spec": {"containers": [{"name": "a"}, {"name": "b"}]}, "status": status})
        };
        let running = row(
            "Pod",
            "v1",
            base(json!({"phase": "Running", "podIP": "10.0.0.5",
            "containerStatuses": [
                {"name": "a", "ready": true, "restartCount": 2, "state": {"running": {}},
                 "lastState": {"terminated": {"exitCode": 1, "finishedAt": "2024-05-01T11:55:00Z"}}},
                {"name": "b", "ready": true, "restartCount": 0, "state": {"running": {}}}]})),
        );
        assert_eq!(
            running[..5],
            [
                json!("p"),
                json!("2/2"),
                json!("Running"),
                json!("2 (5m ago)"),
                json!("3m12s")
            ]
        );
        assert_eq!(running[5], "10.0.0.5");
        assert_eq!(running[6], "<none>");

        let waiting = row(
            "Pod",
            "v1",
            base(json!({"phase": "Pending",
            "containerStatuses": [{"name": "a", "ready": false, "restartCount": 0, "state": {"waiting": {"reason": "ImagePullBackOff"}}}]})),
        );
        assert_eq!(waiting[1], "0/2");
        assert_eq!(waiting[2], "ImagePullBackOff");
        assert_eq!(waiting[3], "0");

        let done = row(
            "Pod",
            "v1",
            base(json!({"phase": "Succeeded",
            "containerStatuses": [{"name": "a", "state": {"terminated": {"exitCode": 0, "reason": "Completed"}}}]})),
        );
        assert_eq!(done[2], "Completed");

        let mut p = base(json!({"phase": "Running"}));
        p["metadata"]["deletionTimestamp"] = json!("2024-05-01T11:59:00Z");
        assert_eq!(row("Pod", "v1", p)[2], "Terminating");

        let mut init = base(json!({"phase": "Pending", "initContainerStatuses": [
            {"name": "i0", "state": {"terminated": {"exitCode": 0}}},
            {"name": "i1", "state": {"running": {}}}]}));
        init["spec"]["initContainers"] = json!([{"name": "i0"}, {"name": "i1"}]);
        assert_eq!(row("Pod", "v1", init)[2], "Init:1/2");

        let pending = row("Pod", "v1", base(json!({"phase": "Pending"})));
        assert_eq!(pending[2], "Pending");
    }

    #[test]
    fn workload_and_service_cells() {
        let d = row(
            "Deployment",
            "apps/v1",
            json!({
            "metadata": {"name": "web", "creationTimestamp": "2024-04-29T09:00:00Z"},
            "spec": {"replicas": 3, "selector": {"matchLabels": {"app": "web"}},
                     "template": {"spec": {"containers": [{"name": "nginx", "image": "nginx:1.25"}]}}},
            "status": {"readyReplicas": 2, "updatedReplicas": 3, "availableReplicas": 2}}),
        );
        assert_eq!(
            d,
            vec![
                json!("web"),
                json!("2/3"),
                json!(3),
                json!(2),
                json!("2d3h"),
                json!("nginx"),
                json!("nginx:1.25"),
                json!("app=web")
            ]
        );

        let svc = row(
            "Service",
            "v1",
            json!({"metadata": {"name": "s"},
            "spec": {"type": "NodePort", "clusterIP": "10.96.0.10", "selector": {"b": "2", "a": "1"},
                     "ports": [{"port": 80, "nodePort": 30080, "protocol": "TCP"}, {"port": 53, "protocol": "UDP"}]}}),
        );
        assert_eq!(
            svc[..6],
            [
                json!("s"),
                json!("NodePort"),
                json!("10.96.0.10"),
                json!("<none>"),
                json!("80:30080/TCP,53/UDP"),
                json!("<unknown>")
            ]
        );
        assert_eq!(svc[6], "a=1,b=2");
        let lb = row(
            "Service",
            "v1",
            json!({"metadata": {"name": "s"}, "spec": {"type": "LoadBalancer", "ports": [{"port": 80}]}}),
        );
        assert_eq!(lb[3], "<pending>");
        assert_eq!(lb[4], "80/TCP");

        let sel = json!({"matchLabels": {"z": "1"}, "matchExpressions": [{"key": "a", "operator": "In", "values": ["y", "x"]}, {"key": "b", "operator": "DoesNotExist"}]});
        assert_eq!(selector_string(Some(&sel)), "a in (x,y),!b,z=1");
    }

    #[test]
    fn node_endpoints_events() {
        let n = row(
            "Node",
            "v1",
            json!({"metadata": {"name": "n1", "labels": {"node-role.kubernetes.io/control-plane": ""}},
            "spec": {"unschedulable": true},
            "status": {"conditions": [{"type": "Ready", "status": "True"}], "nodeInfo": {"kubeletVersion": "v1.32.0"},
                       "addresses": [{"type": "InternalIP", "address": "192.0.2.1"}]}}),
        );
        assert_eq!(n[1], "Ready,SchedulingDisabled");
        assert_eq!(n[2], "control-plane");
        assert_eq!(n[5], "192.0.2.1");
        assert_eq!(n[6], "<none>");
        assert_eq!(n[7], "<unknown>");

        let ep = row(
            "Endpoints",
            "v1",
            json!({"metadata": {"name": "e"}, "subsets": [{
            "addresses": [{"ip": "10.0.0.1"}, {"ip": "10.0.0.2"}, {"ip": "10.0.0.3"}, {"ip": "10.0.0.4"}],
            "ports": [{"port": 80}]}]}),
        );
        assert_eq!(ep[1], "10.0.0.1:80,10.0.0.2:80,10.0.0.3:80 + 1 more...");

        let ev = row(
            "Event",
            "v1",
            json!({"metadata": {"name": "e1"}, "type": "Normal", "reason": "Scheduled",
            "involvedObject": {"kind": "Pod", "name": "p"}, "message": " hi ", "lastTimestamp": "2024-05-01T11:59:30Z"}),
        );
        assert_eq!(
            ev[..4],
            [
                json!("30s"),
                json!("Normal"),
                json!("Scheduled"),
                json!("pod/p")
            ]
        );
        assert_eq!(ev[6], "hi");
        assert_eq!(ev[8], 1);
    }

    #[test]
    fn include_object_parsing() {
        assert_eq!(IncludeObject::parse(None), IncludeObject::Metadata);
        assert_eq!(IncludeObject::parse(Some("None")), IncludeObject::None);
        assert_eq!(IncludeObject::parse(Some("Object")), IncludeObject::Object);
        let r = by_kind("v1", "ConfigMap").unwrap();
        let t = table(
            r,
            &[json!({"metadata": {"name": "c"}, "data": {"a": "1"}})],
            IncludeObject::Metadata,
            now(),
        );
        assert_eq!(t["rows"][0]["object"]["kind"], "PartialObjectMetadata");
        assert_eq!(t["rows"][0]["cells"][1], 1);
        let t = table(
            r,
            &[json!({"metadata": {"name": "c"}})],
            IncludeObject::None,
            now(),
        );
        assert!(t["rows"][0].get("object").is_none());
    }
}
