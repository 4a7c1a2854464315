//! `authen` API: who the holder of a user access token is
//! (`GET /open-apis/authen/v1/user_info`, protocol notes §4.6).
//!
//! Owns [`UserInfo`]. A 99991668/99991677 failure here means the user's
//! token is invalid or expired ([`Error::is_user_token_invalid`]); refreshing
//! it is the caller's job.

use reqwest::Method;
use secrecy::SecretString;
use serde::Deserialize;

use crate::lark::client::{decode_data, ApiRequest, Auth, LarkClient};
use crate::lark::error::Error;

/// The user behind a user access token. Fields beyond `open_id` appear only
/// with the matching scopes. Email and phone are admin-entered, not
/// verified: key users on `open_id` (+ `tenant_key`) or `union_id`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct UserInfo {
    /// Per-app user id (`ou_…`).
    pub open_id: String,
    /// Per-developer user id (`on_…`).
    pub union_id: Option<String>,
    /// Tenant-internal user id (needs a scope).
    pub user_id: Option<String>,
    /// Tenant the user belongs to.
    pub tenant_key: Option<String>,
    /// Display name.
    pub name: Option<String>,
    /// English name.
    pub en_name: Option<String>,
    /// Avatar URL.
    pub avatar_url: Option<String>,
    /// 72×72 avatar.
    pub avatar_thumb: Option<String>,
    /// 240×240 avatar.
    pub avatar_middle: Option<String>,
    /// 640×640 avatar.
    pub avatar_big: Option<String>,
    /// Email (scope `contact:user.email:readonly`).
    pub email: Option<String>,
    /// Enterprise email.
    pub enterprise_email: Option<String>,
    /// Mobile number (scope `contact:user.phone:readonly`).
    pub mobile: Option<String>,
    /// Employee number.
    pub employee_no: Option<String>,
}

#[derive(Deserialize)]
struct TenantData {
    tenant: TenantInfo,
}

#[derive(Deserialize)]
struct TenantInfo {
    tenant_key: String,
}

impl LarkClient {
    /// `GET /open-apis/tenant/v2/tenant/query`: the `tenant_key` of the tenant this app's
    /// tenant token belongs to (the company whose users may authorize it).
    pub async fn app_tenant_key(&self) -> Result<String, Error> {
        let req = ApiRequest::new(
            Method::GET,
            "/open-apis/tenant/v2/tenant/query".to_owned(),
            Auth::Tenant,
        );
        self.execute(&req, |raw| {
            let d: TenantData = decode_data(raw)?;
            if d.tenant.tenant_key.is_empty() {
                return Err(Error::Decode {
                    reason: "tenant query has no `tenant_key`".to_owned(),
                    status: raw.status,
                    log_id: raw.header_log_id(),
                });
            }
            Ok(d.tenant.tenant_key)
        })
        .await
    }

    /// `GET /open-apis/authen/v1/user_info` with the user's access token.
    pub async fn user_info(&self, user_token: &SecretString) -> Result<UserInfo, Error> {
        let req = ApiRequest::new(
            Method::GET,
            "/open-apis/authen/v1/user_info".to_owned(),
            Auth::User(user_token),
        );
        self.execute(&req, |raw| {
            let info: UserInfo = decode_data(raw)?;
            if info.open_id.is_empty() {
                return Err(Error::Decode {
                    reason: "user_info has no `open_id`".to_owned(),
                    status: raw.status,
                    log_id: raw.header_log_id(),
                });
            }
            Ok(info)
        })
        .await
    }
}
