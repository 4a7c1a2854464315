//! `contact` API: look a user up in the tenant directory with the tenant
//! token (`GET /open-apis/contact/v3/users/{user_id}`).
//!
//! Also resolves emails to user ids (`POST /open-apis/contact/v3/users/batch_get_id`).
//!
//! The protocol notes do not document these endpoints; path, query and field
//! names follow the platform's public contact v3 reference. Only the fields
//! the service needs are decoded.

use reqwest::Method;
use serde::Deserialize;

use crate::lark::client::{decode_data, seg, ApiRequest, Auth, LarkClient};
use crate::lark::error::Error;

/// Which kind of id a user id argument is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UserIdType {
    /// `ou_…`, per app.
    OpenId,
    /// `on_…`, per developer.
    UnionId,
    /// Tenant-internal user id.
    UserId,
}

impl UserIdType {
    /// Wire value for `user_id_type`.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::OpenId => "open_id",
            Self::UnionId => "union_id",
            Self::UserId => "user_id",
        }
    }
}

/// Employment status flags of a directory user.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct ContactUserStatus {
    /// Account frozen.
    pub is_frozen: bool,
    /// Left the company.
    pub is_resigned: bool,
    /// Account activated.
    pub is_activated: bool,
    /// Exited.
    pub is_exited: bool,
    /// Never joined.
    pub is_unjoin: bool,
}

/// A directory user's avatar URLs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct ContactAvatar {
    /// 72×72.
    pub avatar_72: Option<String>,
    /// 240×240.
    pub avatar_240: Option<String>,
    /// 640×640.
    pub avatar_640: Option<String>,
    /// Original size.
    pub avatar_origin: Option<String>,
}

/// A directory user (subset of the contact v3 user object).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct ContactUser {
    /// Per-app id.
    pub open_id: Option<String>,
    /// Per-developer id.
    pub union_id: Option<String>,
    /// Tenant-internal id.
    pub user_id: Option<String>,
    /// Display name.
    pub name: Option<String>,
    /// English name.
    pub en_name: Option<String>,
    /// Email.
    pub email: Option<String>,
    /// Enterprise email.
    pub enterprise_email: Option<String>,
    /// Employee number.
    pub employee_no: Option<String>,
    /// Avatar URLs.
    pub avatar: Option<ContactAvatar>,
    /// Department ids.
    pub department_ids: Vec<String>,
    /// Status flags.
    pub status: Option<ContactUserStatus>,
}

#[derive(Deserialize)]
struct UserData {
    user: ContactUser,
}

#[derive(Deserialize)]
struct IdEntry {
    #[serde(default)]
    user_id: Option<String>,
    #[serde(default)]
    email: Option<String>,
}

#[derive(Deserialize)]
struct IdList {
    #[serde(default)]
    user_list: Vec<IdEntry>,
}

impl LarkClient {
    /// `GET /open-apis/contact/v3/users/{user_id}?user_id_type=…` with the tenant token.
    pub async fn contact_user(
        &self,
        user_id: &str,
        id_type: UserIdType,
    ) -> Result<ContactUser, Error> {
        let req = ApiRequest::new(
            Method::GET,
            format!("/open-apis/contact/v3/users/{}", seg(user_id)?),
            Auth::Tenant,
        )
        .query("user_id_type", id_type.as_str());
        let data: UserData = self.execute(&req, decode_data).await?;
        Ok(data.user)
    }

    /// `POST /open-apis/contact/v3/users/batch_get_id?user_id_type=…` with the tenant token:
    /// the id (of kind `id_type`) of the user with this email, or `None` if there is none.
    pub async fn user_id_by_email(
        &self,
        email: &str,
        id_type: UserIdType,
    ) -> Result<Option<String>, Error> {
        let req = ApiRequest::new(
            Method::POST,
            "/open-apis/contact/v3/users/batch_get_id".to_owned(),
            Auth::Tenant,
        )
        .query("user_id_type", id_type.as_str())
        .json(serde_json::json!({ "emails": [email] }));
        let data: IdList = self.execute(&req, decode_data).await?;
        Ok(data
            .user_list
            .into_iter()
            .find(|e| {
                e.email
                    .as_deref()
                    .is_none_or(|m| m.eq_ignore_ascii_case(email))
            })
            .and_then(|e| e.user_id)
            .filter(|id| !id.is_empty()))
    }
}
