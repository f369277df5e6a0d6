"""Prefill/decode disaggregation: KV blocks moved between engines by a connector (issue 25).

config.py          KVTransferConfig: vLLM's --kv-transfer-config keys, typed and validated
connector.py       the connector interface (blocks by id, layer by layer) and the factory
torch_connector.py torch.distributed point-to-point (NCCL / gloo) plus a ZeroMQ side channel
nixl_connector.py  NIXL one-sided reads (optional library: a clear error where it is absent)
ipc_connector.py   one host: the consumer maps the producer's pool (CUDA IPC / shared memory) and reads it
rendezvous.py      the group's TCPStore: roles, side-channel addresses, NIXL agent descriptions
side_channel.py    the metadata handshake messages (msgspec) and their ZeroMQ server
kv_blocks.py       gathering and scattering blocks of a paged KV pool, one layer at a time
coordinator.py     the engine core's side: producer holds, consumer receives, timeouts, counters
"""
