//! Outgoing webhooks (issue 20): the events of a user's authorization, told to the operator's
//! own systems so that a reauthorization reaches someone.
//!
//! - `event`: the five event types and their JSON payload (ids and times only, never a token or
//!   secret), built into a store [`OutboxEvent`](crate::storage::OutboxEvent) by the code that
//!   makes the change (`auth`), which appends it to the durable outbox in the same store
//!   transaction.
//! - `sign`: the HMAC-SHA256 signature over `timestamp.body` and its verification (what a
//!   receiver does).
//! - `worker`: the [`Worker`](crate::workers::Worker) on the supervisor that delivers each
//!   outbox entry to every URL through the service's own HTTP client (`net`: its trust, proxy
//!   and CA settings), retries failures with the one [`Backoff`](crate::backoff::Backoff),
//!   deletes an entry once every URL answered 2xx and keeps it as dead after the last attempt.
//!
//! Delivery is at least once: an entry is deleted only after every receiver acknowledged it,
//! so a crash between a receiver's 2xx and the delete sends it again after the restart, with the
//! same `event_id` (and `X-Lark-Service-Event-Id`), which receivers use to drop the duplicate.

pub mod event;
pub mod sign;
pub mod worker;

pub use event::{Event, EventType};
pub use sign::{sign, verify, VerifyError, EVENT_ID_HEADER, EVENT_TYPE_HEADER, SIGNATURE_HEADER};
pub use worker::{WebhookWorker, WebhookWorkerOptions};
