//! HTTP: turns Kubernetes REST paths into registry calls. One dispatcher parses
//! /api/v1/... and /apis/<group>/<version>/... the way kube-apiserver lays them out.

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde_json::{Value, json};

use super::registry::{DeleteOptions, ListOptions, WatchItem, WriteOptions, WriteResult};
use super::resources::{self, Resource};
use super::selectors::{FieldSelector, LabelSelector};
use super::status::{ApiError, ApiResult};
use super::table::{self, IncludeObject};
use super::tls::{CertIdentity, UserInfo};
use super::validation::FieldValidation;
use super::{AppState, discovery, openapi, patch, proxy};

/// Largest request body accepted, as kube-apiserver's limit.
pub const MAX_BODY: usize = 3 * 1024 * 1024;

/// Query parameters, decoded once.
#[derive(Default)]
struct Query(Vec<(String, String)>);

impl Query {
    fn parse(q: Option<&str>) -> Self {
        Query(q.map(url_decode_pairs).unwrap_or_default())
    }

    fn get(&self, k: &str) -> Option<&str> {
        self.0.iter().find(|(a, _)| a == k).map(|(_, v)| v.as_str())
    }

    fn flag(&self, k: &str) -> bool {
        matches!(self.get(k), Some("true" | "1"))
    }
}

fn url_decode_pairs(q: &str) -> Vec<(String, String)> {
    q.split('&')
        .filter(|s| !s.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                match u8::from_str_radix(
                    std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("zz"),
                    16,
                ) {
                    Ok(b) => {
                        out.push(b);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Who the request is from: the TLS client certificate, else a bearer token.
fn authenticate(state: &AppState, req: &Request) -> Option<UserInfo> {
    if let Some(CertIdentity(Some(u))) = req.extensions().get::<CertIdentity>() {
        return Some(u.clone());
    }
    let auth = req.headers().get(header::AUTHORIZATION)?.to_str().ok()?;
    let token = auth.strip_prefix("Bearer ")?.trim();
    state.tokens.lookup(token).cloned()
}

pub async fn dispatch(State(state): State<Arc<AppState>>, req: Request) -> Response {
    let path = req.uri().path().to_string();
    let public = matches!(
        path.as_str(),
        "/healthz" | "/livez" | "/readyz" | "/version"
    ) || path.starts_with("/healthz/")
        || path.starts_with("/livez/")
        || path.starts_with("/readyz/");
    if !public && authenticate(&state, &req).is_none() {
        return ApiError::new(401, "Unauthorized", "Unauthorized").into_response();
    }
    match route(state, req).await {
        Ok(r) => r,
        Err(e) => {
            if e.code >= 500 {
                tracing::warn!(%path, code = e.code, "{}", e.message);
            }
            e.into_response()
        }
    }
}

fn json_response(code: StatusCode, v: &Value) -> Response {
    let body = serde_json::to_vec(v).unwrap_or_default();
    (code, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

async fn route(state: Arc<AppState>, req: Request) -> ApiResult<Response> {
    let (mut parts, body) = req.into_parts();
    let path = parts.uri.path().trim_end_matches('/').to_string();
    let query = Query::parse(parts.uri.query());
    let accept = parts
        .headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();

    if parts.method == Method::GET {
        match segs.as_slice() {
            ["healthz" | "livez" | "readyz", ..] => return health(&state).await,
            ["version"] => return Ok(json_response(StatusCode::OK, &super::version_info())),
            ["api"] if discovery::wants_aggregated(&accept) => return Ok(aggregated(true)),
            ["api"] => {
                return Ok(json_response(
                    StatusCode::OK,
                    &discovery::api_versions(&state.advertise),
                ));
            }
            ["apis"] if discovery::wants_aggregated(&accept) => return Ok(aggregated(false)),
            ["apis"] => return Ok(json_response(StatusCode::OK, &discovery::api_group_list())),
            ["api", v] => {
                return discovery::api_resource_list("", v)
                    .map(|l| json_response(StatusCode::OK, &l))
                    .ok_or_else(not_found_path);
            }
            ["apis", g] => {
                let list = discovery::api_group_list();
                return list["groups"]
                    .as_array()
                    .and_then(|gs| gs.iter().find(|x| x["name"] == *g))
                    .map(|grp| {
                        let mut grp = grp.clone();
                        grp["kind"] = json!("APIGroup");
                        grp["apiVersion"] = json!("v1");
                        json_response(StatusCode::OK, &grp)
                    })
                    .ok_or_else(not_found_path);
            }
            ["apis", g, v] => {
                return discovery::api_resource_list(g, v)
                    .map(|l| json_response(StatusCode::OK, &l))
                    .ok_or_else(not_found_path);
            }
            ["openapi", "v2"] => {
                if !accept.is_empty() && !accept.contains("json") && !accept.contains("*/*") {
                    // client-go only takes v2 as protobuf. An empty document makes kubectl
                    // skip client-side validation for what v3 cannot cover (kind: List,
                    // unknown kinds), so the server decides, instead of failing outright.
                    return Ok((
                        StatusCode::OK,
                        // The Accept value has an '@' Go's mime parser rejects in a
                        // Content-Type; kube-openapi answers with this spelling.
                        [(
                            header::CONTENT_TYPE,
                            "application/com.github.proto-openapi.spec.v2.v1.0+protobuf",
                        )],
                        openapi::v2_protobuf_stub(),
                    )
                        .into_response());
                }
                return Ok((
                    StatusCode::OK,
                    [(header::CONTENT_TYPE, "application/json")],
                    openapi::v2_json(),
                )
                    .into_response());
            }
            ["openapi", "v3"] => return Ok(json_response(StatusCode::OK, &openapi::v3_root())),
            ["openapi", "v3", rest @ ..] => {
                return openapi::v3_group_version(&rest.join("/"))
                    .map(|b| {
                        (
                            StatusCode::OK,
                            [(header::CONTENT_TYPE, "application/json")],
                            b,
                        )
                            .into_response()
                    })
                    .ok_or_else(not_found_path);
            }
            _ => {}
        }
    }

    let (group, version, rest) = match segs.as_slice() {
        ["api", v, rest @ ..] => ("", *v, rest),
        ["apis", g, v, rest @ ..] => (*g, *v, rest),
        _ => return Err(not_found_path()),
    };
    let (legacy_watch, rest) = match rest {
        ["watch", rest @ ..] => (true, rest),
        _ => (false, rest),
    };
    // namespaces/<ns>/<plural>/... versus the Namespace object itself.
    let (ns, plural, name, sub): (Option<&str>, &str, Option<&str>, Option<&str>) = match rest {
        ["namespaces", n, "status" | "finalize"] if group.is_empty() => {
            (None, "namespaces", Some(*n), rest.get(2).copied())
        }
        ["namespaces", n] => (None, "namespaces", Some(*n), None),
        ["namespaces", ns, plural, tail @ ..] => (
            Some(*ns),
            *plural,
            tail.first().copied(),
            tail.get(1).copied(),
        ),
        [plural, tail @ ..] => (None, *plural, tail.first().copied(), tail.get(1).copied()),
        [] => return Err(not_found_path()),
    };
    if rest.len() > 5 {
        return Err(not_found_path());
    }
    let r = resources::by_plural(group, version, plural).ok_or_else(not_found_path)?;
    if ns.is_some() && !r.namespaced {
        return Err(not_found_path());
    }
    let ns = if r.namespaced { ns } else { None };
    // pods/log and pods/exec: proxied to the pod's kubelet (proxy.rs).
    if let (Some(n), Some(s @ ("log" | "exec"))) = (name, sub)
        && r.kind == "Pod"
        && rest.len() <= 5
    {
        let ns = ns.unwrap_or("default");
        return match (s, &parts.method) {
            ("log", &Method::GET) => proxy::pod_log(&state, r, ns, n, &query.0).await,
            ("exec", &Method::GET | &Method::POST) => {
                proxy::pod_exec(&state, r, ns, n, &query.0, &mut parts).await
            }
            _ => Err(ApiError::method_not_allowed(
                "the server does not allow this method on the requested resource",
            )),
        };
    }
    let body = read_body(body).await?;
    let opts = write_options(&query, &parts.headers)?;
    let ctx = Ctx {
        state: &state,
        r,
        ns,
        accept: &accept,
        query: &query,
    };

    match (parts.method.clone(), name, sub) {
        (Method::GET, None, None) if legacy_watch || query.flag("watch") => ctx.watch(None).await,
        (Method::GET, Some(n), None) if legacy_watch => ctx.watch(Some(n)).await,
        (Method::GET, None, None) => ctx.list().await,
        (Method::POST, None, None) => {
            let obj = parse_body(&body, &parts.headers)?;
            check_duplicates(&body, &parts.headers, &opts)?;
            let res = state.registry.create(r, ns, obj, &opts).await?;
            Ok(ctx.write_response(StatusCode::CREATED, res))
        }
        (Method::DELETE, None, None) => {
            let list = ctx.list_options()?;
            let del = delete_options(&query, &body)?;
            let items = state.registry.delete_collection(r, ns, &list, &del).await?;
            let rv = state
                .registry
                .store
                .current_revision()
                .await
                .map_err(ApiError::from)?;
            Ok(json_response(
                StatusCode::OK,
                &list_object(r, items, rv, None, None),
            ))
        }
        (Method::GET, Some(n), None) => {
            let obj = state.registry.get(r, ns, n).await?;
            Ok(ctx.object_response(StatusCode::OK, obj))
        }
        (Method::PUT, Some(n), None | Some("status") | Some("finalize")) => {
            if let Some(s) = sub
                && !sub_allowed(r, s)
            {
                return Err(not_found_path());
            }
            let obj = parse_body(&body, &parts.headers)?;
            check_duplicates(&body, &parts.headers, &opts)?;
            let res = state.registry.update(r, ns, n, obj, sub, &opts).await?;
            Ok(ctx.write_response(StatusCode::OK, res))
        }
        (Method::PATCH, Some(n), None | Some("status") | Some("scale")) => {
            if let Some(s) = sub
                && !sub_allowed(r, s)
            {
                return Err(not_found_path());
            }
            let ct = parts
                .headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            let kind = patch::PatchType::from_content_type(ct).ok_or_else(|| {
                ApiError::new(415, "UnsupportedMediaType", format!("the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml, application/strategic-merge-patch+json (got {ct:?})"))
            })?;
            let mut opts = opts;
            if matches!(kind, patch::PatchType::Apply) {
                match query.get("fieldManager") {
                    Some(m) if !m.is_empty() => opts.field_manager = m.to_string(),
                    _ => {
                        return Err(ApiError::bad_request(
                            "PATCH requests with content type application/apply-patch+yaml must provide a fieldManager",
                        ));
                    }
                }
            }
            let res = state
                .registry
                .patch(r, ns, n, kind, &body, sub, query.flag("force"), &opts)
                .await?;
            Ok(ctx.write_response(StatusCode::OK, res))
        }
        (Method::DELETE, Some(n), None) => {
            let del = delete_options(&query, &body)?;
            let obj = state.registry.delete(r, ns, n, &del).await?;
            Ok(json_response(StatusCode::OK, &obj))
        }
        (Method::GET, Some(n), Some("status")) if r.has_status => {
            let obj = state.registry.get(r, ns, n).await?;
            Ok(json_response(StatusCode::OK, &obj))
        }
        (Method::GET, Some(n), Some("scale")) if r.has_scale => {
            let obj = state.registry.get(r, ns, n).await?;
            Ok(json_response(
                StatusCode::OK,
                &super::registry::to_scale(r, &obj)?,
            ))
        }
        (Method::PUT, Some(n), Some("scale")) if r.has_scale => {
            let scale = parse_body(&body, &parts.headers)?;
            let merge = json!({"spec": {"replicas": scale["spec"]["replicas"]}, "metadata": {"resourceVersion": scale["metadata"]["resourceVersion"]}});
            let res = state
                .registry
                .patch(
                    r,
                    ns,
                    n,
                    patch::PatchType::Merge,
                    merge.to_string().as_bytes(),
                    Some("scale"),
                    false,
                    &opts,
                )
                .await?;
            Ok(json_response(StatusCode::OK, &res.object))
        }
        (Method::POST, Some(n), Some("binding")) if r.kind == "Pod" => {
            let binding = parse_body(&body, &parts.headers)?;
            let status = state.registry.bind(ns, n, &binding).await?;
            Ok(json_response(StatusCode::CREATED, &status))
        }
        (Method::POST, Some(n), Some("eviction")) if r.kind == "Pod" => {
            let eviction = parse_body(&body, &parts.headers)?;
            let del = delete_options_from(&query, &eviction["deleteOptions"])?;
            state.registry.delete(r, ns, n, &del).await?;
            Ok(json_response(
                StatusCode::CREATED,
                &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201}),
            ))
        }
        (m, _, _)
            if ![
                Method::GET,
                Method::POST,
                Method::PUT,
                Method::PATCH,
                Method::DELETE,
            ]
            .contains(&m) =>
        {
            Err(ApiError::method_not_allowed(format!(
                "the server does not allow this method on the requested resource ({m})"
            )))
        }
        // A subresource this resource does not have is a 404, as in kube-apiserver.
        (_, Some(_), Some(s))
            if !(sub_allowed(r, s) || r.kind == "Pod" && matches!(s, "binding" | "eviction")) =>
        {
            Err(not_found_path())
        }
        _ => Err(ApiError::method_not_allowed(
            "the server does not allow this method on the requested resource",
        )),
    }
}

fn sub_allowed(r: &Resource, sub: &str) -> bool {
    match sub {
        "status" => r.has_status,
        "scale" => r.has_scale,
        "finalize" => r.kind == "Namespace",
        _ => false,
    }
}

fn not_found_path() -> ApiError {
    ApiError::new(
        404,
        "NotFound",
        "the server could not find the requested resource",
    )
}

fn aggregated(legacy: bool) -> Response {
    let body = serde_json::to_vec(&discovery::aggregated(legacy)).unwrap_or_default();
    let mut resp = (StatusCode::OK, body).into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(discovery::AGGREGATED_CONTENT_TYPE),
    );
    resp
}

async fn health(state: &AppState) -> ApiResult<Response> {
    match state.registry.store.current_revision().await {
        Ok(_) => Ok((StatusCode::OK, "ok").into_response()),
        Err(e) => Ok((
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("[-]storage failed: {e}\nhealthz check failed"),
        )
            .into_response()),
    }
}

async fn read_body(body: Body) -> ApiResult<Bytes> {
    axum::body::to_bytes(body, MAX_BODY).await.map_err(|_| {
        ApiError::new(
            413,
            "RequestEntityTooLarge",
            format!("Request entity too large: limit is {MAX_BODY}"),
        )
    })
}

/// Request bodies are JSON or YAML (kubectl sends JSON; humans with curl send either).
fn parse_body(body: &[u8], headers: &HeaderMap) -> ApiResult<Value> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json");
    if ct.contains("protobuf") {
        return super::protobuf::decode_request(body).map_err(ApiError::bad_request);
    }
    if ct.contains("cbor") {
        return Err(ApiError::new(
            415,
            "UnsupportedMediaType",
            format!(
                "the body of the request was in an unknown format - accepted media types include: application/json, application/yaml, application/vnd.kubernetes.protobuf (got {ct:?})"
            ),
        ));
    }
    if body.is_empty() {
        return Err(ApiError::bad_request(
            "the body of the request was empty: expected an object",
        ));
    }
    if ct.contains("yaml") {
        let text = std::str::from_utf8(body)
            .map_err(|_| ApiError::bad_request("the body of the request is not valid UTF-8"))?;
        let v: Value = serde_yaml::from_str(text)
            .map_err(|e| ApiError::bad_request(format!("error decoding YAML: {e}")))?;
        return Ok(v);
    }
    serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_request(format!(
            "the body of the request was in an unknown format - couldn't decode JSON: {e}"
        ))
    })
}

/// Strict field validation also rejects duplicate keys, which decoding cannot see.
fn check_duplicates(body: &[u8], headers: &HeaderMap, opts: &WriteOptions) -> ApiResult<()> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if opts.field_validation == FieldValidation::Strict
        && !ct.contains("yaml")
        && let Some(field) = super::validation::duplicate_json_field(body)
    {
        return Err(ApiError::bad_request(format!(
            "strict decoding error: duplicate field {field:?}"
        )));
    }
    Ok(())
}

fn write_options(q: &Query, headers: &HeaderMap) -> ApiResult<WriteOptions> {
    let dry_run = match q.get("dryRun") {
        None | Some("") => false,
        Some("All") => true,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "dryRun: Unsupported value: {other:?}: supported values: \"All\""
            )));
        }
    };
    let manager = match q.get("fieldManager") {
        Some(m) if !m.is_empty() => {
            if m.len() > 128 {
                return Err(ApiError::bad_request(
                    "fieldManager: Too long: may not be more than 128 bytes",
                ));
            }
            m.to_string()
        }
        // As Kubernetes: the user agent up to its first '/'.
        _ => headers
            .get(header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .and_then(|ua| ua.split('/').next())
            .filter(|s| !s.is_empty())
            .unwrap_or("unknown")
            .chars()
            .take(128)
            .collect(),
    };
    Ok(WriteOptions {
        dry_run,
        field_validation: FieldValidation::parse(q.get("fieldValidation"))?,
        field_manager: manager,
    })
}

fn delete_options(q: &Query, body: &[u8]) -> ApiResult<DeleteOptions> {
    let from_body: Value = if body.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(body)
            .map_err(|e| ApiError::bad_request(format!("invalid DeleteOptions: {e}")))?
    };
    delete_options_from(q, &from_body)
}

fn delete_options_from(q: &Query, b: &Value) -> ApiResult<DeleteOptions> {
    let grace = match q.get("gracePeriodSeconds") {
        Some(s) => Some(
            s.parse::<i64>()
                .map_err(|_| ApiError::bad_request("gracePeriodSeconds must be an integer"))?,
        ),
        None => b["gracePeriodSeconds"].as_i64(),
    };
    let propagation = q
        .get("propagationPolicy")
        .map(str::to_string)
        .or_else(|| b["propagationPolicy"].as_str().map(str::to_string))
        .or_else(|| {
            match b["orphanDependents"]
                .as_bool()
                .or(q.get("orphanDependents").map(|s| s == "true"))
            {
                Some(true) => Some("Orphan".to_string()),
                Some(false) => Some("Background".to_string()),
                None => None,
            }
        });
    let dry_run = q.get("dryRun") == Some("All")
        || b["dryRun"]
            .as_array()
            .is_some_and(|a| a.iter().any(|x| x == "All"));
    Ok(DeleteOptions {
        grace_period_seconds: grace,
        propagation_policy: propagation,
        precondition_uid: b["preconditions"]["uid"].as_str().map(str::to_string),
        precondition_rv: b["preconditions"]["resourceVersion"]
            .as_str()
            .map(str::to_string),
        dry_run,
    })
}

fn list_object(
    r: &Resource,
    items: Vec<Value>,
    rv: i64,
    cont: Option<String>,
    remaining: Option<i64>,
) -> Value {
    let mut meta = json!({"resourceVersion": rv.to_string()});
    if let Some(c) = cont {
        meta["continue"] = json!(c);
    }
    if let Some(n) = remaining {
        meta["remainingItemCount"] = json!(n);
    }
    json!({"kind": r.list_kind, "apiVersion": r.api_version(), "metadata": meta, "items": items})
}

/// What representation the client asked for in Accept.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Repr {
    Full,
    Table,
    Metadata,
}

fn repr(accept: &str) -> Repr {
    // The first acceptable entry wins, as content negotiation does.
    for part in accept.split(',') {
        if part.contains("as=Table") {
            return Repr::Table;
        }
        if part.contains("as=PartialObjectMetadata") {
            return Repr::Metadata;
        }
        if part.contains("json") || part.contains("*/*") {
            return Repr::Full;
        }
    }
    Repr::Full
}

/// PartialObjectMetadata borrowing the object's metadata (for watch lines).
#[derive(serde::Serialize)]
struct PartialMetadata<'a> {
    kind: &'static str,
    #[serde(rename = "apiVersion")]
    api_version: &'static str,
    metadata: &'a Value,
}

impl<'a> PartialMetadata<'a> {
    fn of(obj: &'a Value) -> Self {
        PartialMetadata {
            kind: "PartialObjectMetadata",
            api_version: "meta.k8s.io/v1",
            metadata: &obj["metadata"],
        }
    }
}

/// The same PartialObjectMetadata as a Value (list items and single objects).
fn partial_metadata(obj: &Value) -> Value {
    json!(PartialMetadata::of(obj))
}

struct Ctx<'a> {
    state: &'a Arc<AppState>,
    r: &'static Resource,
    ns: Option<&'a str>,
    accept: &'a str,
    query: &'a Query,
}

impl Ctx<'_> {
    fn list_options(&self) -> ApiResult<ListOptions> {
        let limit = match self.query.get("limit") {
            Some(s) if !s.is_empty() => {
                let n: i64 = s
                    .parse()
                    .map_err(|_| ApiError::bad_request(format!("invalid limit {s:?}")))?;
                (n > 0).then_some(n as usize)
            }
            _ => None,
        };
        Ok(ListOptions {
            label_selector: LabelSelector::parse(self.query.get("labelSelector").unwrap_or(""))?,
            field_selector: FieldSelector::parse(self.query.get("fieldSelector").unwrap_or(""))?,
            limit,
            continue_token: self
                .query
                .get("continue")
                .filter(|s| !s.is_empty())
                .map(str::to_string),
        })
    }

    fn include_object(&self) -> IncludeObject {
        IncludeObject::parse(self.query.get("includeObject"))
    }

    async fn list(&self) -> ApiResult<Response> {
        let opts = self.list_options()?;
        let out = self.state.registry.list(self.r, self.ns, &opts).await?;
        let v = match repr(self.accept) {
            Repr::Table => {
                let mut t = table::table(
                    self.r,
                    &out.items,
                    self.include_object(),
                    chrono::Utc::now(),
                );
                t["metadata"] = json!({"resourceVersion": out.revision.to_string()});
                if let Some(c) = &out.continue_token {
                    t["metadata"]["continue"] = json!(c);
                }
                t
            }
            Repr::Metadata => {
                let items: Vec<Value> = out.items.iter().map(partial_metadata).collect();
                let mut l = list_object(
                    self.r,
                    items,
                    out.revision,
                    out.continue_token,
                    out.remaining,
                );
                l["kind"] = json!("PartialObjectMetadataList");
                l["apiVersion"] = json!("meta.k8s.io/v1");
                l
            }
            Repr::Full => list_object(
                self.r,
                out.items,
                out.revision,
                out.continue_token,
                out.remaining,
            ),
        };
        Ok(json_response(StatusCode::OK, &v))
    }

    fn render(&self, obj: Value) -> Value {
        match repr(self.accept) {
            Repr::Table => {
                let rv = obj["metadata"]["resourceVersion"].clone();
                let mut t = table::table(self.r, &[obj], self.include_object(), chrono::Utc::now());
                t["metadata"] = json!({"resourceVersion": rv});
                t
            }
            Repr::Metadata => partial_metadata(&obj),
            Repr::Full => obj,
        }
    }

    fn object_response(&self, code: StatusCode, obj: Value) -> Response {
        json_response(code, &self.render(obj))
    }

    fn write_response(&self, code: StatusCode, res: WriteResult) -> Response {
        let code = if res.created { code } else { StatusCode::OK };
        let mut resp = json_response(code, &res.object);
        for w in res.warnings {
            let text = format!("299 - {:?}", w);
            if let Ok(v) = HeaderValue::from_str(&text) {
                resp.headers_mut().append("Warning", v);
            }
        }
        resp
    }

    async fn watch(&self, name: Option<&str>) -> ApiResult<Response> {
        let mut opts = self.list_options()?;
        if let Some(n) = name {
            opts.field_selector = FieldSelector::parse(&format!("metadata.name={n}"))?;
        }
        let from =
            match self.query.get("resourceVersion") {
                None | Some("") | Some("0") => None,
                Some(s) => Some(s.parse::<i64>().map_err(|_| {
                    ApiError::bad_request(format!("invalid resource version {s:?}"))
                })?),
            };
        let send_initial = self.query.flag("sendInitialEvents");
        let bookmarks = self.query.flag("allowWatchBookmarks");
        let timeout = match self.query.get("timeoutSeconds") {
            Some(s) => Duration::from_secs(s.parse::<u64>().unwrap_or(1800).min(3600)),
            None => Duration::from_secs(1800),
        };
        let stream = self
            .state
            .registry
            .watch(
                self.r,
                self.ns,
                opts,
                from,
                send_initial,
                bookmarks,
                timeout,
            )
            .await?;
        let r = self.r;
        let mode = repr(self.accept);
        let include = self.include_object();
        let mut first_table = true;
        let lines = stream.map(move |item| {
            let (ty, object) = match item {
                WatchItem::Added(o) => ("ADDED", o),
                WatchItem::Modified(o) => ("MODIFIED", o),
                WatchItem::Deleted(o) => ("DELETED", o),
                WatchItem::Bookmark(rv, initial_end) => {
                    let mut meta = json!({"resourceVersion": rv.to_string()});
                    if initial_end {
                        meta["annotations"] = json!({"k8s.io/initial-events-end": "true"});
                    }
                    let object = match mode {
                        Repr::Table => {
                            json!({"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": meta, "columnDefinitions": null, "rows": null})
                        }
                        _ => json!({"kind": r.kind, "apiVersion": r.api_version(), "metadata": meta}),
                    };
                    return watch_line("BOOKMARK", &object);
                }
                WatchItem::Error(e) => return watch_line("ERROR", &e.to_status()),
            };
            match mode {
                // The common case: the shared encoding, made once for all watchers.
                Repr::Full => {
                    let json = object.json();
                    let mut line = Vec::with_capacity(json.len() + 40);
                    line.extend_from_slice(b"{\"type\":\"");
                    line.extend_from_slice(ty.as_bytes());
                    line.extend_from_slice(b"\",\"object\":");
                    line.extend_from_slice(json);
                    line.extend_from_slice(b"}\n");
                    Bytes::from(line)
                }
                Repr::Table => {
                    let rv = object.value["metadata"]["resourceVersion"].clone();
                    let mut t = table::table(r, std::slice::from_ref(&object.value), include, chrono::Utc::now());
                    t["metadata"] = json!({"resourceVersion": rv});
                    if !first_table {
                        t["columnDefinitions"] = json!([]);
                    }
                    first_table = false;
                    watch_line(ty, &t)
                }
                Repr::Metadata => watch_line(ty, &PartialMetadata::of(&object.value)),
            }
        });
        // Events already waiting go out in one chunk: one TLS record and one write per
        // burst instead of per event (a busy watcher gets dozens at once).
        let lines = lines.ready_chunks(256).map(|batch| {
            let bytes = match <[Bytes; 1]>::try_from(batch) {
                Ok([one]) => one,
                Err(batch) => Bytes::from(batch.concat()),
            };
            Ok::<_, std::convert::Infallible>(bytes)
        });
        Ok(Response::builder()
            .status(StatusCode::OK)
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::CACHE_CONTROL, "no-cache, private")
            .body(Body::from_stream(lines))
            .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response()))
    }
}

/// One line of a JSON watch stream.
/// One watch event as a JSON line (the object is borrowed, not copied).
fn watch_line(ty: &str, object: &impl serde::Serialize) -> Bytes {
    #[derive(serde::Serialize)]
    struct Line<'a, T> {
        #[serde(rename = "type")]
        ty: &'a str,
        object: &'a T,
    }
    let mut line = serde_json::to_vec(&Line { ty, object }).unwrap_or_default();
    line.push(b'\n');
    Bytes::from(line)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_decoding() {
        let q = Query::parse(Some("labelSelector=app%3Dweb%2Ctier+in+%28a%29&watch=1&x"));
        assert_eq!(q.get("labelSelector"), Some("app=web,tier in (a)"));
        assert!(q.flag("watch"));
        assert_eq!(q.get("x"), Some(""));
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
    }

    #[test]
    fn accept_negotiation() {
        assert!(
            repr("application/json;as=Table;v=v1;g=meta.k8s.io,application/json") == Repr::Table
        );
        assert!(repr("application/json") == Repr::Full);
        assert!(
            repr("application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1")
                == Repr::Metadata
        );
    }
}
