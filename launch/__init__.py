"""Local federations of processes: a server and worker processes started as `lbgm server` and
`lbgm worker` children, where a Placement puts them (127.0.0.1 for `lbgm run`, sweeps and
lbgm.testing; network namespaces for the lab), followed to the end and summarized (federation),
and the environment those children get (environment)."""
