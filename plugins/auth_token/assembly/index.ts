// Static token check in the request-headers phase: 401 when the header is
// missing, 403 when it does not match, otherwise the request goes on.
export * from "@solo-io/proxy-runtime/proxy"; // the proxy_* exports the host calls into
import {
  RootContext, Context, registerRootContext, FilterHeadersStatusValues, stream_context,
  send_local_response, GrpcStatusValues, HeaderPair, Headers, log, LogLevelValues,
} from "@solo-io/proxy-runtime";
import { readPluginConfiguration, looksLikeJsonObject, parseFlatJson, field } from "../../lib/config";

class AuthRoot extends RootContext {
  header: string = "authorization";
  token: string = "";
  realm: string = "forkgw";

  onConfigure(configuration_size: u32): bool {
    // Not super.onConfigure: see readPluginConfiguration.
    const conf = readPluginConfiguration(configuration_size);
    if (looksLikeJsonObject(conf)) {
      const m = parseFlatJson(conf);
      if (m === null) {
        log(LogLevelValues.error, "auth_token: configuration is not a flat JSON object");
        return false;
      }
      this.header = field(m, "header", this.header).trim().toLowerCase();
      this.token = field(m, "token", "");
      this.realm = field(m, "realm", this.realm);
    } else {
      this.token = conf.trim();
    }
    // An empty token would let every request through; refuse it loudly instead.
    if (this.token.length == 0 || this.header.length == 0) {
      log(LogLevelValues.error, "auth_token: configuration needs a non-empty token and header");
      return false;
    }
    log(LogLevelValues.info, "auth_token: checking header " + this.header);
    return true;
  }

  createContext(context_id: u32): Context {
    return new AuthToken(context_id, this);
  }
}

function pair(k: string, v: string): HeaderPair {
  return new HeaderPair(String.UTF8.encode(k), String.UTF8.encode(v));
}

class AuthToken extends Context {
  auth: AuthRoot;

  constructor(context_id: u32, root_context: AuthRoot) {
    super(context_id, root_context);
    this.auth = root_context;
  }

  deny(status: u32, details: string, body: string): FilterHeadersStatusValues {
    const headers: Headers = [];
    headers.push(pair("www-authenticate", "Bearer realm=\"" + this.auth.realm + "\""));
    headers.push(pair("content-type", "text/plain"));
    send_local_response(status, details, String.UTF8.encode(body), headers, GrpcStatusValues.InvalidCode);
    // The host now owns the reply; stop so the request never reaches upstream.
    return FilterHeadersStatusValues.StopIteration;
  }

  onRequestHeaders(a: u32, end_of_stream: bool): FilterHeadersStatusValues {
    // The SDK cannot tell a missing header from an empty one; both are "missing".
    const got = stream_context.headers.request.get(this.auth.header).trim();
    if (got.length == 0) {
      return this.deny(401, "auth_token_missing", "missing credentials\n");
    }
    const want = this.auth.token;
    if (got != want && got != "Bearer " + want) {
      return this.deny(403, "auth_token_invalid", "invalid credentials\n");
    }
    return FilterHeadersStatusValues.Continue;
  }
}

registerRootContext((context_id: u32) => { return new AuthRoot(context_id); }, "auth_token");
