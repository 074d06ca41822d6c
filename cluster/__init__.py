"""The serving cluster, above the model (workers/) and the expert-parallel data plane
(router/): `cli/` (the `dsv4` command), `assembly/` (manifest -> running pieces),
`gateway/` (gRPC API), `engine/` (per-instance loop, scheduler, pool router),
`backends/` (where workers run: threads or Ray actors), `deploy/` (`ray up`), `bench/`.
Ray is imported only here."""
