"""The network lab (lbgm.lab): network namespaces, veth links and tc shaping (netns), and running
an experiment across them (experiment). `lbgm lab` (cli/lab.py) is its entry point."""
