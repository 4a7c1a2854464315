#!/usr/bin/env node
// The official Node SDK's long-connection client with a no-op handler, for benches/longconn.rs.
//
//     LARK_DOMAIN=http://127.0.0.1:PORT APP_ID=cli_... APP_SECRET=... node client.js EVENT_TYPE
//
// Connects with `WSClient` (@larksuiteoapi/node-sdk, the exact version in package-lock.json) to
// the sandbox given as `domain` and handles EVENT_TYPE with an `EventDispatcher` whose handler
// does nothing. The SDK does the rest as in production: it reassembles fragments by message_id
// (`DataCache.mergeData`), runs the handler and ACKs every event with {"code":200} plus a
// `biz_rt` header (`handleEventData`). Both loggers are set to warn so that per-event logging is
// not what the benchmark measures. It runs until it is killed; a fatal connection error (onError)
// exits with status 1.
'use strict';

const lark = require('@larksuiteoapi/node-sdk');

const eventType = process.argv[2];
const { APP_ID: appId, APP_SECRET: appSecret, LARK_DOMAIN: domain } = process.env;
if (!eventType || !appId || !appSecret || !domain) {
  console.error('usage: node client.js EVENT_TYPE (LARK_DOMAIN, APP_ID, APP_SECRET from the environment)');
  process.exit(64);
}
// start() only logs and returns on an app id it refuses; say so and fail instead of idling.
if (!/^cli_[0-9a-fA-F]{16}$/.test(appId)) {
  console.error(`the Node SDK refuses app id ${appId} (it wants ^cli_[0-9a-fA-F]{16}$)`);
  process.exit(64);
}

const version = require('@larksuiteoapi/node-sdk/package.json').version;
console.error(`@larksuiteoapi/node-sdk ${version} connecting to ${domain}`);

const eventDispatcher = new lark.EventDispatcher({ loggerLevel: lark.LoggerLevel.warn }).register({
  // Resolving to undefined makes the SDK ACK with {"code":200} and no data.
  [eventType]: async () => {},
});
const wsClient = new lark.WSClient({
  appId,
  appSecret,
  domain,
  loggerLevel: lark.LoggerLevel.warn,
  onError: (err) => {
    console.error(`WSClient gave up: ${err && err.message}`);
    process.exit(1);
  },
});
wsClient.start({ eventDispatcher });
