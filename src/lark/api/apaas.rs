//! aPaaS API (protocol notes §6): application object records with the
//! tenant token (§6.2) and workspace table records with a user token (§6.4).
//!
//! Owns the JSON-in-a-string encoding these endpoints use: `record` /
//! `records` are sent as serialised JSON strings, and `item` / `items` come
//! back as JSON strings (an array or object is also accepted). Flows,
//! approvals and the separate `ae-openapi` gateway are not covered.

use reqwest::Method;
use secrecy::SecretString;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::lark::client::{
    decode_data, decode_unit, seg, ApiRequest, Auth, LarkClient, RawResponse,
};
use crate::lark::error::Error;

/// Largest `page_size` the record query accepts.
pub const MAX_PAGE_SIZE: u32 = 500;
/// Most pages [`LarkClient::query_all_records`] fetches before giving up.
pub const MAX_PAGES: usize = 1000;

/// Body of `records/batch_query`. Unset fields are omitted.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct RecordQuery {
    /// Field API names to return.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub select: Vec<String>,
    /// `{"conditions": [...], "logic_expression": …}` as documented.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub filter: Option<Value>,
    /// `[{"field": …, "direction": "ASC"|"DESC"}]`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub order_by: Vec<Value>,
    /// Page size, at most [`MAX_PAGE_SIZE`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub page_size: Option<u32>,
    /// Offset paging (when not using page tokens).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
    /// Token from the previous page's `next_page_token`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub page_token: Option<String>,
    /// Ask for token paging.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub use_page_token: Option<bool>,
    /// Ask for `total`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub need_total_count: Option<bool>,
}

impl RecordQuery {
    /// A token-paged query selecting `fields`, `page_size` per page.
    #[must_use]
    pub fn select<I, S>(fields: I, page_size: u32) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self {
            select: fields.into_iter().map(Into::into).collect(),
            page_size: Some(page_size.min(MAX_PAGE_SIZE)),
            use_page_token: Some(true),
            ..Self::default()
        }
    }

    /// Sets the filter object.
    #[must_use]
    pub fn with_filter(mut self, filter: Value) -> Self {
        self.filter = Some(filter);
        self
    }
}

/// One page of object records.
#[derive(Debug, Clone, Default, PartialEq)]
#[non_exhaustive]
pub struct RecordPage {
    /// Decoded records.
    pub items: Vec<Value>,
    /// `total`, when requested.
    pub total: Option<i64>,
    /// Pass as `page_token` to get the next page.
    pub next_page_token: Option<String>,
    /// Whether more pages exist.
    pub has_more: bool,
}

/// Query parameters of the workspace table records list. Values are passed
/// through as the platform expects them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TableQuery {
    /// `page_size`.
    pub page_size: Option<u32>,
    /// `page_token` from the previous page.
    pub page_token: Option<String>,
    /// `select`.
    pub select: Option<String>,
    /// `filter`.
    pub filter: Option<String>,
    /// `order`.
    pub order: Option<String>,
}

/// One page of workspace table records.
#[derive(Debug, Clone, Default, PartialEq)]
#[non_exhaustive]
pub struct TablePage {
    /// Decoded records.
    pub items: Vec<Value>,
    /// `total`, when sent.
    pub total: Option<i64>,
    /// Whether more pages exist.
    pub has_more: bool,
    /// Pass back as `page_token` for the next page.
    pub page_token: Option<String>,
}

#[derive(Deserialize)]
struct PageData {
    #[serde(default)]
    items: Option<Value>,
    #[serde(default)]
    total: Option<i64>,
    #[serde(default)]
    next_page_token: Option<String>,
    #[serde(default)]
    page_token: Option<String>,
    #[serde(default)]
    has_more: bool,
}

#[derive(Deserialize)]
struct ItemData {
    #[serde(default)]
    item: Option<Value>,
}

#[derive(Deserialize)]
struct CreatedData {
    #[serde(default)]
    id: Option<Value>,
}

/// Decodes a JSON-in-a-string field into values.
fn json_field(raw: &RawResponse, field: &str, value: Option<Value>) -> Result<Value, Error> {
    match value {
        Some(Value::String(s)) if s.trim().is_empty() => Ok(Value::Null),
        Some(Value::String(s)) => serde_json::from_str(&s).map_err(|e| Error::Decode {
            reason: format!("`{field}` is not a JSON string: {e}"),
            status: raw.status,
            log_id: raw.header_log_id(),
        }),
        Some(other) => Ok(other),
        None => Ok(Value::Null),
    }
}

fn json_items(raw: &RawResponse, value: Option<Value>) -> Result<Vec<Value>, Error> {
    match json_field(raw, "items", value)? {
        Value::Null => Ok(Vec::new()),
        Value::Array(items) => Ok(items),
        _ => Err(Error::Decode {
            reason: "`items` is not an array".to_owned(),
            status: raw.status,
            log_id: raw.header_log_id(),
        }),
    }
}

fn non_empty(s: Option<String>) -> Option<String> {
    s.filter(|t| !t.is_empty())
}

fn records_base(namespace: &str, object: &str) -> Result<String, Error> {
    Ok(format!(
        "/open-apis/apaas/v1/applications/{}/objects/{}/records",
        seg(namespace)?,
        seg(object)?
    ))
}

fn record_string(record: &Value) -> Result<String, Error> {
    serde_json::to_string(record)
        .map_err(|e| Error::Config(format!("cannot serialize record: {e}")))
}

impl LarkClient {
    /// `POST …/applications/{namespace}/objects/{object}/records/batch_query`
    /// (tenant token): one page.
    pub async fn query_records(
        &self,
        namespace: &str,
        object: &str,
        query: &RecordQuery,
    ) -> Result<RecordPage, Error> {
        let body = serde_json::to_value(query)
            .map_err(|e| Error::Config(format!("cannot serialize query: {e}")))?;
        let req = ApiRequest::new(
            Method::POST,
            format!("{}/batch_query", records_base(namespace, object)?),
            Auth::Tenant,
        )
        .json(body);
        self.execute(&req, |raw| {
            let data: PageData = decode_data(raw)?;
            Ok(RecordPage {
                items: json_items(raw, data.items)?,
                total: data.total,
                next_page_token: non_empty(data.next_page_token),
                has_more: data.has_more,
            })
        })
        .await
    }

    /// Runs [`query_records`](Self::query_records) with token paging until
    /// `has_more` is false, returning every record. Stops with an error if
    /// the platform says `has_more` without a new page token, or after
    /// [`MAX_PAGES`] pages.
    pub async fn query_all_records(
        &self,
        namespace: &str,
        object: &str,
        query: &RecordQuery,
    ) -> Result<Vec<Value>, Error> {
        let mut query = query.clone();
        query.use_page_token = Some(true);
        let mut all = Vec::new();
        for _ in 0..MAX_PAGES {
            let page = self.query_records(namespace, object, &query).await?;
            all.extend(page.items);
            if !page.has_more {
                return Ok(all);
            }
            match page.next_page_token {
                Some(token) if Some(&token) != query.page_token.as_ref() => {
                    query.page_token = Some(token);
                }
                _ => {
                    return Err(Error::Decode {
                        reason: "`has_more` without a new `next_page_token`".to_owned(),
                        status: 200,
                        log_id: None,
                    });
                }
            }
        }
        Err(Error::Decode {
            reason: format!("more than {MAX_PAGES} pages of records"),
            status: 200,
            log_id: None,
        })
    }

    /// `POST …/records/{id}/query` with `{"select": […]}` (tenant token).
    /// Returns the decoded `item`, or `None` if it was empty.
    pub async fn get_record(
        &self,
        namespace: &str,
        object: &str,
        id: &str,
        select: &[&str],
    ) -> Result<Option<Value>, Error> {
        let req = ApiRequest::new(
            Method::POST,
            format!("{}/{}/query", records_base(namespace, object)?, seg(id)?),
            Auth::Tenant,
        )
        .json(json!({ "select": select }));
        self.execute(&req, |raw| {
            let data: ItemData = decode_data(raw)?;
            Ok(match json_field(raw, "item", data.item)? {
                Value::Null => None,
                item => Some(item),
            })
        })
        .await
    }

    /// `POST …/records` with `{"record": "<JSON string>"}` (tenant token).
    /// Returns the new record's `id` (as a string, whatever its JSON type).
    ///
    /// Not idempotent: never re-sent after it may have reached the platform (a second send
    /// could create a second record); on [`Error::outcome_unknown`] the record may exist.
    pub async fn create_record(
        &self,
        namespace: &str,
        object: &str,
        record: &Value,
    ) -> Result<String, Error> {
        let req = ApiRequest::new(Method::POST, records_base(namespace, object)?, Auth::Tenant)
            .json(json!({ "record": record_string(record)? }))
            .one_time();
        self.execute(&req, |raw| {
            let data: CreatedData = decode_data(raw)?;
            match data.id {
                Some(Value::String(s)) if !s.is_empty() => Ok(s),
                Some(Value::Number(n)) => Ok(n.to_string()),
                _ => Err(Error::Decode {
                    reason: "create response has no `id`".to_owned(),
                    status: raw.status,
                    log_id: raw.header_log_id(),
                }),
            }
        })
        .await
    }

    /// `PATCH …/records/{id}` with `{"record": "<JSON string>"}` (tenant token).
    pub async fn patch_record(
        &self,
        namespace: &str,
        object: &str,
        id: &str,
        record: &Value,
    ) -> Result<(), Error> {
        let req = ApiRequest::new(
            Method::PATCH,
            format!("{}/{}", records_base(namespace, object)?, seg(id)?),
            Auth::Tenant,
        )
        .json(json!({ "record": record_string(record)? }));
        self.execute(&req, decode_unit).await
    }

    /// `DELETE …/records/{id}` (tenant token).
    pub async fn delete_record(
        &self,
        namespace: &str,
        object: &str,
        id: &str,
    ) -> Result<(), Error> {
        let req = ApiRequest::new(
            Method::DELETE,
            format!("{}/{}", records_base(namespace, object)?, seg(id)?),
            Auth::Tenant,
        );
        self.execute(&req, decode_unit).await
    }

    /// `GET /open-apis/apaas/v1/workspaces/{workspace_id}/tables/{table}/records`
    /// with the user's token (§6.4): one page.
    pub async fn list_table_records(
        &self,
        user_token: &SecretString,
        workspace_id: &str,
        table: &str,
        query: &TableQuery,
    ) -> Result<TablePage, Error> {
        let mut req = ApiRequest::new(
            Method::GET,
            format!(
                "/open-apis/apaas/v1/workspaces/{}/tables/{}/records",
                seg(workspace_id)?,
                seg(table)?
            ),
            Auth::User(user_token),
        );
        if let Some(n) = query.page_size {
            req = req.query("page_size", n.to_string());
        }
        for (key, value) in [
            ("page_token", &query.page_token),
            ("select", &query.select),
            ("filter", &query.filter),
            ("order", &query.order),
        ] {
            if let Some(v) = value {
                req = req.query(key, v.clone());
            }
        }
        self.execute(&req, |raw| {
            let data: PageData = decode_data(raw)?;
            Ok(TablePage {
                items: json_items(raw, data.items)?,
                total: data.total,
                has_more: data.has_more,
                page_token: non_empty(data.page_token.or(data.next_page_token)),
            })
        })
        .await
    }
}
