"""Reports of finished (or running) runs: reading run folders and archiving them (runs), comparing
runs against a measured delta = 0 run in a markdown table (comparison), the plots and report.md
(plots), and the files of the gradient-space analysis (gradient_space). `lbgm report`,
`lbgm sweep` and the network lab use them."""
