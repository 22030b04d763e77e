"""Moving tensors between stages, behind one interface per kind of transfer.

KV (prefill -> decode): decode reserves blocks, the KV is written into them over
the best path the pair shares (`kv_paths`: in-process adoption, shared memory,
CUDA IPC, NIXL, raw gRPC frames), then prefill commits the metadata
(`kv_receiver`, `kv_sender`). Embeddings (encode -> prefill): `grpc_transport`.
Import the modules themselves: this package imports nothing, so the
dependency-free ones (`shm`, `block_copy`, `cuda_ipc`) load without gRPC."""
