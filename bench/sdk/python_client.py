#!/usr/bin/env python3
"""The official Python SDK's long-connection client with a no-op handler, for benches/longconn.rs.

    LARK_DOMAIN=http://127.0.0.1:PORT APP_ID=cli_... APP_SECRET=... python_client.py EVENT_TYPE

Connects with ``lark_oapi.ws.Client`` (lark-oapi 1.7.5, requirements.txt beside this file) to the
sandbox given as ``domain`` and handles ``EVENT_TYPE`` with a handler that does nothing. The SDK
does the rest as in production: it reassembles fragments by ``message_id`` (``_combine``), runs
the handler and ACKs every event with ``{"code": 200}`` plus a ``biz_rt`` header
(``_handle_data_frame``). Its logger writes to stdout; it is set to WARNING here so that per-event
logging is not what the benchmark measures (the SDK still formats its per-event debug line, as it
does in production). It runs until it is killed.
"""

import os
import sys

import lark_oapi as lark
from lark_oapi.core.const import VERSION


def on_event(_event: lark.CustomizedEvent) -> None:
    """The no-op handler: returning None makes the SDK ACK with ``{"code": 200}`` and no data."""


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit("usage: python_client.py EVENT_TYPE (LARK_DOMAIN, APP_ID, APP_SECRET from the environment)")
    event_type = sys.argv[1]
    handler = (
        lark.EventDispatcherHandler.builder("", "", lark.LogLevel.WARNING)
        .register_p2_customized_event(event_type, on_event)
        .build()
    )
    client = lark.ws.Client(
        os.environ["APP_ID"],
        os.environ["APP_SECRET"],
        log_level=lark.LogLevel.WARNING,
        event_handler=handler,
        domain=os.environ["LARK_DOMAIN"],
    )
    print(f"lark-oapi {VERSION} connecting to {os.environ['LARK_DOMAIN']}", file=sys.stderr, flush=True)
    client.start()


if __name__ == "__main__":
    main()
