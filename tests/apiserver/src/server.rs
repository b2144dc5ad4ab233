//! HTTP routing: maps Kubernetes REST paths and verbs onto the [`Store`](crate::store::Store).

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use serde_json::{Value, json};

use crate::error::ApiError;
use crate::patch::{self, PatchType};
use crate::resources::{self, ResourceDef};
use crate::selector::Selectors;
use crate::store::{ChangeType, Subresource, WriteOptions};
use crate::watch::{self, WatchRequest};
use crate::{RequestRecord, Shared, discovery};

/// Request bodies larger than this are refused with 413.
pub const MAX_BODY: usize = 8 * 1024 * 1024;

/// A parsed resource path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ResRoute {
    pub res: &'static ResourceDef,
    /// Namespace from the path (`None` for cluster-wide collections and cluster-scoped resources).
    pub ns: Option<String>,
    pub name: Option<String>,
    pub sub: Subresource,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Route {
    Text(&'static str),
    Doc(Value),
    Resource(ResRoute),
}

fn resource_route(group: &str, version: &str, rest: &[&str]) -> Option<ResRoute> {
    let route = |res, ns: Option<&str>, name: Option<&str>, sub| ResRoute {
        res,
        ns: ns.map(str::to_string),
        name: name.map(str::to_string),
        sub,
    };
    if let ["namespaces", ns, plural, tail @ ..] = rest
        && let Some(res) = resources::find(group, version, plural).filter(|r| r.namespaced)
    {
        return match tail {
            [] => Some(route(res, Some(ns), None, Subresource::Main)),
            [name] => Some(route(res, Some(ns), Some(name), Subresource::Main)),
            [name, "status"] if res.status_subresource => {
                Some(route(res, Some(ns), Some(name), Subresource::Status))
            }
            _ => None,
        };
    }
    let [plural, tail @ ..] = rest else {
        return None;
    };
    let res = resources::find(group, version, plural)?;
    match tail {
        [] => Some(route(res, None, None, Subresource::Main)),
        [name] if !res.namespaced => Some(route(res, None, Some(name), Subresource::Main)),
        [name, "status"] if !res.namespaced && res.status_subresource => {
            Some(route(res, None, Some(name), Subresource::Status))
        }
        _ => None,
    }
}

/// Parses a request path into a route.
pub(crate) fn parse_path(
    path: &str,
    accept: Option<&str>,
    server_address: &str,
) -> Result<Route, ApiError> {
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let aggregated = discovery::wants_aggregated(accept);
    let route = match segs.as_slice() {
        ["version"] => Some(Route::Doc(discovery::version())),
        ["healthz" | "readyz" | "livez"] => Some(Route::Text("ok")),
        ["api"] if aggregated => Some(Route::Doc(discovery::aggregated(true))),
        ["api"] => Some(Route::Doc(discovery::core_versions(server_address))),
        ["apis"] if aggregated => Some(Route::Doc(discovery::aggregated(false))),
        ["apis"] => Some(Route::Doc(discovery::group_list())),
        ["api", v] => discovery::resource_list("", v).map(Route::Doc),
        ["apis", g] => discovery::group(g).map(Route::Doc),
        ["apis", g, v] => discovery::resource_list(g, v).map(Route::Doc),
        ["api", v, rest @ ..] => resource_route("", v, rest).map(Route::Resource),
        ["apis", g, v, rest @ ..] => resource_route(g, v, rest).map(Route::Resource),
        _ => None,
    };
    route.ok_or_else(ApiError::no_route)
}

/// The `PartialObjectMetadata` form of an object.
pub(crate) fn to_partial_metadata(obj: &Value) -> Value {
    json!({
        "kind": "PartialObjectMetadata",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": obj.get("metadata").cloned().unwrap_or_else(|| json!({})),
    })
}

fn json_response(code: u16, body: &Value) -> Response<Body> {
    json_response_typed(code, body, "application/json")
}

fn json_response_typed(code: u16, body: &Value, content_type: &'static str) -> Response<Body> {
    let mut resp = Response::new(Body::from(body.to_string()));
    *resp.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

fn error_response(e: &ApiError) -> Response<Body> {
    json_response(e.code, &e.to_status())
}

fn header_str(headers: &HeaderMap, name: header::HeaderName) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

/// The single fallback handler: every request goes through here.
pub(crate) async fn handle(
    State(shared): State<Arc<Shared>>,
    req: Request<Body>,
) -> Response<Body> {
    let (parts, body) = req.into_parts();
    let path = parts.uri.path().to_string();
    let query = parts.uri.query().unwrap_or("").to_string();
    let user = header_str(&parts.headers, header::AUTHORIZATION).and_then(|a| {
        a.strip_prefix("Bearer ")
            .or_else(|| a.strip_prefix("bearer "))
            .map(|t| t.trim().to_string())
    });
    let content_type = header_str(&parts.headers, header::CONTENT_TYPE);
    let accept = header_str(&parts.headers, header::ACCEPT);
    let params: Vec<(String, String)> = Query::<Vec<(String, String)>>::try_from_uri(&parts.uri)
        .map(|q| q.0)
        .unwrap_or_default();
    let ctx = Ctx {
        method: parts.method.clone(),
        content_type: content_type.clone(),
        accept,
        params,
    };
    let field_manager = ctx.param("fieldManager");
    let resp = match dispatch(&shared, &ctx, &path, body).await {
        Ok(r) => r,
        Err(e) => error_response(&e),
    };
    shared.record(RequestRecord {
        method: parts.method.to_string(),
        path,
        query,
        user,
        content_type,
        field_manager,
        status: resp.status().as_u16(),
    });
    resp
}

struct Ctx {
    method: Method,
    content_type: Option<String>,
    accept: Option<String>,
    params: Vec<(String, String)>,
}

impl Ctx {
    /// The last value of a query parameter.
    fn param(&self, k: &str) -> Option<String> {
        self.params
            .iter()
            .rev()
            .find(|(pk, _)| pk == k)
            .map(|(_, v)| v.clone())
    }

    fn flag(&self, k: &str) -> bool {
        self.param(k).is_some_and(|v| v == "true" || v == "1")
    }

    fn metadata_list(&self) -> bool {
        self.accept
            .as_deref()
            .is_some_and(|a| a.contains("as=PartialObjectMetadataList"))
    }

    fn metadata_object(&self) -> bool {
        self.accept.as_deref().is_some_and(|a| {
            a.contains("as=PartialObjectMetadata") && !a.contains("as=PartialObjectMetadataList")
        })
    }

    fn write_options(&self) -> WriteOptions {
        WriteOptions {
            field_manager: self.param("fieldManager").filter(|s| !s.is_empty()),
            dry_run: self.param("dryRun").is_some_and(|v| v == "All"),
        }
    }

    fn selectors(&self, res: &ResourceDef) -> Result<Selectors, ApiError> {
        Selectors::parse(
            res,
            self.param("labelSelector").as_deref(),
            self.param("fieldSelector").as_deref(),
        )
    }

    fn object_response(&self, code: u16, obj: &Value) -> Response<Body> {
        if self.metadata_object() {
            json_response(code, &to_partial_metadata(obj))
        } else {
            json_response(code, obj)
        }
    }
}

async fn read_body(body: Body) -> Result<Bytes, ApiError> {
    axum::body::to_bytes(body, MAX_BODY).await.map_err(|e| {
        ApiError::new(
            413,
            "RequestEntityTooLarge",
            format!("request body too large or unreadable (limit {MAX_BODY} bytes): {e}"),
        )
    })
}

/// Decodes a create/update body according to its content type.
fn decode_object(content_type: Option<&str>, body: &[u8]) -> Result<Value, ApiError> {
    let base = content_type
        .map(|c| {
            c.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        })
        .unwrap_or_default();
    match base.as_str() {
        "" | "application/json" | "*/*" => patch::parse_json(body),
        "application/yaml" | "application/x-yaml" | "text/yaml" => patch::parse_json_or_yaml(body),
        other => Err(ApiError::new(
            415,
            "UnsupportedMediaType",
            format!(
                "the body of the request was in an unknown format - accepted media types include: application/json, application/yaml (got {other:?})"
            ),
        )),
    }
}

async fn dispatch(
    shared: &Arc<Shared>,
    ctx: &Ctx,
    path: &str,
    body: Body,
) -> Result<Response<Body>, ApiError> {
    let route = parse_path(path, ctx.accept.as_deref(), &shared.addr.to_string())?;
    let r = match route {
        Route::Text(t) => {
            let mut resp = Response::new(Body::from(t));
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; charset=utf-8"),
            );
            return Ok(resp);
        }
        Route::Doc(doc) => {
            if ctx.method != Method::GET {
                return Err(ApiError::method_not_allowed(ctx.method.as_str()));
            }
            if doc.get("kind").and_then(Value::as_str) == Some("APIGroupDiscoveryList") {
                return Ok(json_response_typed(
                    200,
                    &doc,
                    discovery::AGGREGATED_CONTENT_TYPE,
                ));
            }
            return Ok(json_response(200, &doc));
        }
        Route::Resource(r) => r,
    };
    if let Some(code) = shared.take_fault(ctx.method.as_str(), r.res.plural) {
        return Err(ApiError::from_code(
            code,
            format!("injected fault for {} {}", ctx.method, path),
        ));
    }
    let res = r.res;
    let ns = r.ns.clone().unwrap_or_default();
    match (&r.name, &ctx.method) {
        (None, &Method::GET) => {
            let sel = ctx.selectors(res)?;
            if ctx.flag("watch") {
                let timeout = ctx
                    .param("timeoutSeconds")
                    .and_then(|t| t.parse::<u64>().ok())
                    .map(Duration::from_secs);
                return watch::start(
                    shared,
                    WatchRequest {
                        res,
                        ns: r.ns.clone(),
                        sel,
                        resource_version: ctx.param("resourceVersion"),
                        bookmarks: ctx.flag("allowWatchBookmarks"),
                        send_initial_events: ctx.flag("sendInitialEvents"),
                        timeout,
                        metadata_only: ctx.metadata_object() || ctx.metadata_list(),
                    },
                );
            }
            let limit = match ctx.param("limit") {
                Some(l) => Some(
                    l.parse::<usize>()
                        .map_err(|_| ApiError::bad_request(format!("invalid limit {l:?}")))?,
                ),
                None => None,
            };
            let exact_rv = if ctx.param("resourceVersionMatch").as_deref() == Some("Exact") {
                let rv = ctx.param("resourceVersion").unwrap_or_default();
                Some(rv.parse::<u64>().map_err(|_| {
                    ApiError::bad_request(format!("invalid resourceVersion {rv:?}"))
                })?)
            } else {
                None
            };
            let list = shared.lock_store().list(
                res,
                r.ns.as_deref(),
                &sel,
                limit,
                ctx.param("continue").as_deref(),
                exact_rv,
            )?;
            if ctx.metadata_list() {
                let items: Vec<Value> = list
                    .get("items")
                    .and_then(Value::as_array)
                    .map(|a| a.iter().map(to_partial_metadata).collect())
                    .unwrap_or_default();
                return Ok(json_response(
                    200,
                    &json!({
                        "kind": "PartialObjectMetadataList",
                        "apiVersion": "meta.k8s.io/v1",
                        "metadata": list.get("metadata").cloned().unwrap_or_else(|| json!({})),
                        "items": items,
                    }),
                ));
            }
            Ok(json_response(200, &list))
        }
        (None, &Method::POST) => {
            if res.namespaced && r.ns.is_none() {
                return Err(ApiError::method_not_allowed("POST"));
            }
            let bytes = read_body(body).await?;
            let obj = decode_object(ctx.content_type.as_deref(), &bytes)?;
            let opts = ctx.write_options();
            let out = shared.write(|s| s.create(res, &ns, obj, &opts))?;
            Ok(ctx.object_response(201, &out.object))
        }
        (None, &Method::DELETE) => {
            let bytes = read_body(body).await?;
            let del = if bytes.iter().all(u8::is_ascii_whitespace) {
                Value::Null
            } else {
                patch::parse_json(&bytes)?
            };
            let sel = ctx.selectors(res)?;
            let opts = ctx.write_options();
            let out =
                shared.write(|s| s.delete_collection(res, r.ns.as_deref(), &sel, &del, &opts))?;
            Ok(json_response(200, &out.object))
        }
        (Some(name), &Method::GET) => {
            let obj = shared.lock_store().get(res, &ns, name)?;
            Ok(ctx.object_response(200, &obj))
        }
        (Some(name), &Method::PUT) => {
            let bytes = read_body(body).await?;
            let obj = decode_object(ctx.content_type.as_deref(), &bytes)?;
            let opts = ctx.write_options();
            let out = shared.write(|s| s.update(res, &ns, name, r.sub, obj, &opts))?;
            Ok(ctx.object_response(200, &out.object))
        }
        (Some(name), &Method::PATCH) => {
            let ct = ctx.content_type.clone().unwrap_or_default();
            let ptype = PatchType::from_content_type(&ct)
                .ok_or_else(|| ApiError::unsupported_media_type(&ct))?;
            if ptype == PatchType::Strategic && res.custom {
                return Err(ApiError::unsupported_media_type(&ct));
            }
            let bytes = read_body(body).await?;
            let opts = ctx.write_options();
            let out = shared.write(|s| s.patch(res, &ns, name, r.sub, ptype, &bytes, &opts))?;
            let created = out
                .changes
                .first()
                .is_some_and(|c| c.change_type == ChangeType::Added);
            Ok(ctx.object_response(if created { 201 } else { 200 }, &out.object))
        }
        (Some(name), &Method::DELETE) if r.sub == Subresource::Main => {
            let bytes = read_body(body).await?;
            let del = if bytes.iter().all(u8::is_ascii_whitespace) {
                Value::Null
            } else {
                patch::parse_json(&bytes)?
            };
            let opts = ctx.write_options();
            let out = shared.write(|s| s.delete(res, &ns, name, &del, &opts))?;
            Ok(ctx.object_response(200, &out.object))
        }
        (_, m) => Err(ApiError::method_not_allowed(m.as_str())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn res_route(path: &str) -> Option<ResRoute> {
        match parse_path(path, None, "127.0.0.1:1") {
            Ok(Route::Resource(r)) => Some(r),
            _ => None,
        }
    }

    #[test]
    fn routes() {
        let r = res_route("/apis/keyway.dev/v1alpha1/namespaces/a/vmleases/x/status");
        assert!(r.as_ref().is_some_and(|r| r.res.kind == "VMLease"
            && r.ns.as_deref() == Some("a")
            && r.name.as_deref() == Some("x")
            && r.sub == Subresource::Status));
        let r = res_route("/apis/keyway.dev/v1alpha1/vmleases");
        assert!(r.is_some_and(|r| r.ns.is_none() && r.name.is_none()));
        assert!(res_route("/apis/keyway.dev/v1alpha1/vmleases/x").is_none());
        let r = res_route("/apis/keyway.dev/v1alpha1/ippools/p/status");
        assert!(r.is_some_and(|r| r.sub == Subresource::Status && r.ns.is_none()));
        let r = res_route("/api/v1/namespaces/foo");
        assert!(r.is_some_and(|r| r.res.kind == "Namespace" && r.name.as_deref() == Some("foo")));
        let r = res_route("/api/v1/namespaces/foo/status");
        assert!(r.is_some_and(|r| r.res.kind == "Namespace" && r.sub == Subresource::Status));
        let r = res_route("/api/v1/namespaces/foo/configmaps/c");
        assert!(r.is_some_and(|r| r.res.kind == "ConfigMap" && r.ns.as_deref() == Some("foo")));
        assert!(res_route("/api/v1/namespaces/foo/configmaps/c/status").is_none());
        assert!(res_route("/apis/nope.dev/v1/things").is_none());
        assert!(parse_path("/apis/keyway.dev/v1alpha1", None, "x").is_ok());
        assert!(parse_path("/nope", None, "x").is_err());
    }
}
