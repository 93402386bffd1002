"""forkgw: an nginx-shaped gateway in Python that runs proxy-wasm filters."""

__version__ = "0.1.0"
