//! The application's event handling: what runs for each event, and who is told when an
//! acknowledged event fails afterwards.

use std::sync::Arc;

use tracing::{debug, info, warn};

/// What the person hears when their message or click was acknowledged but its work failed
/// afterwards (the platform will not redeliver it): a short text asking them to try again.
pub(super) fn late_failure_notice(lark: crate::lark::LarkClient) -> crate::events::LateFailureHook {
    Arc::new(move |open_id, event_type| {
        let lark = lark.clone();
        Box::pin(async move {
            let Some(open_id) = open_id else {
                warn!(event_type = %event_type, "An acknowledged event failed afterwards; it has no sender to tell.");
                return;
            };
            let text = "抱歉，刚才的请求没有完成，请稍后再试一次。Sorry, your last request could not be completed; please try again.";
            match lark
                .send_text(&crate::lark::Receiver::open_id(&open_id), text)
                .await
            {
                Ok(_) => {
                    info!(event_type = %event_type, "Told the sender that their acknowledged request failed.");
                }
                Err(e) => {
                    warn!(error = %e, event_type = %event_type, "An acknowledged event failed afterwards and its sender could not be told.");
                }
            }
        })
    })
}

/// The application's event handler: card actions and message commands go to the
/// authorization flow; other events are logged and acknowledged.
pub(super) fn app_handler(auth: crate::auth::AuthService) -> crate::events::Handler {
    Arc::new(move |cb| {
        let auth = auth.clone();
        Box::pin(async move {
            match cb {
                crate::callbacks::Callback::CardAction(c) => {
                    let operator = c.operator_id().unwrap_or_default().to_owned();
                    match auth.card_action(&c.action_value, &operator).await {
                        Ok(Some(resp)) => Ok(crate::events::HandlerReply::Respond(resp)),
                        Ok(None) => Ok(crate::events::HandlerReply::Done),
                        Err(e) => Err(e.into()),
                    }
                }
                crate::callbacks::Callback::Event(e) if e.event_type == "im.message.receive_v1" => {
                    match auth.message_command(e.json()).await {
                        Ok(_) => Ok(crate::events::HandlerReply::Done),
                        // A redelivery would be refused the same way: acknowledge it.
                        Err(
                            err @ (crate::auth::AuthError::RateLimited { .. }
                            | crate::auth::AuthError::Invalid { .. }),
                        ) => {
                            info!(error = %err, "Authorization command refused.");
                            Ok(crate::events::HandlerReply::Done)
                        }
                        Err(err) => Err(err.into()),
                    }
                }
                crate::callbacks::Callback::Event(e) => {
                    debug!(event_id = %e.event_id, event_type = %e.event_type, "Event received; no handler for its type.");
                    Ok(crate::events::HandlerReply::Done)
                }
                crate::callbacks::Callback::UrlVerification { .. } => {
                    Ok(crate::events::HandlerReply::Done)
                }
            }
        })
    })
}
