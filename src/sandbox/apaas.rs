//! The sandbox's aPaaS store (protocol notes §6): application object records with the tenant
//! token (§6.2: create, get, patch, delete, `batch_query` with offset or token paging) and
//! workspace table records read with a user token (§6.4). In memory; `record`, `item` and
//! `items` travel as JSON strings, as on the platform.
//!
//! Not imitated: `filter`, `order_by` and `group_by` of `batch_query` (records come back in
//! id order, unfiltered), OQL, search, flows and approvals.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{FromRequest, Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, patch, post};
use axum::{Json, Router};
use serde_json::{json, Map, Value};

use super::platform::{bearer, hit, tenant_call, unauthorized, user_token_owner, Refusal};
use super::Shared;

/// Largest `page_size` (§6.2).
const MAX_PAGE_SIZE: u64 = 500;
/// `page_size` when none is given.
const DEFAULT_PAGE_SIZE: u64 = 20;
/// First record id handed out.
const FIRST_ID: u64 = 1_790_000_000_000_001;
/// The platform's "param invalid" code (§6.2).
const CODE_PARAM_INVALID: i64 = 2_320_001;

const RECORDS: &str = "/open-apis/apaas/v1/applications/{namespace}/objects/{object}/records";

pub(crate) fn router(s: Arc<Shared>) -> Router {
    Router::new()
        .route(RECORDS, post(create))
        .route(&format!("{RECORDS}/batch_query"), post(batch_query))
        .route(&format!("{RECORDS}/{{id}}"), patch(update).delete(remove))
        .route(&format!("{RECORDS}/{{id}}/query"), post(get_one))
        .route(
            "/open-apis/apaas/v1/workspaces/{workspace}/tables/{table}/records",
            get(table_records),
        )
        .with_state(s)
}

fn param_invalid(msg: &str) -> Response {
    (
        StatusCode::BAD_REQUEST,
        Json(json!({"code": CODE_PARAM_INVALID, "msg": msg})),
    )
        .into_response()
}

fn ok(data: Value) -> Response {
    Json(json!({"code": 0, "msg": "success", "data": data})).into_response()
}

/// Counts the hit and checks the tenant token: `Err` is the refusal to send.
fn guard(s: &Shared, h: &HeaderMap) -> Result<(), Refusal> {
    tenant_call(s, h, "apaas")
}

/// The JSON body of an object-record call the [`guard`] lets through. The body is read first
/// and the guard runs last, as a handler's first lines would after its extractors.
struct Guarded(Value);

impl FromRequest<Arc<Shared>> for Guarded {
    type Rejection = Refusal;

    async fn from_request(req: Request, s: &Arc<Shared>) -> Result<Self, Refusal> {
        let h = req.headers().clone();
        let Json(b) = Json::<Value>::from_request(req, s)
            .await
            .map_err(|e| Refusal::from(e.into_response()))?;
        guard(s, &h)?;
        Ok(Self(b))
    }
}

/// Decodes `{"record": "<JSON object string>"}`.
fn record_arg(b: &Value) -> Option<Map<String, Value>> {
    match &b["record"] {
        Value::String(s) => match serde_json::from_str::<Value>(s) {
            Ok(Value::Object(m)) => Some(m),
            _ => None,
        },
        _ => None,
    }
}

const BAD_RECORD: &str = "record must be a JSON object string";
const BAD_ID: &str = "record id must be a number";

/// The record id from the path; `Err` is the answer to a bad one.
fn record_id(id: &str) -> Result<u64, Refusal> {
    id.parse::<u64>().map_err(|_| param_invalid(BAD_ID).into())
}

fn with_id(id: u64, rec: &Value) -> Value {
    let mut v = rec.clone();
    if let Value::Object(m) = &mut v {
        m.insert("_id".to_owned(), json!(id));
    }
    v
}

fn selected(id: u64, rec: &Value, select: &[String]) -> Value {
    let full = with_id(id, rec);
    if select.is_empty() {
        return full;
    }
    let mut out = Map::new();
    out.insert("_id".to_owned(), json!(id));
    for f in select {
        if let Some(v) = full.get(f) {
            out.insert(f.clone(), v.clone());
        }
    }
    Value::Object(out)
}

fn select_arg(b: &Value) -> Vec<String> {
    b["select"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

fn insert(s: &Shared, namespace: &str, object: &str, rec: Map<String, Value>) -> u64 {
    let mut g = s.lock();
    let next = g
        .objects
        .values()
        .filter_map(|m| m.keys().next_back())
        .max()
        .map_or(FIRST_ID, |m| m + 1);
    g.objects
        .entry((namespace.to_owned(), object.to_owned()))
        .or_default()
        .insert(next, Value::Object(rec));
    next
}

async fn create(
    State(s): State<Arc<Shared>>,
    Path((namespace, object)): Path<(String, String)>,
    Guarded(b): Guarded,
) -> Response {
    let Some(rec) = record_arg(&b) else {
        return param_invalid(BAD_RECORD);
    };
    let id = insert(&s, &namespace, &object, rec);
    ok(json!({"id": id.to_string()}))
}

async fn update(
    State(s): State<Arc<Shared>>,
    Path((namespace, object, id)): Path<(String, String, String)>,
    Guarded(b): Guarded,
) -> Result<Response, Refusal> {
    let id = record_id(&id)?;
    let Some(patch) = record_arg(&b) else {
        return Ok(param_invalid(BAD_RECORD));
    };
    let mut g = s.lock();
    let rec = g
        .objects
        .get_mut(&(namespace, object))
        .and_then(|m| m.get_mut(&id));
    Ok(match rec {
        Some(Value::Object(m)) => {
            for (k, v) in patch {
                m.insert(k, v);
            }
            drop(g);
            ok(json!({}))
        }
        _ => param_invalid("record not found"),
    })
}

async fn remove(
    State(s): State<Arc<Shared>>,
    h: HeaderMap,
    Path((namespace, object, id)): Path<(String, String, String)>,
) -> Result<Response, Refusal> {
    guard(&s, &h)?;
    let id = record_id(&id)?;
    let removed = s
        .lock()
        .objects
        .get_mut(&(namespace, object))
        .and_then(|m| m.remove(&id));
    Ok(match removed {
        Some(_) => ok(json!({})),
        None => param_invalid("record not found"),
    })
}

async fn get_one(
    State(s): State<Arc<Shared>>,
    Path((namespace, object, id)): Path<(String, String, String)>,
    Guarded(b): Guarded,
) -> Result<Response, Refusal> {
    let id = record_id(&id)?;
    let select = select_arg(&b);
    let item = s
        .lock()
        .objects
        .get(&(namespace, object))
        .and_then(|m| m.get(&id))
        .map(|r| selected(id, r, &select));
    Ok(match item {
        Some(item) => ok(json!({"item": item.to_string()})),
        None => param_invalid("record not found"),
    })
}

async fn batch_query(
    State(s): State<Arc<Shared>>,
    Path((namespace, object)): Path<(String, String)>,
    Guarded(b): Guarded,
) -> Response {
    let size = b["page_size"].as_u64().unwrap_or(DEFAULT_PAGE_SIZE);
    if size == 0 || size > MAX_PAGE_SIZE {
        return param_invalid("page_size must be 1..=500");
    }
    let select = select_arg(&b);
    let empty = BTreeMap::new();
    let g = s.lock();
    let all = g.objects.get(&(namespace, object)).unwrap_or(&empty);
    // Token paging: the token is the last id of the previous page. Offset paging otherwise.
    let use_token = b["use_page_token"].as_bool().unwrap_or(false);
    let after = match b["page_token"].as_str().filter(|t| !t.is_empty()) {
        Some(t) => match t.parse::<u64>() {
            Ok(id) => Some(id),
            Err(_) => return param_invalid("page_token invalid"),
        },
        None => None,
    };
    let offset = if use_token {
        0
    } else {
        b["offset"].as_u64().unwrap_or(0)
    };
    let candidates: Vec<(&u64, &Value)> = all
        .iter()
        .filter(|(id, _)| after.is_none_or(|a| **id > a))
        .skip(usize::try_from(offset).unwrap_or(usize::MAX))
        .collect();
    let page: Vec<Value> = candidates
        .iter()
        .take(usize::try_from(size).unwrap_or(usize::MAX))
        .map(|(id, r)| selected(**id, r, &select))
        .collect();
    let has_more = candidates.len() > page.len();
    let mut data = json!({
        "items": Value::Array(page.clone()).to_string(),
        "has_more": has_more,
    });
    if has_more && (use_token || after.is_some()) {
        let last = page.last().and_then(|r| r["_id"].as_u64()).unwrap_or(0);
        data["next_page_token"] = json!(last.to_string());
    }
    if b["need_total_count"].as_bool() == Some(true) {
        data["total"] = json!(all.len());
    }
    drop(g);
    ok(data)
}

async fn table_records(
    State(s): State<Arc<Shared>>,
    h: HeaderMap,
    Path((workspace, table)): Path<(String, String)>,
    Query(q): Query<Vec<(String, String)>>,
) -> Response {
    if let Some(r) = hit(&s, "apaas") {
        return r;
    }
    let Some(tok) = bearer(&h) else {
        return unauthorized();
    };
    if let Err(r) = user_token_owner(&s, &tok) {
        return *r;
    }
    let get = |k: &str| q.iter().find(|(a, _)| a == k).map(|(_, v)| v.as_str());
    let size = match get("page_size").map(str::parse::<usize>) {
        None => usize::try_from(DEFAULT_PAGE_SIZE).unwrap_or(20),
        Some(Ok(n)) if n > 0 && n as u64 <= MAX_PAGE_SIZE => n,
        Some(_) => return param_invalid("page_size must be 1..=500"),
    };
    let start = match get("page_token").filter(|t| !t.is_empty()).map(str::parse) {
        None => 0,
        Some(Ok(n)) => n,
        Some(Err(_)) => return param_invalid("page_token invalid"),
    };
    let rows = s
        .lock()
        .tables
        .get(&(workspace, table))
        .cloned()
        .unwrap_or_default();
    let page: Vec<Value> = rows.iter().skip(start).take(size).cloned().collect();
    let end = start + page.len();
    let has_more = end < rows.len();
    let mut data = json!({
        "items": Value::Array(page).to_string(),
        "total": rows.len(),
        "has_more": has_more,
    });
    if has_more {
        data["page_token"] = json!(end.to_string());
    }
    ok(data)
}

/// Adds records directly (control API); returns their ids.
pub(crate) fn seed(s: &Shared, namespace: &str, object: &str, records: Vec<Value>) -> Vec<String> {
    records
        .into_iter()
        .map(|r| {
            let rec = match r {
                Value::Object(m) => m,
                other => {
                    let mut m = Map::new();
                    m.insert("value".to_owned(), other);
                    m
                }
            };
            insert(s, namespace, object, rec).to_string()
        })
        .collect()
}

/// Every record of an object, in id order, with `_id`.
pub(crate) fn all(s: &Shared, namespace: &str, object: &str) -> Vec<Value> {
    s.lock()
        .objects
        .get(&(namespace.to_owned(), object.to_owned()))
        .map(|m| m.iter().map(|(id, r)| with_id(*id, r)).collect())
        .unwrap_or_default()
}
