// Request rewriting: replace a :path prefix and drop request headers on the
// way upstream; drop response headers on the way back.
export * from "@solo-io/proxy-runtime/proxy"; // the proxy_* exports the host calls into
import {
  RootContext, Context, registerRootContext, FilterHeadersStatusValues, stream_context,
  log, LogLevelValues,
} from "@solo-io/proxy-runtime";
import { readPluginConfiguration, looksLikeJsonObject, parseFlatJson, field, headerList } from "../../lib/config";

class RewriteRoot extends RootContext {
  from: string = "";
  to: string = "";
  removeRequest: string[] = [];
  removeResponse: string[] = [];

  // "/old/=/new/" -> from "/old/", to "/new/". Returns false when malformed.
  setPathRule(rule: string): bool {
    rule = rule.trim();
    if (rule.length == 0) return true; // no path rewriting
    const eq = rule.indexOf("=");
    if (eq <= 0) return false;
    this.from = rule.substring(0, eq).trim();
    this.to = rule.substring(eq + 1).trim();
    return this.from.startsWith("/") && this.to.startsWith("/");
  }

  onConfigure(configuration_size: u32): bool {
    // Not super.onConfigure: see readPluginConfiguration.
    const conf = readPluginConfiguration(configuration_size);
    let rule = conf;
    if (looksLikeJsonObject(conf)) {
      const m = parseFlatJson(conf);
      if (m === null) {
        log(LogLevelValues.error, "rewrite: configuration is not a flat JSON object");
        return false;
      }
      rule = field(m, "path", "");
      this.removeRequest = headerList(field(m, "remove_request", ""));
      this.removeResponse = headerList(field(m, "remove_response", ""));
    }
    if (!this.setPathRule(rule)) {
      log(LogLevelValues.error, "rewrite: path rule must look like /old/=/new/, got: " + rule);
      return false;
    }
    // A filter that changes nothing is almost surely a typo in the conf.
    if (this.from.length == 0 && this.removeRequest.length == 0 && this.removeResponse.length == 0) {
      log(LogLevelValues.error, "rewrite: configuration names no path rule and no headers");
      return false;
    }
    return true;
  }

  createContext(context_id: u32): Context {
    return new Rewrite(context_id, this);
  }
}

class Rewrite extends Context {
  conf: RewriteRoot;

  constructor(context_id: u32, root_context: RewriteRoot) {
    super(context_id, root_context);
    this.conf = root_context;
  }

  onRequestHeaders(a: u32, end_of_stream: bool): FilterHeadersStatusValues {
    const req = stream_context.headers.request;
    if (this.conf.from.length > 0) {
      const path = req.get(":path");
      if (path.startsWith(this.conf.from)) {
        const rewritten = this.conf.to + path.substring(this.conf.from.length);
        req.replace(":path", rewritten);
        // Upstreams and logs can still see what the client asked for.
        req.add("x-original-path", path);
      }
    }
    for (let i = 0; i < this.conf.removeRequest.length; i++) {
      req.remove(this.conf.removeRequest[i]);
    }
    return FilterHeadersStatusValues.Continue;
  }

  onResponseHeaders(a: u32, end_of_stream: bool): FilterHeadersStatusValues {
    for (let i = 0; i < this.conf.removeResponse.length; i++) {
      stream_context.headers.response.remove(this.conf.removeResponse[i]);
    }
    return FilterHeadersStatusValues.Continue;
  }
}

registerRootContext((context_id: u32) => { return new RewriteRoot(context_id); }, "rewrite");
