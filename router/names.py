"""The names of the communicators, in a module without torch: the manifest validates
against it when a command starts, before any model code loads."""

COMMUNICATORS = ("local", "gloo", "nccl")  # router.comm.make_communicator builds each
