"""Pure building blocks shared by server and worker: LBGM math, tensor codec,
models, data sets and partitions, configuration. Nothing here opens a socket."""
