"""router: the expert-parallel data plane (docs/model.md §6, docs/architecture.md §4).

Routing (`route`, and `router.gate.Gate`, the model's gate module), expert placement
(`ExpertPlacement`), `dispatch`/`combine` of token rows to the workers that hold the chosen
experts, over a `Communicator` chosen by name (`local`, `gloo`, `nccl`), and
`moe_reference`, the single-worker oracle of dispatch∘combine. Imports only router/ and
kernels/ of the project. Import from the modules: `comm` (communicators, `run_local`),
`dispatch`, `gate`, `placement`, `stats`, `names` (the communicator names, without torch).
"""
