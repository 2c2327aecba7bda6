"""The experiment settings (lbgm.experiment.config): what a run trains and how, as the server, lbgm run,
sweeps, the lab and the simulation read them from flags, TOML files and LBGM_* variables."""
