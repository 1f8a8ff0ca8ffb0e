"""The course's tooling, apart from the modules a learner reads: the `d2r` command line (`cli`), the
chapter runner (`runner`, `notebook_run`: profiles, sweeps, manifests, provenance), throughput
benchmarks (`bench`) and the runner's cost projection (`projection`). Appendix."""
