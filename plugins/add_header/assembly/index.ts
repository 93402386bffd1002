// The proxy-runtime README example: add `hello: <configuration>` to every response.
export * from "@solo-io/proxy-runtime/proxy"; // the proxy_* exports the host calls into
import {
  RootContext, Context, registerRootContext, FilterHeadersStatusValues, stream_context,
} from "@solo-io/proxy-runtime";

class AddHeaderRoot extends RootContext {
  createContext(context_id: u32): Context {
    return new AddHeader(context_id, this);
  }
}

class AddHeader extends Context {
  constructor(context_id: u32, root_context: AddHeaderRoot) {
    super(context_id, root_context);
  }

  onResponseHeaders(a: u32, end_of_stream: bool): FilterHeadersStatusValues {
    const root_context = this.root_context;
    // Kept as in the SDK example; with 0.1.8 an empty configuration already
    // aborts in proxy_on_configure, so the "world!" branch is only reached
    // by hosts that answer an empty plugin-config read with Ok.
    if (root_context.getConfiguration() == "") {
      stream_context.headers.response.add("hello", "world!");
    } else {
      stream_context.headers.response.add("hello", root_context.getConfiguration());
    }
    return FilterHeadersStatusValues.Continue;
  }
}

registerRootContext((context_id: u32) => { return new AddHeaderRoot(context_id); }, "add_header");
