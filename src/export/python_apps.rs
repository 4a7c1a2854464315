//! The Python deployment's app store: SQLite file (`LARK_CONFIG_DB_PATH`, default
//! `data/lark_config.db`), table `applications`, each `app_secret` sealed with Fernet under
//! `LARK_CONFIG_ENCRYPTION_KEY`.
//!
//! [`read_apps`] opens the file read-only, checks every row and opens every secret; any row
//! that cannot be read or opened is an error naming the app and the column, and no app is
//! returned then (all or nothing, like the sessions' import). It writes nothing: the caller
//! decides where the apps go (the app registry).

use std::path::Path;

use rusqlite::types::ValueRef;
use secrecy::SecretString;

use crate::config::fernet::{FernetError, FernetKey};

/// One app of the Python deployment, its secret opened (held as a secret).
#[derive(Debug)]
pub struct PythonApp {
    /// `app_id` (the key).
    pub app_id: String,
    /// `app_name` (unique there).
    pub app_name: String,
    /// `app_secret`, decrypted.
    pub app_secret: SecretString,
    /// `description`.
    pub description: Option<String>,
    /// `status`: `active`, `inactive` or `deleted`.
    pub status: String,
    /// `permissions`, a JSON text there (checked to be JSON).
    pub permissions: Option<serde_json::Value>,
    /// `created_at` (UTC unix ms).
    pub created_at: Option<u64>,
    /// `updated_at` (UTC unix ms).
    pub updated_at: Option<u64>,
}

/// Why the app store could not be read. Names no secret.
#[derive(Debug, thiserror::Error)]
pub enum AppsError {
    /// The file cannot be opened or read as SQLite.
    #[error("{path}: {detail}")]
    Open {
        /// The file.
        path: String,
        /// What SQLite said.
        detail: String,
    },
    /// No `applications` table, or one without a column the import needs.
    #[error("{0}")]
    Table(String),
    /// A row with a value that cannot be imported.
    #[error("applications: app {app}: column {column}: {detail}")]
    BadColumn {
        /// The app (`app_id`, or `row N` before it is read).
        app: String,
        /// The column.
        column: &'static str,
        /// What is wrong.
        detail: String,
    },
    /// The key is neither a Fernet key nor 64 hex characters.
    #[error("LARK_CONFIG_ENCRYPTION_KEY: {0}")]
    Key(FernetError),
}

const COLUMNS: [&str; 8] = [
    "app_id",
    "app_name",
    "app_secret",
    "description",
    "status",
    "permissions",
    "created_at",
    "updated_at",
];

fn text(v: ValueRef<'_>) -> Result<Option<String>, String> {
    match v {
        ValueRef::Null => Ok(None),
        ValueRef::Text(t) => std::str::from_utf8(t)
            .map(|s| Some(s.to_owned()))
            .map_err(|_| "not UTF-8 text".to_owned()),
        other => Err(format!("{:?} where text is expected", other.data_type())),
    }
}

/// A time as SQLAlchemy leaves it in SQLite (`YYYY-MM-DD HH:MM:SS[.ffffff]`, naive UTC), or a
/// number of unix seconds.
fn time(v: ValueRef<'_>) -> Result<Option<u64>, String> {
    let ms = match v {
        ValueRef::Null => return Ok(None),
        ValueRef::Integer(s) => s.saturating_mul(1000),
        ValueRef::Real(s) => {
            // Whole milliseconds; an out-of-range value saturates.
            #[allow(clippy::cast_possible_truncation)]
            let ms = (s * 1000.0) as i64;
            ms
        }
        ValueRef::Text(_) => {
            let t = text(v)?.unwrap_or_default();
            let t = t.trim().replace('T', " ");
            let parsed = chrono::NaiveDateTime::parse_from_str(&t, "%Y-%m-%d %H:%M:%S%.f")
                .or_else(|_| chrono::NaiveDateTime::parse_from_str(&t, "%Y-%m-%d %H:%M:%S"))
                .map_err(|_| format!("{t:?} is not a time (YYYY-MM-DD HH:MM:SS)"))?;
            parsed.and_utc().timestamp_millis()
        }
        ValueRef::Blob(_) => return Err("a blob where a time is expected".to_owned()),
    };
    u64::try_from(ms)
        .map(Some)
        .map_err(|_| "a time before 1970".to_owned())
}

/// Reads every app of the SQLite file at `path`, opening each secret with `key` (the text of
/// `LARK_CONFIG_ENCRYPTION_KEY`). Apps come sorted by `app_id`.
///
/// # Errors
/// See [`AppsError`]; on any error no app is returned.
pub fn read_apps(path: &Path, key: &SecretString) -> Result<Vec<PythonApp>, AppsError> {
    let key =
        FernetKey::parse(secrecy::ExposeSecret::expose_secret(key)).map_err(AppsError::Key)?;
    let open_err = |e: rusqlite::Error| AppsError::Open {
        path: path.display().to_string(),
        detail: e.to_string(),
    };
    let db = rusqlite::Connection::open_with_flags(
        path,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(open_err)?;
    let present: Vec<String> = {
        let mut st = db
            .prepare("SELECT name FROM pragma_table_info('applications')")
            .map_err(open_err)?;
        let names = st
            .query_map([], |r| r.get::<_, String>(0))
            .map_err(open_err)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(open_err)?;
        names
    };
    if present.is_empty() {
        return Err(AppsError::Table(format!(
            "{}: no table applications (is this the Python deployment's LARK_CONFIG_DB_PATH?)",
            path.display()
        )));
    }
    if let Some(missing) = COLUMNS.iter().find(|c| !present.iter().any(|p| p == *c)) {
        return Err(AppsError::Table(format!(
            "{}: table applications has no column {missing}",
            path.display()
        )));
    }
    let mut st = db
        .prepare(&format!(
            "SELECT {} FROM applications ORDER BY app_id",
            COLUMNS.join(", ")
        ))
        .map_err(open_err)?;
    let mut rows = st.query([]).map_err(open_err)?;
    let mut apps = Vec::new();
    let mut n = 0usize;
    while let Some(r) = rows.next().map_err(open_err)? {
        n += 1;
        let mut app = format!("row {n}");
        let get = |i: usize| r.get_ref(i).map_err(open_err);
        let bad = |app: &str, column: &'static str, detail: String| AppsError::BadColumn {
            app: app.to_owned(),
            column,
            detail,
        };
        let required = |app: &str, i: usize, column: &'static str| -> Result<String, AppsError> {
            text(get(i)?)
                .map_err(|d| bad(app, column, d))?
                .filter(|s| !s.trim().is_empty())
                .ok_or_else(|| bad(app, column, "NULL or empty, and it is required".to_owned()))
        };
        let app_id = required(&app, 0, "app_id")?;
        app.clone_from(&app_id);
        let app_name = required(&app, 1, "app_name")?;
        let sealed = required(&app, 2, "app_secret")?;
        let plain = key
            .decrypt(&sealed)
            .map_err(|e| bad(&app, "app_secret", e.to_string()))?;
        let secret = String::from_utf8(plain.to_vec()).map_err(|_| {
            bad(
                &app,
                "app_secret",
                "the secret is not UTF-8 text".to_owned(),
            )
        })?;
        let description = text(get(3)?).map_err(|d| bad(&app, "description", d))?;
        let status = required(&app, 4, "status")?;
        if !matches!(status.as_str(), "active" | "inactive" | "deleted") {
            return Err(bad(
                &app,
                "status",
                format!("{status:?}: expected active, inactive or deleted"),
            ));
        }
        let permissions = match text(get(5)?).map_err(|d| bad(&app, "permissions", d))? {
            None => None,
            Some(p) if p.trim().is_empty() => None,
            Some(p) => Some(
                serde_json::from_str(&p)
                    .map_err(|e| bad(&app, "permissions", format!("not JSON: {e}")))?,
            ),
        };
        let created_at = time(get(6)?).map_err(|d| bad(&app, "created_at", d))?;
        let updated_at = time(get(7)?).map_err(|d| bad(&app, "updated_at", d))?;
        apps.push(PythonApp {
            app_id,
            app_name,
            app_secret: SecretString::from(secret),
            description,
            status,
            permissions,
            created_at,
            updated_at,
        });
    }
    Ok(apps)
}
